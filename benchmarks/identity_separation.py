"""How well part identity alone tells logical anomalies from good images, per identity
descriptor, without running the rest of the detector (issue 19, item 3: part identity).

Per seed, char_tray (or --product) is generated once into OUT/seedS, the classic segmenter is
fitted on the train images and every part's mask of the train (bank), test good and test
logical images is kept (OUT/seedS.pt; later runs reuse it). Then, per descriptor, each test
part's identity z (`linewatch.detector.identity.identity_distances`: the nearest good part of
its slot over the slot's spread) and per image the largest z; printed: the image AUROC of that
largest z (logical vs good), the mean of the three largest good ones, and the median per
logical anomaly kind.

    python benchmarks/identity_separation.py --out /tmp/numbers/tune --seeds 100 101 102

Descriptors (measure.identity_descriptor, and the moment frame alone), all from the masks at the
working size, as the Inspector computes them: outline (the outline descriptor of
`linewatch.detector.shape`, at the part's box), moment (`identity.moment_descriptors`),
outline_and_moment (`identity.identity_descriptors`), outline_or_moment (per place the one of
the two that tells it from the other places best: `identity.SlotIdentity`, the default).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

import linewatch.detector.identity as identity
from linewatch.bank_builder import working_size
from linewatch.good_images import read_folder
from linewatch.config import load_config
from linewatch.detector.backends import get_backend
from linewatch.detector.describe import pad_masks
from linewatch.detector.inspector import ENCODE_STAGES, Batch, Inspector
from linewatch.detector.models import build_models
from linewatch.detector.shape import shape_descriptors
from linewatch.sim import generate_dataset

REPO = Path(__file__).resolve().parents[1]
SPLITS = (("bank", "train/good"), ("good", "test/good"), ("logical", "test/logical_anomalies"))


def encode(out: Path, product: str, seed: int, config_path: Path) -> dict:
    """Every part's mask (working size) and box of the bank, test good and test logical images."""
    cached = out / f"seed{seed}.pt"
    if cached.exists():
        return torch.load(cached)
    folder = out / f"seed{seed}" / product
    if not (folder / "manifest.json").exists():
        generate_dataset(out / f"seed{seed}", product, seed=seed, n_train=20, n_val=10, n_test_good=40,
                         n_test_logical=40, n_test_structural=0)
    config = load_config(config_path)
    det = config.detector
    det.device = "cpu"
    models = build_models(det, torch.device("cpu"))
    backend = get_backend(det.backend)
    state = backend.fit(models, working_size(read_folder(folder / "train" / "good")[1], det.image_size))
    encoder = Inspector(det, backend.load_state(models, state), bank=None, device=torch.device("cpu"))
    manifest = json.loads((folder / "manifest.json").read_text())["images"]
    data = {}
    for split, sub in SPLITS:
        paths, images = read_folder(folder / sub)
        masks, boxes = [], []
        for i in range(0, len(images), 8):
            enc = encoder.run(Batch(images=images[i:i + 8]), ENCODE_STAGES).encoded
            for j, m in enumerate(enc.masks.per_image()):
                masks.append(m.cpu())
                boxes.append(enc.boxes[j, :m.shape[0]].cpu())
        kinds = [manifest.get(f"{sub}/{p.name}", {}).get("anomaly") for p in paths]
        data[split] = {"masks": masks, "boxes": boxes, "kinds": kinds}
    torch.save(data, cached)
    return data


def descriptors(masks: list[torch.Tensor], name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, M, D) descriptors, (B, M, 4) boxes, (B, M) valid of per-image masks (M_b, S, S)."""
    soft, valid, boxes = pad_masks(masks, tuple(masks[0].shape[-2:]), torch.device("cpu"))  # the working size
    if name == "moment":
        return identity.moment_descriptors(soft), boxes, valid
    return identity.part_identities(shape_descriptors(masks, boxes), soft, name), boxes, valid


def separation(data: dict, name: str, margin: float) -> dict:
    bank_d, bank_b, bank_v = descriptors(data["bank"]["masks"], name)
    slots = identity.SlotIdentity.of_bank(bank_d, bank_b, bank_v, "outline" if name == "moment" else name, margin)
    largest = {}
    for split in ("good", "logical"):
        d, b, v = descriptors(data[split]["masks"], name)
        largest[split] = slots.distances(d, b, v, bank_d, bank_b, bank_v).amax(1).numpy()
    per_kind = defaultdict(list)
    for kind, z in zip(data["logical"]["kinds"], largest["logical"]):
        per_kind[kind].append(float(z))
    labels = [0] * len(largest["good"]) + [1] * len(largest["logical"])
    return {"auroc": 100 * roc_auc_score(labels, np.concatenate([largest["good"], largest["logical"]])),
            "good_top3": float(np.sort(largest["good"])[-3:].mean()),
            "median_per_kind": {k: round(float(np.median(v)), 2) for k, v in per_kind.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("/tmp/identity_separation"))
    p.add_argument("--product", default="char_tray")
    p.add_argument("--seeds", type=int, nargs="+", default=[100, 101, 102])
    p.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml")
    p.add_argument("--descriptors", nargs="+", default=["outline", "moment", "outline_and_moment", "outline_or_moment"])
    p.add_argument("--margin", type=float, default=1.5, help="measure.identity_margin (sets the spread's floor)")
    args = p.parse_args()
    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        data = encode(args.out, args.product, seed, args.config)
        for name in args.descriptors:
            r = separation(data, name, args.margin)
            print(f"seed {seed} {name:18s} AUROC of the largest z {r['auroc']:.1f} %, three largest good z "
                  f"{r['good_top3']:.2f}, median z per logical kind {r['median_per_kind']}", flush=True)


if __name__ == "__main__":
    main()
