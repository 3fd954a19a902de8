"""What the linear eval trains: :class:`LinearClassifier`, the frozen backbone (always in eval
mode) + the fc, with the cross-entropy of a loader batch; detectron2's ``SimpleTrainer`` (or
``DeviceAMPTrainer`` with SOLVER.AMP) trains it as it is (:class:`pretrain.engine.TrainingRun`).

Only the fc (``net.fc``) is trained and, with more than one process, wrapped in DDP; the backbone
runs under ``torch.no_grad`` and in eval mode, so BatchNorm uses and keeps its running statistics
(docs/methods.md, "Linear evaluation"). With SOLVER.AMP the backbone runs under the trainer's
autocast (:func:`pretrain.engine.amp_dtype`; :func:`pretrain.engine.autocast_to` for the
evaluation passes) and its features are cast to float32: the fc, its gradients and the loss are
always float32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from pretrain.models import backbone_features

__all__ = ["LinearClassifier"]


class LinearClassifier(nn.Module):
    """Frozen backbone + linear head; ``forward((inputs, labels)) -> {"loss_cls": CE}``.

    ``inputs`` are images, or features when ``from_features`` (cached mode). The backbone is in
    eval mode whatever ``train()`` is called with: BN statistics are never updated (the classic
    linear-eval bug). ``head`` is ``net.fc``, wrapped in DDP with more than one process.
    ``channels_last``: the images enter the backbone in NHWC (convert ``net`` too). Under an
    autocast (the AMP trainer's) only the backbone is autocast: its features are cast to float32
    and the head and the loss run with autocast off, so the logits and the fc's gradients are
    float32.
    """

    def __init__(
        self,
        net: torchvision.models.ResNet,
        head: nn.Module,
        from_features: bool,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.net = net
        self.head = head
        self.from_features = from_features
        self.channels_last = channels_last

    def train(self, mode: bool = True) -> LinearClassifier:
        super().train(mode)
        self.net.eval()
        return self

    def features(self, inputs: torch.Tensor) -> torch.Tensor:
        """float32 features of ``inputs`` (the backbone under the caller's autocast, if any)."""
        if self.from_features:
            return inputs.float()
        if self.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            return backbone_features(self.net, inputs).float()

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``batch`` = ``(inputs, labels)`` from the loader, moved to the fc's device here."""
        device = self.net.fc.weight.device
        inputs, labels = (t.to(device, non_blocking=True) for t in batch)
        features = self.features(inputs)
        with torch.autocast(device.type, enabled=False):
            logits = self.head(features)
            return {"loss_cls": F.cross_entropy(logits, labels)}
