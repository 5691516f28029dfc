"""Every bad input raises before any work, naming the argument (docs/semantics.md, "Errors")."""
import pytest
import torch

import cggr
from cggr import CGGRLoss
from cggr.functional import cggr_cross_entropy, cggr_linear_cross_entropy


def _inputs():
    logits = torch.randn(2, 3, 5)
    targets = torch.randint(0, 5, (2, 3))
    return logits, targets


CASES = [
    ("shape", lambda l, t: cggr_cross_entropy(l, t[:, :2], 0.5), ValueError, "targets"),
    ("int logits", lambda l, t: cggr_cross_entropy(l.long(), t, 0.5), TypeError, "logits"),
    ("float targets", lambda l, t: cggr_cross_entropy(l, t.float(), 0.5), TypeError, "targets"),
    ("target too big", lambda l, t: cggr_cross_entropy(l, t.masked_fill(t == t[0, 0], 5), 0.5), ValueError,
     "targets"),
    ("negative target", lambda l, t: cggr_cross_entropy(l, t.masked_fill(t == t[0, 0], -1), 0.5), ValueError,
     "targets"),
    ("ratio 0", lambda l, t: cggr_cross_entropy(l, t, 0.0), ValueError, "ratio"),
    ("ratio > 1", lambda l, t: cggr_cross_entropy(l, t, 1.5), ValueError, "ratio"),
    ("ratio nan", lambda l, t: cggr_cross_entropy(l, t, float("nan")), ValueError, "ratio"),
    ("ratio shape", lambda l, t: cggr_cross_entropy(l, t, torch.tensor([0.5])), ValueError, "ratio"),
    ("scoring", lambda l, t: cggr_cross_entropy(l, t, 0.5, scoring="nope"), ValueError, "scoring"),
    ("selection", lambda l, t: cggr_cross_entropy(l, t, 0.5, selection="nope"), ValueError, "selection"),
    ("reduction", lambda l, t: cggr_cross_entropy(l, t, 0.5, reduction="avg"), ValueError, "reduction"),
    ("backend", lambda l, t: cggr_cross_entropy(l, t, 0.5, backend="cuda"), ValueError, "backend"),
    ("sequence_aware 2-D", lambda l, t: cggr_cross_entropy(l[0], t[0], 0.5, selection="sequence_aware"),
     ValueError, "sequence_aware"),
    ("num_strata", lambda l, t: cggr_cross_entropy(l, t, 0.5, num_strata=0), ValueError, "num_strata"),
    ("label_smoothing", lambda l, t: cggr_cross_entropy(l, t, 0.5, label_smoothing=1.5), ValueError,
     "label_smoothing"),
    ("V < 2", lambda l, t: cggr_cross_entropy(l[..., :1], t.clamp(max=0), 0.5), ValueError, "V"),
    ("device", lambda l, t: cggr_cross_entropy(l, t.to("meta"), 0.5), ValueError, "targets"),
    ("weight shape", lambda l, t: cggr_linear_cross_entropy(l, torch.randn(7, 4), t, 0.5), ValueError, "weight"),
    ("weight 1-D", lambda l, t: cggr_linear_cross_entropy(l, torch.randn(7), t, 0.5), ValueError, "weight"),
    ("hidden int", lambda l, t: cggr_linear_cross_entropy(l.long(), torch.randn(7, 5), t, 0.5), TypeError,
     "hidden"),
    ("linear V < 2", lambda l, t: cggr_linear_cross_entropy(l, torch.randn(1, 5), t.clamp(max=0), 0.5),
     ValueError, "weight"),
    ("linear target range", lambda l, t: cggr_linear_cross_entropy(l, torch.randn(3, 5), t + 3, 0.5),
     ValueError, "targets"),
    ("bias shape", lambda l, t: cggr_linear_cross_entropy(l, torch.randn(7, 5), t, 0.5, bias=torch.randn(6)),
     ValueError, "bias"),
    ("warmup", lambda l, t: CGGRLoss(warmup_steps=-1), ValueError, "warmup_steps"),
    ("min ratio 0", lambda l, t: CGGRLoss(min_tokens_ratio=0.0), ValueError, "min_tokens_ratio"),
    ("min ratio > 1", lambda l, t: CGGRLoss(min_tokens_ratio=1.1), ValueError, "min_tokens_ratio"),
    ("sensitivity", lambda l, t: CGGRLoss(threshold_sensitivity=1.5), ValueError, "threshold_sensitivity"),
    ("module scoring", lambda l, t: CGGRLoss(scoring="x"), ValueError, "scoring"),
    ("module strata", lambda l, t: CGGRLoss(num_strata=0), ValueError, "num_strata"),
    ("module seq-aware", lambda l, t: CGGRLoss(selection="sequence_aware")(l[0], t[0]), ValueError,
     "sequence_aware"),
    ("module target", lambda l, t: CGGRLoss()(l, t + 5), ValueError, "targets"),
    ("softcap 0", lambda l, t: cggr_cross_entropy(l, t, 0.5, logit_softcap=0.0), ValueError, "logit_softcap"),
    ("softcap inf", lambda l, t: cggr_cross_entropy(l, t, 0.5, logit_softcap=float("inf")), ValueError,
     "logit_softcap"),
    ("softcap str", lambda l, t: cggr_cross_entropy(l, t, 0.5, logit_softcap="30"), ValueError, "logit_softcap"),
    ("scale nan", lambda l, t: cggr_cross_entropy(l, t, 0.5, logit_scale=float("nan")), ValueError, "logit_scale"),
    ("module scale", lambda l, t: CGGRLoss(logit_scale=float("inf")), ValueError, "logit_scale"),
    ("excess without reference", lambda l, t: cggr_cross_entropy(l, t, 0.5, scoring="excess"), ValueError,
     "reference_loss"),
    ("reference without excess", lambda l, t: cggr_cross_entropy(l, t, 0.5, reference_loss=torch.zeros(2, 3)),
     ValueError, "reference_loss"),
    ("reference shape", lambda l, t: cggr_cross_entropy(l, t, 0.5, scoring="excess", reference_loss=torch.zeros(6)),
     ValueError, "reference_loss"),
    ("reference dtype", lambda l, t: cggr_cross_entropy(l, t, 0.5, scoring="excess", reference_loss=t), ValueError,
     "reference_loss"),
    ("reference device", lambda l, t: cggr_cross_entropy(l, t, 0.5, scoring="excess",
                                                         reference_loss=torch.zeros(2, 3, device="meta")),
     ValueError, "reference_loss"),
    ("linear excess", lambda l, t: cggr_linear_cross_entropy(l, torch.randn(7, 5), t, 0.5, scoring="excess"),
     ValueError, "reference_loss"),
    ("module excess", lambda l, t: CGGRLoss(scoring="excess")(l, t), ValueError, "reference_loss"),
    ("inplace expanded", lambda l, t: cggr_cross_entropy(l[:, :1].expand(2, 3, 5), t, 0.5, inplace_backward=True),
     ValueError, "inplace_backward"),
    ("curriculum ratio", lambda l, t: cggr.Curriculum(min_tokens_ratio=0.0), ValueError, "min_tokens_ratio"),
    ("curriculum warmup", lambda l, t: cggr.Curriculum(warmup_steps=-2), ValueError, "warmup_steps"),
    ("curriculum schedule", lambda l, t: cggr.Curriculum(schedule="step"), ValueError, "schedule"),
]


@pytest.mark.parametrize("name,call,error,word", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_and_leaves_tensors_alone(name, call, error, word):
    logits, targets = _inputs()
    before = (logits.clone(), targets.clone())
    with pytest.raises(error, match=word):
        call(logits, targets)
    assert torch.equal(logits, before[0]) and torch.equal(targets, before[1])


def test_ignore_index_is_not_a_range_error():
    logits, targets = _inputs()
    targets[0, 0] = -100
    cggr_cross_entropy(logits, targets, 0.5)
    targets[0, 0] = 7
    cggr_cross_entropy(logits, targets, 0.5, ignore_index=7)


def test_check_targets_false_skips_the_sync_check():
    logits, targets = _inputs()
    cggr_cross_entropy(logits, targets.masked_fill(targets == targets[0, 0], 0), 0.5, check_targets=False)


def test_device_ratio_is_not_range_checked():
    logits, targets = _inputs()
    loss = cggr_cross_entropy(logits, targets, torch.tensor(0.5, dtype=torch.float64))
    assert torch.isfinite(loss)
