"""Command line: ``cggr demo`` (also ``python -m cggr demo``)."""
from __future__ import annotations

import argparse
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


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text}")
    return value


def _ratio(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    from . import __version__
    from .scoring import SCORINGS
    from .selection import SELECTIONS

    parser = argparse.ArgumentParser(prog="cggr", description="Confidence-Gated Gradient Routing")
    parser.add_argument("--version", action="version", version=f"cggr {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train a small GPT with the full loss, CGGR and random selection")
    demo.add_argument("--text", help=f"train on this UTF-8 text file (at least {MIN_TEXT_BYTES // 1000} kB) "
                                     "instead of Python's built-in help text")
    demo.add_argument("--steps", type=_positive_int, default=600, help="optimizer steps per arm (default 600)")
    demo.add_argument("--ratio", type=_ratio, default=0.25, help="final share of tokens kept (default 0.25)")
    demo.add_argument("--scoring", default="gradnorm", choices=[s for s in SCORINGS if s != "excess"],
                      help="difficulty score of the CGGR arm (default gradnorm)")
    demo.add_argument("--selection", default="importance", choices=SELECTIONS,
                      help="selection of the CGGR arm (default importance)")
    demo.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    demo.add_argument("--seeds", type=_positive_int, default=1, help="seeds per arm (same data order in every arm)")
    demo.add_argument("--out", default="cggr-demo", help="folder for the plot and JSON (default ./cggr-demo)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        try:
            run_demo(args)
        except DemoInputError as error:
            parser.exit(2, f"cggr demo: error: {error}\n")
    return 0


class DemoInputError(ValueError):
    """A demo option or input file that cannot work; reported as one line, exit code 2."""


def _defaults(device: torch.device) -> Dict:
    if device.type == "cuda":
        return dict(vocab=4096, seq_len=128, n_layer=4, n_head=4, d_model=256, batch=32, steps=600, lr=2e-3)
    return dict(vocab=1024, seq_len=64, n_layer=2, n_head=4, d_model=128, batch=16, steps=600, lr=3e-3)


def run_demo(args) -> Dict:
    from .demo.data import chunk_text, encode, pydoc_topics_text, split_held_out, train_tokenizer
    from .demo.model import GPTConfig
    from .demo.train import Arm, TrainConfig, fixed_batches, train_arm

    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as error:
        raise DemoInputError(f"--device: {error}") from None
    if device.type == "cpu":
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    d = _defaults(device)
    steps = args.steps
    began = time.perf_counter()

    if args.text:
        try:
            with open(args.text, encoding="utf-8", errors="replace") as f:
                source, text = args.text, f.read()
        except OSError as error:
            raise DemoInputError(f"--text: cannot read {args.text}: {error.strerror}") from None
        if len(text.encode("utf-8")) < MIN_TEXT_BYTES:
            raise DemoInputError(f"--text: the demo needs at least {MIN_TEXT_BYTES // 1000} kB of text "
                                 f"(a few hundred paragraphs); {args.text} has {len(text.encode('utf-8')):,} bytes")
    else:
        source, text = "pydoc_data.topics (Python's built-in help text)", pydoc_topics_text()
    train_docs, held_out_docs = split_held_out(chunk_text(text, 200), 0.1)
    tokenizer = train_tokenizer(train_docs, d["vocab"])
    vocab = tokenizer.get_vocab_size()
    train_stream, held_out_stream = encode(tokenizer, train_docs), encode(tokenizer, held_out_docs)
    if min(train_stream.numel(), held_out_stream.numel()) <= d["seq_len"] + 1:
        raise DemoInputError(f"--text: too little text after tokenising ({train_stream.numel()} training and "
                             f"{held_out_stream.numel()} held-out tokens; each needs more than {d['seq_len'] + 1}); "
                             "use a longer file")
    model_config = GPTConfig(vocab_size=vocab, seq_len=d["seq_len"], n_layer=d["n_layer"], n_head=d["n_head"],
                             d_model=d["d_model"])
    config = TrainConfig(steps=steps, batch=d["batch"], lr=d["lr"], eval_every=max(1, steps // 12),
                         device=str(device))
    eval_batches = fixed_batches(held_out_stream, config.eval_batches, config.batch, model_config.seq_len, 1234,
                                 device)
    arms = [Arm("full loss", full=True),
            Arm(f"CGGR {args.scoring}/{args.selection}", args.ratio, args.scoring, args.selection),
            Arm("random (control)", args.ratio, args.scoring, "random")]
    print(f"cggr demo on {device}: {source}, {train_stream.numel():,} train / {held_out_stream.numel():,} "
          f"held-out tokens, BPE vocabulary {vocab}, {steps} steps x {len(arms)} arms x {args.seeds} seed(s)")
    runs = []
    progress = _progress_bar(len(arms) * args.seeds * len(range(0, steps, config.eval_every)))
    for seed in range(args.seeds):
        for arm in arms:
            runs.append(train_arm(arm, model_config, train_stream, eval_batches, config, seed,
                                  progress=lambda point, name=arm.name: progress(name, point)))
    progress.close()
    summary = _summarise(arms, runs)
    _print_table(summary)
    os.makedirs(args.out, exist_ok=True)
    result = dict(source=source, device=str(device), vocab_size=vocab, model=model_config.__dict__,
                  train=config.__dict__, ratio=args.ratio, seeds=args.seeds, summary=summary, runs=runs,
                  command=" ".join(["cggr"] + sys.argv[1:]), seconds=time.perf_counter() - began)
    json_path = os.path.join(args.out, "demo.json")
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1)
    plot_path = _plot(arms, runs, os.path.join(args.out, "demo.png"))
    print(f"wrote {json_path}" + (f" and {plot_path}" if plot_path else "") +
          f" in {time.perf_counter() - began:.0f} s")
    return result


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


def _plot(arms, runs, path: str) -> Optional[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install 'cggr[demo]')")
        return None
    figure, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4))
    for arm, colour in zip(arms, ("black", "tab:blue", "tab:orange")):
        for index, run in enumerate(r for r in runs if r["arm"]["name"] == arm.name):
            steps = [p["step"] for p in run["curve"]]
            seconds = [p["seconds"] for p in run["curve"]]
            losses = [p["loss"] for p in run["curve"]]
            label = arm.name if index == 0 else None
            by_step.plot(steps, losses, color=colour, label=label, alpha=0.8)
            by_time.plot(seconds, losses, color=colour, label=label, alpha=0.8)
    by_step.set_xlabel("optimizer step")
    by_time.set_xlabel("training wall-clock (s, evaluation excluded)")
    for axis in (by_step, by_time):
        axis.set_ylabel("held-out loss (all tokens)")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle("cggr demo: full loss vs CGGR vs random selection")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


if __name__ == "__main__":
    sys.exit(main())
