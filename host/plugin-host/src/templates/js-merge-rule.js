// {{name}}: a merge rule in JavaScript. Example: average everything natively (linear plan).
export const info = {
  describe() {
    return { name: '{{name}}', version: '0.1.0', description: '{{name}} merge rule' };
  },
};

export const mergeRule = {
  configure(paramsJson) {
    JSON.parse(paramsJson);
  },
  planTensor(tensor) {
    const n = tensor.stats.length;
    return { tag: 'linear', val: new Array(n).fill(1 / n) };
  },
  mergeChunk(tensor, offset, inputs) {
    if (tensor.dtype !== 'float32') throw 'this rule merges float32 only';
    const views = inputs.map((x) => new Float32Array(x.buffer, x.byteOffset, x.byteLength / 4));
    const out = new Float32Array(views[0].length);
    for (const v of views) for (let i = 0; i < out.length; i++) out[i] += v[i] / views.length;
    return new Uint8Array(out.buffer);
  },
};
