"""Detector speed: per-stage time, images/s and batch latency vs batch size, per backend and
device, for the cached-bank path and for the naive path of the paper.

    linewatch bench [--batch-sizes 1 4 8] [--repeats 5] [--out bench.json]
    python benchmarks/detector_bench.py ...  (same options, from a source checkout)

Paths:
  cached  the template bank holds the reference side (features, masks, descriptors of every
          good image), so only the query goes through backbone/upsample/segment/describe.
  naive   as the SAM-LAD paper runs it: for every frame, its k retrieved reference images are
          re-encoded (backbone, upsample, segment, describe) before matching and measuring.

Latency here is capture->verdict for frames that arrive together as one batch: the wall time
from the batch's images being in memory to its results (the daemon adds up to
runtime.batch.max_delay_ms of batching wait on top). Images come from linewatch.sim, written
to a temporary folder. Backends: "classic" (weights-free, the default) and, with
`--backends samlad-random`, the samlad models at full size (DINOv2 ViT-S/14, the JBU stack, SAM
vit_b) with RANDOM weights, since the official checkpoints cannot be downloaded here: their
compute is that of the real models, but SAM's masks (and so the matching/measure work) are not,
and the SAM points per side default to 8 instead of 32 to keep a CPU run to minutes.
Every figure printed or written is measured in this run.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

BATCH_SIZES = (1, 4, 8)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by this script and `linewatch bench`."""
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=list(BATCH_SIZES))
    parser.add_argument("--repeats", type=int, default=5, help="timed batches per setting (after 1 warm-up)")
    parser.add_argument("--devices", nargs="+", default=None, help="cpu and/or cuda (default: cpu, plus cuda when present)")
    parser.add_argument("--image-size", type=int, default=224, help="detector working size (classic: multiple of 8)")
    parser.add_argument("--source-size", type=int, default=256, help="side of the simulated camera images")
    parser.add_argument("--good", type=int, default=12, help="good images in the bench's template bank")
    parser.add_argument("--k", type=int, default=2, help="k_references")
    parser.add_argument("--product", default="screw_tray")
    parser.add_argument("--no-naive", action="store_true", help="skip the naive re-encoding path")
    parser.add_argument("--backends", nargs="+", default=["classic"], choices=["classic", "samlad-random", "samlad-tiny"],
                        help="samlad-random: full-size DINOv2 ViT-S/14 + JBU + SAM vit_b with RANDOM weights "
                             "(timing only: real weights are not available here; mask counts differ); "
                             "samlad-tiny: 1-block random models, at most 6 parts a frame (the plumbing only, for "
                             "tests and benchmarks/gpu_check.sh --dry-run)")
    parser.add_argument("--sam-points", type=int, default=8, help="SAM points per side for samlad-random")
    parser.add_argument("--coarse-points", type=int, default=8,
                        help="SAM coarse grid points per side (coarse_grid prompts, and after the seeds of reference_seeded)")
    parser.add_argument("--precisions", nargs="+", default=["fp32"], choices=["fp32", "bf16", "fp16"],
                        help="detector.precision values to compare")
    parser.add_argument("--generators", nargs="+", default=["batched"], choices=["batched", "segment_anything"],
                        help="samlad-random: SAM mask generators to compare")
    parser.add_argument("--prompts", nargs="+", default=["full_grid"],
                        choices=["full_grid", "coarse_grid", "reference_seeded"],
                        help="samlad-random: SAM prompt strategies to compare")
    parser.add_argument("--out", default="bench.json", help="JSON results file")


# ---------------------------------------------------------------------------- fixtures


def _variants(backend: str, args) -> list[dict[str, str]]:
    """The settings compared for one backend: precision, and for samlad SAM's generator and prompts
    (segment-anything's generator takes grid prompts only)."""
    out = []
    for precision in args.precisions:
        if not backend.startswith("samlad-"):
            out.append({"precision": precision})
            continue
        for generator in args.generators:
            for prompts in args.prompts:
                if generator == "segment_anything" and prompts == "reference_seeded":
                    continue
                out.append({"precision": precision, "generator": generator, "prompts": prompts})
    return out


