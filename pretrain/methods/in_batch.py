"""The methods whose negatives are all other keys of the batch: SimCLR (DCL / DCLW with those
losses), SimMoCo and SimCo (dual temperature)."""

from __future__ import annotations

from typing import Dict

import torch
from detectron2.utils import comm

from pretrain.methods.base import (
    METHOD_REGISTRY,
    ContrastiveMethod,
    concat_all_gather,
    concat_all_gather_with_grad,
    in_batch_logits,
)


@METHOD_REGISTRY.register()
class SimCLR(ContrastiveMethod):
    """SimCLR-style symmetric in-batch method (one encoder, no momentum): each of the 2N views is
    an anchor whose positive is the other view of its image and whose 2N - 2 negatives are all
    other views of the global batch. With ``LOSS.NAME dcl`` / ``dclw`` this is DCL / DCLW."""

    @classmethod
    def from_config(cls, cfg) -> Dict[str, object]:
        return {"momentum": None}

    @classmethod
    def num_negatives(cls, cfg) -> int:
        return 2 * cfg.SOLVER.IMS_PER_BATCH - 2

    def losses(self, im_q: torch.Tensor, im_k: torch.Tensor) -> Dict[str, torch.Tensor]:
        self._top1 = []
        z = torch.cat([self.embed_q(im_q), self.embed_q(im_k)])  # [2n, d]: view 1, then view 2
        n, rank = im_q.shape[0], comm.get_rank()
        z_all = concat_all_gather_with_grad(z)  # [W * 2n], rank blocks of (view 1, view 2)
        # global column of every local anchor and of its positive (the other view of its image)
        local = torch.arange(2 * n, device=z.device)
        self_col = rank * 2 * n + local
        pos_col = rank * 2 * n + (local + n) % (2 * n)
        pos, neg = in_batch_logits(z, z_all, pos_col, exclude=self_col)
        loss = self.contrast(pos, neg)  # the 2n anchors: the top-1 covers both halves
        self.record_stats(z[:n], z[n:])
        return {"loss": loss}


@METHOD_REGISTRY.register()
class SimMoCo(ContrastiveMethod):
    """SimMoCo (Zhang et al. 2022): momentum encoder (m = 0.99), no queue; each query's negatives
    are the N - 1 other keys of the global batch, or with ``local_negatives`` (the official
    script's behaviour, ``LOSS.LOCAL_NEGATIVES``) the n - 1 other keys of this process's batch;
    dual-temperature loss."""

    def __init__(self, *args, local_negatives: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.local_negatives = local_negatives

    @classmethod
    def from_config(cls, cfg) -> Dict[str, object]:
        return {"momentum": cfg.MODEL.MOMENTUM, "local_negatives": cfg.LOSS.LOCAL_NEGATIVES}

    @classmethod
    def num_negatives(cls, cfg) -> int:
        return cfg.SOLVER.IMS_PER_BATCH - 1

    def gather_keys(self, k: torch.Tensor) -> torch.Tensor:
        return concat_all_gather(k)

    def pair_loss(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        if self.local_negatives or comm.get_world_size() == 1:
            keys, first = k, 0
        else:
            keys, first = self.gather_keys(k), comm.get_rank() * q.shape[0]
        own = first + torch.arange(q.shape[0], device=q.device)
        pos, neg = in_batch_logits(q, keys, own)
        return self.contrast(pos, neg)


@METHOD_REGISTRY.register()
class SimCo(SimMoCo):
    """SimCo (Zhang et al. 2022): SimMoCo without the momentum encoder; the keys come from the same
    encoder and carry gradients (gathered differentiably)."""

    @classmethod
    def from_config(cls, cfg) -> Dict[str, object]:
        return {"momentum": None, "local_negatives": cfg.LOSS.LOCAL_NEGATIVES}

    def losses(self, im_q: torch.Tensor, im_k: torch.Tensor) -> Dict[str, torch.Tensor]:
        self._top1 = []
        z1, z2 = self.embed_q(im_q), self.embed_q(im_k)
        loss = self.pair_loss(z1, z2)
        if self.symmetric:
            loss = 0.5 * (loss + self.pair_loss(z2, z1))
        self.record_stats(z1, z2)
        return {"loss": loss}

    def gather_keys(self, k: torch.Tensor) -> torch.Tensor:
        return concat_all_gather_with_grad(k)
