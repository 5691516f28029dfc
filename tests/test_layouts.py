"""Inputs of any layout on every path: strided, sliced and expanded targets, reference losses
and logits; in-place gradients into buffers whose elements share memory; empty batches."""
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from cggr import CGGRLoss
from cggr.functional import cggr_cross_entropy, cggr_linear_cross_entropy
from helpers import make_batch

BACKENDS = ["torch"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])


def _seeded():
    return torch.Generator().manual_seed(0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make_targets", [
    lambda: torch.randint(0, 11, (8, 2), generator=_seeded())[:, 1],  # a column: stride 2
    lambda: torch.randint(0, 11, (16,), generator=_seeded())[::2],  # every other token
    lambda: torch.randint(0, 11, (8, 3), generator=_seeded())[..., 0],
    lambda: torch.tensor([3]).expand(8),  # stride 0 over a one-element storage
], ids=["column", "step", "last_dim", "expanded"])
def test_strided_targets_read_by_index(backend, make_targets):
    targets = make_targets()
    logits = torch.randn(8, 11, generator=_seeded())
    expected = F.cross_entropy(logits, targets.contiguous())
    torch.testing.assert_close(cggr_cross_entropy(logits, targets, 1.0, backend=backend), expected)
    hidden, weight = torch.randn(8, 5, generator=_seeded()), torch.randn(11, 5, generator=_seeded())
    torch.testing.assert_close(cggr_linear_cross_entropy(hidden, weight, targets, 1.0, backend=backend),
                               F.cross_entropy(hidden @ weight.T, targets.contiguous()))
    crit = CGGRLoss(min_tokens_ratio=1.0, warmup_steps=0, backend=backend, base_loss=torch.nn.CrossEntropyLoss(
        reduction="none"))
    torch.testing.assert_close(crit(logits, targets), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_base_loss_reads_logits_strided_along_v(backend):
    x = torch.randn(12, 11, generator=_seeded())
    logits = x.t()  # [11, 12]: stride 1 along the rows, 11 along V
    targets = torch.randint(0, 12, (11,), generator=_seeded())
    options = dict(min_tokens_ratio=0.4, warmup_steps=0, backend=backend, selection="topk", return_info=True)
    plain, plain_info = CGGRLoss(**options)(logits, targets)
    with_base, info = CGGRLoss(base_loss=torch.nn.CrossEntropyLoss(reduction="none"), **options)(logits, targets)
    assert torch.equal(info.mask, plain_info.mask)
    torch.testing.assert_close(with_base, plain)
    reference, _ = CGGRLoss(**dict(options, backend="torch"))(logits, targets)
    torch.testing.assert_close(with_base, reference)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make_logits", [
    lambda: torch.randn(1, 11).expand(6, 11),  # every row the same memory
    lambda: torch.randn(6, 1).expand(6, 11),  # stride 0 along V
    lambda: torch.randn(2, 1, 11).expand(2, 3, 11),
], ids=["rows", "vocab", "steps"])
def test_inplace_backward_refuses_overlapping_logits(backend, make_logits):
    logits = make_logits().requires_grad_(False)
    targets = torch.randint(0, 11, logits.shape[:-1], generator=_seeded())
    with pytest.raises(ValueError, match="inplace_backward"):
        cggr_cross_entropy(logits, targets, 0.5, backend=backend, inplace_backward=True)
    cggr_cross_entropy(logits, targets, 0.5, backend=backend)  # fine without it


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_over_a_saved_output_raises_instead_of_a_wrong_gradient(backend):
    """relu saves its output for its backward; overwriting that output with our gradient would
    feed relu's backward a gradient for an activation, so autograd's version check raises."""
    x = torch.randn(6, 11, generator=_seeded(), requires_grad=True)
    targets = torch.randint(0, 11, (6,), generator=_seeded())
    loss = cggr_cross_entropy(torch.relu(x), targets, 0.5, backend=backend, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("selection", ["importance", "topk", "random", "stratified", "sequence_aware"])
def test_empty_sequences(backend, selection):
    logits = torch.randn(3, 0, 7, requires_grad=True)
    targets = torch.zeros(3, 0, dtype=torch.long)
    loss = cggr_cross_entropy(logits, targets, 0.5, backend=backend, selection=selection)
    loss.backward()
    assert loss.item() == 0.0 and logits.grad.shape == logits.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_budget_from_a_python_float_is_exact(backend):
    """(3 + 1e-6) / 7 of 7 rows is 3 in float64 (k = ceil(r n - 1e-6)); a float32 pair gave 4."""
    logits, targets = make_batch((7,), 5, ignore_frac=0.0, seed=1)
    _, info = cggr_cross_entropy(logits, targets, (3 + 1e-6) / 7, backend=backend, selection="topk",
                                 return_info=True)
    assert int(info.n_selected) == 3


LAYOUTS = ["contiguous", "sliced", "strided", "transposed", "expanded"]


def _view(kind, tensor):
    """``tensor`` [B, T, ...] seen through a layout: as it is, sliced out of a wider buffer, every
    other element of a longer one, transposed in memory, or (stride 0) expanded from one row."""
    if kind == "sliced":
        return torch.cat([tensor, tensor[:, :1]], dim=1)[:, :tensor.shape[1]]
    if kind == "strided":
        return torch.repeat_interleave(tensor, 2, dim=1)[:, ::2]
    if kind == "transposed":
        return tensor.transpose(0, 1).contiguous().transpose(0, 1)
    if kind == "expanded":
        return tensor[:1].expand_as(tensor)
    return tensor


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 3), t=st.integers(1, 6), vocab=st.integers(2, 40),
       path=st.sampled_from(["plain", "linear", "base_loss"]), ratio=st.floats(0.1, 1.0),
       selection=st.sampled_from(["importance", "topk", "random", "stratified", "sequence_aware"]),
       scoring=st.sampled_from(["gradnorm", "combined", "excess"]), inplace=st.booleans(),
       layouts=st.tuples(*[st.sampled_from(LAYOUTS)] * 3), seed=st.integers(0, 99))
