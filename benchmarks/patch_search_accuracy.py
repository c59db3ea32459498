"""Image AUROC of the patch branch alone with the exact search (score.patch_dims 0) and with the
search on principal axes (linewatch.detector.patch_knn.PatchIndex), per product and anomaly
kind, from the same backbone features and the same retrieval as the Inspector's (the branch's
score: the maximum of its smoothed map). Only the backbone runs: minutes on a CPU where the
whole detector's `linewatch eval` takes much longer.

    linewatch sim generate --out /tmp/small0 --seed 0 --train 20 --validation 10 --quiet
    python benchmarks/patch_search_accuracy.py /tmp/small0 12 8

prints one line per product: {"dims0/logical": AUROC %, "dims0/structural": ..., "dims12/...": ...}.
PRODUCTS=screw_tray,glyph_tray limits the products.
"""
import json
import os
import sys

import torch
from sklearn.metrics import roc_auc_score

from linewatch.good_images import read_folder
from linewatch.config import Config
from linewatch.detector.inspector import Batch, Inspector
from linewatch.detector.models import build_models
from linewatch.detector.patch_knn import PatchIndex, local_patch_features
from linewatch.detector.report import smoothed

torch.set_num_threads(1)
root = sys.argv[1]
dims_list = [0] + [int(a) for a in sys.argv[2:]]
config = Config()
config.detector.device = "cpu"
score = config.detector.score
device = torch.device("cpu")
encoder = Inspector(config.detector, build_models(config.detector, device), None, device)


def features(images):
    with torch.inference_mode():
        return torch.cat([encoder.run(Batch(images=images[i:i + 8]), ("preprocess", "backbone")).encoded.features.float()
                          for i in range(0, len(images), 8)])


result = {}
for product in os.environ.get("PRODUCTS", "screw_tray,breakfast_box,glyph_tray,bracket_kit").split(","):
    folder = f"{root}/{product}"
    bank = features(read_folder(f"{folder}/train/good")[1])
    tests = {c: features(read_folder(f"{folder}/test/{c}")[1]) for c in ("good", "logical_anomalies", "structural_anomalies")}
    r = min(score.patch_images, len(bank))
    for dims in dims_list:
        index = PatchIndex(local_patch_features(bank), dims)
        scores = {}
        for category, f in tests.items():
            references = torch.cdist(f.flatten(1), bank.flatten(1)).topk(r, dim=1, largest=False).indices  # TemplateBank.retrieve
            maps = index.distances(local_patch_features(f), score.patch_window, references)
            scores[category] = smoothed(maps, config.detector.image_size,
                                        config.detector.measure.smoothing_sigma).flatten(1).amax(1).tolist()
        for kind, category in (("logical", "logical_anomalies"), ("structural", "structural_anomalies")):
            good, bad = scores["good"], scores[category]
            result[f"{product}/dims{dims}/{kind}"] = 100 * roc_auc_score([0] * len(good) + [1] * len(bad), good + bad)
    print(product, json.dumps({k.split("/", 1)[1]: round(v, 2) for k, v in result.items() if k.startswith(product)}), flush=True)
