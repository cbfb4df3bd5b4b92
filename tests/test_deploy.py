import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import flexres
from flexres.cli import main
from flexres.data import normalize_batch, sample_data_dir
from flexres.deploy import export, to_static
from flexres.deploy.export import reference_images
from tests.conftest import distinct_bn_statistics


def trained_like(name):
    return distinct_bn_statistics(
        flexres.create_model(name, num_classes=10, train_resolutions=[96, 64], width_mult=0.25)
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "san_resnet18", "san_mobilenet_v2"])
def test_onnx_and_torchscript_exports_match_the_adaptive_model_on_real_images(tmp_path, name):
    model = trained_like(name)
    meta = {"classes": [f"c{i}" for i in range(10)], "crop_fraction": 0.875}
    # 80 px was never trained: the exported BN is the interpolated one
    info = export(model, meta, 80, "onnx", tmp_path / "m.onnx", bn_policy="interpolate")
    export(model, meta, 80, "torchscript", tmp_path / "m.pt", bn_policy="interpolate")
    assert info["parity_max_abs_diff"] < 1e-4 and info["preprocessing"]["resize_short_side"] == 91
    side = json.loads((tmp_path / "m.onnx.json").read_text())
    assert side["classes"] == meta["classes"] and side["operating_point"]["resolution"] == 80

    # independent check on other real images than the export's own
    x = normalize_batch(reference_images(80, sample_data_dir() / "train", count=6))
    with torch.no_grad(), model.at(80, bn_policy="interpolate"):
        want = model(x).numpy()
    got = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"image": x.numpy()})[0]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    with torch.no_grad():
        np.testing.assert_allclose(torch.jit.load(str(tmp_path / "m.pt"))(x).numpy(), want, atol=1e-4, rtol=0)
    ops = {n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node}
    assert "BatchNormalization" not in ops and "Conv" in ops  # folded by default


def test_torchscript_export_and_load_keep_torch_jit_deprecations_to_themselves(tmp_path, capsys):
    """torch.jit's four FutureWarnings (trace, trace_method, save, load) are silenced around flexres's own calls only:
    torch.jit used directly afterwards still warns, so no filter leaked out."""
    import warnings

    model = trained_like("resnet18")
    meta = {"classes": [f"c{i}" for i in range(10)], "crop_fraction": 0.875}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export(model, meta, 64, "torchscript", tmp_path / "m.pt")
        image = str(sorted((sample_data_dir() / "val").rglob("*.JPEG"))[0])
        assert flexres.predict(tmp_path / "m.pt", [image])["predictions"][0]["top"]
        assert not [str(w.message) for w in caught if "torch.jit" in str(w.message)]
        torch.jit.load(str(tmp_path / "m.pt"))
    assert [w.category for w in caught if "torch.jit.load" in str(w.message)] == [FutureWarning]


def test_parity_is_judged_against_the_logit_scale():
    from flexres.errors import ParityError
    from flexres.parity import check_parity

    torch.manual_seed(0)
    expected = torch.randn(8, 10) * 10  # logits of scale ~10 (max ~25)
    roundoff = expected + 1.8e-4 * torch.randn(8, 10).sign()  # what a fresh 2/2 export showed, over an absolute 1e-4
    p = check_parity(roundoff, expected, "round-off")
    assert p.max_abs_diff > 1e-4 and p.relative_diff < 1e-4 and p.top1_disagreements == 0
    for quantized in (False, True):
        with pytest.raises(ParityError):  # a real mismatch: another model's logits
            check_parity(expected + 3 * torch.randn(8, 10), expected, "mismatch", quantized)
    # quantized: activations that cross a level threshold move the logits more than round-off; fine while every
    # top-1 class holds, not when one changes, and never for a full-precision model
    top = expected.argmax(1)
    crossed = expected.clone()
    crossed[0, (top[0] + 1) % 10] += 0.05
    check_parity(crossed, expected, "threshold", quantized=True)
    with pytest.raises(ParityError):
        check_parity(crossed, expected, "threshold")
    close_call = expected.clone()  # image 0's two best classes 0.01 apart: the same small move now changes its class
    close_call[0, (top[0] + 1) % 10] = expected[0, top[0]] - 0.005
    flipped = close_call.clone()
    flipped[0, (top[0] + 1) % 10] += 0.01
    with pytest.raises(ParityError, match="top-1 differs on 1 of 8"):
        check_parity(flipped, close_call, "flip", quantized=True)


