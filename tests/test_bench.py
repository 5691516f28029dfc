"""The quality-scenarios benchmark runs end to end at a toy size on the CPU, and the
break-even report reads what it writes."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("tokenizers")

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_quality_scenarios_and_breakeven_at_toy_size(tmp_path):
    import sysconfig
    if not os.path.isdir(os.path.join(sysconfig.get_paths()["stdlib"], "test")):
        pytest.skip("the fine-tuning scenario needs the standard library's test suite")
    out = tmp_path / "scenarios.json"
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"))
    subprocess.run([sys.executable, os.path.join(ROOT, "bench", "quality_scenarios.py"), "--corpus-bytes", "300000",
                    "--vocab", "300", "--width", "16", "--layers", "1", "--batch", "2", "--seq-len", "16",
                    "--steps", "6", "--seeds", "2", "--ratios", "0.5", "--workers", "2", "--eval-batches", "1",
                    "--device", "cpu", "--out", str(out)], check=True, env=env, capture_output=True, timeout=600)
    result = json.loads(out.read_text())
    arms = {(r["scenario"], r["arm"], r["mode"]) for r in result["runs"]}
    for scenario in ("clean", "noisy", "finetune"):
        for arm in ("full", "random", "importance/gradnorm", "topk/excess", "importance/excess"):
            assert (scenario, arm, "steps") in arms
        assert (scenario, "importance/excess", "time") in arms
    assert len(result["runs"]) == 3 * 2 * (2 + 4 * 2 + 1)  # scenarios x seeds x arms and modes
    assert all(r["steps"] >= 1 and r["seconds"] > 0 for r in result["runs"])
    rows = {(r["scenario"], r["arm"], r["ratio"]): r for r in result["summary"]}
    assert rows[("noisy", "importance/gradnorm", 0.5)]["steps"]["vs_random"]["n"] == 2
    printed = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "breakeven.py"), str(out)], check=True,
                             env=env, capture_output=True, text=True, timeout=120).stdout
    assert "head share needed" in printed and "finetune" in printed


def test_report_builds_every_section_from_the_stored_results():
    """bench/README.md is generated from bench/results/: every stored file has a table."""
    bench = os.path.join(os.path.dirname(__file__), "..", "bench")
    sys.path.insert(0, bench)
    try:
        import report
        text = report.build()
    finally:
        sys.path.remove(bench)
    for name in os.listdir(os.path.join(bench, "results")):
        if name.endswith(".json") and not name.startswith(("quality_", "scenarios_")):
            assert f"results/{name}" in text, name
    assert "## Small shapes, in alternated rounds" in text
    assert "## Where selection pays" in text
