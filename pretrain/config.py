"""The pretraining config: one detectron2-style ``CfgNode`` with a comment on every key.

``get_pretrain_cfg()`` returns the defaults (= the paper's SiMo recipe, docs/methods.md,
"Recipes"); ``load_pretrain_cfg(file, opts)`` merges a YAML file
(with its ``_BASE_`` chain) and ``KEY VALUE`` overrides and validates the result, turning every
mistake into a one-sentence :class:`UserError` before any heavy work starts.
``add_run_config`` and ``add_datasets_config`` add the keys that linear evaluation
(:mod:`pretrain.lincls`) shares.
"""

from __future__ import annotations

import os
from typing import List, Optional

from detectron2.config import CfgNode as _D2CfgNode
from fvcore.common.config import CfgNode as _FvCfgNode

from pretrain.io import UserError
from pretrain.losses import LOSSES

__all__ = [
    "PretrainCfgNode",
    "ARCHS",
    "add_pretrain_config",
    "add_datasets_config",
    "add_run_config",
    "check_dataset_split",
    "get_pretrain_cfg",
    "load_pretrain_cfg",
    "merge_config",
    "validate_pretrain_cfg",
    "validate_run_config",
    "effective_lr",
    "REFERENCE_BATCH",
]

ARCHS = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "wide_resnet50_2",
    "wide_resnet101_2",
)
NORMS = ("SyncBN", "BN")
AMP_PRECISIONS = ("bfloat16", "float16")
# MODEL.DEVICE values (pretrain.engine.resolve_device)
DEVICES = ("auto", "cuda", "cpu")
# INPUT.DEVICE_AUGMENT values (pretrain.data.use_device_augment)
DEVICE_AUGMENT_CHOICES = ("auto", "on", "off")
# EqCo rule 2: the learning rate is SOLVER.BASE_LR at this many queries per batch, linear in N.
REFERENCE_BATCH = 256


class PretrainCfgNode(_D2CfgNode):
    """detectron2's ``CfgNode`` (so ``default_setup`` dumps it to ``config.yaml``) with fvcore's
    safe YAML loading and no detectron2 config versioning (our keys are not detectron2's)."""

    def merge_from_file(self, cfg_filename: str, allow_unsafe: bool = False) -> None:
        _FvCfgNode.merge_from_file(self, cfg_filename, allow_unsafe=allow_unsafe)

    def merge_from_other_cfg(self, cfg_other: "PretrainCfgNode") -> None:
        _ints_to_floats(self, cfg_other)
        super().merge_from_other_cfg(cfg_other)

    def merge_from_list(self, cfg_list: list) -> None:
        # yacs refuses an int for a float key ("LOSS.ALPHA 65536"); accept it as the float it means
        decoded = list(cfg_list)
        for i in range(0, len(decoded) - 1, 2):
            value = self._decode_cfg_value(decoded[i + 1])
            if _is_int(value) and isinstance(self._lookup(decoded[i]), float):
                value = float(value)
            decoded[i + 1] = value
        super().merge_from_list(decoded)

    def _lookup(self, full_key: str):
        node = self
        for part in str(full_key).split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _ints_to_floats(defaults: dict, other: dict) -> None:
    """In place: ints in ``other`` become floats where ``defaults`` holds a float."""
    for key, value in other.items():
        target = defaults.get(key) if isinstance(defaults, dict) else None
        if isinstance(value, dict) and isinstance(target, dict):
            _ints_to_floats(target, value)
        elif _is_int(value) and isinstance(target, float):
            other[key] = float(value)


