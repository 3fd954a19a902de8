"""The linear-evaluation config: every key with its default (the MoCo R50 protocol), loading
and validation.

``load_lincls_cfg(file, opts)`` merges a YAML file (with its ``_BASE_`` chain) and ``KEY VALUE``
overrides into :func:`get_lincls_cfg`'s defaults and validates the result; every mistake is one
:class:`pretrain.io.UserError` sentence naming the key. The keys shared with pretraining
come from :func:`pretrain.config.add_datasets_config` (DATASETS) and
:func:`pretrain.config.add_run_config` (DATALOADER, OUTPUT_DIR, NAME, SEED, LOG_PERIOD,
CUDNN_BENCHMARK).
"""
from __future__ import annotations

from pretrain.config import (
    AMP_PRECISIONS,
    ARCHS,
    PretrainCfgNode,
    add_datasets_config,
    add_run_config,
    check_dataset_split,
    merge_config,
    validate_run_config,
)
from pretrain.io import UserError

__all__ = [
    "add_lincls_config", "get_lincls_cfg", "lincls_lr", "load_lincls_cfg", "validate_lincls_cfg"
]  # fmt: skip


def add_lincls_config(cfg: PretrainCfgNode) -> None:
    """Add every linear-evaluation key with its default (the MoCo R50 protocol)."""
    cfg.MODEL = PretrainCfgNode()
    # torchvision ResNet of the checkpoint (must match it): resnet18/34/50/101/152, wide_resnet*
    cfg.MODEL.ARCH = "resnet50"
    # checkpoint to evaluate: ours (encoder_q.*), MoCo's (module.encoder_q.*), torchvision's
    cfg.MODEL.WEIGHTS = ""
    # auto | cuda | cpu, as for pretraining (pretrain/config.py)
    cfg.MODEL.DEVICE = "auto"
    # NHWC memory format for the frozen backbone and its inputs (faster convolutions with AMP on
    # recent GPUs; the R50 configs turn it on)
    cfg.MODEL.CHANNELS_LAST = False
    # a BatchNorm without affine parameters (eps 1e-6) on the features before the fc, as MAE's
    # linear probe: statistics of the global batch in training, running ones in evaluation,
    # folded into the fc of model_final.pth (docs/methods.md, "Linear evaluation"). Not MoCo's
    # protocol (False: the paper's numbers); with it the fc wants a far smaller lr (0.1 at 256)
    cfg.MODEL.HEAD_BN = False

    cfg.INPUT = PretrainCfgNode()
    # crop size: RandomResizedCrop(SIZE) for train, CenterCrop(SIZE) for val
    cfg.INPUT.SIZE = 224
    # shorter side before the val center crop; 0 = round(SIZE * 256 / 224) (256 for 224)
    cfg.INPUT.RESIZE = 0

    # DATASETS: add_datasets_config in pretrain/config.py; the fc is trained on TRAIN_SPLIT and
    # evaluated (top-1/top-5, kNN) on VAL_SPLIT
    add_datasets_config(cfg)

    cfg.SOLVER = PretrainCfgNode()
    # global batch over all processes
    cfg.SOLVER.IMS_PER_BATCH = 256
    # the lr at SOLVER.REFERENCE_BATCH images per step (MoCo: 30, used as is)
    cfg.SOLVER.BASE_LR = 30.0
    # > 0: lr = BASE_LR * IMS_PER_BATCH / REFERENCE_BATCH (linear scaling with the batch);
    # 0: BASE_LR at any batch size (MoCo does not scale the linear-eval lr). Logged at start
    cfg.SOLVER.REFERENCE_BATCH = 0
    cfg.SOLVER.MOMENTUM = 0.9
    cfg.SOLVER.WEIGHT_DECAY = 0.0
    # length in epochs of DATASETS.TRAIN_SPLIT (ignored if MAX_ITER > 0)
    cfg.SOLVER.EPOCHS = 100
    # length in iterations; > 0 overrides EPOCHS (the lr drops stay at LR_DROP_EPOCHS)
    cfg.SOLVER.MAX_ITER = 0
    # multiply the lr by GAMMA at the start of each of these epochs (MoCo: 60, 80)
    cfg.SOLVER.LR_DROP_EPOCHS = (60, 80)
    cfg.SOLVER.GAMMA = 0.1
    # save model_{iter:07d}.pth every this many epochs (may be fractional; model_final.pth always)
    cfg.SOLVER.CHECKPOINT_PERIOD_EPOCHS = 1.0
    # keep only the newest this many periodic checkpoints (0 = keep all)
    cfg.SOLVER.MAX_TO_KEEP = 2
    cfg.SOLVER.AMP = PretrainCfgNode()
    # mixed precision of the frozen backbone (training, val top-1/top-5, cached and kNN features):
    # autocast on the GPU; the fc and the loss stay float32. With MODEL.DEVICE auto on a machine
    # without a GPU it is refused with one sentence; MODEL.DEVICE cpu runs the CPU's autocast
    cfg.SOLVER.AMP.ENABLED = False
    # bfloat16 (no loss scaling needed) | float16 (with a GradScaler, saved in checkpoints)
    cfg.SOLVER.AMP.PRECISION = "bfloat16"

    cfg.TEST = PretrainCfgNode()
    # also evaluate top-1/top-5 on VAL_SPLIT every this many epochs (0 = only at the end)
    cfg.TEST.EVAL_PERIOD_EPOCHS = 0.0
    # global batch of the val pass and of the feature extraction
    cfg.TEST.IMS_PER_BATCH = 256
    # also report the weighted kNN top-1 of the frozen backbone (val against train, eval-transform
    # features, cosine similarity; no training). Without CACHED_FEATURES it costs one extra
    # feature-extraction pass over both splits. False: skipped (results.json knn_top1 null)
    cfg.TEST.KNN = True
    # neighbours that vote (capped at the number of train images)
    cfg.TEST.KNN_K = 20
    # temperature of the vote: neighbour j weighs exp(cosine_j / KNN_T)
    cfg.TEST.KNN_T = 0.1
    # also report the instance-retrieval top-1 (%) of the frozen backbone, as the pretraining's
    # monitor measures it (pretrain/health.py): two augmented views (RandomResizedCrop(SIZE) with
    # scale (RETRIEVAL_MIN_SCALE, RETRIEVAL_MAX_SCALE) + MoCo v2 colour / grey / blur / flip) of
    # this many evenly spaced (class-stratified) VAL_SPLIT images, the same views for every
    # backbone and every run; top-1 of view 1 finding its own image's view 2 among them. Set the
    # scales to the pretraining's INPUT.MIN_SCALE / MAX_SCALE. 0 = off (results.json
    # instance_retrieval_top1 null)
    cfg.TEST.RETRIEVAL_SIZE = 0
    cfg.TEST.RETRIEVAL_MIN_SCALE = 0.2
    cfg.TEST.RETRIEVAL_MAX_SCALE = 1.0

    # train the fc on features of center crops extracted once (fast; NOT the paper protocol,
    # which augments every epoch). Set by the CLI flag --cached-features.
    cfg.CACHED_FEATURES = False

    # DATALOADER, OUTPUT_DIR, NAME, SEED, LOG_PERIOD and CUDNN_BENCHMARK: add_run_config in
    # pretrain/config.py. Here NAME is the name of the pre-training in results.json; "" = the
    # checkpoint's meta.name, else its file name. SEED seeds the fc initialisation and the data
    # order (augmentations are seeded per sample); the progress line also shows the lr.
    add_run_config(cfg, output_dir="output/lincls/r50_100ep")


