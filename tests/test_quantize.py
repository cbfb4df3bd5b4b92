"""LQ-Nets quantizers against their equations: levels are the 2^K combinations of the basis, values go to the nearest
level, one QEM update never increases the quantization error, gradients pass straight through inside the clip range
and are zero outside, and 32 bits is the identity."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from flexres.errors import ParityError, UninitializedQuantizerError
from flexres.nn.quantize import (
    LQQuantizer,
    QuantConv2d,
    compile_quantizers,
    encodings,
    least_squares_basis,
    level_counts_and_sums,
    nearest_codes,
    quantization_error,
    quantization_levels,
    quantize_with,
    quantizer_step,
)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits", [1, 2, 3])
def test_levels_are_every_combination_of_the_basis(bits, signed):
    basis = torch.tensor([[0.3, 0.7, 1.9][:bits]])
    values = {-1.0, 1.0} if signed else {0.0, 1.0}
    expected = sorted(
        sum(b * v for b, v in zip(combo, basis[0].tolist())) for combo in itertools.product(sorted(values), repeat=bits)
    )
    assert sorted(quantization_levels(basis, signed)[0].tolist()) == pytest.approx(expected)
    assert encodings(bits, signed).shape == (2**bits, bits)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 6])  # up to 4 bits the ranks come from comparisons, above from a binary search
def test_every_value_goes_to_its_nearest_level(signed, bits):
    torch.manual_seed(0)
    basis = torch.tensor([[0.4, 1.1], [0.2, 0.5], [1.0, 0.3]])  # three groups (not sorted, not powers of two)
    basis = torch.cat([basis, torch.rand(3, bits - 2) * 0.3 + 0.05], dim=1)  # K = bits
    x = torch.randn(3, 500) * 1.5
    q, codes = quantize_with(x, basis, signed)
    levels = quantization_levels(basis, signed)
    brute = (x[:, :, None] - levels[:, None, :]).abs().argmin(-1)  # nearest level by exhaustive search
    assert torch.equal(levels.gather(1, brute), q)
    assert torch.equal(codes, nearest_codes(x, basis, signed))
    assert all(v in set(levels[g].tolist()) for g in range(3) for v in q[g].tolist())


@pytest.mark.parametrize("signed", [True, False])
def test_least_squares_basis_is_the_normal_equations_solution(signed):
    torch.manual_seed(1)
    x = torch.randn(2, 400).abs() if not signed else torch.randn(2, 400)
    basis = torch.tensor([[0.5, 1.0], [0.3, 0.6]])
    codes = nearest_codes(x, basis, signed)
    best = least_squares_basis(x, codes, basis, signed, ridge=0.0)
    enc = encodings(2, signed)
    for g in range(2):
        b = enc[codes[g]]  # N x K encoding matrix
        expected = torch.linalg.lstsq(b, x[g].unsqueeze(1)).solution.squeeze(1)
        assert torch.allclose(best[g], expected, atol=1e-5)


def test_basis_update_accumulates_more_values_than_float32_can_count():
    # 2^24 + 2^22 copies of one value with one code: a float32 running sum stops counting at 2^24 and drifts long before
    # (it made the least-squares level 0.399 here). Expanded views: no memory for the 20M values themselves.
    n, value = (1 << 24) + (1 << 22), 0.3
    x = torch.full((1, 1), value).expand(1, n)
    codes = torch.ones(1, 1, dtype=torch.long).expand(1, n)
    counts, sums = level_counts_and_sums(x, codes, 2)
    assert counts.tolist() == [[0.0, float(n)]]
    assert sums[0, 1].item() == pytest.approx(n * x[0, 0].double().item(), rel=1e-12)
    best = least_squares_basis(x, codes, torch.tensor([[0.5]]), signed=True)
    assert best.dtype == torch.float32 and best.item() == pytest.approx(value, rel=1e-5)


def test_the_fused_step_counts_more_values_than_float32_can_and_sums_them_as_float64_does():
    # The same 20M values through the training step: per-chunk float32 bins added in float64 count exactly.
    n, value = (1 << 24) + (1 << 22), 0.3
    x = torch.full((1, 1), value).expand(1, n)
    basis = torch.tensor([[0.5]])
    q, top, best = quantizer_step(x, basis, encodings(1, True), fit=True)
    assert torch.equal(q, torch.full((1, n), 0.5)) and top.item() == 0.5
    assert best.dtype == torch.float32 and best.item() == pytest.approx(value, rel=1e-5)  # as the reference


@pytest.mark.parametrize("signed, bits", [(True, 2), (True, 3), (False, 2), (False, 4)])
def test_one_basis_update_never_increases_the_quantization_error(signed, bits):
    torch.manual_seed(2)
    for trial in range(5):
        q = LQQuantizer(bits, signed=signed, groups=4 if signed else 1).train()
        x = torch.randn(4, 64, 3, 3) if signed else torch.relu(torch.randn(8, 4, 6, 6)) * (1 + trial)
        before_basis = None
        errors = []
        for _ in range(4):  # the first call initialises, every call then folds one QEM solution in
            q(x)
            flat = q.grouped(x)
            if before_basis is not None:
                errors.append(
                    (quantization_error(flat, before_basis, signed), quantization_error(flat, q.basis[0], signed))
                )
            before_basis = q.basis[0].clone()
        assert all(after <= before * (1 + 1e-6) for before, after in errors), errors
        assert errors[-1][1] < errors[0][0]


def test_straight_through_gradient_inside_the_clip_range_and_zero_outside():
    q = LQQuantizer(2, signed=False).eval()
    q.basis[0] = torch.tensor([[0.5, 1.0]])  # levels 0, 0.5, 1, 1.5
    q.initialized[0] = True
    x = torch.tensor([-0.3, 0.2, 0.7, 1.4, 1.6, 3.0], requires_grad=True)
    y = q(x)
    assert y.tolist() == pytest.approx([0.0, 0.0, 0.5, 1.5, 1.5, 1.5])
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0, 0.0]  # clipped below 0 and above the top level 1.5
    w = LQQuantizer(2, signed=True, groups=1).eval()
    w.basis[0] = torch.tensor([[0.5, 1.0]])
    w.initialized[0] = True
    v = torch.tensor([-5.0, -0.1, 0.2, 4.0], requires_grad=True)
    out = w(v)
    assert out.tolist() == pytest.approx([-1.5, -0.5, 0.5, 1.5])
    out.sum().backward()
    assert v.grad.tolist() == [1.0, 1.0, 1.0, 1.0]  # weights: straight through everywhere


def test_32_bits_is_the_plain_layer():
    torch.manual_seed(3)
    plain = nn.Conv2d(4, 6, 3, padding=1, bias=False)
    quant = QuantConv2d(4, 6, 3, padding=1, w_bits=32, a_bits=32)
    quant.weight.data.copy_(plain.weight.data)
    x = torch.randn(2, 4, 8, 8)
    for mode in (True, False):
        quant.train(mode)
        assert torch.equal(quant(x), plain(x))


def test_quantized_conv_uses_few_weight_values_per_channel_and_private_activation_bases():
    torch.manual_seed(4)
    conv = QuantConv2d(8, 5, 3, padding=1, w_bits=2, a_bits=2, activation_bases=2).train()
    x0, x1 = torch.relu(torch.randn(4, 8, 6, 6)), 3 * torch.relu(torch.randn(4, 8, 6, 6))
    conv.input_quantizer.select(0)
    conv(x0)
    conv.input_quantizer.select(1)
    conv(x1)
    a = conv.input_quantizer.basis
    assert not torch.allclose(a[0], a[1])  # each resolution's activations fitted their own levels
    wq = conv.weight_quantizer(conv.weight)
    assert all(len(set(wq[c].flatten().tolist())) <= 4 for c in range(5))  # 2 bits: at most 4 values per output channel
    conv.eval()
    with pytest.raises(IndexError):
        conv.input_quantizer.select(2)
    with pytest.raises(ValueError, match="bits must be"):
        LQQuantizer(16, signed=True)


# --- quantized ResNets with the resolution recipes ---


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    import shutil

    import flexres

    root = tmp_path_factory.mktemp("lq") / "data"
    shutil.copytree(flexres.sample_data_dir(), root)
    return root


@pytest.mark.parametrize(
    "method, bases", [("individual", "shared"), ("parallel", "shared"), ("rsnet", "shared"), ("rsnet", "private")]
)
def test_quantized_resnet_trains_with_every_resolution_recipe(method, bases, sample, tmp_path):
    import flexres

    res = [48] if method == "individual" else [48, 32]
    cfg = {
        "model": {
            "name": "resnet18",
            "width_mult": 0.25,
            "kwargs": {"w_bits": 2, "a_bits": 2, "activation_bases": bases},
        },
        "method": {"name": method, "resolutions": res},
        "data": {"root": str(sample), "cache": True, "num_workers": 0},
        "train": {
            "epochs": 1,
            "batch_size": 50,
            "lr": 0.02,
            "progress": False,
            "eval_every": 0,
            "lr_milestones": [0.5],
        },
    }
    metrics = flexres.train(cfg, tmp_path / "run", log=lambda s: None)
    assert torch.isfinite(torch.tensor(metrics["loss"])) and metrics["lr"] == pytest.approx(
        0.002
    )  # after the milestone: /10
    model, _ = flexres.load_checkpoint(tmp_path / "run")
    convs = [m for m in model.modules() if isinstance(m, QuantConv2d)]
    assert isinstance(model.conv1, nn.Conv2d) and not isinstance(
        model.conv1, QuantConv2d
    )  # the stem stays full precision
    assert len(convs) == 19 and all(bool(c.weight_quantizer.initialized[0]) for c in convs)
    for c in convs:  # the saved weights, quantized, use at most 4 values per output channel
        w = c.weight_quantizer.eval()(c.weight)
        assert max(len(set(w[o].flatten().tolist())) for o in range(w.shape[0])) <= 4
    if bases == "private":
        model.set_operating_point(32)
        assert {q.index for q in model.activation_quantizers()} == {1}
        trained = [q for q in model.activation_quantizers() if bool(q.initialized.all())]
        assert trained and all(not torch.allclose(q.basis[0], q.basis[1]) for q in trained)
    x = torch.randn(2, 3, res[0], res[0])  # the checkpoint holds the bases: a reload computes the same outputs
    again, _ = flexres.load_checkpoint(tmp_path / "run")
    model.set_operating_point(res[0])
    with torch.no_grad():
        assert torch.equal(model(x), again(x))


@pytest.mark.slow
def test_a_run_with_compiled_quantizers_trains_the_same_as_an_eager_one(sample, tmp_path):
    """train.compile_quantizers: same data, seed and steps, so the trained bases and weights agree with the eager run's
    to float rounding (the compiled step sums in another order)."""
    import flexres

    def run(name: str, compiled: bool):
        cfg = {
            "model": {"name": "resnet18", "width_mult": 0.25, "kwargs": {"w_bits": 2, "a_bits": 2}},
            "method": {"name": "rsnet", "resolutions": [32, 24]},
            "data": {"root": str(sample), "cache": True, "num_workers": 0},
            "train": {
                "epochs": 1,
                "batch_size": 50,
                "lr": 0.02,
                "progress": False,
                "eval_every": 0,
                "amp": False,
                "channels_last": False,
                "compile_quantizers": compiled,
            },
        }
        lines = []
        flexres.train(cfg, tmp_path / name, log=lines.append)
        return flexres.load_checkpoint(tmp_path / name)[0], lines

    eager, _ = run("eager", False)
    compiled, lines = run("compiled", True)
    assert any("38 quantizers compiled" in line for line in lines)  # 19 convolutions: a weight and an activation each
    want, got = eager.state_dict(), compiled.state_dict()
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-4, rtol=1e-3, msg=key)


def test_quantization_options_are_checked():
    import flexres

    with pytest.raises(ValueError, match="activation_bases must be 'shared'"):
        flexres.create_model("resnet18", train_resolutions=[48], w_bits=2, activation_bases="per-layer")
    with pytest.raises(ValueError, match="not SAN, slimmable or resizable"):
        flexres.create_model("san_resnet18", train_resolutions=[48], w_bits=2)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_bit_packing_round_trips_and_uses_bits_per_code(bits):
    from flexres.engine.packed import pack_bits, unpack_bits

    codes = torch.randint(0, 2**bits, (1001,))
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-1001 * bits // 8)
    assert torch.equal(unpack_bits(packed, bits, 1001), codes)


@pytest.mark.slow
def test_packed_export_loads_to_the_same_outputs_everywhere(sample, tmp_path):
    import flexres

    cfg = {
        "model": {
            "name": "resnet18",
            "width_mult": 0.25,
            "kwargs": {"w_bits": 2, "a_bits": 2, "activation_bases": "private"},
        },
        "method": {"name": "rsnet", "resolutions": [48, 32]},
        "data": {"root": str(sample), "cache": True, "num_workers": 0},
        "train": {"epochs": 1, "batch_size": 50, "lr": 0.02, "progress": False, "eval_every": 0},
    }
    flexres.train(cfg, tmp_path / "run", log=lambda s: None)
    info = flexres.export(tmp_path / "run", 0, format="packed", out=tmp_path / "q.safetensors", data=sample)
    assert info["parity_max_abs_diff"] < 1e-4 and info["bits"] == [2]
    # 2 bits per quantized weight instead of 32: the quantized weights take 1/16 of their fp32 bytes.
    assert info["tensor_bytes"] < info["fp32_tensor_bytes"] - info["quantized_weights"] * (4 - 2 / 8) + 1
    packed, _ = flexres.load_checkpoint(tmp_path / "q.safetensors")
    trained, _ = flexres.load_checkpoint(tmp_path / "run")
    for r in (48, 40, 32):  # trained and in-between resolutions
        x = torch.randn(2, 3, r, r)
        packed.set_operating_point(r)
        trained.set_operating_point(r)
        with torch.no_grad():
            assert torch.equal(packed(x), trained(x))
    a = flexres.evaluate(tmp_path / "run", sample, [48, 32])["runs"]["run"]["results"]
    b = flexres.evaluate(tmp_path / "q.safetensors", sample, [48, 32])["runs"]
    assert [v["results"][r]["top1"] for v in b.values() for r in ("48", "32")] == [a["48"]["top1"], a["32"]["top1"]]
    pred = flexres.predict(tmp_path / "q.safetensors", sorted((sample / "val").rglob("*.JPEG"))[:1], resolution=32)
    assert len(pred["predictions"][0]["top"]) == 5
    # ONNX of one operating point: quantized weights materialised, activations through fixed levels; checked by export.
    onnx = flexres.export(tmp_path / "run", 32, out=tmp_path / "q32.onnx", data=sample)
    assert onnx["parity_top1_disagreements"] == 0 and onnx["parity_relative_diff"] < 1e-2  # flexres.parity, quantized
    with pytest.raises(ValueError, match="no quantized layer"):
        from flexres.engine.packed import pack_state

        pack_state(flexres.create_model("resnet18", train_resolutions=[48], width_mult=0.25))


# --- materialise and untrained quantizers ---


def fitted_quantized_resnet(bases: str = "private"):
    """A 2/2 ResNet-18 whose every basis was fitted by a train-mode forward at each trained resolution."""
    import flexres

    torch.manual_seed(5)
    model = flexres.create_model(
        "resnet18",
        num_classes=10,
        train_resolutions=[48, 32],
        width_mult=0.25,
        w_bits=2,
        a_bits=2,
        activation_bases=bases,
    ).train()
    with torch.no_grad():
        for r in (48, 32):
            model.set_operating_point(r)
            model(torch.randn(4, 3, r, r))
    return model.eval()


@pytest.mark.parametrize("bases", ["shared", "private"])
def test_materialised_quantized_model_keeps_its_quantization(bases):
    from flexres.models import materialize

    model = fitted_quantized_resnet(bases)
    plain = materialize(model, 32)
    quantizers = [m for m in plain.modules() if isinstance(m, LQQuantizer) and m.enabled]
    assert quantizers and all(bool(q.initialized.all()) for q in quantizers)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad(), model.at(32):
        torch.testing.assert_close(plain(x), model(x), rtol=0, atol=1e-5)  # the 2/2 outputs, not full precision ones


def test_materialise_refuses_a_copy_that_does_not_compute_the_source(monkeypatch):
    from flexres.models import materialize

    def wrong_basis(src, dst):  # a copy that loses the selected basis (as materialise once did, silently)
        dst.basis[0].copy_(src.basis[src.index] * 3)
        dst.initialized[0] = True

    monkeypatch.setattr(LQQuantizer, "materialize_into", wrong_basis)
    with pytest.raises(ParityError, match="materialised model does not compute the source model's outputs at 32px"):
        materialize(fitted_quantized_resnet(), 32)


def test_an_untrained_quantizer_refuses_to_run_in_eval_except_when_measuring_cost():
    import flexres
    from flexres.analysis import count_macs
    from flexres.models import materialize

    q = LQQuantizer(2, signed=False).eval()
    with pytest.raises(UninitializedQuantizerError, match="never trained"):
        q(torch.rand(10))
    model = flexres.create_model("resnet18", train_resolutions=[32], width_mult=0.25, w_bits=2, a_bits=2).eval()
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(UninitializedQuantizerError), torch.no_grad():
        model(x)
    # MACs of an untrained model are those of the same network in full precision (quantizers add no multiply-add)
    plain = flexres.create_model("resnet18", train_resolutions=[32], width_mult=0.25)
    assert count_macs(model, 32) == count_macs(plain, 32)
    with pytest.raises(UninitializedQuantizerError), torch.no_grad():  # the opt-in ended with the measurement
        model(x)
    with pytest.raises(UninitializedQuantizerError):
        materialize(model, 32)
    with pytest.raises(UninitializedQuantizerError):
        model.layer1[0].conv1.to_static()


def _reference_step(x: torch.Tensor, basis: torch.Tensor, signed: bool, momentum: float = 0.9):
    """LQ-Nets' quantizer step written from its equations: nearest level, STE (clipped for activations), and the QEM
    basis update from per-code counts and sums accumulated one code at a time."""
    flat = x.detach().float().reshape(basis.shape[0], -1)
    q, codes = quantize_with(flat, basis, signed)
    enc = encodings(basis.shape[1], signed).double()
    counts = torch.stack([(codes == c).sum(1).double() for c in range(enc.shape[0])], 1)
    sums = torch.stack([(flat.double() * (codes == c)).sum(1) for c in range(enc.shape[0])], 1)
    btb = torch.einsum("gl,lk,lj->gkj", counts, enc, enc)
    lam = 1e-6 * btb.diagonal(dim1=1, dim2=2).sum(-1).clamp_min(1.0)[:, None, None]
    best = (
        torch.linalg.solve(
            btb + lam * torch.eye(enc.shape[1], dtype=torch.float64),
            (sums @ enc + lam[:, :, 0] * basis.double()).unsqueeze(-1),
        )
        .squeeze(-1)
        .float()
    )
    top = float(quantization_levels(basis, False).max())
    u = x if signed else x.clamp(0.0, top)
    return q.reshape(x.shape) + (u - u.detach()), codes, momentum * basis + (1 - momentum) * best


@pytest.mark.parametrize(
    "signed, bits, groups, bases", [(True, 2, 8, 1), (False, 2, 1, 1), (False, 3, 1, 3), (True, 4, 4, 1)]
)
def test_the_quantizer_step_equals_its_equations_outputs_codes_gradients_and_basis(signed, bits, groups, bases):
    torch.manual_seed(3)
    quant = LQQuantizer(bits, signed=signed, groups=groups, num_bases=bases).train()
    quant.select(bases - 1)
    shape = (groups, 16, 3, 3) if signed else (4, 6, 10, 10)
    quant(torch.randn(shape) if signed else torch.relu(torch.randn(shape)))  # fits the basis
    x = (torch.randn(shape) * 1.5 if signed else torch.relu(torch.randn(shape)) * 2).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    basis = quant.basis[bases - 1].clone()
    out = quant(x)
    want, codes, want_basis = _reference_step(x_ref, basis, signed)
    torch.testing.assert_close(out, want)
    assert torch.equal(nearest_codes(x.detach().reshape(groups, -1), basis, signed), codes)
    torch.testing.assert_close(quant.basis[bases - 1], want_basis, atol=1e-6, rtol=1e-5)
    g = torch.randn(shape)
    out.backward(g)
    want.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad)  # straight through, zero above the top level for activations


def test_a_fitted_quantizer_never_reads_a_tensor_back_to_the_host(monkeypatch):
    """On a GPU a read-back (bool(), float(), .item(), a solver's status check) waits for the device, once per layer and
    step; the fitted quantizer's forward, training included, has none."""
    quant = LQQuantizer(2, signed=False, num_bases=2).train()
    quant(torch.rand(2, 4, 8, 8))
    quant.select(1)
    quant(torch.rand(2, 4, 8, 8))

    def refuse(*args, **kwargs):
        raise AssertionError("read back to the host")

    for name in ("__bool__", "__float__", "__int__", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    for index in (0, 1):
        quant.select(index)
        quant(torch.rand(2, 4, 8, 8, requires_grad=True)).sum().backward()


def test_a_loaded_state_refreshes_which_bases_are_fitted():
    trained = LQQuantizer(2, signed=False).train()
    trained(torch.rand(2, 4, 8, 8))
    fresh = LQQuantizer(2, signed=False).eval()
    fresh.load_state_dict(trained.state_dict())
    assert torch.equal(fresh(torch.ones(1, 4, 2, 2)), trained.eval()(torch.ones(1, 4, 2, 2)))
    trained.load_state_dict(LQQuantizer(2, signed=False).state_dict())  # an unfitted state: refuses again
    with pytest.raises(UninitializedQuantizerError):
        trained(torch.ones(1, 4, 2, 2))


@pytest.mark.parametrize("signed", [True, False])
def test_a_channels_last_tensor_is_quantized_in_place_of_its_layout_with_the_same_values_and_gradients(signed):
    torch.manual_seed(0)
    shape = (8, 6, 3, 3) if signed else (2, 6, 5, 7)
    quant = LQQuantizer(2, signed=signed, groups=8 if signed else 1).train()
    quant(torch.randn(shape) if signed else torch.rand(shape))
    twin = LQQuantizer(2, signed=signed, groups=8 if signed else 1).train()
    twin.load_state_dict(quant.state_dict())
    x = (torch.randn(shape) * 2).requires_grad_()
    x_nhwc = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    out, out_nhwc = quant(x), twin(x_nhwc)
    assert out_nhwc.is_contiguous(memory_format=torch.channels_last)  # no copy to NCHW and back
    assert torch.equal(out, out_nhwc)
    torch.testing.assert_close(quant.basis, twin.basis, atol=1e-7, rtol=1e-6)  # summed in another order
    g = torch.randn(shape)
    out.backward(g)
    out_nhwc.backward(g)
    assert torch.equal(x.grad, x_nhwc.grad)


@pytest.mark.slow
def test_the_compiled_quantizer_step_equals_the_eager_one():
    """compile_quantizers: torch.compile of the step (fused kernels on a GPU) gives the eager step's outputs, gradients
    and basis update, training and eval, for weights (8 groups) and activations."""
    torch.manual_seed(1)
    for signed, groups, shape in ((True, 8, (8, 4, 3, 3)), (False, 1, (2, 4, 6, 6))):
        eager = LQQuantizer(2, signed=signed, groups=groups).train()
        eager(torch.randn(shape).relu() + (0 if not signed else torch.randn(shape)))
        compiled = LQQuantizer(2, signed=signed, groups=groups).train()
        compiled.load_state_dict(eager.state_dict())
        assert compile_quantizers(nn.Sequential(compiled)) == 1
        for _trial in range(2):
            x = (torch.randn(shape) * 2).requires_grad_()
            x_c = x.detach().clone().requires_grad_()
            out, out_c = eager(x), compiled(x_c)
            torch.testing.assert_close(out_c, out)
            torch.testing.assert_close(compiled.basis, eager.basis, atol=1e-6, rtol=1e-5)
            g = torch.randn(shape)
            out.backward(g)
            out_c.backward(g)
            torch.testing.assert_close(x_c.grad, x.grad)
        eager.eval(), compiled.eval()
        x = torch.randn(shape)
        torch.testing.assert_close(compiled(x), eager(x))
