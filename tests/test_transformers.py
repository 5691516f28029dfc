"""apply_cggr on tiny random transformers models of several families (no downloads)."""
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

import cggr  # noqa: E402
from cggr.integrations.transformers import CGGRCallback, apply_cggr, cggr_state, remove_cggr  # noqa: E402

VOCAB = 97
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


def _configs():
    from transformers import (
        CohereConfig,
        Gemma2Config,
        GPT2Config,
        GPTNeoXConfig,
        GraniteConfig,
        LlamaConfig,
        MistralConfig,
        Phi3Config,
        Qwen2Config,
    )

    return {
        "llama": LlamaConfig(**SMALL),
        "qwen2": Qwen2Config(**SMALL),
        "mistral": MistralConfig(**SMALL),
        "gemma2": Gemma2Config(**SMALL, head_dim=8, final_logit_softcapping=3.0, attn_logit_softcapping=None),
        "phi3": Phi3Config(**SMALL, pad_token_id=0),
        "cohere": CohereConfig(**SMALL, logit_scale=0.5),
        "granite": GraniteConfig(**SMALL, logits_scaling=4.0),
        "gpt2": GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                           embd_pdrop=0.0, attn_pdrop=0.0),
        "gpt_neox": GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=64),
    }


def _model(name, seed=0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = _configs()[name]
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # a head that is not tiny, so that the loss depends on it clearly
        model.get_output_embeddings().weight.mul_(20)
    return model.train()


def _batch(seed=1, batch=2, seq=9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100
    return ids, labels


def _loss_and_grads(model, ids, labels, **kw):
    model.zero_grad()
    out = model(input_ids=ids, labels=labels, **kw)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral", "gemma2", "phi3", "cohere", "granite", "gpt2",
                                  "gpt_neox"])
def test_ratio_one_equals_the_models_own_loss(name):
    model = _model(name)
    ids, labels = _batch()
    own, own_grads = _loss_and_grads(model, ids, labels)
    apply_cggr(model, 1.0)
    ours, our_grads = _loss_and_grads(model, ids, labels)
    assert ours.logits is None
    torch.testing.assert_close(ours.loss, own.loss)
    assert own_grads.keys() == our_grads.keys()
    for key in own_grads:
        torch.testing.assert_close(our_grads[key], own_grads[key], rtol=1e-4, atol=1e-5, msg=key)
    remove_cggr(model)
    again, _ = _loss_and_grads(model, ids, labels)
    assert again.logits is not None and cggr_state(model) is None
    torch.testing.assert_close(again.loss, own.loss)


@pytest.mark.parametrize("name", ["llama", "gemma2", "gpt2"])
def test_below_ratio_one_equals_the_functional_loss_on_the_hidden_states(name):
    model = _model(name)
    ids, labels = _batch()
    apply_cggr(model, 0.4, selection="topk", scoring="combined")
    out, _ = _loss_and_grads(model, ids, labels)
    hidden = model.base_model(input_ids=ids).last_hidden_state
    targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    state = cggr_state(model)
    expected = cggr.cggr_linear_cross_entropy(hidden, model.get_output_embeddings().weight, targets, 0.4,
                                              selection="topk", scoring="combined", logit_softcap=state.logit_softcap)
    torch.testing.assert_close(out.loss, expected)
    metrics = state.metrics()
    valid = int((targets != -100).sum())
    assert metrics["cggr/kept_tokens"] == math.ceil(0.4 * valid - 1e-6) and metrics["cggr/valid_tokens"] == valid


def test_calls_without_labels_and_eval_mode_are_unchanged():
    model = _model("llama")
    ids, labels = _batch()
    logits = model(input_ids=ids).logits
    apply_cggr(model, 0.25)
    torch.testing.assert_close(model(input_ids=ids).logits, logits)
    model.eval()
    assert model(input_ids=ids, labels=labels).logits is not None


def test_num_items_in_batch_sums_the_kept_rows_over_the_global_count():
    model = _model("qwen2")
    ids, labels = _batch()
    apply_cggr(model, 1.0)
    n_items = torch.tensor(40)
    out = model(input_ids=ids, labels=labels, num_items_in_batch=n_items)
    mean = model(input_ids=ids, labels=labels).loss
    valid = int((torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100) != -100).sum())
    torch.testing.assert_close(out.loss, mean * valid / 40)


