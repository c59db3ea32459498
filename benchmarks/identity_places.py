"""How well each descriptor of part identity tells each place from the others (what
`measure.identity_descriptor: outline_or_moment` chooses by, `identity.SlotIdentity`): per
product and seed of the synthetic line, a bank from 20 good images (configs/demo.yaml), then for
each place of the bank's first image the slot's mean separation (spread over the distance to the
nearest part of another place) of the moment frame divided by the outline's. Below
`identity.MOMENT_GAIN` (0.9) the place is judged in the moment frame.

    PYTHONPATH=. python benchmarks/identity_places.py --data DATA --seeds 100 101 102

DATA holds OUT/data of `benchmarks/auroc_table.py` (seedS/PRODUCT with train/good and
validation/good); missing ones are generated with its counts.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from auroc_table import dataset  # noqa: E402  (the same datasets as the AUROC table)

from linewatch.bank_builder import build_bank  # noqa: E402
from linewatch.config import load_config  # noqa: E402
from linewatch.detector.identity import MOMENT_GAIN, slot_members  # noqa: E402
from linewatch.detector.inspector import Inspector  # noqa: E402
from linewatch.detector.models import build_models  # noqa: E402
from linewatch.sim import ALL_PRODUCTS  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
COUNTS = {"train": 20, "validation": 10, "test_good": 20, "test_logical": 20, "test_structural": 15}

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--data", type=Path, required=True)
p.add_argument("--seeds", type=int, nargs="+", default=[100, 101, 102])
p.add_argument("--products", nargs="+", default=[*ALL_PRODUCTS, "char_tray"])
args = p.parse_args()
torch.set_num_threads(2)
config = load_config(REPO / "configs" / "demo.yaml")
config.detector.device = "cpu"
config.detector.measure.identity_descriptor = "outline_or_moment"
cpu = torch.device("cpu")
for product in args.products:
    for seed in args.seeds:
        folder = dataset(args.data, product, seed, COUNTS)
        models = build_models(config.detector, cpu)
        bank = build_bank(config, folder / "train" / "good", folder / "validation" / "good", models=models,
                          progress=False)
        separations = Inspector(config.detector, models, bank, cpu).slots.separations  # (2, Z, N)
        n = int(bank.object_valid[0].sum())
        members = slot_members(bank.boxes[:1, :n], bank.boxes, bank.object_valid).float()[0]  # (n, Z*N)
        means = (members[None] * separations.reshape(2, 1, -1)).sum(-1) / members.sum(-1).clamp_min(1)
        ratios = sorted((means[1] / means[0].clamp_min(1e-9)).tolist())
        chosen = sum(r < MOMENT_GAIN for r in ratios)
        print(f"{product:13s} seed {seed}: moment / outline per place {' '.join(f'{r:.2f}' for r in ratios)}"
              f"  ({chosen} of {len(ratios)} below {MOMENT_GAIN})", flush=True)
