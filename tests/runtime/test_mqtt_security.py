"""The MQTT sink's broker access: a user name with its password from a file, TLS that checks the
broker's certificate and host name, and a client certificate. Against a real Mosquitto with
three listeners: plain and anonymous (the test's subscriber), TLS with a password file, and TLS
that requires a client certificate. The certificates are made here with openssl: a CA, the
broker's certificate for 127.0.0.1 signed by it, a client certificate signed by it, and a
second CA that signed nothing the broker has. One such broker serves the module.
"""

from __future__ import annotations

import getpass
import shutil
import subprocess
from pathlib import Path

import pytest

from linewatch.config import ConfigError, MqttConfig, config_from_dict
from linewatch.config_cli import check_config
from linewatch.runtime.ops.metrics import Metrics
from linewatch.runtime.sinks.mqtt_client import MqttSink
from tests.ports import reserved_port
from tests.runtime.mqtt_broker import WAIT_S, Broker, RecordingLog, Subscriber, connected, sink_for, verdict

USER, PASSWORD = "line-3", "s3cret pass"


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key),
            "-out", str(cert), "-days", "2", "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return cert, key


def make_signed(folder: Path, name: str, ca: tuple[Path, Path], extensions: str) -> tuple[Path, Path]:
    cert, key, csr, ext = (folder / f"{name}{s}" for s in (".pem", ".key", ".csr", ".ext"))
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key),
            "-out", str(csr), "-subj", f"/CN={name}")
    ext.write_text(f"basicConstraints=CA:FALSE\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n"
                   f"{extensions}\n")
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial",
            "-out", str(cert), "-days", "2", "-extfile", str(ext))
    return cert, key


class SecuredBroker(Broker):
    """Mosquitto with a plain anonymous listener (`port`), a TLS listener that wants a user name
    and password (`tls_port`) and a TLS listener that wants a client certificate (`mtls_port`)."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        if shutil.which("openssl") is None:
            pytest.skip("openssl is not installed (Debian package `openssl`): no certificates for the broker")
        passwd = shutil.which("mosquitto_passwd") or shutil.which("mosquitto_passwd", path="/usr/sbin:/usr/local/sbin")
        if passwd is None:
            pytest.skip("mosquitto_passwd is not installed (Debian package `mosquitto`)")
        certs = tmp / "certs"
        certs.mkdir()
        self.ca = make_ca(certs, "test-ca")
        self.other_ca = make_ca(certs, "other-ca")
        server = make_signed(certs, "broker", self.ca, "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth")
        self.client_cert = make_signed(certs, "linewatch-client", self.ca, "extendedKeyUsage=clientAuth")
        passwords = self.dir / "passwords"
        subprocess.run([passwd, "-b", "-c", str(passwords), USER, PASSWORD], check=True, capture_output=True,
                       timeout=60)
        passwords.chmod(0o600)
        self.tls_port, self.mtls_port = reserved_port(), reserved_port()
        tls = f"certfile {server[0]}\nkeyfile {server[1]}\ncafile {self.ca[0]}\n"
        self.conf.write_text(
            "per_listener_settings true\n"
            f"user {getpass.getuser()}\n"
            f"log_dest file {self.log_path}\n"
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
            f"listener {self.tls_port} 127.0.0.1\nallow_anonymous false\npassword_file {passwords}\n{tls}"
            f"listener {self.mtls_port} 127.0.0.1\nallow_anonymous false\nrequire_certificate true\n"
            f"use_identity_as_username true\n{tls}"
        )


@pytest.fixture(scope="module")
def secured_broker(tmp_path_factory):
    """One secured broker (and one set of certificates) for the module."""
    b = SecuredBroker(tmp_path_factory.mktemp("secured"))
    b.start()
    yield b
    b.stop()


@pytest.fixture
def secured(secured_broker):
    """The module's secured broker, running, with no retained message from an earlier test."""
    return secured_broker.running_and_clean()


