"""The code's style is checked, not hoped for: ruff's lint rules and formatter (line length 120, pyproject.toml) over
the package, the benchmarks and the tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKED = ["flexres", "benchmarks", "tests"]


def ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", *args, *CHECKED], cwd=ROOT, capture_output=True, text=True)


def test_lint_rules_hold():
    done = ruff("check", "--output-format", "concise")
    assert done.returncode == 0, done.stdout + done.stderr


def test_code_is_formatted_at_line_length_120():
    done = ruff("format", "--check")
    assert done.returncode == 0, "run `ruff format flexres benchmarks tests`:\n" + done.stdout + done.stderr