def add_pretrain_config(cfg: PretrainCfgNode) -> None:
    """Add every pretraining key with its default (the SiMo R50 200-epoch recipe)."""
    cfg.MODEL = PretrainCfgNode()
    # simo | mocov2 | simclr | simmoco | simco: a class of pretrain.methods.METHOD_REGISTRY
    cfg.MODEL.METHOD = "simo"
    # auto | cuda | cpu: auto runs on the GPU of each process's local rank when CUDA is usable,
    # else on the CPU; cuda without a usable GPU stops with a sentence (never a silent CPU run)
    cfg.MODEL.DEVICE = "auto"
    # torchvision ResNet: resnet18/34/50/101/152, wide_resnet50_2, wide_resnet101_2
    cfg.MODEL.ARCH = "resnet50"
    # output dimension of the projection head (the contrastive embedding)
    cfg.MODEL.DIM = 128
    # hidden width of the 2-layer MLP head (2048 in SiMo / MoCo v2)
    cfg.MODEL.MLP_HIDDEN = 2048
    # BN after each fc of the head: fc-BN-ReLU-fc-BN (SiMo, SimCLR); False = fc-ReLU-fc (MoCo v2)
    cfg.MODEL.MLP_BN = True
    # EMA momentum m of the key encoder: theta_k <- m theta_k + (1 - m) theta_q (MoCo eq. 2).
    # 0 makes the key encoder a copy of the query encoder (no gradient). Unused by simclr / simco.
    cfg.MODEL.MOMENTUM = 0.999
    # SyncBN: batch statistics over the global batch (detectron2's NaiveSyncBatchNorm, no host
    # synchronisation, on GPUs and CPUs; plain BN in a single process). BN: per-process statistics.
    cfg.MODEL.NORM = "SyncBN"
    # SyncBN within groups of this many consecutive processes (ranks [0, G), [G, 2G), ...; the
    # paper: 8 GPUs x 32 images); the number of processes must be a multiple of it. 0 = over all
    # processes, 1 = per-process statistics
    cfg.MODEL.SYNC_BN_GROUP_SIZE = 0
    # MoCo's shuffling BN for the key encoder (only meaningful with NORM BN and > 1 process)
    cfg.MODEL.SHUFFLE_BN = False
    # zero-init the last BN gamma of every residual branch (each block starts as identity; the
    # released SiMo code: True)
    cfg.MODEL.ZERO_INIT_RESIDUAL = False
    # std of the normal init of the head's fc weights (released SiMo code: 0.01); 0 = PyTorch's
    # default (uniform, kaiming)
    cfg.MODEL.HEAD_INIT_STD = 0.0
    # NHWC memory format (faster convolutions with AMP on recent GPUs)
    cfg.MODEL.CHANNELS_LAST = False
    # wrap the encoders in torch.compile (GPU speed; first iterations are slow while compiling; on
    # the 2-core CPU the demo step ran 0.8x eager speed after a 2-minute compile)
    cfg.MODEL.COMPILE = False

    cfg.LOSS = PretrainCfgNode()
    # a key of pretrain.losses.LOSSES: eqco | infonce | dcl | dclw | dual_temperature
    cfg.LOSS.NAME = "eqco"
    # temperature tau of the logits s/tau
    cfg.LOSS.TAU = 0.2
    # EqCo alpha (rule 1): negatives' logits shifted by log(alpha / K); alpha = K is InfoNCE
    cfg.LOSS.ALPHA = 256.0
    # SiMo: K negatives per query sampled from the other keys of the global batch
    cfg.LOSS.NUM_NEGATIVES = 16
    # SiMo: False = an independent K-subset of the other keys per query (our choice);
    # True = the released code's selection: one draw of K positions per step, shared by every
    # query (and identical on every process), applied to each query's list of other keys.
    # Drawn on the CPU (the same on any device): False costs N x (N - 1) uniform draws per step,
    # 0.4 ms at N = 256, 11 ms at 1024, 290 ms at 4096 (one core); above ~1024 prefer True
    cfg.LOSS.SHARED_NEGATIVES = False
    # simmoco / simco: negatives are the other keys of this process's batch only (True, the
    # official dual-temperature script) or of the global batch (False)
    cfg.LOSS.LOCAL_NEGATIVES = False
    # MoCo v2: length K of the queue of negative keys (any K >= 1: a ring, written N keys a step)
    cfg.LOSS.QUEUE_SIZE = 65536
    # additive margin m of InfoNCE (EqCo eq. 1), used by LOSS.NAME infonce
    cfg.LOSS.MARGIN = 0.0
    # DCLW weighting temperature sigma, used by LOSS.NAME dclw
    cfg.LOSS.SIGMA = 0.5
    # DCLW: treat the weight as a constant (lightly's DCLWLoss) instead of back-propagating
    # through it (the reference implementation; default)
    cfg.LOSS.DCLW_DETACH_WEIGHT = False
    # dual temperature ratio beta = tau_beta / tau_alpha, used by LOSS.NAME dual_temperature
    cfg.LOSS.BETA = 10.0
    # also compute the loss with the two views swapped and average (simclr/simmoco/simco do)
    cfg.LOSS.SYMMETRIC = False

    cfg.SOLVER = PretrainCfgNode()
    # global batch N (queries per step over all processes)
    cfg.SOLVER.IMS_PER_BATCH = 256
    # learning rate at N = 256; the run uses BASE_LR * N / 256 (EqCo rule 2, logged at start)
    cfg.SOLVER.BASE_LR = 0.03
    # length of the run in epochs of DATASETS.TRAIN_SPLIT (ignored if MAX_ITER > 0)
    cfg.SOLVER.EPOCHS = 200
    # length of the run in iterations; > 0 overrides EPOCHS
    cfg.SOLVER.MAX_ITER = 0
    # linear warm-up length in epochs (from WARMUP_FACTOR * lr to lr), then cosine decay
    cfg.SOLVER.WARMUP_EPOCHS = 5.0
    # linear warm-up length in iterations; > 0 overrides WARMUP_EPOCHS (the released SiMo: 10)
    cfg.SOLVER.WARMUP_ITERS = 0
    # learning-rate multiplier at the first warm-up iteration
    cfg.SOLVER.WARMUP_FACTOR = 0.001
    # cosine decay ends at lr * COSINE_END (0 in MoCo v2 / SiMo)
    cfg.SOLVER.COSINE_END = 0.0
    # SGD weight decay (applied to all parameters, as in MoCo)
    cfg.SOLVER.WEIGHT_DECAY = 1e-4
    # SGD momentum
    cfg.SOLVER.MOMENTUM = 0.9
    # save model_{iter:07d}.pth every this many iterations (and model_final.pth at the end)
    cfg.SOLVER.CHECKPOINT_PERIOD = 5000
    # keep only the newest this many periodic checkpoints (0 = keep all)
    cfg.SOLVER.MAX_TO_KEEP = 0
    cfg.SOLVER.AMP = PretrainCfgNode()
    # mixed precision (CUDA only; ignored with a warning on CPU)
    cfg.SOLVER.AMP.ENABLED = False
    # bfloat16 (no loss scaling needed) | float16 (with a GradScaler, saved in checkpoints)
    cfg.SOLVER.AMP.PRECISION = "bfloat16"

    cfg.INPUT = PretrainCfgNode()
    # crop size of the two augmented views (224 for ImageNet)
    cfg.INPUT.SIZE = 224
    # RandomResizedCrop scale range (MoCo v2: 0.2 - 1.0)
    cfg.INPUT.MIN_SCALE = 0.2
    cfg.INPUT.MAX_SCALE = 1.0
    # where colour jitter, grayscale and blur run: "on" = on the model's device (the loader
    # decodes, crops, flips and draws the parameters; pretrain/data/device_augment.py), "off" =
    # in the loader workers (the all-CPU path), "auto" = on when MODEL.DEVICE resolves to CUDA
    cfg.INPUT.DEVICE_AUGMENT = "auto"

    # DATASETS: add_datasets_config; here VAL_SPLIT is read by the kNN monitor only
    # (TEST.KNN_PERIOD > 0)
    add_datasets_config(cfg)

    cfg.TEST = PretrainCfgNode()
    # run the weighted kNN monitor on DATASETS.VAL_SPLIT every this many iterations (0 = never)
    cfg.TEST.KNN_PERIOD = 0
    # neighbours and temperature of the weighted kNN classifier (Wu et al. 2018)
    cfg.TEST.KNN_K = 200
    cfg.TEST.KNN_T = 0.1
    # at each kNN period also measure instance retrieval: two seeded pretraining-augmented views
    # of this many evenly spaced (class-stratified) DATASETS.VAL_SPLIT images, the same views in
    # every run; top-1 (%) of view 1 finding its own image's view 2 among them
    # (pretrain/health.py). 0 = off
    cfg.TEST.RETRIEVAL_SIZE = 256
    # log grad_norm_q, the norm of the loss gradient w.r.t. the query embeddings (EqCo's
    # Theorem 2), every LOG_PERIOD into metrics.json (pretrain/grad_norm.py; not with
    # MODEL.COMPILE)
    cfg.TEST.GRAD_NORM = False

    # DATALOADER, OUTPUT_DIR, NAME, SEED, LOG_PERIOD, CUDNN_BENCHMARK and TF32: add_run_config. Here
    # NAME identifies this pre-training in later stages (meta.name); "" = basename of OUTPUT_DIR.
    # SEED is the base seed (rank r seeds with SEED + r); < 0 picks a random one (no exact resume
    # then).
    add_run_config(cfg, output_dir="output/pretrain/simo_r50_200ep")


