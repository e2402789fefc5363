#!/usr/bin/env python3
"""Welch's t-test between seed groups of a dusflow run, as the README's ablation verdicts quote them.

    # rows of a seeded report (report.json of a `report` step), one task, pairs of row names:
    python scripts/significance.py rows  RUN/report-*/report.json gsm8k "SFT v4 (+ math)" "SFT v1 (alpaca)"
    # held-out loss of swept training steps at every scored step, pairs of `model=` labels:
    python scripts/significance.py curves RUN cpt solar stack

Accuracies are in percent, as the report prints them. Needs scipy (`pip install scipy`).
"""
import glob
import json
import re
import sys

from scipy import stats


def welch(a, b):
    t, p = stats.ttest_ind(a, b, equal_var=False)
    return f"t = {t:.2f}, p = {p:.3f}"


def score(task):
    # Accuracies print as percent; perplexities as they are.
    return task["score"] if "perplexity" in task["metric"] else task["score"] * 100


def rows(report, task, names):
    by_name = {r["name"]: r for r in json.load(open(report))}
    for a, b in zip(names[::2], names[1::2]):
        values = [[score(res["tasks"][task]) for res in by_name[n]["results"]] for n in (a, b)]
        print(f"{task}: {a} {values[0]} vs {b} {values[1]}: {welch(*values)}")


def curves(run, step, models):
    runs = {}
    for folder in glob.glob(f"{glob.escape(run)}/{glob.escape(step)}[[]*"):
        model = re.search(r"model=([^,\]]+)", folder)
        if not model:
            continue
        points = {}
        for line in open(f"{folder}/metrics.jsonl"):
            v = json.loads(line)
            if "eval_loss" in v:
                points[v["step"]] = v["eval_loss"]
        runs.setdefault(model.group(1), []).append(points)
    for a, b in zip(models[::2], models[1::2]):
        steps = sorted(runs[a][0])
        cells = [
            f"{s}: {welch([r[s] for r in runs[a]], [r[s] for r in runs[b]])}" for s in steps
        ]
        print(f"{a} vs {b} ({len(runs[a])} and {len(runs[b])} seeds) | " + " | ".join(cells))


if __name__ == "__main__":
    if len(sys.argv) < 5 or sys.argv[1] not in ("rows", "curves") or len(sys.argv[4:]) % 2:
        sys.exit(__doc__)
    (rows if sys.argv[1] == "rows" else curves)(sys.argv[2], sys.argv[3], sys.argv[4:])