def _random_samlad_models(config, device, tiny: bool = False):
    """The samlad models at full size with random weights: the compute of the real ones.
    tiny: a 1-block DINOv2 and a 1-block SAM encoder (still 1024 input): the plumbing only, in seconds on a CPU."""
    from linewatch.detector.backbone import DinoV2Backbone
    from linewatch.detector.backends.base import build_dcga
    from linewatch.detector.models import Models
    from linewatch.detector.segment import AreaFilter, SamSegmenter, build_sam_segmenter, build_tiny_sam
    from linewatch.detector.upsample import JBUStack

    det = config.detector
    sam = det.samlad.sam
    kwargs = dict(depth=1, embed_dim=48, num_heads=2) if tiny else None
    backbone = DinoV2Backbone(det.samlad.backbone, image_size=det.image_size, model_kwargs=kwargs).to(device).eval()
    upsampler = JBUStack(backbone.out_channels, num_stages=det.samlad.upsample_stages,
                         use_norm=det.samlad.upsampler_use_norm).to(device).eval()
    area = AreaFilter.from_config(det.objects)
    settings = sam.model_copy(update=dict(pred_iou_thresh=0.0, stability_score_thresh=0.0))  # random weights
    if tiny:
        segmenter = SamSegmenter(build_tiny_sam().to(device).eval(), area, settings, model_name="tiny-random")
    else:
        segmenter = build_sam_segmenter(settings, None, area, device=device)
    return Models(backbone=backbone, upsampler=upsampler, segmenter=segmenter, dcga=build_dcga(det).to(device).eval())


def _setup(backend: str, device: str, args, data_root: Path, variant: dict[str, str]):
    """Config, models, bank, an Inspector, and the good and test images as arrays."""
    from linewatch.bank_builder import build_bank
    from linewatch.config import config_from_dict
    from linewatch.detector.inspector import Inspector
    from linewatch.detector.models import build_models, select_device
    from linewatch.images import list_images, read_image

    dev = select_device(device)
    if backend.startswith("samlad-"):
        # thresholds at 0: random-weight SAM keeps masks, so the area filter keeps max_objects
        # per frame and the later stages do a real part's work
        sam = {"points_per_side": args.sam_points, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0,
               "generator": variant["generator"], "prompts": variant["prompts"], "points_per_batch": 256,
               "coarse_points_per_side": args.coarse_points}
        detector = {"backend": "samlad", "device": device, "image_size": args.image_size // 14 * 14,
                    "k_references": args.k, "precision": variant["precision"],
                    "samlad": {"sam": sam, "allow_untrained_upsampler_setup": True}}
        if backend == "samlad-tiny":  # as tests/detector/samlad_models.py: few parts, so few seeded prompts
            detector["objects"] = {"max_objects": 6}
        config = config_from_dict({"detector": detector})
        models = _random_samlad_models(config, dev, tiny=backend == "samlad-tiny")
    else:
        config = config_from_dict({"detector": {"backend": backend, "device": device, "image_size": args.image_size,
                                                "k_references": args.k, "precision": variant["precision"]}})
        models = build_models(config.detector, dev)
    root = data_root / args.product
    bank = build_bank(config, root / "train" / "good", root / "validation" / "good", models=models, progress=False)
    inspector = Inspector(config.detector, models, bank, dev)
    good = [read_image(p) for p in list_images(root / "train" / "good")]
    test = [read_image(p) for sub in ("good", "logical_anomalies", "structural_anomalies")
            for p in list_images(root / "test" / sub)]
    return config, models, bank, inspector, good, test


# ---------------------------------------------------------------------------- timing


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cached_batch(inspector, images) -> dict[str, float]:
    from linewatch.detector.inspector import Batch

    return dict(inspector.run(Batch(images=list(images))).timings)


