"""The bookkeeping of the small head's CUDA graphs (``cggr.ops.head_graph``) on the CPU: when a
call is seen, captured, replayed or run eagerly, when a replay's gradients are let go, and
which graphs are kept. The capture itself is replaced by a stand-in that reruns the forward;
``tests/test_gpu.py`` checks real graphs against eager calls."""
import pytest
import torch

from cggr.ops import head_graph


class _Replayer:
    """Stands in for a CUDA graph: replay reruns the forward into the recorded outputs."""

    def __init__(self, entry, weight, bias, forward):
        self.run = lambda: forward(entry.hidden, weight, bias, entry.targets)
        self.entry = entry

    def replay(self):
        for out, new in zip(self.entry.outputs, self.run()):
            if out is not None:
                out.copy_(new)


@pytest.fixture
def graphs(monkeypatch):
    """head_graph with CPU tensors allowed (the key: hidden's shape) and the stand-in capture."""
    recorded = []

    def record(entry, weight, bias, forward):
        if entry.hidden.shape[0] == 13:
            raise RuntimeError("does not capture")
        entry.graph = _Replayer(entry, weight, bias, forward)
        entry.outputs = tuple(None if t is None else t.clone()
                              for t in forward(entry.hidden, weight, bias, entry.targets))
        recorded.append(entry)

    monkeypatch.setattr(head_graph, "_key", lambda hidden2d, weight, bias, targets, call: (tuple(hidden2d.shape),))
    monkeypatch.setattr(head_graph, "_record", record)
    head_graph.clear()
    yield recorded
    head_graph.clear()


def _forward(hidden, weight, bias, targets):
    """A head's loss and gradients, made up: each output depends on the inputs of the call."""
    loss = (hidden.sum() + targets.sum()).reshape(())
    return loss, 2 * hidden, weight * hidden.sum(), None


def _call(rows, value, weight):
    hidden = torch.full((rows, 3), float(value))
    return head_graph.run(hidden, weight, None, torch.arange(rows), None, _forward, (True, True, False))


def test_seen_then_captured_then_replayed(graphs):
    """The first call runs eagerly, the second captures and replays, later ones replay on their
    own inputs; the loss is a copy, not the graph's own output."""
    weight = torch.ones(2, 3)
    assert _call(4, 1.0, weight) is None and graphs == []
    loss, grad_hidden, grad_weight, grad_bias, release = _call(4, 2.0, weight)
    assert len(graphs) == 1 and graphs[0].replays == 1 and graphs[0].busy
    assert loss.item() == 4 * 3 * 2.0 + 6 and torch.equal(grad_hidden, torch.full((4, 3), 4.0))
    assert grad_bias is None and loss.data_ptr() != graphs[0].outputs[0].data_ptr()
    release.guard(lambda scale: (scale,))(torch.tensor(1.0))  # its backward lets the graph go
    assert not graphs[0].busy
    loss3, *_ = _call(4, 3.0, weight)
    assert graphs[0].replays == 2 and loss3.item() == 4 * 3 * 3.0 + 6 and loss.item() == 4 * 3 * 2.0 + 6


def test_busy_graph_runs_eagerly_and_is_let_go(graphs):
    """While a replay's gradients wait for their backward, the same call runs eagerly; the
    replay's release (its backward, or its autograd node going) lets the graph go, but the
    release of an earlier replay does not."""
    weight = torch.ones(2, 3)
    _call(4, 1.0, weight)
    first = _call(4, 1.0, weight)[-1]
    assert _call(4, 1.0, weight) is None  # busy: eager
    first.done()
    second = _call(4, 1.0, weight)[-1]
    assert graphs[0].replays == 2 and graphs[0].busy
    del first  # an earlier replay's node going leaves the current one's hold
    assert graphs[0].busy
    del second
    assert not graphs[0].busy


def test_second_backward_after_a_replay_is_refused(graphs):
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
    assert graphs[0].busy  # the refused backward did not let the later replay's gradients go
    del later


def test_least_recently_used_idle_graphs_are_dropped(graphs, monkeypatch):
    """Beyond _MAX_GRAPHS the least recently used idle graph goes; one whose gradients are still
    waiting stays; a call that fails to capture runs eagerly from then on."""
    monkeypatch.setattr(head_graph, "_MAX_GRAPHS", 2)
    weight = torch.ones(2, 3)
    held = []
    for rows in (4, 5, 6):
        _call(rows, 1.0, weight)
        held.append(_call(rows, 1.0, weight)[-1])
        if rows != 4:
            held[-1].done()
    kept = {key[0] for key, entry in head_graph._graphs.items() if entry is not None}
    assert kept == {(4, 3), (6, 3)}  # 4 was busy, 5 the least recently used idle one
    _call(13, 1.0, weight)
    assert _call(13, 1.0, weight) is None and head_graph._graphs[((13, 3), (True, True, False))] is None
    assert _call(13, 1.0, weight) is None and len(graphs) == 3
