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


def loss_and_grad(logits, targets, ratio, view=None, **kw):
    """(loss, grad, info) for a fresh leaf copy of ``logits``, or for ``view(copy)`` (the loss
    then sees the view's layout: a copy of a view would be contiguous)."""
    x = logits.detach().clone().requires_grad_(True)
    loss, info = cggr_cross_entropy(x if view is None else view(x), targets, ratio, return_info=True, **kw)
    loss.sum().backward()
    return loss.detach(), x.grad if view is None else view(x.grad), info


INFO_FIELDS = ("difficulty", "confidence", "entropy", "nll")


def assert_backends_agree(result, reference, tol, grad_tol):
    """Compare (loss, grad, info) of two backends on the same input.

    Scores may differ by rounding, so where scores nearly tie the two hardness orders may
    differ, and then so may the selections (for the random strategies anywhere: a row that
    moves across a stratum changes what is drawn). The selection itself is shared code, so
    masks may differ only if the scores do; then the close scores are the comparison.
    """
    (loss, grad, info), (ref_loss, ref_grad, ref_info) = result, reference
    for name in INFO_FIELDS:
        torch.testing.assert_close(getattr(info, name).float(), getattr(ref_info, name).float(), rtol=tol,
                                   atol=tol, equal_nan=True)
    if not torch.equal(info.mask, ref_info.mask):
        assert not torch.equal(info.difficulty, ref_info.difficulty), "masks differ although the scores are equal"
        return
    torch.testing.assert_close(info.weight, ref_info.weight, rtol=tol, atol=tol)
    torch.testing.assert_close(loss, ref_loss, rtol=tol, atol=tol, equal_nan=True)
    # Relative to the largest entry: large-vocabulary gradients are tiny everywhere.
    got, want = grad.double(), ref_grad.double()
    assert torch.equal(got.isnan(), want.isnan())
    finite = ~want.isnan()
    if finite.any():
        scale = want[finite].abs().max().clamp(min=1e-30)
        assert ((got - want)[finite].abs().max() / scale).item() <= grad_tol
    assert (grad[~info.mask] == 0).all()


def scoring_options(scoring, targets, seed=0):
    """``scoring=...`` plus, for ``'excess'``, a random reference loss shaped like ``targets``."""
    if scoring != "excess":
        return {"scoring": scoring}
    g = torch.Generator().manual_seed(seed)
    return {"scoring": scoring, "reference_loss": torch.rand(targets.shape, generator=g, dtype=torch.float64) * 3}


def with_and_without_graphs(monkeypatch, run, seed: int):
    """``[(run(), graph entries), (run(), [])]``: ``run`` with CUDA graphs on, then off, each time
    from no captured graph and ``torch.manual_seed(seed)``; graphs on or off as before after."""
    from cggr.ops import graphs

    out = []
    before = graphs._ENABLED
    for enabled in (True, False):
        monkeypatch.setattr(graphs, "_ENABLED", enabled)
        graphs.clear()
        torch.manual_seed(seed)
        out.append((run(), graphs.entries()))
    monkeypatch.setattr(graphs, "_ENABLED", before)
    graphs.clear()
    return out


def assert_equal_steps(graphed, eager):
    """Each step's tensors (loss, gradients...) are the same to the bit with and without graphs."""
    assert len(graphed) == len(eager)
    for step_a, step_b in zip(graphed, eager):
        assert all(torch.equal(a, b) for a, b in zip(step_a, step_b))
