"""The `linewatch` command.

    linewatch demo                         synthetic line + daemon + tap on loopback (weights-free)
    linewatch serve -c CONFIG              the daemon
    linewatch bank build ...               template bank from good images, calibrated
    linewatch bank info BANK               what a bank holds
    linewatch bank switch --socket S ...   put another bank in service in a running daemon
    linewatch inspect IMAGE... ...         judge image files, write JSON + overlay PNGs
    linewatch sim generate ...             synthetic products in the MVTec LOCO layout
    linewatch models list|download         the official checkpoints
    linewatch replay / tap                 camera simulator / verdict printer
    linewatch camera [grab] --source URI   one camera to the daemon (or N frames to files)
    linewatch actuate -c CONFIG            the reject component: verdicts -> PLC (Modbus/TCP, OPC UA)
    linewatch eval ...                     accuracy on MVTec LOCO-layout folders
    linewatch config check|schema|example  a config file without starting the daemon
    linewatch archive query|export ...     the verdict archive (runtime.archive)

Errors a user can fix (bad config, image, bank, checkpoint) print one clear message and exit
with status 2; anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from linewatch import __version__

EXIT_USAGE = 2


# The errors that mean bad input (one line, exit 2), by module. Only a module already imported can
# have raised one, so `_user_errors` looks them up in sys.modules: importing them all to answer a
# `keys generate` typo imported the whole detector stack (torch, timm) before the line was printed.
USER_ERRORS = {
    "linewatch.config": "ConfigError",
    "linewatch.detector.manifest": "BankError",
    "linewatch.detector.inspector": "InputError",
    "linewatch.detector.segment": "SegmenterError",
    "linewatch.detector.weights": "WeightsError",
    "linewatch.good_images": "BankBuildError",
    "linewatch.images": "ImageError",
    "linewatch.runtime.transport.security": "SecurityError",
}


def _user_errors() -> tuple[type[BaseException], ...]:
    return tuple(getattr(sys.modules[module], name) for module, name in USER_ERRORS.items() if module in sys.modules)


# ---------------------------------------------------------------------------- models


def cmd_models_list(args: argparse.Namespace) -> int:
    from linewatch.detector.weights import CHECKPOINTS

    for name, spec in CHECKPOINTS.items():
        sha = spec.sha256[:12] + "…" if spec.sha256 else "(no published sha256)"
        print(f"{name:28s} {spec.file_name:38s} ~{spec.approx_mb:>5d} MB  sha256 {sha}  {spec.note}")
    return 0


def cmd_models_download(args: argparse.Namespace) -> int:
    from linewatch.detector.weights import CHECKPOINTS, download

    names = args.names or ["dinov2_vits14", "featup_dinov2_jbu", "sam_vit_b"]
    unknown = [n for n in names if n not in CHECKPOINTS]
    if unknown:
        print(f"linewatch: error: unknown checkpoint names {unknown}; see `linewatch models list`", file=sys.stderr)
        return EXIT_USAGE
    download(names, args.dir, timeout_s=args.timeout, progress=not args.quiet)
    print(f"downloaded and verified {len(names)} checkpoint(s) into {args.dir}")
    return 0


# ---------------------------------------------------------------------------- bank


def cmd_bank_build(args: argparse.Namespace) -> int:
    from linewatch.config import load_config
    from linewatch.good_images import read_good_images

    config = load_config(args.config)
    images = read_good_images(config, args.good, args.validation)  # a folder's fault is told before the models start
    from linewatch.bank_builder import build_bank_from
    from linewatch.detector.models import BACKEND_LABELS

    print(f"backend: {BACKEND_LABELS[config.detector.backend]}", file=sys.stderr)
    bank = build_bank_from(
        config, images, batch_size=args.batch_size, progress=not args.quiet, log=lambda m: print(m, file=sys.stderr),
    )
    out = Path(args.out or config.bank.path)
    bank.save(out)
    cal = bank.calibration
    print(
        f"bank {bank.bank_id}: {bank.size} {'grey (mono) ' if bank.manifest.colour_mode == 'mono' else ''}good images, "
        f"threshold {cal.threshold:.4g} "
        f"({cal.method} of n={cal.n} good scores: {cal.source}); false-reject rate: "
        f"target {cal.target_false_reject_rate:.2%}, expected {cal.expected_false_reject_rate:.2%} "
        f"({cal.confidence:.0%} CI {cal.ci_low:.2%} to {cal.ci_high:.2%}; "
        + ("enough good images" if cal.enough else f"needs {cal.n_required} good images, see the WARNING")
        + f") -> {out}"
    )
    return 0


def cmd_bank_info(args: argparse.Namespace) -> int:
    from linewatch.detector.manifest import read_manifest

    read_manifest(args.bank)  # a missing or corrupt file is told before torch is imported
    from linewatch.detector.bank import TemplateBank

    print(json.dumps(TemplateBank.load(args.bank).info(), indent=2))
    return 0


# ---------------------------------------------------------------------------- inspect


def cmd_inspect(args: argparse.Namespace) -> int:
    from linewatch.config import load_config
    from linewatch.detector.manifest import read_manifest

    config = load_config(args.config)
    bank_path = args.bank or config.bank.path
    # a missing, corrupt or unfitting bank is told before the models start
    read_manifest(bank_path).check_fits(config, source=f"bank {bank_path}")
    from linewatch.detector.models import BACKEND_LABELS
    from linewatch.images import ImageError, read_image, write_image
    from linewatch.overlay import render_overlay
    from linewatch.recipe import load_processor

    inspector, _ = load_processor(config, bank_path)
    print(f"backend: {BACKEND_LABELS[config.detector.backend]}; bank {inspector.bank_id}", file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary, failures, used_names = [], 0, set()
    for start in range(0, len(args.images), args.batch_size):
        paths = [Path(p) for p in args.images[start:start + args.batch_size]]
        images, ok_paths = [], []
        for path in paths:
            try:
                image = read_image(path)
                inspector.check_image(image, str(path))
            except (ImageError, ValueError) as e:
                print(f"linewatch: error: {e}", file=sys.stderr)
                summary.append({"file": str(path), "verdict": "error", "reason": str(e)})
                failures += 1
                continue
            images.append(image)
            ok_paths.append(path)
        if not images:
            continue
        for path, image, result in zip(ok_paths, images, inspector.inspect(images)):
            record = {
                "file": str(path), "verdict": result.verdict, "score": round(result.score, 6),
                "threshold": round(result.threshold, 6), "backend": result.backend, "bank_id": inspector.bank_id,
                "objects": result.objects, "timings_s": {k: round(v, 5) for k, v in result.timings.items()},
                "branches": {name: {"raw": round(raw, 6), **({"z": round(result.branch_scores[name], 4)}
                                                             if name in result.branch_scores else {})}
                             for name, raw in result.components.items()},
            }
            name = _unique_name(path, used_names)
            (out / f"{name}.json").write_text(json.dumps(record, indent=2))
            write_image(out / f"{name}_overlay.png", render_overlay(image, result))
            summary.append(record)
            print(f"{path.name}: {result.verdict.upper()} score={result.score:.4g} thr={result.threshold:.4g} "
                  f"objects={len(result.objects)}")
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {len(summary)} result(s) to {out}", file=sys.stderr)
    return 1 if failures else 0


def _unique_name(path: Path, used: set[str]) -> str:
    """Output name for an input file: its stem, prefixed by its folders when stems collide
    (test/good/000.png and test/logical_anomalies/000.png must not overwrite each other)."""
    name = path.stem
    parents = [p.name for p in path.resolve().parents if p.name]
    while name in used and parents:
        name = f"{parents.pop(0)}_{name}"
    while name in used:
        name += "_"
    used.add(name)
    return name


# ---------------------------------------------------------------------------- sim


def cmd_sim_generate(args: argparse.Namespace) -> int:
    from linewatch.sim import ALL_PRODUCTS, KNOWN_PRODUCTS, generate_dataset

    products = args.product or list(ALL_PRODUCTS)
    for product in products:
        if product not in KNOWN_PRODUCTS:
            print(f"linewatch: error: unknown product {product!r}; known: {', '.join(KNOWN_PRODUCTS)}", file=sys.stderr)
            return EXIT_USAGE
        path = generate_dataset(
            Path(args.out), product, seed=args.seed, n_train=args.train, n_val=args.validation,
            n_test_good=args.test_good, n_test_logical=args.test_logical, n_test_structural=args.test_structural,
            size=args.size, progress=not args.quiet, mono=args.mono,
        )
        print(f"{product}: {path}")
    return 0


# ---------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="linewatch", description="Inspection daemon: frames in, verdicts out.")
    parser.add_argument("--version", action="version", version=f"linewatch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="official checkpoints").add_subparsers(dest="action", required=True)
    p = models.add_parser("list", help="list the known checkpoints")
    p.set_defaults(func=cmd_models_list)
    p = models.add_parser("download", help="download and verify checkpoints (needs internet)")
    p.add_argument("--dir", default="/var/lib/linewatch/models", help="destination folder")
    p.add_argument("--names", nargs="*", help="checkpoint names (default: the SAM-LAD ViT-S/SAM-B set)")
    p.add_argument("--timeout", type=float, default=10.0, help="connect/read timeout, seconds")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_models_download)

    bank = sub.add_parser("bank", help="template banks").add_subparsers(dest="action", required=True)
    p = bank.add_parser("build", help="build and calibrate a template bank from good images")
    p.add_argument("--config", "-c", help="YAML config (default: built-in defaults, weights-free backend)")
    p.add_argument("--good", required=True, help="folder of known-good images (e.g. <category>/train/good)")
    p.add_argument("--validation", help="folder of held-out good images for calibration (default: leave-one-out)")
    p.add_argument("--out", "-o", help="bank file to write (default: bank.path from the config)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_bank_build)
    p = bank.add_parser("info", help="print a bank's manifest")
    p.add_argument("bank")
    p.set_defaults(func=cmd_bank_info)
    from linewatch.commands import cmd_bank_switch  # the runtime commands' module: it talks to a running serve

    p = bank.add_parser("switch", help="put another bank (and config) in service in a running daemon")
    p.add_argument("--socket", required=True, help="the daemon's control socket (runtime.control.socket)")
    p.add_argument("--bank", "-b", help="bank file (default: the config's bank.path)")
    p.add_argument("--config", "-c", help="config file for the daemon to read (default: the one in service; "
                   "neither option: what a restart would load, like SIGHUP)")
    p.set_defaults(func=cmd_bank_switch)

    p = sub.add_parser("inspect", help="judge image files; write JSON and overlay PNGs")
    p.add_argument("images", nargs="+")
    p.add_argument("--config", "-c")
    p.add_argument("--bank", "-b", help="bank file (default: bank.path from the config)")
    p.add_argument("--out", "-o", required=True, help="output folder")
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(func=cmd_inspect)

    sim = sub.add_parser("sim", help="synthetic production line").add_subparsers(dest="action", required=True)
    p = sim.add_parser("generate", help="write synthetic products in the MVTec LOCO layout")
    p.add_argument("--out", "-o", required=True)
    from linewatch.sim import IDENTITY_PRODUCTS, PRODUCTS, SHAPE_PRODUCTS  # the runtime commands import it anyway

    p.add_argument("--product", action="append",
                   help=f"product name, repeatable; default: all of {', '.join(PRODUCTS)} (missing, extra, "
                        f"misplaced, wrong parts) and {', '.join(SHAPE_PRODUCTS)} (shape-only logical anomalies: "
                        "wrong shape, mirrored, swapped, rotated, wrong grain texture); only by name: "
                        f"{', '.join(IDENTITY_PRODUCTS)} (handwritten characters that vary between good parts; "
                        "a wrong, mirrored, swapped or turned character)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--train", type=int, default=60)
    p.add_argument("--validation", type=int, default=10)
    p.add_argument("--test-good", type=int, default=20)
    p.add_argument("--test-logical", type=int, default=20)
    p.add_argument("--test-structural", type=int, default=15)
    p.add_argument("--mono", action="store_true",
                   help="grey images, as a mono camera sees the same scenes (luma of the colour rendering)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_sim_generate)

    _add_runtime_commands(sub)
    return parser


def _add_runtime_commands(sub) -> None:
    """serve / replay / tap / demo / eval / archive / config live in their own modules; they register here."""
    from linewatch.archive_cli import register as register_archive
    from linewatch.commands import register as register_runtime
    from linewatch.config_cli import register as register_config
    from linewatch.eval.cli import register as register_eval

    register_runtime(sub)
    register_eval(sub)
    register_config(sub)
    register_archive(sub)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except _user_errors() as e:
        print(f"linewatch: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
