"""Resizable-Adapt, evaluated: route each image through the scaling configuration a small classifier predicts for it
(the router and its training: flexres.methods.adapt).

1. Candidates: the configurations whose MACs fit the budget (so no image ever costs more).
2. Labels: on a set of training images, run every candidate; an image's label is the candidate that
   classifies it correctly with the highest probability of the true class (the most probable one when
   none is correct).
3. Router: three 3x3 conv-BN-ReLU layers, global pooling and a linear layer over the candidates, on the
   last-stage features of a probe pass (the cheapest candidate), trained with cross-entropy.
4. Inference: probe pass -> router -> the chosen configuration classifies the image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from ..data import EvalTransform, ImageFolderDataset, normalize_batch
from ..engine.evaluate import tree_batch_size
from ..methods.adapt import best_config_labels, route, train_router
from ..models import AdaptiveModel
from ..models.config_tree import forward_configurations
from ..operating_point import OperatingPoint
from .flops import count_macs


@dataclass
class Candidates:
    scales: list[tuple[float, ...]]
    macs: list[int]

    @property
    def probe(self) -> int:
        return min(range(len(self.macs)), key=self.macs.__getitem__)

    def within(self, max_macs: float) -> tuple[Candidates, list[int]]:
        """The candidates that cost at most ``max_macs``, and their positions here (columns of a ``Scores``)."""
        cols = [i for i, m in enumerate(self.macs) if m <= max_macs]
        if not cols:
            cheapest = self.probe
            raise ValueError(
                f"no scaling configuration fits {max_macs / 1e6:.1f} MMACs; the cheapest, {self.scales[cheapest]}, "
                f"costs {self.macs[cheapest] / 1e6:.1f} MMACs"
            )
        return Candidates([self.scales[i] for i in cols], [self.macs[i] for i in cols]), cols


def candidates_within(
    model: AdaptiveModel, resolution: int, configs: list[tuple[float, ...]], max_macs: float
) -> Candidates:
    every = Candidates(list(configs), [count_macs(model, OperatingPoint(resolution, scales=sc)) for sc in configs])
    return every.within(max_macs)[0]


@dataclass
class Scores:
    """Every candidate run on a set of images: what ``score_candidates`` returns, kept for reuse."""

    correct: Tensor  # [N, C] bool
    prob: Tensor  # [N, C] true-class probability
    features: Tensor  # [N, ...] last-stage features of the probe (cheapest) candidate

    def subset(self, columns: list[int]) -> Scores:
        return Scores(self.correct[:, columns], self.prob[:, columns], self.features)


@torch.no_grad()
def score_candidates(
    model: AdaptiveModel,
    dataset: ImageFolderDataset,
    resolution: int,
    cands: Candidates,
    batch_size: int = 64,
    crop_fraction: float = 0.875,
) -> Scores:
    """Every candidate on every image of ``dataset`` (with the probe candidate's features)."""
    model.eval()
    saved = dataset.transform
    dataset.transform = EvalTransform(resolution, crop_fraction)
    device = next(model.parameters()).device
    correct, prob, feats = [], [], []
    probe = cands.scales[cands.probe]
    batch_size = tree_batch_size(model, resolution, cands.scales, batch_size, device)
    try:
        for x, y in DataLoader(dataset, batch_size=batch_size):
            x, y = normalize_batch(x.to(device)), y.to(device)
            # Every candidate as one prefix tree (shared stages once); the probe's features for the router.
            features = forward_configurations(
                model, x, resolution, cands.scales, bn_policy="interpolate", features=True
            )
            c_row, p_row = [], []
            for sc in cands.scales:
                p = model.forward_head(features[sc]).softmax(1)
                c_row.append(p.argmax(1) == y)
                p_row.append(p.gather(1, y[:, None])[:, 0])
            feats.append(features[probe].cpu())
            correct.append(torch.stack(c_row, 1).cpu())
            prob.append(torch.stack(p_row, 1).cpu())
    finally:
        dataset.transform = saved
    return Scores(torch.cat(correct), torch.cat(prob), torch.cat(feats))


def compare_adapt_nas(cands: Candidates, train: Scores, val: Scores, epochs: int = 30) -> dict[str, Any]:
    """Train the router on ``train``'s labels and compare on ``val``: Adapt vs the best single configuration
    (chosen on the labelled training images, as Resizable-NAS would) vs the oracle. Both score sets must come
    from the same candidates, in the same order, with the same probe."""
    router = train_router(train.features, best_config_labels(train.correct, train.prob), len(cands.scales), epochs)
    chosen = route(router, val.features)
    macs = torch.tensor(cands.macs, dtype=torch.float64)
    nas = int(train.correct.float().mean(0).argmax())
    acc = val.correct.float()
    return {
        "candidates": len(cands.scales),
        "probe_scales": list(cands.scales[cands.probe]),
        "probe_macs": cands.macs[cands.probe],
        "train_images": len(train.correct),
        "val_images": len(val.correct),
        "adapt": {
            "top1": 100 * float(acc[torch.arange(len(chosen)), chosen].mean()),
            "mean_macs": float(macs[chosen].mean()),
            "max_macs": float(macs[chosen].max()),
            "configs_used": int(chosen.unique().numel()),
        },
        "nas": {"scales": list(cands.scales[nas]), "top1": 100 * float(acc[:, nas].mean()), "macs": cands.macs[nas]},
        "oracle_top1": 100 * float(acc.max(1).values.mean()),
        "router": router,
        "chosen_macs": macs[chosen],
    }


def adapt_report(
    model: AdaptiveModel,
    train_subset: ImageFolderDataset,
    val: ImageFolderDataset,
    resolution: int,
    configs: list[tuple[float, ...]],
    max_macs: float,
    epochs: int = 30,
    batch_size: int = 256,
) -> dict[str, Any]:
    """Candidates within ``max_macs``, scored on ``train_subset`` (labels) and ``val``, then ``compare_adapt_nas``."""
    cands = candidates_within(model, resolution, configs, max_macs)
    train, held_out = (score_candidates(model, ds, resolution, cands, batch_size) for ds in (train_subset, val))
    return {"budget_macs": max_macs, **compare_adapt_nas(cands, train, held_out, epochs)}
