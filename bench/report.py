"""bench/README.md, built from the JSON files under bench/results/.

    python bench/report.py            # print it
    python bench/report.py --write    # write bench/README.md
"""
import argparse
import contextlib
import io
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from _results import loss_row_note  # noqa: E402

HERE = os.path.dirname(__file__)
RESULTS = os.path.join(HERE, "results")

INTRO = """# Benchmarks

Every number here comes from a JSON file in `results/`, which records the device, the package
versions, the shapes, median times, peak memory and the exact command. This page is generated
from them by `python bench/report.py --write`; the project README quotes the headline rows.

- `python bench/bench_loss.py [--quick] [--cggr05 DIR]`: forward+backward of the loss on given
  logits (bf16 `randn * 2`, 10% of the targets ignored): every selection at ratio 0.25, each
  scoring with `topk`, `CGGRLoss`, ratio 1, the in-place backward, `F.cross_entropy` eager and
  compiled, and Liger-Kernel when it is installed.
- `python bench/bench_linear.py [--kept] [--held]`: the LM head plus the loss, gradients to
  hidden and weight, against `hidden @ W.T` + `F.cross_entropy`, and Liger's and
  cut-cross-entropy's fused losses when installed; every selection at ratio 0.25, and fp32
  tensors under bf16 autocast (the head of a `Trainer(bf16=True)` run).
- `python bench/bench_small.py [--rounds N]`: the small shapes, where host time sets the pace,
  timed in alternated rounds (fastest and median round): 4096 × 32,000 logits and the head of a
  256-wide model with a 16,384-token vocabulary. `small_H200_nographs.json` ran with
  `CGGR_CUDA_GRAPHS=0`; `small_H200_run1.json` to `_run5.json` predate the CUDA graphs the calls
  now replay.
- `python bench/bench_e2e.py [--max-batch] [--no-timing]`: whole training steps of SmolLM2-135M,
  Qwen2.5-0.5B and Llama-3.2-1B shapes with `apply_cggr`, the model's own loss, Liger's patch and
  cut-cross-entropy (with its default gradient filter, which skips blocks of small gradient
  entries, and exact); `--max-batch` searches the largest batch that fits.
- `python bench/profile_step.py [--linear] [--host]`: host time (Python, launches) against GPU
  time of one call, kernel by kernel.
- `python bench/quality_scenarios.py [--plot FILE]`: clean data, noisy data and fine-tuning on a
  new domain; the full loss against `random`, `importance` and `excess` arms through the fused
  head at ratios 0.25, 0.5 and 0.75, at equal steps and at equal wall-clock (5 paired seeds).
  `python bench/breakeven.py` reads its file: the speed-up each arm would need to pay.
- `python bench/quality.py --ratios 0.25`, then `--summarise FILES`: held-out loss of a small GPT
  trained from scratch with each selection against a random-selection control (paired seeds,
  95% intervals).

`probes/` holds one-off measurements behind design decisions and `probes/NOTES.md`, the log of the
performance work (each change, its prediction and what it did). Files whose name ends in `_H100`
and the `quality_*` runs were measured on an earlier version of the library (before fixed-count
importance sampling and the gradnorm default); their commands are in each file.
"""