def add_run_config(cfg: PretrainCfgNode, output_dir: str) -> None:
    """Add the keys every training stage (pretraining, linear evaluation) shares, with their
    defaults: the DATALOADER group, OUTPUT_DIR (default ``output_dir``), NAME, SEED, LOG_PERIOD
    CUDNN_BENCHMARK and TF32. What NAME and SEED identify and seed is commented at each caller."""
    cfg.DATALOADER = PretrainCfgNode()
    # worker processes per training process (0 = load in the main process)
    cfg.DATALOADER.NUM_WORKERS = 8
    # page-locked host memory for faster host->GPU copies (only used with CUDA)
    cfg.DATALOADER.PIN_MEMORY = True
    # keep workers alive between epochs (saves their start-up at every epoch)
    cfg.DATALOADER.PERSISTENT_WORKERS = True
    # batches prefetched per worker
    cfg.DATALOADER.PREFETCH_FACTOR = 2

    # where config.yaml, log.txt, metrics.json, events, checkpoints and results.json go
    cfg.OUTPUT_DIR = output_dir
    # name of the run or of what it evaluates; "" = derived by the stage (see its config)
    cfg.NAME = ""
    # seeds the run; < 0 picks a random one (no exact resume then)
    cfg.SEED = 0
    # print a progress line (loss, ETA, images/s, ...) every this many iterations
    cfg.LOG_PERIOD = 20
    # cudnn.benchmark (read by detectron2's default_setup)
    cfg.CUDNN_BENCHMARK = True
    # TensorFloat-32 for float32 matmuls and convolutions on Ampere and newer GPUs (~10 bits of
    # mantissa in the products, float32 accumulation; torch's default is TF32 convolutions only).
    # False = full float32 everywhere (e.g. to compare with a CPU run)
    cfg.TF32 = True


