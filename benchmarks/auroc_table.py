"""Image AUROC of the detector's branches (objects, patch) and of its score (fused), per product,
seed and anomaly kind, for several values of one setting: by default `score.patch_dims` 0 (the
exact patch search, "before") against 12 (the principal-axes search, the default, "after").
Issue 19, item 2: "AUROC on the synthetic line (3 seeds, all four products) not lower than
today's by more than 0.005 per product and kind".

    python benchmarks/auroc_table.py --out /tmp/numbers/auroc --seeds 0 1 2

Per seed S the synthetic line is generated once into OUT/data/seedS (reused by later runs: an
image of the simulator does not change when the counts change), every product judged by the
same code as `linewatch eval` (`linewatch.eval.runner.run_detector`: bank from train/good,
calibrated on validation/good, then every test image; the AUROC of the scores as the official
maps carry them), with the config (default configs/demo.yaml, the weights-free classic backend)
changed only in the setting compared. Each result is appended to OUT/results_SETTING.jsonl as it ends
(a later run skips what is there), with every test image's branch scores. At the end the
tables are printed in markdown: per seed, the mean over the seeds (lowest seed in brackets),
and the cases where a value fell by more than --tolerance.

    --setting measure.identity_weight --values 0 4     compares another setting
    --setting measure.identity_descriptor,measure.identity_margin --values outline,2 outline,1.5
                                                       several settings at once (each value a
                                                       comma-separated list, one per setting)
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from linewatch.config import load_config
from linewatch.detector.models import build_models
from linewatch.eval.dataset import load_category
from linewatch.eval.metrics import image_auroc
from linewatch.eval.runner import DETECTOR_METHODS, for_official_evaluator, run_detector
from linewatch.sim import ALL_PRODUCTS, generate_dataset

REPO = Path(__file__).resolve().parents[1]
KINDS = ("logical", "structural")


def dataset(root: Path, product: str, seed: int, counts: dict[str, int]) -> Path:
    folder = root / f"seed{seed}" / product
    manifest = folder / "manifest.json"
    if manifest.exists() and json.loads(manifest.read_text()).get("counts") == counts:
        return folder
    shutil.rmtree(folder, ignore_errors=True)  # images of other counts must not stay behind
    return generate_dataset(root / f"seed{seed}", product, seed=seed, n_train=counts["train"],
                            n_val=counts["validation"], n_test_good=counts["test_good"],
                            n_test_logical=counts["test_logical"], n_test_structural=counts["test_structural"])


def set_setting(config, dotted: str, value: str) -> None:
    """detector.<dotted> = value, typed as the present value."""
    *path, last = dotted.split(".")
    target = config.detector
    for name in path:
        target = getattr(target, name)
    present = getattr(target, last)
    setattr(target, last, type(present)(value))


def measure(config_path: Path, folder: Path, setting: str, value: str, batch: int) -> dict:
    config = load_config(config_path)
    config.detector.device = "cpu"
    for name, part in zip(setting.split(","), value.split(","), strict=True):
        set_setting(config, name, part)
    device = torch.device("cpu")
    category = load_category(folder)
    models = build_models(config.detector, device)
    runs = run_detector(config, category, models, device, DETECTOR_METHODS, batch_size=batch, progress=False)
    labels = np.array([t.label for t in category.test_images])
    good = labels == "good"
    auroc: dict[str, dict[str, float]] = {}
    scores: dict[str, list[float]] = {}
    for name, run in runs.items():
        run = for_official_evaluator(run)  # the scores `linewatch eval` reports AUROC of
        scores[name] = [round(float(s), 6) for s in run.scores]
        auroc[name] = {kind: float(image_auroc((labels == kind)[good | (labels == kind)],
                                               run.scores[good | (labels == kind)])) for kind in KINDS}
    images = [f"{t.subdir}/{t.image_id}" for t in category.test_images]
    return {"auroc": auroc, "scores": scores, "images": images}


def load_results(path: Path, counts: dict[str, int], config: Path) -> dict[tuple, dict]:
    """The results of earlier runs with these counts and this config."""
    results = {}
    if path.exists():
        for line in path.read_text().splitlines():
            r = json.loads(line) if line.strip() else None
            if r and r["counts"] == counts and r["config"] == str(config):
                results[(r["seed"], r["product"], r["value"])] = r
    return results


def percent(x: float) -> str:
    return f"{100 * x:.1f}"


def tables(results: dict[tuple, dict], seeds: list[int], products: list[str], values: list[str],
           setting: str, tolerance: float) -> str:
    before, *afters = values
    lines = []
    arrow = " -> ".join(values)
    lines.append(f"Image AUROC in %, `{setting}` {arrow}, objects / patch / fused.\n")
    lines.append("Per seed:\n")
    lines.append("| product | seed | kind | objects | patch | fused |")
    lines.append("|---|---:|---|---|---|---|")
    for product in products:
        for seed in seeds:
            if not all((seed, product, v) in results for v in values):
                continue
            for kind in KINDS:
                cells = [" -> ".join(percent(results[(seed, product, v)]["auroc"][m][kind]) for v in values)
                         for m in DETECTOR_METHODS]
                lines.append(f"| {product} | {seed} | {kind} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Mean over the seeds (lowest seed in brackets):\n")
    lines.append("| product | seeds | kind | objects | patch | fused |")
    lines.append("|---|---|---|---|---|---|")
    drops = []
    for product in products:
        done = [s for s in seeds if all((s, product, v) in results for v in values)]
        if not done:
            continue
        for kind in KINDS:
            cells = []
            for m in DETECTOR_METHODS:
                per_value = []
                for v in values:
                    a = np.array([results[(s, product, v)]["auroc"][m][kind] for s in done])
                    per_value.append(f"{percent(a.mean())} ({percent(a.min())})")
                cells.append(" -> ".join(per_value))
                base = np.array([results[(s, product, before)]["auroc"][m][kind] for s in done])
                for v in afters:
                    new = np.array([results[(s, product, v)]["auroc"][m][kind] for s in done])
                    if new.mean() < base.mean() - tolerance:
                        drops.append(f"{product} {kind} {m}, mean of seeds {done}: {percent(base.mean())} -> "
                                     f"{v}: {percent(new.mean())} ({100 * (new.mean() - base.mean()):+.2f} points)")
                    for s, b, n in zip(done, base, new):
                        if n < b - tolerance:
                            drops.append(f"{product} {kind} {m}, seed {s}: {percent(b)} -> {v}: {percent(n)} "
                                         f"({100 * (n - b):+.2f} points)")
            lines.append(f"| {product} | {', '.join(map(str, done))} | {kind} | " + " | ".join(cells) + " |")
    if afters:
        lines.append("")
        lines.append(f"Lower by more than {tolerance} ({100 * tolerance:.1f} points) with {setting} = "
                     f"{', '.join(afters)} than with {before}:" + ("" if drops else " none"))
        lines.extend(f"- {d}" for d in drops)
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("/tmp/numbers/auroc"))
    p.add_argument("--data", type=Path, default=None, help="where the datasets are (default OUT/data)")
    p.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--products", nargs="+", default=[*ALL_PRODUCTS, "char_tray"])
    p.add_argument("--setting", default="score.patch_dims",
                   help="a detector setting, dotted below `detector` (several: comma-separated)")
    p.add_argument("--values", nargs="+", default=["0", "12"],
                   help="the first is 'before' (with several settings: comma-separated, one per setting)")
    p.add_argument("--train", type=int, default=20)
    p.add_argument("--validation", type=int, default=10)
    p.add_argument("--test-good", type=int, default=20)
    p.add_argument("--test-logical", type=int, default=20)
    p.add_argument("--test-structural", type=int, default=15)
    p.add_argument("--tolerance", type=float, default=0.005)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--table-only", action="store_true", help="print the tables of OUT/results.jsonl and stop")
    args = p.parse_args()
    wrong = [v for v in args.values if len(v.split(",")) != len(args.setting.split(","))]
    if wrong:
        p.error(f"{len(args.setting.split(','))} settings ({args.setting}) but the values {wrong} have another count")
    torch.set_num_threads(args.threads)
    counts = {"train": args.train, "validation": args.validation, "test_good": args.test_good,
              "test_logical": args.test_logical, "test_structural": args.test_structural}
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.data or args.out / "data"
    path = args.out / f"results_{args.setting}.jsonl"
    results = load_results(path, counts, args.config)
    if not args.table_only:
        print(f"config {args.config}, {counts}", flush=True)
        for seed in args.seeds:
            for product in args.products:
                folder = dataset(data, product, seed, counts)
                for value in args.values:
                    if (seed, product, value) in results:
                        continue
                    started = time.perf_counter()
                    r = measure(args.config, folder, args.setting, value, args.batch)
                    r.update(seed=seed, product=product, value=value, setting=args.setting, counts=counts, config=str(args.config),
                             seconds=round(time.perf_counter() - started, 1))
                    results[(seed, product, value)] = r
                    with path.open("a") as f:
                        f.write(json.dumps(r) + "\n")
                    print(f"seed {seed} {product} {args.setting}={value}: " + ", ".join(
                        f"{m} {percent(r['auroc'][m]['logical'])} / {percent(r['auroc'][m]['structural'])}"
                        for m in DETECTOR_METHODS) + f" ({r['seconds']} s)", flush=True)
    print(tables(results, args.seeds, args.products, args.values, args.setting, args.tolerance))


if __name__ == "__main__":
    main()
