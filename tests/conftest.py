"""Without a GPU, the Triton kernels run on CPU tensors in Triton's interpreter.

The variable must be set before any kernel module is imported.
"""
import os
import warnings

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The interpreter evaluates masked-off lanes too (e.g. exp(-inf - -inf)); numpy warns about them.
warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton.runtime.interpreter")
