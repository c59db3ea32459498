"""CurveZMQ on the frame and verdict sockets, TLS on the metrics server: over loopback, with
real keys made by linewatch's own key generator. Every wait is bounded and event-driven."""

from __future__ import annotations

import ssl
import subprocess
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import zmq
from prometheus_client import CollectorRegistry

from linewatch import wire
from linewatch.config import (ConfigError, EndpointConfig, IngestConfig, MetricsConfig, PublishConfig, SecurityConfig,
                              config_from_dict)
from linewatch.runtime.ops.health import HealthServer
from linewatch.runtime.transport.ingest import Ingest
from linewatch.runtime.ops.metrics import Metrics
from linewatch.runtime.transport.publish import Publisher
from linewatch.runtime.transport.security import ClientKeys, SecurityError, generate_keys, load_secret_key
from linewatch.wire import Verdict
from tests.runtime.fakes import FrameCollector as Collector

ANY_PORT = "tcp://127.0.0.1:*"


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Path]:
    """A daemon key pair; camera-1 and tap-1 allowed; stranger not."""
    root = tmp_path_factory.mktemp("keys")
    out = {}
    for name, folder in (("server", "server"), ("camera-1", "senders"), ("tap-1", "subscribers"), ("stranger", "other")):
        public, secret = generate_keys(root / "secret" / name, name)
        (root / folder).mkdir(exist_ok=True)
        if folder != "server":
            (root / folder / public.name).write_bytes(public.read_bytes())  # only the public key goes there
        out[name], out[name + ".pub"] = secret, public
    out["senders"], out["subscribers"] = root / "senders", root / "subscribers"
    return out


def security(keys) -> SecurityConfig:
    return SecurityConfig(server_secret_key=str(keys["server"]), frame_senders=str(keys["senders"]),
                          verdict_subscribers=str(keys["subscribers"]))


def client(keys, name: str) -> ClientKeys:
    return ClientKeys.load(keys["server.pub"], keys[name])


def refused(metrics: Metrics, socket: str, reason: str) -> float:
    return metrics.registry.get_sample_value("linewatch_connections_refused_total", {"socket": socket, "reason": reason}) or 0


def test_frames_come_only_from_allowed_senders(keys) -> None:
    metrics = Metrics()
    sink = Collector()
    ingest = Ingest(IngestConfig(endpoints=[EndpointConfig(url=ANY_PORT)]), sink.on_frame, sink.on_error,
                    metrics=metrics, security=security(keys))
    ingest.start()
    ctx = zmq.Context()
    try:
        url = ingest.bound_urls[0]
        senders = {}
        for name, keys_for in (("plain", None), ("stranger", "stranger"), ("camera-1", "camera-1")):
            sock = ctx.socket(zmq.PUB)
            sock.setsockopt(zmq.LINGER, 0)
            if keys_for is not None:
                client(keys, keys_for).apply(sock)
            sock.connect(url)
            senders[name] = sock
        # both refusals are seen (counted by reason) before the allowed sender's frames are sent
        assert ingest._curve.wait_refused(2, 10.0)
        assert refused(metrics, "frames", "handshake_failed") >= 1  # no keys at all
        assert refused(metrics, "frames", "not_allowed") >= 1  # CURVE, but a key not in the folder
        image = np.zeros((8, 8, 3), np.uint8)
        for i in range(100):  # the allowed sender: PUB/SUB joins asynchronously, so probe
            for name, sock in senders.items():
                sock.send_multipart(wire.encode_frame(name, i, image))
            if sink.wait(lambda: bool(sink.frames), 0.05):
                break
        assert sink.wait(lambda: bool(sink.frames), 5.0)
        assert {f.camera for f in sink.frames} == {"camera-1"} and not sink.errors
    finally:
        for sock in senders.values():
            sock.close(linger=0)
        ctx.term()
        ingest.stop()


