import json
import os

import pytest
import torch

import flexres
from flexres.engine.checkpoint import CheckpointMismatchError, load_checkpoint, load_into, save_checkpoint
from tests.conftest import distinct_bn_statistics, tiny_model


def test_round_trip_gives_identical_outputs_at_every_resolution(tmp_path):
    model = distinct_bn_statistics(tiny_model(resolutions=(64, 48, 32)))
    save_checkpoint(tmp_path, model, {"epoch": 3, "classes": list("abcde")})
    loaded, meta = load_checkpoint(tmp_path)
    assert meta["epoch"] == 3 and meta["train_resolutions"] == [64, 48, 32]
    x = torch.randn(2, 3, 80, 80)
    for r in (80, 64, 56, 48, 40, 32, 24):
        xr = torch.nn.functional.interpolate(x, size=r)
        with model.at(r), loaded.at(r):
            torch.testing.assert_close(loaded(xr), model(xr), rtol=0, atol=0)
    sidecar = json.loads((tmp_path / "checkpoint.json").read_text())
    assert sidecar["arch"] == {
        "name": "resnet18",
        "kwargs": {"num_classes": 5, "train_resolutions": [64, 48, 32], "width_mult": 0.25},
    }


def test_other_resolutions_fail_naming_the_mismatch(tmp_path):
    save_checkpoint(tmp_path, tiny_model(resolutions=(64, 48, 32)), {"epoch": 1})
    with pytest.raises(
        CheckpointMismatchError, match=r"trained resolutions: checkpoint has \[64, 48, 32\], model has \[64, 32\]"
    ):
        load_into(tiny_model(resolutions=(64, 32)), tmp_path)


def test_other_architecture_fails_naming_the_mismatch(tmp_path):
    save_checkpoint(tmp_path, tiny_model("resnet18"), {"epoch": 1})
    with pytest.raises(
        CheckpointMismatchError, match=r"architecture: checkpoint is 'resnet18', model is 'mobilenet_v2'"
    ) as e:
        load_into(tiny_model("mobilenet_v2"), tmp_path)
    assert "keys missing from the checkpoint: classifier.1.bias" in str(e.value)


def test_other_width_fails_with_a_shape_mismatch(tmp_path):
    save_checkpoint(tmp_path, tiny_model(), {"epoch": 1})
    wide = flexres.create_model("resnet18", num_classes=5, train_resolutions=[64, 48, 32], width_mult=0.5)
    with pytest.raises(CheckpointMismatchError, match=r"shape mismatch in \d+ tensors, e.g. "):
        load_into(wide, tmp_path)


def test_not_a_checkpoint_is_reported(tmp_path):
    (tmp_path / "checkpoint.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointMismatchError, match="not a readable safetensors checkpoint"):
        load_checkpoint(tmp_path)


def test_a_crash_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = tiny_model()
    save_checkpoint(tmp_path, model, {"epoch": 1})
    before = (tmp_path / "checkpoint.safetensors").read_bytes()

    import flexres.engine.checkpoint as ck

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(ck, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, model, {"epoch": 2})
    assert (tmp_path / "checkpoint.safetensors").read_bytes() == before
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []
    assert load_checkpoint(tmp_path)[1]["epoch"] == 1


def test_resumed_optimizer_buffers_take_the_parameters_channels_last_layout(tmp_path):
    from flexres.engine.checkpoint import load_training_state

    def model_and_optimizer():
        torch.manual_seed(0)
        model = tiny_model().to(memory_format=torch.channels_last)
        return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)

    model, opt = model_and_optimizer()
    model.set_operating_point(64)
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    opt.step()
    save_checkpoint(tmp_path, model, {"epoch": 1}, optimizer=opt)
    model2, opt2 = model_and_optimizer()
    load_training_state(tmp_path, model2, torch.nn.Module(), opt2)
    convs = [(p, p2) for p, p2 in zip(model.parameters(), model2.parameters()) if p.dim() == 4]
    assert convs
    for p, p2 in convs:
        saved, loaded = opt.state[p]["momentum_buffer"], opt2.state[p2]["momentum_buffer"]
        assert loaded.stride() == p2.stride()  # channels_last, as in the run that never stopped
        assert torch.equal(loaded, saved)


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_checkpoint_files_get_the_mode_the_umask_gives_every_other_file(tmp_path, umask):
    previous = os.umask(umask)
    try:
        save_checkpoint(tmp_path, tiny_model(), {"epoch": 1})
        save_checkpoint(tmp_path, tiny_model(), {"epoch": 2})  # replacing one keeps the mode too
        (tmp_path / "plain.txt").write_text("written with open()")
    finally:
        os.umask(previous)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == dict.fromkeys(["checkpoint.safetensors", "checkpoint.json", "plain.txt"], 0o666 & ~umask)
