"""The library's shape: the Python API returns what the CLI prints, imports run one way, output a person reads."""

import ast
import inspect
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import flexres
import flexres.nn
from flexres.cli import MAX_RESOLUTION, main
from flexres.data import sample_data_dir
from flexres.engine.trainer import epoch_line
from flexres.errors import ConfigError
from flexres.nn import is_quantized

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "flexres"

# Lower layers never import higher ones: nn <- models <- methods <- engine <- analysis <- deploy <- api <- cli.
# Modules of one rank are independent of each other. flexres/__init__.py is the facade, above everything.
RANKS = {
    "version": 0,
    "errors": 0,
    "operating_point": 0,
    "notes": 0,
    "parity": 1,
    "data": 1,
    "nn": 1,
    "models": 2,
    "methods": 3,
    "engine": 4,
    "analysis": 5,
    "deploy": 6,
    "serving": 7,
    "api": 8,
    "cli": 9,
}


@pytest.fixture(scope="module")
def run_and_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    data = root / "data"
    shutil.copytree(sample_data_dir(), data)
    metrics = flexres.train(
        {
            "model": {"name": "resnet18", "width_mult": 0.25},
            "method": {"name": "rsnet", "resolutions": [64, 48]},
            "data": {"root": str(data), "cache": True, "num_workers": 0},
            "train": {"epochs": 1, "batch_size": 25, "lr": 0.02, "progress": False, "eval_every": 0},
            "eval": {"resolutions": [72, 64, 48]},
        },
        root / "run",
        log=lambda s: None,
    )
    assert metrics["run"] == str(root / "run") and metrics["epoch"] == 1
    return root / "run", data