def add_datasets_config(cfg: PretrainCfgNode) -> None:
    """Add the DATASETS group every stage on ImageFolder data (pretraining, linear evaluation)
    shares, with its defaults; what reads VAL_SPLIT is commented at each caller."""
    cfg.DATASETS = PretrainCfgNode()
    # ImageFolder root holding <TRAIN_SPLIT>/<class>/*.jpg and <VAL_SPLIT>/<class>/*.jpg
    cfg.DATASETS.ROOT = "datasets/imagenet"
    cfg.DATASETS.TRAIN_SPLIT = "train"
    # the held-out split
    cfg.DATASETS.VAL_SPLIT = "val"


def check_dataset_split(cfg: PretrainCfgNode, key: str, fix: str = "") -> None:
    """DATASETS.ROOT/<DATASETS.key> must be a folder; else one sentence naming the key and
    ``fix`` (default: point DATASETS.ROOT at an ImageFolder root)."""
    path = os.path.join(cfg.DATASETS.ROOT, cfg.DATASETS[key])
    _need(
        os.path.isdir(path),
        f"DATASETS.ROOT/{key} {path} is not a folder; "
        + (
            fix
            or "point DATASETS.ROOT at an ImageFolder root (e.g. datasets/shapes/imagefolder, "
            "made by tools/make_shapes.py)."
        ),
    )


def validate_run_config(cfg: PretrainCfgNode) -> None:
    """Reject invalid values of the :func:`add_run_config` keys and of MODEL.DEVICE, one sentence
    naming the key."""
    _need(
        cfg.MODEL.DEVICE in DEVICES,
        f"MODEL.DEVICE {cfg.MODEL.DEVICE!r} is unknown; choose one of {DEVICES}.",
    )
    _need(cfg.DATALOADER.NUM_WORKERS >= 0, "DATALOADER.NUM_WORKERS must be >= 0.")
    _need(cfg.LOG_PERIOD > 0, "LOG_PERIOD must be > 0.")
    _need(bool(cfg.OUTPUT_DIR), "OUTPUT_DIR must not be empty.")


def get_pretrain_cfg() -> PretrainCfgNode:
    """A fresh config holding the defaults."""
    cfg = PretrainCfgNode()
    add_pretrain_config(cfg)
    return cfg


