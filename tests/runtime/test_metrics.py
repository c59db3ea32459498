"""Metrics: names, private registry, and that the exposition carries what was counted."""

from __future__ import annotations

from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from linewatch.runtime.ops.metrics import OTHER_CAMERAS, CameraLabels, Metrics, metric_names

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


# ---------------------------------------------------------------- score / threshold


def _buckets(m: Metrics, name: str, labels: dict[str, str]) -> dict[str, float]:
    """{le: cumulative count} of one histogram series, read back from the text exposition."""
    out = {}
    for family in text_string_to_metric_families(m.exposition().decode()):
        for s in family.samples:
            if s.name == name + "_bucket" and {k: v for k, v in s.labels.items() if k != "le"} == labels:
                out[s.labels["le"]] = s.value
    return out


def test_score_ratio_buckets_hold_exactly_the_recorded_scores() -> None:
    m = Metrics()
    # threshold 0.5: ratios 0.08, 0.5 (on a bound: le is inclusive), 0.72, 0.94, 1.0 (a pass at the threshold)
    for score in (0.04, 0.25, 0.36, 0.47, 0.5):
        assert m.observe_score("cam0", "pass", score, 0.5)
    for score in (0.52, 0.9, 4.0):  # ratios 1.04, 1.8, 8.0
        assert m.observe_score("cam0", "fail", score, 0.5)
    assert m.observe_score("cam1", "pass", 1.5, 2.0)  # another bank's threshold: ratio 0.75
    ones = ("0.1", "0.2", "0.3", "0.4")
    passes = {**dict.fromkeys(ones, 1), "0.5": 2, "0.6": 2, "0.65": 2, "0.7": 2, "0.75": 3, "0.8": 3, "0.85": 3,
              "0.9": 3, "0.925": 3, "0.95": 4, "0.975": 4, "1.0": 5, "1.05": 5, "1.1": 5, "1.25": 5, "1.5": 5,
              "2.0": 5, "3.0": 5, "5.0": 5, "+Inf": 5}
    fails = {**{le: 0 for le in passes if le in ones or float(le) <= 1.0}, "1.05": 1, "1.1": 1, "1.25": 1, "1.5": 1,
             "2.0": 2, "3.0": 2, "5.0": 2, "+Inf": 3}
    assert _buckets(m, "linewatch_score_ratio", {"camera": "cam0", "verdict": "pass"}) == passes
    assert _buckets(m, "linewatch_score_ratio", {"camera": "cam0", "verdict": "fail"}) == fails
    other = _buckets(m, "linewatch_score_ratio", {"camera": "cam1", "verdict": "pass"})
    assert other["0.7"] == 0 and other["0.75"] == 1
    get = m.registry.get_sample_value
    assert get("linewatch_score_ratio_count", {"camera": "cam0", "verdict": "pass"}) == 5
    assert abs(get("linewatch_score_ratio_sum", {"camera": "cam0", "verdict": "pass"}) - 3.24) < 1e-9


def test_a_score_without_a_usable_threshold_is_not_recorded() -> None:
    m = Metrics()
    inf, nan = float("inf"), float("nan")
    # an uncalibrated bank judges with threshold inf; 0 and negatives would divide into nonsense
    for score, threshold in ((0.3, inf), (0.3, 0.0), (0.3, -1.0), (0.3, nan), (0.3, None), (nan, 0.5),
                             (inf, 0.5), (None, 0.5), (1.0, 1e-320)):  # the last: finite, but the ratio is inf
        assert not m.observe_score("cam0", "pass", score, threshold), (score, threshold)
    text = m.exposition().decode()
    assert "linewatch_score_ratio_bucket" not in text  # not even an empty series for cam0
    assert "NaN" not in text and "Inf" not in text.replace('le="+Inf"', "")
    assert m.set_calibration([0.2, nan, 0.4], inf) == 0


def test_calibration_histogram_holds_the_banks_scores() -> None:
    m = Metrics()
    assert m.set_calibration([0.2, 0.35, 0.5, 0.6, float("nan")], 0.5) == 4  # ratios 0.4, 0.7, 1.0, 1.2
    b = _buckets(m, "linewatch_calibration_score_ratio", {})
    assert (b["0.3"], b["0.4"], b["0.65"], b["0.7"], b["0.975"], b["1.0"], b["1.1"], b["1.25"], b["+Inf"]) == (
        0, 1, 1, 2, 2, 3, 3, 4, 4)


def test_the_daemon_exposes_the_calibration_of_the_bank_it_serves() -> None:
    from linewatch.config import RuntimeConfig
    from linewatch.detector.calibration import Calibration
    from linewatch.runtime.daemon import Daemon
    from tests.runtime.fakes import FakeProcessor, quiet_log

    processor = FakeProcessor([("only", 0.0)])
    processor.calibration = Calibration(threshold=0.5, scores=(0.1, 0.3, 0.45))
    d = Daemon(RuntimeConfig(), processor, log=quiet_log())  # not started: no socket opened
    assert d.metrics.registry.get_sample_value("linewatch_calibration_score_ratio_count") == 3
    assert d.metrics.registry.get_sample_value("linewatch_calibration_score_ratio_bucket", {"le": "0.6"}) == 2
    # a processor without a bank (or a bank never calibrated) leaves the histogram empty
    bare = Daemon(RuntimeConfig(), FakeProcessor([("only", 0.0)]), log=quiet_log())
    assert bare.metrics.registry.get_sample_value("linewatch_calibration_score_ratio_count") == 0
    processor.calibration = Calibration(threshold=None, scores=(0.1, 0.3))
    uncalibrated = Daemon(RuntimeConfig(), processor, log=quiet_log())
    assert uncalibrated.metrics.registry.get_sample_value("linewatch_calibration_score_ratio_count") == 0
