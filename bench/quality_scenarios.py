"""Where selection pays: clean and noisy data, at equal steps and at equal wall-clock.

    python bench/quality_scenarios.py --scenarios clean noisy --ratios 0.5 --seeds 3 --out FILE

A GPT trained from scratch on the Python standard library's sources (16k BPE, every 10th file
held out), the selective arms through the fused head (``cggr_linear_cross_entropy``) with the
default curriculum. ``noisy`` corrupts a share of the training documents (random tokens,
shuffled words, a repeated boilerplate paragraph); evaluation is always on clean held-out text.
Arms: the full loss (plain ``F.cross_entropy``), ``random``, ``importance``/``gradnorm``, and
``topk``/``excess`` and ``importance``/``excess`` against a reference model: a 2-layer, 128-wide
GPT trained briefly on a clean held-in subset, whose training time and per-step forward count in
the arm's wall-clock. Equal wall-clock: each selective arm first times a few steps, then trains
for as many steps as fit in the full arm's time (its learning-rate schedule set for those steps).
Reported per arm: held-out loss at equal steps and at equal wall-clock, paired differences
against the full loss and against ``random`` (95% t intervals over seeds).
"""
import argparse
import json
import os
import random
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
import cggr  # noqa: E402
from cggr.demo.data import (  # noqa: E402
    encode,
    read_texts,
    sample_batch,
    split_held_out,
    stdlib_source_files,
    train_tokenizer,  # noqa: E402
)
from cggr.demo.model import GPT, GPTConfig  # noqa: E402
from cggr.demo.train import TrainConfig, evaluate, fixed_batches, learning_rate  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from quality import paired_interval  # noqa: E402

ARMS = [("full", None, None), ("random", "gradnorm", "random"), ("importance/gradnorm", "gradnorm", "importance"),
        ("topk/excess", "excess", "topk"), ("importance/excess", "excess", "importance")]


