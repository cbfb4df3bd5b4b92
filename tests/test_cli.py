import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flexres.cli import main

CONFIG = """
model: {name: resnet18, width_mult: 0.25}
method: {name: rsnet, resolutions: [48, 40, 32], kwargs: {mred: full}}
data: {cache: true, num_workers: 0}
train: {epochs: 2, batch_size: 4, lr: 0.05, nesterov: true, warmup_epochs: 0.5, progress: false, eval_every: 1}
eval: {resolutions: [56, 48, 44, 40, 36, 32, 24], calibration_images: 8, batch_size: 4}
"""


@pytest.fixture
def config(tmp_path):
    p = tmp_path / "rsnet.yaml"
    p.write_text(CONFIG)
    return p


def test_train_then_eval_end_to_end(tmp_path, small_data, config, capsys):
    out = tmp_path / "run"
    assert (
        main(["train", "--config", str(config), "--data", str(small_data), "--out", str(out), "--set", "epochs=2"]) == 0
    )
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]
    for m in lines:
        assert {"loss", "loss_cls", "loss_ens", "loss_dis", "alpha", "val_top1"} <= set(m)
        assert abs(sum(m["alpha"].values()) - 1) < 1e-3
    capsys.readouterr()

    report = tmp_path / "report.json"
    for bn in ("interpolate", "nearest", "calibrate"):
        assert main(["eval", str(out), "--data", str(small_data), "--bn", bn, "--json", str(report)]) == 0
        text = capsys.readouterr().out
        assert "top-1 %" in text and "MMACs" in text
        rep = json.loads(report.read_text())
        res = rep["runs"]["run"]["results"]
        assert set(res) == {"56", "48", "44", "40", "36", "32", "24"}
        assert all(v["n"] == 6 and 0 <= v["top1"] <= v["top5"] <= 100 for v in res.values())
        assert res["44"]["bn"] == bn and res["48"]["bn"] == "trained"
        assert res["56"]["macs"] > res["48"]["macs"] > res["24"]["macs"]
    assert (out / "bn_calibration.safetensors").exists()  # calibrate saved its statistics with the run
    cal = load_file(str(out / "bn_calibration.safetensors"))
    assert any(k.startswith("44/") for k in cal) and not any(k.startswith("48/") for k in cal)


