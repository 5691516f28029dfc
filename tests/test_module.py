"""CGGRLoss: curriculum, dynamic threshold, state_dict, metrics, base_loss."""
import math

import pytest
import torch
from torch import nn

from cggr import CGGRLoss
from cggr.functional import cggr_cross_entropy
from cggr.schedule import curriculum_ratio, dynamic_ratio
from helpers import make_batch


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_curriculum_values(schedule):
    f = (lambda t: t) if schedule == "linear" else (lambda t: (1 - math.cos(math.pi * t)) / 2)
    for step in (0, 1, 50, 99, 100, 250):
        expected = 1 - f(min(1, step / 100)) * (1 - 0.25)
        assert curriculum_ratio(step, 100, 0.25, schedule) == pytest.approx(expected)
    assert curriculum_ratio(0, 0, 0.3, schedule) == 0.3


def test_forward_never_steps_and_step_advances():
    crit = CGGRLoss(min_tokens_ratio=0.25, warmup_steps=4)
    logits, targets = make_batch((2, 10), 7, ignore_frac=0.0)
    for expected_ratio in (1.0, 1.0):
        crit(logits, targets)
        assert crit.get_metrics()["token_ratio"] == expected_ratio
    for step in range(1, 6):
        crit.step()
        crit(logits, targets)
        metrics = crit.get_metrics()
        assert metrics["step"] == step
        assert metrics["token_ratio"] == pytest.approx(curriculum_ratio(step, 4, 0.25))
        assert metrics["tokens_selected"] == max(1, math.ceil(metrics["token_ratio"] * 20 - 1e-6))


def test_state_dict_round_trip_of_the_step():
    crit = CGGRLoss(warmup_steps=10)
    for _ in range(7):
        crit.step()
    fresh = CGGRLoss(warmup_steps=10)
    fresh.load_state_dict(crit.state_dict())
    assert fresh.step_count == 7 and fresh.base_ratio() == crit.base_ratio()
    holder = nn.Sequential(crit)
    other = nn.Sequential(CGGRLoss(warmup_steps=10))
    other.load_state_dict(holder.state_dict())
    assert other[0].step_count == 7


def test_dynamic_threshold_moves_both_ways():
    base, s = 0.4, 0.5
    low = dynamic_ratio(base, torch.tensor(0.1), s).item()
    high = dynamic_ratio(base, torch.tensor(0.95), s).item()
    assert low > base > high
    assert low == pytest.approx(min(1, base * (1 + s * 0.8)))
    assert high == pytest.approx(max(base * (1 - s), base * (1 + s * (1 - 1.9))))
    assert dynamic_ratio(0.9, torch.tensor(0.0), 1.0).item() == 1.0  # capped at 1

    crit = CGGRLoss(min_tokens_ratio=base, warmup_steps=0, dynamic_threshold=True, threshold_sensitivity=s)
    targets = torch.randint(0, 50, (400,))
    unsure = torch.zeros(400, 50)  # uniform: confidence 1/50
    sure = torch.full((400, 50), -20.0).scatter(1, targets[:, None], 20.0)  # confidence ~1
    crit(unsure, targets)
    kept_unsure = crit.get_metrics()["tokens_selected"]
    crit(sure, targets)
    kept_sure = crit.get_metrics()["tokens_selected"]
    assert kept_unsure > base * 400 > kept_sure >= 1


def test_metrics_keys_and_values():
    crit = CGGRLoss(min_tokens_ratio=0.5, warmup_steps=0)
    logits, targets = make_batch((3, 8), 11, ignore_frac=0.25, seed=2)
    loss = crit(logits, targets)
    metrics = crit.get_metrics()
    assert set(metrics) == {"step", "token_ratio", "tokens_selected", "tokens_valid", "tokens_total",
                            "avg_confidence", "avg_entropy", "avg_difficulty", "loss_selected", "loss_full",
                            "scoring", "selection"}
    _, info = cggr_cross_entropy(logits, targets, 0.5, return_info=True)
    valid = targets != -100
    assert metrics["tokens_total"] == 24 and metrics["tokens_valid"] == int(valid.sum())
    assert metrics["loss_selected"] == pytest.approx(loss.item())
    assert metrics["loss_full"] == pytest.approx(info.full_loss.item())
    assert metrics["avg_confidence"] == pytest.approx(info.confidence[valid].mean().item())
    assert all(isinstance(v, (int, float, str)) for v in metrics.values())


def test_module_matches_functional():
    logits, targets = make_batch((2, 9), 13, seed=3)
    crit = CGGRLoss(min_tokens_ratio=0.3, warmup_steps=0, scoring="margin", selection="stratified",
                    generator=torch.Generator().manual_seed(1))
    expected = cggr_cross_entropy(logits, targets, 0.3, scoring="margin", selection="stratified",
                                  generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(crit(logits, targets), expected)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_base_loss_on_selected_rows(reduction):
    logits, targets = make_batch((2, 10), 9, torch.float64, seed=4)
    x = logits.clone().requires_grad_(True)
    crit = CGGRLoss(min_tokens_ratio=0.4, warmup_steps=0, reduction=reduction,
                    base_loss=nn.CrossEntropyLoss(reduction="none"), generator=torch.Generator().manual_seed(3))
    loss = crit(x, targets)
    loss.sum().backward()
    y = logits.clone().requires_grad_(True)
    expected = cggr_cross_entropy(y, targets, 0.4, reduction=reduction, generator=torch.Generator().manual_seed(3))
    expected.sum().backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(x.grad, y.grad)


def test_base_loss_focal_changes_the_loss():
    def focal(logits, targets, gamma=2.0):
        logp = torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)
        return -((1 - logp.exp()) ** gamma) * logp

    logits, targets = make_batch((30,), 9, seed=5, ignore_frac=0.0)
    crit = CGGRLoss(min_tokens_ratio=0.5, warmup_steps=0, base_loss=focal, generator=torch.Generator().manual_seed(0))
    plain = CGGRLoss(min_tokens_ratio=0.5, warmup_steps=0, generator=torch.Generator().manual_seed(0))
    assert crit(logits, targets).item() < plain(logits, targets).item()
