"""Verdict -> PLC latency of `linewatch actuate`, to loopback PLC servers (issue 21).

A verdict is published on a ZeroMQ PUB socket; the actuator (its three threads: receive, decide,
output) takes it, decides a reject due at once (capture_ts is set travel_ms in the past), and
writes the reject to the PLC: a Modbus/TCP coil (pymodbus server) or an OPC UA node plus its two
string tags (asyncua server), both the test suite's loopback servers (tests/actuate/plc.py). The
time measured runs from just before the verdict is sent to the moment the PLC has answered the
reject write (both request/response protocols: the write has reached the PLC then).

    PYTHONPATH=. python benchmarks/plc_latency.py [--verdicts 300] [--rate 20]

Prints p50 / p99 / max per output. One verdict in flight at a time is not the point: they come at
`--rate` per second, each a reject, with a pulse shorter than their spacing.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import zmq

from linewatch import wire
from linewatch.actuate.outputs import build_output
from linewatch.actuate.service import Actuator
from linewatch.config import ActuateConfig
from linewatch.wire import Verdict
from tests.actuate.plc import ModbusPlc, OpcUaPlc
from tests.logs import ListLog

TRAVEL_MS = 50.0


def measure(output_name: str, plc_settings: dict, verdicts: int, rate: float) -> np.ndarray:
    context = zmq.Context()
    pub = context.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind("tcp://127.0.0.1:0")
    config = ActuateConfig.model_validate({
        "verdicts": pub.getsockopt_string(zmq.LAST_ENDPOINT), "output": output_name, output_name: plc_settings,
        "cameras": {"cam0": {"travel_ms": TRAVEL_MS, "window_ms": 60_000}}, "pulse_ms": 0.4 * 1000 / rate})
    log = ListLog()
    output = build_output(config, log)
    answered: dict[str, float] = {}
    write = output.set_reject

    def timed_set_reject(on, fire=None):  # the write returns once the PLC has answered it
        write(on, fire)
        if on and fire is not None:
            answered[fire.verdict_id] = time.perf_counter()

    output.set_reject = timed_set_reject
    actuator = Actuator(config, output, log)
    actuator.check_output()
    actuator.start()
    try:
        probe = wire.encode_verdict(Verdict(camera="probe", frame_id=0, verdict="pass", capture_ts=0.0))
        while actuator.received == 0:  # PUB/SUB: wait until the subscription has arrived
            pub.send_multipart(probe)
            time.sleep(0.05)
        sent: dict[str, float] = {}
        start = time.perf_counter()
        for i in range(verdicts):
            time.sleep(max(0.0, start + i / rate - time.perf_counter()))
            v = Verdict(camera="cam0", frame_id=i, verdict="fail", capture_ts=time.time() - TRAVEL_MS / 1000,
                        run_id="bench", seq=i)
            message = wire.encode_verdict(v)
            sent[v.id] = time.perf_counter()
            pub.send_multipart(message)
        end = time.perf_counter() + 10
        while len(answered) < verdicts and time.perf_counter() < end:
            time.sleep(0.05)
    finally:
        actuator.stop()
        pub.close(0)
        context.term()
    missing = verdicts - len(answered)
    if missing:
        print(f"{output_name}: {missing} of {verdicts} rejects never reached the PLC")
    return np.array([answered[k] - sent[k] for k in sent if k in answered])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--verdicts", type=int, default=300)
    p.add_argument("--rate", type=float, default=20.0, help="verdicts per second")
    args = p.parse_args()
    modbus = ModbusPlc(coils=8)
    modbus.start()
    opcua = OpcUaPlc()
    opcua.start()
    try:
        runs = {
            "modbus": ("modbus", {"host": "127.0.0.1", "port": modbus.port, "reject_coil": 0}),
            "opcua (bit + 2 tags)": ("opcua", {"url": opcua.url, "reject_node": opcua.node_id("Reject"),
                                               "verdict_id_node": opcua.node_id("VerdictId"),
                                               "reason_node": opcua.node_id("Reason")}),
        }
        print(f"{args.verdicts} reject verdicts at {args.rate:g}/s, loopback, verdict sent -> PLC answered the write")
        for label, (name, settings) in runs.items():
            ms = measure(name, settings, args.verdicts, args.rate) * 1000
            print(f"  {label:22s} p50 {np.percentile(ms, 50):6.2f} ms  p99 {np.percentile(ms, 99):6.2f} ms  "
                  f"max {ms.max():6.2f} ms  ({len(ms)} writes)")
    finally:
        modbus.stop()
        opcua.stop()


if __name__ == "__main__":
    main()
