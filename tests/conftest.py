import shutil
from pathlib import Path

import pytest
import torch

import flexres
from flexres.data import sample_data_dir


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests run where CUDA is; elsewhere they are reported as skipped, with the reason."""
    if torch.cuda.is_available():
        return
    no_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(no_gpu)


@pytest.fixture(autouse=True)
def _threads():
    torch.manual_seed(0)
    yield


@pytest.fixture
def sample_data() -> Path:
    """The tiny Imagenette sample bundled inside the package (works in a fresh clone)."""
    d = sample_data_dir()
    assert (d / "train").is_dir() and (d / "val").is_dir()
    return d


@pytest.fixture
def small_data(tmp_path, sample_data) -> Path:
    """3 classes x (4 train, 2 val) copied from the sample: fast end-to-end runs."""
    root = tmp_path / "data"
    for split, n in (("train", 4), ("val", 2)):
        for cls in sorted(p.name for p in (sample_data / split).iterdir())[:3]:
            dst = root / split / cls
            dst.mkdir(parents=True)
            for f in sorted((sample_data / split / cls).iterdir())[:n]:
                shutil.copy(f, dst / f.name)
    return root


@torch.no_grad()
def distinct_bn_statistics(model):
    """Give every BN set its own statistics and affine parameters, as training would leave them; eval mode."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.normal_(1, 0.2)
            m.bias.normal_(0, 0.2)
    return model.eval()


def tiny_model(name="resnet18", resolutions=(64, 48, 32), num_classes=5, **kw):
    return flexres.create_model(
        name, num_classes=num_classes, train_resolutions=list(resolutions), width_mult=0.25, **kw
    )