def effective_lr(cfg: PretrainCfgNode) -> float:
    """EqCo rule 2: ``BASE_LR * IMS_PER_BATCH / 256`` (scaled with the queries N, never with K)."""
    return cfg.SOLVER.BASE_LR * cfg.SOLVER.IMS_PER_BATCH / REFERENCE_BATCH


def _yacs_message(e: Exception, keys_doc: str) -> str:
    msg = str(e.args[0] if e.args else e).strip("'\"")
    if msg.startswith(("Non-existent config key", "Non-existent key")):
        key = msg.split(":", 1)[1].strip()
        return f"unknown config key {key}; check the spelling against {keys_doc}."
    return msg


def merge_config(cfg, config_file: str, opts: Optional[List[str]], keys_doc: str):
    """``cfg`` <- ``config_file`` (with its ``_BASE_`` chain) <- ``KEY VALUE`` overrides.

    Shared by every stage's config loader. A missing file, YAML error, unknown key (``keys_doc``
    says where the keys are documented), type mismatch or odd override list is one
    :class:`UserError` sentence.
    """
    if config_file:
        if not os.path.isfile(config_file):
            raise UserError(f"{config_file}: config file not found; see configs/ for shipped ones.")
        try:
            cfg.merge_from_file(config_file)
        except (KeyError, ValueError, AssertionError, TypeError) as e:
            raise UserError(f"{config_file}: {_yacs_message(e, keys_doc)}") from e
        except Exception as e:  # yaml syntax errors
            raise UserError(f"{config_file}: not a valid YAML config ({e}).") from e
    opts = list(opts or [])
    if len(opts) % 2:
        raise UserError(f"overrides must be KEY VALUE pairs; got an odd number: {' '.join(opts)}")
    try:
        cfg.merge_from_list(opts)
    except (KeyError, ValueError, AssertionError, TypeError) as e:
        raise UserError(f"command-line override: {_yacs_message(e, keys_doc)}") from e
    return cfg


def load_pretrain_cfg(
    config_file: str, opts: Optional[List[str]] = None, check_paths: bool = True
) -> PretrainCfgNode:
    """Defaults <- ``config_file`` (with ``_BASE_``) <- ``KEY VALUE`` overrides, then validated.

    Unknown keys, wrong types, odd override lists and invalid values raise :class:`UserError`.
    """
    cfg = merge_config(get_pretrain_cfg(), config_file, opts, "pretrain/config.py")
    validate_pretrain_cfg(cfg, check_paths=check_paths)
    return cfg


def _need(cond: bool, message: str) -> None:
    if not cond:
        raise UserError(message)