def test_autocast_with_fp32_parameters():
    model = _model("llama").float()
    ids, labels = _batch()
    apply_cggr(model, 0.5, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    head = model.get_output_embeddings().weight
    assert head.grad is not None and head.grad.dtype == torch.float32 and torch.isfinite(out.loss)


def test_frozen_head_forms_no_weight_gradient():
    model = _model("llama")
    for p in model.parameters():
        p.requires_grad_(False)
    model.model.layers[0].mlp.down_proj.weight.requires_grad_(True)  # as a LoRA adapter would be trainable
    apply_cggr(model, 0.5)
    ids, labels = _batch()
    model(input_ids=ids, labels=labels).loss.backward()
    assert model.get_output_embeddings().weight.grad is None
    assert model.model.layers[0].mlp.down_proj.weight.grad is not None


def test_apply_refuses_a_model_without_a_linear_head():
    with pytest.raises(ValueError, match="output embedding"):
        apply_cggr(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="reduction"):
        apply_cggr(_model("llama"), 0.5, reduction="sum")
    with pytest.raises(ValueError, match="ratio"):
        apply_cggr(_model("llama"), 1.5)


def test_trainer_with_gradient_accumulation_matches_an_unpatched_run(tmp_path):
    """Ratio 1 under Trainer (two micro-batches a step): the same losses and weights as the
    model's own loss; the callback advances the curriculum and logs the metrics."""
    from transformers import Trainer, TrainingArguments

    g = torch.Generator().manual_seed(3)
    rows = []
    for _ in range(8):
        ids = torch.randint(0, VOCAB, (7 + int(torch.randint(0, 3, (1,), generator=g)),), generator=g)
        rows.append({"input_ids": ids, "labels": ids.clone()})

    def collate(items):
        width = max(len(i["input_ids"]) for i in items)
        ids = torch.stack([torch.nn.functional.pad(i["input_ids"], (0, width - len(i["input_ids"])))
                           for i in items])
        labels = torch.stack([torch.nn.functional.pad(i["labels"], (0, width - len(i["labels"])), value=-100)
                              for i in items])
        return {"input_ids": ids, "labels": labels}

    results = []
    for patched in (False, True):
        model = _model("llama").float()
        callbacks = []
        if patched:
            curriculum = cggr.Curriculum(1.0, warmup_steps=0)
            apply_cggr(model, curriculum)
            callbacks = [CGGRCallback(model)]
        args = TrainingArguments(output_dir=str(tmp_path / str(patched)), per_device_train_batch_size=2,
                                 gradient_accumulation_steps=2, max_steps=2, learning_rate=1e-3, logging_steps=1,
                                 report_to=[], save_strategy="no", use_cpu=True, seed=0, data_seed=0,
                                 dataloader_drop_last=True)
        trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate, callbacks=callbacks)
        trainer.train()
        logs = [entry for entry in trainer.state.log_history if "loss" in entry]
        results.append((logs, [p.detach().clone() for p in model.parameters()]))
        if patched:
            assert curriculum.step_count == 1 and all("cggr/kept_tokens" in entry for entry in logs)
    (own_logs, own_params), (our_logs, our_params) = results
    for a, b in zip(own_logs, our_logs):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    for a, b in zip(own_params, our_params):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_peft_lora_model_matches_its_own_loss():
    peft = pytest.importorskip("peft")
    model = _model("llama")
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    ids, labels = _batch()
    own, own_grads = _loss_and_grads(lora, ids, labels)
    apply_cggr(lora, 1.0)
    ours, our_grads = _loss_and_grads(lora, ids, labels)
    torch.testing.assert_close(ours.loss, own.loss)
    assert own_grads.keys() == our_grads.keys() and all("lora" in key for key in our_grads)
    for key in own_grads:
        torch.testing.assert_close(our_grads[key], own_grads[key], rtol=1e-4, atol=1e-5, msg=key)
    assert lora.get_base_model().get_output_embeddings().weight.grad is None  # the frozen head
