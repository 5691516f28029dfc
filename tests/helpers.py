"""Shared test helpers."""
import torch

from cggr.functional import cggr_cross_entropy


def make_batch(shape, vocab, dtype=torch.float32, ignore_frac=0.2, seed=0, scale=3.0):
    """Random logits ``[*shape, vocab]`` and targets with about ``ignore_frac`` set to -100."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, vocab, generator=g, dtype=torch.float64) * scale).to(dtype)
    targets = torch.randint(0, vocab, shape, generator=g)
    ignore = torch.rand(shape, generator=g) < ignore_frac
    return logits, targets.masked_fill(ignore, -100)


def loss_and_grad(logits, targets, ratio, **kw):
    """(loss, grad, info) for a fresh leaf copy of ``logits``."""
    x = logits.detach().clone().requires_grad_(True)
    loss, info = cggr_cross_entropy(x, targets, ratio, return_info=True, **kw)
    loss.sum().backward()
    return loss.detach(), x.grad, info
