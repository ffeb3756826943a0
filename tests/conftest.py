"""Test-wide settings made before any test module is imported."""
import os

import torch

# Triton compiles its kernels for GPUs; without one, its interpreter runs them on CPU tensors (slowly): the tests of
# the Triton path (RepOpt*(triton=True)) need it set before triton is first imported
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