def _imports(path: Path) -> list[tuple[str, int]]:
    """(absolute flexres module or package imported, line) for every import in the file, at any depth."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    package = parts[:-1] if path.name != "__init__.py" else parts[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "flexres"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            if module.split(".")[0] != "flexres":
                continue
            if module == "flexres":  # `from .. import x`: a submodule, or a name of the facade
                found += [
                    (
                        f"flexres.{a.name}"
                        if (PACKAGE / a.name).exists() or (PACKAGE / f"{a.name}.py").exists()
                        else "flexres",
                        node.lineno,
                    )
                    for a in node.names
                ]
            else:
                found.append((module, node.lineno))
    return found


def test_imports_follow_the_layers():
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel == Path("__init__.py"):
            continue
        component = rel.parts[0].removesuffix(".py")
        assert component in RANKS, f"{rel}: give its package a rank in RANKS"
        for module, line in _imports(path):
            target = module.split(".")[1] if module.count(".") else "flexres (the facade)"
            if target == component:
                continue
            if target not in RANKS or RANKS[target] >= RANKS[component]:
                problems.append(f"flexres/{rel}:{line} ({component}) imports {module}")
    assert not problems, "imports against the layer order:\n" + "\n".join(problems)


def test_flexres_nn_exports_every_layer():
    defined = set()
    for path in (PACKAGE / "nn").glob("*.py"):
        tree = ast.parse(path.read_text())
        defined |= {
            n.name for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef)) and not n.name.startswith("_")
        }
    assert defined <= set(flexres.nn.__all__), (
        f"not exported from flexres.nn: {sorted(defined - set(flexres.nn.__all__))}"
    )
    layers = [getattr(flexres.nn, n) for n in flexres.nn.__all__]
    assert {c.__name__ for c in layers if inspect.isclass(c) and issubclass(c, nn.Module)} >= {
        "SwitchableBatchNorm2d",
        "MetaConv2d",
        "SlimmableConv2d",
        "SlimmableLinear",
        "SlimmableBatchNorm2d",
        "StageResize",
    }


def test_every_cli_command_is_a_public_function():
    for name in ("train", "evaluate", "table", "select", "adapt", "export", "predict", "report", "serve", "demo"):
        fn = getattr(flexres, name)
        assert callable(fn) and fn.__doc__, name


def test_eval_json_equals_the_python_result(run_and_data, tmp_path, capsys):
    run, data = run_and_data
    out = tmp_path / "eval.json"
    assert main(["eval", str(run), "--data", str(data), "--resolutions", "72", "64", "48", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "top-1 %" in printed and "UserWarning" not in printed
    py = flexres.evaluate(run, data, [72, 64, 48])
    assert json.loads(out.read_text()) == json.loads(json.dumps(py))
    # Per-class accuracy under the class names of the data's classes.tsv, stored with the run.
    names = [ln.split("\t")[2] for ln in (data / "classes.tsv").read_text().splitlines()[1:]]
    per_class = py["runs"]["run"]["results"]["64"]["per_class_top1"]
    assert list(per_class) == names
    assert abs(
        sum(per_class.values()) / len(per_class) - py["runs"]["run"]["results"]["64"]["top1"]
    ) < 1e-6 + 0.01 * len(names)


def test_table_and_select_json_equal_the_python_results(run_and_data, tmp_path, capsys):
    run, data = run_and_data
    out = tmp_path / "table.json"
    assert main(["table", str(run), "--data", str(data), "--resolutions", "64", "48", "--json", str(out)]) == 0
    rows = flexres.table(run, data, resolutions=[64, 48], write=False)
    assert json.loads(out.read_text()) == json.loads(json.dumps(rows))
    assert {r["resolution"] for r in rows} == {64, 48} and any(r["pareto_macs"] for r in rows)
    capsys.readouterr()
    budget = max(r["macs"] for r in rows)
    assert main(["select", str(run), "--max-macs", str(budget), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(flexres.select(run, max_macs=budget)))


def test_python_budgets_take_the_strings_the_cli_takes(run_and_data):
    run, data = run_and_data
    rows = flexres.table(run, data, resolutions=[64, 48])
    cheap = min(r["macs"] for r in rows)
    between = f"{(cheap + 1e4) / 1e6:.2f}M"  # only the cheapest point fits (the two are MMACs apart)
    assert flexres.select(run, max_macs=between) == flexres.select(run, max_macs=cheap + 1e4)
    assert flexres.select(run, max_macs=between)["macs"] == cheap
    assert flexres.select(run, max_macs="1G") == flexres.select(run, max_macs=1e9)
    image = str(sorted((data / "val").rglob("*.JPEG"))[0])
    assert flexres.predict(run, [image], max_macs=between)["resolution"] == next(
        r["resolution"] for r in rows if r["macs"] == cheap
    )
    with pytest.raises(ValueError, match="cannot read '20X' as a count"):
        flexres.select(run, max_macs="20X")


def test_training_prints_one_readable_line_per_epoch(tmp_path, capsys):
    m = {
        "epoch": 3,
        "lr": 0.0123456,
        "images": 100,
        "seconds": 2.0,
        "images_per_s": 50.0,
        "loss": 1.5,
        "loss_ens": 0.25,
        "loss_kd": 0.125,
        "train_top1": {"96": 41.0, "48": 30.25},
    }
    assert epoch_line(m, 20, 125) == (
        "epoch 3/20  loss 1.500 (ens 0.250, kd 0.125)  train top-1 96px 41.0 48px 30.2  lr 0.01235  50 img/s  ETA 2m05s"
    )
    data = sample_data_dir()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "model: {name: resnet18, width_mult: 0.25}\nmethod: {name: rsnet, resolutions: [48, 32]}\n"
        "data: {cache: true, num_workers: 0}\n"
        "train: {epochs: 2, batch_size: 50, lr: 0.02, progress: false, eval_every: 0}\n"
    )
    assert main(["train", "--config", str(cfg), "--data", str(data), "--out", str(tmp_path / "r")]) == 0
    lines = capsys.readouterr().out.splitlines()
    epochs = [ln for ln in lines if ln.startswith("epoch ")]
    assert len(epochs) == 2 and all(len(ln) < 200 and not ln.lstrip().startswith("{") for ln in lines)
    assert re.fullmatch(
        r"epoch 1/2  loss [\d.]+ \(cls [\d.]+, ens [\d.]+, dis [\d.]+\)  "
        r"train top-1 48px [\d.]+ 32px [\d.]+  lr \S+  \d+ img/s  ETA \d+s",
        epochs[0],
    ), epochs[0]
    full = [json.loads(ln) for ln in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in full] == [1, 2]
    assert {"loss_cls", "loss_ens", "loss_dis", "images_per_s"} <= set(full[0])  # everything stays in metrics.jsonl


def test_cli_refuses_a_resolution_above_its_maximum(run_and_data, capsys):
    run, data = run_and_data
    with pytest.raises(SystemExit) as exit_:
        main(["eval", str(run), "--data", str(data), "--resolutions", "5000"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"resolution 5000 px is outside 1..{MAX_RESOLUTION} px" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["eval", str(run), "--data", str(data), "--resolutions", "0"])
    assert "resolution 0 px is outside" in capsys.readouterr().err


def test_user_errors_are_flexres_errors_and_keep_their_builtin_types(tmp_path):
    import flexres.errors as errors
    from flexres.engine import checkpoint

    builtin = {
        "ConfigError": ValueError,
        "UnknownNameError": KeyError,
        "MissingFileError": FileNotFoundError,
        "CheckpointMismatchError": RuntimeError,
        "ParityError": ValueError,
        "UninitializedQuantizerError": ValueError,
    }
    for name, base in builtin.items():
        cls = getattr(errors, name)
        assert issubclass(cls, errors.FlexresError) and issubclass(cls, base), name
    assert checkpoint.CheckpointMismatchError is errors.CheckpointMismatchError  # still importable from where it was
    with pytest.raises(errors.MissingFileError, match="no checkpoint at"):
        flexres.load_checkpoint(tmp_path / "nothing")
    with pytest.raises(errors.UnknownNameError, match="unknown model 'resnet81'"):
        flexres.train({"model": {"name": "resnet81"}}, tmp_path / "run", data=str(tmp_path))


def test_class_names_from_the_config_must_match_the_folders(tmp_path):
    data = sample_data_dir()
    cfg = {
        "model": {"name": "resnet18", "width_mult": 0.25},
        "method": {"name": "individual", "resolutions": [32]},
        "data": {"root": str(data), "cache": True, "num_workers": 0, "class_names": ["a", "b"]},
        "train": {"epochs": 1, "batch_size": 50, "progress": False, "eval_every": 0},
    }
    with pytest.raises(ConfigError, match="names 2 classes but .* has 10 class folders"):
        flexres.train(cfg, tmp_path / "bad", log=lambda s: None)
    cfg["data"]["class_names"] = [f"class {i}" for i in range(10)]
    flexres.train(cfg, tmp_path / "ok", log=lambda s: None)
    _, meta = flexres.load_checkpoint(tmp_path / "ok")
    assert meta["class_names"] == [f"class {i}" for i in range(10)] and meta["classes"][0] == "n01440764"


def test_readme_python_section_runs(tmp_path, monkeypatch):
    """The README's Python walk-through, executed as written (in a scratch directory)."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python") :]
    section = section[: section.index("\n## ", 1)]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "the README's Python section has no code"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile("\n".join(blocks), "README.md (Python section)", "exec"), namespace)  # noqa: S102
    assert (tmp_path / "runs" / "notebook" / "table.json").is_file()


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_every_config_loads_and_builds_its_model(config):
    from flexres.engine.config import load_config
    from flexres.engine.trainer import build_model_and_method

    cfg = load_config(ROOT / "configs" / config)
    model, method = build_model_and_method(
        cfg, num_classes=10, pretrained=False
    )  # no download: the weights are not the point
    assert tuple(model.train_resolutions) == tuple(sorted(method.resolutions, reverse=True))
    r = min(method.resolutions)
    model.set_operating_point(r)
    # Slimmable models serve eval mode from post-statistics BN only, and untrained LQ quantizers refuse eval (no basis
    # yet): run both as in training.
    model.train(model.width_range is not None or is_quantized(model))
    with torch.no_grad():
        out = model(torch.randn(2, 3, r, r))
    dense = getattr(model, "task", "classification") == "segmentation"  # logits at stride 4
    assert out.shape == ((2, 10, r // 4, r // 4) if dense else (2, 10))
