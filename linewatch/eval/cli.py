"""The `eval` and `bench` subcommands; `linewatch.cli` calls `register(subparsers)`.

    linewatch eval --dataset ROOT [--categories A B] [--out DIR] [-c CONFIG] [--method objects|patch|fused|patchcore|both ...]
    linewatch bench [--batch-sizes 1 4 8] [--out bench.json] [--samlad-random] ...

`bench` runs linewatch.eval.bench (benchmarks/detector_bench.py is a wrapper of it).
"""

from __future__ import annotations

import argparse
import sys

EXIT_USAGE = 2
def cmd_eval(args: argparse.Namespace) -> int:
    from linewatch.config import load_config
    from linewatch.eval.dataset import DatasetError, load_dataset

    config = load_config(args.config)
    try:
        loaded = load_dataset(args.dataset, args.categories)  # a layout's fault is told before the models start
    except DatasetError as e:
        print(f"linewatch: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    from linewatch.detector.models import BACKEND_LABELS
    from linewatch.eval.report import render_markdown
    from linewatch.eval.runner import evaluate

    print(f"backend: {BACKEND_LABELS[config.detector.backend]}", file=sys.stderr)
    try:
        report = evaluate(config, args.dataset, args.categories, args.out, method=args.method,
                          progress=not args.quiet, batch_size=args.batch_size, max_fpr=args.max_fpr, loaded=loaded)
    except DatasetError as e:  # what only the run finds (too few images for a method)
        print(f"linewatch: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if not args.quiet:
        print(render_markdown(report))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from linewatch.eval.bench import main

    return int(main(args=args))


def register(subparsers) -> None:
    """Add `eval` and `bench` to the `linewatch` argument parser's subparsers."""
    p = subparsers.add_parser("eval", help="accuracy on MVTec LOCO-layout folders (AUROC, AU-sPRO, verdict rates)")
    p.add_argument("--dataset", required=True, help="folder holding category folders in the MVTec LOCO layout")
    p.add_argument("--categories", nargs="+", default=None, help="category folder names (default: all)")
    p.add_argument("--out", default="eval_out", help="output folder (report.json, report.md, PNGs, TIFF maps)")
    p.add_argument("-c", "--config", default=None, help="config YAML (default: built-in defaults, classic backend)")
    p.add_argument("--method", nargs="+", choices=["objects", "patch", "fused", "patchcore", "both"], default=["both"],
                   help="fused = the detector's score; objects / patch = its object (SAM-LAD) and patch branches "
                   "alone (one detector run gives all three); patchcore = object-free kNN baseline on the same "
                   "backbone; both = all of them")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-fpr", type=float, default=0.05, help="AU-sPRO integration limit")
    p.add_argument("--quiet", action="store_true", help="no progress bars, no table on stdout")
    p.set_defaults(func=cmd_eval)

    p = subparsers.add_parser("bench", help="detector speed: per-stage time, img/s, latency vs batch size")
    from linewatch.eval.bench import add_arguments

    add_arguments(p)
    p.set_defaults(func=cmd_bench)