def get_lincls_cfg() -> PretrainCfgNode:
    """A fresh config holding the linear-evaluation defaults."""
    cfg = PretrainCfgNode()
    add_lincls_config(cfg)
    return cfg


def lincls_lr(cfg: PretrainCfgNode) -> float:
    """The fc's lr: SOLVER.BASE_LR, scaled by IMS_PER_BATCH / REFERENCE_BATCH when that is > 0."""
    s = cfg.SOLVER
    if s.REFERENCE_BATCH > 0:
        return float(s.BASE_LR) * s.IMS_PER_BATCH / s.REFERENCE_BATCH
    return float(s.BASE_LR)


def load_lincls_cfg(
    config_file: str, opts: list[str] | None = None, check_paths: bool = True
) -> PretrainCfgNode:
    """Defaults <- ``config_file`` (with ``_BASE_``) <- ``KEY VALUE`` overrides, validated.

    Every mistake (unknown key, wrong type, missing file) is one :class:`UserError` sentence.
    """
    cfg = merge_config(get_lincls_cfg(), config_file, opts, "pretrain/lincls/config.py")
    validate_lincls_cfg(cfg, check_paths=check_paths)
    return cfg


def _need(cond: bool, message: str) -> None:
    if not cond:
        raise UserError(message)


def validate_lincls_cfg(cfg: PretrainCfgNode, check_paths: bool = True) -> None:
    """Reject values that cannot work, each with one sentence naming the key."""
    s = cfg.SOLVER
    arch = cfg.MODEL.ARCH
    _need(arch in ARCHS, f"MODEL.ARCH {arch!r} is unknown; choose one of {ARCHS}.")
    _need(s.IMS_PER_BATCH >= 1, f"SOLVER.IMS_PER_BATCH must be >= 1, got {s.IMS_PER_BATCH}.")
    _need(s.BASE_LR > 0, f"SOLVER.BASE_LR must be > 0, got {s.BASE_LR}.")
    _need(
        s.REFERENCE_BATCH >= 0,
        f"SOLVER.REFERENCE_BATCH must be >= 0 (0 = BASE_LR unscaled), got {s.REFERENCE_BATCH}.",
    )
    _need(s.WEIGHT_DECAY >= 0 and s.MOMENTUM >= 0, "SOLVER.WEIGHT_DECAY and MOMENTUM must be >= 0.")
    _need(s.MAX_ITER > 0 or s.EPOCHS > 0, "set SOLVER.EPOCHS or SOLVER.MAX_ITER to be positive.")
    drops = list(s.LR_DROP_EPOCHS)
    _need(
        all(d > 0 for d in drops) and drops == sorted(set(drops)),
        f"SOLVER.LR_DROP_EPOCHS {tuple(drops)} must be strictly increasing positive epochs.",
    )
    _need(0 < s.GAMMA <= 1, f"SOLVER.GAMMA must be in (0, 1], got {s.GAMMA}.")
    _need(s.CHECKPOINT_PERIOD_EPOCHS > 0, "SOLVER.CHECKPOINT_PERIOD_EPOCHS must be > 0.")
    _need(
        s.AMP.PRECISION in AMP_PRECISIONS,
        f"SOLVER.AMP.PRECISION {s.AMP.PRECISION!r} is unknown; choose one of {AMP_PRECISIONS}.",
    )
    _need(cfg.TEST.EVAL_PERIOD_EPOCHS >= 0, "TEST.EVAL_PERIOD_EPOCHS must be >= 0.")
    _need(cfg.TEST.IMS_PER_BATCH >= 1, "TEST.IMS_PER_BATCH must be >= 1.")
    _need(cfg.TEST.KNN_K >= 1, f"TEST.KNN_K must be >= 1, got {cfg.TEST.KNN_K}.")
    _need(cfg.TEST.KNN_T > 0, f"TEST.KNN_T must be > 0, got {cfg.TEST.KNN_T}.")
    _need(
        cfg.TEST.RETRIEVAL_SIZE >= 0,
        f"TEST.RETRIEVAL_SIZE must be >= 0 (0 = off), got {cfg.TEST.RETRIEVAL_SIZE}.",
    )
    _need(
        0 < cfg.TEST.RETRIEVAL_MIN_SCALE <= cfg.TEST.RETRIEVAL_MAX_SCALE <= 1,
        "TEST.RETRIEVAL_MIN_SCALE and RETRIEVAL_MAX_SCALE must satisfy 0 < MIN <= MAX <= 1, got "
        f"{cfg.TEST.RETRIEVAL_MIN_SCALE} and {cfg.TEST.RETRIEVAL_MAX_SCALE}.",
    )
    _need(cfg.INPUT.SIZE >= 8, f"INPUT.SIZE must be at least 8 pixels, got {cfg.INPUT.SIZE}.")
    _need(
        cfg.INPUT.RESIZE == 0 or cfg.INPUT.RESIZE >= cfg.INPUT.SIZE,
        "INPUT.RESIZE must be 0 (automatic) or at least INPUT.SIZE.",
    )
    validate_run_config(cfg)
    if check_paths:
        check_dataset_split(cfg, "TRAIN_SPLIT")
        check_dataset_split(cfg, "VAL_SPLIT")

