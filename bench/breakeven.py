"""When can selection pay at equal wall-clock? The break-even from measured results.

    python bench/breakeven.py [results/scenarios_H200.json]

At equal steps a selective arm ends at a higher held-out loss than the full loss. The full
loss's own curve says how many of its steps that loss is worth (``worth``); the selective arm's
steps must then be faster by ``steps / worth`` just to break even. The measured step times
(``calibration`` in the file, each arm alone on the GPU) say how fast they are. Finally, the head
share needed: if a GPU-bound head cost in proportion to its matmul FLOPs (forward for every row,
backward for the kept share r: (1 + 2r) / 3 of the full head's), the head and loss must take at
least ``(1 - worth / steps) / (1 - (1 + 2r) / 3)`` of the full step for that speed-up to exist.
"""
import json
import os
import statistics
import sys

HERE = os.path.join(os.path.dirname(__file__), "results")
sys.path.insert(0, os.path.dirname(__file__))
from quality_scenarios import run_seconds  # noqa: E402


def crossing_step(curve, loss):
    """The step (linearly interpolated) at which a falling curve of (step, loss) first reaches
    ``loss``; None if it never does."""
    previous = None
    for step, value in curve:
        if value <= loss:
            if previous is None:
                return step
            fraction = (previous[1] - loss) / (previous[1] - value)
            return previous[0] + fraction * (step - previous[0])
        previous = (step, value)
    return None


def rows(result):
    """Per (scenario, arm, ratio): steps worth, speed-up needed and measured, head share needed."""
    runs = result["runs"]
    calibration = {k: v if isinstance(v, float) else {float(r): s for r, s in v.items()}
                   for k, v in result["calibration"].items()}
    steps = result["train"]["steps"]
    full_seconds = run_seconds(calibration, "full", 1.0, steps, 0)
    out = []
    for scenario in sorted({r["scenario"] for r in runs}, key=["clean", "noisy", "finetune"].index):
        full = {r["seed"]: r for r in runs if (r["scenario"], r["arm"], r["mode"]) == (scenario, "full", "steps")}
        keys = sorted({(r["arm"], r["ratio"]) for r in runs if r["scenario"] == scenario and r["ratio"] < 1.0},
                      key=lambda k: (k[1], k[0]))
        for arm, ratio in keys:
            mine = [r for r in runs if (r["scenario"], r["arm"], r["ratio"], r["mode"]) ==
                    (scenario, arm, ratio, "steps") and r["seed"] in full]
            worth = statistics.mean(crossing_step(full[r["seed"]]["curve"], r["loss"]) or steps for r in mine)
            needed = steps / worth
            measured = full_seconds / run_seconds(calibration, arm, ratio, steps, result["reference_steps"])
            head_cost = (1 + 2 * ratio) / 3
            share = (1 - worth / steps) / (1 - head_cost)
            out.append(dict(scenario=scenario, arm=arm, ratio=ratio, worth=worth, steps=steps, needed=needed,
                            measured=measured, head_share=share))
    return out


def main(path=None):
    path = path or os.path.join(HERE, "scenarios_H200.json")
    result = json.load(open(path))
    cal = result["calibration"]
    print(f"measured step times (ms, alone on the GPU): full {1e3 * cal['full']['1.0']:.2f}, "
          f"full/fused {1e3 * cal['full/fused']['1.0']:.2f}, " + ", ".join(
              f"{arm} {'/'.join(f'{1e3 * t:.2f}' for r, t in sorted(cal[arm].items()) if r != '1.0')}"
              for arm in ("random", "importance/gradnorm", "topk/excess", "importance/excess"))
          + " at ratios " + "/".join(sorted(r for r in cal["random"] if r != "1.0")))
    print(f"{'scenario':<9} {'arm':<20} {'ratio':>5} {'worth full steps':>16} {'speed-up needed':>15} "
          f"{'measured':>8}  head share needed")
    for row in rows(result):
        share = ">100%" if row["head_share"] > 1 else f"{100 * row['head_share']:.0f}%"
        print(f"{row['scenario']:<9} {row['arm']:<20} {row['ratio']:5.2f} {row['worth']:10.0f}/{row['steps']} "
              f"{row['needed']:14.2f}x {row['measured']:7.2f}x  {share}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
