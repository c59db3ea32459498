"""The detector benchmark (linewatch bench) runs end to end on a tiny setting and writes well-formed JSON."""

import json

from linewatch.eval import bench


def test_bench_tiny_run(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--batch-sizes", "1", "2", "--repeats", "1", "--image-size", "64", "--source-size", "64",
                       "--good", "3", "--devices", "cpu", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    paths = {(r["batch_size"], r["path"]) for r in data["results"]}
    assert paths == {(1, "cached"), (1, "naive"), (2, "cached"), (2, "naive")}
    for r in data["results"]:
        assert r["images_per_s"] > 0 and r["batch_latency_ms_median"] > 0
        assert {"backbone", "upsample", "segment", "describe", "match", "measure"} <= set(r["stage_ms_per_batch"])
        assert ("reencode_references" in r["stage_ms_per_batch"]) == (r["path"] == "naive")
    assert [r["batch_size"] for r in data["naive_over_cached"]] == [1, 2]
    assert all(r["naive_over_cached_latency"] > 0 for r in data["naive_over_cached"])
    assert "naive (re-encode k references per frame)" in capsys.readouterr().out


def test_bench_variants_cross_precision_generator_and_prompts():
    import argparse

    args = argparse.Namespace(precisions=["fp32", "bf16"], generators=["batched", "segment_anything"],
                              prompts=["full_grid", "reference_seeded"])
    assert bench._variants("classic", args) == [{"precision": "fp32"}, {"precision": "bf16"}]
    samlad = bench._variants("samlad-random", args)
    assert len(samlad) == 6  # 2 precisions x (batched x 2 prompts + segment_anything x full_grid)
    assert {"precision": "bf16", "generator": "segment_anything", "prompts": "full_grid"} in samlad
    assert not any(v["generator"] == "segment_anything" and v["prompts"] == "reference_seeded" for v in samlad)
