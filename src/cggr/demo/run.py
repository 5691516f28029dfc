"""``cggr demo``: train a small GPT three times on the same batches (full loss, CGGR, random
selection), then print a table and write a plot and JSON."""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Dict, List, Optional

import torch

# The demo cuts its text into documents, holds every tenth out, and draws windows of up to
# 129 tokens from each stream: below this much text there is not enough of either.
MIN_TEXT_BYTES = 50_000


class DemoInputError(ValueError):
    """A demo option or input file that cannot work; reported as one line, exit code 2."""


def _defaults(device: torch.device) -> Dict:
    if device.type == "cuda":
        return dict(vocab=4096, seq_len=128, n_layer=4, n_head=4, d_model=256, batch=32, steps=600, lr=2e-3)
    return dict(vocab=1024, seq_len=64, n_layer=2, n_head=4, d_model=128, batch=16, steps=600, lr=3e-3)


def run_demo(args) -> Dict:
    """Train one GPT per arm and seed on the same batches; print, plot and save the comparison."""
    from .data import chunk_text, encode, split_held_out, train_tokenizer
    from .model import GPTConfig
    from .train import Arm, TrainConfig, fixed_batches, train_arm

    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as error:
        raise DemoInputError(f"--device: {error}") from None
    if device.type == "cpu":
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    d = _defaults(device)
    began = time.perf_counter()

    # Data: whole documents held out, a byte-level BPE trained on the rest.
    source, text = _read_text(args.text)
    train_docs, held_out_docs = split_held_out(chunk_text(text, 200), 0.1)
    tokenizer = train_tokenizer(train_docs, d["vocab"])
    vocab = tokenizer.get_vocab_size()
    train_stream, held_out_stream = encode(tokenizer, train_docs), encode(tokenizer, held_out_docs)
    if min(train_stream.numel(), held_out_stream.numel()) <= d["seq_len"] + 1:
        raise DemoInputError(f"--text: too little text after tokenising ({train_stream.numel()} training and "
                             f"{held_out_stream.numel()} held-out tokens; each needs more than {d['seq_len'] + 1}); "
                             "use a longer file")

    # The model, the schedule and the three arms: the full loss, CGGR, and random selection of
    # as many tokens (the control), both selective arms on the same curriculum.
    model_config = GPTConfig(vocab_size=vocab, seq_len=d["seq_len"], n_layer=d["n_layer"], n_head=d["n_head"],
                             d_model=d["d_model"])
    config = TrainConfig(steps=args.steps, batch=d["batch"], lr=d["lr"], eval_every=max(1, args.steps // 12),
                         device=str(device))
    eval_batches = fixed_batches(held_out_stream, config.eval_batches, config.batch, model_config.seq_len, 1234,
                                 device)
    arms = [Arm("full loss", full=True),
            Arm(f"CGGR {args.scoring}/{args.selection}", args.ratio, args.scoring, args.selection),
            Arm("random (control)", args.ratio, args.scoring, "random")]
    print(f"cggr demo on {device}: {source}, {train_stream.numel():,} train / {held_out_stream.numel():,} "
          f"held-out tokens, BPE vocabulary {vocab}, {args.steps} steps x {len(arms)} arms x {args.seeds} seed(s)")

    # Training: every arm of a seed sees the same batches.
    runs = []
    progress = _progress_bar(len(arms) * args.seeds * len(range(0, args.steps, config.eval_every)))
    for seed in range(args.seeds):
        for arm in arms:
            runs.append(train_arm(arm, model_config, train_stream, eval_batches, config, seed,
                                  progress=lambda point, name=arm.name: progress(name, point)))
    progress.close()

    # Report: a table, the JSON of every run, and the plot.
    summary = _summarise(arms, runs)
    _print_table(summary)
    print(_verdict(summary, args.ratio))
    os.makedirs(args.out, exist_ok=True)
    result = dict(source=source, device=str(device), vocab_size=vocab, model=model_config.__dict__,
                  train=config.__dict__, ratio=args.ratio, seeds=args.seeds, summary=summary, runs=runs,
                  command=" ".join(["cggr"] + sys.argv[1:]), seconds=time.perf_counter() - began)
    json_path = os.path.join(args.out, "demo.json")
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1)
    title = (f"{source.split(' (')[0]}: {args.steps} steps, {args.seeds} seed{'s' if args.seeds > 1 else ''}; "
             f"CGGR {args.scoring}/{args.selection} and random keep {args.ratio:g} of the tokens")
    plot_path = _plot(arms, runs, os.path.join(args.out, "demo.png"), title,
                      int(config.curriculum_fraction * args.steps), args.ratio)
    print(f"wrote {json_path}" + (f" and {plot_path}" if plot_path else "") +
          f" in {time.perf_counter() - began:.0f} s")
    return result


