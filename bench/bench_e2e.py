"""Whole training steps of real model shapes: forward, backward and a fused AdamW step.

    python bench/bench_e2e.py [--models smollm2-135m qwen2.5-0.5b llama-3.2-1b] [--max-batch [MODEL ...]]
                              [--no-timing] [--out FILE]

Models are built from their configurations with random weights (nothing is downloaded), T = 2048.
Two precision set-ups: bf16 parameters, and fp32 parameters under bf16 autocast (what
``Trainer(bf16=True)`` does). Methods: the model's own loss; Liger-Kernel's patch and
cut-cross-entropy when installed (the latter with its default gradient filter, and exact);
``apply_cggr`` at ratio 1, 0.5 and 0.25 with the default selection, and 0.25 with ``random``.
Reported per method: median step time over the timed steps, tokens per second, and peak memory.
``--max-batch`` also searches the largest batch that fits (own loss against cggr ratio 1);
``--no-timing`` skips the timed steps.
"""
import argparse
import gc
import os
import statistics
import sys
import time
import types

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))
from _results import write_result  # noqa: E402
from cggr.integrations.transformers import apply_cggr, remove_cggr  # noqa: E402

SEQ_LEN = 2048
MODELS = {  # shapes of the public checkpoints; batch sized for one H200
    "smollm2-135m": ("llama", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                   tie_word_embeddings=True), 16),
    "qwen2.5-0.5b": ("qwen2", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                   num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                                   tie_word_embeddings=True), 8),
    "llama-3.2-1b": ("llama", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                   num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                   tie_word_embeddings=True, head_dim=64), 4),
}


def build(kind, shape, dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    config = (LlamaConfig if kind == "llama" else Qwen2Config)(max_position_embeddings=SEQ_LEN, **shape)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, torch_dtype=dtype)
    return model.train()


def patch(model, method):
    """Apply a method's loss to the model; returns an undo function."""
    if method == "own loss":
        return lambda: None
    if method.startswith("cggr"):
        ratio = float(method.split("r=")[1].split()[0])
        options = {"selection": "random"} if "random" in method else {}
        apply_cggr(model, ratio, check_targets=False, **options)
        return lambda: remove_cggr(model)
    if method == "liger":
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
        _apply_liger_kernel_to_instance(model=model)
        return None  # cannot be undone: the model is rebuilt after it
    if method.startswith("cut-cross-entropy"):
        from cut_cross_entropy import linear_cross_entropy  # its release here has no transformers patch

        # Its default skips gradient blocks whose entries are all small; "exact" keeps every one.
        filter_eps = None if method.endswith("exact") else "high"

        def forward(input_ids=None, labels=None, **kwargs):
            hidden = model.base_model(input_ids=input_ids).last_hidden_state
            weight = model.get_output_embeddings().weight
            if torch.is_autocast_enabled("cuda"):
                hidden, weight = hidden.to(torch.bfloat16), weight.to(torch.bfloat16)
            loss = linear_cross_entropy(hidden[:, :-1], weight, labels[:, 1:], filter_eps=filter_eps)
            return types.SimpleNamespace(loss=loss)
        model.forward = forward
        return lambda: delattr(model, "forward")
    raise ValueError(method)


def time_steps(model, batch, autocast, steps=12, warmup=3):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, SEQ_LEN), device="cuda", generator=g)
    times = []
    torch.cuda.reset_peak_memory_stats()
    for step in range(warmup + steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if step >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    peak = torch.cuda.max_memory_allocated()
    del optimizer
    return statistics.median(times), peak, float(loss)


def max_batch(name, method, autocast, start):
    """Largest batch (doubling from ``start``, then halving the gap) whose step fits."""
    kind, shape, _ = MODELS[name]
    fits, fails = 0, None
    batch = start
    while fails is None or fails - fits > max(1, fits // 8):
        model = build(kind, shape, torch.float32 if autocast else torch.bfloat16)
        patch(model, method)
        try:
            time_steps(model, batch, autocast, steps=1, warmup=0)
            fits = batch
        except torch.OutOfMemoryError:
            fails = batch
        del model
        gc.collect()
        torch.cuda.empty_cache()
        batch = batch * 2 if fails is None else (fits + fails) // 2
    return fits


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--precisions", nargs="+", default=["bf16", "fp32+autocast"])
    parser.add_argument("--max-batch", nargs="*", default=None,
                        help="search the largest batch for these models (all if none named)")
    parser.add_argument("--no-timing", action="store_true", help="only the largest-batch search")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    def save(rows):
        write_result("e2e", args.out, rows, ("transformers", "triton", "liger-kernel", "cut-cross-entropy"))
    methods = ["own loss", "liger", "cut-cross-entropy", "cut-cross-entropy exact", "cggr r=1.0", "cggr r=0.5",
               "cggr r=0.25", "cggr r=0.25 random"]
    rows = []
    for name in [] if args.no_timing else args.models:
        kind, shape, batch = MODELS[name]
        for precision in args.precisions:
            autocast = precision != "bf16"
            model = build(kind, shape, torch.float32 if autocast else torch.bfloat16)
            for method in methods:
                try:
                    undo = patch(model, method)
                except ImportError as error:
                    print(f"{method} not available: {error}")
                    continue
                try:
                    ms, peak, loss = time_steps(model, batch, autocast)
                except torch.OutOfMemoryError:
                    ms, peak, loss = None, None, None
                    torch.cuda.empty_cache()
                except Exception as error:  # report, keep measuring the rest
                    print(f"{method} failed on {name} {precision}: {error!r}")
                    (undo or (lambda: None))()
                    continue
                row = dict(model=name, precision=precision, method=method, batch=batch, seq_len=SEQ_LEN, ms=ms,
                           tokens_per_s=None if ms is None else batch * SEQ_LEN / ms * 1e3, peak_bytes=peak,
                           loss=loss)
                rows.append(row)
                print(row, flush=True)
                if undo is None:  # a patch that stays: start again from a fresh model
                    del model
                    torch.cuda.empty_cache()
                    model = build(kind, shape, torch.float32 if autocast else torch.bfloat16)
                else:
                    undo()
            del model
            torch.cuda.empty_cache()
        save(rows)  # so far: a run cut short keeps what it measured
    # Last: a failed allocation can leave memory behind, which would inflate later peaks.
    for name in (args.models if args.max_batch == [] else args.max_batch or []):
        for precision in args.precisions:
            for method in ("own loss", "cggr r=1.0"):
                rows.append(dict(model=name, precision=precision, method=method, seq_len=SEQ_LEN,
                                 max_batch=max_batch(name, method, precision != "bf16", MODELS[name][2])))
                print(rows[-1], flush=True)
                save(rows)
    print(f"\n{'model':<14} {'precision':<14} {'method':<20} {'batch':>5} {'ms':>8} {'tok/s':>9} {'peak GB':>8}")
    for row in rows:
        if "max_batch" in row:
            print(f"{row['model']:<14} {row['precision']:<14} {row['method']:<20} largest batch {row['max_batch']}")
        elif row["ms"] is None:
            print(f"{row['model']:<14} {row['precision']:<14} {row['method']:<20} {row['batch']:>5} out of memory")
        else:
            print(f"{row['model']:<14} {row['precision']:<14} {row['method']:<20} {row['batch']:>5} {row['ms']:8.1f} "
                  f"{row['tokens_per_s']:9.0f} {row['peak_bytes'] / 1e9:8.1f}")
    save(rows)


if __name__ == "__main__":
    main()
