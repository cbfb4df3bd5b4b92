"""LQ-Nets learned quantizers (Zhang et al., ECCV 2018), as layers: the quantized RS-Nets of RS-Nets
section 4 / Table 3.

A K-bit quantizer has a basis v in R^K; its 2^K levels are all the combinations v^T b, with b in {-1, +1}^K for
weights and b in {0, 1}^K for (non-negative) activations. A value is quantized to its nearest level. The basis is
learned by quantization-error minimisation (QEM): with the encodings B of the current values fixed, the best basis
is the least-squares solution v* = argmin ||B v - x||^2, and the running basis follows it by a moving average,
v <- m v + (1 - m) v* (m = 0.9, as LQ-Nets). Gradients pass straight through (STE); activations are clipped at the
top level, so no gradient flows above it. Weights get one basis per output channel, activations one per layer (or one
per trained resolution: ``num_bases``, selected like a switchable BN).

32 bits means no quantization: the layer is the identity, so a 32/32 model equals the plain one.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from ..errors import UninitializedQuantizerError
from .adaptive import AdaptiveLayer, PointSetting
from .switchable_bn import nearest_index

FULL_PRECISION = 32
# Values accumulated per chunk in the QEM sums: bounds the float64 copy (8 bytes a value) whatever the layer's size;
# 2 MB chunks were no slower than one copy of a million activations on a CPU (and cost few launches on a GPU).
_ACCUMULATE_CHUNK = 1 << 18
_SUM_CHUNK_BITS = 10  # 2^10 values summed in float32 per bin by the quantizer's step before the float64 total


def encodings(bits: int, signed: bool) -> Tensor:
    """The 2^K x K matrix of codes: row i holds bit k of i as -1/+1 (signed) or 0/1."""
    i = torch.arange(2**bits).unsqueeze(1)
    b = ((i >> torch.arange(bits)) & 1).float()
    return 2 * b - 1 if signed else b


def quantization_levels(basis: Tensor, signed: bool) -> Tensor:
    """All 2^K levels of ``basis`` (..., K) -> (..., 2^K), level i = encodings[i] . basis."""
    return basis @ encodings(basis.shape[-1], signed).to(basis).T


def nearest_codes(x: Tensor, basis: Tensor, signed: bool) -> Tensor:
    """Index of the nearest level of every value of ``x`` (G x N, one basis row per group G) -> G x N int64."""
    _, order, thresholds = _sorted_levels(quantization_levels(basis, signed))
    return order.gather(1, _rank(x, thresholds))  # the rank among the sorted levels, as a code


def _sorted_levels(levels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``levels`` (G x L) sorted per group, the code of each sorted level, and the midpoints between neighbours
    (G x (L - 1)): a value's nearest level is the one whose rank is the number of midpoints below it."""
    sorted_levels, order = levels.sort(dim=1)
    return sorted_levels, order, (sorted_levels[:, 1:] + sorted_levels[:, :-1]) / 2


def quantize_with(x: Tensor, basis: Tensor, signed: bool) -> tuple[Tensor, Tensor]:
    """(quantized values, codes) of ``x`` (G x N) under ``basis`` (G x K)."""
    codes = nearest_codes(x, basis, signed)
    return quantization_levels(basis, signed).gather(1, codes), codes


def quantization_error(x: Tensor, basis: Tensor, signed: bool) -> Tensor:
    """Sum of squared differences between ``x`` (G x N) and its nearest levels."""
    return (quantize_with(x, basis, signed)[0] - x).pow(2).sum()