def _naive_batch(inspector, naive, good, images) -> dict[str, float]:
    """Query stages, then re-encode the k references of every frame, then match + measure
    against a bank made of just those references."""
    import torch

    from linewatch.bank_builder import encode_references
    from linewatch.detector.bank import TemplateBank
    from linewatch.detector.inspector import ENCODE_STAGES, JUDGE_STAGES, Batch

    batch = inspector.run(Batch(images=list(images)), ENCODE_STAGES)
    start = time.perf_counter()
    refs = batch.references  # (B, k) indices into the good images
    ref_images = [good[int(z)] for z in refs.flatten().tolist()]
    tensors = encode_references(naive, ref_images, batch_size=len(ref_images), progress=False)
    bank = inspector.bank
    if "object_noise" in tensors:  # per-object statistics are the bank's (same objects, same order)
        n = tensors["object_valid"].shape[1]
        tensors["object_noise"] = bank.object_noise[refs.flatten()][:, :n].cpu()
    naive.bank = TemplateBank(**tensors, manifest=bank.manifest, segmenter_state=bank.segmenter_state).to(inspector.device)
    if inspector.slots is not None:  # part identity: each reference part's slot statistics, the bank's
        naive.slots = inspector.slots.of_images(refs.flatten(), tensors["object_valid"].shape[1])
    batch.references = torch.arange(len(ref_images), device=inspector.device).view(refs.shape)
    _sync(inspector.device)
    batch.timings["reencode_references"] = time.perf_counter() - start
    timings = {**batch.timer.resolve(), "reencode_references": batch.timings["reencode_references"]}
    return {**timings, **naive.run(batch, JUDGE_STAGES).timings}


def _measure(runners: dict, images: list, batch_size: int, repeats: int, device) -> dict[str, dict[str, Any]]:
    """1 warm-up batch, then `repeats` timed batches cycling through `images`, per runner.
    Runners alternate batch by batch, so load from other processes hits them alike."""
    latencies: dict[str, list[float]] = {name: [] for name in runners}
    stage_sums: dict[str, dict[str, float]] = {name: {} for name in runners}
    for r in range(repeats + 1):
        start_idx = (r * batch_size) % len(images)
        chunk = [images[(start_idx + i) % len(images)] for i in range(batch_size)]
        for name, run_batch in runners.items():
            _sync(device)
            start = time.perf_counter()
            timings = run_batch(chunk)
            _sync(device)
            elapsed = time.perf_counter() - start
            if r == 0:
                continue
            latencies[name].append(elapsed)
            for stage, seconds in timings.items():
                stage_sums[name][stage] = stage_sums[name].get(stage, 0.0) + seconds
    out = {}
    for name in runners:
        median = statistics.median(latencies[name])
        out[name] = {
            "batch_latency_ms_median": round(1000 * median, 2),
            "batch_latency_ms_max": round(1000 * max(latencies[name]), 2),
            "images_per_s": round(batch_size / median, 2),
            "stage_ms_per_batch": {k: round(1000 * v / repeats, 2) for k, v in stage_sums[name].items()},
        }
    return out


