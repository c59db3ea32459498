"""Equality and speed check of the detector's measure stage across a code change (a script, not a test).

    python benchmarks/measure_check.py save DIR      # with the code before the change
    python benchmarks/measure_check.py compare DIR   # with the code after it; exit 1 on a difference
    python benchmarks/measure_check.py time [--repeats 5] [--threads 1] [--k 2]

save/compare: synthetic line data (linewatch.sim, products screw_tray and breakfast_box, 10 good
images each) -> classic banks with k_references 1, 2 and 3 (saved by `save`, reused by `compare`
so both judge against the same banks), then 20 frames per product (good, missing, extra,
wrong_place, wrong_part, scratch, chip, contamination) inspected in batches of 8, plus every
bank image judged leave-one-out from the bank's tensors. `compare` prints the largest
differences of scores, heatmaps and raw object maps, and of a freshly built bank's part noise
levels and threshold, and requires the object lists (status, rounded boxes, areas, scores) to
be identical.

time: one batch of 8 frames at image_size 224, k = 2 (--k), inspected --repeats times after a warm-up;
prints median wall and thread CPU seconds (and the least CPU) of `inspect` and of its measure stage. With
--threads 1 every torch op runs on the calling thread, so its CPU time barely moves with other
load on the machine. To compare two versions run it once per version, e.g. with
`git worktree add /tmp/before <commit>` and PYTHONPATH=/tmp/before.
"""

from __future__ import annotations

import argparse
import json
import pickle
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from linewatch.bank_builder import build_bank
from linewatch.config import config_from_dict
from linewatch.detector.bank import TemplateBank
from linewatch.detector.inspector import Batch, Inspector
from linewatch.detector.models import build_models
from linewatch.sim import generate_dataset, render

CPU = torch.device("cpu")
PRODUCTS = ("screw_tray", "breakfast_box")
ANOMALIES = [None, None, None, None, "missing", "missing", "missing", "extra", "extra", "wrong_place", "wrong_place",
             "wrong_part", "wrong_part", "scratch", "chip", "contamination", None, "missing", "extra", None]


def _config(k: int, image_size: int = 112):
    return config_from_dict({"detector": {"image_size": image_size, "device": "cpu", "k_references": k},
                             "calibration": {"min_validation_images": 3}})


def _judge(inspector: Inspector, images: list[np.ndarray]) -> list[dict]:
    """Results of the frames in batches of 8, then of the bank images leave-one-out."""
    batches = []
    for start in range(0, len(images), 8):
        batch = Batch(images=images[start:start + 8])
        for step in (inspector.preprocess, inspector.backbone, inspector.upsample, inspector.segment,
                     inspector.describe, inspector.match, inspector.measure):
            batch = step(batch)
        batches.append(batch)
    batches.append(inspector.measure(inspector.match(inspector.bank_batch(torch.arange(inspector.bank.size)))))
    return [{"score": r.score, "verdict": r.verdict, "heatmap": r.heatmap, "objects": r.objects,
             "object_maps": batch.object_maps[i].numpy()}
            for batch in batches for i, r in enumerate(batch.results)]


