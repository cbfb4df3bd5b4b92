"""checkpoint.json (the sidecar people read) must agree with the metadata embedded in checkpoint.safetensors."""

import json
import math

import pytest
import torch

import flexres
import flexres.engine.checkpoint as ck
from flexres.engine.checkpoint import (
    CheckpointMismatchError,
    load_checkpoint,
    load_into,
    load_training_state,
    save_checkpoint,
)


def tiny():
    return flexres.create_model("resnet18", num_classes=3, train_resolutions=[32], width_mult=0.25)


def saved_run(tmp_path, **sidecar):
    save_checkpoint(tmp_path, tiny(), {"epoch": 1, **sidecar})
    return tmp_path


def edit_sidecar(run, change):
    path = run / ck.SIDECAR
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2))


def set_width(data, width=0.5):
    data["arch"]["kwargs"]["width_mult"] = width


LOADERS = {
    "load_checkpoint": lambda run: load_checkpoint(run),
    "load_into": lambda run: load_into(tiny(), run),
    "load_training_state": lambda run: load_training_state(
        run, tiny(), torch.nn.Module(), torch.optim.SGD(tiny().parameters(), lr=0.1)
    ),
}


@pytest.mark.parametrize("loader", LOADERS)
def test_an_edited_width_fails_in_every_loader_naming_both_files_and_the_key(tmp_path, loader):
    run = tmp_path
    model = tiny()
    save_checkpoint(run, model, {"epoch": 1}, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    edit_sidecar(run, set_width)
    with pytest.raises(CheckpointMismatchError) as e:
        LOADERS[loader](run)
    msg = str(e.value)
    assert str(run / "checkpoint.json") in msg and str(run / "checkpoint.safetensors") in msg
    assert "arch.kwargs.width_mult: checkpoint.safetensors has 0.25, checkpoint.json has 0.5" in msg


def test_an_edited_architecture_name_is_named(tmp_path):
    run = saved_run(tmp_path)
    edit_sidecar(run, lambda d: d["arch"].update(name="mobilenet_v2"))
    with pytest.raises(
        CheckpointMismatchError,
        match=r'arch\.name: checkpoint\.safetensors has "resnet18", checkpoint\.json has "mobilenet_v2"',
    ):
        load_checkpoint(run)


def test_an_unedited_checkpoint_loads(tmp_path):
    run = saved_run(tmp_path, metrics={"loss": math.nan, "top1": 33.3})  # NaN must not count as a difference
    model, meta = load_checkpoint(run)
    assert meta["epoch"] == 1 and meta["arch"]["kwargs"]["width_mult"] == 0.25
    assert load_into(tiny(), run)["epoch"] == 1


def test_a_checkpoint_without_its_sidecar_loads(tmp_path):
    run = saved_run(tmp_path)
    (run / ck.SIDECAR).unlink()
    assert load_checkpoint(run)[1]["epoch"] == 1
    assert load_into(tiny(), run / ck.CHECKPOINT)["epoch"] == 1


def test_keys_only_one_side_has_are_ignored_at_the_top_level_but_not_inside_a_value(tmp_path):
    run = saved_run(tmp_path)
    edit_sidecar(run, lambda d: (d.update(note="best run so far"), d.pop("train_resolutions")))
    assert load_checkpoint(run)[1]["epoch"] == 1
    edit_sidecar(run, lambda d: d["arch"]["kwargs"].pop("width_mult"))
    with pytest.raises(
        CheckpointMismatchError,
        match=r"arch\.kwargs\.width_mult: checkpoint\.safetensors has 0\.25, "
        r"checkpoint\.json has \(absent\)",
    ):
        load_checkpoint(run)


def test_long_values_are_truncated_and_every_differing_key_is_listed(tmp_path):
    run = saved_run(tmp_path, classes=[f"class_{i}" for i in range(3)])
    edit_sidecar(
        run, lambda d: (d.update(classes=[f"a_much_longer_class_name_{i}" for i in range(50)], epoch=7), set_width(d))
    )
    with pytest.raises(CheckpointMismatchError) as e:
        load_checkpoint(run)
    msg = str(e.value)
    assert "on arch.kwargs.width_mult, classes, epoch:" in msg
    line = next(ln for ln in msg.splitlines() if ln.startswith("  - classes:"))
    assert line.endswith("...") and len(line) < 200
    assert "epoch: checkpoint.safetensors has 1, checkpoint.json has 7" in msg


def test_a_sidecar_that_is_not_json_is_reported(tmp_path):
    run = saved_run(tmp_path)
    (run / ck.SIDECAR).write_text("{ not json")
    with pytest.raises(CheckpointMismatchError, match="checkpoint.json .*is not readable JSON"):
        load_checkpoint(run)


def test_a_crash_before_the_new_sidecar_is_written_leaves_no_stale_sidecar(tmp_path, monkeypatch):
    run = saved_run(tmp_path)
    real = ck._atomic_write

    def crash_on_sidecar(path, write):
        if path.name == ck.SIDECAR:
            raise KeyboardInterrupt
        real(path, write)

    monkeypatch.setattr(ck, "_atomic_write", crash_on_sidecar)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(run, tiny(), {"epoch": 2})
    monkeypatch.undo()
    assert not (run / ck.SIDECAR).exists()  # the epoch-1 sidecar would contradict the epoch-2 checkpoint
    assert load_checkpoint(run)[1]["epoch"] == 2


def test_a_crash_while_writing_the_checkpoint_keeps_the_old_sidecar(tmp_path, monkeypatch):
    run = saved_run(tmp_path)
    before = (run / ck.SIDECAR).read_text()

    def crash(tensors, filename, metadata=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(ck, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(run, tiny(), {"epoch": 2})
    monkeypatch.undo()
    assert (run / ck.SIDECAR).read_text() == before
    assert load_checkpoint(run)[1]["epoch"] == 1


def test_a_checkpoint_saved_again_while_it_is_read_loads_what_was_read(tmp_path, monkeypatch):
    run = saved_run(tmp_path)
    real = ck.load_tensors

    def read_then_training_saves(path):
        out = real(path)
        save_checkpoint(run, tiny(), {"epoch": 2})
        return out

    monkeypatch.setattr(ck, "load_tensors", read_then_training_saves)
    assert load_into(tiny(), run)["epoch"] == 1
