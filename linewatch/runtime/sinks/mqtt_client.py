"""MQTT out: one JSON message per verdict to a broker, a verdict sink beside the ZeroMQ publisher.

`publish()` runs on the pipeline's output thread, which must never wait for a network: it only
puts the verdict on a bounded queue (full: this sink's copy is dropped and counted). The sink's
own thread, SETTLE_S after a verdict arrives (the verdict leaves on ZeroMQ first), encodes the
messages queued by then and hands them to paho-mqtt, whose network thread (`loop_start`)
connects in the background, reconnects by itself after a loss (waiting `reconnect_min_s`,
doubling up to `reconnect_max_s`) and holds QoS 1/2 messages in memory until the broker
acknowledges them, resending them after a reconnect, up to `max_queued` messages.

Payload: the verdict's wire-format header (`linewatch.wire.encode_verdict` without attachments),
the same JSON object a ZeroMQ subscriber gets: no image, heatmap or overlay bytes.

Broker access: `username` with the password read from `password_file` at start (the config
holds none), and TLS (`tls`) checking the broker's certificate and host name, with a client
certificate where the broker asks for one. MQTT sends the password in the clear without TLS.
A broker that refuses the login is logged (mqtt_connect_refused, with its reason) and tried
again as after any loss; `linewatch_mqtt_connected` stays 0 meanwhile.

Topics: `topic` with {camera} replaced by the camera id as one topic level (`camera_topic_level`).
Verdicts whose value is in `retain` are published again, retained, on `last_topic`, never on
`topic`: the broker gives a topic's retained message to every new subscriber first, and an
actuator subscribed to `topic` would then get an old fail again at each reconnect.

What reaches the broker (QoS 1/2): every verdict the sink took, while this process runs, unless
paho's queue is full (`max_queued`) or `stop()` runs out of time with the broker away; a resend
after a reconnect can arrive twice (the verdict `id` tells). QoS 0: nothing is held; verdicts
published while disconnected are dropped. Drops are counted in
`linewatch_sink_dropped_total{sink="mqtt", reason}` (one per MQTT message; a verdict dropped from
the sink's own queue counts once).
"""

from __future__ import annotations

import os
import queue
import socket
import ssl
import sys
import threading
import time
from typing import Any

import paho.mqtt.client as paho
import structlog
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from linewatch import wire
from linewatch.config import ConfigError, MqttConfig
from linewatch.runtime.ops.logs import RateLimiter
from linewatch.runtime.ops.metrics import Metrics
from linewatch.wire import Verdict

KEEPALIVE_S = 30  # a broker that vanishes without closing the connection is noticed within about 2x this (paho's ping)
LOG_INTERVAL_S = 30.0  # at most one connected / disconnected / connect-failed line per interval each
SINK = "mqtt"  # the `sink` label of linewatch_sink_dropped_total
SETTLE_S = 0.002  # the sink's thread starts this long after a verdict arrives (see _run)
SOCKET_ERRORS = ("failed to receive on socket", "timeout on socket")  # paho's log lines before a loss

_STOP = object()  # the worker's end-of-queue marker
_ESCAPES = str.maketrans({c: f"%{ord(c):02X}" for c in "%/+#$"})


def camera_topic_level(camera: str) -> str:
    """The camera id as exactly one MQTT topic level.

    Camera ids may hold any printable character (`wire.check_camera_id`), but in a topic `/`
    separates levels, `+` and `#` are wildcards a message may not carry, and a leading `$` marks
    broker topics ($SYS) that a `#` subscription does not match. These and `%` itself are
    percent-encoded ("line/1" -> "line%2F1"), so two cameras never share a topic and
    `urllib.parse.unquote` gives the id back.
    """
    return camera.translate(_ESCAPES)


def verdict_topic(template: str, camera: str) -> str:
    """`template` with {camera} replaced (only that: other braces stay as written)."""
    return template.replace("{camera}", camera_topic_level(camera))


def read_password(path: str) -> str:
    """The first line of `path` (without its line end). ConfigError naming the file when it
    cannot be read or holds no password."""
    try:
        with open(path, encoding="utf-8") as f:
            password = f.readline().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"runtime.mqtt.password_file: cannot read {path}: {e}") from None
    if not password:
        raise ConfigError(f"runtime.mqtt.password_file: {path} holds no password (its first line is empty)")
    return password


