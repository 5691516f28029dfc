"""The bookkeeping of the CUDA graphs (``cggr.ops.graphs``) on the CPU: when a call is seen,
captured, replayed or run eagerly, when a replay's outputs are let go, and which graphs are
kept. The capture itself is replaced by a stand-in that reruns the forward into the recorded
outputs; ``tests/test_gpu.py`` checks real graphs against eager calls."""
import pytest
import torch

import cggr
from cggr.ops import graphs
from helpers import assert_equal_steps, with_and_without_graphs

_GRAD = 3  # the logits gradient's place among a logits graph's outputs (ops.autograd._graphed_logits)


class _Replayer:
    """Stands in for a CUDA graph: replay reruns the forward into the recorded outputs."""

    def __init__(self, entry, forward):
        self.run = lambda: forward(*entry.statics)
        self.entry = entry

    def replay(self):
        for out, new in zip(self.entry.outputs, self.run()):
            if out is not None:
                out.copy_(new)


@pytest.fixture
def recorded(monkeypatch):
    """graphs with CPU tensors allowed (the keys: the shapes, and the logits' address) and the
    stand-in capture; yields the entries recorded."""
    entries = []

    def record(entry, forward):
        if entry.statics[0].shape[0] == 13:
            raise RuntimeError("does not capture")
        entry.graph = _Replayer(entry, forward)
        rng = torch.get_rng_state()  # a capture draws nothing: its replays do
        entry.outputs = tuple(None if t is None else t.clone() for t in forward(*entry.statics))
        torch.set_rng_state(rng)
        entries.append(entry)

    def head_key(hidden2d, weight, bias, targets, call, need):
        return (tuple(hidden2d.shape), need), (tuple(hidden2d.shape), need)

    def logits_key(logits, targets, call):
        if not graphs._ENABLED or call.with_info:
            return None
        family = (tuple(logits.shape), call.opts, call.ratio, call.sink is not None)
        return (family, logits.data_ptr()), family

    monkeypatch.setattr(graphs, "_head_key", head_key)
    monkeypatch.setattr(graphs, "_logits_key", logits_key)
    monkeypatch.setattr(graphs, "_record", record)
    graphs.clear()
    yield entries
    graphs.clear()


def _forward(hidden, weight, bias, targets):
    """A head's loss and gradients, made up: each output depends on the inputs of the call."""
    loss = (hidden.sum() + targets.sum()).reshape(())
    return loss, 2 * hidden, weight * hidden.sum(), None


def _call(rows, value, weight):
    hidden = torch.full((rows, 3), float(value))
    return graphs.run_head(hidden, weight, None, torch.arange(rows), None, _forward, (True, True, False))


def test_seen_then_captured_then_replayed(recorded):
    """The first call runs eagerly, the second captures and replays, later ones replay on their
    own inputs; the loss is a copy, not the graph's own output."""
    weight = torch.ones(2, 3)
    assert _call(4, 1.0, weight) is None and recorded == []
    loss, grad_hidden, grad_weight, grad_bias, release = _call(4, 2.0, weight)
    assert len(recorded) == 1 and recorded[0].replays == 1 and recorded[0].busy
    assert loss.item() == 4 * 3 * 2.0 + 6 and torch.equal(grad_hidden, torch.full((4, 3), 4.0))
    assert grad_bias is None and loss.data_ptr() != recorded[0].outputs[0].data_ptr()
    release.guard(lambda scale: (scale,))(torch.tensor(1.0))  # its backward lets the graph go
    assert not recorded[0].busy
    loss3, *_ = _call(4, 3.0, weight)
    assert recorded[0].replays == 2 and loss3.item() == 4 * 3 * 3.0 + 6 and loss.item() == 4 * 3 * 2.0 + 6


