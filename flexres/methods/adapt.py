"""Resizable-Adapt's router (Resizable Neural Networks, sec. 3.3), the trainable part of the method: a small classifier
on a probe pass's last-stage features that picks a scaling configuration per image, and its training on labels that
name, per image, the cheapest-to-get-right candidate (flexres.analysis.adapt scores the candidates and reports)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ConfigRouter(nn.Module):
    """Three conv layers and pooling on last-stage features -> logits over the candidate configurations."""

    def __init__(self, in_channels: int, num_configs: int, hidden: int = 64) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for c in (in_channels, hidden, hidden):
            layers += [nn.Conv2d(c, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(hidden, num_configs)

    def forward(self, features: Tensor) -> Tensor:
        return self.head(F.adaptive_avg_pool2d(self.body(features), 1).flatten(1))


def best_config_labels(correct: Tensor, prob: Tensor) -> Tensor:
    """Per image: the candidate that is right with the highest true-class probability (else the most probable)."""
    return (correct.float() * 2.0 + prob).argmax(1)


def train_router(
    features: Tensor,
    targets: Tensor,
    num_configs: int,
    epochs: int = 30,
    lr: float = 1e-3,
    batch_size: int = 128,
    seed: int = 0,
) -> ConfigRouter:
    torch.manual_seed(seed)
    router = ConfigRouter(features.shape[1], num_configs)
    opt = torch.optim.AdamW(router.parameters(), lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(targets), generator=gen)
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            if len(idx) < 2:
                continue
            loss = F.cross_entropy(router(features[idx]), targets[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return router.eval()


@torch.no_grad()
def route(router: ConfigRouter, features: Tensor) -> Tensor:
    return router(features).argmax(1)
