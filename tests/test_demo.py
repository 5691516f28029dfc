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
    assert "nats" in printed and "random selection of as many tokens" in printed  # the verdict in words
    result = json.loads((out / "demo.json").read_text())
    assert [row["arm"] for row in result["summary"]] == ["full loss", "CGGR gradnorm/importance", "random (control)"]
    assert os.path.getsize(out / "demo.png") > 10_000
    full, cggr, control = result["summary"]
    assert full["tokens_carried_loss"] == full["tokens_seen"]
    assert cggr["tokens_carried_loss"] < cggr["tokens_seen"]
    assert cggr["tokens_carried_loss"] == control["tokens_carried_loss"]  # same schedule, same count
    assert result["ratio"] == 0.5  # the recommended ratio by default


@pytest.mark.parametrize("args,word", [
    (["--steps", "0"], "--steps"), (["--steps", "-5"], "--steps"), (["--steps", "x"], "--steps"),
    (["--ratio", "0"], "--ratio"), (["--ratio", "1.5"], "--ratio"), (["--seeds", "0"], "--seeds"),
    (["--scoring", "nope"], "--scoring"), (["--selection", "nope"], "--selection"),
    (["--text", "TINY"], "at least 50 kB"), (["--text", "MISSING"], "cannot read"),
])
def test_demo_rejects_bad_values_with_exit_code_2(tmp_path, capsys, args, word):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("a few words only\n\nand one more paragraph")
    args = [{"TINY": str(tiny), "MISSING": str(tmp_path / "none.txt")}.get(a, a) for a in args]
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--out", str(tmp_path / "out")] + args)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert word in error and "Traceback" not in error
    assert not (tmp_path / "out").exists()


def test_version_and_help_list_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and "cggr " in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = capsys.readouterr().out
    assert "gradnorm" in text and "importance" in text and "stratified" in text
