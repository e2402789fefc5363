"""length-filter in Python: the same rule as the Rust plugin plugins/length-filter.

Keeps records whose `field` (default "text") has between min_chars and max_chars characters;
with trim, rewrites records whose text has surrounding whitespace.
"""
import json

from componentize_py_types import Err
from wit_world import exports
from wit_world.exports import data_filter, info

# Job state: the host calls configure once per instance, then filter-batch.
_params = None
_KEEP = data_filter.Verdict_Keep()
_DROP = data_filter.Verdict_Drop()


class Info(exports.Info):
    def describe(self) -> info.PluginInfo:
        return info.PluginInfo(
            name="length-filter-py",
            version="0.1.0",
            description="Keeps records whose text length is within bounds (Python)",
        )


class DataFilter(exports.DataFilter):
    def configure(self, params: str) -> None:
        global _params
        p = json.loads(params)
        unknown = set(p) - {"field", "min_chars", "max_chars", "trim"}
        if unknown:
            raise Err(f"invalid params: unknown keys {sorted(unknown)}")
        _params = {
            "field": p.get("field", "text"),
            "min_chars": int(p.get("min_chars", 0)),
            "max_chars": int(p.get("max_chars", 2**63)),
            "trim": bool(p.get("trim", False)),
        }
        if _params["min_chars"] > _params["max_chars"]:
            raise Err(f"min_chars {_params['min_chars']} > max_chars {_params['max_chars']}")

    def filter_batch(self, records: list[str]) -> list[data_filter.Verdict]:
        if _params is None:
            raise Err("filter-batch called before configure")
        field, lo, hi, trim = _params["field"], _params["min_chars"], _params["max_chars"], _params["trim"]
        verdicts = []
        for text_json in records:
            record = json.loads(text_json)
            text = record.get(field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                verdicts.append(_DROP)
                continue
            stripped = text.strip() if trim else text
            if not lo <= len(stripped) <= hi:
                verdicts.append(_DROP)
            elif trim and len(stripped) != len(text):
                record[field] = stripped
                verdicts.append(data_filter.Verdict_Rewrite(json.dumps(record, ensure_ascii=False)))
            else:
                verdicts.append(_KEEP)
        return verdicts
