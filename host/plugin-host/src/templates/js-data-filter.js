// {{name}}: a data filter in JavaScript. Example: drop records whose text is shorter than min_chars.
export const info = {
  describe() {
    return { name: '{{name}}', version: '0.1.0', description: '{{name}} data filter' };
  },
};

let minChars = null;

export const dataFilter = {
  configure(paramsJson) {
    minChars = JSON.parse(paramsJson).min_chars ?? 0;
  },
  filterBatch(records) {
    if (minChars === null) throw 'filter-batch called before configure';
    return records.map((r) => ({ tag: (JSON.parse(r).text ?? '').length >= minChars ? 'keep' : 'drop' }));
  },
};
