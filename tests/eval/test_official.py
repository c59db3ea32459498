"""`linewatch eval` agrees with the official MVTec LOCO AD evaluation script, run unmodified from
`../shared/tools/mvtec_loco_ad_evaluation` (next to the repository) on the maps linewatch wrote:
image AUROC and AU-sPRO of every product, anomaly kind and method within 0.005."""

import json

import pytest

from linewatch.config import config_from_dict
from linewatch.eval.official import compare, default_tools_dir, format_table, missing_modules
from linewatch.eval.runner import evaluate
from linewatch.sim import generate_dataset

TOOLS = default_tools_dir()
PRODUCTS = ("screw_tray", "glyph_tray")  # a counting product and a shape product


@pytest.mark.slow
@pytest.mark.system  # runs the official script in a subprocess
def test_linewatch_eval_agrees_with_the_official_script(tmp_path):
    if not (TOOLS / "evaluate_experiment.py").is_file():
        pytest.skip(f"the official MVTec LOCO AD evaluation script is not at {TOOLS}")
    if missing := missing_modules():
        pytest.skip(f"the official evaluation script needs {', '.join(missing)}, which this Python lacks")
    data = tmp_path / "sim"
    for product in PRODUCTS:
        generate_dataset(data, product, seed=11, n_train=6, n_val=6, n_test_good=5, n_test_logical=5,
                         n_test_structural=4, size=96)
    config = config_from_dict({"detector": {"image_size": 64, "device": "cpu"}})
    out = tmp_path / "out"
    evaluate(config, data, None, out, method="both", progress=False, log=lambda message: None)
    report = json.loads((out / "report.json").read_text())

    rows = compare(report, data, out, timeout=300)
    table = format_table(rows)
    assert {(r["category"], r["method"], r["kind"]) for r in rows} == {
        (p, m, k) for p in PRODUCTS for m in ("objects", "patch", "fused", "patchcore") for k in ("logical", "structural")}
    assert {r["metric"] for r in rows} == {"image_auroc", "au_spro@0.05"}
    assert all(r["official"] is not None for r in rows), table
    print(table)
    assert max(abs(r["diff"]) for r in rows) <= 0.005, table