def test_busy_graph_runs_eagerly_and_is_let_go(recorded):
    """While a replay's gradients wait for their backward, the same call runs eagerly; the
    replay's release (its backward, or its autograd node going) lets the graph go, but the
    release of an earlier replay does not."""
    weight = torch.ones(2, 3)
    _call(4, 1.0, weight)
    first = _call(4, 1.0, weight)[-1]
    assert _call(4, 1.0, weight) is None  # busy: eager
    first.done()
    second = _call(4, 1.0, weight)[-1]
    assert recorded[0].replays == 2 and recorded[0].busy
    del first  # an earlier replay's node going leaves the current one's hold
    assert recorded[0].busy
    del second
    assert not recorded[0].busy


def test_second_backward_after_a_replay_is_refused(recorded):
    """A backward whose gradients the graph has overwritten since raises instead of reading
    them; one with nothing replayed in between (retain_graph) reads them again."""
    weight = torch.ones(2, 3)
    _call(4, 1.0, weight)
    release = _call(4, 1.0, weight)[-1]
    scale = release.guard(lambda value: (value * 2,))
    assert scale(torch.tensor(1.0))[0].item() == 2 and scale(torch.tensor(3.0))[0].item() == 6
    later = _call(4, 5.0, weight)[-1]
    with pytest.raises(RuntimeError, match="CGGR_CUDA_GRAPHS=0"):
        scale(torch.tensor(1.0))
    assert recorded[0].busy  # the refused backward did not let the later replay's gradients go
    del later


def test_least_recently_used_idle_graphs_are_dropped(recorded, monkeypatch):
    """Beyond _MAX_GRAPHS the least recently used idle graph goes; one whose gradients are still
    waiting stays; a call that fails to capture runs eagerly from then on."""
    monkeypatch.setattr(graphs, "_MAX_GRAPHS", 2)
    weight = torch.ones(2, 3)
    held = []
    for rows in (4, 5, 6):
        _call(rows, 1.0, weight)
        held.append(_call(rows, 1.0, weight)[-1])
        if rows != 4:
            held[-1].done()
    kept = {key[0] for key, entry in graphs._graphs.items() if entry is not None}
    assert kept == {(4, 3), (6, 3)}  # 4 was busy, 5 the least recently used idle one
    _call(13, 1.0, weight)
    assert _call(13, 1.0, weight) is None and graphs._graphs[((13, 3), (True, True, False))] is None
    assert _call(13, 1.0, weight) is None and len(recorded) == 3


def _logits_call(logits):
    """run_logits of a made-up forward: (loss, gradient, row sums)."""
    def forward(targets):
        return (logits.sum() + targets.sum()).reshape(()), 2 * logits, logits.sum(1) + targets
    return graphs.run_logits(logits, torch.arange(logits.shape[0]), _LogitsCall(), forward)


class _LogitsCall:
    opts, ratio, sink, with_info = None, 0.5, None, False


def test_logits_graph_replays_while_no_view_of_its_outputs_is_left(recorded):
    """A logits graph hands out views of its outputs and replays only once every view is gone;
    while one is held (a saved tensor, a gradient turned into ``.grad``) a second graph of the
    same call replays, and with both held the call runs eagerly."""
    x = torch.randn(4, 3)
    assert _logits_call(x) is None
    loss, grad, sums = _logits_call(x)
    first = recorded[0]
    assert grad.data_ptr() == first.outputs[1].data_ptr() and torch.equal(grad, 2 * x)
    assert loss.data_ptr() != first.outputs[0].data_ptr()
    held = _logits_call(x)  # the first one's views held: a second graph
    assert len(recorded) == 2 and recorded[1].replays == 1 and held[1].data_ptr() == recorded[1].outputs[1].data_ptr()
    assert _logits_call(x) is None and len(recorded) == 2  # both held: eager, no third graph
    del held
    del grad
    kept = sums[1:]  # a view of a view holds the storage too
    del sums
    x.mul_(3)  # the graphs read the logits in place
    loss, grad, sums = _logits_call(x)
    assert recorded[1].replays == 2 and first.replays == 1 and torch.equal(grad, 2 * x)
    assert loss.item() == pytest.approx(x.sum().item() + 6)
    del grad, sums, kept
    _logits_call(x)
    assert first.replays == 2
    assert _logits_call(torch.randn(4, 3)) is None  # another address: another key, seen first


