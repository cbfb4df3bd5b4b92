"""The typed run description: a run written by an earlier flexres still opens, with the defaults it predates, and
computes what that version computed."""

import json
from pathlib import Path

import pytest
import torch

import flexres
from flexres.data import load_rgb, sample_data_dir
from flexres.engine.run import CROP_FRACTION, Preprocessing, RunInfo

EARLIER = (
    Path(__file__).parent / "fixtures" / "run_2026_11_23"
)  # written by flexres at c8fcb5b (see expected_logits.json)


def test_a_run_written_by_an_earlier_version_opens_with_its_defaults_and_computes_the_same():
    run = flexres.Run.open(EARLIER)
    info = run.info
    assert run.directory == EARLIER and info.epoch == 1 and info.train_resolutions == (32, 24)
    assert (info.task, info.bn_policy, info.eval_resolutions) == ("classification", "interpolate", (32, 28, 24))
    assert info.preprocessing == Preprocessing()  # it recorded no interpolation: bilinear, ImageNet's mean/std, 0.875
    assert info.class_names == info.classes and len(info.classes) == 10  # no names recorded: the folder names
    expected = json.loads((EARLIER / "expected_logits.json").read_text())
    files = [sample_data_dir() / f for f in expected["files"]]
    run.model.eval()
    for r, logits in expected["logits"].items():
        x = torch.stack([info.preprocessing.transform(int(r))(load_rgb(str(f))) for f in files])
        run.model.set_operating_point(int(r), bn_policy="interpolate")
        with torch.no_grad():
            torch.testing.assert_close(
                run.model(info.preprocessing.normalize(x)), torch.tensor(logits), atol=1e-5, rtol=1e-5
            )


def test_the_description_reads_what_a_run_records():
    meta = {
        "arch": {"name": "timm:tf_efficientnet_lite0", "kwargs": {}},
        "classes": ["a", "b"],
        "class_names": ["A", "B"],
        "normalization": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
        "crop_fraction": 0.9,
        "interpolation": "bicubic",
        "task": "segmentation",
        "ignore_index": 11,
        "class_colors": [[1, 2, 3], [4, 5, 6]],
        "train_resolutions": [224, 96],
        "config": {
            "eval": {"bn_policy": "nearest", "resolutions": [224, 160, 96]},
            "data": {"root": "/d", "train_split": "tr"},
        },
    }
    info = RunInfo.from_meta(meta)
    assert info.preprocessing == Preprocessing((0.5,) * 3, (0.5,) * 3, 0.9, "bicubic")
    assert (info.task, info.ignore_index, info.class_colors, info.class_names) == (
        "segmentation",
        11,
        [(1, 2, 3), (4, 5, 6)],
        ["A", "B"],
    )
    assert (info.bn_policy, info.eval_resolutions, info.data_root, info.train_split) == (
        "nearest",
        (224, 160, 96),
        "/d",
        "tr",
    )
    described = info.preprocessing.describe(180)
    assert (
        described["resize_short_side"] == 200
        and described["interpolation"] == "bicubic"
        and described["mean"] == [0.5] * 3
    )
    assert Preprocessing.from_meta({}).crop_fraction == CROP_FRACTION


def test_normalize_standardises_on_the_0_1_scale():
    pre = Preprocessing((0.5, 0.25, 0.0), (0.5, 0.25, 1.0))
    x = torch.full((1, 3, 1, 1), 255, dtype=torch.uint8)
    assert pre.normalize(x).flatten().tolist() == pytest.approx([1.0, 3.0, 1.0])
