"""Linear evaluation of a frozen backbone (MoCo protocol; docs/methods.md, "Linear evaluation").

A supervised loop on top of the pretraining engine's pieces (launch, checkpointing, writers):

* the backbone (a torchvision ResNet loaded from MODEL.WEIGHTS) is frozen: ``requires_grad``
  False, features computed under ``torch.no_grad`` and **always in eval mode**, so BatchNorm uses
  and keeps its running statistics (:class:`LinearClassifier` overrides ``train()``);
* features are the global-average-pooled output of ``layer4`` (2048-d for R50, 512-d for R18);
  one ``nn.Linear`` (weights N(0, 0.01^2), bias 0, as MoCo's ``main_lincls.py``) is trained with
  cross-entropy, SGD momentum 0.9, lr 30 (not scaled with the batch size, as MoCo), wd 0,
  batch 256, 100 epochs, lr x0.1 at epochs 60 and 80. Only the fc is wrapped in DDP;
* ``MODEL.HEAD_BN`` (the demo's ``shapes_cpu.yaml``, ``r50_100ep_bn.yaml``; not MoCo's protocol):
  a BatchNorm without affine parameters before the fc, as MAE's linear probe, with lr 0.1 x
  batch / 256 (``SOLVER.REFERENCE_BATCH``); folded into the fc of ``model_final.pth``;
* train images: RandomResizedCrop + flip; val: Resize + CenterCrop; top-1 / top-5 on the val
  split at the end (and every ``TEST.EVAL_PERIOD_EPOCHS``);
* next to it, the weighted kNN top-1 of the frozen backbone (``TEST.KNN``, :func:`knn_accuracy`):
  val against train, both through the eval transform, cosine similarity, ``exp(s / TEST.KNN_T)``
  vote of the ``TEST.KNN_K`` nearest. The image protocol pays one extra extraction pass for it;
* and its instance-retrieval top-1 (``TEST.RETRIEVAL_SIZE`` > 0): two augmented views of evenly
  spaced val images, the same views as the pretraining's monitor and for every backbone
  (:func:`pretrain.health.instance_retrieval_top1`);
* at the end every backbone tensor is compared with MODEL.WEIGHTS (MoCo's sanity check);
  a difference raises :class:`BackboneChangedError`;
* ``SOLVER.AMP`` / ``MODEL.CHANNELS_LAST`` (GPU settings, on in the R50 configs): the frozen
  backbone runs under bf16 (or fp16) autocast in NHWC, in training and in the val / cached / kNN
  feature passes; the fc, its gradients and the loss stay float32.

``CACHED_FEATURES True`` (``--cached-features``) extracts the features of the train and val
splits once (center crops, i.e. *no augmentation*: **not the paper protocol**) and trains the same
fc with the same schedule on them: much faster, for demos and sweeps.

Outputs in OUTPUT_DIR follow docs/formats.md: ``config.yaml``, ``log.txt``, ``metrics.json``,
tensorboard events, ``model_*.pth`` / ``model_final.pth`` (a torchvision ResNet state dict with
the trained fc and ``meta.kind == "lincls"``, which tools/convert.py accepts) and ``results.json``.

One job per module:

* :mod:`~pretrain.lincls.config` -- the config keys, their defaults, loading and validation;
* :mod:`~pretrain.lincls.weights` -- MODEL.WEIGHTS read and checked, the frozen model, the sanity
  check;
* :mod:`~pretrain.lincls.data` -- the two image folders, per-process batches, cached features
  (extracted by :func:`pretrain.features.extract_features`, re-exported here);
* :mod:`~pretrain.lincls.metrics` -- top-1 / top-5 of the fc, kNN and retrieval top-1 of the
  backbone;
* :mod:`~pretrain.lincls.model` -- :class:`LinearClassifier` (frozen backbone + fc, the loss) and
  :class:`BatchNormLinear` (the fc with MODEL.HEAD_BN, and its folding);
* :mod:`~pretrain.lincls.evaluator` -- :class:`LinearEvaluator` (one run: train, evaluate, save);
* :mod:`~pretrain.lincls.api` -- :func:`run_linear_eval` and :func:`evaluate_weights`
  (``--eval-only``).
"""
from pretrain.features import extract_features
from pretrain.lincls.api import evaluate_weights, run_linear_eval
from pretrain.lincls.config import (
    add_lincls_config,
    get_lincls_cfg,
    lincls_lr,
    load_lincls_cfg,
    validate_lincls_cfg,
)
from pretrain.lincls.data import CachedFeatures, FeatureDataset
from pretrain.lincls.evaluator import LinearEvaluator
from pretrain.lincls.metrics import knn_accuracy, topk_correct
from pretrain.lincls.model import BatchNormLinear, LinearClassifier, fold_head_bn
from pretrain.lincls.weights import (
    BackboneChangedError,
    PretrainedWeights,
    build_linear_model,
    check_backbone_unchanged,
    load_pretrained,
)

__all__ = [
    "BackboneChangedError",
    "BatchNormLinear",
    "CachedFeatures",
    "FeatureDataset",
    "LinearClassifier",
    "LinearEvaluator",
    "PretrainedWeights",
    "add_lincls_config",
    "build_linear_model",
    "check_backbone_unchanged",
    "evaluate_weights",
    "extract_features",
    "fold_head_bn",
    "get_lincls_cfg",
    "knn_accuracy",
    "lincls_lr",
    "load_lincls_cfg",
    "load_pretrained",
    "run_linear_eval",
    "topk_correct",
    "validate_lincls_cfg",
]
