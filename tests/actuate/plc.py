"""PLC stand-ins on loopback for the actuator tests: a pymodbus Modbus/TCP server and an asyncua
OPC UA server, each in a thread of this process, recording every write the actuator makes.

Both listen on a `reserved_port()` (tests/ports.py): neither reports a port it picked itself, and
the Modbus server must come back on the same port when a test restarts it.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from tests.ports import LOOPBACK, reserved_port


class ModbusPlc:
    """A Modbus/TCP server with `coils` coils (addresses 0..coils-1); `writes` lists every
    (address, value) of a write-coil request it received, in order (pymodbus's trace_pdu hook).
    stop() and start() again keep the port."""

    def __init__(self, coils: int = 32) -> None:
        self.port = reserved_port()
        self.coils = coils
        self.writes: list[tuple[int, bool]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def _context(self):
        from pymodbus.datastore import ModbusSequentialDataBlock, ModbusServerContext

        try:
            from pymodbus.datastore import ModbusDeviceContext as Device
        except ImportError:  # pymodbus < 3.9
            from pymodbus.datastore import ModbusSlaveContext as Device
        # a block starting at 1 holds wire addresses 0.. (pymodbus's device context adds 1)
        return ModbusServerContext(devices=Device(co=ModbusSequentialDataBlock(1, [False] * self.coils)), single=True)

    def _trace(self, sending: bool, pdu: Any) -> Any:
        from pymodbus.pdu.bit_message import WriteSingleCoilRequest

        if not sending and isinstance(pdu, WriteSingleCoilRequest):
            self.writes.append((pdu.address, bool(pdu.bits[0])))
        return pdu

    def start(self) -> None:
        from pymodbus.server import ModbusTcpServer

        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        failed: list[BaseException] = []

        async def serve() -> None:  # pymodbus makes its server inside the running loop
            self._server = ModbusTcpServer(self._context(), address=(LOOPBACK, self.port), trace_pdu=self._trace)
            await self._server.serve_forever(background=True)

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            try:
                self._loop.run_until_complete(serve())
            except BaseException as e:  # noqa: BLE001 - reported by start()
                failed.append(e)
                ready.set()
                return
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="modbus-plc", daemon=True)
        self._thread.start()
        assert ready.wait(10), "the Modbus server did not start"
        if failed:
            raise failed[0]

    def stop(self) -> None:
        if self._loop is None:
            return
        asyncio.run_coroutine_threadsafe(self._server.shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        self._loop = None

    def coil_writes(self, address: int) -> list[bool]:
        return [value for a, value in list(self.writes) if a == address]


class OpcUaPlc:
    """An OPC UA server with writable nodes ns=2;s=Linewatch.Reject (bool), .Alarm (bool),
    .VerdictId and .Reason (strings); `changes` lists every (node name, value) its data-change
    subscription reported (values written within one sampling interval may be merged), `writes`
    every (node name, value) a client wrote, exactly, in order (the server's PostWrite callback)."""

    NAMES = {"Reject": False, "Alarm": False, "VerdictId": "", "Reason": ""}

    def __init__(self, certificate: str | None = None, private_key: str | None = None,
                 users: dict[str, str] | None = None, port: int | None = None) -> None:
        """certificate/private_key: the server's own, and only Basic256Sha256 SignAndEncrypt
        offered; users: user name -> password, and anonymous sessions refused."""
        from asyncua import ua
        from asyncua.sync import Server

        self.port = port or reserved_port()
        self.url = f"opc.tcp://{LOOPBACK}:{self.port}/linewatch/"
        self.changes: list[tuple[str, Any]] = []
        self.writes: list[tuple[str, Any]] = []
        self.server = Server()
        # No ServerStatus.CurrentTime write once a second: no client here reads it, and stop()
        # would wait up to a second for that loop's sleep to end.
        self.server.disable_clock()
        self.server.set_endpoint(self.url)
        if certificate is not None:
            self.server.load_certificate(certificate)
            self.server.load_private_key(private_key)
            self.server.set_security_policy([ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt])
        if users is not None:
            from asyncua.crypto.permission_rules import User, UserRole

            class Passwords:
                def get_user(self, iserver, username=None, password=None, certificate=None):
                    if username is not None and users.get(username) == password:
                        return User(role=UserRole.User)
                    return None  # anonymous, or a wrong password: no session

            self.server.aio_obj.iserver.user_manager = Passwords()
            self.server.set_identity_tokens([ua.UserNameIdentityToken])
        idx = self.server.register_namespace("urn:linewatch:test-plc")
        assert idx == 2, idx
        folder = self.server.nodes.objects.add_object(ua.NodeId("Linewatch", idx), "Linewatch")
        self.nodes = {}
        for name, initial in self.NAMES.items():
            kind = ua.VariantType.Boolean if isinstance(initial, bool) else ua.VariantType.String
            node = folder.add_variable(ua.NodeId(f"Linewatch.{name}", idx), name, ua.Variant(initial, kind))
            node.set_writable()
            self.nodes[name] = node
        self._by_id = {node.nodeid: name for name, node in self.nodes.items()}

    def node_id(self, name: str) -> str:
        return f"ns=2;s=Linewatch.{name}"

    def _written(self, event: Any, _dispatcher: Any) -> None:
        for request, status in zip(event.request_params.NodesToWrite, event.response_params):
            if status.is_good():
                self.writes.append((self._by_id.get(request.NodeId, str(request.NodeId)), request.Value.Value.Value))

    def start(self) -> None:
        from asyncua.common.callback import CallbackType

        self.server.aio_obj.subscribe_server_callback(CallbackType.PostWrite, self._written)
        self.server.start()
        plc = self

        class Handler:
            def datachange_notification(self, node, value, data):  # asyncua's callback name
                plc.changes.append((plc._by_id.get(node.nodeid, str(node)), value))

        self._subscription = self.server.create_subscription(5, Handler())
        self._subscription.subscribe_data_change(list(self.nodes.values()))

    def value(self, name: str) -> Any:
        return self.nodes[name].read_value()

    def stop(self) -> None:
        self.server.stop()


def self_signed(folder, name: str, uri: str) -> tuple[str, str]:
    """A self-signed OPC UA application certificate (DER) and its key (PEM) for `uri`."""
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID
    from asyncua.crypto import cert_gen

    key = cert_gen.generate_private_key()
    cert = cert_gen.generate_self_signed_app_certificate(
        key, name, {}, [x509.UniformResourceIdentifier(uri), x509.DNSName("localhost")],
        [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH])
    from cryptography.hazmat.primitives.serialization import Encoding

    cert_path, key_path = folder / f"{name}.der", folder / f"{name}.pem"
    cert_path.write_bytes(cert.public_bytes(Encoding.DER))
    key_path.write_bytes(cert_gen.dump_private_key_as_pem(key))
    return str(cert_path), str(key_path)
