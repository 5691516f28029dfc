"""process_group: two CPU processes (gloo) select over their concatenated batch exactly as one
process does over the whole batch; DDP and FSDP2 training steps match single-process steps."""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import cggr
from cggr.functional import cggr_cross_entropy, cggr_linear_cross_entropy

WORLD = 2
SELECTIONS = ["importance", "topk", "random", "stratified", "sequence_aware"]


def _batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2 * WORLD, 7, 13, generator=g, dtype=torch.float64) * 2
    targets = torch.randint(0, 13, (2 * WORLD, 7), generator=g)
    targets[1, :3] = -100
    hidden = torch.randn(2 * WORLD, 7, 5, generator=g, dtype=torch.float64)
    weight = torch.randn(13, 5, generator=g, dtype=torch.float64)
    return logits, targets, hidden, weight


def _cases(group, rows):
    """(name, loss, grads, mask) of every case, on ``rows`` of the batch."""
    logits, targets, hidden, weight = _batch()
    out = []
    for selection in SELECTIONS:
        for path in ("plain", "linear"):
            x = (logits if path == "plain" else hidden)[rows].clone().requires_grad_(True)
            w = weight.clone().requires_grad_(True)
            kw = dict(selection=selection, process_group=group, return_info=True, label_smoothing=0.1,
                      generator=torch.Generator().manual_seed(5))
            if path == "plain":
                loss, info = cggr_cross_entropy(x, targets[rows], 0.4, **kw)
            else:
                loss, info = cggr_linear_cross_entropy(x, w, targets[rows], 0.4, chunk_size=3, **kw)
            loss.backward()
            grads = (x.grad,) if path == "plain" else (x.grad, w.grad)
            out.append((f"{path}/{selection}", loss.detach(), grads, info.mask, info.weight, info.full_loss))
    crit = cggr.CGGRLoss(min_tokens_ratio=0.5, warmup_steps=0, dynamic_threshold=True, process_group=group,
                         generator=torch.Generator().manual_seed(1), return_info=True)
    x = logits[rows].clone().requires_grad_(True)
    loss, info = crit(x, targets[rows])
    loss.backward()
    out.append(("module/dynamic", loss.detach(), (x.grad,), info.mask, info.weight, info.full_loss))
    return out


def _ddp_step(group, rows, ddp):
    """One SGD step of a tiny model (embedding, tied head) on ``rows``; returns its parameters."""
    torch.manual_seed(0)
    embedding = torch.nn.Embedding(13, 5).double()
    model = torch.nn.Sequential(embedding, torch.nn.Tanh())
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    _, targets, _, _ = _batch()
    tokens = targets.clamp(min=0)
    for _ in range(2):
        hidden = model(tokens[rows])
        loss = cggr_linear_cross_entropy(hidden, embedding.weight, targets[rows], 0.5, process_group=group,
                                         generator=torch.Generator().manual_seed(2))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


