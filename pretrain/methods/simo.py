"""SiMo (EqCo paper, section 3): MoCo v2 without the memory bank, K negatives per query drawn from
the other keys of the global batch."""

from __future__ import annotations

from typing import Dict

import torch
from detectron2.utils import comm

from pretrain.losses import pairwise_logits, sample_batch_negatives, shared_negative_positions
from pretrain.methods.base import (
    METHOD_REGISTRY,
    ContrastiveMethod,
    broadcast_from_main,
    concat_all_gather,
)


@METHOD_REGISTRY.register()
class SiMo(ContrastiveMethod):
    """SiMo (EqCo paper, section 3): MoCo v2 without the memory bank.

    The positive and K negatives of every query are keys of the current global batch (gathered
    from all processes); the negatives never include the query's own key. EqCo's alpha keeps the
    loss calibrated for small K. Loss on the query side only unless ``symmetric``.
    """

    def __init__(self, *args, num_negatives: int = 16, shared_negatives: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.k = num_negatives
        self.shared_negatives = shared_negatives

    @classmethod
    def from_config(cls, cfg) -> Dict[str, object]:
        return {
            "momentum": cfg.MODEL.MOMENTUM,
            "num_negatives": cfg.LOSS.NUM_NEGATIVES,
            "shared_negatives": cfg.LOSS.SHARED_NEGATIVES,
        }

    @classmethod
    def num_negatives(cls, cfg) -> int:
        return cfg.LOSS.NUM_NEGATIVES

    def pair_loss(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        k_all = concat_all_gather(k)
        first = comm.get_rank() * q.shape[0]
        positions = None
        if self.shared_negatives:  # one draw for every query of every process: process 0's
            positions = shared_negative_positions(k_all.shape[0], self.k, self.generator)
            positions = broadcast_from_main(positions.to(q.device))
        # the draw of the whole global batch (same CPU generator state everywhere), selected for
        # this rank's rows only: identical negatives to a single process holding the global batch
        idx = sample_batch_negatives(
            k_all.shape[0],
            self.k,
            generator=self.generator,
            shared=self.shared_negatives,
            device=q.device,
            rows=slice(first, first + q.shape[0]),
            positions=positions,
        )
        pos, neg = pairwise_logits(q, k, k_all[idx])
        return self.contrast(pos, neg)