def check(mode: str, root: Path) -> int:
    root.mkdir(parents=True, exist_ok=True)
    worst = dict.fromkeys(("score_rel", "heatmap_abs", "object_maps_abs", "object_maps_rel", "noise_rel",
                           "threshold_rel"), 0.0)
    differing, judged = [], 0
    for product in PRODUCTS:
        data = generate_dataset(root / "data", product, seed=0, n_train=10, n_val=4, n_test_good=0,
                                n_test_logical=0, n_test_structural=0, size=128)
        images = [render(product, np.random.default_rng(2000 + i), anomaly=a, size=128)[0]
                  for i, a in enumerate(ANOMALIES)]
        for k in (1, 2, 3):
            config = _config(k)
            path, saved = root / f"{product}_k{k}.lwbank", root / f"{product}_k{k}.pkl"
            fresh = build_bank(config, data / "train" / "good", data / "validation" / "good", progress=False)
            if mode == "save":
                fresh.save(path)
            bank = TemplateBank.load(path)
            noise_rel = (fresh.object_noise - bank.object_noise).abs() / bank.object_noise.abs().clamp_min(1e-6)
            worst["noise_rel"] = max(worst["noise_rel"], float(noise_rel.max()))
            worst["threshold_rel"] = max(worst["threshold_rel"], abs(fresh.threshold - bank.threshold) / bank.threshold)
            got = _judge(Inspector(config.detector, build_models(config.detector, CPU), bank, CPU), images)
            if mode == "save":
                saved.write_bytes(pickle.dumps(got))
                continue
            for i, (g, w) in enumerate(zip(got, pickle.loads(saved.read_bytes()), strict=True)):
                judged += 1
                worst["score_rel"] = max(worst["score_rel"], abs(g["score"] - w["score"]) / max(abs(w["score"]), 1e-12))
                worst["heatmap_abs"] = max(worst["heatmap_abs"], float(np.abs(g["heatmap"] - w["heatmap"]).max()))
                diff = np.abs(g["object_maps"] - w["object_maps"])
                worst["object_maps_abs"] = max(worst["object_maps_abs"], float(diff.max()))
                worst["object_maps_rel"] = max(worst["object_maps_rel"],
                                               float((diff / np.maximum(np.abs(w["object_maps"]), 1e-2)).max()))
                if g["objects"] != w["objects"] or g["verdict"] != w["verdict"]:
                    differing.append({"product": product, "k": k, "result": i,
                                      "now": g["objects"], "saved": w["objects"]})
    if mode == "save":
        print(f"saved to {root}")
        return 0
    print(json.dumps({"results": judged, "object_lists_differing": len(differing), **worst}, indent=1))
    for d in differing:
        print(json.dumps(d))
    ok = not differing and worst["score_rel"] <= 1e-4 and worst["heatmap_abs"] <= 1e-3
    return 0 if ok else 1


def time_inspect(repeats: int, threads: int, k: int) -> None:
    torch.set_num_threads(threads)
    config = _config(k, image_size=224)
    with tempfile.TemporaryDirectory() as tmp:
        data = generate_dataset(Path(tmp), "screw_tray", seed=1, n_train=12, n_val=4, n_test_good=0,
                                n_test_logical=0, n_test_structural=0, size=256)
        bank = build_bank(config, data / "train" / "good", data / "validation" / "good", progress=False)
    inspector = Inspector(config.detector, build_models(config.detector, CPU), bank, CPU)
    anomalies = [None, "missing", "extra", "scratch", None, "wrong_place", "missing", None]
    images = [render("screw_tray", np.random.default_rng(500 + i), anomaly=a, size=256)[0]
              for i, a in enumerate(anomalies)]
    measure_cpu: list[float] = []
    measure = inspector.measure

    def timed_measure(batch):
        start = time.thread_time()
        out = measure(batch)
        measure_cpu.append(time.thread_time() - start)
        return out

    inspector.measure = timed_measure
    inspector.inspect(images)  # warm-up
    measure_cpu.clear()
    wall, cpu, measure_wall = [], [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.thread_time()
        results = inspector.inspect(images)
        wall.append(time.perf_counter() - start)
        cpu.append(time.thread_time() - start_cpu)
        measure_wall.append(results[0].timings["measure"])
    print(json.dumps({
        "threads": threads, "k": k, "inspect_wall_s": statistics.median(wall), "inspect_cpu_s": statistics.median(cpu),
        "measure_wall_s": statistics.median(measure_wall), "measure_cpu_s": statistics.median(measure_cpu),
        "inspect_cpu_min_s": min(cpu), "measure_cpu_min_s": min(measure_cpu),
        "scores": [round(r.score, 4) for r in results],
    }))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    for mode in ("save", "compare"):
        sub.add_parser(mode).add_argument("dir", type=Path)
    timing = sub.add_parser("time")
    timing.add_argument("--repeats", type=int, default=5)
    timing.add_argument("--threads", type=int, default=1)
    timing.add_argument("--k", type=int, default=2, help="k_references")
    args = parser.parse_args()
    if args.mode == "time":
        time_inspect(args.repeats, args.threads, args.k)
        return 0
    return check(args.mode, args.dir)


if __name__ == "__main__":
    sys.exit(main())
