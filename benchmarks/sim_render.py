"""The synthetic line's render: its speed, and a fingerprint of every byte it outputs.

    PYTHONPATH=. python benchmarks/sim_render.py [--seeds 3] [--sizes 96 256 512] [--repeat 3]
        [--save hashes.json | --check hashes.json] [--products screw_tray ...]

Renders every product (KNOWN_PRODUCTS, char_tray included) good and with each of its own
anomalies, for --seeds seeds, at each of --sizes, in colour; and mono for every case at the
first size. Each render's image, ground truth and info are hashed (SHA-256 of the array's
dtype, shape and bytes; of info as JSON, floats written exactly); so are the canvas and the
footprint of every kind of part (spares too) drawn alone in five poses at each size, two of
them across the frame's border. Then `generate_dataset` writes a small dataset of every
product at 96 px (and glyph_tray mono) and every file's bytes are hashed. Prints

  - the CPU time (this process, all its threads) of one `render` per product and size: each
    colour case rendered --repeat times, its least time kept, the mean over good and anomalous
    cases (mono is not timed); and the wall time of the small datasets;
  - one digest over every hash: the same digest means the same output bytes.

--save writes the hashes of every case to a JSON file; --check compares the cases run with
such a file and lists those whose output changed or that it lacks (exit status 1 when any).
Run it on the code before a change with --save and after it with --check: a faster render
must leave every hash equal.
CPU time is less disturbed by other processes than wall time, not free of them (shared caches
and cores); run with OMP_NUM_THREADS=1 to compare like with like. `PYTHONPATH=OTHER_CHECKOUT`
measures another version of linewatch with the same cases.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from linewatch.sim.generator import (DRAWERS, KNOWN_PRODUCTS, SUPERSAMPLE, Part, generate_dataset, product_anomalies,
                                      render)

DATASET_COUNTS = dict(n_train=2, n_val=1, n_test_good=1, n_test_logical=4, n_test_structural=3)


def _array_hash(a: np.ndarray) -> str:
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _info_hash(info: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()


def _render_case(product: str, anomaly: str | None, seed: int, size: int, mono: bool,
                 repeat: int = 1) -> tuple[str, float]:
    """The case's hashes, and the least CPU time of `repeat` renders of it."""
    elapsed = []
    for _ in range(repeat):
        rng = np.random.default_rng([31, seed])
        start = time.process_time()
        image, gt, info = render(product, rng, anomaly, size=size, mono=mono)
        elapsed.append(time.process_time() - start)
    return f"{_array_hash(image)} {_array_hash(gt)} {_info_hash(info)}", min(elapsed)


def render_hashes(products: list[str], seeds: int, sizes: list[int],
                  repeat: int) -> tuple[dict[str, str], dict[tuple[str, int], list[float]]]:
    """Hashes of every render case by its name, and the render times by (product, size)."""
    hashes: dict[str, str] = {}
    times: dict[tuple[str, int], list[float]] = {}
    for product in products:
        logical, structural = product_anomalies(product)
        for anomaly in (None, *logical, *structural):
            for seed in range(seeds):
                for size in sizes:
                    key = f"render {product} {anomaly} seed={seed} size={size}"
                    hashes[key], elapsed = _render_case(product, anomaly, seed, size, False, repeat)
                    times.setdefault((product, size), []).append(elapsed)
                key = f"render {product} {anomaly} seed={seed} size={sizes[0]} mono"
                hashes[key], _ = _render_case(product, anomaly, seed, sizes[0], True)
    return hashes, times


def part_hashes(sizes: list[int]) -> dict[str, str]:
    """Hashes of every kind of part (DRAWERS, spares included) drawn alone, canvas and mask,
    at the frames of `sizes`, turned and mirrored, at places off the pixel grid, two of them
    across the frame's border."""
    hashes: dict[str, str] = {}
    for kind, draw in DRAWERS.items():
        for size in sizes:
            S = SUPERSAMPLE * size  # the frame render draws in
            poses = ((0.5, 0.5, 0.0, False), (0.43, 0.61, 37.5, True), (0.58, 0.47, -101.0, False),
                     (0.02, 0.5, 20.0, False), (0.97, 0.985, 200.0, True))  # the last two cut by the frame
            for k, (cx, cy, angle, mirror) in enumerate(poses):
                canvas = np.full((S, S, 3), 0.25, np.float32)
                mask = draw(canvas, Part(kind, cx, cy, angle, 1.03, k, mirror), S, np.random.default_rng(k))
                hashes[f"part {kind} S={S} pose={k}"] = f"{_array_hash(canvas)} {_array_hash(mask)}"
    return hashes


def dataset_hashes(products: list[str]) -> tuple[dict[str, str], float]:
    """Hashes of every file of a small dataset of each product (and one mono), and the time."""
    hashes: dict[str, str] = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        runs = [(product, "colour") for product in products]
        if "glyph_tray" in products:
            runs.append(("glyph_tray", "mono"))
        for product, kind in runs:
            out = generate_dataset(root / kind, product, seed=7, size=96, mono=kind == "mono", **DATASET_COUNTS)
            for path in sorted(p for p in out.rglob("*") if p.is_file()):
                name = f"dataset {kind} {path.relative_to(root / kind)}"
                hashes[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes, time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--sizes", type=int, nargs="+", default=[96, 256, 512])
    ap.add_argument("--repeat", type=int, default=3, help="render each colour case this often, keep the least time")
    ap.add_argument("--products", nargs="+", default=list(KNOWN_PRODUCTS), choices=KNOWN_PRODUCTS)
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--save", type=Path, help="write every case's hash to this JSON file")
    group.add_argument("--check", type=Path, help="compare the hashes of the cases run with this JSON file")
    args = ap.parse_args()

    hashes, times = render_hashes(args.products, args.seeds, args.sizes, args.repeat)
    hashes.update(part_hashes(args.sizes))
    files, dataset_s = dataset_hashes(args.products)
    hashes.update(files)

    print(f"render: CPU ms per frame, mean over {args.seeds} seeds x (good + each anomaly) of the least of"
          f" {args.repeat} renders, colour")
    print(f"{'product':<15}" + "".join(f"{size:>9} px" for size in args.sizes))
    for product in args.products:
        row = "".join(f"{1000 * float(np.mean(times[(product, size)])):>12.1f}" for size in args.sizes)
        print(f"{product:<15}{row}")
    total, frames = sum(sum(t) for t in times.values()), sum(len(t) for t in times.values())
    print(f"all colour renders (least of each case): {total:.2f} s CPU for {frames} frames")
    print(f"small datasets (96 px, {len(files)} files): {dataset_s:.2f} s wall")
    digest = hashlib.sha256("\n".join(f"{k} {v}" for k, v in sorted(hashes.items())).encode()).hexdigest()
    print(f"{len(hashes)} hashes, digest {digest}")

    if args.save:
        args.save.write_text(json.dumps(hashes, indent=1, sort_keys=True) + "\n")
        print(f"saved to {args.save}")
    if args.check:
        expected = json.loads(args.check.read_text())
        changed = sorted(k for k in hashes if expected.get(k) != hashes[k])  # a case absent there counts
        for key in changed:
            print(f"CHANGED {key}")
        print(f"check against {args.check}: {len(changed)} of the {len(hashes)} cases run differ"
              f" ({len(expected.keys() - hashes.keys())} of its cases not run here)")
        return 1 if changed else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