def test_verdicts_reach_only_allowed_subscribers(keys) -> None:
    metrics = Metrics()
    publisher = Publisher(PublishConfig(url=ANY_PORT), metrics=metrics, security=security(keys))
    publisher.start()
    ctx = zmq.Context()
    subs = {}
    try:
        for name, keys_for in (("plain", None), ("stranger", "stranger"), ("tap-1", "tap-1")):
            sock = ctx.socket(zmq.SUB)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SUBSCRIBE, b"")
            if keys_for is not None:
                client(keys, keys_for).apply(sock)
            sock.connect(publisher.bound_url)
            subs[name] = sock
        assert publisher._curve.wait_refused(2, 10.0)
        assert refused(metrics, "verdicts", "handshake_failed") >= 1 and refused(metrics, "verdicts", "not_allowed") >= 1
        for i in range(100):
            publisher.publish(Verdict(camera="cam0", frame_id=i, verdict="pass", capture_ts=1.0))
            if subs["tap-1"].poll(50):
                break
        got = wire.decode_verdict(subs["tap-1"].recv_multipart())
        assert got.camera == "cam0"
        assert publisher.wait_idle(5.0)
        # the refused ones never completed a handshake, so nothing was ever queued for them
        assert not subs["plain"].poll(200) and not subs["stranger"].poll(200)
    finally:
        for sock in subs.values():
            sock.close(linger=0)
        ctx.term()
        publisher.stop()


def test_half_configured_security_is_refused_naming_what_is_missing() -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict({"runtime": {"security": {"server_secret_key": "/etc/linewatch/server.key_secret",
                                                   "frame_senders": "/etc/linewatch/senders"}}})
    assert "half-configured" in str(info.value) and "verdict_subscribers" in str(info.value)
    with pytest.raises(ConfigError, match="tls_key_file"):
        config_from_dict({"runtime": {"metrics": {"tls_cert_file": "/etc/linewatch/cert.pem"}}})
    assert not config_from_dict({}).runtime.security.enabled


def test_unusable_keys_are_start_up_errors_naming_the_file(keys, tmp_path) -> None:
    with pytest.raises(SecurityError, match="no secret key"):
        load_secret_key(keys["server.pub"])  # the public file where the secret one belongs
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = SecurityConfig(server_secret_key=str(keys["server"]), frame_senders=str(empty),
                         verdict_subscribers=str(keys["subscribers"]))
    ingest = Ingest(IngestConfig(endpoints=[EndpointConfig(url=ANY_PORT)]), lambda f: None, lambda e, t: None,
                    security=bad)
    with pytest.raises(SecurityError, match=f"frame_senders: {empty} holds no public certificate"):
        ingest.start()


@pytest.mark.system
def test_keys_generate_writes_a_usable_pair_and_never_overwrites(tmp_path) -> None:
    run = [str(Path(__import__("sys").executable).parent / "linewatch"), "keys", "generate", "--dir", str(tmp_path),
           "--name", "cam"]
    first = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    pair = load_secret_key(tmp_path / "cam.key_secret")
    assert len(pair.public) == len(pair.secret) == 40  # Z85 text of 32-byte keys
    assert (tmp_path / "cam.key_secret").stat().st_mode & 0o077 == 0
    again = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "exists" in again.stderr and "Traceback" not in again.stderr


@pytest.mark.system
def test_metrics_over_tls(tmp_path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    server = HealthServer(MetricsConfig(port=0, tls_cert_file=str(cert), tls_key_file=str(key)), CollectorRegistry())
    server.start()
    try:
        trusted = ssl.create_default_context(cafile=str(cert))
        with urllib.request.urlopen(f"https://127.0.0.1:{server.port}/healthz", context=trusted, timeout=10) as r:
            assert (r.status, r.read()) == (200, b"ok\n")
        with pytest.raises(OSError):  # plain HTTP gets no answer (the connection is dropped)
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=10)
        assert server.scheme == "https"
    finally:
        server.stop()
    with pytest.raises(RuntimeError, match="cannot use the TLS certificate"):
        HealthServer(MetricsConfig(port=0, tls_cert_file=str(key), tls_key_file=str(key)), CollectorRegistry())
