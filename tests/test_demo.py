"""The main job runs end to end on the CPU and writes its table, plot and JSON."""
import json
import os

import pytest

pytest.importorskip("tokenizers")
pytest.importorskip("matplotlib")

from cggr.cli import main  # noqa: E402


def test_demo_writes_table_plot_and_json(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--steps", "6", "--device", "cpu", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "held-out loss" in printed and "random (control)" in printed
    result = json.loads((out / "demo.json").read_text())
    assert [row["arm"] for row in result["summary"]] == ["full loss", "CGGR combined/topk", "random (control)"]
    assert os.path.getsize(out / "demo.png") > 10_000
    full, cggr, control = result["summary"]
    assert full["tokens_carried_loss"] == full["tokens_seen"]
    assert cggr["tokens_carried_loss"] < cggr["tokens_seen"]
    assert cggr["tokens_carried_loss"] == control["tokens_carried_loss"]  # same schedule, same count


def test_demo_rejects_a_bad_option(tmp_path):
    with pytest.raises(ValueError, match="scoring"):
        main(["demo", "--steps", "2", "--scoring", "nope", "--out", str(tmp_path)])
