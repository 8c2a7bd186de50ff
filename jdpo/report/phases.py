"""Where a run's time goes outside its steps: named phases of set-up and wrap-up, timed on the wall clock.

    with phases.timed("model load"):
        ...
    phases.summary()   # {"process start": (4.1, 0.23), "model load": (6.2, 0.85), ...}: seconds, GiB

One recorder per process (the phases of one run; a second run in the same process starts it again with
`reset`). "process start" is the time from the process's start (from /proc on Linux) to the first phase:
the interpreter, the imports and the config. The train loop reports the phases once before the first
step ("set-up") and once after the run ("wrap-up": the final save and the export): a console line each,
and a record each in `<output_dir>/phases.jsonl` (PHASES_FILE; apart from metrics.jsonl, whose records
are the training curve). This module imports nothing heavy.
"""

from __future__ import annotations

import contextlib
import json
import os
import time

from jdpo.paths import as_path

PHASES_FILE = "phases.jsonl"

_phases: dict[str, float] = {}
_rss: dict[str, float] = {}  # phase -> the process's resident memory (GiB) when it last ended
_started = False  # a phase has run in this process: "process start" is measured once


def reset() -> None:
    """Forget the phases so far (a second run in the same process)."""
    _phases.clear()
    _rss.clear()


def resident_gib() -> float | None:
    """The process's resident memory now (VmRSS, Linux), in GiB; None where it cannot be read."""
    try:
        with open("/proc/self/status") as f:
            for entry in f:
                if entry.startswith("VmRSS:"):
                    return int(entry.split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        pass
    return None


def _process_age() -> float | None:
    """Seconds since this process started (Linux /proc), None where that cannot be read."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


@contextlib.contextmanager
def timed(name: str):
    """Add the wall time of the block to phase `name` (phases may repeat: the times add up)."""
    global _started
    if not _started:
        _started = True
        age = _process_age()
        if age is not None:
            _phases["process start"] = age
            _note_rss("process start")
    t0 = time.perf_counter()
    try:
        yield
    finally:
        _phases[name] = _phases.get(name, 0.0) + time.perf_counter() - t0
        _note_rss(name)


def _note_rss(name: str) -> None:
    gib = resident_gib()
    if gib is not None:
        _rss[name] = gib


def summary() -> dict[str, tuple[float, float | None]]:
    """The phases so far, in the order they first ran: (seconds, resident GiB at its end)."""
    return {k: (v, _rss.get(k)) for k, v in _phases.items()}


def take() -> dict[str, tuple[float, float | None]]:
    """`summary()`, then forget those phases (the next `take` reports only what ran since)."""
    out = summary()
    _phases.clear()
    _rss.clear()
    return out


def line(values: dict[str, tuple[float, float | None]]) -> str:
    """'model load 6.2 s (1.6 GiB), reference pass 20.1 s (2.4 GiB), ...; 38.4 s in all': each phase's
    time and the process's resident memory at its end."""
    parts = ", ".join(
        f"{k} {s:.1f} s" + ("" if g is None else f" ({g:.2f} GiB)") for k, (s, g) in values.items()
    )
    return f"{parts}; {sum(s for s, _ in values.values()):.1f} s in all"


def record(what: str, step: int, values: dict[str, tuple[float, float | None]]) -> dict:
    """One line of PHASES_FILE: {"what": "set-up", "step": 0, "seconds": {"model load": 6.2, ...},
    "rss_gib": {"model load": 1.6, ...}} (`step`: the run's step when it was taken)."""
    return {
        "what": what,
        "step": step,
        "seconds": {k: round(s, 3) for k, (s, _) in values.items()},
        "rss_gib": {k: round(g, 3) for k, (_, g) in values.items() if g is not None},
    }


def append(output_dir, rec: dict) -> None:
    """Add `rec` as a line of `<output_dir>/phases.jsonl` (a local path or an `etils.epath` URL)."""
    path = as_path(output_dir) / PHASES_FILE
    before = path.read_text() if path.exists() else ""
    path.write_text(before + json.dumps(rec) + "\n")


def read(output_dir) -> list[dict]:
    """The records of `<output_dir>/phases.jsonl` ([] when there is none)."""
    path = as_path(output_dir) / PHASES_FILE
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []
