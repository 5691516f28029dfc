"""Where selection pays: three scenarios, every arm at equal steps and at equal wall-clock.

    python bench/quality_scenarios.py --out bench/results/scenarios_H200.json --plot bench/results/scenarios_H200.png
    python bench/quality_scenarios.py --summarise bench/results/scenarios_H200.json --plot FILE.png

A narrow GPT (4 layers, 256 wide) with a 32k byte-level BPE vocabulary, batch 32 x 256 tokens, so that
the LM head is most of a step's FLOPs; AdamW, gradients clipped at norm 1. Scenarios:

* ``clean``: trained from scratch on the Python standard library's sources (every 10th file held out).
* ``noisy``: the same, with half the training documents corrupted (random characters, shuffled
  words, a repeated boilerplate paragraph); evaluated on clean held-out sources.
* ``finetune``: a model pre-trained on those sources (full loss, the same for every arm), then
  fine-tuned on a new domain (the standard library's test suite) mixed one to one with text of
  the pre-training domain it already knows; evaluated on held-out files of the new domain.

Arms: ``full`` (``hidden @ W.T`` and ``F.cross_entropy``, what a user writes), ``full/fused`` (the
fused head at ratio 1), and through the fused head with the default curriculum (ratio 1 falling
to r over the first quarter): ``random``, ``importance/gradnorm`` (the default), ``topk/excess``
and ``importance/excess``. The excess arms score against a reference model: a 2-layer, 128-wide
GPT trained for a third of the steps on a clean held-in subset of the target data; its training
time and its forward pass on every step are counted in their wall-clock.

Wall-clock: the runs of one call share the GPU (``--workers`` processes), so time is not read
from them. Each arm's step time is measured first, alone on the GPU, at ratio r and at ratio 1
(``calibration`` in the JSON); a run's seconds are its steps times those step times (the
curriculum's steps interpolated between the two). At equal wall-clock an arm trains for as many
steps as fit in the full arm's time, with its learning-rate schedule set for those steps.
Reported: held-out loss at equal steps and at equal wall-clock, paired differences against
``full`` and against ``random`` (95% t intervals over seeds).
"""
import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))
sys.path.insert(0, HERE)
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
from quality import paired_interval  # noqa: E402

# name -> (scoring, selection); None: the plain loss. "full/fused" is the fused head at ratio 1.
ARMS = {"full": None, "full/fused": ("gradnorm", "importance"), "random": ("gradnorm", "random"),
        "importance/gradnorm": ("gradnorm", "importance"), "topk/excess": ("excess", "topk"),
        "importance/excess": ("excess", "importance")}
SELECTIVE = ("random", "importance/gradnorm", "topk/excess", "importance/excess")
SCENARIOS = ("clean", "noisy", "finetune")
REFERENCE_SHAPE = dict(n_layer=2, n_head=4, d_model=128)
CURRICULUM_FRACTION = TrainConfig.curriculum_fraction  # ratio 1 -> r over this share of the steps


# ----------------------------------------------------------------------------------------- data

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


def test_suite_texts(max_bytes):
    """The standard library's own test files (the fine-tuning domain), up to ``max_bytes``."""
    import sysconfig
    root = os.path.join(sysconfig.get_paths()["stdlib"], "test")
    paths = sorted(os.path.join(folder, name) for folder, _, files in os.walk(root) for name in files
                   if name.endswith(".py"))
    chosen, total = [], 0
    for path in paths:
        size = os.path.getsize(path)
        if size > 100_000:  # generated tables and data, not code
            continue
        if total + size > max_bytes:
            break
        chosen.append(path)
        total += size
    return read_texts(chosen)