def corrupt(texts, share, seed):
    """A ``share`` of the documents replaced: random characters, shuffled words, or boilerplate."""
    rng = random.Random(seed)
    boilerplate = "# Licensed under the terms of the license found in the LICENSE file.\n" * 8
    out = []
    for text in texts:
        if rng.random() >= share:
            out.append(text)
            continue
        kind = rng.randrange(3)
        if kind == 0:
            out.append("".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789 ()[]{}:=.,_\n") for _ in text))
        elif kind == 1:
            words = text.split()
            rng.shuffle(words)
            out.append(" ".join(words))
        else:
            out.append(boilerplate * max(1, len(text) // len(boilerplate)))
    return out


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(model_config, stream, eval_batches, config, seed, arm, ratio, reference=None, budget_s=None,
          calibrate_steps=8):
    """Train a fresh GPT; returns (held-out loss, train seconds, steps, curve)."""
    name, scoring, selection = arm
    device = torch.device(config.device)
    steps = config.steps
    if budget_s is not None:  # time a few steps, then fit the schedule to the budget
        probe = train(model_config, stream, eval_batches, TrainConfig(**{**config.__dict__, "steps": calibrate_steps}),
                      seed, arm, ratio, reference, calibrate_steps=0)
        per_step = probe[1] / max(1, calibrate_steps - 1)
        steps = max(1, int(budget_s / per_step))
    config = TrainConfig(**{**config.__dict__, "steps": steps})
    torch.manual_seed(seed)
    model = GPT(model_config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.95), weight_decay=0.1)
    data_order = torch.Generator().manual_seed(seed)
    curriculum = cggr.Curriculum(ratio, int(config.curriculum_fraction * steps)) if scoring else None
    draws = torch.Generator(device=device).manual_seed(seed + 1)
    seconds, curve = 0.0, []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, config)
        inputs, targets = sample_batch(stream, config.batch, model_config.seq_len, data_order, device)
        sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            hidden = model(inputs)
            if scoring is None:
                loss = F.cross_entropy(model.head(hidden).float().flatten(0, 1), targets.flatten())
            else:
                kw = {}
                if scoring == "excess":
                    with torch.no_grad():
                        kw["reference_loss"] = cggr.reference_token_loss(reference(inputs), targets,
                                                                         reference.embed.weight, check_targets=False)
                loss = cggr.cggr_linear_cross_entropy(hidden, model.embed.weight, targets, curriculum,
                                                      scoring=scoring, selection=selection, generator=draws,
                                                      check_targets=False, **kw)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if curriculum is not None:
            curriculum.step()
        sync(device)
        if step > 0 or steps == 1:  # the first step compiles kernels
            seconds += time.perf_counter() - start
        if calibrate_steps and ((step + 1) % max(1, steps // 6) == 0 or step + 1 == steps):
            curve.append({"step": step + 1, "seconds": seconds, "loss": evaluate(model, eval_batches)["loss"]})
    final = curve[-1]["loss"] if curve else float("nan")
    return final, seconds, steps, curve


def reference_model(model_config, clean_stream, config, seed):
    """A small GPT trained briefly on clean held-in text; returns (model, seconds)."""
    small = GPTConfig(vocab_size=model_config.vocab_size, seq_len=model_config.seq_len, n_layer=2, n_head=4,
                      d_model=128)
    device = torch.device(config.device)
    start = time.perf_counter()
    torch.manual_seed(seed + 100)
    model = GPT(small).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    order = torch.Generator().manual_seed(seed + 100)
    for _ in range(config.steps // 3):
        inputs, targets = sample_batch(clean_stream, config.batch, small.seq_len, order, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = F.cross_entropy(model.head(model(inputs)).float().flatten(0, 1), targets.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync(device)
    return model.eval().requires_grad_(False), time.perf_counter() - start


def paired(a, b):
    return paired_interval([x - y for x, y in zip(a, b)])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--scenarios", nargs="+", default=["clean", "noisy"])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--noise", type=float, default=0.3)
    parser.add_argument("--corpus-bytes", type=int, default=12_000_000)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="bench/results/quality_scenarios.json")
    args = parser.parse_args()
    began = time.perf_counter()
    texts = read_texts(stdlib_source_files(args.corpus_bytes))
    train_texts, held_out_texts = split_held_out(texts, 0.1)
    tokenizer = train_tokenizer(train_texts, args.vocab)
    held_out = encode(tokenizer, held_out_texts)
    clean_subset = encode(tokenizer, train_texts[::10])  # the reference model's held-in data
    model_config = GPTConfig(vocab_size=tokenizer.get_vocab_size(), seq_len=args.seq_len, n_layer=args.layers,
                             n_head=4, d_model=args.width)
    config = TrainConfig(steps=args.steps, batch=args.batch, lr=2e-3, device=args.device)
    eval_batches = fixed_batches(held_out, 16, args.batch, args.seq_len, 999, torch.device(args.device))
    result = dict(device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu", torch=torch.__version__,
                  command=" ".join(["python"] + sys.argv), model=model_config.__dict__, train=config.__dict__,
                  noise=args.noise, runs=[])
    for scenario in args.scenarios:
        docs = corrupt(train_texts, args.noise, 0) if scenario == "noisy" else train_texts
        stream = encode(tokenizer, docs)
        for seed in range(args.seeds):
            reference, reference_s = reference_model(model_config, clean_subset, config, seed)
            full_loss, full_s, _, curve = train(model_config, stream, eval_batches, config, seed, ARMS[0], 1.0)
            result["runs"].append(dict(scenario=scenario, seed=seed, arm="full", ratio=1.0, equal_steps=full_loss,
                                       equal_time=full_loss, seconds=full_s, curve=curve))
            for ratio in args.ratios:
                for arm in ARMS[1:]:
                    ref = reference if arm[1] == "excess" else None
                    at_steps, seconds, _, curve = train(model_config, stream, eval_batches, config, seed, arm, ratio,
                                                        ref)
                    budget = full_s - (reference_s if ref is not None else 0.0)
                    at_time, _, steps, _ = train(model_config, stream, eval_batches, config, seed, arm, ratio, ref,
                                                 budget_s=max(budget, 0.05 * full_s))
                    result["runs"].append(dict(scenario=scenario, seed=seed, arm=arm[0], ratio=ratio,
                                               equal_steps=at_steps, equal_time=at_time, seconds=seconds,
                                               steps_in_budget=steps, curve=curve))
                    print(f"{scenario} seed {seed} {arm[0]:<20} r={ratio} equal steps {at_steps:.4f} "
                          f"equal time {at_time:.4f} ({steps} steps) [{time.perf_counter() - began:.0f} s]",
                          flush=True)
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
    summarise(result)


def summarise(result):
    runs = result["runs"]
    print(f"\n{'scenario':<8} {'arm':<20} {'ratio':>5} {'steps':>7} {'vs full, equal steps':>26} "
          f"{'vs full, equal time':>26} {'vs random, equal time':>26}")
    for scenario in sorted({r["scenario"] for r in runs}):
        full = {r["seed"]: r for r in runs if r["scenario"] == scenario and r["arm"] == "full"}
        keys = sorted({(r["arm"], r["ratio"]) for r in runs if r["scenario"] == scenario and r["arm"] != "full"})
        for arm, ratio in keys:
            mine = {r["seed"]: r for r in runs if r["scenario"] == scenario and r["arm"] == arm and r["ratio"] == ratio}
            rand = {r["seed"]: r for r in runs if r["scenario"] == scenario and r["arm"] == "random"
                    and r["ratio"] == ratio}
            seeds = sorted(set(mine) & set(full))
            rows = [paired([mine[s][k] for s in seeds], [other[s][k] for s in seeds])
                    for other, k in ((full, "equal_steps"), (full, "equal_time"), (rand, "equal_time"))]
            steps = statistics.mean(mine[s].get("steps_in_budget", 0) for s in seeds)
            text = [f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]" for m, lo, hi in rows]
            print(f"{scenario:<8} {arm:<20} {ratio:5.2f} {steps:7.0f} {text[0]:>26} {text[1]:>26} {text[2]:>26}")


if __name__ == "__main__":
    main()
