"""The ``tangentlens`` command line.

``tangentlens demo [--out DIR] [--seed S] [--quick]`` runs the main job (:mod:`tangentlens.demo`);
``tangentlens --version`` prints the version. Bad arguments exit with status 2 and a message that says what
to change; errors of the library exit with status 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from tangentlens import __version__

__all__ = ["build_parser", "main"]


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}") from None
    if value < 0 or value >= 2**32:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer below 2**32, got {value}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``tangentlens`` (subcommand ``demo``)."""
    parser = argparse.ArgumentParser(
        prog="tangentlens",
        description="Explain trained neural networks with kernel machines on empirical neural tangent "
        "kernels.",
    )
    parser.add_argument("--version", action="version", version=f"tangentlens {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="train a small CNN on the bundled digits, fit kernel surrogates, print a faithfulness "
        "table and write an HTML report",
        description="Train a small CNN on scikit-learn's bundled 8x8 digits, compute its trNTK, trNTK0, "
        "pNTK, Em and CK kernels, fit kernel surrogates (true labels, distilled, reference SGD), print a "
        "faithfulness table and write a report folder (index.html, scatter.png, gallery.png, "
        "results.json). Deterministic for a seed.",
    )
    demo.add_argument("--out", type=Path, default=Path("tangentlens-report"), metavar="DIR",
                      help="report folder (default: %(default)s)")
    demo.add_argument("--seed", type=_seed, default=0, metavar="S",
                      help="seed of the split, the network and the surrogates (default: %(default)s)")
    demo.add_argument("--quick", action="store_true",
                      help="a smaller, faster run (400 train / 200 test digits, 15 epochs)")
    demo.add_argument("--threads", type=_positive, default=1, metavar="N",
                      help="torch CPU threads (default: %(default)s, the fastest for this small job on "
                      "a shared machine)")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tangentlens`` console script.

    Args:
        argv: arguments without the program name (default ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 1 when the library raises a ``TangentLensError`` or the report
        cannot be written. Bad arguments exit through ``argparse`` with status 2.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        parser.exit(2, "tangentlens: error: a command is required (try: tangentlens demo)\n")
    if args.command == "demo":
        if args.out.exists() and not args.out.is_dir():
            parser.error(f"argument --out: {str(args.out)!r} exists and is not a folder")
        from tangentlens.demo import DemoConfig, run_demo
        from tangentlens.errors import TangentLensError

        try:
            run_demo(DemoConfig(out=args.out, seed=args.seed, quick=args.quick,
                                progress=not args.no_progress, threads=args.threads))
        except TangentLensError as exc:
            print(f"tangentlens: error: {exc}", file=sys.stderr)
            return 1
        except OSError as exc:  # e.g. the report folder cannot be written
            print(f"tangentlens: error: cannot write the report: {exc}", file=sys.stderr)
            return 1
        return 0
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover - argparse rejects it first
    return 2  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
