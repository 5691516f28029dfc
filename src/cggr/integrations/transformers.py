"""One line in Hugging Face ``transformers``: ``apply_cggr(model)``.

``model(input_ids, labels=labels)`` of a patched causal LM computes its loss with
:func:`cggr.cggr_linear_cross_entropy` on the final hidden states, so the ``[B, T, V]`` logits
are never formed and the head's backward costs in proportion to the tokens kept::

    from cggr.integrations.transformers import apply_cggr, CGGRCallback
    apply_cggr(model, ratio=cggr.Curriculum(0.25, warmup_steps=1000))
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[CGGRCallback(model)])

The usual label shift, ``ignore_index`` (-100), ``shift_labels`` and ``num_items_in_batch``
(gradient accumulation: the kept rows' summed loss over the global token count, as transformers
does) are honoured; the model's final-logit softcap (Gemma 2/3), logit scale (Cohere) and logit
divisor (Granite) are applied inside the fused op. Calls without labels, and calls in eval mode,
run the model's own forward unchanged (full logits, the model's own loss). The output's
``logits`` is None when cggr computed the loss. PEFT/LoRA models work: a frozen head gets no
weight gradient.
"""
from __future__ import annotations

import functools
import inspect
import types
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

import torch
import torch.nn.functional as F

from .. import _validation as check
from ..core import LossOptions, build_info
from ..functional import Ratio, linear_cross_entropy
from ..schedule import Curriculum

__all__ = ["apply_cggr", "remove_cggr", "CGGRCallback", "cggr_state"]

_LOSS_KWARGS = ("num_items_in_batch", "shift_labels", "ignore_index")
_DROPPED = ("logits_to_keep", "num_logits_to_keep", "return_dict")


@dataclass
class CGGRState:
    """What :func:`apply_cggr` attaches to a model: the ratio (or curriculum), the loss options,
    the model's logit transform, and what the last forward selected (for metrics)."""

    ratio: Union[float, torch.Tensor, Curriculum]
    options: Dict[str, Any]
    logit_scale: float = 1.0
    logit_softcap: Optional[float] = None
    last: List[Any] = field(default_factory=list)

    def metrics(self) -> Dict[str, float]:
        """Kept tokens, the loss over all valid tokens and the mean confidence of the last
        training forward (this syncs; call it when logging)."""
        if not self.last:
            return {}
        summary = build_info(*self.last[-1]).summary()
        return {"cggr/ratio": summary["ratio"], "cggr/kept_tokens": summary["n_selected"],
                "cggr/valid_tokens": summary["n_valid"], "cggr/loss_all_tokens": summary["full_loss"],
                "cggr/mean_confidence": summary["avg_confidence"]}


