"""On a CUDA device the adaptive model computes what it computes on the CPU (marked ``gpu``: skipped without CUDA)."""

import pytest
import torch

from tests.conftest import distinct_bn_statistics, tiny_model

pytestmark = pytest.mark.gpu


@torch.no_grad()
def test_every_trained_resolution_gives_the_cpu_logits_on_the_gpu_in_channels_last():
    model = distinct_bn_statistics(tiny_model(resolutions=(64, 48, 32)))
    gpu = tiny_model(resolutions=(64, 48, 32))
    gpu.load_state_dict(model.state_dict())
    gpu = gpu.eval().cuda().to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 64, 64)
    for r in (64, 48, 40, 32):  # 40: between trained resolutions (interpolated BN)
        xr = torch.nn.functional.interpolate(x, size=(r, r), mode="bilinear", antialias=True, align_corners=False)
        model.set_operating_point(r, bn_policy="interpolate")
        gpu.set_operating_point(r, bn_policy="interpolate")
        want = model(xr)
        got = gpu(xr.cuda().contiguous(memory_format=torch.channels_last)).cpu()
        torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)  # TF32 convolutions allowed
