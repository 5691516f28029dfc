"""CGGR: Confidence-Gated Gradient Routing for language-model losses.

Score every token's difficulty from the model's own prediction, keep only a chosen
fraction of the tokens in the cross-entropy loss, and compute the gradient only there.
"""
from . import functional
from .functional import cggr_cross_entropy, cggr_linear_cross_entropy, reference_token_loss
from .info import CGGRInfo
from .loss import CGGRLoss
from .ops.graphs import clear as clear_cuda_graphs
from .schedule import Curriculum

__version__ = "0.6.0.dev0"

__all__ = ["CGGRInfo", "CGGRLoss", "Curriculum", "cggr_cross_entropy", "cggr_linear_cross_entropy",
           "clear_cuda_graphs", "functional", "reference_token_loss", "__version__"]
