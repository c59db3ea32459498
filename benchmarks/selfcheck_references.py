"""How far apart the self-check's references score (docs/operations.md, Self-check): score /
threshold of a bank's own good images (the default good references), of held-out good images
(what `selfcheck.good` should name) and of the bad references made from the good ones
(linewatch.sim.defects) over a few seeds, with the classic backend on sim data.

    python benchmarks/selfcheck_references.py [--out /tmp/selfcheck-bench] [--seeds 3]

The bank is the tests' small one (tests/serving.py): screw_tray, sim seed 3, 12 good images,
6 held-out validation images, 128 px, classic backend, image_size 112, k_references 2.
"""
import argparse
from pathlib import Path

from linewatch.bank_builder import build_bank
from linewatch.config import SelfCheckConfig, config_from_dict
from linewatch.images import list_images, read_image
from linewatch.recipe import load_processor
from linewatch.selfcheck_references import load_references
from linewatch.sim import generate_dataset

DETECTOR = {"backend": "classic", "device": "cpu", "image_size": 112, "k_references": 2}

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", default="/tmp/selfcheck-bench")
parser.add_argument("--seeds", type=int, default=3, help="defect seeds (selfcheck.seed 0..N-1)")
args = parser.parse_args()
out = Path(args.out)
config = config_from_dict({"detector": DETECTOR})
bank_path = out / "bank.lwbank"
data = out / "screw_tray"
if not bank_path.exists():
    data = generate_dataset(out, "screw_tray", seed=3, n_train=12, n_val=6, n_test_good=0, n_test_logical=0,
                            n_test_structural=0, size=128)
    build_bank(config, data / "train" / "good", data / "validation" / "good", progress=False).save(bank_path)
inspector, _ = load_processor(config, bank_path)


def ratios(images):
    return [r.score / r.threshold for r in inspector.inspect(images)]


held_out = [read_image(p) for p in list_images(data / "validation" / "good")]
print("held-out good images:", " ".join(f"{x:.2f}" for x in ratios(held_out)))
for seed in range(args.seeds):
    refs = load_references(SelfCheckConfig(enabled=True, good_count=4, bad_count=8, seed=seed), inspector)
    got = ratios([r.image for r in refs])
    good = [x for r, x in zip(refs, got) if r.expected == "pass"]
    bad = [x for r, x in zip(refs, got) if r.expected == "fail"]
    print(f"seed {seed}: bank good images {' '.join(f'{x:.2f}' for x in good)}; "
          f"made bad {' '.join(f'{x:.2f}' for x in bad)} ({sum(x > 1 for x in bad)}/{len(bad)} fail)")