def password_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "mqtt-password"
    path.write_text(text)
    path.chmod(0o600)
    return str(path)


def run_sink(sink: MqttSink, sub: Subscriber, seqs: range) -> list[str]:
    """Start the sink, publish verdicts `seqs` of cam0, wait until the subscriber has them all."""
    sink.start()
    for seq in seqs:
        sink.publish(verdict("cam0", seq))
    expected = [f"run1-{s}" for s in seqs]
    sub.wait(lambda: sorted(sub.ids()) == expected)
    return sub.ids()


def test_user_and_password_over_tls_reach_the_broker(secured, tmp_path):
    sub = Subscriber(secured.port, topic="linewatch/+/verdict")
    metrics = Metrics()
    sink = sink_for(secured.tls_port, metrics=metrics, username=USER, tls=True, tls_ca_file=str(secured.ca[0]),
                    password_file=password_file(tmp_path, PASSWORD + "\n"))  # the line end is not the password's
    try:
        assert sink.bound_url == f"mqtts://127.0.0.1:{secured.tls_port}"
        assert sorted(run_sink(sink, sub, range(3))) == ["run1-0", "run1-1", "run1-2"], secured.log()
        assert connected(metrics) == 1
    finally:
        sink.stop()
        sub.close()
    assert f"u'{USER}')" in secured.log()  # mosquitto logs the user name of each new client


def test_a_wrong_password_is_refused_logged_with_the_reason_and_nothing_is_lost_yet(secured, tmp_path):
    log = RecordingLog()
    metrics = Metrics()
    sink = sink_for(secured.tls_port, metrics=metrics, log=log, username=USER, tls=True, qos=1,
                    tls_ca_file=str(secured.ca[0]), password_file=password_file(tmp_path, "not the password"))
    sink.start()
    try:
        refused = log.wait_for("mqtt_connect_refused")
        assert refused is not None, log.lines
        assert "password" in refused["reason"].lower() or "authori" in refused["reason"].lower(), refused
        sink.publish(verdict("cam0", 0))
        assert sink.wait_idle(WAIT_S)
        assert sink.pending == 1 and sink.stats()["dropped"] == {}  # QoS 1: held until a login succeeds
        assert connected(metrics) == 0
    finally:
        sink.stop(timeout_s=0.0)  # no login, no acknowledgement: waiting longer changes nothing
    assert sink.stats()["dropped"] == {"unsent_at_stop": 1}  # counted, never silently gone


def test_a_broker_certificate_from_another_ca_is_not_trusted(secured, tmp_path):
    log = RecordingLog()
    metrics = Metrics()
    sink = sink_for(secured.tls_port, metrics=metrics, log=log, username=USER, tls=True,
                    tls_ca_file=str(secured.other_ca[0]), password_file=password_file(tmp_path, PASSWORD))
    sink.start()
    try:
        failed = log.wait_for("mqtt_connect_failed")
        assert failed is not None, log.lines
        assert "CERTIFICATE_VERIFY_FAILED" in failed["reason"], failed
        assert connected(metrics) == 0
    finally:
        sink.stop(timeout_s=0.5)


def test_a_broker_certificate_for_another_name_is_not_trusted(secured, tmp_path):
    """The broker's certificate names 127.0.0.1 only; reached as `localhost`, it is refused."""
    log = RecordingLog()
    sink = sink_for(secured.tls_port, log=log, host="localhost", username=USER, tls=True,
                    tls_ca_file=str(secured.ca[0]), password_file=password_file(tmp_path, PASSWORD))
    sink.start()
    try:
        failed = log.wait_for("mqtt_connect_failed")
        assert failed is not None, log.lines
        assert "Hostname mismatch" in failed["reason"] and "localhost" in failed["reason"], failed
        assert sink.stats()["connected"] is False  # (no CONNACK ever comes: nothing to wait for)
    finally:
        sink.stop(timeout_s=0.5)


