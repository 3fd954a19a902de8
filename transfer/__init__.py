"""Downstream transfer: conversion to detectron2 weights, detection fine-tuning, reports."""

import warnings

# detectron2 still calls torch.jit.script at import time; torch >= 2.10 warns on every CLI start.
warnings.filterwarnings(
    "ignore", message=r"`torch.jit.script` is deprecated", category=FutureWarning
)
