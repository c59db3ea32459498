"""`linewatch eval`'s numbers next to the official MVTec LOCO AD evaluation script's.

The official script (MVTec, BSD-3; a copy is kept in `../shared/tools/mvtec_loco_ad_evaluation`
next to this repository) reads `<dataset>/<object>/defects_config.json`, the ground truth PNGs
and `<maps>/<object>/test/<type>/<id>.tiff`, and accepts only the five LOCO category names. For
each product of a `linewatch eval` output folder and each method, this module links the
product's dataset folder and the method's map folder under one of those names in a scratch
folder, runs `evaluate_experiment.py` unmodified in a subprocess, and reads its metrics.json:

    python -m linewatch.eval.official --dataset /tmp/sim --report report/ [--tools DIR] [--methods objects fused]

prints, per product, anomaly kind and method, linewatch's image AUROC and AU-sPRO (at the
report's integration limit) next to the official script's, and exits 1 when one differs by
more than --tolerance (0.005).

The official script needs numpy, tifffile and Pillow (and tqdm); `missing_modules` says which
the given Python lacks.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

__all__ = ["LOCO_NAMES", "NEEDED_MODULES", "default_tools_dir", "missing_modules", "run_official", "compare",
           "format_table", "main"]

LOCO_NAMES = ("breakfast_box", "juice_bottle", "pushpins", "screw_bag", "splicing_connectors")
NEEDED_MODULES = ("numpy", "tifffile", "PIL", "tqdm")
KINDS = {"logical": "logical_anomalies", "structural": "structural_anomalies"}
SCRIPT = "evaluate_experiment.py"


def default_tools_dir() -> Path:
    """`../shared/tools/mvtec_loco_ad_evaluation` relative to the repository root."""
    return Path(__file__).resolve().parents[2].parent / "shared" / "tools" / "mvtec_loco_ad_evaluation"


def missing_modules(python: str = sys.executable) -> list[str]:
    """The modules the official script imports that `python` cannot find."""
    if python == sys.executable:
        return [m for m in NEEDED_MODULES if importlib.util.find_spec(m) is None]
    code = ("import importlib.util as u; print(' '.join(m for m in %r if u.find_spec(m) is None))"
            % (NEEDED_MODULES,))
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout
    return out.split()


def run_official(dataset_dir: str | Path, maps_dir: str | Path, tools_dir: str | Path | None = None,
                 python: str = sys.executable, work_dir: str | Path | None = None,
                 timeout: float | None = None) -> dict:
    """The official script's metrics.json for one product.

    dataset_dir: the product's folder (defects_config.json, ground_truth/); maps_dir: its maps
    (test/<type>/<id>.tiff), e.g. `<eval out>/anomaly_maps/<method>/<product>`. Both are linked
    under the LOCO name "screw_bag" in a scratch folder (`work_dir`, else a temporary one).
    Raises RuntimeError with the script's output when it fails."""
    tools = Path(tools_dir) if tools_dir is not None else default_tools_dir()
    script = tools / SCRIPT
    if not script.is_file():
        raise FileNotFoundError(f"{script}: the official MVTec LOCO AD evaluation script is not there")
    with tempfile.TemporaryDirectory(dir=work_dir) as scratch:
        scratch = Path(scratch)
        name = "screw_bag"
        (scratch / "ds").mkdir()
        (scratch / "maps").mkdir()
        os.symlink(Path(dataset_dir).resolve(), scratch / "ds" / name)
        os.symlink(Path(maps_dir).resolve(), scratch / "maps" / name)
        command = [python, str(script), "--object_name", name, "--dataset_base_dir", str(scratch / "ds"),
                   "--anomaly_maps_dir", str(scratch / "maps"), "--output_dir", str(scratch / "out")]
        done = subprocess.run(command, cwd=tools, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            tail = (done.stdout + done.stderr)[-4000:]
            raise RuntimeError(f"{SCRIPT} failed on {maps_dir} (exit {done.returncode}):\n{tail}")
        return json.loads((scratch / "out" / "metrics.json").read_text())


def compare(report: dict, dataset_root: str | Path, report_dir: str | Path, methods: Sequence[str] | None = None,
            categories: Sequence[str] | None = None, tools_dir: str | Path | None = None,
            python: str = sys.executable, timeout: float | None = None) -> list[dict]:
    """One row per category, method, kind and metric: {"category", "method", "kind", "metric"
    ("image_auroc" | "au_spro@<max_fpr>"), "ours", "official", "diff"}. The report's max_fpr
    must be one of the official script's integration limits (0.01, 0.05, 0.1, 0.3, 1)."""
    max_fpr = report["max_fpr"]
    rows = []
    for category in categories or list(report["categories"]):
        for method in methods or list(report["methods"]):
            ours = report["categories"][category][method]
            metrics = run_official(Path(dataset_root) / category,
                                   Path(report_dir) / "anomaly_maps" / method / category,
                                   tools_dir=tools_dir, python=python, timeout=timeout)
            spro = metrics["localization"]["auc_spro"]
            for kind, folder in KINDS.items():
                if ours["image_auroc"][kind] is None:
                    continue
                limits = {float(k): v for k, v in spro[folder].items()}
                if max_fpr not in limits:
                    raise ValueError(f"the report's max_fpr {max_fpr} is not one of the official limits {sorted(limits)}")
                for metric, mine, theirs in (
                        ("image_auroc", ours["image_auroc"][kind], metrics["classification"]["auc_roc"][folder]),
                        (f"au_spro@{max_fpr:g}", ours["au_spro"][kind], limits[max_fpr])):
                    rows.append({"category": category, "method": method, "kind": kind, "metric": metric,
                                 "ours": mine, "official": theirs,
                                 "diff": None if theirs is None or mine is None else mine - theirs})
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| product | method | kind | metric | linewatch | official | difference |", "|---|---|---|---|---:|---:|---:|"]
    for r in rows:
        official = "–" if r["official"] is None else f"{r['official']:.4f}"
        diff = "–" if r["diff"] is None else f"{r['diff']:+.4f}"
        lines.append(f"| {r['category']} | {r['method']} | {r['kind']} | {r['metric']} | {r['ours']:.4f} | "
                     f"{official} | {diff} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m linewatch.eval.official", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, help="the folder `linewatch eval --dataset` was given")
    parser.add_argument("--report", required=True, help="`linewatch eval`'s output folder (report.json, anomaly_maps/)")
    parser.add_argument("--tools", default=None, help=f"the official script's folder (default {default_tools_dir()})")
    parser.add_argument("--methods", nargs="+", default=None, help="default: every method of the report")
    parser.add_argument("--categories", nargs="+", default=None, help="default: every category of the report")
    parser.add_argument("--python", default=sys.executable, help="the Python that runs the official script")
    parser.add_argument("--tolerance", type=float, default=0.005)
    args = parser.parse_args(argv)
    missing = missing_modules(args.python)
    if missing:
        print(f"{args.python} lacks {', '.join(missing)}, which the official script needs", file=sys.stderr)
        return 2
    report = json.loads((Path(args.report) / "report.json").read_text())
    rows = compare(report, args.dataset, args.report, args.methods, args.categories, args.tools, args.python)
    print(format_table(rows))
    worst = max((abs(r["diff"]) for r in rows if r["diff"] is not None), default=0.0)
    print(f"\nlargest difference {worst:.4f} (tolerance {args.tolerance})")
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
