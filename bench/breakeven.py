"""When can selection pay at equal wall-clock? The break-even from measured results.

    python bench/breakeven.py

At equal steps a selective arm ends at a higher held-out loss than the full loss
(``results/quality_*.json``). The full loss's own curve says how many of its steps that loss is
worth; the selective arm must then run faster by the inverse ratio just to break even. The
fused head's measured times (``results/linear_*.json``) say how much of the head's time a ratio
saves, and so which share of the whole step the head must take for that speed-up to exist.
"""
import glob
import json
import os
import statistics

HERE = os.path.join(os.path.dirname(__file__), "results")


def crossing_step(curve, loss):
    """The step (linearly interpolated) at which a falling curve first reaches ``loss``."""
    previous = None
    for point in curve:
        if point["loss"] <= loss:
            if previous is None:
                return point["step"]
            fraction = (previous["loss"] - loss) / (previous["loss"] - point["loss"])
            return previous["step"] + fraction * (point["step"] - previous["step"])
        previous = point
    return None


def head_saving(linear_rows, ratio, selection="importance"):
    """{(N, H, V): share of the fused head's time that ``ratio`` saves against ratio 1}."""
    times = {}
    for row in linear_rows:
        if not row.get("grads_kept"):
            times[(row["N"], row["H"], row["V"], row["method"])] = row["ms"]
    savings = {}
    for (n, h, v, method), ms in times.items():
        if method == f"cggr linear r={ratio} {selection}":
            full = times.get((n, h, v, "cggr linear r=1.0"))
            if full:
                savings[(n, h, v)] = 1 - ms / full
    return savings


def _share_text(share):
    if share < 0:
        return "never (slower)"
    return ">100%" if share > 1 else f"{100 * share:.0f}%"


def main():
    runs = [run for path in sorted(glob.glob(os.path.join(HERE, "quality_*.json")))
            for run in json.load(open(path))["runs"]]
    full = {r["seed"]: r for r in runs if r["arm"]["full"]}
    steps = next(iter(full.values()))["curve"][-1]["step"]
    linear = json.load(open(os.path.join(HERE, "linear_H200.json")))["rows"]
    shapes = sorted(head_saving(linear, 0.25))
    print("head + loss shapes (N, H, V):", ", ".join(map(str, shapes)))
    print(f"{'arm':<28} {'loss':>6} {'worth full steps':>16} {'speed-up needed':>15}  head share of the step needed")
    for name in sorted({r["arm"]["name"] for r in runs if not r["arm"]["full"]}):
        mine = [r for r in runs if r["arm"]["name"] == name]
        # Per seed: the step at which the full loss's curve reaches this arm's final loss
        # (all of them if it never does: then the arm is at least as good at equal steps).
        worth = statistics.mean(crossing_step(full[r["seed"]]["curve"], r["held_out_loss"]) or steps for r in mine)
        needed = steps / worth
        savings = head_saving(linear, mine[0]["arm"]["ratio"])
        shares = [_share_text((1 - 1 / needed) / savings[shape]) if shape in savings else "n/a" for shape in shapes]
        loss = statistics.mean(r["held_out_loss"] for r in mine)
        print(f"{name:<28} {loss:6.3f} {worth:11.0f}/{steps} {needed:14.2f}x  {', '.join(shares)}")


if __name__ == "__main__":
    main()
