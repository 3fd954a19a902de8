"""The pretraining learning-rate schedule: linear warm-up, then cosine decay (fvcore schedulers,
applied per iteration by detectron2's ``LRScheduler`` hook)."""

from __future__ import annotations

from fvcore.common.param_scheduler import CosineParamScheduler, ParamScheduler
from detectron2.solver.lr_scheduler import WarmupParamScheduler

__all__ = ["build_lr_multiplier", "warmup_iterations"]


def build_lr_multiplier(
    max_iter: int, warmup_iters: int, warmup_factor: float = 0.001, cosine_end: float = 0.0
) -> ParamScheduler:
    """Linear warm-up over ``warmup_iters`` then cosine decay to ``cosine_end`` at ``max_iter``
    (fvcore schedulers, a multiplier of the base lr; detectron2's ``LRScheduler`` hook applies it).
    """
    cosine = CosineParamScheduler(1.0, cosine_end)
    if warmup_iters <= 0:
        return cosine
    return WarmupParamScheduler(cosine, warmup_factor, min(warmup_iters / max_iter, 1.0))


def warmup_iterations(cfg, iters_per_epoch: int) -> int:
    """``SOLVER.WARMUP_ITERS`` if set (> 0), else ``SOLVER.WARMUP_EPOCHS`` epochs in iterations."""
    if cfg.SOLVER.WARMUP_ITERS > 0:
        return int(cfg.SOLVER.WARMUP_ITERS)
    return int(round(cfg.SOLVER.WARMUP_EPOCHS * iters_per_epoch))
