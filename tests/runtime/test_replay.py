"""replay(): the camera simulator, into a real Ingest on loopback, in each protocol."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from linewatch.config import EndpointConfig, IngestConfig
from linewatch.images import write_image
from linewatch.runtime.transport.ingest import Ingest
from linewatch.runtime.transport.replay import replay
from linewatch.wire import Frame


@pytest.fixture
def folder(tmp_path: Path) -> list[np.ndarray]:
    images = [np.random.default_rng(i).integers(0, 256, (20, 24, 3), dtype=np.uint8) for i in range(3)]
    for i, image in enumerate(images):
        write_image(tmp_path / f"part{i}.png", image)
    return images


def _run(tmp_path: Path, endpoint: EndpointConfig, **replay_kw) -> tuple[int, list[Frame]]:
    """Replay `tmp_path` into an Ingest bound on `endpoint`; (frames sent, frames received)."""
    frames: list[Frame] = []
    errors: list[Exception] = []
    arrived = threading.Condition()

    def on_frame(frame: Frame) -> None:
        with arrived:
            frames.append(frame)
            arrived.notify_all()

    ingest = Ingest(IngestConfig(endpoints=[endpoint]), on_frame, lambda error, mono: errors.append(error))
    ingest.start()
    try:
        sent = replay(tmp_path, ingest.bound_urls[0], fps=200, warmup_s=0.3, **replay_kw)
        with arrived:
            arrived.wait_for(lambda: len(frames) >= sent, 2.0)
    finally:
        ingest.stop()
    assert not errors
    return sent, frames


def test_replay_reqrep_delivers_every_frame_raw(tmp_path: Path, folder) -> None:
    sent, frames = _run(tmp_path, EndpointConfig(url="tcp://127.0.0.1:*", protocol="imagezmq-reqrep"),
                        protocol="imagezmq-reqrep", encoding="raw", camera="sim", loop=True, count=7)
    assert sent == 7
    frames = sorted(frames, key=lambda f: f.frame_id)  # imagezmq ids: receive time, increasing
    assert len(frames) == 7 and len({f.frame_id for f in frames}) == 7
    for i, frame in enumerate(frames):
        np.testing.assert_array_equal(frame.decoded(), folder[i % 3])


def test_replay_linewatch_png(tmp_path: Path, folder) -> None:
    sent, frames = _run(tmp_path, EndpointConfig(url="tcp://127.0.0.1:*"), encoding="png")
    assert sent == 3
    assert frames, "nothing arrived"  # PUB/SUB: after the warm-up all should, but never hang on it
    for frame in frames:
        assert frame.part_id == f"part{frame.frame_id}"
        np.testing.assert_array_equal(frame.decoded(), folder[frame.frame_id])


def test_replay_refuses_impossible_settings(tmp_path: Path, folder) -> None:
    with pytest.raises(ValueError, match="can only bind"):
        replay(tmp_path, "tcp://127.0.0.1:1", fps=1, protocol="imagezmq-pubsub", mode="connect")
    with pytest.raises(ValueError, match="raw arrays or JPEG"):
        replay(tmp_path, "tcp://127.0.0.1:1", fps=1, protocol="imagezmq-reqrep", encoding="png")
    with pytest.raises(ValueError, match="no such"):
        replay(tmp_path / "missing", "tcp://127.0.0.1:1", fps=1)
    with pytest.raises(ValueError, match="loop needs a folder"):
        replay(iter([]), "tcp://127.0.0.1:1", fps=1, loop=True)


def test_replay_sends_frames_made_as_it_goes_after_the_connection_is_made(tmp_path: Path, folder) -> None:
    """An iterable source (the demo's camera renders each frame when it is taken), raw, with
    the wait for the connection instead of a long warm-up."""
    taken: list[int] = []

    def camera():
        for i, image in enumerate(folder):
            taken.append(i)
            yield image, f"P{i:04d}"

    frames: list[Frame] = []
    arrived = threading.Condition()

    def on_frame(frame: Frame) -> None:
        with arrived:
            frames.append(frame)
            arrived.notify_all()

    ingest = Ingest(IngestConfig(endpoints=[EndpointConfig(url="tcp://127.0.0.1:*")]), on_frame, lambda e, m: None)
    ingest.start()
    try:
        sent = replay(camera(), ingest.bound_urls[0], fps=0, encoding="raw", camera="cam7", handshake_s=10.0,
                      warmup_s=0.2)
        with arrived:
            arrived.wait_for(lambda: len(frames) >= 3, 5.0)
    finally:
        ingest.stop()
    assert sent == 3 and taken == [0, 1, 2]
    assert [(f.camera, f.frame_id, f.part_id) for f in frames] == [("cam7", i, f"P{i:04d}") for i in range(3)]
    for frame in frames:
        np.testing.assert_array_equal(frame.decoded(), folder[frame.frame_id])
