"""Batch sizes that fit in memory at any resolution, for evaluation and BN calibration."""

import pytest
import torch

import flexres
import flexres.engine.memory as memory
from flexres import OperatingPoint
from flexres.data import ImageFolderDataset
from flexres.engine.evaluate import calibrate, evaluate
from flexres.engine.memory import ResolutionTooLargeError, activation_bytes_per_image, fit_batch_size

CPU = torch.device("cpu")


def tiny(resolutions=(64,)):
    return flexres.create_model("resnet18", num_classes=10, train_resolutions=list(resolutions), width_mult=0.25).eval()


def with_memory(monkeypatch, nbytes):
    monkeypatch.setattr(memory, "available_memory_bytes", lambda device: int(nbytes))


@pytest.mark.parametrize("r", [96, 128, 224])
def test_the_estimate_grows_with_the_square_of_the_resolution(r):
    model = tiny()
    ratio = activation_bytes_per_image(model, r * 2) / activation_bytes_per_image(model, r)
    assert 3.5 <= ratio <= 4.5


def test_the_estimate_bounds_the_largest_tensor_and_leaves_the_model_as_it_was():
    model = tiny((64, 32)).train()
    model.set_operating_point(32)
    # resnet18's stem: 16 channels (64 x 0.25) at half the resolution, float32
    assert activation_bytes_per_image(model, 224) >= 16 * 112 * 112 * 4
    assert model.training and model.operating_point == OperatingPoint(32)


def test_the_requested_batch_when_memory_is_plentiful(monkeypatch):
    with_memory(monkeypatch, 1 << 40)
    assert fit_batch_size(tiny(), 224, 256, CPU) == 256


def test_a_smaller_batch_when_memory_is_short(monkeypatch):
    model, r = tiny(), 224
    per_image = activation_bytes_per_image(model, r) + memory.input_bytes_per_image(r) + 1000
    available = 2 * 37.5 * per_image  # half of it is the budget: 37.5 images
    with_memory(monkeypatch, available)
    expected = int(available * 0.5) // per_image
    assert 1 < expected < 256
    assert fit_batch_size(model, r, 256, CPU, images_bytes_per_image=1000) == expected
    assert fit_batch_size(model, r, 8, CPU, images_bytes_per_image=1000) == 8  # never more than asked


def test_a_resolution_where_one_image_does_not_fit_is_named(monkeypatch):
    with_memory(monkeypatch, 10_000_000)
    with pytest.raises(
        ResolutionTooLargeError, match=r"5000 px .*one image needs about \d+\.\d GB, but only 0\.0 GB"
    ) as e:
        fit_batch_size(tiny(), 5000, 256, CPU)
    assert isinstance(e.value, ValueError)


def test_available_memory_is_positive_and_has_a_fallback_without_proc(monkeypatch):
    assert memory.available_memory_bytes("cpu") > 0

    def no_proc(*args, **kwargs):
        raise OSError("no /proc here")

    monkeypatch.setattr(memory, "open", no_proc, raising=False)
    monkeypatch.setattr(memory, "_cgroup_available", lambda: None)
    assert memory.available_memory_bytes(CPU) > 0


def test_evaluation_with_a_reduced_batch_gives_the_same_result(monkeypatch, sample_data):
    model, r = tiny(), 96
    val = ImageFolderDataset(sample_data / "val", cache=True, progress=False)
    with_memory(monkeypatch, 1 << 40)
    plenty = evaluate(model, val, [r], batch_size=256)[r]

    seen = []
    # batches at r only: the estimate's probe image runs at a smaller resolution
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]) if args[0].shape[-1] == r else None)
    notes = []
    with_memory(monkeypatch, 2 * 9 * activation_bytes_per_image(model, r))  # room for fewer than 9 images
    short = evaluate(model, val, [r], batch_size=256, note=notes.append)[r]
    (message,) = notes
    assert message.startswith(f"{r} px: batch reduced from 256 to ")
    batch = int(message.split(" to ")[1])
    assert 1 <= batch < 9 and max(seen) == batch and sum(seen) == len(val)
    assert short["n"] == plenty["n"] == 100
    assert short["top1"] == plenty["top1"] and short["top5"] == plenty["top5"]
    assert torch.equal(short["correct"], plenty["correct"])


def test_calibration_shrinks_its_batch_too(monkeypatch, sample_data):
    model, r = tiny((64, 32)), 48
    train = ImageFolderDataset(sample_data / "train", progress=False)
    with_memory(monkeypatch, 2 * 3 * activation_bytes_per_image(model, r))
    notes = []
    assert calibrate(model, train, [r], num_images=8, batch_size=64, note=notes.append) == [OperatingPoint(r)]
    assert len(notes) == 1 and notes[0].startswith(f"{r} px: batch reduced from 64 to ")
    assert model.is_calibrated(r)
    with_memory(monkeypatch, 1000)
    with pytest.raises(ResolutionTooLargeError, match="40 px"):
        calibrate(model, train, [40], num_images=8)


def test_auto_device_names_the_current_cuda_index(monkeypatch):
    """torch.cuda.mem_get_info and set_device reject a bare "cuda" device on some releases (seen with torch 2.11 on an
    H200): "auto" must resolve to an indexed device, the one CUDA is set to."""
    from flexres.engine.trainer import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert resolve_device("auto") == torch.device("cuda", 3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
