"""What the linear eval trains and how one step goes: :class:`LinearClassifier` (frozen backbone
always in eval mode + the fc, cross-entropy) and :class:`LinearTrainer` (detectron2's
``SimpleTrainer`` step on ``(inputs, labels)`` batches, stopping on a non-finite loss).

Only the fc (``net.fc``) is trained and, with more than one process, wrapped in DDP; the backbone
runs under ``torch.no_grad`` and in eval mode, so BatchNorm uses and keeps its running statistics
(docs/methods.md, "Linear evaluation").
"""
from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from detectron2.engine import SimpleTrainer
from torch import nn

from pretrain.engine import check_finite
from pretrain.models import backbone_features

__all__ = ["LinearClassifier", "LinearTrainer"]


class LinearClassifier(nn.Module):
    """Frozen backbone + linear head; ``forward(inputs, labels) -> {"loss_cls": CE}``.

    ``inputs`` are images, or features when ``from_features`` (cached mode). The backbone is in
    eval mode whatever ``train()`` is called with: BN statistics are never updated (the classic
    linear-eval bug). ``head`` is ``net.fc``, wrapped in DDP with more than one process.
    """

    def __init__(
        self, net: torchvision.models.ResNet, head: nn.Module, from_features: bool
    ) -> None:
        super().__init__()
        self.net = net
        self.head = head
        self.from_features = from_features

    def train(self, mode: bool = True) -> LinearClassifier:
        super().train(mode)
        self.net.eval()
        return self

    def features(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.from_features:
            return inputs
        with torch.no_grad():
            return backbone_features(self.net, inputs)

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.head(self.features(inputs))
        return {"loss_cls": F.cross_entropy(logits, labels)}


class LinearTrainer(SimpleTrainer):
    """detectron2 ``SimpleTrainer`` whose step feeds ``(inputs, labels)`` to a
    :class:`LinearClassifier` and stops on a NaN/inf loss before the update."""

    def __init__(
        self,
        model: LinearClassifier,
        data_loader: Any,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
    ) -> None:
        super().__init__(model, data_loader, optimizer)
        self.device = device

    def run_step(self) -> None:
        assert self.model.training, "model was switched to eval mode"
        start = time.perf_counter()
        inputs, labels = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        inputs = inputs.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        loss_dict = self.model(inputs, labels)
        check_finite(loss_dict, self.iter)
        self.optimizer.zero_grad(set_to_none=True)
        sum(loss_dict.values()).backward()
        self.after_backward()
        SimpleTrainer.write_metrics(loss_dict, data_time, self.iter)
        self.optimizer.step()

