"""Quality of CGGR against a random-selection control, on a GPU.

    python bench/quality.py --ratios 0.25 --out bench/results/quality_r025.json   # one device run
    python bench/quality.py --ratios 0.5 --no-full --out bench/results/quality_r05.json
    python bench/quality.py --summarise bench/results/quality_r025.json bench/results/quality_r05.json

A GPT trained from scratch on the standard library's own Python sources (tests left out; every
10th file held out), with a 16k byte-level BPE vocabulary so that the LM head matters as in real
models. Every arm sees the same batches for a given seed and decays its learning rate fully within
the same number of steps. Arms: the full loss, ``random`` (the control), each scoring with
``topk``, ``stratified`` and ``sequence_aware`` (combined), ``importance`` with ``combined`` and
``gradnorm``; all CGGR arms use the default curriculum (ratio 1 -> r over the first quarter).
Reported: held-out full-token loss, its paired difference against ``random`` at the same ratio
with a 95% interval (t distribution over seeds), the loss on the most frequent tokens (those that
make up half of the training tokens) and on the rest, step time, and tokens that carried loss.
"""
import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from cggr.demo.data import encode, read_texts, split_held_out, stdlib_source_files, train_tokenizer  # noqa: E402
from cggr.demo.model import GPTConfig  # noqa: E402
from cggr.demo.train import Arm, TrainConfig, fixed_batches, train_arm  # noqa: E402

T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def paired_interval(diffs):
    """(mean, low, high): the mean of paired differences and its 95% t interval (NaN bounds
    with fewer than two pairs)."""
    mean = statistics.mean(diffs)
    if len(diffs) < 2:
        return mean, float("nan"), float("nan")
    half = T_975.get(len(diffs) - 1, 1.96) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return mean, mean - half, mean + half


def arms_for(ratio: float):
    arms = [Arm(f"random r={ratio}", ratio, "combined", "random")]
    arms += [Arm(f"topk/{s} r={ratio}", ratio, s, "topk") for s in ("combined", "entropy", "margin", "loss",
                                                                     "gradnorm")]
    arms += [Arm(f"stratified r={ratio}", ratio, "combined", "stratified"),
             Arm(f"sequence_aware r={ratio}", ratio, "combined", "sequence_aware"),
             Arm(f"importance/combined r={ratio}", ratio, "combined", "importance"),
             Arm(f"importance/gradnorm r={ratio}", ratio, "gradnorm", "importance")]
    return arms


