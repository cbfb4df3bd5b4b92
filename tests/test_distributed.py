"""torchrun on CPU (gloo): DDP equals gradient accumulation over the same micro-batches; resume under torchrun."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from flexres.cli import main
from flexres.engine.config import make_config
from flexres.engine.trainer import train
from flexres.methods import Method, StepOutput, register_method

pytestmark = pytest.mark.slow  # each test starts torchrun processes

CONFIG = """
model: {name: resnet18, width_mult: 0.25}
method: {name: rsnet, resolutions: [48, 32]}
data: {cache: true, num_workers: 0, hflip: false, scale: [1.0, 1.0], ratio: [1.0, 1.0]}
train: {epochs: 2, batch_size: 4, lr: 0.05, nesterov: true, warmup_epochs: 0, progress: false, eval_every: 0}
"""


def torchrun(args, nproc=2):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        "-m",
        "flexres.cli",
        *args,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def parameters(run_dir):
    """Trained parameters (not BN running statistics: under DDP only rank 0's batches update the saved ones)."""
    t = load_file(str(run_dir / "checkpoint.safetensors"))
    return {
        k: v
        for k, v in t.items()
        if (k.startswith("model.") or k.startswith("method."))
        and not any(b in k for b in ("running_mean", "running_var", "num_batches_tracked"))
    }


MUTUALNET = (
    CONFIG.replace(
        "{name: resnet18, width_mult: 0.25}",
        "{name: us_mobilenet_v2, width_mult: 0.35, kwargs: {slim_divisor: 4, dropout: 0.0}}",
    )
    .replace(
        "{name: rsnet, resolutions: [48, 32]}",
        "{name: mutualnet, resolutions: [48, 32], kwargs: {width_range: [0.5, 1.0]}}",
    )
    .replace("lr: 0.05", "lr: 0.01")
)  # four summed terms through the full-size 1280-channel head on batches of 4: 0.05 diverges


@pytest.fixture
def config(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(CONFIG)
    return p


@pytest.fixture(params=["rsnet", "mutualnet"])
def any_config(tmp_path, request):
    p = tmp_path / "c.yaml"
    p.write_text(CONFIG if request.param == "rsnet" else MUTUALNET)
    return p


@pytest.fixture
def one_thread():
    """The torchrun ranks run one thread each; the reference run must use the same kernels, or float
    differences between 1- and 2-thread reductions grow over the steps."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_ddp_matches_one_process_accumulating_the_same_micro_batches(tmp_path, small_data, any_config, one_thread):
    """For MutualNet this also shows rank-consistent sampling: both ranks train the same random sub-networks."""
    config = any_config
    base = ["train", "--config", str(config), "--data", str(small_data)]
    torchrun(base + ["--out", str(tmp_path / "ddp")])
    assert main(base + ["--out", str(tmp_path / "acc"), "--set", "accumulate_steps=2"]) == 0
    ddp, acc = parameters(tmp_path / "ddp"), parameters(tmp_path / "acc")
    assert ddp.keys() == acc.keys() and len(ddp) > 40
    for k in ddp:
        torch.testing.assert_close(ddp[k], acc[k], rtol=1e-4, atol=1e-5, msg=k)
    # and it is not trivially equal: one process without accumulation (one batch of 4) trains differently
    assert main(base + ["--out", str(tmp_path / "single")]) == 0
    single = parameters(tmp_path / "single")
    assert any(not torch.allclose(single[k], acc[k], atol=1e-5) for k in acc)
    metrics = [json.loads(ln) for ln in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["images"] == 12  # reduced over both ranks: 3 steps x 4 images


def test_resume_under_torchrun_matches_an_uninterrupted_torchrun(tmp_path, small_data, config):
    base = ["train", "--config", str(config), "--data", str(small_data)]
    torchrun(base + ["--out", str(tmp_path / "full")])
    torchrun(base + ["--out", str(tmp_path / "split"), "--stop-after-epochs", "1"])
    out = torchrun(base + ["--out", str(tmp_path / "split"), "--resume"])
    assert "after epoch 1" in out
    full, split = parameters(tmp_path / "full"), parameters(tmp_path / "split")
    for k in full:
        torch.testing.assert_close(full[k], split[k], rtol=0, atol=0, msg=k)


@register_method
class _RecordSamples(Method):
    """Test recipe: samples a 'width' per micro-batch from the step generator and records it."""

    name = "_test_record_samples"
    seen: list[tuple[int, int]] = []

    def forward(self, model, inputs, labels):
        pick = int(torch.randint(0, 10**6, (1,), generator=self.rng))
        _RecordSamples.seen.append(pick)
        model.set_operating_point(self.resolutions[0])
        loss = self.cross_entropy(model(inputs[0]), labels)
        return StepOutput(loss, {"cls": loss.detach()})


def test_every_micro_batch_of_a_step_samples_the_same_operating_point(tmp_path, small_data):
    cfg = make_config(
        {
            "model": {"name": "resnet18", "width_mult": 0.25},
            "method": {"name": "_test_record_samples", "resolutions": [32]},
            "data": {"root": str(small_data), "cache": True, "num_workers": 0},
            "train": {"epochs": 1, "batch_size": 4, "accumulate_steps": 2, "progress": False, "eval_every": 0},
        }
    )
    _RecordSamples.seen.clear()
    train(cfg, tmp_path / "run", log=lambda s: None)
    picks = _RecordSamples.seen
    assert len(picks) == 6  # 3 steps x 2 micro-batches
    assert all(picks[2 * i] == picks[2 * i + 1] for i in range(3))  # same within a step, as across ranks
    assert len({picks[0], picks[2], picks[4]}) == 3  # and a new draw each step


def test_sync_batchnorm_reaches_the_bns_inside_switchable_bn():
    import flexres

    model = flexres.create_model("resnet18", num_classes=3, train_resolutions=[48, 32], width_mult=0.25)
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    kinds = {type(b) for m in synced.switchable_bns() for b in m.bns}
    assert kinds == {torch.nn.SyncBatchNorm}


CALIBRATE_SCRIPT = """
import sys, torch, torch.distributed as dist
import flexres
from flexres.nn import calibrate_bn
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = flexres.create_model("resnet18", num_classes=3, train_resolutions=[48, 32], width_mult=0.25).eval()
images = torch.randn(8, 3, 40, 40, generator=torch.Generator().manual_seed(1))
mine = images[rank * 4:(rank + 1) * 4]  # each rank calibrates on its own shard, in one batch
calibrate_bn(model, iter([mine]), 40, 4, across_ranks=True)
if rank == 0:
    torch.save(model.bn1.calibrated[40], sys.argv[1])
dist.destroy_process_group()
"""


def test_bn_calibration_across_ranks_covers_every_ranks_images(tmp_path):
    import flexres
    from flexres.nn import calibrate_bn

    script = tmp_path / "cal.py"
    script.write_text(CALIBRATE_SCRIPT)
    out = tmp_path / "stats.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    ddp_mean, ddp_var = torch.load(out)
    torch.manual_seed(0)
    model = flexres.create_model("resnet18", num_classes=3, train_resolutions=[48, 32], width_mult=0.25).eval()
    images = torch.randn(8, 3, 40, 40, generator=torch.Generator().manual_seed(1))
    # the stem BN sees the stem conv output, which does not depend on how the shards were normalised
    calibrate_bn(model, iter([images]), 40, 8)
    mean, var = model.bn1.calibrated[40]
    torch.testing.assert_close(ddp_mean, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ddp_var, var, rtol=1e-5, atol=1e-6)


def test_torch_compile_falls_back_to_eager_when_the_first_call_fails(tmp_path, small_data, monkeypatch):
    import flexres.engine.trainer as trainer_mod

    def broken_compile(module):
        def call(*args):
            raise RuntimeError("no C++ compiler here")

        return call

    monkeypatch.setattr(trainer_mod.torch, "compile", broken_compile)
    notes = []
    cfg = make_config(
        {
            "model": {"name": "resnet18", "width_mult": 0.25},
            "method": {"name": "rsnet", "resolutions": [32, 24]},
            "data": {"root": str(small_data), "cache": True, "num_workers": 0},
            "train": {"epochs": 1, "batch_size": 4, "compile": True, "progress": False, "eval_every": 0},
        }
    )
    last = train(cfg, tmp_path / "run", log=notes.append)
    assert last["images"] == 12 and any("torch.compile unavailable" in n and "no C++ compiler" in n for n in notes)
