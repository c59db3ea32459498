"""What the fused score costs on the CPU: per-image time of `inspect` (batches of 8) with
detector.score.source objects vs fused (classic backend, default config otherwise), the two
inspectors alternating in one run, and their per-stage times for one batch.

    linewatch sim generate --out /tmp/sim --product screw_tray --seed 1 --validation 30 --quiet
    python benchmarks/score_source_speed.py /tmp/sim/screw_tray
"""
import sys
import time

import numpy as np
import torch
from linewatch.bank_builder import build_bank
from linewatch.good_images import read_folder
from linewatch.config import Config
from linewatch.detector.inspector import Batch, Inspector
from linewatch.detector.models import build_models

torch.set_num_threads(2)
d = sys.argv[1] if len(sys.argv) > 1 else "/tmp/sim/screw_tray"
imgs = read_folder(d + "/test/good")[1][:16]
insp = {}
for source in ("objects", "fused"):
    cfg = Config(); cfg.detector.device = "cpu"; cfg.detector.score.source = source
    m = build_models(cfg.detector, torch.device("cpu"))
    bank = build_bank(cfg, d + "/train/good", d + "/validation/good", models=m, progress=False)
    insp[source] = Inspector(cfg.detector, m, bank, torch.device("cpu"))
times = {k: [] for k in insp}
for rep in range(5):
    for k, i in insp.items():
        t = time.perf_counter(); i.inspect(imgs[:8]); i.inspect(imgs[8:]); times[k].append((time.perf_counter() - t) / 16)
med = {k: float(np.median(v)) for k, v in times.items()}
print({k: f"{v*1000:.1f} ms/img" for k, v in med.items()}, "ratio fused/objects", round(med["fused"] / med["objects"], 2))
for k, i in insp.items():
    b = i.run(Batch(images=imgs[:8]))
    print(k, {n: round(v, 3) for n, v in b.timings.items()})
