"""Packed checkpoints of quantized models: every LQ-Nets weight stored as its K-bit codes, bit-packed, next to its
basis; everything else (BNs of every resolution, stem, classifier, activation bases) as it is. One RS-Net file holds
2 bits per quantized weight for all its resolutions, where five I-Nets cannot share their 2-bit values (RS-Nets
footnote 4). Loading computes each weight as its level (basis . code), which is exactly the value the training-time
quantizer gives, so the unpacked model computes what the fake-quantized model computed."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..nn.quantize import QuantConv2d, nearest_codes, quantization_levels

PACKED = "flexres-packed-v1"


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Codes in [0, 2^bits) -> uint8, ``bits`` bits each, little-endian within a code, densely packed."""
    c = codes.reshape(-1).to(torch.int64).numpy()
    unpacked = ((c[:, None] >> np.arange(bits)) & 1).astype(np.uint8).reshape(-1)
    return torch.from_numpy(np.packbits(unpacked, bitorder="little"))


def unpack_bits(packed: Tensor, bits: int, count: int) -> Tensor:
    b = np.unpackbits(packed.numpy(), count=count * bits, bitorder="little").reshape(count, bits).astype(np.int64)
    return torch.from_numpy((b << np.arange(bits)).sum(1))


@torch.no_grad()
def pack_state(model: torch.nn.Module) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The model's state with every quantized weight replaced by its packed codes; and how to unpack them."""
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    layout: dict[str, Any] = {}
    for name, m in model.named_modules():
        if not isinstance(m, QuantConv2d) or not m.weight_quantizer.enabled:
            continue
        q = m.weight_quantizer
        if not bool(q.initialized[0]):
            raise ValueError(f"{name}: its weight quantizer was never run (an untrained model has no basis to pack)")
        basis = q.basis[0]
        codes = nearest_codes(q.grouped(m.weight.float()), basis, signed=True)
        del state[f"model.{name}.weight"]
        state[f"packed.{name}.weight"] = pack_bits(codes, q.bits)
        layout[name] = {"bits": q.bits, "shape": list(m.weight.shape), "basis": f"model.{name}.weight_quantizer.basis"}
    if not layout:
        raise ValueError(
            "the model has no quantized layer: a packed file stores LQ-Nets codes (train with model.kwargs w_bits < 32)"
        )
    return state, layout


def unpack_state(tensors: dict[str, Tensor], layout: dict[str, Any]) -> dict[str, Tensor]:
    """Inverse of ``pack_state``: every quantized weight as the level its code names."""
    out = {k: v for k, v in tensors.items() if not k.startswith("packed.")}
    for name, info in layout.items():
        shape = info["shape"]
        basis = tensors[info["basis"]][0]
        codes = unpack_bits(tensors[f"packed.{name}.weight"], info["bits"], int(np.prod(shape))).reshape(shape[0], -1)
        out[f"model.{name}.weight"] = quantization_levels(basis, signed=True).gather(1, codes).reshape(shape)
    return out


def storage_bytes(tensors: dict[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())