def test_logits_captures_stop_when_addresses_keep_changing(recorded, monkeypatch):
    """Logits at a new address each call are captured for at most _MAX_ADDRESSES addresses of
    one family; a graph evicted and captured again at its address does not count twice."""
    monkeypatch.setattr(graphs, "_MAX_ADDRESSES", 3)
    pool = [torch.randn(4, 3) for _ in range(5)]
    for x in pool * 2:
        out = _logits_call(x)
        del out
    assert len(recorded) == 3
    monkeypatch.setattr(graphs, "_MAX_GRAPHS", 1)
    for x in pool[:2] * 4:  # two addresses captured before, one graph kept: each capture evicts the other
        out = _logits_call(x)
        del out
    assert len(recorded) > 4  # captured again and again, not stopped


@pytest.mark.parametrize("selection", ["topk", "importance", "random", "stratified"])
def test_logits_loss_through_a_graph_matches_eager(recorded, monkeypatch, selection):
    """``cggr_cross_entropy`` on small logits with the stand-in graph: its losses and gradients
    are the eager ones, random selections too, with the logits changed in place and another
    upstream gradient each call."""
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(24, 50, generator=g)
    targets = torch.randint(0, 50, (24,), generator=g)
    targets[::5] = -100

    def calls():
        x = x0.clone().requires_grad_(True)
        out = []
        for scale in (1.0, 0.5, 2.0, 1.0):
            loss = cggr.cggr_cross_entropy(x, targets, 0.4, selection=selection, backend="torch")
            (loss * scale).backward()
            out.append((loss.detach(), x.grad.clone()))
            x.grad = None
            with torch.no_grad():
                x.mul_(0.9)
        return out

    (graphed, entries), (eager, _) = with_and_without_graphs(monkeypatch, calls, seed=7)
    assert len(entries) == 1 and entries[0].replays == 3
    assert_equal_steps(graphed, eager)


def test_logits_graph_leaf_grad_retain_graph_and_metrics(recorded, monkeypatch):
    """The gradient of a leaf becomes its ``.grad`` with no copy; while that ``.grad`` is held
    a second graph replays; retain_graph's second backward gives the gradient again; and
    ``CGGRLoss`` (whose metrics read the graph's statistics) replays and reports what an eager
    run reports."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(16, 40, generator=g).requires_grad_(True)
    targets = torch.randint(0, 40, (16,), generator=g)

    def loss_of():
        return cggr.cggr_cross_entropy(x, targets, 0.5, selection="topk", backend="torch")
    loss_of().backward()
    x.grad = None
    loss = loss_of()
    loss.backward(retain_graph=True)
    entry = recorded[0]
    assert entry.replays == 1 and x.grad.data_ptr() == entry.outputs[_GRAD].data_ptr()  # no copy
    first = x.grad.clone()
    loss_of()  # .grad and the retained graph hold the first graph: a second one replays
    spare = recorded[1]
    assert entry.replays == 1 and spare.replays == 1
    x.grad = None
    loss.backward()  # recomputed from the saved rows, which no replay has overwritten
    assert torch.equal(x.grad, first)
    x.grad = None
    del loss
    loss_of().backward()
    assert entry.replays == 2 and x.grad.data_ptr() == entry.outputs[_GRAD].data_ptr()
    x.grad.zero_()  # .grad kept for good: the second graph takes over, its gradient added in
    for _ in range(2):
        loss_of().backward()
    assert spare.replays == 3 and entry.replays == 2 and torch.equal(x.grad, 2 * first)
    x.grad = None

    def metrics():
        criterion = cggr.CGGRLoss(min_tokens_ratio=0.5, warmup_steps=0, backend="torch")
        y = x.detach().clone().requires_grad_(True)
        out = []
        for _ in range(3):
            criterion(y, targets).backward()
            out.append(criterion.get_metrics())
            y.grad = None
            with torch.no_grad():
                y.mul_(1.5)
        return out
    (graphed, entries), (eager, _) = with_and_without_graphs(monkeypatch, metrics, seed=9)
    assert graphed == eager and len(entries) == 1 and entries[0].replays == 2