def run(args, save: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """All settings; returns the JSON-ready results. `save`, when given, receives the results so far
    (marked "complete": false) after every setting measured: a run stopped midway keeps them."""
    import torch

    from linewatch.detector.models import BACKEND_LABELS
    from linewatch.sim import generate_dataset

    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    backends = args.backends
    rows: list[dict[str, Any]] = []
    ratios: list[dict[str, Any]] = []

    def results(complete: bool) -> dict[str, Any]:
        return {
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "complete": complete,
            "host": {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
                     "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
                     "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
            "settings": {"repeats": args.repeats, "good_images_in_bank": args.good, "source_size": args.source_size,
                         "product": args.product},
            "latency_definition": "wall time of one batch from images in memory to results (no batching wait)",
            "results": rows,
            "naive_over_cached": ratios,
            "generator_ratios": generator_ratios(rows),
        }

    with tempfile.TemporaryDirectory(prefix="linewatch-bench-") as tmp:
        data_root = Path(tmp)
        generate_dataset(data_root, args.product, seed=0, n_train=args.good, n_val=5, n_test_good=8,
                         n_test_logical=4, n_test_structural=4, size=args.source_size)
        for backend, device in [(b, d) for b in backends for d in devices]:
            for variant in _variants(backend, args):
                config, models, bank, inspector, good, test = _setup(backend, device, args, data_root, variant)
                naive = copy.copy(inspector)  # same models and bank statistics; its bank is replaced per batch
                for bs in args.batch_sizes:
                    label = BACKEND_LABELS.get(backend, "samlad models at full size with RANDOM weights (timing only)")
                    common = {"backend": backend, "backend_label": label, "device": device, "batch_size": bs,
                              "image_size": config.detector.image_size, "k_references": config.detector.k_references,
                              **variant}
                    runners = {"cached": lambda imgs: _cached_batch(inspector, imgs)}
                    if not args.no_naive:
                        runners["naive"] = lambda imgs: _naive_batch(inspector, naive, good, imgs)
                    measured = _measure(runners, test, bs, args.repeats, inspector.device)
                    for path, figures in measured.items():
                        rows.append({**common, "path": path, **figures})
                        print(_row_text(rows[-1]), file=sys.stderr)
                    if "naive" in measured:
                        ratios.append({**common, "naive_over_cached_latency": round(
                            measured["naive"]["batch_latency_ms_median"] / measured["cached"]["batch_latency_ms_median"], 2)})
                    if save is not None:
                        save(results(complete=False))
    return results(complete=True)


def _variant_text(row: dict) -> str:
    return "/".join(row[k] for k in ("precision", "generator", "prompts") if k in row)


def _row_text(row: dict) -> str:
    return (f"{row['backend']:8s} {row['device']:5s} {_variant_text(row):35s} {row['path']:6s} B={row['batch_size']:<3d} "
            f"{row['batch_latency_ms_median']:9.1f} ms/batch {row['images_per_s']:8.2f} img/s")


def generator_ratios(rows: list[dict]) -> list[dict]:
    """For every setting measured with both SAM generators (same backend, device, precision,
    prompts, batch size, path): segment-anything's latency over the batched generator's, for the
    whole batch and for the segment stage alone."""
    by_key: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        if "generator" in r:
            key = tuple(r[k] for k in ("backend", "device", "precision", "prompts", "batch_size", "path"))
            by_key.setdefault(key, {})[r["generator"]] = r
    out = []
    for key, pair in by_key.items():
        if {"batched", "segment_anything"} <= set(pair):
            new, old = pair["batched"], pair["segment_anything"]
            out.append({**dict(zip(("backend", "device", "precision", "prompts", "batch_size", "path"), key)),
                        "segment_anything_over_batched_latency": round(
                            old["batch_latency_ms_median"] / new["batch_latency_ms_median"], 2),
                        "segment_anything_over_batched_segment_stage": round(
                            old["stage_ms_per_batch"]["segment"] / new["stage_ms_per_batch"]["segment"], 2)})
    return out


def format_table(results: dict) -> str:
    """A plain-text table of every setting, stages in ms per batch, and the naive/cached ratios."""
    from linewatch.detector.inspector import STAGES

    stages = [s for s in (*STAGES, "reencode_references")
              if any(s in r["stage_ms_per_batch"] for r in results["results"])]
    head = ["backend", "device", "variant", "path", "B", "ms/batch", "img/s", *stages]
    lines = ["  ".join(f"{h:>10s}" for h in head)]
    for r in results["results"]:
        cells = [r["backend"], r["device"], _variant_text(r), r["path"], str(r["batch_size"]),
                 f"{r['batch_latency_ms_median']:.1f}",
                 f"{r['images_per_s']:.2f}", *(f"{r['stage_ms_per_batch'].get(s, 0.0):.1f}" for s in stages)]
        lines.append("  ".join(f"{c:>10s}" for c in cells))
    if results["naive_over_cached"]:
        lines.append("")
        lines.append("naive (re-encode k references per frame) / cached bank, batch latency:")
        for r in results["naive_over_cached"]:
            lines.append(f"  {r['backend']:8s} {r['device']:5s} B={r['batch_size']:<3d} k={r['k_references']}  "
                         f"x{r['naive_over_cached_latency']:.2f}")
    if results.get("generator_ratios"):
        lines.append("segment-anything's generator over the batched one (same run; > 1: batched is faster):")
        for r in results["generator_ratios"]:
            lines.append(f"  {r['backend']:8s} {r['device']:5s} {r['precision']} {r['prompts']} B={r['batch_size']:<3d} "
                         f"batch x{r['segment_anything_over_batched_latency']:.2f}, "
                         f"segment stage x{r['segment_anything_over_batched_segment_stage']:.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> int:
    """Run the benchmark, print the table, write JSON. `args` (already parsed, e.g. by
    `linewatch bench`) takes precedence over `argv`."""
    if args is None:
        parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
        add_arguments(parser)
        args = parser.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(partial: dict[str, Any]) -> None:
        out.write_text(json.dumps(partial, indent=2) + "\n")

    results = run(args, save)
    print(format_table(results))
    save(results)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
