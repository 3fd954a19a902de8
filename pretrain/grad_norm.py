"""The gradient norm of the loss w.r.t. the query embeddings (EqCo's Theorem 2): the hook that
logs it as ``grad_norm_q`` when TEST.GRAD_NORM is on, and the reader of the logged values.

EqCo (docs/methods.md, "Losses"): with alpha fixed, the expected norm of the loss gradient w.r.t.
a query does not depend on the number K of negatives; with InfoNCE (alpha = K) it does.
:class:`QueryGradNormHook` measures it during pretraining, every LOG_PERIOD and at the last
iteration, into ``metrics.json``; :func:`read_grad_norms` reads the values back.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist
from detectron2.engine import HookBase
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage

from pretrain.io import read_metrics

__all__ = ["GRAD_NORM_KEY", "QueryGradNormHook", "query_grad_norm", "read_grad_norms"]

logger = logging.getLogger(__name__)

# the metrics.json key of the measurement
GRAD_NORM_KEY = "grad_norm_q"


class QueryGradNormHook(HookBase):
    """Logs ``grad_norm_q``: the mean over queries of ``|| d l_i / d q_i ||_2``, the gradient of
    query i's own loss term ``l_i`` (the training loss is ``L = mean_i l_i``, so this is
    ``n * || dL / dq_i ||``, independent of the batch size) w.r.t. its L2-normalised embedding
    ``q_i = z_i / ||z_i||``. EqCo's Theorem 2: with alpha fixed its expectation does not depend
    on K; with InfoNCE it does.

    Uses only the method's public parts, no engine change: a forward hook on ``model.encoder_q``
    (the projection ``z``) and a wrapper around ``model.loss_fn`` (``(pos, neg, tau)``, where
    ``pos = q . k+`` and ``neg_j = q . k_j``). Because the loss depends on q only through those
    dot products, ``g = dL/dq = c+ k+ + sum_j c_j k_j`` with ``c = dL/d(pos, neg)``, and

    * its radial part is ``q . g = c+ pos + sum_j c_j neg_j`` (from the loss wrapper),
    * its tangential part is ``||z|| dL/dz`` (``dL/dz = (I - q q^T) g / ||z||``, from the
      forward hook),

    so ``||g||^2 = ||z||^2 ||dL/dz||^2 + (q . g)^2`` exactly (a test compares it with autograd on
    q). Measured every ``period`` iterations and at the last one (tensor hooks on those steps
    only: no GPU synchronisation on the others), averaged over processes, and written to the
    event storage in ``after_backward``, before the step's ``PeriodicWriter``, so it lands in
    ``metrics.json`` next to ``loss``. Register it on every process (the average is a
    collective). Methods whose loss is not one call per ``encoder_q`` output (SimCLR's
    concatenated views) are skipped with a warning.
    """

    def __init__(self, model: torch.nn.Module, period: int) -> None:
        self.model = model
        self.period = int(period)
        self._records: List[Dict[str, torch.Tensor]] = []
        self._active = False
        self._warned = False
        self._handle = None
        self._inner_loss: Optional[Callable[..., torch.Tensor]] = None

    # -- installation ------------------------------------------------------------------------

    def before_train(self) -> None:
        self._handle = self.model.encoder_q.register_forward_hook(self._on_projection)
        self._inner_loss = self.model.loss_fn
        self.model.loss_fn = self._loss_probe

    def after_train(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self._inner_loss is not None:
            self.model.loss_fn = self._inner_loss
            self._inner_loss = None

    # -- per step ----------------------------------------------------------------------------

    def before_step(self) -> None:
        it = self.trainer.iter
        self._active = (it + 1) % self.period == 0 or it == self.trainer.max_iter - 1
        self._records = []

    def _on_projection(self, module: torch.nn.Module, inputs: Any, z: torch.Tensor) -> None:
        if not (self._active and torch.is_tensor(z) and z.requires_grad):
            return
        record: Dict[str, torch.Tensor] = {"z": z.detach()}

        def keep(grad: torch.Tensor) -> None:
            record["dz"] = grad.detach()

        z.register_hook(keep)
        self._records.append(record)

    def _loss_probe(
        self, pos: torch.Tensor, neg: torch.Tensor, *args: Any, **kw: Any
    ) -> torch.Tensor:
        assert self._inner_loss is not None
        if self._active and pos.requires_grad and neg.requires_grad:
            pending = [r for r in self._records if "pos" not in r]
            if pending:
                record = pending[0]
                record["pos"], record["neg"] = pos.detach(), neg.detach()

                def keep_pos(grad: torch.Tensor) -> None:
                    record["dpos"] = grad.detach()

                def keep_neg(grad: torch.Tensor) -> None:
                    record["dneg"] = grad.detach()

                pos.register_hook(keep_pos)
                neg.register_hook(keep_neg)
        return self._inner_loss(pos, neg, *args, **kw)

    def after_backward(self) -> None:
        if not self._active:
            return
        norms = [query_grad_norm(r) for r in self._records if _complete(r)]
        value = torch.stack(norms).mean() if norms else None
        if value is None and not self._warned:
            logger.warning(
                "grad_norm_q is not logged: this method's loss is not one call per query batch."
            )
            self._warned = True
        if comm.get_world_size() > 1:
            # every process takes part (same iterations) even if it has nothing to report
            device = self._records[0]["z"].device if self._records else torch.device("cpu")
            buf = torch.zeros(2, dtype=torch.float64, device=device)
            if value is not None:
                buf[0], buf[1] = value.double(), 1.0
            if dist.get_backend() == "nccl" and buf.device.type != "cuda":
                buf = buf.cuda()
            dist.all_reduce(buf)
            value = buf[0] / buf[1] if buf[1] > 0 else None
        if value is not None:
            get_event_storage().put_scalar(GRAD_NORM_KEY, float(value), smoothing_hint=False)
        self._records = []


def _complete(record: Dict[str, torch.Tensor]) -> bool:
    need = ("z", "dz", "pos", "neg", "dpos", "dneg")
    return all(k in record for k in need) and record["z"].shape[0] == record["pos"].shape[0]


def query_grad_norm(record: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over queries of ``||d l_i / d q_i||`` from the captured tensors (see
    :class:`QueryGradNormHook`): ``n^2 (||z||^2 ||dL/dz||^2 + (c+ pos + sum_j c_j neg_j)^2)``."""
    z, dz = record["z"].float(), record["dz"].float()
    n = z.shape[0]
    tangential_sq = z.pow(2).sum(1) * dz.pow(2).sum(1)
    radial = record["dpos"].float() * record["pos"].float() + (
        record["dneg"].float() * record["neg"].float()
    ).sum(1)
    return (n * (tangential_sq + radial.pow(2)).sqrt()).mean()


def read_grad_norms(metrics_path: str) -> List[float]:
    """The logged ``grad_norm_q`` values of a run's ``metrics.json``, in iteration order, one per
    iteration (:func:`pretrain.io.read_metrics`: a resumed run's repeated iteration keeps its last
    value; a missing file gives ``[]``)."""
    return [value for _, value in read_metrics(metrics_path).get(GRAD_NORM_KEY, [])]
