"""Importing cggr has no side effects: no kernel modules, no global switches, no warnings."""
import subprocess
import sys

CHECK = """
import warnings, sys
warnings.simplefilter("error")
import torch
tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
import cggr
assert "triton" not in sys.modules, "importing cggr imported triton"
assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == tf32
assert callable(cggr.cggr_cross_entropy) and cggr.CGGRLoss and cggr.CGGRInfo
print("ok")
"""


def test_import_has_no_side_effects():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
