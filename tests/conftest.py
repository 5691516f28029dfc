"""Without a GPU, the Triton kernels run on CPU tensors in Triton's interpreter.

The variable must be set before any kernel module is imported.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
