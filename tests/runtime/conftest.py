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
    from tests.runtime.mqtt_broker import clear_retained

    if session_broker.proc is None or session_broker.proc.poll() is not None:
        session_broker.start()  # a test stopped it after all: bring it back
    clear_retained(session_broker.port)
    return session_broker


@pytest.fixture
def own_broker(tmp_path):
    """A broker of this test's own, which it may stop and start again (same port, same
    persistence file)."""
    from tests.runtime.mqtt_broker import Broker

    b = Broker(tmp_path)
    b.start()
    yield b
    b.stop()
