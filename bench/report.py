"""Markdown tables for the README from the JSON files under bench/results/.

    python bench/report.py
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from _results import loss_row_note  # noqa: E402

HERE = os.path.join(os.path.dirname(__file__), "results")


def loss_table(path):
    data = json.load(open(path))
    lines = [f"`{data['command']}` on {data['device']} (copy bandwidth {data['copy_bandwidth_gbs']:.0f} GB/s), "
             f"{data['dtype']}, forward+backward, median ms / peak extra GB:", "",
             "| N | V | method | ms | extra GB | note |", "|---|---|---|---|---|---|"]
    for row in data["rows"]:
        extra = "" if row["extra_bytes"] is None else f"{row['extra_bytes'] / 1e9:.2f}"
        lines.append(f"| {row['N']} | {row['V']} | {row['method']} | {row['ms']:.3f} | {extra} | "
                     f"{loss_row_note(row)} |")
    return "\n".join(lines)


def linear_table(path):
    data = json.load(open(path))
    lines = [f"`{data['command']}` on {data['device']}, {data['dtype']}, forward+backward (grads of hidden and "
             "weight), median ms / peak extra GB:", "",
             "| N | H | V | method | grads kept | ms | extra GB |", "|---|---|---|---|---|---|---|"]
    for row in data["rows"]:
        kept = "yes" if row.get("grads_kept") else "no"
        lines.append(f"| {row['N']} | {row['H']} | {row['V']} | {row['method']} | {kept} | {row['ms']:.2f} | "
                     f"{row['extra_bytes'] / 1e9:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    for name in sorted(os.listdir(HERE)):
        path = os.path.join(HERE, name)
        if name.startswith("loss_") and name.endswith(".json"):
            print(loss_table(path), "\n")
        elif name.startswith("linear_") and name.endswith(".json"):
            print(linear_table(path), "\n")
