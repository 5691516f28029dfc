"""``CGGRLoss``: the stateful drop-in loss (curriculum, dynamic threshold, metrics)."""
from __future__ import annotations

from typing import Callable, Dict, Optional, Union

import torch
from torch import nn

from . import _validation as check
from .core import build_info, mean_denominator, reduce_rows, select_and_reduce, selected_first
from .functional import as_rows, max_selected_rows, prepare, run_cross_entropy
from .info import CGGRInfo
from .ops.autograd import stats_and_valid
from .schedule import Curriculum, dynamic_ratio, dynamic_ratio_range


class CGGRLoss(nn.Module):
    """Confidence-gated cross-entropy with a curriculum over the kept-token ratio.

    ``forward(logits [..., V], targets [...], reference_loss=None)`` returns the loss (see
    :func:`cggr.functional.cggr_cross_entropy`) and never advances the step; call
    :meth:`step` once per optimizer step. The step count is part of ``state_dict()``.

    Args:
        min_tokens_ratio: ratio reached at the end of the warm-up, in (0, 1].
        warmup_steps: steps from keeping every token to ``min_tokens_ratio`` (0: at once).
        schedule: ``'linear'`` or ``'cosine'``.
        dynamic_threshold: scale the ratio by the batch's mean confidence: low confidence keeps
            more tokens, high confidence fewer (docs/semantics.md, "Dynamic threshold").
        threshold_sensitivity: in [0, 1], how strongly confidence moves the ratio.
        base_loss: optional per-token loss ``f(logits[k, V], targets[k]) -> [k]`` applied to the
            selected rows only (e.g. ``nn.CrossEntropyLoss(reduction='none')``); syncs once for k.
        **options: any keyword option of ``cggr_cross_entropy`` (scoring, selection, ...).
    """

    def __init__(
        self,
        min_tokens_ratio: float = 0.25,
        warmup_steps: int = 1000,
        schedule: str = "linear",
        dynamic_threshold: bool = False,
        threshold_sensitivity: float = 0.5,
        base_loss: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
        *,
        scoring: str = "gradnorm",
        selection: str = "importance",
        logit_scale: float = 1.0,
        logit_softcap: Optional[float] = None,
        process_group: Optional[object] = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        num_strata: int = 4,
        min_tokens_per_sequence: int = 1,
        generator: Optional[torch.Generator] = None,
        return_info: bool = False,
        check_targets: bool = True,
        inplace_backward: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.curriculum = Curriculum(min_tokens_ratio, warmup_steps, schedule)
        check.check_number("threshold_sensitivity", threshold_sensitivity, 0.0, 1.0)
        check.check_choice("backend", backend, check.BACKENDS)
        if base_loss is not None and not callable(base_loss):
            raise ValueError(f"base_loss must be callable or None, got {type(base_loss).__name__}")
        self.opts = check.make_options(
            scoring=scoring, selection=selection, ignore_index=ignore_index, reduction=reduction,
            label_smoothing=label_smoothing, z_loss=z_loss, num_strata=num_strata,
            min_tokens_per_sequence=min_tokens_per_sequence, generator=generator,
            inplace_backward=inplace_backward, logit_scale=logit_scale, logit_softcap=logit_softcap,
            process_group=process_group,
        )
        self.dynamic_threshold = bool(dynamic_threshold)
        self.threshold_sensitivity = float(threshold_sensitivity)
        self.base_loss = base_loss
        self.return_info = return_info
        self.check_targets = check_targets
        self.backend = backend
        self._last: Optional[Dict[str, object]] = None

    # -- schedule ---------------------------------------------------------------------------
    @property
    def min_tokens_ratio(self) -> float:
        return self.curriculum.min_tokens_ratio

    @property
    def warmup_steps(self) -> int:
        return self.curriculum.warmup_steps

    @property
    def schedule(self) -> str:
        return self.curriculum.schedule

    @property
    def step_count(self) -> int:
        return self.curriculum.step_count

    @step_count.setter
    def step_count(self, value: int) -> None:
        self.curriculum.step_count = int(value)

    def base_ratio(self) -> float:
        """The curriculum's ratio at the current step (before the dynamic threshold)."""
        return self.curriculum.ratio

    def step(self) -> None:
        """Advance the curriculum by one optimizer step."""
        self.curriculum.step()

    def get_extra_state(self):
        return self.curriculum.state_dict()

    def set_extra_state(self, state) -> None:
        self.curriculum.load_state_dict(state)

    # -- forward ----------------------------------------------------------------------------
    def _ratio_spec(self):
        """The curriculum ratio, or with the dynamic threshold a function of the batch's confidence."""
        base = self.base_ratio()
        if not self.dynamic_threshold:
            return base
        sensitivity = self.threshold_sensitivity
        return lambda confidence: dynamic_ratio(base, confidence, sensitivity)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor,
                reference_loss: Optional[torch.Tensor] = None):
        check.check_logits_targets(logits, targets)
        self._last = None  # the last call's tensors go first: a CUDA graph replays only once they are let go
        ratio = self._ratio_spec()
        if self.base_loss is None:
            # The info is made only if asked for, here or later by get_metrics().
            sink = []
            result = run_cross_entropy(logits, targets, ratio, self.opts, self.backend, self.check_targets,
                                       self.return_info, reference_loss, sink=sink)
            loss, info = result if self.return_info else (result, None)
            self._last = {"loss": loss.detach(), "parts": sink[0], "info": info, "shape": targets.shape}
        else:
            loss, info = self._forward_base_loss(logits, targets, ratio, reference_loss)
            self._last = {"loss": loss.detach(), "parts": None, "info": info, "shape": targets.shape}
        return (loss, info) if self.return_info else loss

    def _forward_base_loss(self, logits, targets, ratio, reference_loss):
        """Fused scoring and selection, then ``base_loss`` on the selected rows, with no host sync:
        it runs on as many rows as the ratio can select at most (``max_selected_rows``), the
        selected ones first; any others go in as zeros with target 0 and drop out."""
        opts = self.opts
        backend, seq_shape, flat_targets, reference_loss = prepare(
            logits, targets, logits.shape[-1], opts, self.backend, self.check_targets, reference_loss)
        logits_rows = as_rows(logits)  # unit stride along V, as the statistics kernel reads it
        with torch.no_grad():
            stats, valid = stats_and_valid(backend, logits_rows.detach(), flat_targets, opts, reference_loss, True)
            reduced = select_and_reduce(stats, valid, ratio, opts, seq_shape)
        info = build_info(stats, reduced)
        base = self.base_ratio()
        bound = dynamic_ratio_range(base, self.threshold_sensitivity)[1] if self.dynamic_threshold else base
        rows = logits_rows.reshape(-1, logits.shape[-1])
        n_rows = rows.shape[0]
        index = selected_first(info.mask, max_selected_rows(bound, opts, n_rows, seq_shape))
        kept = info.mask.index_select(0, index)
        picked = torch.where(kept[:, None], rows.index_select(0, index), 0.0)  # no NaN from unselected rows
        chosen = self.base_loss(picked, torch.where(kept, flat_targets.index_select(0, index), 0)).reshape(-1)
        chosen = torch.where(kept, chosen * info.weight.index_select(0, index).to(chosen.dtype), 0.0)
        weighted = torch.zeros(n_rows, dtype=chosen.dtype, device=rows.device).index_put((index,), chosen)
        loss = reduce_rows(weighted, opts, mean_denominator(opts, info.n_valid, info.n_selected))
        return (loss.reshape(targets.shape) if opts.reduction == "none" else loss), info.reshape_rows(targets.shape)

    # -- metrics ----------------------------------------------------------------------------
    def last_info(self) -> Optional[CGGRInfo]:
        """The :class:`CGGRInfo` of the last forward (made now if it was not asked for), or None."""
        if self._last is None:
            return None
        if self._last["info"] is None:
            stats, reduced = self._last["parts"]
            self._last["info"] = build_info(stats, reduced).reshape_rows(self._last["shape"])
        return self._last["info"]

    def get_metrics(self) -> Dict[str, Union[int, float, str]]:
        """Plain Python numbers for the last forward (this is the one place that syncs)."""
        metrics: Dict[str, Union[int, float, str]] = {"step": self.step_count, "scoring": self.opts.scoring,
                                                     "selection": self.opts.selection}
        info = self.last_info()
        if info is None:
            metrics.update(token_ratio=self.base_ratio(), tokens_selected=0, tokens_valid=0, tokens_total=0,
                           avg_confidence=0.0, avg_entropy=0.0, avg_difficulty=0.0, loss_selected=0.0,
                           loss_full=0.0)
            return metrics
        summary = info.summary()
        metrics.update(
            token_ratio=summary["ratio"],
            tokens_selected=summary["n_selected"],
            tokens_valid=summary["n_valid"],
            tokens_total=info.mask.numel(),
            avg_confidence=summary["avg_confidence"],
            avg_entropy=summary["avg_entropy"],
            avg_difficulty=summary["avg_difficulty"],
            loss_selected=float(self._last["loss"].float().sum()),  # reduction='none': the sum of the rows
            loss_full=summary["full_loss"],
        )
        return metrics

    def extra_repr(self) -> str:
        return (f"min_tokens_ratio={self.min_tokens_ratio}, warmup_steps={self.warmup_steps}, "
                f"schedule={self.schedule!r}, scoring={self.opts.scoring!r}, selection={self.opts.selection!r}, "
                f"dynamic_threshold={self.dynamic_threshold}, step={self.step_count}")
