"""keep-answered: keeps chat records whose last message is a non-empty assistant reply of at most max_chars."""
import json

from componentize_py_types import Err
from wit_world import exports
from wit_world.exports import data_filter, info

_max_chars = None


class Info(exports.Info):
    def describe(self) -> info.PluginInfo:
        return info.PluginInfo(name="keep-answered", version="0.1.0",
                               description="Keeps chat records that end in a non-empty, not too long assistant reply")


class DataFilter(exports.DataFilter):
    def configure(self, params: str) -> None:
        global _max_chars
        p = json.loads(params)
        unknown = set(p) - {"max_chars"}
        if unknown:
            raise Err(f"invalid params: unknown keys {sorted(unknown)}")
        _max_chars = int(p.get("max_chars", 2000))
        if _max_chars < 1:
            raise Err("max_chars must be at least 1")

    def filter_batch(self, records: list[str]) -> list[data_filter.Verdict]:
        if _max_chars is None:
            raise Err("filter-batch called before configure")
        out = []
        for text in records:
            record = json.loads(text)
            messages = record.get("messages") if isinstance(record, dict) else None
            last = messages[-1] if isinstance(messages, list) and messages else {}
            reply = last.get("content") if isinstance(last, dict) and last.get("role") == "assistant" else None
            keep = isinstance(reply, str) and 0 < len(reply.strip()) <= _max_chars
            out.append(data_filter.Verdict_Keep() if keep else data_filter.Verdict_Drop())
        return out