def prepare(args):
    """Token streams of every scenario and the evaluation batches, as CPU tensors."""
    code_train, code_held = split_held_out(read_texts(stdlib_source_files(args.corpus_bytes)), 0.1)
    tests_train, tests_held = split_held_out(test_suite_texts(args.corpus_bytes // 2), 0.1)
    if len(tests_held) < 4:
        if "finetune" in args.scenarios:
            raise SystemExit("the fine-tuning scenario needs the standard library's test suite (Lib/test)")
        tests_train = tests_held = code_held[:4]  # unused
    tokenizer = train_tokenizer(code_train + tests_train, args.vocab)
    code_stream = encode(tokenizer, code_train)
    mixed = [t for pair in zip(tests_train, code_train[::3]) for t in pair]  # new domain and known text
    streams = {
        "clean": code_stream,
        "noisy": encode(tokenizer, corrupt(code_train, args.noise, 0)),
        "finetune": encode(tokenizer, mixed),
        "pretrain": code_stream,
    }
    reference_streams = {"clean": encode(tokenizer, code_train[::10]), "noisy": encode(tokenizer, code_train[::10]),
                         "finetune": encode(tokenizer, tests_train[::5])}
    held_out = {"clean": encode(tokenizer, code_held), "noisy": encode(tokenizer, code_held),
                "finetune": encode(tokenizer, tests_held)}
    eval_batches = {s: fixed_batches(held_out[s], args.eval_batches, args.batch, args.seq_len, 999, "cpu")
                    for s in SCENARIOS}
    return dict(vocab=tokenizer.get_vocab_size(), streams=streams, reference_streams=reference_streams,
                eval_batches=eval_batches, tokens={k: v.numel() for k, v in streams.items()})


# -------------------------------------------------------------------------------------- training

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


class Step:
    """One arm's training step on a model: the plain loss or the fused head with a curriculum."""

    def __init__(self, model, arm, ratio, steps, seed, reference=None,
                 curriculum_fraction=CURRICULUM_FRACTION):
        self.model, self.reference = model, reference
        self.scoring_selection = ARMS[arm]
        device = next(model.parameters()).device
        self.curriculum = None
        if self.scoring_selection is not None:
            self.curriculum = 1.0 if arm == "full/fused" else cggr.Curriculum(ratio, int(curriculum_fraction * steps))
        self.draws = torch.Generator(device=device).manual_seed(seed + 1)

    def loss(self, inputs, targets):
        hidden = self.model(inputs)
        if self.scoring_selection is None:
            return F.cross_entropy(self.model.head(hidden).float().flatten(0, 1), targets.flatten())
        scoring, selection = self.scoring_selection
        kw = {}
        if scoring == "excess":
            with torch.no_grad():
                kw["reference_loss"] = cggr.reference_token_loss(self.reference(inputs), targets,
                                                                 self.reference.head_weight, check_targets=False)
        return cggr.cggr_linear_cross_entropy(hidden, self.model.head_weight, targets, self.curriculum,
                                              scoring=scoring, selection=selection, generator=self.draws,
                                              check_targets=False, **kw)

    def advance(self):
        if isinstance(self.curriculum, cggr.Curriculum):
            self.curriculum.step()


def optimizer_step(model, optimizer, step_fn, inputs, targets, device):
    """One training step: the arm's loss under bf16 autocast, backward, clipping at norm 1, AdamW."""
    with autocast(device):
        loss = step_fn.loss(inputs, targets)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def train(model, stream, config, seed, step_fn_args, eval_batches=None, eval_points=6):
    """Trains ``model`` in place for ``config.steps`` steps; returns [(step, held-out loss)]."""
    device = torch.device(config.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.95), weight_decay=0.1)
    order = torch.Generator().manual_seed(seed)
    step_fn = Step(model, steps=config.steps, seed=seed, **step_fn_args)
    curve = []
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, config)
        inputs, targets = sample_batch(stream, config.batch, model.config.seq_len, order, device)
        optimizer_step(model, optimizer, step_fn, inputs, targets, device)
        step_fn.advance()
        if eval_batches is not None and ((step + 1) % max(1, config.steps // eval_points) == 0
                                         or step + 1 == config.steps):
            curve.append((step + 1, evaluate(model, eval_batches)["loss"]))
    return curve


def reference_config(model_config):
    return GPTConfig(vocab_size=model_config.vocab_size, seq_len=model_config.seq_len, **REFERENCE_SHAPE)


_DATA = {}


def _load(path):
    _DATA.update(torch.load(path, weights_only=False))


def run_job(job):
    """One training run in a worker process: 'reference', 'pretrain' or 'train'."""
    data, device = _DATA, torch.device(_DATA["device"])
    torch.set_num_threads(1)
    model_config, config = data["model_config"], data["config"]
    seed, scenario = job["seed"], job["scenario"]
    if job["kind"] == "reference":
        torch.manual_seed(seed + 100)
        model = GPT(reference_config(model_config)).to(device)
        train(model, data["reference_streams"][scenario], TrainConfig(**{**config.__dict__, "steps": job["steps"]}),
              seed + 100, dict(arm="full", ratio=1.0))
        torch.save(model.state_dict(), job["save"])
        return job
    if job["kind"] == "pretrain":
        torch.manual_seed(seed)
        model = GPT(model_config).to(device)
        train(model, data["streams"]["pretrain"], config, seed + 200, dict(arm="full", ratio=1.0))
        torch.save(model.state_dict(), job["save"])
        return job
    torch.manual_seed(seed)
    model = GPT(model_config).to(device)
    run_config = TrainConfig(**{**config.__dict__, "steps": job["steps"]})
    if scenario == "finetune":
        model.load_state_dict(torch.load(job["base"], map_location=device))
        run_config.lr = config.lr * data["finetune_lr_factor"]
    reference = None
    if job.get("reference"):
        reference = GPT(reference_config(model_config)).to(device)
        reference.load_state_dict(torch.load(job["reference"], map_location=device))
        reference.eval().requires_grad_(False)
    eval_batches = [(x.to(device), y.to(device)) for x, y in data["eval_batches"][scenario]]
    curve = train(model, data["streams"][scenario], run_config, seed,
                  dict(arm=job["arm"], ratio=job["ratio"], reference=reference), eval_batches)
    return {**{k: job[k] for k in ("scenario", "seed", "arm", "ratio", "mode", "steps")},
            "loss": curve[-1][1], "curve": curve}


# ----------------------------------------------------------------------------------- wall-clock

def calibrate(model_config, config, data, ratios, repeats=20):
    """Seconds per step of every arm at each ratio and at ratio 1, and of the reference model's
    training step, each measured alone on the GPU."""
    device = torch.device(config.device)
    stream = data["streams"]["clean"]
    reference = GPT(reference_config(model_config)).to(device).eval().requires_grad_(False)

    def seconds_per_step(arm, ratio, config_model=model_config):
        torch.manual_seed(0)
        model = GPT(config_model).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        step_fn = Step(model, arm, ratio, steps=1, seed=0, reference=reference, curriculum_fraction=0.0)
        order = torch.Generator().manual_seed(0)
        batches = [sample_batch(stream, config.batch, config_model.seq_len, order, device) for _ in range(repeats)]
        best = float("inf")
        for attempt in range(3):  # the first pass compiles; the best of the next two
            sync(device)
            start = time.perf_counter()
            for inputs, targets in batches:
                optimizer_step(model, optimizer, step_fn, inputs, targets, device)
            sync(device)
            if attempt:
                best = min(best, (time.perf_counter() - start) / repeats)
        del model, optimizer
        torch.cuda.empty_cache() if device.type == "cuda" else None
        return best

    table = {"full": {1.0: seconds_per_step("full", 1.0)}, "full/fused": {1.0: seconds_per_step("full/fused", 1.0)},
             "reference_training": seconds_per_step("full", 1.0, reference_config(model_config))}
    for arm in SELECTIVE:
        table[arm] = {r: seconds_per_step(arm, r) for r in sorted(set(ratios) | {1.0})}
    return table


def step_seconds(calibration, arm, ratio, step, steps, curriculum_fraction=CURRICULUM_FRACTION):
    """Modelled seconds of step ``step`` (0-based): the curriculum's ratio at that step,
    interpolated between the arm's times at ratio 1 and at ``ratio``."""
    times = calibration[arm]
    if arm in ("full", "full/fused"):
        return times[1.0]
    current = cggr.schedule.curriculum_ratio(step, int(curriculum_fraction * steps), ratio)
    share = 0.0 if ratio == 1.0 else (1.0 - current) / (1.0 - ratio)
    return times[1.0] + share * (times[ratio] - times[1.0])


def run_seconds(calibration, arm, ratio, steps, reference_steps):
    """Modelled wall-clock of a run of ``steps`` steps, the reference model's training included."""
    total = sum(step_seconds(calibration, arm, ratio, s, steps) for s in range(steps))
    if ARMS[arm] is not None and ARMS[arm][0] == "excess":
        total += reference_steps * calibration["reference_training"]
    return total


def steps_within(calibration, arm, ratio, budget, reference_steps):
    """The most steps of ``arm`` whose modelled run fits in ``budget`` seconds (at least 1)."""
    lo, hi = 1, 1
    while run_seconds(calibration, arm, ratio, hi, reference_steps) <= budget:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if run_seconds(calibration, arm, ratio, mid, reference_steps) <= budget else (lo, mid)
    return lo


# ----------------------------------------------------------------------------------------- main

def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--noise", type=float, default=0.5)
    parser.add_argument("--corpus-bytes", type=int, default=12_000_000)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--finetune-lr-factor", type=float, default=0.5)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--workers", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="bench/results/scenarios.json")
    parser.add_argument("--plot", default=None)
    parser.add_argument("--summarise", nargs="+", help="print the table (and --plot) of these result files")
    args = parser.parse_args()
    if args.summarise:
        results = [json.load(open(path)) for path in args.summarise]
        merged = {**results[0], "runs": [r for res in results for r in res["runs"]]}
        summarise(merged)
        if args.plot:
            plot(merged, args.plot)
        return
    began = time.perf_counter()
    data = prepare(args)
    model_config = GPTConfig(vocab_size=data["vocab"], seq_len=args.seq_len, n_layer=args.layers, n_head=4,
                             d_model=args.width)
    config = TrainConfig(steps=args.steps, batch=args.batch, lr=args.lr, device=args.device)
    print(f"data ready: {data['tokens']} tokens, vocab {data['vocab']} [{time.perf_counter() - began:.0f} s]",
          flush=True)
    calibration = calibrate(model_config, config, data, args.ratios)
    print("seconds per step:", json.dumps(calibration), flush=True)
    reference_steps = args.steps // 3
    full_budget = run_seconds(calibration, "full", 1.0, args.steps, 0)

    work = tempfile.mkdtemp(prefix="cggr-scenarios-")
    data_path = os.path.join(work, "data.pt")
    torch.save({**data, "model_config": model_config, "config": config, "device": args.device,
                "finetune_lr_factor": args.finetune_lr_factor}, data_path)
    result = dict(device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                  torch=torch.__version__, triton=_version("triton"), date=time.strftime("%Y-%m-%d"),
                  command=" ".join(["python"] + sys.argv), model=model_config.__dict__, train=config.__dict__,
                  noise=args.noise, tokens=data["tokens"], reference_model=REFERENCE_SHAPE,
                  reference_steps=reference_steps, finetune_lr_factor=args.finetune_lr_factor,
                  calibration={k: v if isinstance(v, float) else {str(r): s for r, s in v.items()}
                               for k, v in calibration.items()}, runs=[])

    def ref_path(scenario, seed):
        return os.path.join(work, f"reference_{scenario}_{seed}.pt")

    prep = [dict(kind="reference", scenario=s, seed=seed, steps=reference_steps, save=ref_path(s, seed))
            for s in args.scenarios for seed in range(args.seeds)]
    if "finetune" in args.scenarios:
        prep += [dict(kind="pretrain", scenario="finetune", seed=seed, save=os.path.join(work, f"base_{seed}.pt"))
                 for seed in range(args.seeds)]
    jobs = []
    for seed in range(args.seeds):  # seed by seed, so that a run cut short has every scenario
        for scenario in args.scenarios:
            common = dict(kind="train", scenario=scenario, seed=seed, base=os.path.join(work, f"base_{seed}.pt"))
            for arm in ("full", "full/fused"):
                jobs.append(dict(common, arm=arm, ratio=1.0, mode="steps", steps=args.steps))
            for ratio in args.ratios:
                for arm in SELECTIVE:
                    extra = dict(reference=ref_path(scenario, seed)) if ARMS[arm][0] == "excess" else {}
                    jobs.append(dict(common, arm=arm, ratio=ratio, mode="steps", steps=args.steps, **extra))
                    steps = steps_within(calibration, arm, ratio, full_budget, reference_steps)
                    jobs.append(dict(common, arm=arm, ratio=ratio, mode="time", steps=steps, **extra))
            full_fused_steps = steps_within(calibration, "full/fused", 1.0, full_budget, 0)
            jobs.append(dict(common, arm="full/fused", ratio=1.0, mode="time", steps=full_fused_steps))
    context = torch.multiprocessing.get_context("spawn")
    with context.Pool(args.workers, initializer=_load, initargs=(data_path,)) as pool:
        for done in pool.imap_unordered(run_job, prep):
            print(f"{done['kind']} {done['scenario']} seed {done['seed']} [{time.perf_counter() - began:.0f} s]",
                  flush=True)
        for run in pool.imap_unordered(run_job, jobs):
            run["seconds"] = run_seconds(calibration, run["arm"], run["ratio"], run["steps"], reference_steps)
            result["runs"].append(run)
            print(f"{run['scenario']} seed {run['seed']} {run['arm']:<20} r={run['ratio']} {run['mode']:<5} "
                  f"{run['steps']:4d} steps {run['seconds']:6.2f} s loss {run['loss']:.4f} "
                  f"[{time.perf_counter() - began:.0f} s]", flush=True)
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
    result["summary"] = summarise(result)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    if args.plot:
        plot(result, args.plot)


