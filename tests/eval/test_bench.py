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


def test_generator_ratios_pair_the_two_generators_of_one_setting():
    def row(generator, batch_ms, segment_ms, bs=4):
        return {"backend": "samlad-random", "device": "cpu", "precision": "fp32", "prompts": "full_grid",
                "batch_size": bs, "path": "cached", "generator": generator, "batch_latency_ms_median": batch_ms,
                "stage_ms_per_batch": {"segment": segment_ms}}

    rows = [row("batched", 100.0, 40.0), row("segment_anything", 250.0, 190.0), row("batched", 10.0, 5.0, bs=1),
            {"backend": "classic", "device": "cpu", "batch_size": 4, "path": "cached"}]
    (ratio,) = bench.generator_ratios(rows)  # batch size 1 has no segment_anything row: no ratio
    assert ratio["batch_size"] == 4
    assert ratio["segment_anything_over_batched_latency"] == 2.5
    assert ratio["segment_anything_over_batched_segment_stage"] == 4.75