def client_tls_context(config: MqttConfig) -> ssl.SSLContext:
    """TLS to the broker: its certificate checked against tls_ca_file (or the system's CAs) and
    its host name against `host`; the client certificate when one is set. ConfigError naming
    the file that cannot be used."""
    try:
        context = ssl.create_default_context(cafile=config.tls_ca_file)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"runtime.mqtt.tls_ca_file: cannot use {config.tls_ca_file} as CA certificates: {e}") from None
    if config.tls_cert_file:
        try:
            context.load_cert_chain(config.tls_cert_file, config.tls_key_file)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"runtime.mqtt: cannot use the client certificate {config.tls_cert_file} with key "
                              f"{config.tls_key_file}: {e}") from None
    return context


def verdict_payload(verdict: Verdict) -> bytes:
    """The message body: the verdict's wire-format JSON header, without attachments."""
    return wire.encode_verdict(verdict)[1]


class MqttSink:
    """Publishes every verdict to an MQTT broker (the daemon's `mqtt` sink); never blocks the caller."""

    def __init__(self, config: MqttConfig, log: Any = None, metrics: Metrics | None = None) -> None:
        """Reads the password file and the TLS files now: ConfigError naming the one at fault."""
        self._config = config
        self._log = log if log is not None else structlog.get_logger("linewatch.mqtt")
        self._metrics = metrics if metrics is not None else Metrics()
        # SimpleQueue: its put takes no Python lock, so the verdict path never waits for a lock
        # this sink's thread holds (while that thread waits for the GIL, say).
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="mqtt", daemon=True)
        self._state = threading.Condition()  # guards the counters and `_connected` below
        # verdicts taken by publish() (written by the one thread that publishes, the pipeline's
        # output thread) and handed to paho or dropped by this sink's thread (under _state)
        self._taken = 0
        self._handed_n = 0
        self._unacked = 0  # QoS 1/2 messages paho holds until the broker acknowledges them
        self._connected = False
        self._socket_error: str | None = None  # paho's last socket error (its network thread only)
        self._stopped = False
        self._sent = 0  # messages the broker acknowledged (QoS 0: written to the socket)
        self._dropped: dict[str, int] = {}
        self._log_limit = RateLimiter(LOG_INTERVAL_S)
        self.bound_url = f"{'mqtts' if config.tls else 'mqtt'}://{config.host}:{config.port}"
        client_id = config.client_id or f"linewatch-{socket.gethostname()}-{os.getpid()}"
        self._client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv311)
        if config.username:
            self._client.username_pw_set(config.username,
                                         read_password(config.password_file) if config.password_file else None)
        if config.tls:
            self._client.tls_set_context(client_tls_context(config))
        self._client.max_queued_messages_set(config.max_queued)
        # One message in flight at a time: the broker gets them in publish order, also when paho
        # sends the held ones at a (re)connect while this sink hands it new ones. With several in
        # flight an older fail could reach the broker after a newer timeout and become the
        # retained `last` state (seen once in tests/runtime/test_mqtt.py's late-subscriber test).
        self._client.max_inflight_messages_set(1)
        self._client.reconnect_delay_set(config.reconnect_min_s, config.reconnect_max_s)  # floats: paho computes with them (its hint says int)
        self._client.suppress_exceptions = True  # a failing callback is logged (on_log), the network thread lives on
        self._client.on_connect = self._on_connect
        self._client.on_connect_fail = self._on_connect_fail
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish
        self._client.on_log = self._on_paho_log

    # ------------------------------------------------------------------ what its sink adapter calls

    def start(self) -> None:
        """Start connecting in the background and sending; returns at once, broker or not."""
        c = self._config
        self._metrics.mqtt_connected.set(0)
        self._log.info("mqtt_connecting", broker=self.bound_url, topic=c.topic, last_topic=c.last_topic, qos=c.qos,
                       retain=c.retain, note="connects in the background; until then QoS 1/2 verdicts are held "
                       "(up to max_queued), QoS 0 verdicts are dropped")
        self._client.connect_async(c.host, c.port, keepalive=KEEPALIVE_S)
        self._client.loop_start()
        self._thread.start()

    def publish(self, verdict: Verdict) -> None:
        """Queue one verdict for the broker; never blocks (queue full: dropped and counted)."""
        if self._stopped:
            self._count_drop("stopped")
            return
        if self._queue.qsize() >= self._config.queue_size:
            self._count_drop("queue_full")
            return
        self._taken += 1
        self._queue.put(verdict)

    def stop(self, timeout_s: float = 2.0) -> None:
        """Send what is queued and wait for the broker's acknowledgements, up to `timeout_s`; then
        disconnect. What is still unsent is counted as dropped ("unsent_at_stop"). Idempotent.
        A connection attempt under way (DNS, TCP connect) can add up to paho's connect timeout;
        with the broker away, paho's network thread ends after the current second of its
        reconnect wait (it sleeps in steps of at most 1 s)."""
        with self._state:
            if self._stopped:
                return
            self._stopped = True
        if self._thread.ident is None:  # never started
            return
        deadline = time.monotonic() + timeout_s
        self._queue.put(_STOP)
        self._thread.join(max(0.0, deadline - time.monotonic()))
        with self._state:
            self._state.wait_for(lambda: self._unacked == 0, max(0.0, deadline - time.monotonic()))
            unsent = self._unhanded() + self._unacked
        if unsent:
            self._count_drop("unsent_at_stop", unsent)
            self._log.error("mqtt_unsent_at_stop", count=unsent, broker=self.bound_url,
                            connected=self._connected, timeout_s=timeout_s)
        self._client.disconnect()
        self._client.loop_stop()
        self._metrics.mqtt_connected.set(0)

    def dead_threads(self) -> list[str]:
        """The sink's thread, if it died while running."""
        if self._thread.ident is None or self._stopped:
            return []
        return [] if self._thread.is_alive() else [self._thread.name]

    def stats(self) -> dict[str, Any]:
        """Messages acknowledged, verdicts/messages not yet sent, drops by reason, connection."""
        with self._state:
            return {"sent": self._sent, "pending": self._unhanded() + self._unacked, "dropped": dict(self._dropped),
                    "connected": self._connected}

    @property
    def pending(self) -> int:
        """Verdicts not yet handed to paho plus messages paho holds unacknowledged."""
        with self._state:
            return self._unhanded() + self._unacked

    # ------------------------------------------------------------------ waiting (tests, shutdown)

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until every verdict taken so far has been handed to paho (or dropped)."""
        with self._state:
            return self._state.wait_for(lambda: self._unhanded() == 0, timeout_s)

    def wait_connected(self, connected: bool, timeout_s: float) -> bool:
        """Wait until the connection to the broker is up (`connected`) or down."""
        with self._state:
            return self._state.wait_for(lambda: self._connected == connected, timeout_s)

    # ------------------------------------------------------------------ the sink's thread

    def _run(self) -> None:
        while True:
            verdict = self._queue.get()
            # The verdict is still on its way out (ZeroMQ's I/O thread, the subscriber): let it
            # leave before this thread, paho's and the broker take CPU, then send what came
            # meanwhile. runtime_bench (c') measures it: "mqtt" against "mqtt, no settle".
            time.sleep(SETTLE_S)
            while verdict is not None:
                if verdict is _STOP:
                    return
                self._send_counted(verdict)
                try:
                    verdict = self._queue.get_nowait()
                except queue.Empty:
                    verdict = None

    def _send_counted(self, verdict: Verdict) -> None:
        try:
            self._send(verdict)
        except Exception as e:  # noqa: BLE001 - one bad verdict must not end the sink
            self._count_drop("failed")
            self._log.error("mqtt_send_failed", camera=verdict.camera, frame_id=verdict.frame_id, error=repr(e))
        finally:
            self._handed()

    def _send(self, verdict: Verdict) -> None:
        c = self._config
        payload = verdict_payload(verdict)
        self._hand(verdict_topic(c.topic, verdict.camera), payload, retain=False)
        if verdict.verdict in c.retain:
            self._hand(verdict_topic(c.last_topic, verdict.camera), payload, retain=True)

    def _hand(self, topic: str, payload: bytes, retain: bool) -> None:
        """Give one message to paho; count it when paho will not send it."""
        qos = self._config.qos
        if qos:
            with self._state:
                self._unacked += 1  # before publish: the acknowledgement may come before it returns
        rc = self._client.publish(topic, payload, qos=qos, retain=retain).rc
        if rc == MQTTErrorCode.MQTT_ERR_SUCCESS or (qos and rc == MQTTErrorCode.MQTT_ERR_NO_CONN):
            return  # sent, or (QoS 1/2) held by paho until the broker is back
        if qos:
            with self._state:
                self._unacked -= 1
                self._state.notify_all()
        reason = {MQTTErrorCode.MQTT_ERR_QUEUE_SIZE: "broker_queue_full",
                  MQTTErrorCode.MQTT_ERR_NO_CONN: "disconnected"}.get(rc, "publish_failed")
        self._count_drop(reason)
        if reason == "publish_failed":
            self._log_limited("publish_failed", "error", "mqtt_publish_failed", topic=topic, error=paho.error_string(rc))

    def _handed(self) -> None:
        with self._state:
            self._handed_n += 1
            self._state.notify_all()

    def _unhanded(self) -> int:
        """Verdicts taken and not yet handed to paho (or dropped)."""
        return self._taken - self._handed_n

    def _count_drop(self, reason: str, n: int = 1) -> None:
        self._metrics.sink_dropped.labels(sink=SINK, reason=reason).inc(n)
        with self._state:
            self._dropped[reason] = self._dropped.get(reason, 0) + n

    def _log_limited(self, key: str, level: str, event: str, **fields: Any) -> None:
        held_back = self._log_limit.allow(key, time.monotonic())
        if held_back is not None:
            getattr(self._log, level)(event, **fields, **({"held_back": held_back} if held_back else {}))

    # ------------------------------------------------------------------ paho's network thread

    def _set_connected(self, connected: bool) -> None:
        with self._state:
            self._connected = connected
            self._state.notify_all()
        self._metrics.mqtt_connected.set(1 if connected else 0)

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            self._log_limited("connect_failed", "error", "mqtt_connect_refused", broker=self.bound_url,
                              reason=str(reason_code))
            return
        self._set_connected(True)
        self._log_limited("connected", "info", "mqtt_connected", broker=self.bound_url)

    def _on_connect_fail(self, client: Any, userdata: Any) -> None:
        # paho calls this from the `except OSError` around its connection attempt: the error is at hand
        error = sys.exc_info()[1]
        if isinstance(error, socket.gaierror):
            reason = f"cannot resolve host name {self._config.host!r}: {error}"
        elif error is not None:
            reason = f"cannot connect: {error}"
        else:
            reason = "cannot connect"
        self._log_limited("connect_failed", "warning", "mqtt_connect_failed", broker=self.bound_url, reason=reason,
                          retry=f"every {self._config.reconnect_min_s:g}..{self._config.reconnect_max_s:g} s")

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        self._set_connected(False)
        socket_error, self._socket_error = self._socket_error, None
        if self._stopped:
            self._log.info("mqtt_disconnected", broker=self.bound_url, reason="stopping")
        else:  # paho's reason code is "Unspecified error" for a lost socket: the socket's error says why
            reason = str(reason_code) + (f" ({socket_error})" if socket_error else "")
            self._log_limited("disconnected", "warning", "mqtt_disconnected", broker=self.bound_url,
                              reason=reason, note="reconnecting by itself")

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        with self._state:
            self._sent += 1
            if self._config.qos:
                self._unacked -= 1
                self._state.notify_all()

    def _on_paho_log(self, client: Any, userdata: Any, level: int, message: str) -> None:
        # An exception in one of the callbacks above is logged; a socket error is kept for the
        # disconnect line; paho's other ERR lines are routine (e.g. "Client is not connected" at
        # every reconnect attempt) and the callbacks report those.
        if level == paho.MQTT_LOG_ERR and message.startswith("Caught exception"):
            self._log_limited("callback_failed", "error", "mqtt_callback_failed", error=message)
        elif level == paho.MQTT_LOG_ERR and message.startswith(SOCKET_ERRORS):
            self._socket_error = message  # (on this network thread) for the disconnect that follows
