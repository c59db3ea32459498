"""Fixtures shared by the runtime tests."""

from __future__ import annotations

import pytest

from linewatch.runtime.pipeline.runner import Pipeline


@pytest.fixture
def started():
    """Start pipelines and always stop them (bounded), even when a test fails."""
    pipes: list[Pipeline] = []

    def start(p: Pipeline) -> Pipeline:
        p.start()
        pipes.append(p)
        return p

    yield start
    for p in pipes:
        p.stop(timeout_s=2.0)


@pytest.fixture
def overlay_renderings(monkeypatch) -> list[int]:
    """The frame ids of every overlay rendered from now on (Outcome's renderer, counted)."""
    import linewatch.runtime.sinks.outcome as outcome_module

    rendered: list[int] = []
    real = outcome_module.overlay_jpeg

    def counting(image, verdict):
        rendered.append(verdict.frame_id)
        return real(image, verdict)

    monkeypatch.setattr(outcome_module, "overlay_jpeg", counting)
    return rendered


# ---------------------------------------------------------------- Mosquitto (tests/runtime/mqtt_broker.py)


@pytest.fixture(scope="session")
def session_broker(tmp_path_factory):
    """One Mosquitto for the session (for each xdist worker), started on first use."""
    from tests.runtime.mqtt_broker import Broker

    b = Broker(tmp_path_factory.mktemp("broker"))
    b.start()
    yield b
    b.stop()


@pytest.fixture
def broker(session_broker):
    """The session's broker, running, with no retained message left by an earlier test. A test
    that stops the broker takes `own_broker` instead."""
    return session_broker.running_and_clean()


@pytest.fixture
def own_broker(tmp_path):
    """A broker of this test's own, which it may stop and start again (same port, same
    persistence file)."""
    from tests.runtime.mqtt_broker import Broker

    b = Broker(tmp_path)
    b.start()
    yield b
    b.stop()