def _hf_model(model):
    """The transformers model under a PEFT wrapper, if any."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def cggr_state(model) -> Optional[CGGRState]:
    return getattr(_hf_model(model), "_cggr_state", None)


def _logit_transform(model) -> tuple:
    """(logit_scale, logit_softcap) that the model applies to its logits after the head."""
    config = model.config
    text = getattr(config, "get_text_config", lambda: config)()
    softcap = getattr(text, "final_logit_softcapping", None) or None
    scale = 1.0
    if getattr(text, "logits_scaling", None):  # Granite divides its logits
        scale = 1.0 / float(text.logits_scaling)
    if getattr(model, "logit_scale", None) is not None and not isinstance(model.logit_scale, torch.Tensor):
        scale *= float(model.logit_scale)  # Cohere multiplies
    elif getattr(text, "logit_scale", None) is not None and not isinstance(text.logit_scale, bool):
        scale *= float(text.logit_scale)
    return scale, (float(softcap) if softcap is not None else None)


def apply_cggr(model, ratio: Ratio = 1.0, **options) -> Any:
    """Make ``model(..., labels=...)`` (training mode) compute its loss with cggr.

    Args:
        model: a transformers causal LM (``*ForCausalLM``) whose output embedding is a linear
            layer, or a PEFT model wrapping one.
        ratio: float in (0, 1], 0-d tensor, or a :class:`cggr.Curriculum` (advanced by
            :class:`CGGRCallback` under ``Trainer``, or by your loop's ``curriculum.step()``).
        **options: keyword options of :func:`cggr.cggr_linear_cross_entropy` (``scoring``,
            ``selection``, ``generator``, ``label_smoothing``, ``z_loss``, ``chunk_size``, ...).
            ``reduction`` is ``'mean'`` (``'sum'`` over ``num_items_in_batch`` when given).

    Returns the model (patched in place). :func:`remove_cggr` undoes it.
    """
    hf = _hf_model(model)
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(f"apply_cggr needs a causal LM whose output embedding is an nn.Linear; "
                         f"{type(hf).__name__} has {type(head).__name__}")
    if getattr(hf, "base_model", None) is None or hf.base_model is hf:
        raise ValueError(f"apply_cggr needs a causal LM with a base model (its decoder); {type(hf).__name__} has none")
    for name in ("reduction", "return_info", "logit_scale", "logit_softcap"):
        if name in options:
            raise ValueError(f"apply_cggr sets {name} itself; it cannot be passed")
    if not isinstance(ratio, Curriculum):
        check.check_ratio(ratio, torch.device("cpu") if not isinstance(ratio, torch.Tensor) else ratio.device)
    _split_options(dict(options))  # bad options fail here, not at the first training step
    scale, softcap = _logit_transform(hf)
    remove_cggr(hf)
    hf._cggr_state = CGGRState(ratio=ratio, options=dict(options), logit_scale=scale, logit_softcap=softcap)

    # The model's own signature, so that Trainer keeps the dataset columns it names and sees
    # that it takes loss keywords (num_items_in_batch).
    @functools.wraps(type(hf).forward)
    def forward(self, *args, **kwargs):
        return _cggr_forward(self, *args, **kwargs)

    forward._cggr_patched = True
    hf.forward = types.MethodType(forward, hf)
    return model


_CALL_OPTIONS = ("backend", "check_targets", "chunk_size", "fp32_grad_accumulation", "weight_grad_in_place")


def _split_options(options: Dict[str, Any]):
    """(checked LossOptions, the linear path's other options) from apply_cggr's keywords."""
    call = {name: options.pop(name) for name in _CALL_OPTIONS if name in options}
    unknown = set(options) - set(LossOptions.__dataclass_fields__)
    if unknown:
        raise ValueError(f"apply_cggr got unknown options {sorted(unknown)}")
    check.check_choice("backend", call.get("backend", "auto"), check.BACKENDS)
    return check.make_options(**options), call


def remove_cggr(model) -> Any:
    """Undo :func:`apply_cggr`: the model's own forward and loss again."""
    hf = _hf_model(model)
    if "forward" in vars(hf) and getattr(hf.forward, "_cggr_patched", False):
        del hf.forward
    if hasattr(hf, "_cggr_state"):
        del hf._cggr_state
    return model


def _cggr_forward(self, *args, **kwargs):
    """The patched forward: the decoder, then the fused head and loss."""
    original = type(self).forward
    labels = kwargs.get("labels")
    if labels is None and args:  # labels passed by position: name every argument
        bound = inspect.signature(original).bind(self, *args, **kwargs)
        var_keyword = [p.name for p in bound.signature.parameters.values() if p.kind == p.VAR_KEYWORD]
        named = {k: v for k, v in bound.arguments.items() if k != "self" and k not in var_keyword}
        kwargs = dict(named, **(bound.arguments.get(var_keyword[0], {}) if var_keyword else {}))
        args, labels = (), named.get("labels")
    if labels is None or not self.training or not torch.is_grad_enabled():
        return original(self, *args, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    kwargs.pop("labels")
    state: CGGRState = self._cggr_state
    loss_kwargs = {name: kwargs.pop(name) for name in _LOSS_KWARGS if name in kwargs}
    for name in _DROPPED:
        kwargs.pop(name, None)
    outputs = self.base_model(*args, return_dict=True, **kwargs)
    hidden = outputs[0]
    head = self.get_output_embeddings()
    ignore_index = loss_kwargs.get("ignore_index", state.options.get("ignore_index", -100))
    targets = loss_kwargs.get("shift_labels")
    if targets is None:  # position t predicts token t + 1; the last position predicts nothing
        targets = F.pad(labels[..., 1:], (0, 1), value=ignore_index)
    targets = targets.to(hidden.device)
    num_items = loss_kwargs.get("num_items_in_batch")
    options = dict(state.options, ignore_index=ignore_index, reduction="sum" if num_items is not None else "mean",
                   logit_scale=state.logit_scale, logit_softcap=state.logit_softcap)
    loss = _linear_loss(hidden, head.weight, head.bias, targets, state, options)
    if num_items is not None:
        loss = loss / (num_items.to(loss.device) if isinstance(num_items, torch.Tensor) else num_items)
        if state.options.get("process_group") is not None:
            # A global num_items_in_batch: Trainer multiplies by the process count itself.
            import torch.distributed as dist
            loss = loss / dist.get_world_size(state.options["process_group"])
    return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=getattr(outputs, "past_key_values", None),
                                  hidden_states=getattr(outputs, "hidden_states", None),
                                  attentions=getattr(outputs, "attentions", None))


def _linear_loss(hidden, weight, bias, targets, state: CGGRState, options: Dict[str, Any]) -> torch.Tensor:
    """The fused loss with the state's ratio; keeps what metrics need in ``state.last``."""
    opts, call = _split_options(options)
    state.last.clear()
    return linear_cross_entropy(hidden, weight, targets, state.ratio, bias, opts, sink=state.last, **call)


def _callback_base():
    try:
        from transformers import TrainerCallback
    except ImportError:  # pragma: no cover - the callback is only used with transformers
        return object
    return TrainerCallback


class CGGRCallback(_callback_base()):
    """``Trainer`` callback for a model patched by :func:`apply_cggr`: the curriculum follows the
    trainer's global step (so it resumes with a checkpoint), and the last step's kept tokens,
    loss over all tokens and mean confidence join the trainer's logs."""

    def __init__(self, model) -> None:
        self.model = model

    def _state(self) -> Optional[CGGRState]:
        return cggr_state(self.model)

    def on_step_begin(self, args, state, control, **kwargs):
        cggr = self._state()
        if cggr is not None and isinstance(cggr.ratio, Curriculum):
            cggr.ratio.step_count = state.global_step
        return control

    def on_train_begin(self, args, state, control, **kwargs):
        return self.on_step_begin(args, state, control, **kwargs)

    def on_log(self, args, state, control, logs=None, **kwargs):
        cggr = self._state()
        if cggr is not None and logs is not None and "loss" in logs:
            metrics = cggr.metrics()
            logs.update(metrics)  # for the reporting callbacks that run after this one
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(metrics)  # the trainer recorded its copy before the callbacks
        return control
