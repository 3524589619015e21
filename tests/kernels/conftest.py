"""Kernel tests run on the CPU through Triton's interpreter when no CUDA device is present.

TRITON_INTERPRET must be set before triton decorates the kernels, i.e. before
``contrastkit.kernels.info_nce`` / ``.pool`` are first imported; conftest files load first.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
