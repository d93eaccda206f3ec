"""The ``tangentlens`` command line.

``tangentlens demo [--out DIR] [--seed S] [--quick]`` runs the main job (:mod:`tangentlens.demo`). For your
own model, every command reads a TOML config (:mod:`tangentlens.cli.config`; see the README's "Your own
model")::

    tangentlens featurize CONFIG [--resume] [--scheduler ADDRESS] [--kernel NAME]   # features -> store
    tangentlens kernel    CONFIG [--resume] [--scheduler ADDRESS] [--kernel NAME]   # kernels, out of core
    tangentlens fit       CONFIG [--kernel NAME]     # kGLMs from the stored features, faithfulness
    tangentlens explain   CONFIG                     # proponents / opponents of test points
    tangentlens attribute CONFIG                     # counterfactual attribution (TRAK's estimator)
    tangentlens report    CONFIG [--out DIR]         # the demo's HTML report for your model and data

``tangentlens --version`` prints the version. Bad arguments exit with status 2 and a message that says what
to change; errors of the library (a bad config included) exit with status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import __version__

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


_OWN = {
    "featurize": ("compute the feature rows of the training and test inputs of every kernel into the store",
                  "Feature rows (per-example gradients, projected when the kernel has a projection) of the "
                  "training and test inputs of every [kernels.NAME] table, written chunk by chunk into "
                  "<store>/NAME/train and <store>/NAME/test. Resumable with --resume."),
    "kernel": ("compute the train x train and test x train kernels from the stored features, out of core",
               "The N x N and T x N kernels of every kernel from its feature stores, block by block into "
               "<store>/NAME/K_train and K_test; never the whole N x N in memory. Resumable with --resume."),
    "fit": ("fit kGLM surrogates from the stored features and score their faithfulness",
            "A kGLM per kernel and [surrogate] target (true labels, distilled from the network), fitted from "
            "the stored features without the N x N kernel when they have at most N dimensions; "
            "faithfulness on the test set; coefficients stored in <store>/NAME/surrogate-TARGET, the table "
            "in <store>/fit.json."),
    "explain": ("explain test points with a stored surrogate (proponents, opponents)",
                "The network's predicted class on the [explain] points, decomposed by the stored kGLM of "
                "[explain] kernel / target into training-point contributions: top-k proponents and "
                "opponents, written as JSON ([explain] out)."),
    "attribute": ("counterfactual attribution of test points (TRAK's estimator on the margin kernel)",
                  "tangentlens.attribute on the [attribute] points: the training points whose removal would "
                  "lower or raise each test margin; top-k as JSON and all scores as .npy ([attribute] out)."),
    "report": ("write the demo's HTML report for your model and data",
               "Kernels of [report] kernels, kGLMs, faithfulness, explanations, a verdict in words and "
               "figures (an image gallery for image inputs, highlighted tokens for text inputs), written to "
               "[report] out (index.html, results.json, PNGs). In memory: sized for data whose N x N kernels "
               "fit."),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``tangentlens`` (``demo`` and the commands for your own model)."""
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
    for name, (help_, description) in _OWN.items():
        p = sub.add_parser(name, help=help_, description=description + " CONFIG is a TOML file; see the "
                           "README's 'Your own model'.")
        p.add_argument("config", type=Path, metavar="CONFIG", help="the TOML configuration file")
        if name in ("featurize", "kernel"):
            p.add_argument("--resume", action="store_true",
                           help="continue interrupted stores (finished blocks are kept) and reuse complete "
                           "ones; without it an existing store is an error")
            p.add_argument("--scheduler", metavar="ADDRESS", default=None,
                           help="a dask.distributed scheduler address (tcp://HOST:PORT) to run the chunks "
                           "or kernel blocks on; workers rebuild the model from [model] factory + "
                           "checkpoint and write to the store, which must be on a file system they share "
                           "(needs tangentlens[distributed])")
        if name in ("featurize", "kernel", "fit"):
            p.add_argument("--kernel", action="append", metavar="NAME", dest="kernels",
                           help="only this [kernels.NAME] table (repeatable; default: all)")
        if name == "report":
            p.add_argument("--out", type=Path, default=None, metavar="DIR",
                           help="report folder (default: [report] out of the config)")
        p.add_argument("--threads", type=_positive, default=None, metavar="N",
                       help="torch CPU threads (default: torch's) and BLAS threads of the surrogate fits "
                       "(default: 1)")
        p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser


def _run_demo(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"argument --out: {str(args.out)!r} exists and is not a folder")
    from ..demo import DemoConfig, run_demo

    run_demo(DemoConfig(out=args.out, seed=args.seed, quick=args.quick, progress=not args.no_progress,
                        threads=args.threads))
    return 0


def _run_own(args: argparse.Namespace) -> Any:
    """Load the config and run one of the commands for your own model."""
    import torch

    from . import commands
    from .config import load_config
    from .report import run_report

    cfg = load_config(args.config)
    progress = not args.no_progress
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    # BLAS threads of the surrogate fits: --threads (default 1). OpenBLAS threads next to torch's stall on
    # small problems (a 60-point kGLM fit: 2.8 s with 2 BLAS threads on a busy 2-core machine, 0.14 s with 1).
    limits: Any = contextlib.nullcontext()
    with contextlib.suppress(ImportError):  # threadpoolctl comes with scikit-learn
        from threadpoolctl import threadpool_limits

        limits = threadpool_limits(limits=args.threads or 1, user_api="blas")
    try:
        with limits:
            if args.command == "report":
                return run_report(cfg, out=args.out, progress=progress)
            if args.command in ("featurize", "kernel"):
                run = commands.featurize_command if args.command == "featurize" else commands.kernel_command
                return run(cfg, kernels=args.kernels, resume=args.resume, progress=progress,
                           scheduler=args.scheduler)
            if args.command == "fit":
                return commands.fit_command(cfg, kernels=args.kernels, progress=progress)
            run = commands.explain_command if args.command == "explain" else commands.attribute_command
            return run(cfg, progress=progress)
    finally:
        torch.set_num_threads(threads)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tangentlens`` console script.

    Args:
        argv: arguments without the program name (default ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 1 when the library raises a ``TangentLensError`` (a bad config
        included) or a file cannot be written. Bad arguments exit through ``argparse`` with status 2.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        parser.exit(2, "tangentlens: error: a command is required (try: tangentlens demo)\n")
    from ..errors import TangentLensError

    try:
        if args.command == "demo":
            return _run_demo(parser, args)
        _run_own(args)
    except TangentLensError as exc:
        print(f"tangentlens: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. a report or store folder that cannot be written
        what = "the report" if args.command in ("demo", "report") else "a file"
        print(f"tangentlens: error: cannot write {what}: {exc}", file=sys.stderr)
        return 1
    return 0
