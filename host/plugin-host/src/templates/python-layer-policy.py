"""{{name}}: a layer policy in Python. Example: repeat the middle third of the layers."""
import json

from componentize_py_types import Err
from wit_world import exports
from wit_world.exports import info, layer_policy as lp


class Info(exports.Info):
    def describe(self) -> info.PluginInfo:
        return info.PluginInfo(name="{{name}}", version="0.1.0", description="{{name}} layer policy")


class LayerPolicy(exports.LayerPolicy):
    def plan(self, models: list[lp.ModelConfig], params: str) -> lp.LayerPlan:
        p = json.loads(params)
        if not models:
            raise Err("needs a base model")
        n = models[0].num_layers
        lo, hi = n // 3, 2 * n // 3
        order = list(range(hi)) + list(range(lo, hi)) * int(p.get("repeats", 1)) + list(range(hi, n))
        return lp.LayerPlan(base_model=0, layers=[lp.LayerSource(model=0, layer=l, transforms=[]) for l in order])