def _read_text(path: Optional[str]):
    """(name, text): the file at ``path``, or Python's own help text."""
    from .data import pydoc_topics_text

    if not path:
        return "pydoc_data.topics (Python's built-in help text)", pydoc_topics_text()
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError as error:
        raise DemoInputError(f"--text: cannot read {path}: {error.strerror}") from None
    size = len(text.encode("utf-8"))
    if size < MIN_TEXT_BYTES:
        raise DemoInputError(f"--text: the demo needs at least {MIN_TEXT_BYTES // 1000} kB of text "
                             f"(a few hundred paragraphs); {path} has {size:,} bytes")
    return path, text


class _progress_bar:
    """tqdm when installed, else one line per evaluation."""

    def __init__(self, total: int):
        try:
            from tqdm import tqdm
            self.bar = tqdm(total=total, unit="eval", dynamic_ncols=True)
        except ImportError:
            self.bar = None

    def __call__(self, name: str, point: Dict) -> None:
        text = f"{name}: step {point['step']} held-out loss {point['loss']:.3f}"
        if self.bar is None:
            print(text, flush=True)
        else:
            self.bar.set_description(text)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _summarise(arms, runs) -> List[Dict]:
    rows = []
    for arm in arms:
        mine = [r for r in runs if r["arm"]["name"] == arm.name]
        losses = [r["held_out_loss"] for r in mine]
        row = {"arm": arm.name, "held_out_loss": statistics.mean(losses),
               "held_out_loss_std": statistics.stdev(losses) if len(losses) > 1 else 0.0}
        for key in ("perplexity", "tokens_carried_loss", "tokens_seen", "step_ms", "loss_ms"):
            row[key] = statistics.mean(r[key] for r in mine)
        peaks = [r["peak_memory_mb"] for r in mine if r["peak_memory_mb"] is not None]
        row["peak_memory_mb"] = max(peaks) if peaks else None
        rows.append(row)
    return rows


def _print_table(summary: List[Dict]) -> None:
    header = (f"\n{'arm':<28} {'held-out loss':>14} {'ppl':>8} {'tokens w/ loss':>15} {'step ms':>8} "
              f"{'loss ms':>8} {'peak MB':>8}")
    print(header)
    print("-" * (len(header) - 1))
    for row in summary:
        loss = f"{row['held_out_loss']:.3f}" + (f"±{row['held_out_loss_std']:.3f}" if row["held_out_loss_std"] else "")
        share = f"{row['tokens_carried_loss'] / row['tokens_seen']:.0%}"
        peak = "n/a" if row["peak_memory_mb"] is None else f"{row['peak_memory_mb']:.0f}"
        print(f"{row['arm']:<28} {loss:>14} {row['perplexity']:8.1f} {share:>15} {row['step_ms']:8.1f} "
              f"{row['loss_ms']:8.2f} {peak:>8}")


def _verdict(summary: List[Dict], ratio: float) -> str:
    """The table in words: CGGR against random selection (does the scoring help?) and against
    the full loss (what keeping fewer tokens cost, per step and in time)."""
    full, cggr, random = summary
    vs_random = cggr["held_out_loss"] - random["held_out_loss"]
    vs_full = cggr["held_out_loss"] - full["held_out_loss"]
    return (f"\n{cggr['arm']} ended {abs(vs_random):.3f} nats {'below' if vs_random < 0 else 'above'} random "
            f"selection of as many tokens, and {abs(vs_full):.3f} nats {'below' if vs_full < 0 else 'above'} the "
            f"full loss after the same steps, its steps taking {cggr['step_ms']:.1f} ms against "
            f"{full['step_ms']:.1f} ms. Keeping {ratio:g} of the tokens pays only where that saving in step time "
            "buys more than the loss it costs: see the wall-clock panel of the plot.")


def _plot(arms, runs, path: str, title: str, curriculum_steps: int, ratio: float) -> Optional[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install 'cggr[demo]')")
        return None
    figure, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4.4))
    for arm, colour in zip(arms, ("black", "tab:blue", "tab:orange")):
        for index, run in enumerate(r for r in runs if r["arm"]["name"] == arm.name):
            steps = [p["step"] for p in run["curve"]]
            seconds = [p["seconds"] for p in run["curve"]]
            losses = [p["loss"] for p in run["curve"]]
            label = arm.name if index == 0 else None
            by_step.plot(steps, losses, color=colour, label=label, alpha=0.8)
            by_time.plot(seconds, losses, color=colour, label=label, alpha=0.8)
    # The curriculum: every token is kept at step 0, falling to the final ratio over these steps.
    by_step.axvspan(0, curriculum_steps, color="grey", alpha=0.12, lw=0)
    by_step.text(curriculum_steps / 2, 0.97, f"curriculum:\nkept share 1 → {ratio:g}", ha="center", va="top",
                 transform=by_step.get_xaxis_transform(), fontsize=8, color="dimgrey")
    by_step.set_xlabel("optimizer step")
    by_time.set_xlabel("training wall-clock (s, evaluation excluded)")
    for axis in (by_step, by_time):
        axis.set_ylabel("held-out loss (all tokens)")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
