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
    ("shape", lambda x, t: cggr_cross_entropy(x, t[:, :2], 0.5), ValueError, "targets"),
    ("int logits", lambda x, t: cggr_cross_entropy(x.long(), t, 0.5), TypeError, "logits"),
    ("float targets", lambda x, t: cggr_cross_entropy(x, t.float(), 0.5), TypeError, "targets"),
    ("target too big", lambda x, t: cggr_cross_entropy(x, t.masked_fill(t == t[0, 0], 5), 0.5), ValueError,
     "targets"),
    ("negative target", lambda x, t: cggr_cross_entropy(x, t.masked_fill(t == t[0, 0], -1), 0.5), ValueError,
     "targets"),
    ("ratio 0", lambda x, t: cggr_cross_entropy(x, t, 0.0), ValueError, "ratio"),
    ("ratio > 1", lambda x, t: cggr_cross_entropy(x, t, 1.5), ValueError, "ratio"),
    ("ratio nan", lambda x, t: cggr_cross_entropy(x, t, float("nan")), ValueError, "ratio"),
    ("ratio shape", lambda x, t: cggr_cross_entropy(x, t, torch.tensor([0.5])), ValueError, "ratio"),
    ("scoring", lambda x, t: cggr_cross_entropy(x, t, 0.5, scoring="nope"), ValueError, "scoring"),
    ("selection", lambda x, t: cggr_cross_entropy(x, t, 0.5, selection="nope"), ValueError, "selection"),
    ("reduction", lambda x, t: cggr_cross_entropy(x, t, 0.5, reduction="avg"), ValueError, "reduction"),
    ("backend", lambda x, t: cggr_cross_entropy(x, t, 0.5, backend="cuda"), ValueError, "backend"),
    ("sequence_aware 2-D", lambda x, t: cggr_cross_entropy(x[0], t[0], 0.5, selection="sequence_aware"),
     ValueError, "sequence_aware"),
    ("num_strata", lambda x, t: cggr_cross_entropy(x, t, 0.5, num_strata=0), ValueError, "num_strata"),
    ("label_smoothing", lambda x, t: cggr_cross_entropy(x, t, 0.5, label_smoothing=1.5), ValueError,
     "label_smoothing"),
    ("V < 2", lambda x, t: cggr_cross_entropy(x[..., :1], t.clamp(max=0), 0.5), ValueError, "V"),
    ("device", lambda x, t: cggr_cross_entropy(x, t.to("meta"), 0.5), ValueError, "targets"),
    ("weight shape", lambda x, t: cggr_linear_cross_entropy(x, torch.randn(7, 4), t, 0.5), ValueError, "weight"),
    ("weight 1-D", lambda x, t: cggr_linear_cross_entropy(x, torch.randn(7), t, 0.5), ValueError, "weight"),
    ("hidden int", lambda x, t: cggr_linear_cross_entropy(x.long(), torch.randn(7, 5), t, 0.5), TypeError,
     "hidden"),
    ("linear V < 2", lambda x, t: cggr_linear_cross_entropy(x, torch.randn(1, 5), t.clamp(max=0), 0.5),
     ValueError, "weight"),
    ("linear target range", lambda x, t: cggr_linear_cross_entropy(x, torch.randn(3, 5), t + 3, 0.5),
     ValueError, "targets"),
    ("bias shape", lambda x, t: cggr_linear_cross_entropy(x, torch.randn(7, 5), t, 0.5, bias=torch.randn(6)),
     ValueError, "bias"),
    ("warmup", lambda x, t: CGGRLoss(warmup_steps=-1), ValueError, "warmup_steps"),
    ("min ratio 0", lambda x, t: CGGRLoss(min_tokens_ratio=0.0), ValueError, "min_tokens_ratio"),
    ("min ratio > 1", lambda x, t: CGGRLoss(min_tokens_ratio=1.1), ValueError, "min_tokens_ratio"),
    ("sensitivity", lambda x, t: CGGRLoss(threshold_sensitivity=1.5), ValueError, "threshold_sensitivity"),
    ("module scoring", lambda x, t: CGGRLoss(scoring="x"), ValueError, "scoring"),
    ("module strata", lambda x, t: CGGRLoss(num_strata=0), ValueError, "num_strata"),
    ("module seq-aware", lambda x, t: CGGRLoss(selection="sequence_aware")(x[0], t[0]), ValueError,
     "sequence_aware"),
    ("module target", lambda x, t: CGGRLoss()(x, t + 5), ValueError, "targets"),
    ("softcap 0", lambda x, t: cggr_cross_entropy(x, t, 0.5, logit_softcap=0.0), ValueError, "logit_softcap"),
    ("softcap inf", lambda x, t: cggr_cross_entropy(x, t, 0.5, logit_softcap=float("inf")), ValueError,
     "logit_softcap"),
    ("softcap str", lambda x, t: cggr_cross_entropy(x, t, 0.5, logit_softcap="30"), ValueError, "logit_softcap"),
    ("scale nan", lambda x, t: cggr_cross_entropy(x, t, 0.5, logit_scale=float("nan")), ValueError, "logit_scale"),
    ("module scale", lambda x, t: CGGRLoss(logit_scale=float("inf")), ValueError, "logit_scale"),
    ("excess without reference", lambda x, t: cggr_cross_entropy(x, t, 0.5, scoring="excess"), ValueError,
     "reference_loss"),
    ("reference without excess", lambda x, t: cggr_cross_entropy(x, t, 0.5, reference_loss=torch.zeros(2, 3)),
     ValueError, "reference_loss"),
    ("reference shape", lambda x, t: cggr_cross_entropy(x, t, 0.5, scoring="excess", reference_loss=torch.zeros(6)),
     ValueError, "reference_loss"),
    ("reference dtype", lambda x, t: cggr_cross_entropy(x, t, 0.5, scoring="excess", reference_loss=t), TypeError,
     "reference_loss"),
    ("reference list", lambda x, t: cggr_cross_entropy(x, t, 0.5, scoring="excess", reference_loss=[1.0]),
     ValueError, "reference_loss"),
    ("reference device", lambda x, t: cggr_cross_entropy(x, t, 0.5, scoring="excess",
                                                         reference_loss=torch.zeros(2, 3, device="meta")),
     ValueError, "reference_loss"),
    ("linear excess", lambda x, t: cggr_linear_cross_entropy(x, torch.randn(7, 5), t, 0.5, scoring="excess"),
     ValueError, "reference_loss"),
    ("module excess", lambda x, t: CGGRLoss(scoring="excess")(x, t), ValueError, "reference_loss"),
    ("inplace expanded", lambda x, t: cggr_cross_entropy(x[:, :1].expand(2, 3, 5), t, 0.5, inplace_backward=True),
     ValueError, "inplace_backward"),
    ("curriculum ratio", lambda x, t: cggr.Curriculum(min_tokens_ratio=0.0), ValueError, "min_tokens_ratio"),
    ("curriculum warmup", lambda x, t: cggr.Curriculum(warmup_steps=-2), ValueError, "warmup_steps"),
    ("curriculum schedule", lambda x, t: cggr.Curriculum(schedule="step"), ValueError, "schedule"),
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


def test_checked_options_are_cached_by_value_and_type():
    """Options are checked once per distinct set, but a value equal to an accepted one and of
    another type (False == 0.0, True == 1) is checked afresh, and refused."""
    logits, targets = _inputs()
    cggr_cross_entropy(logits, targets, 0.5, label_smoothing=0.0, num_strata=1)
    with pytest.raises(ValueError, match="label_smoothing"):
        cggr_cross_entropy(logits, targets, 0.5, label_smoothing=False, num_strata=1)
    with pytest.raises(ValueError, match="num_strata"):
        cggr_cross_entropy(logits, targets, 0.5, label_smoothing=0.0, num_strata=True)