def _version(name):
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:
        return None


# -------------------------------------------------------------------------------------- summary

def _losses(runs, scenario, arm, ratio, mode):
    return {r["seed"]: r["loss"] for r in runs
            if (r["scenario"], r["arm"], r["ratio"], r["mode"]) == (scenario, arm, ratio, mode)}


def _paired(mine, other):
    seeds = sorted(set(mine) & set(other))
    if not seeds:
        return None
    mean, low, high = paired_interval([mine[s] - other[s] for s in seeds])
    return dict(mean=mean, low=low, high=high, n=len(seeds))


def summarise(result):
    """Rows per (scenario, arm, ratio): mean loss and paired differences; also printed."""
    runs, rows = result["runs"], []
    for scenario in [s for s in SCENARIOS if any(r["scenario"] == s for r in runs)]:
        full = _losses(runs, scenario, "full", 1.0, "steps")
        keys = sorted({(r["arm"], r["ratio"]) for r in runs if r["scenario"] == scenario and r["arm"] != "full"},
                      key=lambda k: (k[1], list(ARMS).index(k[0])))
        for arm, ratio in keys:
            row = dict(scenario=scenario, arm=arm, ratio=ratio)
            for mode in ("steps", "time"):
                mine = _losses(runs, scenario, arm, ratio, mode)
                if not mine:
                    continue
                rand = _losses(runs, scenario, "random", ratio, mode)
                row[mode] = dict(loss=statistics.mean(mine.values()), vs_full=_paired(mine, full),
                                 vs_random=None if arm == "random" else _paired(mine, rand),
                                 steps=statistics.mean(r["steps"] for r in runs if (r["scenario"], r["arm"],
                                                       r["ratio"], r["mode"]) == (scenario, arm, ratio, mode)))
            rows.append(row)
    print(f"\n{'scenario':<9}{'arm':<20}{'ratio':>5} | {'vs full, equal steps':>24} {'vs random, equal steps':>24}"
          f" | {'steps':>5} {'vs full, equal time':>24} {'vs random, equal time':>24}")

    def text(d):
        return "" if not d else f"{d['mean']:+.3f} [{d['low']:+.3f},{d['high']:+.3f}]"
    for row in rows:
        s, t = row.get("steps", {}), row.get("time", {})
        print(f"{row['scenario']:<9}{row['arm']:<20}{row['ratio']:5.2f} | {text(s.get('vs_full')):>24} "
              f"{text(s.get('vs_random')):>24} | {t.get('steps', 0):5.0f} {text(t.get('vs_full')):>24} "
              f"{text(t.get('vs_random')):>24}")
    return rows