def run(args):
    began = time.perf_counter()
    files = stdlib_source_files(args.corpus_bytes)
    train_texts, held_out_texts = split_held_out(read_texts(files), 0.1)
    tokenizer = train_tokenizer(train_texts, args.vocab)
    train_stream, held_out_stream = encode(tokenizer, train_texts), encode(tokenizer, held_out_texts)
    vocab = tokenizer.get_vocab_size()
    counts = torch.bincount(train_stream, minlength=vocab).double()
    order = torch.argsort(counts, descending=True)
    frequent = torch.zeros(vocab, dtype=torch.bool)
    frequent[order[: int((torch.cumsum(counts[order], 0) < counts.sum() / 2).sum()) + 1]] = True
    device = torch.device(args.device)
    model_config = GPTConfig(vocab_size=vocab, seq_len=args.seq_len, n_layer=args.layers, n_head=args.heads,
                             d_model=args.width)
    config = TrainConfig(steps=args.steps, batch=args.batch, lr=args.lr, eval_every=max(1, args.steps // 8),
                         eval_batches=16, device=args.device)
    eval_batches = fixed_batches(held_out_stream, config.eval_batches, config.batch, args.seq_len, 999, device)
    arms = ([Arm("full loss", full=True)] if args.full else []) + [a for r in args.ratios for a in arms_for(r)]
    print(f"{len(files)} files, {train_stream.numel():,} train / {held_out_stream.numel():,} held-out tokens, "
          f"vocab {vocab}, {len(arms)} arms x {args.seeds} seeds, setup {time.perf_counter() - began:.0f} s",
          flush=True)
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    results = dict(device=device_name, torch=torch.__version__, vocab_size=vocab,
                   model=model_config.__dict__, train=config.__dict__, frequent_tokens=int(frequent.sum()),
                   corpus_files=len(files), command=" ".join(["python"] + sys.argv), runs=[])
    for seed in range(args.seeds):
        for arm in arms:
            result = train_arm(arm, model_config, train_stream, eval_batches, config, seed,
                               frequent=frequent.to(device))
            results["runs"].append(result)
            print(f"seed {seed} {arm.name:<28} loss {result['held_out_loss']:.4f} "
                  f"step {result['step_ms']:.1f} ms  [{time.perf_counter() - began:.0f} s]", flush=True)
            with open(args.out, "w") as f:  # after every run, so a cut-off call keeps what it did
                json.dump(results, f, indent=1)


def summarise(paths, plot_path=None):
    runs, meta = [], None
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        meta = meta or data
        runs.extend(data["runs"])
    by_arm = {}
    for r in runs:
        by_arm.setdefault(r["arm"]["name"], {})[r["seed"]] = r
    rows = []
    for name, seeds in by_arm.items():
        arm = next(iter(seeds.values()))["arm"]
        control = by_arm.get(f"random r={arm['ratio']}") if not arm["full"] else None
        paired = [seeds[s]["held_out_loss"] - control[s]["held_out_loss"] for s in seeds if control and s in control]
        row = {"arm": name, "ratio": arm["ratio"], "n": len(seeds),
               "loss": statistics.mean(r["held_out_loss"] for r in seeds.values()),
               "loss_frequent": statistics.mean(r["loss_frequent"] for r in seeds.values()),
               "loss_rare": statistics.mean(r["loss_rare"] for r in seeds.values()),
               "step_ms": statistics.mean(r["step_ms"] for r in seeds.values()),
               "tokens_with_loss": statistics.mean(r["tokens_carried_loss"] / r["tokens_seen"] for r in seeds.values())}
        if len(paired) > 1:
            mean, low, high = paired_interval(paired)
            row.update(diff_vs_random=mean, ci_low=low, ci_high=high)
        rows.append(row)
    rows.sort(key=lambda r: (r["ratio"], r["loss"]))
    print(f"{'arm':<30} {'loss':>7} {'vs random (95% CI)':>26} {'frequent':>9} {'rare':>7} {'kept':>5} {'step ms':>8}")
    for r in rows:
        diff = (f"{r['diff_vs_random']:+.4f} [{r['ci_low']:+.4f},{r['ci_high']:+.4f}]"
                if "diff_vs_random" in r else "")
        print(f"{r['arm']:<30} {r['loss']:7.4f} {diff:>26} {r['loss_frequent']:9.4f} {r['loss_rare']:7.4f} "
              f"{r['tokens_with_loss']:5.0%} {r['step_ms']:8.1f}")
    if plot_path:
        _plot(by_arm, plot_path)
    return rows


def _plot(by_arm, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for axis, ratio in zip(axes, (0.25, 0.5)):
        for name, seeds in sorted(by_arm.items()):
            arm = next(iter(seeds.values()))["arm"]
            if not (arm["full"] or arm["ratio"] == ratio):
                continue
            curves = [r["curve"] for r in seeds.values()]
            steps = [p["step"] for p in curves[0]]
            mean = [statistics.mean(c[i]["loss"] for c in curves) for i in range(len(steps))]
            style = dict(color="black", lw=2) if arm["full"] else (
                dict(color="tab:orange", lw=2) if arm["selection"] == "random" else dict(lw=1))
            axis.plot(steps, mean, label=name.replace(f" r={ratio}", ""), **style)
        axis.set_title(f"ratio {ratio} (mean over seeds)")
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    axes[0].set_ylabel("held-out loss (all tokens)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    print("wrote", path)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--no-full", dest="full", action="store_false")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--corpus-bytes", type=int, default=12_000_000)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default="bench/results/quality.json")
    parser.add_argument("--summarise", nargs="+", help="merge these result files and print the table")
    parser.add_argument("--plot", default=None)
    args = parser.parse_args()
    if args.summarise:
        summarise(args.summarise, args.plot)
    else:
        run(args)


if __name__ == "__main__":
    main()
