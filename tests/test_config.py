"""Run configuration: every key of the schema is used, and a wrong recipe fails at load time naming where and what."""

import ast
from pathlib import Path

import pytest

from flexres.engine.config import DEFAULTS, NULLABLE, apply_overrides, check_names, load_config, make_config
from flexres.engine.trainer import train
from flexres.errors import ConfigError, FlexresError, UnknownNameError

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "flexres"


def _literal(node: ast.AST) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _key_read(node: ast.AST) -> tuple[ast.AST, str] | None:
    """(mapping, key) of ``mapping["key"]`` or ``mapping.get("key", ...)``."""
    if isinstance(node, ast.Subscript) and _literal(node.slice) is not None:
        return node.value, _literal(node.slice)
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "get"
        and node.args
        and _literal(node.args[0]) is not None
    ):
        return node.func.value, _literal(node.args[0])
    return None


def config_reads(source: str) -> set[tuple[str, str]]:
    """(section, key) for each config value the module reads: ``cfg["eval"]["bn_policy"]``,
    ``x.get("eval", {}).get(...)``, or through a name bound to a section anywhere in the module (``t = cfg["train"]``
    ... ``t["epochs"]``, also in functions that take ``t`` as a parameter). A key string alone does not count:
    ``SAN_MODES[m]["bn_policy"]`` is no read of ``eval.bn_policy``."""
    tree = ast.parse(source)
    aliases: dict[str, str] = {}

    def section_of(node: ast.AST) -> str | None:
        read = _key_read(node)
        if read and read[1] in DEFAULTS:
            return read[1]
        return aliases.get(node.id) if isinstance(node, ast.Name) else None

    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                both = isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple)
                for name, value in zip(target.elts, node.value.elts) if both else [(target, node.value)]:
                    if isinstance(name, ast.Name) and section_of(value):
                        aliases[name.id] = section_of(value)
    reads = set()
    for node in ast.walk(tree):
        read = _key_read(node)
        if read and section_of(read[0]):
            reads.add((section_of(read[0]), read[1]))
    return reads


def test_the_reader_finds_reads_through_sections_and_aliases_only():
    reads = config_reads(
        't, d = cfg["train"], cfg["data"]\nt["epochs"]\nd.get("root")\nmeta.get("config", {}).get("eval", {})'
        '.get("bn_policy")\nSAN_MODES[m]["batch_size"]\nother["lr"]'
    )
    assert reads == {("train", "epochs"), ("data", "root"), ("eval", "bn_policy")}


def test_every_config_key_is_read_by_the_package():
    reads = set()
    for path in PACKAGE.rglob("*.py"):
        reads |= config_reads(path.read_text())
    unread = [f"{section}.{key}" for section, keys in DEFAULTS.items() for key in keys if (section, key) not in reads]
    assert unread == [], f"config keys nothing reads (a setting that silently does nothing): {unread}"


def test_every_key_defaulting_to_none_says_what_else_it_takes():
    assert set(NULLABLE) == {(s, k) for s, keys in DEFAULTS.items() for k, v in keys.items() if v is None}


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("model: {name: resnet18\ntrain: {epochs: 2}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}:2:") and "YAML syntax error" in str(e.value)
    assert "<unicode string>" not in str(e.value) and "\n" not in str(e.value)
    assert e.value.__cause__ is None and e.value.__suppress_context__  # no PyYAML traceback chained to it


def test_wrongly_typed_values_name_the_key_and_the_expected_type(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("model: {name: resnet18}\ntrain:\n  epochs: 3\n  lr: 0.1.0\n")
    with pytest.raises(ConfigError, match=rf"^{path}:4: train\.lr must be a number, got '0\.1\.0' \(a string\)$"):
        load_config(path)
    path.write_text("train: {weight_decay: 1e-4}\n")  # PyYAML reads 1e-4 as text: say so
    with pytest.raises(ConfigError, match=r"train\.weight_decay must be a number, got '1e-4' .*write 1\.0e-4"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"--set epochs=two: train\.epochs must be an int, got 'two' \(a string\)"):
        apply_overrides(make_config(), ["epochs=two"])
    with pytest.raises(ConfigError, match=r"method\.resolutions must be a list of ints, got \[224, 'x'\]"):
        make_config({"method": {"resolutions": [224, "x"]}})
    with pytest.raises(ConfigError, match=r"eval\.resolutions must be a list of ints or null"):
        make_config({"eval": {"resolutions": 224}})
    with pytest.raises(ConfigError, match=r"train\.amp must be true or false, got 1"):
        make_config({"train": {"amp": 1}})
    with pytest.raises(
        ConfigError, match=r"eval\.bn_policy must be one of nearest, interpolate, calibrate, got 'nearst'"
    ):
        apply_overrides(make_config(), ["eval.bn_policy=nearst"])
    # what the schema allows still loads: ints for floats, null where the default is null, any mapping of kwargs
    cfg = make_config(
        {
            "train": {"lr": 1, "lr_milestones": [30, 60.5]},
            "model": {"pretrained": "w.safetensors", "kwargs": {"a": 1}},
            "eval": {"resolutions": None},
        }
    )
    assert cfg["train"]["lr"] == 1 and cfg["model"]["pretrained"] == "w.safetensors"


def test_unknown_names_are_named_with_what_exists():
    pytest.importorskip("timm")
    check_names(make_config({"model": {"name": "timm:resnet18.a1_in1k"}}))
    check_names(make_config({"model": {"name": "torchvision:resnet18"}, "method": {"name": "parallel"}}))
    for model, method, message in (
        ("timm:notamodel", "rsnet", "unknown timm model 'notamodel'"),
        ("torchvision:resnet1", "rsnet", "unknown torchvision model 'resnet1'"),
        ("tim:resnet18", "rsnet", "unknown model source 'tim'"),
        ("resnet81", "rsnet", "unknown model 'resnet81'"),
        ("resnet18", "rsnett", "unknown method 'rsnett'"),
    ):
        with pytest.raises(UnknownNameError, match=message) as e:
            check_names(make_config({"model": {"name": model}, "method": {"name": method}}))
        assert isinstance(e.value, FlexresError) and isinstance(e.value, KeyError)  # as the registry's unknown names
        assert str(e.value).startswith("unknown ")  # the message itself, not KeyError's quoted repr of it


def test_bundled_configs_name_their_data_by_a_variable_the_user_sets(monkeypatch, tmp_path):
    from flexres.engine.config import resolve_data_root

    cfg = load_config(ROOT / "configs" / "imagenette_rsnet_r18.yaml")
    assert cfg["data"]["root"] == "$FLEXRES_DATA/imagenette-224"  # no path that exists only in one workspace
    monkeypatch.setenv("FLEXRES_DATA", str(tmp_path))
    assert resolve_data_root(cfg["data"]["root"]) == f"{tmp_path}/imagenette-224"
    monkeypatch.delenv("FLEXRES_DATA")
    with pytest.raises(ConfigError, match=r"pass --data DIR or export FLEXRES_DATA=/path/to/datasets"):
        resolve_data_root(cfg["data"]["root"])
    with pytest.raises(ConfigError, match="FLEXRES_DATA"):  # training stops before anything is written
        train(cfg, tmp_path / "run", log=lambda s: None)
    assert not (tmp_path / "run").exists()
