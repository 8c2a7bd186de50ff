"""PNG training curves from a run's ``metrics.jsonl`` (``jdpo plot OUTPUT_DIR``; a gs:// URL works too).

matplotlib is imported here only, with the headless Agg backend, so training never needs it and the
command works on machines without a display.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jdpo.paths import as_path, is_local
from jdpo.report import metrics as M

if TYPE_CHECKING:
    from etils import epath

# (file stem, title, y label, [(metric, legend label)]). Each panel shows the train series as a faint
# raw line plus a smoothed line, and the matching eval/ series as markers.
PANELS: tuple[tuple[str, str, str, tuple[tuple[str, str], ...]], ...] = (
    ("loss", "DPO loss", "loss", ((M.LOSS, "loss"),)),
    ("accuracy", "Preference accuracy", "P(reward chosen > rejected)", ((M.REWARDS_ACCURACIES, "accuracy"),)),
    ("margins", "Reward margin", "chosen - rejected", ((M.REWARDS_MARGINS, "margin"),)),
    (
        "rewards",
        "Implicit rewards",
        "beta * log(pi / pi_ref)",
        ((M.REWARDS_CHOSEN, "chosen"), (M.REWARDS_REJECTED, "rejected")),
    ),
    (
        "logps",
        "Policy log-probs",
        "sum log p(completion)",
        ((M.LOGPS_CHOSEN, "chosen"), (M.LOGPS_REJECTED, "rejected")),
    ),
    ("optim", "Optimizer", "value", ((M.GRAD_NORM, "grad norm"), (M.LEARNING_RATE, "learning rate"))),
    ("throughput", "Throughput", "non-pad tokens / s", ((M.TOKENS_PER_SEC, "tokens/s"),)),
    ("mfu", "Model FLOPs utilisation", "fraction of peak FLOP/s", ((M.MFU, "MFU"),)),
)
# Schedules are exact, not noisy: smoothing would only shift them.
NOT_SMOOTHED = frozenset({M.LEARNING_RATE, M.EPOCH})
SMOOTH_FROM = 50  # points; below this the raw line is readable and a moving average only lags


def series(records: list[dict[str, Any]], name: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric; a later record for the same step wins (a resumed run's
    file has none, but a hand-concatenated one might)."""
    by_step: dict[int, float] = {}
    for r in records:
        v = r.get(name)
        if isinstance(v, int | float) and not isinstance(v, bool):
            by_step[int(r[M.STEP])] = float(v)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def ema(values: list[float], span: int) -> list[float]:
    """Exponential moving average with bias correction (the first values are not pulled to 0);
    non-finite values are passed over so one NaN step does not blank the rest of the curve."""
    alpha = 2.0 / (span + 1)
    out, acc, weight = [], 0.0, 0.0
    for v in values:
        if math.isfinite(v):
            acc = (1 - alpha) * acc + alpha * v
            weight = (1 - alpha) * weight + alpha
        out.append(acc / weight if weight else math.nan)
    return out


def _draw_panel(ax, records, title: str, ylabel: str, entries) -> bool:
    """Draw one panel; False when none of its metrics were logged."""
    drawn = False
    colors = ("tab:blue", "tab:red", "tab:green", "tab:purple")
    for (name, label), color in zip(entries, colors, strict=False):
        steps, values = series(records, name)
        if steps:
            drawn = True
            if len(steps) >= SMOOTH_FROM and name not in NOT_SMOOTHED:
                ax.plot(steps, values, color=color, alpha=0.25, linewidth=1)
                ax.plot(steps, ema(values, max(5, len(steps) // 25)), color=color, label=f"train {label}")
            else:
                ax.plot(steps, values, color=color, marker=".", label=f"train {label}")
        esteps, evalues = series(records, M.eval_name(name))
        if esteps:
            drawn = True
            ax.plot(esteps, evalues, color=color, linestyle="--", marker="o", label=f"eval {label}")
    if drawn:
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    return drawn


def _save(fig, path: epath.Path) -> None:
    """Save a figure as PNG on any backend (matplotlib writes local files or file objects)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    path.write_bytes(buf.getvalue())


def plot_run(
    output_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None
) -> list[Path | epath.Path]:
    """Write one PNG per panel that has data, plus ``summary.png`` (all of them in a grid), to
    ``out_dir`` (default ``<output_dir>/plots``); either may be an object-store URL. Returns the
    written paths: `pathlib.Path` for a local ``out_dir``, `epath.Path` URLs on an object store."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = M.read_metrics(output_dir)
    out = as_path(out_dir) if out_dir is not None else as_path(output_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    local = is_local(out)
    written, present = [], []
    for stem, title, ylabel, entries in PANELS:
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
        if _draw_panel(ax, records, title, ylabel, entries):
            if stem == "optim":
                ax.set_yscale("log")  # grad norm and learning rate differ by orders of magnitude
            fig.tight_layout()
            path = out / f"{stem}.png"
            _save(fig, path)
            written.append(Path(path) if local else path)
            present.append((stem, title, ylabel, entries))
        plt.close(fig)
    if present:
        cols = min(3, len(present))
        rows = math.ceil(len(present) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3.6 * rows), dpi=100, squeeze=False)
        for ax, (stem, title, ylabel, entries) in zip(axes.flat, present, strict=False):
            _draw_panel(ax, records, title, ylabel, entries)
            if stem == "optim":
                ax.set_yscale("log")
        for ax in list(axes.flat)[len(present) :]:
            ax.axis("off")
        run = as_path(output_dir)
        fig.suptitle(str(Path(run).resolve().name if is_local(run) else run.name))
        fig.tight_layout()
        path = out / "summary.png"
        _save(fig, path)
        plt.close(fig)
        written.append(Path(path) if local else path)
    return written
