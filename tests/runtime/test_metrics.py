"""Metrics: names, private registry, and that the exposition carries what was counted."""

from __future__ import annotations

from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from linewatch.runtime.metrics import OTHER_CAMERAS, CameraLabels, Metrics, metric_names

REQUIRED = {
    "linewatch_frames_received_total",
    "linewatch_verdicts_total",
    "linewatch_frame_errors_total",
    "linewatch_frames_shed_total",
    "linewatch_frames_timed_out_total",
    "linewatch_late_results_total",
    "linewatch_capture_to_verdict_seconds_bucket",
    "linewatch_capture_to_verdict_seconds_sum",
    "linewatch_capture_to_verdict_seconds_count",
    "linewatch_stage_seconds_bucket",
    "linewatch_batch_size_bucket",
    "linewatch_queue_depth",
    "linewatch_inflight_frames",
    "linewatch_last_frame_timestamp_seconds",
    "linewatch_gpu_memory_bytes",
    "linewatch_build_info",
    "linewatch_bank_info",
    "linewatch_ready",
}


def test_metric_names_lists_every_required_sample_name() -> None:
    names = metric_names()
    assert REQUIRED <= names, REQUIRED - names
    assert all(n.startswith("linewatch_") for n in names)


def test_two_instances_do_not_share_the_global_registry() -> None:
    a, b = Metrics(), Metrics()  # would raise "Duplicated timeseries" on a shared registry
    a.frames_received.labels(camera="c").inc()
    assert b.registry.get_sample_value("linewatch_frames_received_total", {"camera": "c"}) is None
    assert REGISTRY.get_sample_value("linewatch_frames_received_total", {"camera": "c"}) is None


def test_exposition_carries_counts_buckets_and_scrape_time_gauges() -> None:
    m = Metrics()
    m.verdicts.labels(camera="cam0", verdict="pass").inc(3)
    m.capture_to_verdict.labels(camera="cam0").observe(0.004)
    m.batch_size.observe(5)
    m.set_build_info("1.2.3", "classic")
    m.set_bank_info("b1", "classic", 12)
    depth = [7]
    m.track_queue("pending", lambda: depth[0])
    families = {f.name: f for f in text_string_to_metric_families(m.exposition().decode())}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("linewatch_verdicts_total", (("camera", "cam0"), ("verdict", "pass")))] == 3
    assert samples[("linewatch_capture_to_verdict_seconds_bucket", (("camera", "cam0"), ("le", "0.005")))] == 1
    assert samples[("linewatch_capture_to_verdict_seconds_bucket", (("camera", "cam0"), ("le", "0.002")))] == 0
    assert samples[("linewatch_batch_size_bucket", (("le", "8.0"),))] == 1
    assert samples[("linewatch_build_info", (("backend", "classic"), ("version", "1.2.3")))] == 1
    assert samples[("linewatch_bank_info", (("backend", "classic"), ("bank_id", "b1"), ("images", "12")))] == 1
    assert samples[("linewatch_queue_depth", (("queue", "pending"),))] == 7
    depth[0] = 2  # read at scrape time
    again = {s.name + str(s.labels): s.value for f in text_string_to_metric_families(m.exposition().decode())
             for s in f.samples}
    assert again["linewatch_queue_depth{'queue': 'pending'}"] == 2


def test_gpu_memory_is_only_tracked_with_cuda() -> None:
    import sys

    m = Metrics()
    torch = sys.modules.get("torch")
    expect = bool(torch is not None and torch.cuda.is_available())
    assert m.track_gpu_memory() is expect


def test_camera_labels_are_bounded_and_the_allow_list_keeps_its_own() -> None:
    labels = CameraLabels(limit=2, known=["line-a"])
    assert [labels(c) for c in ("cam0", "cam1", "cam2", "cam0", "line-a")] == ["cam0", "cam1", OTHER_CAMERAS, "cam0", "line-a"]
    assert labels.overflowed


def test_many_camera_ids_through_a_pipeline_share_one_label_beyond_the_limit() -> None:
    # Fault run: 20,000 camera ids -> 420,000 series and a 33 MB /metrics page.
    from tests.runtime.fakes import Collector, FakeProcessor, make_frame, make_pipeline

    metrics = Metrics(camera_labels=CameraLabels(limit=8))
    out = Collector()
    p = make_pipeline(FakeProcessor([("only", 0.0)]), out, metrics=metrics)
    p.start()
    try:
        for i in range(300):
            p.submit(make_frame(f"cam{i}", 0))
        assert out.wait_for(300)
    finally:
        p.stop()
    cameras = set()
    total = 0.0
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for sample in family.samples:
            if "camera" in sample.labels:
                cameras.add(sample.labels["camera"])
            if sample.name == "linewatch_verdicts_total":
                total += sample.value
    assert len(cameras) == 9 and OTHER_CAMERAS in cameras, sorted(cameras)
    assert total == 300  # nothing lost by sharing a label
