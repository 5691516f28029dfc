"""Logit scale and softcap, excess scoring, the Curriculum object, autocast and torch.compile,
on both backends."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

import cggr
from cggr.functional import cggr_cross_entropy, cggr_linear_cross_entropy
from helpers import make_batch

BACKENDS = ["torch"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale,cap", [(1.0, 5.0), (0.5, None), (2.0, 3.0), (-1.5, None)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_scale_and_softcap_follow_autograd(backend, scale, cap, dtype):
    """At ratio 1 the loss and gradient equal F.cross_entropy of cap * tanh(scale * x / cap)
    by autograd; below it, on the rows kept, with their weights."""
    logits, targets = make_batch((3, 7), 23, dtype, seed=2, scale=6.0)
    if scale > 0:  # (a negative scale makes -inf a +inf logit: a NaN row, as it should)
        logits[0, 0, 3] = float("-inf")
    kw = dict(logit_scale=scale, logit_softcap=cap, backend=backend, label_smoothing=0.1, z_loss=1e-3)
    for ratio in (1.0, 0.4):
        x = logits.clone().requires_grad_(True)
        loss, info = cggr_cross_entropy(x, targets, ratio, return_info=True, generator=torch.Generator().manual_seed(0),
                                        **kw)
        loss.backward()
        y = logits.clone().requires_grad_(True)
        z = y * scale
        if cap is not None:
            z = cap * torch.tanh(z / cap)
        rows = (F.cross_entropy(z.flatten(0, 1), targets.flatten().clamp(min=0), reduction="none",
                                label_smoothing=0.1) + 1e-3 * torch.logsumexp(z, -1).flatten() ** 2)
        mask, weight = info.mask.flatten(), info.weight.flatten().to(dtype)
        expected = torch.where(mask, weight * rows, 0.0).sum() / info.n_valid.clamp(min=1)
        expected.backward()
        tol = 1e-10 if dtype == torch.float64 else 2e-5
        torch.testing.assert_close(loss, expected.detach(), rtol=tol, atol=tol)
        torch.testing.assert_close(x.grad, y.grad, rtol=tol, atol=tol)
        assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_softcap_keeps_the_linear_path_equal_to_the_plain_one(backend):
    g = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(2, 6, 5, generator=g) * 3, torch.randn(19, 5, generator=g)
    targets = torch.randint(0, 19, (2, 6), generator=g)
    grads = []
    for linear in (True, False):
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        kw = dict(logit_softcap=4.0, logit_scale=0.8, backend=backend, generator=torch.Generator().manual_seed(1))
        loss = (cggr_linear_cross_entropy(h, w, targets, 0.5, chunk_size=4, **kw) if linear
                else cggr_cross_entropy(h @ w.T, targets, 0.5, **kw))
        loss.backward()
        grads.append((loss.detach(), h.grad, w.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_excess_score_and_selection(backend):
    """excess = sigmoid(nll - reference): topk keeps the rows this model gets most wrong
    relative to the reference; a NaN reference ranks hardest."""
    logits, targets = make_batch((20,), 9, ignore_frac=0.0, seed=4)
    nll = F.cross_entropy(logits, targets, reduction="none")
    reference = nll.clone()
    reference[[2, 5, 11]] -= 3.0  # the reference is much better on these three
    reference[7] = float("nan")
    _, info = cggr_cross_entropy(logits, targets, 0.2, scoring="excess", reference_loss=reference,
                                 selection="topk", backend=backend, return_info=True)
    assert info.mask.nonzero().flatten().tolist() == [2, 5, 7, 11]
    expected = torch.sigmoid(nll - reference)
    torch.testing.assert_close(info.difficulty, expected, equal_nan=True)


def test_excess_through_the_module_and_the_linear_path():
    g = torch.Generator().manual_seed(5)
    hidden, weight = torch.randn(2, 8, 4, generator=g), torch.randn(13, 4, generator=g)
    targets = torch.randint(0, 13, (2, 8), generator=g)
    reference = torch.rand(2, 8, generator=g)
    plain = cggr_cross_entropy(hidden @ weight.T, targets, 0.5, scoring="excess", reference_loss=reference,
                               generator=torch.Generator().manual_seed(0))
    linear = cggr_linear_cross_entropy(hidden, weight, targets, 0.5, scoring="excess", reference_loss=reference,
                                       generator=torch.Generator().manual_seed(0))
    crit = cggr.CGGRLoss(min_tokens_ratio=0.5, warmup_steps=0, scoring="excess",
                         generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(linear, plain)
    torch.testing.assert_close(crit(hidden @ weight.T, targets, reference), plain)


def test_curriculum_object_as_ratio_and_in_the_module():
    curriculum = cggr.Curriculum(min_tokens_ratio=0.25, warmup_steps=4, schedule="cosine")
    logits, targets = make_batch((40,), 7, ignore_frac=0.0, seed=6)
    seen = []
    for _ in range(6):
        _, info = cggr_cross_entropy(logits, targets, curriculum, selection="topk", return_info=True)
        seen.append(int(info.n_selected))
        curriculum.step()
    expected = [max(1, math.ceil(40 * (1 - (1 - math.cos(math.pi * min(1, s / 4))) / 2 * 0.75) - 1e-6))
                for s in range(6)]
    assert seen == expected and curriculum.ratio == 0.25
    restored = cggr.Curriculum(0.25, 4, "cosine")
    restored.load_state_dict(curriculum.state_dict())
    assert restored.step_count == 6 and restored.ratio == curriculum.ratio
    crit = cggr.CGGRLoss(min_tokens_ratio=0.5, warmup_steps=10)
    crit.step()
    assert isinstance(crit.curriculum, cggr.Curriculum) and crit.curriculum.step_count == 1


def test_defaults_are_importance_and_gradnorm():
    logits, targets = make_batch((30,), 7, ignore_frac=0.0, seed=7)
    loss, info = cggr_cross_entropy(logits, targets, 0.3, return_info=True, generator=torch.Generator().manual_seed(2))
    expected = cggr_cross_entropy(logits, targets, 0.3, scoring="gradnorm", selection="importance",
                                  generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(loss, expected)
    assert cggr.CGGRLoss().get_metrics()["selection"] == "importance"
    assert cggr.CGGRLoss().get_metrics()["scoring"] == "gradnorm"


def test_linear_path_under_autocast_follows_f_linear():
    """fp32 parameters, bf16 autocast (Trainer's bf16=True): no dtype error, the gradients in
    each input's dtype, close to the same computation on bf16 copies; the fp32 weight's gradient
    is formed in fp32 (not rounded to bf16 first), so it is at least as close to the float64
    gradient of the bf16-rounded inputs."""
    g = torch.Generator().manual_seed(8)
    hidden, weight = torch.randn(2, 8, 6, generator=g), torch.randn(21, 6, generator=g)
    targets = torch.randint(0, 21, (2, 8), generator=g)
    for ratio in (1.0, 0.5):
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = cggr_linear_cross_entropy(h, w, targets, ratio, generator=torch.Generator().manual_seed(0))
        loss.backward()
        assert h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
        hb = hidden.bfloat16().requires_grad_(True)
        wb = weight.bfloat16().requires_grad_(True)
        expected = cggr_linear_cross_entropy(hb, wb, targets, ratio, generator=torch.Generator().manual_seed(0))
        expected.backward()
        torch.testing.assert_close(loss, expected)
        torch.testing.assert_close(h.grad, hb.grad.float())
        torch.testing.assert_close(w.grad, wb.grad.float(), rtol=2e-2, atol=2e-3)
        wd = weight.bfloat16().double().requires_grad_(True)
        cggr_linear_cross_entropy(hidden.bfloat16().double(), wd, targets, ratio,
                                  generator=torch.Generator().manual_seed(0)).backward()
        assert (w.grad.double() - wd.grad).norm() <= (wb.grad.double() - wd.grad).norm()


def test_torch_compile_fullgraph_on_cpu():
    """Both losses compile as one graph (the target check becomes an assertion in the graph)."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(9)
    hidden, weight = torch.randn(2, 8, 6, generator=g), torch.randn(37, 6, generator=g)
    targets = torch.randint(0, 37, (2, 8), generator=g)

    def linear(h, w, t):
        return cggr_linear_cross_entropy(h, w, t, 0.5, selection="topk")

    def linear_chunked(h, w, t):  # more rows than a chunk: the recomputing path, not the whole head
        return cggr_linear_cross_entropy(h, w, t, 0.5, selection="topk", chunk_size=5)

    def plain(x, t):
        return cggr_cross_entropy(x, t, 0.5, selection="topk")

    for fn, args in ((linear, (hidden, weight)), (linear_chunked, (hidden, weight)), (plain, (hidden @ weight.T,))):
        eager = [a.clone().requires_grad_(True) for a in args]
        compiled = [a.clone().requires_grad_(True) for a in args]
        expected = fn(*eager, targets)
        got = torch.compile(fn, fullgraph=True)(*compiled, targets)
        expected.backward()
        got.backward()
        torch.testing.assert_close(got, expected)
        for a, b in zip(compiled, eager):
            torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reference_token_loss_from_logits_and_hidden_states(backend):
    g = torch.Generator().manual_seed(10)
    hidden, weight = torch.randn(3, 5, 4, generator=g), torch.randn(17, 4, generator=g)
    targets = torch.randint(0, 17, (3, 5), generator=g)
    targets[0, :2] = -100
    expected = F.cross_entropy((hidden @ weight.T).flatten(0, 1), targets.flatten(), reduction="none").view(3, 5)
    from_logits = cggr.reference_token_loss(hidden @ weight.T, targets, backend=backend)
    from_hidden = cggr.reference_token_loss(hidden, targets, weight, chunk_size=4, backend=backend)
    for got in (from_logits, from_hidden):
        assert got.shape == targets.shape and not got.requires_grad
        torch.testing.assert_close(got, expected)
