"""How far apart the self-check's references score (docs/operations.md, Self-check): score /
threshold of a bank's own good images (the default good references), of held-out good images
(what `selfcheck.good` should name) and of the bad references made from the good ones
(linewatch.sim.defects) over a few seeds, with the classic backend on sim data. Then how long
a round of the default 4 references takes through a real in-process daemon (`--rounds`).

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
parser.add_argument("--rounds", type=int, default=5, help="self-check rounds timed in a daemon")
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

# A round through the live pipeline: the daemon on loopback ports, nothing else sending.
import time  # noqa: E402

from linewatch.runtime.daemon import Daemon  # noqa: E402
from linewatch.runtime.ops.logs import configure_logging  # noqa: E402

run = config_from_dict({"detector": DETECTOR, "runtime": {
    "ingest": {"endpoints": [{"url": "tcp://127.0.0.1:0"}]}, "publish": {"url": "tcp://127.0.0.1:0"},
    "metrics": {"port": 0}, "logging": {"level": "WARNING"}, "selfcheck": {"enabled": True}}})
daemon = Daemon(run.runtime, inspector, log=configure_logging(run.runtime.logging),
                selfcheck_references=lambda p: load_references(run.runtime.selfcheck, p))
daemon.start()
seconds = []
try:
    for i in range(args.rounds):
        if i:
            daemon.selfcheck.set_references(load_references(run.runtime.selfcheck, inspector))  # a round at once
        while daemon.selfcheck.last is None or daemon.selfcheck.last.number < i + 1:
            time.sleep(0.01)
        last = daemon.selfcheck.last
        seconds.append(last.finished - last.started)
        assert last.ok, last.to_dict()
finally:
    daemon.stop()
print(f"rounds of {len(last.checks)} references through the daemon, seconds each: "
      + " ".join(f"{x:.3f}" for x in seconds))
