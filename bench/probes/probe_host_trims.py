"""Host time per call of small steps (the GPU never holds the host back), for one source tree:
run it alternately on two trees to compare host-side changes.

    python bench/probes/probe_host_trims.py [SRC_DIR] [--label NAME]

Cases: 64 x 256 logits at ratio 0.25 (importance, topk) and 1, CGGRLoss(0.25), and a 64-row
head (H = 256, V = 256) at ratio 0.25 and 1; bf16, targets checked off (CGGRLoss: its defaults).
Prints the fastest of five rounds of 300 calls, in microseconds.
"""
import os
import sys

src = next((a for a in sys.argv[1:] if not a.startswith("--")), os.path.join(os.path.dirname(__file__), "..", "..",
                                                                               "src"))
sys.path.insert(0, src)
import torch  # noqa: E402

from cggr import CGGRLoss  # noqa: E402
from cggr.functional import cggr_cross_entropy, cggr_linear_cross_entropy  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # after cggr: profile_step adds this tree's src
from profile_step import host_us  # noqa: E402


def main():
    label = sys.argv[sys.argv.index("--label") + 1] if "--label" in sys.argv else src
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    t = torch.randint(0, 256, (64,), device="cuda")
    h = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    criterion = CGGRLoss(min_tokens_ratio=0.25, warmup_steps=0)

    def logits_step(ratio, selection):
        def run():
            cggr_cross_entropy(x, t, ratio, selection=selection, check_targets=False).backward()
            x.grad = None
        return run

    def head_step(ratio):
        def run():
            cggr_linear_cross_entropy(h, w, t, ratio, check_targets=False).backward()
            h.grad = w.grad = None
        return run

    def criterion_step():
        criterion(x, t).backward()
        x.grad = None
    cases = {"logits r=0.25 importance": logits_step(0.25, "importance"),
             "logits r=0.25 topk": logits_step(0.25, "topk"), "logits r=1": logits_step(1.0, "importance"),
             "CGGRLoss(0.25)": criterion_step, "head r=0.25": head_step(0.25), "head r=1": head_step(1.0)}
    times = "".join(f" {name}: {host_us(step, calls=300, rounds=5):6.1f}" for name, step in cases.items())
    print(f"{label:<8}{times}  (host us)")


if __name__ == "__main__":
    main()
