// {{name}}: a layer policy in JavaScript. Example: repeat the middle third of the layers.
export const info = {
  describe() {
    return { name: '{{name}}', version: '0.1.0', description: '{{name}} layer policy' };
  },
};

export const layerPolicy = {
  plan(models, paramsJson) {
    const params = JSON.parse(paramsJson);
    if (models.length === 0) throw 'needs a base model';
    const n = models[0].numLayers;
    const [lo, hi] = [Math.floor(n / 3), Math.floor((2 * n) / 3)];
    const order = [];
    for (let l = 0; l < hi; l++) order.push(l);
    for (let r = 0; r < (params.repeats ?? 1); r++) for (let l = lo; l < hi; l++) order.push(l);
    for (let l = hi; l < n; l++) order.push(l);
    return { baseModel: 0, layers: order.map((layer) => ({ model: 0, layer, transforms: [] })) };
  },
};
