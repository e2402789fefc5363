// frankenmerge: stack layer ranges ("slices") taken from one or several models, the way
// mergekit's passthrough merges build Goliath-style models. Params:
//   slices = [{ model = 0, from = 0, to = 16 }, { model = 1, from = 8, to = 24 }, ...]   (to exclusive)
//   base_model = 0   (provides embeddings, final norm, LM head; default 0)
//   scale = { "mlp.down_proj.weight" = 0.5 }   (optional per-tensor factors on every copied layer)

export const info = {
  describe() {
    return {
      name: 'frankenmerge-js',
      version: '0.1.0',
      description: 'Stacks layer slices from one or several models (JavaScript)',
    };
  },
};

export const layerPolicy = {
  plan(models, paramsJson) {
    const params = JSON.parse(paramsJson);
    const slices = params.slices;
    if (!Array.isArray(slices) || slices.length === 0) {
      throw 'params.slices must be a non-empty list of {model, from, to}';
    }
    const transforms = Object.entries(params.scale ?? {}).map(([suffix, factor]) => ({
      tensorSuffix: suffix,
      transform: { tag: 'scale', val: factor },
    }));
    const layers = [];
    for (const [i, s] of slices.entries()) {
      const m = models[s.model];
      if (m === undefined) throw `slice ${i}: model ${s.model} is not an input (${models.length} models)`;
      if (!(0 <= s.from && s.from < s.to && s.to <= m.numLayers)) {
        throw `slice ${i}: layers ${s.from}..${s.to} are outside 0..${m.numLayers} of ${m.name}`;
      }
      for (let l = s.from; l < s.to; l++) layers.push({ model: s.model, layer: l, transforms });
    }
    return { baseModel: params.base_model ?? 0, layers };
  },
};