def test_every_layout_on_every_path_matches_contiguous_inputs(b, t, vocab, path, ratio, selection, scoring, inplace,
                                                              layouts, seed):
    """On strided, sliced and expanded targets, reference losses and logits (or hidden states),
    each backend gives what it gives on contiguous copies, in-place gradients included."""
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, vocab, (b, t), generator=g).masked_fill(torch.rand(b, t, generator=g) < 0.2, -100)
    reference = torch.rand(b, t, generator=g) * 3 if scoring == "excess" else None
    inputs = torch.randn(b, t, vocab if path != "linear" else 5, generator=g, dtype=torch.float64) * 2
    weight = torch.randn(vocab, 5, generator=g, dtype=torch.float64)
    target_layout, reference_layout, input_layout = layouts
    inplace = inplace and path == "plain" and input_layout != "expanded"
    for backend in BACKENDS:
        results = []
        for contiguous in (False, True):
            tgt = _view(target_layout, targets)
            ref = None if reference is None else _view(reference_layout, reference)
            leaf = inputs.clone().requires_grad_(True)
            x = _view(input_layout, leaf * 1.0 if inplace else leaf)  # in place: into a buffer of our own
            if contiguous:
                tgt, x = tgt.contiguous(), x.contiguous()
                ref = None if ref is None else ref.contiguous()
            kw = dict(scoring=scoring, reference_loss=ref, selection=selection, backend=backend)
            if path == "plain":
                loss = cggr_cross_entropy(x, tgt, ratio, inplace_backward=inplace,
                                          generator=torch.Generator().manual_seed(1), **kw)
            elif path == "linear":
                loss = cggr_linear_cross_entropy(x, weight, tgt, ratio, generator=torch.Generator().manual_seed(1),
                                                 **kw)
            else:
                ref = kw.pop("reference_loss")
                crit = CGGRLoss(min_tokens_ratio=ratio, warmup_steps=0, generator=torch.Generator().manual_seed(1),
                                base_loss=torch.nn.CrossEntropyLoss(reduction="none"), **kw)
                loss = crit(x, tgt, ref)
            loss.backward()
            results.append((loss.detach(), leaf.grad))
        (loss_view, grad_view), (loss_copy, grad_copy) = results
        torch.testing.assert_close(loss_view, loss_copy, equal_nan=True)
        torch.testing.assert_close(grad_view, grad_copy, equal_nan=True)
