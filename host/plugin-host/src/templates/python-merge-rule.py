"""{{name}}: a merge rule in Python. Example: average everything natively (linear plan).
Element-wise Python (plan Custom + merge_chunk) works too, but is 10-100x slower than a native plan."""
import json
import struct

from componentize_py_types import Err
from wit_world import exports
from wit_world.exports import info, merge_rule as mr


class Info(exports.Info):
    def describe(self) -> info.PluginInfo:
        return info.PluginInfo(name="{{name}}", version="0.1.0", description="{{name}} merge rule")


class MergeRule(exports.MergeRule):
    def configure(self, params: str) -> None:
        json.loads(params)

    def plan_tensor(self, tensor: mr.TensorInfo) -> mr.MergePlan:
        n = len(tensor.stats)
        return mr.MergePlan_Linear([1.0 / n] * n)

    def merge_chunk(self, tensor: mr.TensorInfo, offset: int, inputs: list[bytes]) -> bytes:
        if tensor.dtype != mr.Dtype.FLOAT32:
            raise Err("this rule merges float32 only")
        count = len(inputs[0]) // 4
        values = [struct.unpack(f"<{count}f", x) for x in inputs]
        return struct.pack(f"<{count}f", *(sum(v) / len(v) for v in zip(*values)))