def test_a_failed_export_parity_is_one_line_of_error_and_writes_nothing(tmp_path, monkeypatch, capsys):
    import importlib

    from flexres.engine.checkpoint import save_checkpoint
    from flexres.errors import ParityError
    from flexres.parity import check_parity

    exporting = importlib.import_module("flexres.deploy.export")  # the module (flexres.deploy.export is the function)
    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint(run, trained_like("resnet18"), {"classes": [f"c{i}" for i in range(10)]})
    # a broken runtime: each image gets another image's logits
    monkeypatch.setattr(
        exporting, "check_parity", lambda got, expected, *a, **k: check_parity(got.flip(0), expected, *a, **k)
    )
    out = tmp_path / "m.pt"
    with pytest.raises(ParityError, match="does not match the adaptive model at 64px.*nothing was written"):
        flexres.export(run, 64, format="torchscript", out=out)
    assert not out.exists()
    capsys.readouterr()
    assert main(["export", str(run), "--resolution", "64", "--format", "torchscript", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flexres export: error: the exported torchscript model does not match") and "\n" not in err
    assert "Traceback" not in err and not out.exists()


def test_unfolded_static_model_keeps_plain_batchnorm():
    model = trained_like("resnet18")
    static = to_static(model, 64, fold_bn=False)
    kinds = {type(m) for m in static.modules()}
    assert torch.nn.BatchNorm2d in kinds and not any("Switchable" in k.__name__ for k in kinds)
    folded = to_static(model, 64)
    assert torch.nn.BatchNorm2d not in {type(m) for m in folded.modules()}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    data = root / "data"
    shutil.copytree(sample_data_dir(), data)
    cfg = root / "c.yaml"
    cfg.write_text(
        "model: {name: resnet18, width_mult: 0.25}\nmethod: {name: rsnet, resolutions: [64, 48]}\n"
        "data: {cache: true, num_workers: 0}\n"
        "train: {epochs: 1, batch_size: 25, lr: 0.02, progress: false, eval_every: 0}\n"
        "eval: {resolutions: [72, 64, 56, 48, 40]}\n"
    )
    assert main(["train", "--config", str(cfg), "--data", str(data), "--out", str(root / "run")]) == 0
    return root / "run", data


def test_predict_classifies_real_images_and_reports_a_corrupt_one(run_dir, tmp_path, capsys):
    run, data = run_dir
    good = sorted((data / "val").rglob("*.JPEG"))[:3]
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really")
    files = [str(good[0]), str(bad), str(good[1]), str(tmp_path / "missing.png"), str(good[2])]
    capsys.readouterr()
    assert main(["predict", str(run), *files, "--resolution", "56", "--json", "--topk", "3"]) == 1
    out = json.loads(capsys.readouterr().out)
    preds = out["predictions"]
    assert [("error" in p) for p in preds] == [False, True, False, True, False]
    assert "broken.jpg" in preds[1]["error"] and "missing.png" in preds[3]["error"]
    classes = sorted(p.name for p in (data / "train").iterdir())
    # Names from the data root's classes.tsv, stored in the run's sidecar at training time.
    names = {row.split("\t")[1]: row.split("\t")[2] for row in (data / "classes.tsv").read_text().splitlines()[1:]}
    for p in (preds[0], preds[2], preds[4]):
        assert len(p["top"]) == 3 and all(t["class"] == classes[t["label"]] for t in p["top"])
        assert all(t["name"] == names[t["class"]] and t["name"] != t["class"] for t in p["top"])
        probs = [t["probability"] for t in p["top"]]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
    assert main(["predict", str(run), files[0], "--resolution", "56", "--topk", "2"]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith(files[0]) and preds[0]["top"][0]["name"] in line and "n0" not in line.split(":", 1)[1]


def test_predict_reports_an_unreadable_image_without_training_advice(run_dir, tmp_path, capsys):
    """load_rgb's advice for training sets (data.skip_unreadable) means nothing to predict, which goes on past a bad
    file anyway: the error names the file and the decoder's reason."""
    run, data = run_dir
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image at all")
    capsys.readouterr()
    assert main(["predict", str(run), str(bad), "--resolution", "56"]) == 1
    err = capsys.readouterr().err
    assert f"{bad}: error: cannot read image {bad}: cannot identify image file" in err
    assert "skip_unreadable" not in err


def test_predict_picks_an_operating_point_within_the_macs_budget(run_dir, capsys):
    from flexres.analysis import count_macs

    run, data = run_dir
    model, _ = flexres.load_checkpoint(run)
    budget = count_macs(model, 56) + 1
    img = str(sorted((data / "val").rglob("*.JPEG"))[0])
    capsys.readouterr()
    assert main(["predict", str(run), img, "--max-macs", str(budget), "--json"]) == 0
    chosen = json.loads(capsys.readouterr().out)["resolution"]
    assert chosen == 56 and count_macs(model, chosen) <= budget  # the largest point that fits
    assert main(["predict", str(run), img, "--max-macs", "1K"]) == 2
    assert "no operating point fits the budget" in capsys.readouterr().err


def test_export_cli_then_predict_with_the_exported_model(run_dir, tmp_path, capsys):
    run, data = run_dir
    out = tmp_path / "m.onnx"
    assert (
        main(["export", str(run), "--resolution", "56", "--format", "onnx", "--out", str(out), "--data", str(data)])
        == 0
    )
    img = str(sorted((data / "val").rglob("*.JPEG"))[0])
    capsys.readouterr()
    assert main(["predict", str(out), img, "--json"]) == 0
    from_onnx = json.loads(capsys.readouterr().out)["predictions"][0]["top"]
    assert main(["predict", str(run), img, "--resolution", "56", "--json"]) == 0
    from_run = json.loads(capsys.readouterr().out)["predictions"][0]["top"]
    assert [t["name"] for t in from_onnx] == [t["name"] for t in from_run]
    assert all(abs(a["probability"] - b["probability"]) < 1e-3 for a, b in zip(from_onnx, from_run))


def test_report_writes_its_figures_and_page(run_dir, tmp_path):
    run, data = run_dir
    out = tmp_path / "report"
    assert main(["report", str(run), "--data", str(data), "--out", str(out), "--latency"]) == 0
    for f in (
        "index.html",
        "accuracy_vs_macs.png",
        "accuracy_vs_latency_ms.png",
        "train_test_heatmap.png",
        "bn_statistics_run.png",
    ):
        assert (out / f).stat().st_size > 1000, f
    page = (out / "index.html").read_text()
    assert page.count("<img") == 4 and "bn_statistics_run.png" in page


@pytest.mark.slow
@pytest.mark.parametrize("name", ["us_mobilenet_v2", "mobilenet_v1", "resizable_resnet18"])
def test_export_parity_for_slimmable_and_resizable_families(tmp_path, name):
    from flexres import OperatingPoint
    from flexres.nn import calibrate_bn

    model = (
        trained_like(name)
        if "us_" not in name
        else flexres.create_model(name, num_classes=10, train_resolutions=[96], width_mult=0.5).eval()
    )
    op = OperatingPoint(80)
    if model.width_range:
        op = OperatingPoint(80, 0.5)
        calibrate_bn(model, iter([normalize_batch(reference_images(80, sample_data_dir() / "train", count=8))]), op, 8)
    if model.scale_factors:
        op = OperatingPoint(80, scales=(0.45, 1.0, 0.65, 0.85))
    info = export(model, {"classes": [str(i) for i in range(10)]}, op, "onnx", tmp_path / "m.onnx")
    assert info["parity_max_abs_diff"] < 1e-4


def test_predict_reads_the_query_table_of_a_slimmable_run(tmp_path, small_data, capsys):
    cfg = tmp_path / "m.yaml"
    cfg.write_text(
        "model: {name: us_mobilenet_v2, width_mult: 0.35, kwargs: {slim_divisor: 4}}\n"
        "method: {name: mutualnet, resolutions: [48, 32], kwargs: {width_range: [0.5, 1.0]}}\n"
        "data: {cache: true, num_workers: 0}\ntrain: {epochs: 1, batch_size: 4, progress: false, eval_every: 0}\n"
        "eval: {resolutions: [48, 32], calibration_images: 8}\n"
    )
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--data", str(small_data), "--out", str(run)]) == 0
    assert main(["table", str(run), "--data", str(small_data), "--widths", "0.5:1.0:0.5"]) == 0
    rows = json.loads((run / "table.json").read_text())["rows"]
    budget = sorted(r["macs"] for r in rows)[1]
    img = str(sorted((small_data / "val").rglob("*.JPEG"))[0])
    capsys.readouterr()
    assert main(["predict", str(run), img, "--max-macs", str(budget), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "flexres table" in out["model"]
    fits = [r for r in rows if r["macs"] <= budget]
    top = max(r["top1"] for r in fits)
    assert out["resolution"] in {r["resolution"] for r in fits if r["top1"] == top}  # the most accurate point that fits
