"""The README's Python API example runs as written (in a temporary directory) and does what it says."""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_block(heading: str) -> str:
    """The first ```python block after `heading` in README.md."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index(heading) :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_python_api_example_runs(tmp_path, capsys):
    code = readme_block("## Python API")
    (tmp_path / "experiments").symlink_to(ROOT / "experiments")  # the example names a preset by path
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    finally:
        os.chdir(cwd)
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("4 ") for line in lines)  # the callback saw step 4
    assert 0.0 <= float(lines[-2]) <= 1.0  # evaluate(): an accuracy
    assert (tmp_path / "runs/api/dpo/final/config.json").exists()
