"""The contrastive methods, one short class each, registered in :data:`METHOD_REGISTRY` under
their lower-case class name (``MODEL.METHOD``): SiMo (default), MoCo v2, SimCLR, SimMoCo, SimCo.

Each is an ``nn.Module`` whose ``forward(batch)`` takes the loader's batch ``((im_q, im_k),
labels)`` and returns ``{"loss": scalar}`` for this process's share of the global batch, so
detectron2's ``SimpleTrainer`` / ``AMPTrainer`` train it as they are. With DDP averaging the
gradients over processes, the update equals that of one process holding the whole global batch
(tested in test_distributed.py). Each class declares the config keys it reads
(``from_config``) and its number of negatives per query. Losses come from
:mod:`pretrain.losses` by name (``LOSS.NAME``), so any method can be combined with any loss.

Every forward also leaves detached per-step health values in ``method.stats`` (contrastive top-1,
alignment, uniformity, embedding std; :mod:`pretrain.health`), computed without autograd from the
logits and embeddings the loss already uses. They are not in the returned dict, which the trainer
sums into the loss.
"""


from pretrain.methods.base import (
    METHOD_REGISTRY,
    ContrastiveMethod,
    concat_all_gather,
    concat_all_gather_with_grad,
    in_batch_logits,
    method_class,
    method_names,
)
from pretrain.methods.build import build_loss_fn, build_method
from pretrain.methods.in_batch import SimCLR, SimCo, SimMoCo
from pretrain.methods.moco import MoCoV2
from pretrain.methods.simo import SiMo

__all__ = [
    "METHOD_REGISTRY",
    "method_names",
    "method_class",
    "concat_all_gather",
    "concat_all_gather_with_grad",
    "in_batch_logits",
    "ContrastiveMethod",
    "SiMo",
    "MoCoV2",
    "SimCLR",
    "SimMoCo",
    "SimCo",
    "build_method",
    "build_loss_fn",
]
