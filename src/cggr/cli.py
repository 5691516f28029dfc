"""Command line: ``cggr demo`` (also ``python -m cggr demo``): parses the arguments, then runs
:func:`cggr.demo.run.run_demo`."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional


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
    from .demo.run import MIN_TEXT_BYTES
    from .scoring import SCORINGS
    from .selection import SELECTIONS

    parser = argparse.ArgumentParser(prog="cggr", description="Confidence-Gated Gradient Routing")
    parser.add_argument("--version", action="version", version=f"cggr {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train a small GPT with the full loss, CGGR and random selection")
    demo.add_argument("--text", help=f"train on this UTF-8 text file (at least {MIN_TEXT_BYTES // 1000} kB) "
                                     "instead of Python's built-in help text")
    demo.add_argument("--steps", type=_positive_int, default=600, help="optimizer steps per arm (default 600)")
    demo.add_argument("--ratio", type=_ratio, default=0.5, help="final share of tokens kept (default 0.5)")
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
        from .demo.run import DemoInputError, run_demo  # the demo's imports only when it runs

        try:
            run_demo(args)
        except DemoInputError as error:
            parser.exit(2, f"cggr demo: error: {error}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