def plot(result, path):
    """Held-out loss against wall-clock: one panel per scenario and ratio, mean over seeds of the
    equal-wall-clock runs (the full arm's run for the full loss)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = result["runs"]
    calibration = {k: v if isinstance(v, float) else {float(r): s for r, s in v.items()}
                   for k, v in result["calibration"].items()}
    scenarios = [s for s in SCENARIOS if any(r["scenario"] == s for r in runs)]
    ratios = sorted({r["ratio"] for r in runs if r["ratio"] < 1.0})
    figure, axes = plt.subplots(len(scenarios), len(ratios), figsize=(4.2 * len(ratios), 3.4 * len(scenarios)),
                                squeeze=False)
    styles = {"full": dict(color="black", lw=2.2), "full/fused": dict(color="gray", lw=1.5, ls="--"),
              "random": dict(color="tab:orange", lw=1.5), "importance/gradnorm": dict(color="tab:blue", lw=1.5),
              "topk/excess": dict(color="tab:red", lw=1.2), "importance/excess": dict(color="tab:green", lw=1.5)}
    for i, scenario in enumerate(scenarios):
        for j, ratio in enumerate(ratios):
            axis = axes[i][j]
            for arm, style in styles.items():
                arm_ratio, mode = (1.0, "steps") if arm == "full" else ((1.0, "time") if arm == "full/fused"
                                                                        else (ratio, "time"))
                chosen = [r for r in runs if (r["scenario"], r["arm"], r["ratio"], r["mode"]) ==
                          (scenario, arm, arm_ratio, mode)]
                if not chosen:
                    continue
                offset = (result["reference_steps"] * calibration["reference_training"]
                          if ARMS[arm] is not None and ARMS[arm][0] == "excess" else 0.0)
                points = []
                for k, (step, _) in enumerate(chosen[0]["curve"]):
                    seconds = offset + sum(step_seconds(calibration, arm, arm_ratio, s, chosen[0]["steps"])
                                           for s in range(step))
                    points.append((seconds, statistics.mean(r["curve"][k][1] for r in chosen)))
                axis.plot(*zip(*points), label=arm, **style)
            axis.set_title(f"{scenario}, ratio {ratio}", fontsize=9)
            axis.grid(alpha=0.3)
            if i == len(scenarios) - 1:
                axis.set_xlabel("wall-clock (s)")
            if j == 0:
                axis.set_ylabel("held-out loss")
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    print("wrote", path)


if __name__ == "__main__":
    main()
