"""benchmarks/ as users run it: one entry point, data from $FLEXRES_DATA or --data, no path outside the repository."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in (ROOT / "benchmarks").glob("*.py") if not p.stem.startswith("_"))


def test_python_m_benchmarks_lists_every_script_and_refuses_an_unknown_one():
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    listed = {line.split()[0] for line in out.splitlines()[2:] if line.strip()}
    assert listed == {p.stem for p in SCRIPTS} and len(listed) >= 15
    bad = subprocess.run([sys.executable, "-m", "benchmarks", "nonesuch"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "no benchmark 'nonesuch'" in bad.stderr


def test_no_benchmark_reaches_outside_the_repository_for_its_data():
    for path in SCRIPTS + [ROOT / "benchmarks" / "_common.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "parent" and getattr(node.value, "id", "") == "ROOT":
                pytest.fail(f"{path.name}:{node.lineno} builds a path from ROOT.parent (outside the repository)")
        for n, line in enumerate(path.read_text().splitlines(), 1):  # the workspace's dataset folder, in any spelling
            assert not re.search(r"""shared["']?\s*/\s*["']?data""", line), f"{path.name}:{n} names ../shared/data"


def test_the_data_default_needs_flexres_data_and_says_so(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from _common import IMAGENETTE, data_path

    monkeypatch.delenv("FLEXRES_DATA", raising=False)
    with pytest.raises(SystemExit, match=r"export FLEXRES_DATA=/path/to/datasets"):
        data_path(IMAGENETTE)
    monkeypatch.setenv("FLEXRES_DATA", str(tmp_path))
    assert data_path(IMAGENETTE) == tmp_path / "imagenette-224"
    assert data_path(tmp_path / "elsewhere") == tmp_path / "elsewhere"  # --data DIR as given


@pytest.mark.slow
def test_the_gpu_measurement_script_runs_end_to_end_on_the_cpu(tmp_path):
    """The GPU table is produced only where a GPU is lent; its script must not rot meanwhile: one tiny step per row."""
    out = tmp_path / "gpu.json"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "gpu_scale",
            "--device",
            "cpu",
            "--batch",
            "1",
            "--warmup",
            "0",
            "--steps",
            "1",
            "--workers",
            "0",
            "--only",
            "model",
            "lq22",
            "lq22-sync",
            "stream-dev",
            "--data",
            str(ROOT / "flexres" / "sample_data" / "imagenette-tiny"),
            "--out",
            str(out),
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    import json

    rows = json.loads(out.read_text())["img_s"]
    assert set(rows) == {"model", "lq22", "lq22-sync", "stream-dev"} and all(v > 0 for v in rows.values())
