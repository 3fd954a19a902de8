"""Data pipeline shared by pretraining and linear evaluation (modules: ``datasets``, ``color``,
``transforms``, ``loaders``).

Public API (also used by :mod:`pretrain.lincls`):

* :func:`load_rgb` -- open any image PIL can read (CMYK, grayscale, 16-bit, palette, PNG with alpha)
  as an 8-bit RGB image; raises ``OSError``-like errors for truncated/unreadable files.
  :func:`open_rgb` does the same, optionally decoding a JPEG at 1/2, 1/4 or 1/8 size.
* :class:`RobustImageFolder` -- ``torchvision.datasets.ImageFolder`` that never crashes on a bad
  file: the file is logged once, counted (:attr:`RobustImageFolder.num_bad`, shared by all
  DataLoader workers) and replaced by the next readable sample, so batches keep their size (all
  ranks must produce equal batches for the all-gathers). An index may also be a pair
  ``(index, seed)``: the transform then runs under that seed, which makes augmentations independent
  of worker count and of where a resumed run restarts (exact resume).
* :func:`moco_v2_transform`, :class:`TwoCropsTransform`, :func:`eval_transform`,
  :func:`lincls_train_transform` -- the MoCo v2 "aug+" recipe and the linear-evaluation
  transforms (docs/methods.md, "Augmentation").
* The pretraining input pipeline, ``TwoCropsTransform(moco_v2_transform(size))``
  (``bench/data_pipeline.py``: 2.30x MoCo's images/s per core on 500 x 375 JPEGs at 224 px on an
  idle machine, 187 images/s; 1.97x at 112 px), keeps aug+: every random draw is torchvision's
  (same calls, same order, same numbers for a seed) and every op but the blur and the hue gives
  torchvision's bytes (:class:`MoCoV2Augment`, tested). The blur is a true Gaussian of the drawn
  sigma (OpenCV, :func:`gaussian_blur`, one thread) where MoCo uses PIL's box approximation of
  it: 0.32 grey levels mean difference per pixel, an order of magnitude below the difference
  between two sigma draws
  (docs/methods.md, "Augmentation"); the hue step converts RGB <-> 8-bit HSV with OpenCV instead of
  PIL, which rounds differently (0.3-0.6 grey levels on photos, as large as either converter's
  own round-trip error). It is faster by (1) drawing both views' parameters from the
  file header first, then decoding a JPEG once, reduced by 2/4/8 only when both crops still span >=
  the output size in the reduced image (:meth:`MoCoV2Augment.draft_factor`: there pixels can differ,
  by the filtering); (2) brightness / contrast as one exact lookup each, hue through
  OpenCV's HSV converters (4x faster than PIL's); (3) uint8 views, normalised on the
  device (:func:`normalize_uint8`, called by :meth:`pretrain.methods.ContrastiveMethod.forward`);
  (4) OpenCV's blur, 4-9x faster than PIL's, on a grey view's single band; the flip is done by the
  planar copy, and :meth:`MoCoV2Augment.sample` makes torchvision's draws without its per-call
  tensor overhead.
* The device path (``INPUT.DEVICE_AUGMENT``, :mod:`pretrain.data.device_augment`):
  :class:`TwoCropsDeviceAugment` makes the same draws, decode, crops and flip in the loader and
  ships :class:`DeviceView` s (uint8 pixels + drawn parameters); :func:`augment_on_device` does the
  colour jitter, grayscale, blur and normalisation of the batch on the model's device
  (:meth:`pretrain.methods.ContrastiveMethod.forward`); :func:`use_device_augment` /
  :func:`two_crops_transform` pick the path (docs/methods.md, "Augmentation").
* :class:`ResumableDistributedSampler` + :class:`ResumableLoader` and the builders
  :func:`build_train_loader` / :func:`build_eval_loader` -- distributed-aware loaders; the training
  loader iterates epoch after epoch (calling ``set_epoch``) and its position (epoch, batch) is
  part of the checkpoint.
"""

from pretrain.data.color import adjust_brightness, adjust_contrast, adjust_hue, adjust_saturation
from pretrain.data.datasets import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RobustImageFolder,
    count_bad_files,
    load_rgb,
    open_rgb,
)
from pretrain.data.device_augment import (
    DEVICE_AUGMENT_CHOICES,
    DeviceView,
    TwoCropsDeviceAugment,
    augment_on_device,
    two_crops_transform,
    use_device_augment,
)
from pretrain.data.loaders import (
    ResumableDistributedSampler,
    ResumableLoader,
    build_eval_loader,
    build_image_folder,
    build_train_loader,
)
from pretrain.data.transforms import (
    GaussianBlur,
    MoCoV2Augment,
    TwoCropsTransform,
    ViewParams,
    eval_transform,
    gaussian_blur,
    lincls_train_transform,
    moco_v2_transform,
    normalize_uint8,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "load_rgb",
    "RobustImageFolder",
    "open_rgb",
    "moco_v2_transform",
    "MoCoV2Augment",
    "ViewParams",
    "GaussianBlur",
    "gaussian_blur",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_saturation",
    "adjust_hue",
    "normalize_uint8",
    "TwoCropsTransform",
    "TwoCropsDeviceAugment",
    "DeviceView",
    "DEVICE_AUGMENT_CHOICES",
    "augment_on_device",
    "two_crops_transform",
    "use_device_augment",
    "eval_transform",
    "lincls_train_transform",
    "ResumableDistributedSampler",
    "ResumableLoader",
    "build_image_folder",
    "build_train_loader",
    "build_eval_loader",
    "count_bad_files",
]
