"""Recount the token figures of stored `vs_trl.py` jdpo results with today's `flops.token_counts`.

    python experiments/bench/recount.py experiments/bench/results/vs_trl_2026-12-07 [--assets DIR]

Each `<lengths>_<size>[_<pairs>]_jdpo[_rerun][_plain].json` (results from before the shared prompt
have no `shared_prompt` field: plain) is replanned from the same assets
(`assets.build`, the same seed) and packing (`vs_trl.jdpo_plan`, checked against the stored token total),
and its tokens/s, padding and MFU / strict MFU recomputed over the stored steady-state step times and the
peak that run measured. Nothing is timed again: only what came from counting changes. Results whose
counting was already today's agree with their stored figures.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from assets import LENGTHS, build  # noqa: E402
from vs_trl import jdpo_plan  # noqa: E402

NAME = re.compile(r"(?P<lengths>[a-z]+)_(?P<size>\d+m)(_\d+)?(_plain)?_jdpo(_rerun)?(_plain)?\.json$")


def recount(stored: dict, plan: dict, warmup_steps: int) -> dict:
    """The stored run's counted figures again, from `plan` (its packing) and its own step times."""
    steps, times = plan["steps"], stored["step_times"]
    if len(steps) != len(times) or plan["tokens_total"] != stored["tokens_total"]:
        raise RuntimeError("the replanned packing is not the stored run's")
    timed = slice(warmup_steps, None)
    timed_s, peak = sum(times[timed]), stored["peak_flops"]
    return {
        "tokens_per_s": sum(s["tokens"] for s in steps[timed]) / timed_s,
        "padding_fraction": 1 - sum(s["tokens"] for s in steps) / sum(s["slots"] for s in steps),
        "mfu": sum(s["flops"] for s in steps[timed]) / (timed_s * peak),
        "mfu_strict": sum(s["flops_strict"] for s in steps[timed]) / (timed_s * peak),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", help="Directories of vs_trl.py JSON results.")
    ap.add_argument("--assets", default="runs/bench_assets", help="Where the assets are (re)built.")
    ap.add_argument("--steps-warmup", type=int, default=2, help="As the runs were made (vs_trl.py's).")
    a = ap.parse_args()
    keys = ("tokens_per_s", "padding_fraction", "mfu", "mfu_strict")
    print(f"{'result':44}" + "".join(f"{k + ' was -> now':>30}" for k in keys))
    for path in sorted(p for d in a.results for p in Path(d).glob("*_jdpo*.json")):
        m = NAME.search(path.name)
        if m is None:
            continue
        stored = json.loads(path.read_text())
        paths = build(a.assets, stored["num_pairs"], lengths=m["lengths"], model_size=m["size"])
        max_length, max_prompt_length = LENGTHS[m["lengths"]]
        plan = jdpo_plan(str(paths["model"]), str(paths["data"]), rows=stored["rows"], max_length=max_length,
                         max_prompt_length=max_prompt_length, batch_pairs=0,
                         shared_prompt=stored.get("shared_prompt", False))  # fmt: skip
        now = recount(stored, plan, a.steps_warmup)
        cells = []
        for k in keys:
            fmt = "{:.1f}" if k == "tokens_per_s" else "{:.1%}"
            cells.append(f"{fmt.format(stored[k])} -> {fmt.format(now[k])}")
        print(f"{path.parent.name + '/' + path.name:44}" + "".join(f"{c:>30}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
