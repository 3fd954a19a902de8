"""MoCo v2 (Chen et al. 2020): negatives from a FIFO queue of past keys, shuffling BN."""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F
from detectron2.utils import comm

from pretrain.losses import pairwise_logits
from pretrain.methods.base import (
    METHOD_REGISTRY,
    ContrastiveMethod,
    broadcast_from_main,
    concat_all_gather,
)


@METHOD_REGISTRY.register()
class MoCoV2(ContrastiveMethod):
    """MoCo v2 (Chen et al. 2020): negatives from a FIFO queue of past keys; shuffling BN."""

    def __init__(
        self, *args, dim: int = 128, queue_size: int = 65536, shuffle_bn: bool = True, **kw
    ):
        super().__init__(*args, **kw)
        self.shuffle_bn = shuffle_bn
        g = torch.Generator().manual_seed(int(self.generator.initial_seed()) + 1)
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim, generator=g), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self._ptr = 0  # host copy of queue_ptr, so that enqueueing never reads the device

    @classmethod
    def from_config(cls, cfg) -> Dict[str, object]:
        return {
            "momentum": cfg.MODEL.MOMENTUM,
            "dim": cfg.MODEL.DIM,
            "queue_size": cfg.LOSS.QUEUE_SIZE,
            "shuffle_bn": cfg.MODEL.SHUFFLE_BN,
        }

    @classmethod
    def num_negatives(cls, cfg) -> int:
        return cfg.LOSS.QUEUE_SIZE

    @torch.no_grad()
    def embed_k(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.shuffle_bn and comm.get_world_size() > 1):
            return super().embed_k(x)
        # shuffling BN: keys are computed on a random permutation of the global batch, so the BN
        # statistics of a process do not come from the same images as its queries'
        n, rank = x.shape[0], comm.get_rank()
        x_all = concat_all_gather(x)
        perm = torch.randperm(x_all.shape[0], generator=self.generator).to(x.device)
        perm = broadcast_from_main(perm)  # every process must un-shuffle the same permutation
        k_perm = concat_all_gather(super().embed_k(x_all[perm[rank * n : (rank + 1) * n]]))
        k_all = torch.empty_like(k_perm)
        k_all[perm] = k_perm
        return k_all[rank * n : (rank + 1) * n]

    def pair_loss(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        # the queue as it was before this step: with LOSS.SYMMETRIC both halves see the same one,
        # and neither half's own keys are in it
        pos, neg = pairwise_logits(q, k, self.queue.clone().detach())
        return self.contrast(pos, neg)

    @torch.no_grad()
    def after_loss(self, k: torch.Tensor) -> None:
        """Enqueue the global batch's view-2 keys, once per step (N keys, also when symmetric).

        The queue is a ring of any length K: the keys are written from the pointer on and wrap
        around its end; a queue shorter than the batch (K < N, e.g. the K-sweep's K = 4) keeps
        the batch's last K keys, so the next step's K negatives are the K newest keys."""
        keys = concat_all_gather(k)
        size, ptr = self.queue.shape[0], self._ptr
        if keys.shape[0] >= size:
            keys, ptr = keys[-size:], 0
        n = keys.shape[0]
        first = min(n, size - ptr)
        self.queue[ptr : ptr + first] = keys[:first]
        if first < n:
            self.queue[: n - first] = keys[first:]
        self._ptr = (ptr + n) % size
        self.queue_ptr.fill_(self._ptr)  # the checkpointed copy, written without a host read

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._ptr = int(self.queue_ptr)  # restored from a checkpoint (at set-up, not in a step)
