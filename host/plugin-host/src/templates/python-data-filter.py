"""{{name}}: a data filter in Python. Example: drop records whose text is shorter than min_chars."""
import json

from componentize_py_types import Err
from wit_world import exports
from wit_world.exports import data_filter, info

_min_chars = None


class Info(exports.Info):
    def describe(self) -> info.PluginInfo:
        return info.PluginInfo(name="{{name}}", version="0.1.0", description="{{name}} data filter")


class DataFilter(exports.DataFilter):
    def configure(self, params: str) -> None:
        global _min_chars
        _min_chars = int(json.loads(params).get("min_chars", 0))

    def filter_batch(self, records: list[str]) -> list[data_filter.Verdict]:
        if _min_chars is None:
            raise Err("filter-batch called before configure")
        out = []
        for r in records:
            text = json.loads(r).get("text", "")
            out.append(data_filter.Verdict_Keep() if len(text) >= _min_chars else data_filter.Verdict_Drop())
        return out