def _fsdp_step(group, rows, fsdp):
    """Two SGD steps of a tiny model whose embedding, FSDP2-sharded, is also the LM head: the loss
    reads the sharded weight outside the model's forward; returns the whole weight after."""
    torch.manual_seed(0)
    embedding = torch.nn.Embedding(13, 6)
    model = torch.nn.Sequential(embedding, torch.nn.Tanh())
    if fsdp:
        from torch.distributed.fsdp import fully_shard
        fully_shard(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    _, targets, _, _ = _batch()
    for _ in range(2):
        hidden = model(targets.clamp(min=0)[rows])
        loss = cggr_linear_cross_entropy(hidden, model[0].weight, targets[rows], 0.5, process_group=group,
                                         generator=torch.Generator().manual_seed(2))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    weight = model[0].weight
    return (weight.full_tensor() if hasattr(weight, "full_tensor") else weight).detach().clone()


def _accumulation_step(group, rows, ddp, fsdp_bf16=False):
    """One optimizer step over two micro-batches (DDP skips the first all-reduce with no_sync;
    FSDP2 with bf16 parameters and fp32 reductions skips it with set_requires_gradient_sync);
    the loss is divided by the micro-batch count. Returns the parameters after the step."""
    import contextlib

    torch.manual_seed(0)
    embedding = torch.nn.Embedding(13, 6)
    model = torch.nn.Sequential(embedding, torch.nn.Linear(6, 6), torch.nn.Tanh())
    if fsdp_bf16:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        fully_shard(model, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    elif ddp:
        model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    _, targets, _, _ = _batch()
    for micro in range(2):
        tokens = targets.clamp(min=0).roll(micro, dims=1)
        if fsdp_bf16:
            model.set_requires_gradient_sync(micro == 1)
            context = contextlib.nullcontext()
        else:
            context = model.no_sync() if ddp and micro == 0 else contextlib.nullcontext()
        with context:
            hidden = model(tokens[rows])
            weight = embedding.weight
            weight = weight.full_tensor() if hasattr(weight, "full_tensor") else weight
            loss = cggr_linear_cross_entropy(hidden.float(), weight.float(), targets.roll(micro, dims=1)[rows], 0.5,
                                             process_group=group, generator=torch.Generator().manual_seed(micro))
            (loss / 2).backward()
    optimizer.step()
    return [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().float().clone() for p in model.parameters()]


def _transformers_grads(group, rows):
    """Loss and head-weight gradient of a tiny Llama patched with apply_cggr on ``rows`` (None
    without transformers)."""
    try:
        import transformers
    except ImportError:
        return None
    from cggr.integrations.transformers import apply_cggr

    config = transformers.LlamaConfig(vocab_size=13, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).double().train()
    apply_cggr(model, 0.5, process_group=group, generator=torch.Generator().manual_seed(4))
    _, targets, _, _ = _batch()
    ids = targets.clamp(min=0)
    loss = model(input_ids=ids[rows], labels=targets[rows]).loss
    loss.backward()
    return loss.detach(), model.get_output_embeddings().weight.grad.clone()


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        rows = slice(rank * 2, (rank + 1) * 2)
        torch.save({"cases": _cases(dist.group.WORLD, rows), "ddp": _ddp_step(dist.group.WORLD, rows, True),
                    "fsdp": _fsdp_step(dist.group.WORLD, rows, True),
                    "accumulation": _accumulation_step(dist.group.WORLD, rows, True),
                    "fsdp_bf16": _accumulation_step(dist.group.WORLD, rows, False, fsdp_bf16=True),
                    "transformers": _transformers_grads(dist.group.WORLD, rows)},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(os.path.join(tmp, "init"), tmp), nprocs=WORLD, join=True)
        yield [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


def test_group_selection_equals_one_process_on_the_whole_batch(ranks):
    single = _cases(None, slice(None))
    for index, (name, loss, grads, mask, weight, full_loss) in enumerate(single):
        parts = [r["cases"][index] for r in ranks]
        assert all(p[0] == name for p in parts)
        torch.testing.assert_close(torch.cat([p[3] for p in parts]), mask, msg=name)
        torch.testing.assert_close(torch.cat([p[4] for p in parts]), weight, msg=name)
        # Each process returns its share times the group size: their mean is the whole loss.
        torch.testing.assert_close(torch.stack([p[1] for p in parts]).mean(), loss, msg=name)
        torch.testing.assert_close(parts[0][5], full_loss, msg=name)
        torch.testing.assert_close(torch.cat([p[2][0] for p in parts]) / WORLD, grads[0], msg=name)
        if len(grads) > 1:  # the shared weight: gradients averaged over the group, as DDP does
            torch.testing.assert_close(sum(p[2][1] for p in parts) / WORLD, grads[1], msg=name)


def test_ddp_steps_match_single_process_steps(ranks):
    single = _ddp_step(None, slice(None), False)
    for r in ranks:
        for a, b in zip(r["ddp"], single):
            torch.testing.assert_close(a, b)


def test_fsdp2_sharded_tied_head_steps_match_single_process_steps(ranks):
    single = _fsdp_step(None, slice(None), False)
    for r in ranks:
        torch.testing.assert_close(r["fsdp"], single)


def test_gradient_accumulation_under_ddp_matches_single_process_steps(ranks):
    single = _accumulation_step(None, slice(None), False)
    for r in ranks:
        for a, b in zip(r["accumulation"], single):
            torch.testing.assert_close(a, b)


def test_fsdp2_bf16_mixed_precision_with_accumulation_is_close_to_single_process(ranks):
    single = _accumulation_step(None, slice(None), False)
    for r in ranks:
        for a, b in zip(r["fsdp_bf16"], single):
            torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_apply_cggr_with_a_process_group_matches_one_process(ranks):
    pytest.importorskip("transformers")
    loss, grad = _transformers_grads(None, slice(None))
    torch.testing.assert_close(torch.stack([r["transformers"][0] for r in ranks]).mean(), loss)
    torch.testing.assert_close(sum(r["transformers"][1] for r in ranks) / WORLD, grad)


def test_process_group_must_be_a_group():
    with pytest.raises(ValueError, match="process_group"):
        cggr_cross_entropy(torch.randn(3, 5), torch.tensor([1, 2, 3]), 0.5, process_group="world")