def validate_pretrain_cfg(cfg: PretrainCfgNode, check_paths: bool = True) -> None:
    """Reject values that cannot work, each with one sentence naming the key."""
    m, loss, solver = cfg.MODEL, cfg.LOSS, cfg.SOLVER
    from pretrain.methods import method_names  # the registry is the one list of methods

    methods = method_names()
    _need(m.METHOD in methods, f"MODEL.METHOD {m.METHOD!r} is unknown; choose one of {methods}.")
    _need(m.ARCH in ARCHS, f"MODEL.ARCH {m.ARCH!r} is unknown; choose one of {ARCHS}.")
    _need(m.NORM in NORMS, f"MODEL.NORM {m.NORM!r} is unknown; choose one of {NORMS}.")
    _need(
        m.SYNC_BN_GROUP_SIZE >= 0,
        f"MODEL.SYNC_BN_GROUP_SIZE must be >= 0 (0 = all processes), got {m.SYNC_BN_GROUP_SIZE}.",
    )
    _need(m.DIM > 0 and m.MLP_HIDDEN > 0, "MODEL.DIM and MODEL.MLP_HIDDEN must be positive.")
    _need(m.HEAD_INIT_STD >= 0, "MODEL.HEAD_INIT_STD must be >= 0 (0 = PyTorch's default).")
    _need(0.0 <= m.MOMENTUM < 1.0, f"MODEL.MOMENTUM must be in [0, 1), got {m.MOMENTUM}.")
    _need(
        loss.NAME in LOSSES,
        f"LOSS.NAME {loss.NAME!r} is unknown; choose one of {tuple(sorted(LOSSES))}.",
    )
    _need(loss.TAU > 0, f"LOSS.TAU must be > 0, got {loss.TAU}.")
    if loss.NAME == "eqco":
        _need(loss.ALPHA > 0, f"LOSS.ALPHA must be > 0 for the EqCo loss, got {loss.ALPHA}.")
    if loss.NAME == "dclw":
        _need(loss.SIGMA > 0, f"LOSS.SIGMA must be > 0, got {loss.SIGMA}.")
    if loss.NAME == "dual_temperature":
        _need(loss.BETA > 0, f"LOSS.BETA must be > 0, got {loss.BETA}.")
    n = solver.IMS_PER_BATCH
    _need(n >= 2, f"SOLVER.IMS_PER_BATCH must be at least 2, got {n}.")
    if m.METHOD == "simo":
        _need(
            loss.NUM_NEGATIVES >= 1, f"LOSS.NUM_NEGATIVES must be >= 1, got {loss.NUM_NEGATIVES}."
        )
        _need(
            loss.NUM_NEGATIVES <= n - 1,
            f"LOSS.NUM_NEGATIVES={loss.NUM_NEGATIVES} is larger than the {n - 1} other images of a "
            f"batch of SOLVER.IMS_PER_BATCH={n}; lower K or raise the batch size.",
        )
    if m.METHOD == "mocov2":
        _need(
            loss.QUEUE_SIZE >= 1,
            f"LOSS.QUEUE_SIZE must be >= 1 (the number of negative keys), got {loss.QUEUE_SIZE}.",
        )
    _need(solver.BASE_LR > 0, f"SOLVER.BASE_LR must be > 0, got {solver.BASE_LR}.")
    _need(
        solver.MAX_ITER > 0 or solver.EPOCHS > 0,
        "set SOLVER.EPOCHS or SOLVER.MAX_ITER to a positive value.",
    )
    _need(solver.WARMUP_EPOCHS >= 0, "SOLVER.WARMUP_EPOCHS must be >= 0.")
    _need(solver.WARMUP_ITERS >= 0, "SOLVER.WARMUP_ITERS must be >= 0 (0 = use WARMUP_EPOCHS).")
    _need(
        not loss.LOCAL_NEGATIVES or m.METHOD in ("simmoco", "simco"),
        f"LOSS.LOCAL_NEGATIVES is a simmoco/simco option; MODEL.METHOD {m.METHOD} always uses "
        "the keys of the global batch.",
    )
    _need(
        not loss.SHARED_NEGATIVES or m.METHOD == "simo",
        f"LOSS.SHARED_NEGATIVES is a simo option; MODEL.METHOD {m.METHOD} does not sample "
        "negatives.",
    )
    _need(solver.CHECKPOINT_PERIOD > 0, "SOLVER.CHECKPOINT_PERIOD must be > 0 iterations.")
    _need(
        solver.AMP.PRECISION in AMP_PRECISIONS,
        f"SOLVER.AMP.PRECISION {solver.AMP.PRECISION!r} is unknown; "
        f"choose one of {AMP_PRECISIONS}.",
    )
    _need(cfg.INPUT.SIZE >= 8, f"INPUT.SIZE must be at least 8 pixels, got {cfg.INPUT.SIZE}.")
    _need(
        0 < cfg.INPUT.MIN_SCALE <= cfg.INPUT.MAX_SCALE <= 1,
        "INPUT.MIN_SCALE and INPUT.MAX_SCALE must satisfy 0 < MIN_SCALE <= MAX_SCALE <= 1.",
    )
    _need(
        cfg.INPUT.DEVICE_AUGMENT in DEVICE_AUGMENT_CHOICES,
        f"INPUT.DEVICE_AUGMENT {cfg.INPUT.DEVICE_AUGMENT!r} is unknown; choose auto, on or off.",
    )
    _need(cfg.TEST.KNN_PERIOD >= 0 and cfg.TEST.KNN_K > 0, "TEST.KNN_PERIOD / KNN_K are invalid.")
    _need(cfg.TEST.RETRIEVAL_SIZE >= 0, "TEST.RETRIEVAL_SIZE must be >= 0 (0 = off).")
    validate_run_config(cfg)
    if check_paths:
        check_dataset_split(cfg, "TRAIN_SPLIT")
        if cfg.TEST.KNN_PERIOD > 0:
            check_dataset_split(
                cfg,
                "VAL_SPLIT",
                "it is needed by the kNN monitor (set TEST.KNN_PERIOD 0 to disable it).",
            )