def test_a_client_certificate_is_sent_where_the_broker_requires_one(secured):
    sub = Subscriber(secured.port, topic="linewatch/+/verdict")
    sink = sink_for(secured.mtls_port, tls=True, tls_ca_file=str(secured.ca[0]),
                    tls_cert_file=str(secured.client_cert[0]), tls_key_file=str(secured.client_cert[1]))
    try:
        assert sorted(run_sink(sink, sub, range(2))) == ["run1-0", "run1-1"], secured.log()
    finally:
        sink.stop()
        sub.close()
    without = RecordingLog()
    sink = sink_for(secured.mtls_port, log=without, tls=True, tls_ca_file=str(secured.ca[0]))
    sink.start()
    try:  # the broker ends the handshake: a failed connection attempt (TLS 1.2) or a drop right after it
        # (TLS 1.3, whose client is done before the broker checks); either way the line says why
        ended = without.wait_for_any("mqtt_connect_failed", "mqtt_disconnected")
        assert ended is not None and "certificate" in ended["reason"].lower(), without.lines
        assert sink.stats()["connected"] is False  # (no CONNACK ever comes: nothing to wait for)
    finally:
        sink.stop(timeout_s=0.5)


# ---------------------------------------------------------------- settings that cannot work (no broker)


@pytest.mark.parametrize("mqtt, named", [
    ({"password_file": "/etc/linewatch/mqtt-password"}, "password_file is set without a username"),
    ({"tls_ca_file": "/etc/ssl/ca.pem"}, "tls_ca_file set but tls is false"),
    ({"tls": True, "tls_cert_file": "/etc/linewatch/client.pem"}, "tls_cert_file and tls_key_file go together"),
    ({"username": ""}, "username"),
])
def test_half_configured_access_is_refused_naming_the_key(mqtt, named):
    with pytest.raises(ConfigError) as e:
        config_from_dict({"runtime": {"mqtt": mqtt}})
    assert "runtime.mqtt" in str(e.value) and named in str(e.value), str(e.value)


def test_unusable_password_and_certificate_files_are_start_up_errors_naming_the_file(tmp_path):
    missing = tmp_path / "no-such-file"
    empty = password_file(tmp_path, "\n")
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("not a certificate\n")
    cases = [
        ({"username": "u", "password_file": str(missing)}, f"password_file: cannot read {missing}"),
        ({"username": "u", "password_file": empty}, f"password_file: {empty} holds no password"),
        ({"tls": True, "tls_ca_file": str(not_pem)}, f"tls_ca_file: cannot use {not_pem}"),
        ({"tls": True, "tls_cert_file": str(not_pem), "tls_key_file": str(not_pem)},
         f"cannot use the client certificate {not_pem}"),
    ]
    for settings, message in cases:
        with pytest.raises(ConfigError, match="runtime.mqtt") as e:
            MqttSink(MqttConfig(enabled=True, **settings), log=RecordingLog(), metrics=Metrics())
        assert message in str(e.value), str(e.value)


def test_config_check_reads_the_password_and_tls_files(secured, tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(
        "runtime:\n  mqtt:\n    enabled: true\n    port: 8883\n    username: line-3\n"
        f"    password_file: {password_file(tmp_path, PASSWORD)}\n    tls: true\n    tls_ca_file: {secured.ca[0]}\n"
        f"    tls_cert_file: {secured.client_cert[0]}\n    tls_key_file: {secured.client_cert[1]}\n")
    lines = check_config(str(good), config_only=True)
    assert any(line.startswith("MQTT: the password file") for line in lines), lines
    assert any(line.startswith("MQTT TLS:") and "client certificate" in line for line in lines), lines
    bad = tmp_path / "bad.yaml"
    bad.write_text(good.read_text().replace(str(secured.ca[0]), str(tmp_path / "gone.pem")))
    with pytest.raises(ConfigError, match="tls_ca_file: cannot use"):
        check_config(str(bad), config_only=True)
