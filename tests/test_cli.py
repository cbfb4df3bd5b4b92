import json
import subprocess
import sys

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
    assert main(["train", "--config", str(config), "--data", str(small_data), "--out", str(out), "--set", "epochs=2"]) == 0
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


def test_resume_ends_with_the_same_weights_as_an_uninterrupted_run(tmp_path, small_data, config):
    full, split = tmp_path / "full", tmp_path / "split"
    args = ["train", "--config", str(config), "--data", str(small_data), "--set", "epochs=3"]
    assert main(args + ["--out", str(full)]) == 0
    assert main(args + ["--out", str(split), "--stop-after-epochs", "1"]) == 0
    assert json.loads((split / "checkpoint.json").read_text())["epoch"] == 1
    assert main(args + ["--out", str(split), "--resume"]) == 0
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


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "flexres.cli", "--help"], capture_output=True, text=True, check=True).stdout
    assert "train" in out and "eval" in out and "demo" in out


def test_demo_runs_on_the_bundled_sample(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--epochs", "1"]) == 0
    text = capsys.readouterr().out
    assert "top-1 %" in text and "RS-Nets Table 1" in text and "mean over S" in text