@pytest.mark.parametrize(
    "loading",
    [[], ["--set", "data.persistent_workers=true", "--set", "data.num_workers=2"]],
    ids=["loaders-per-epoch", "persistent-workers"],
)
def test_resume_ends_with_the_same_weights_as_an_uninterrupted_run(tmp_path, small_data, config, capsys, loading):
    full, split = tmp_path / "full", tmp_path / "split"
    args = ["train", "--config", str(config), "--data", str(small_data), "--set", "epochs=3", *loading]
    assert main(args + ["--out", str(full)]) == 0
    assert main(args + ["--out", str(split), "--stop-after-epochs", "1"]) == 0
    assert json.loads((split / "checkpoint.json").read_text())["epoch"] == 1
    first_epoch = (split / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(args + ["--out", str(split), "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "resuming" in printed and "after epoch 1" in printed
    assert [ln.split()[1] for ln in printed.splitlines() if ln.startswith("epoch ")] == [
        "2/3",
        "3/3",
    ]  # epoch 1 not redone
    assert (split / "metrics.jsonl").read_text().startswith(first_epoch)
    a, b = load_file(str(full / "checkpoint.safetensors")), load_file(str(split / "checkpoint.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("optimizer.") for k in a) and "method.alpha_scores" in a
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert len((split / "metrics.jsonl").read_text().splitlines()) == 3


def test_train_refuses_to_overwrite_and_resume_refuses_a_changed_config(tmp_path, small_data, config, capsys):
    out = tmp_path / "run"
    base = ["train", "--config", str(config), "--data", str(small_data), "--out", str(out)]
    assert main(base + ["--set", "epochs=1"]) == 0
    capsys.readouterr()
    assert main(base + ["--set", "epochs=1"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(base + ["--resume", "--set", "epochs=1", "--set", "lr=0.5"]) == 2
    assert "train.lr: 0.05 -> 0.5" in capsys.readouterr().err


def test_bad_config_keys_are_named(tmp_path, small_data, config, capsys):
    assert main(["train", "--config", str(config), "--data", str(small_data), "--set", "epochz=3"]) == 2
    assert "epochz" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epoch: 3}\n")
    assert main(["train", "--config", str(bad), "--data", str(small_data)]) == 2
    assert "unknown config key 'train.epoch'" in capsys.readouterr().err


def test_corrupt_training_image_names_the_file(tmp_path, small_data, config, capsys):
    bad = next((small_data / "train").iterdir()) / "zz_broken.JPEG"
    bad.write_bytes(b"not an image")
    base = ["train", "--config", str(config), "--data", str(small_data), "--set", "epochs=1"]
    assert main(base + ["--out", str(tmp_path / "a")]) == 2
    assert "zz_broken.JPEG" in capsys.readouterr().err
    assert main(base + ["--out", str(tmp_path / "b"), "--set", "skip_unreadable=true"]) == 0
    assert json.loads((tmp_path / "b" / "metrics.jsonl").read_text())["skipped_unreadable"] == 1
    # uncached, decoded in worker processes: the error still names the file
    capsys.readouterr()
    assert main(base + ["--out", str(tmp_path / "c"), "--set", "cache=false", "--set", "num_workers=2"]) == 2
    assert "zz_broken.JPEG" in capsys.readouterr().err


def test_console_script_help():
    exe = shutil.which("flexres") or str(Path(sys.executable).parent / "flexres")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True).stdout
    assert "train" in out and "eval" in out and "demo" in out


def test_set_batch_size_and_epochs_reach_the_training_section(config):
    from flexres.engine.config import load_config

    cfg = load_config(config, ["batch_size=7", "epochs=9", "eval.batch_size=3", "method.kwargs.mred=vanilla"])
    assert (cfg["train"]["batch_size"], cfg["train"]["epochs"], cfg["eval"]["batch_size"]) == (7, 9, 3)
    assert cfg["method"]["kwargs"] == {"mred": "vanilla"}


def test_calibration_is_reused_and_dropped_when_the_weights_change(tmp_path, small_data, config, capsys):
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--config",
                str(config),
                "--data",
                str(small_data),
                "--out",
                str(out),
                "--set",
                "epochs=2",
                "--stop-after-epochs",
                "1",
            ]
        )
        == 0
    )
    ev = ["eval", str(out), "--data", str(small_data), "--bn", "calibrate", "--resolutions", "44", "36"]
    assert main(ev + ["--json", str(tmp_path / "a.json")]) == 0
    cal = out / "bn_calibration.safetensors"
    stamp = cal.stat().st_mtime_ns
    assert main(ev + ["--json", str(tmp_path / "b.json")]) == 0  # served from the saved statistics
    assert cal.stat().st_mtime_ns == stamp
    a, b = (json.loads((tmp_path / f).read_text())["runs"]["run"]["results"] for f in ("a.json", "b.json"))
    assert a == b
    assert (
        main(
            [
                "train",
                "--config",
                str(config),
                "--data",
                str(small_data),
                "--out",
                str(out),
                "--set",
                "epochs=2",
                "--resume",
            ]
        )
        == 0
    )
    assert not cal.exists()  # new weights: the old statistics are gone


def test_demo_runs_on_the_bundled_sample_says_where_its_run_is_and_when_it_reuses_it(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--epochs", "1"]) == 0
    text = capsys.readouterr().out
    assert "top-1 %" in text and "RS-Nets Table 1" in text and "mean over S" in text
    assert f"the run is in {out}" in text and "reusing" not in text
    assert main(["demo", "--out", str(out), "--epochs", "1"]) == 0  # a second demo evaluates the first one's run
    text = capsys.readouterr().out
    assert f"reusing the finished run in {out}" in text and "trained in" not in text and "top-1 %" in text


def test_eval_defaults_to_the_data_the_runs_were_trained_on(tmp_path, small_data, config, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert (
        main(["train", "--config", str(config), "--data", str(small_data), "--out", str(a), "--set", "epochs=1"]) == 0
    )
    assert main(["eval", str(a), "--resolutions", "48", "--json", str(tmp_path / "a.json")]) == 0
    assert json.loads((tmp_path / "a.json").read_text())["data"] == str(small_data)
    other = tmp_path / "other"
    shutil.copytree(small_data, other)
    assert main(["train", "--config", str(config), "--data", str(other), "--out", str(b), "--set", "epochs=1"]) == 0
    capsys.readouterr()
    assert main(["eval", str(a), str(b), "--resolutions", "48"]) == 2  # two data sets: which one is not ours to guess
    assert f"{b} was trained on {other} but {a} on {small_data}: pass data (--data DIR)" in _one_line_error(capsys)
    shutil.rmtree(small_data)  # moved or deleted since training
    assert main(["eval", str(a), "--resolutions", "48"]) == 2
    assert f"{a} was trained on {small_data}, which is not a folder here: pass data (--data DIR" in _one_line_error(
        capsys
    )
    assert main(["eval", str(a), "--data", str(other), "--resolutions", "48"]) == 0  # --data still decides


def test_resume_of_a_finished_run_says_so_and_trains_nothing(tmp_path, small_data, config, capsys, monkeypatch):
    from flexres.engine.tasks import Classification

    out = tmp_path / "run"
    base = ["train", "--config", str(config), "--data", str(small_data), "--out", str(out), "--set", "epochs=1"]
    assert main(base) == 0
    saved = (out / "checkpoint.safetensors").read_bytes()
    capsys.readouterr()

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run read its data again to train no epoch")

    monkeypatch.setattr(Classification, "datasets", no_training)
    assert main(base + ["--resume"]) == 0
    assert f"{out} is finished (1 of 1 epochs); nothing to resume" in capsys.readouterr().out
    assert (out / "checkpoint.safetensors").read_bytes() == saved


def test_san_train_and_the_three_inference_modes_from_the_cli(tmp_path, small_data, capsys):
    cfg = tmp_path / "san.yaml"
    cfg.write_text(
        CONFIG.replace(
            "name: resnet18, width_mult: 0.25", "name: san_resnet18, width_mult: 0.25, kwargs: {scale_divisor: 80}"
        ).replace(
            "name: rsnet, resolutions: [48, 40, 32], kwargs: {mred: full}", "name: san, resolutions: [48, 40, 32]"
        )
    )
    out = tmp_path / "san"
    assert main(["train", "--config", str(cfg), "--data", str(small_data), "--out", str(out), "--set", "epochs=1"]) == 0
    m = json.loads((out / "metrics.jsonl").read_text())
    assert {"loss_cls", "loss_sd"} <= set(m)
    capsys.readouterr()
    for mode in ("proxy", "ideal", "data-free"):
        report = tmp_path / f"{mode}.json"
        assert (
            main(
                [
                    "eval",
                    str(out),
                    "--data",
                    str(small_data),
                    "--san-mode",
                    mode,
                    "--resolutions",
                    "44",
                    "40",
                    "--json",
                    str(report),
                ]
            )
            == 0
        )
        assert "mean|A| / mean|B|" in capsys.readouterr().out
        rep = json.loads(report.read_text())
        assert rep["scale_policy"] == ("nearest" if mode == "proxy" else "exact")
        assert (
            rep["runs"]["san"]["results"]["44"]["bn"]
            == {"proxy": "nearest", "ideal": "calibrate", "data-free": "interpolate"}[mode]
        )
    assert main(["eval", str(out), "--data", str(small_data), "--san-mode", "proxy", "--bn", "nearest"]) == 2


def test_eval_and_table_follow_the_runs_eval_bn_policy_unless_bn_is_given(tmp_path, small_data, config, capsys):
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--config",
                str(config),
                "--data",
                str(small_data),
                "--out",
                str(out),
                "--set",
                "epochs=1",
                "--set",
                "eval.bn_policy=nearest",
            ]
        )
        == 0
    )
    ev = ["eval", str(out), "--data", str(small_data), "--resolutions", "44", "36"]
    assert main(ev + ["--json", str(tmp_path / "config.json")]) == 0
    rep = json.loads((tmp_path / "config.json").read_text())
    assert rep["bn_policy"] == "nearest" and rep["runs"]["run"]["results"]["44"]["bn"] == "nearest"
    assert (out / "eval_nearest.json").is_file()
    assert (
        main(ev + ["--bn", "interpolate", "--json", str(tmp_path / "flag.json")]) == 0
    )  # the flag wins over the run's config
    assert json.loads((tmp_path / "flag.json").read_text())["runs"]["run"]["results"]["44"]["bn"] == "interpolate"
    assert main(["table", str(out), "--data", str(small_data), "--resolutions", "44"]) == 0
    assert json.loads((out / "table.json").read_text())["bn_policy"] == "nearest"
    assert main(["table", str(out), "--data", str(small_data), "--resolutions", "44", "--bn", "interpolate"]) == 0
    assert json.loads((out / "table.json").read_text())["bn_policy"] == "interpolate"
    capsys.readouterr()


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_config_errors_name_file_line_key_and_type_and_write_nothing(tmp_path, small_data, config, capsys):
    out = tmp_path / "run"
    base = ["train", "--data", str(small_data), "--out", str(out)]
    assert main(base + ["--config", str(config), "--set", "epochs=two"]) == 2
    assert "train.epochs must be an int, got 'two'" in _one_line_error(capsys)
    typo = tmp_path / "typo.yaml"
    typo.write_text(CONFIG.replace("lr: 0.05", "lr: 0.1.0"))
    assert main(base + ["--config", str(typo)]) == 2
    assert f"{typo}:5: train.lr must be a number, got '0.1.0'" in _one_line_error(capsys)
    broken = tmp_path / "broken.yaml"
    broken.write_text(CONFIG.replace("kwargs: {mred: full}}", "kwargs: {mred: full}"))
    assert main(base + ["--config", str(broken)]) == 2
    err = _one_line_error(capsys)
    assert f"{broken}:4:" in err and "YAML syntax error" in err and "<unicode string>" not in err
    assert not out.exists()  # nothing written: no config.yaml of a run that never started


def test_names_are_checked_before_the_datasets_are_read(tmp_path, small_data, config, capsys, monkeypatch):
    from flexres.engine.tasks import Classification

    def too_late(*args, **kwargs):
        raise AssertionError("the datasets were read before the names were checked")

    monkeypatch.setattr(Classification, "datasets", too_late)
    base = ["train", "--config", str(config), "--data", str(small_data), "--out", str(tmp_path / "run")]
    for sets, expected in (
        (["model.name=timm:notamodel", "model.width_mult=0.5"], "unknown timm model 'notamodel'"),
        (["model.name=resnet81"], "unknown model 'resnet81'"),
        (["method.name=rsnett"], "unknown method 'rsnett'"),
    ):
        assert main(base + [a for s in sets for a in ("--set", s)]) == 2
        assert expected in _one_line_error(capsys)


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(tmp_path, small_data, capsys, monkeypatch):
    assert main(["eval", str(tmp_path / "nothing"), "--data", str(small_data)]) == 2  # a missing run
    assert f"no checkpoint at {tmp_path / 'nothing'}" in _one_line_error(capsys)
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.safetensors").write_bytes(b"")
    (run / "table.json").write_text(
        json.dumps(
            {
                "rows": [
                    {
                        "width": 1.0,
                        "resolution": 32,
                        "scales": None,
                        "top1": 50.0,
                        "top5": 90.0,
                        "macs": 1e6,
                        "params": 1e5,
                        "latency_ms": None,
                    }
                ]
            }
        )
    )
    # a plain ValueError raised on purpose by a flexres module (flexres.analysis.table) is the user's to fix
    assert main(["select", str(run), "--max-latency-ms", "5"]) == 2
    assert "the table has no latency column" in _one_line_error(capsys)
    # a KeyError from a dictionary look-up inside flexres is a bug: main does not swallow it
    monkeypatch.setattr("flexres.api.select", lambda *args: {})
    with pytest.raises(KeyError):
        main(["select", str(run), "--max-macs", "2M"])