def _table(caption: str, columns, rows) -> str:
    """``caption``, then a Markdown table with ``columns`` and ``rows`` (each a sequence of cells)."""
    lines = [caption, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


def loss_table(data):
    caption = (f"`{data['command']}` on {data['device']} (copy bandwidth {data['copy_bandwidth_gbs']:.0f} GB/s, "
               f"torch {data['versions'].get('torch')}, triton {data['versions'].get('triton')}, {data['date']}), "
               f"{data['dtype']}, forward+backward, median ms / peak extra GB:")
    rows = [(row["N"], row["V"], row["method"], f"{row['ms']:.3f}",
             "" if row["extra_bytes"] is None else f"{row['extra_bytes'] / 1e9:.2f}", loss_row_note(row))
            for row in data["rows"]]
    return _table(caption, ("N", "V", "method", "ms", "extra GB", "note"), rows)


def linear_table(data):
    caption = (f"`{data['command']}` on {data['device']} (torch {data['versions'].get('torch')}, "
               f"{data.get('date', '')}), {data['dtype']}, forward+backward (gradients of hidden and weight), "
               "median ms / peak extra GB:")
    rows = [(row["N"], row["H"], row["V"], row["method"], "yes" if row.get("grads_kept") else "no",
             f"{row['ms']:.2f}", f"{row['extra_bytes'] / 1e9:.2f}") for row in data["rows"]]
    return _table(caption, ("N", "H", "V", "method", "grads kept", "ms", "extra GB"), rows)


def _e2e_cells(row):
    if "max_batch" in row:
        return f"largest: {row['max_batch']}", "", "", ""
    if row["ms"] is None:
        return row["batch"], "out of memory", "", ""
    return row["batch"], f"{row['ms']:.1f}", f"{row['tokens_per_s']:.0f}", f"{row['peak_bytes'] / 1e9:.1f}"


def e2e_table(data):
    caption = (f"`{data['command']}` on {data['device']} (torch {data['versions'].get('torch')}, transformers "
               f"{data['versions'].get('transformers')}, {data['date']}): whole training steps (forward, backward, "
               "fused AdamW), T = 2048, random-init models built from their configurations:")
    rows = [(row["model"], row["precision"], row["method"], *_e2e_cells(row)) for row in data["rows"]]
    return _table(caption, ("model", "precision", "method", "batch", "step ms", "tokens/s", "peak GB"), rows)


def small_table(data):
    caption = (f"`{data['command']}` on {data['device']} (torch {data['versions'].get('torch')}, "
               f"{data.get('date', '')}), bf16, forward+backward, {data['rounds']} alternated rounds of do_bench "
               "medians: the fastest round (the host at its quietest), the median round, and every round (ms):")
    rows = [(" × ".join(str(row[k]) for k in ("N", "H", "V") if k in row), row["method"], f"{row['ms']:.3f}",
             f"{row['median_ms']:.3f}", " ".join(f"{v:.3f}" for v in row["rounds_ms"])) for row in data["rows"]]
    return _table(caption, ("shape", "method", "fastest", "median", "rounds"), rows)


def distributed_table(data):
    rows = data["rows"]
    caption = (f"`{data['command']}` on {data['device']} ({data['world_size']} process(es), torch "
               f"{data['versions'].get('torch')}, {data['date']}): selection over the process group against one "
               "process on the concatenated batch (relative errors of loss and gradient):")
    checks = [(row["case"], "yes" if row["mask_equal"] else "NO", f"{row['loss_rel_err']:.1e}",
               f"{row['grad_rel_err']:.1e}") for row in rows["checks"]]
    text = _table(caption, ("case", "same mask", "loss rel. error", "grad rel. error"), checks)
    if rows.get("timing"):
        text += "\n\nTiming rows (as stored):\n\n" + "\n".join(f"- `{json.dumps(row)}`" for row in rows["timing"])
    return text


def scenarios_section(path):
    from breakeven import main as breakeven
    from quality_scenarios import summarise

    data = json.load(open(path))
    printed, breaks = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(printed):
        summarise(data)
    with contextlib.redirect_stdout(breaks):
        breakeven(path)
    seeds = len({r["seed"] for r in data["runs"]})
    model = data["model"]
    picture = path[:-len(".json")] + ".png"
    lines = [f"`{data['command']}` on {data['device']} (torch {data['torch']}, triton {data.get('triton')}, "
             f"{data.get('date')}): a {model['n_layer']}-layer, {model['d_model']}-wide GPT with a "
             f"{model['vocab_size']}-token vocabulary, batch {data['train']['batch']} x {model['seq_len']}, "
             f"{data['train']['steps']} steps, {seeds} seeds; {int(100 * data['noise'])}% of the training "
             "documents corrupted in `noisy`. Paired differences of held-out loss (95% t intervals); `steps` is "
             "how many steps fit in the full arm's time, from each arm's step time measured alone on the GPU:",
             "", "```" + printed.getvalue() + "```"]
    if os.path.exists(picture):
        lines += ["", f"![held-out loss against wall-clock](results/{os.path.basename(picture)})"]
    lines += ["", "`python bench/breakeven.py`: each selective arm's loss at equal steps is what the full loss "
              "reached after `worth` of its steps (per seed, interpolated on its curve); to break even at equal "
              "wall-clock the arm's steps must be faster by `steps / worth`. `measured` is the speed-up the step "
              "times give (below 1: slower than the plain full loss). The head share is what the LM head and "
              "loss would have to take of a GPU-bound full step for that speed-up to exist, if the head cost "
              "in proportion to its matmul FLOPs.", "", "```\n" + breaks.getvalue() + "```"]
    return "\n".join(lines)


def quality_table(paths):
    from quality import summarise

    with contextlib.redirect_stdout(io.StringIO()):
        rows = summarise(paths)
    meta = json.load(open(paths[0]))
    lines = [f"{meta['device']}, torch {meta['torch']}; `{meta['command']}` and the other files listed; a "
             f"{meta['model'].get('n_layer')}-layer, {meta['model'].get('d_model')}-wide GPT with a "
             f"{meta['vocab_size']}-token vocabulary trained from scratch on the Python standard library's "
             f"sources ({meta['corpus_files']} files), {meta['train'].get('steps')} steps, "
             f"{len({r['seed'] for r in meta['runs']})} seeds. Held-out loss over all tokens; the difference "
             "with `random` at the same ratio is paired by seed (95% t interval).", "",
             "| arm | held-out loss | vs random (95% CI) | frequent tokens | rare tokens | tokens with loss "
             "| step ms |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["arm"].startswith("random"):
            diff = "control"
        elif "diff_vs_random" in r:
            diff = f"{r['diff_vs_random']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]"
        else:
            diff = ""
        lines.append(f"| {r['arm']} | {r['loss']:.3f} | {diff} | {r['loss_frequent']:.3f} | {r['loss_rare']:.3f} | "
                     f"{r['tokens_with_loss']:.0%} | {r['step_ms']:.1f} |")
    return "\n".join(lines)


def build() -> str:
    parts = [INTRO]
    names = sorted(os.listdir(RESULTS))
    sections = (("## Loss on given logits", "loss_", loss_table), ("## LM head plus loss", "linear_", linear_table),
                ("## Small shapes, in alternated rounds", "small_", small_table),
                ("## Whole training steps", "e2e_", e2e_table),
                ("## Data parallel: selection over a process group", "distributed_", distributed_table))
    for title, prefix, table in sections:
        parts.append(title)
        for name in names:
            if name.startswith(prefix) and name.endswith(".json"):
                parts.append(f"### `results/{name}`\n\n" + table(json.load(open(os.path.join(RESULTS, name)))))
    for name in names:
        if name.startswith("scenarios_") and name.endswith(".json"):
            section = scenarios_section(os.path.join(RESULTS, name))
            parts.append("## Where selection pays: three scenarios at equal steps and at equal wall-clock\n\n"
                         + section)
    quality = [os.path.join(RESULTS, n) for n in names if n.startswith("quality_") and n.endswith(".json")]
    if quality:
        parts.append("## Quality of each selection (earlier version)\n\n" + quality_table(quality))
        pictures = [n for n in names if n.startswith("quality_") and n.endswith(".png")]
        parts.extend(f"![held-out loss by step](results/{n})" for n in pictures)
    return "\n\n".join(parts) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--write", action="store_true", help="write bench/README.md instead of printing")
    text = build()
    if parser.parse_args().write:
        with open(os.path.join(HERE, "README.md"), "w") as f:
            f.write(text)
    else:
        print(text)