def level_counts_and_sums(x: Tensor, codes: Tensor, n_levels: int) -> tuple[Tensor, Tensor]:
    """Per group, how many values of ``x`` (G x N) have each code, and their sum (G x L each, float64).

    float64, because a float32 running sum stops counting at 2^24 (1 + 2^24 rounds to 2^24) and drifts well before:
    a large layer (a batch of activations, tens of millions of values) would bias the least-squares target. Chunked,
    so the float64 copy stays small."""
    g = x.shape[0]
    counts = torch.zeros(g * n_levels, dtype=torch.float64, device=x.device)
    sums = torch.zeros(g * n_levels, dtype=torch.float64, device=x.device)
    offset = (torch.arange(g, device=x.device) * n_levels).unsqueeze(1)  # group g's codes count in bins g*L ... g*L+L-1
    step = max(1, _ACCUMULATE_CHUNK // max(g, 1))
    for start in range(0, x.shape[1], step):  # two kernels a chunk, whatever the number of groups
        c = (codes[:, start : start + step] + offset).reshape(-1)
        counts += torch.bincount(c, minlength=g * n_levels)
        sums += torch.bincount(c, weights=x[:, start : start + step].reshape(-1).double(), minlength=g * n_levels)
    return counts.view(g, n_levels), sums.view(g, n_levels)


def least_squares_basis(x: Tensor, codes: Tensor, basis: Tensor, signed: bool, ridge: float = 1e-6) -> Tensor:
    """QEM: per group, v* = argmin ||B v - x||^2 for the encodings B of ``codes``; B^T B and B^T x are summed per code,
    so the cost is one pass over x. A tiny ridge towards the current ``basis`` keeps a direction no value constrains
    (a bit that is the same for every value) where it was instead of letting it jump."""
    counts, sums = level_counts_and_sums(x, codes, 2 ** basis.shape[1])
    return _solve_basis(counts, sums, basis, encodings(basis.shape[1], signed).to(sums), ridge)


def _solve_basis(counts: Tensor, sums: Tensor, basis: Tensor, enc: Tensor, ridge: float = 1e-6) -> Tensor:
    """The normal equations of QEM from the per-code ``counts`` and ``sums`` (G x L, float64) and the encodings ``enc``
    (L x K). The K x K system is tiny: solved in float64, only the basis goes back to ``basis``'s dtype."""
    btb = torch.einsum("gl,lk,lj->gkj", counts, enc, enc)  # G x K x K
    btx = sums @ enc  # G x K
    lam = ridge * btb.diagonal(dim1=1, dim2=2).sum(-1).clamp_min(1.0)[:, None, None]
    eye = torch.eye(basis.shape[1], dtype=sums.dtype, device=sums.device)
    # solve_ex: no check of the factorisation's status, which would wait for the device (the ridge keeps it regular)
    best = torch.linalg.solve_ex(btb + lam * eye, (btx + lam[:, :, 0] * basis.to(sums)).unsqueeze(-1))[0].squeeze(-1)
    return best.to(basis.dtype)


def quantizer_step(flat: Tensor, basis: Tensor, enc: Tensor, fit: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """The quantizer's hot path in one function: (quantized ``flat`` (G x N), the top level, and with ``fit`` the QEM
    least-squares basis). The arithmetic of quantize_with and least_squares_basis, the reference functions above,
    arranged for few kernels: the levels sorted once, each value ranked among them by comparisons with the midpoints,
    the quantized value read from the sorted levels by rank, and the per-code statistics summed by rank
    (_rank_counts_and_sums) and mapped to codes on the G x L table. ``enc`` (L x K) is the module's cached
    ``encodings`` on the device, so nothing is built on the host per call. Pure, so ``torch.compile`` can fuse it."""
    sorted_levels, order, thresholds = _sorted_levels(basis @ enc.T)
    rank = _rank(flat, thresholds)
    q = sorted_levels.gather(1, rank)
    top = sorted_levels[:, -1].max()
    if not fit:
        return q, top, None
    counts, sums = _rank_counts_and_sums(flat, rank, sorted_levels.shape[1])
    # rank j of group g is code order[g, j]: scatter the statistics back to code order for the normal equations
    best = _solve_basis(
        counts.new_zeros(counts.shape).scatter_(1, order, counts),
        sums.new_zeros(sums.shape).scatter_(1, order, sums),
        basis,
        enc.to(torch.float64),
    )
    return q, top, best


def _rank_counts_and_sums(flat: Tensor, rank: Tensor, n_levels: int) -> tuple[Tensor, Tensor]:
    """Per group, how many values of ``flat`` (G x N) have each rank, and their sum (G x L each, float64), in a fixed
    number of kernels whatever N. Each value counts in the bin of its rank within its chunk of 2^_SUM_CHUNK_BITS values:
    float32 counts a chunk exactly and sums it closely (2^10 values, far from float32's 2^24 limit), and the chunks
    are added in float64, so a layer of tens of millions of values is counted exactly (level_counts_and_sums, the
    reference, converts every value to float64 instead)."""
    g, n = flat.shape
    chunks = ((n - 1) >> _SUM_CHUNK_BITS) + 1
    # a shift, not // : torch.compile (dynamic shapes, CPU, torch 2.14) mis-compiles an arange floor-divided
    # by a constant
    bins = rank + n_levels * (torch.arange(n, device=flat.device) >> _SUM_CHUNK_BITS)
    counts = flat.new_zeros(g, chunks * n_levels).scatter_add_(1, bins, flat.new_ones(()).expand(g, n))
    sums = flat.new_zeros(g, chunks * n_levels).scatter_add_(1, bins, flat)
    return (
        counts.view(g, chunks, n_levels).sum(1, dtype=torch.float64),
        sums.view(g, chunks, n_levels).sum(1, dtype=torch.float64),
    )


def _rank(x: Tensor, thresholds: Tensor) -> Tensor:
    """How many of the sorted ``thresholds`` (G x (L - 1)) lie below each value of ``x`` (G x N), as int64."""
    if thresholds.shape[1] > 15:
        return torch.searchsorted(thresholds.contiguous(), x.contiguous())
    # up to 4 bits a few in-place comparisons are about 10x faster on a CPU than searchsorted's binary search per value
    rank = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for j in range(thresholds.shape[1]):
        rank += x > thresholds[:, j : j + 1]
    return rank.long()


def _channels_last(x: Tensor) -> bool:
    """Whether ``x`` is laid out as N H W C (and not also plainly contiguous): flattening its N H W C permutation is
    then a view, not a copy, and dim 0 (samples of an activation, output channels of a weight) stays the outermost."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


@functools.cache
def _compiled_quantizer_step():
    return torch.compile(quantizer_step, dynamic=True)


def compile_quantizers(model: nn.Module) -> int:
    """Run every LQ quantizer of ``model`` through a torch.compile'd quantizer_step (fused kernels on a GPU); returns
    how many. Compiles lazily at the first call; outputs equal the eager step's (tests/test_quantize.py)."""
    quantizers = [m for m in model.modules() if isinstance(m, LQQuantizer) and m.enabled]
    for m in quantizers:
        m.compile_step = True
    return len(quantizers)


class _StraightThrough(torch.autograd.Function):
    """Forward: the quantized values ``q``. Backward: the gradient of the identity (weights, ``top`` None) or of the
    clip of ``x`` to [0, top] (activations): 1 strictly inside, 0 outside and at either end, as torch.clamp's. One node
    and, for activations, the mask made from the saved input only when a gradient is asked for."""

    @staticmethod
    def forward(ctx, x: Tensor, q: Tensor, top: Tensor | None) -> Tensor:
        ctx.clipped = top is not None
        if ctx.clipped:
            ctx.save_for_backward(x, top)
        return q.view_as(q)

    @staticmethod
    def backward(ctx, grad: Tensor):
        if not ctx.clipped:
            return grad, None, None
        x, top = ctx.saved_tensors
        return grad * ((x > 0) & (x < top)), None, None


class LQQuantizer(nn.Module, AdaptiveLayer):
    """K-bit LQ-Nets quantizer of a tensor whose values split into ``groups`` (dim 0 of the grouped view).

    ``signed`` (weights): levels symmetric around 0, pure STE. Unsigned (activations): levels >= 0, input clipped to
    [0, top level] for the gradient. ``num_bases`` > 1 keeps a private basis per index chosen by ``select`` (one per
    trained resolution); the bases are buffers, updated only in training, by QEM and a moving average ``momentum``.
    """

    def __init__(self, bits: int, signed: bool, groups: int = 1, num_bases: int = 1, momentum: float = 0.9) -> None:
        super().__init__()
        if not (1 <= bits <= 8 or bits == FULL_PRECISION):
            raise ValueError(f"bits must be 1-8 or {FULL_PRECISION} (full precision), got {bits}")
        self.bits, self.signed, self.groups, self.momentum = bits, signed, groups, momentum
        k = bits if bits != FULL_PRECISION else 1
        self.register_buffer("basis", torch.zeros(num_bases, groups, k))
        self.register_buffer("initialized", torch.zeros(num_bases, dtype=torch.bool))
        # The encodings, built once and moved with the module: building them per call costs host work and a copy.
        self.register_buffer("codebook", encodings(k, signed), persistent=False)
        self.index = 0
        self.compile_step = False  # run quantizer_step through torch.compile (compile_quantizers)
        # Which bases are known fitted, mirrored on the host: reading the buffer in every forward would wait for the
        # device each time (a GPU sync per layer and step). Only True is cached; a loaded state dict refreshes it.
        self._fitted = [False] * num_bases
        self.register_load_state_dict_post_hook(LQQuantizer._after_load)
        # Cost measurement only (MACs, latency, memory on zeros; passing_uninitialized): an unfitted basis passes its
        # input through there; anywhere else its outputs would silently be full precision, so it raises.
        self.pass_uninitialized = False

    @property
    def enabled(self) -> bool:
        return self.bits != FULL_PRECISION

    def select(self, index: int) -> None:
        if not 0 <= index < self.basis.shape[0]:
            raise IndexError(f"basis {index} of {self.basis.shape[0]}")
        self.index = index

    def apply_point(self, setting: PointSetting) -> bool:
        if (
            not self.signed and self.basis.shape[0] > 1
        ):  # private activation bases switch with the resolution, as BNs do
            self.select(nearest_index(setting.op.resolution, setting.train_resolutions))
        return False

    @torch.no_grad()
    def to_static(self) -> nn.Module:
        """An activation quantizer on its own (a pre-activation network's): the fixed levels of the selected basis."""
        if self.signed:
            raise NotImplementedError(
                "a weight quantizer becomes plain weights inside its convolution (QuantConv2d.to_static)"
            )
        if not self.enabled:
            return nn.Identity()
        self.require_initialized()  # an unfitted basis has no levels
        return FixedLevels(quantization_levels(self.basis[self.index], False)[0].tolist())

    def deployed_params(self) -> int:
        return 0  # levels are constants, not parameters

    def materialize_into(self, target: nn.Module) -> None:
        """The basis serving now becomes ``target``'s only one (a one-resolution model has one basis)."""
        self.require_initialized()  # an unfitted basis has no levels; the copy would quantize everything to 0
        target.basis[0].copy_(self.basis[self.index])
        target.initialized[0] = True

    @torch.no_grad()
    def _initial_basis(self, x: Tensor) -> Tensor:
        """Powers of two scaled to the data: uniform levels spanning about +-2 std (weights) or
        [0, max(mean + 3 std)]."""
        powers = 2.0 ** torch.arange(self.bits, dtype=x.dtype, device=x.device)
        if self.signed:
            scale = 2 * x.std(dim=1, keepdim=True).clamp_min(1e-8) / (2**self.bits - 1)
        else:
            top = (x.mean() + 3 * x.std()).clamp_min(1e-3)
            scale = (top / (2**self.bits - 1)).expand(x.shape[0], 1)
        return scale * powers

    def grouped(self, x: Tensor) -> Tensor:
        return x.reshape(self.groups, -1)

    @staticmethod
    def _after_load(module: LQQuantizer, incompatible_keys) -> None:
        module._fitted = [bool(f) for f in module.initialized.tolist()]

    def _is_fitted(self, i: int) -> bool:
        if not self._fitted[i] and bool(self.initialized[i]):  # fitted elsewhere (a copy, a load): learn it once
            self._fitted[i] = True
        return self._fitted[i]

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        i = self.index
        if not self._is_fitted(i):
            if not self.training:  # a basis fitted here, in eval, would stick to whatever input came first
                if self.pass_uninitialized:
                    return x
                raise UninitializedQuantizerError(self._uninitialized_message(i))
            with torch.no_grad():
                self.basis[i] = self._initial_basis(self.grouped(x.detach().float()))
                self.initialized[i] = True
                self._fitted[i] = True
        step = _compiled_quantizer_step() if self.compile_step else quantizer_step
        nhwc = _channels_last(x)
        values = x.detach().float()
        values = values.permute(0, 2, 3, 1) if nhwc else values
        q, top, best = step(self.grouped(values), self.basis[i], self.codebook, self.training)
        if best is not None:
            with torch.no_grad():  # m v + (1 - m) v*
                self.basis[i].lerp_(best, 1 - self.momentum)
        q = q.view(values.shape)
        q = (q.permute(0, 3, 1, 2) if nhwc else q).to(x.dtype)
        # Straight-through: the value is exactly q; the gradient 1, or for activations that of the clip to [0, top]. The
        # top stays a tensor: no wait for the device to read it.
        return _StraightThrough.apply(x, q, None if self.signed else top.to(x.dtype))

    def _uninitialized_message(self, index: int) -> str:
        kind = "weight" if self.signed else "activation"
        return (
            f"a {self.bits}-bit {kind} quantizer (basis {index}) was never trained, so it has no levels to quantize "
            "to; train the quantized model first (or run it once in train mode)"
        )

    def require_initialized(self) -> None:
        """Raise UninitializedQuantizerError unless the selected basis was fitted (or the layer is full precision)."""
        if self.enabled and not bool(self.initialized[self.index]):
            raise UninitializedQuantizerError(self._uninitialized_message(self.index))

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}, groups={self.groups}, bases={self.basis.shape[0]}"


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` holds an LQ-Nets quantizer below 32 bits."""
    return any(isinstance(m, LQQuantizer) and m.enabled for m in module.modules())


@contextmanager
def passing_uninitialized(module: nn.Module) -> Iterator[nn.Module]:
    """Within: unfitted quantizers of ``module`` pass their input through instead of raising. For measuring cost
    (MACs, latency) on an untrained model only; the values computed are not the quantized model's."""
    quantizers = [m for m in module.modules() if isinstance(m, LQQuantizer)]
    before = [q.pass_uninitialized for q in quantizers]
    for q in quantizers:
        q.pass_uninitialized = True
    try:
        yield module
    finally:
        for q, b in zip(quantizers, before):
            q.pass_uninitialized = b


class FixedLevels(nn.Module):
    """A frozen activation quantizer for export: the nearest of fixed ascending ``levels``, written as a sum of steps
    (level 0 + each step whose threshold x exceeds) so that it traces and exports to ONNX as plain comparisons."""

    def __init__(self, levels: list[float]) -> None:
        super().__init__()
        self.levels = sorted(levels)
        self.thresholds = [(a + b) / 2 for a, b in zip(self.levels, self.levels[1:])]
        self.steps = [b - a for a, b in zip(self.levels, self.levels[1:])]

    def forward(self, x: Tensor) -> Tensor:
        out = torch.full_like(x, self.levels[0])
        for t, step in zip(self.thresholds, self.steps):
            out = out + (x > t).to(x.dtype) * step
        return out

    def extra_repr(self) -> str:
        return "levels=[" + ", ".join(f"{v:.4g}" for v in self.levels) + "]"


class QuantConv2d(nn.Conv2d, AdaptiveLayer):
    """A Conv2d whose input is quantized to ``a_bits`` (non-negative activations, one basis per layer or per trained
    resolution) and whose weight is quantized to ``w_bits`` (one basis per output channel), as LQ-Nets."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        bias: bool = False,
        w_bits: int = 2,
        a_bits: int = FULL_PRECISION,
        activation_bases: int = 1,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=bias)
        self.weight_quantizer = LQQuantizer(w_bits, signed=True, groups=out_channels)
        self.input_quantizer = LQQuantizer(a_bits, signed=False, num_bases=activation_bases)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)

    def deployed_params(self) -> int:
        return self.weight.numel() + (
            self.bias.numel() if self.bias is not None else 0
        )  # what to_static holds, untrained too

    @torch.no_grad()
    def to_static(self) -> nn.Module:
        """The plain layers this conv computes now: a Conv2d holding the quantized weights, after a ``FixedLevels``
        of the selected activation basis when the input is quantized."""
        wq, aq = self.weight_quantizer, self.input_quantizer
        wq.require_initialized()  # an unfitted basis is all zeros: it would export a conv of zeros
        aq.require_initialized()
        conv = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            self.bias is not None,
        ).to(self.weight)
        if wq.enabled:
            conv.weight.copy_(
                quantize_with(wq.grouped(self.weight.float()), wq.basis[0], True)[0].reshape(self.weight.shape)
            )
        else:
            conv.weight.copy_(self.weight)
        if self.bias is not None:
            conv.bias.copy_(self.bias)
        if not aq.enabled:
            return conv
        return nn.Sequential(FixedLevels(quantization_levels(aq.basis[aq.index], False)[0].tolist()), conv)
