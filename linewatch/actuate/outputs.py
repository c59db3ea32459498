"""Where a reject goes: the log (a dry run), a Modbus/TCP coil, an OPC UA boolean node.

Each output is driven by one thread (service.OutputWorker) and only ever called from it. The
calls block (a PLC round trip); they raise `Unreachable` when the PLC cannot be reached (the
worker counts it, retries with backoff and recovers by itself) and `AddressRefused` when the
PLC answers that the configured address or node does not exist (a configuration error: the
command exits 2 at start-up).

pymodbus and asyncua are the optional extra `linewatch[line]`; they are imported only by the
output that needs them.
"""

from __future__ import annotations

import inspect
from typing import Any

from linewatch.actuate.gate import Fire
from linewatch.config import ActuateConfig, ModbusOutputConfig, OpcUaOutputConfig


class OutputError(Exception):
    """The output could not do what it was asked."""


class Unreachable(OutputError):
    """No connection to the PLC (refused, timed out, dropped): retry later."""


class AddressRefused(OutputError):
    """The PLC refuses the configured coil or node: a configuration error."""


class MissingExtra(OutputError):
    """The library of this output is not installed."""


def _need(module: str, extra: str = "line"):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(f"the {module} package is not installed: pip install 'linewatch[{extra}]'") from None


class Output:
    """The interface; `name` is the metrics/log label."""

    name = "output"

    def connect(self) -> None:
        """Open the connection and check the configured addresses (raises Unreachable, AddressRefused)."""

    def set_reject(self, on: bool, fire: Fire | None = None) -> None:
        """Set (on=True, with the fire that asks for it) or clear the reject output."""

    def set_alarm(self, detail: str) -> None:
        """Raise the alarm output (it stays raised: the PLC or an operator clears it)."""

    def close(self) -> None:
        """Drop the connection (a later connect() opens a new one)."""


class LogOutput(Output):
    """A dry run: every reject and alarm as a log line, nothing else."""

    name = "log"

    def __init__(self, log: Any) -> None:
        self.log = log
        self.state = False

    def set_reject(self, on: bool, fire: Fire | None = None) -> None:
        self.state = on
        if on and fire is not None:
            self.log.info("dry_run_reject", camera=fire.camera, part=fire.part, verdict_id=fire.verdict_id,
                          reason=fire.reason, fire_at=fire.at)

    def set_alarm(self, detail: str) -> None:
        self.log.warning("dry_run_alarm", detail=detail)


# ---------------------------------------------------------------- Modbus/TCP


class ModbusOutput(Output):
    """The reject gate on a coil of a Modbus/TCP server (the PLC), pymodbus's synchronous client."""

    name = "modbus"

    def __init__(self, config: ModbusOutputConfig) -> None:
        self.config = config
        self.client: Any = None
        self._unit_kw = "device_id"

    def _where(self) -> str:
        return f"Modbus/TCP {self.config.host}:{self.config.port} unit {self.config.device_id}"

    def connect(self) -> None:
        client_mod = _need("pymodbus.client")
        self.close()
        client = client_mod.ModbusTcpClient(self.config.host, port=self.config.port,
                                            timeout=self.config.timeout_ms / 1000, retries=0)
        params = inspect.signature(client.write_coil).parameters
        self._unit_kw = "device_id" if "device_id" in params else "slave"
        if not client.connect():
            client.close()
            raise Unreachable(f"{self._where()}: cannot connect")
        self.client = client
        # the coils must exist: writing them off (the safe state) checks it
        self._write_coil(self.config.reject_coil, False, "reject_coil")
        if self.config.alarm_coil is not None:
            self._read_coil(self.config.alarm_coil, "alarm_coil")

    def _call(self, what: str, name: str, address: int, method: str, *args) -> Any:
        from pymodbus.exceptions import ModbusException

        if self.client is None:
            raise Unreachable(f"{self._where()}: not connected")
        try:
            reply = getattr(self.client, method)(address, *args, **{self._unit_kw: self.config.device_id})
        except ModbusException as e:  # connection refused, lost, timed out
            self.close()
            raise Unreachable(f"{self._where()}: {what} coil {address}: {e}") from None
        except OSError as e:
            self.close()
            raise Unreachable(f"{self._where()}: {what} coil {address}: {e}") from None
        if reply.isError():
            code = getattr(reply, "exception_code", None)
            if code == 2:  # ILLEGAL DATA ADDRESS
                raise AddressRefused(f"{self._where()} refuses coil {address} (modbus.{name}): illegal data address")
            raise Unreachable(f"{self._where()}: {what} coil {address} failed: {reply}")
        return reply

    def _write_coil(self, address: int, value: bool, name: str) -> None:
        self._call("writing", name, address, "write_coil", value)

    def _read_coil(self, address: int, name: str) -> None:
        self._call("reading", name, address, "read_coils")

    def set_reject(self, on: bool, fire: Fire | None = None) -> None:
        self._write_coil(self.config.reject_coil, on, "reject_coil")

    def set_alarm(self, detail: str) -> None:
        if self.config.alarm_coil is not None:
            self._write_coil(self.config.alarm_coil, True, "alarm_coil")

    def close(self) -> None:
        if self.client is not None:
            try:
                self.client.close()
            except Exception:  # noqa: BLE001 - closing a broken connection
                pass
            self.client = None


# ---------------------------------------------------------------- OPC UA


def read_password(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            password = f.readline().rstrip("\r\n")
    except OSError as e:
        raise OutputError(f"{path}: cannot read the password file: {e.strerror or e}") from None
    if not password:
        raise OutputError(f"{path}: the password file's first line is empty")
    return password


def certificate_uri(path: str) -> str | None:
    """The application URI (first URI subject alternative name) of a DER or PEM certificate."""
    from cryptography import x509

    try:
        data = open(path, "rb").read()
    except OSError as e:
        raise OutputError(f"{path}: cannot read the certificate: {e.strerror or e}") from None
    try:
        cert = x509.load_pem_x509_certificate(data) if data.startswith(b"-----") else x509.load_der_x509_certificate(data)
    except ValueError as e:
        raise OutputError(f"{path}: not a DER or PEM certificate: {e}") from None
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = names.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if uris else None


class OpcUaOutput(Output):
    """The reject gate on boolean nodes of an OPC UA server (the PLC's), asyncua's synchronous client.

    Security: user name and password (the password from a file), and/or a security policy with
    this client's certificate and key (`Basic256Sha256,SignAndEncrypt,cert,key[,server_cert]`)."""

    name = "opcua"

    def __init__(self, config: OpcUaOutputConfig) -> None:
        self.config = config
        self.client: Any = None
        self.nodes: dict[str, Any] = {}

    def connect(self) -> None:
        sync = _need("asyncua.sync")
        ua = _need("asyncua.ua")
        self.close()
        c = self.config
        client = sync.Client(c.url, timeout=c.timeout_ms / 1000)
        if c.username:
            client.set_user(c.username)
            if c.password_file:
                client.set_password(read_password(c.password_file))
        if c.certificate_file:  # the session's application URI must be the one the certificate names
            uri = certificate_uri(c.certificate_file)
            if uri:
                client.application_uri = uri
        if c.security_policy != "None":
            parts = [c.security_policy, c.security_mode, c.certificate_file, c.private_key_file]
            if c.server_certificate_file:
                parts.append(c.server_certificate_file)
            client.set_security_string(",".join(parts))
        try:
            client.connect()
        except ua.UaStatusCodeError as e:  # the server refused the session: bad user, bad certificate
            self._close(client)
            raise AddressRefused(f"OPC UA server {c.url} refuses the session: {e}") from None
        except ua.UaError as e:  # no endpoint with this security policy and mode, and the like
            self._close(client)
            raise AddressRefused(f"OPC UA server {c.url} refuses the session (security_policy {c.security_policy}, "
                                 f"security_mode {c.security_mode}): {e}") from None
        except (OSError, TimeoutError, ConnectionError) as e:
            self._close(client)
            raise Unreachable(f"OPC UA server {c.url}: cannot connect: {e or type(e).__name__}") from None
        except Exception as e:  # asyncua raises several kinds while connecting
            self._close(client)
            raise Unreachable(f"OPC UA server {c.url}: cannot connect: {type(e).__name__}: {e}") from None
        self.client = client
        self.nodes = {}
        for name in ("reject_node", "alarm_node", "verdict_id_node", "reason_node"):
            node_id = getattr(c, name)
            if node_id is None:
                continue
            try:
                node = client.get_node(node_id)
                node.read_value()  # the node must exist and be readable
            except ua.UaStatusCodeError as e:
                self.close()
                raise AddressRefused(f"OPC UA server {c.url} refuses node {node_id} (opcua.{name}): {e}") from None
            except ValueError as e:  # a malformed node id string
                self.close()
                raise AddressRefused(f"opcua.{name} {node_id!r} is not an OPC UA node id: {e}") from None
            except Exception as e:  # noqa: BLE001 - the connection broke
                self.close()
                raise Unreachable(f"OPC UA server {c.url}: reading {node_id}: {type(e).__name__}: {e}") from None
            self.nodes[name] = node
        self._write("reject_node", False)

    def _write(self, name: str, value: Any) -> None:
        ua = _need("asyncua.ua")
        node = self.nodes.get(name)
        if node is None:
            if self.client is None:
                raise Unreachable(f"OPC UA server {self.config.url}: not connected")
            return  # not configured
        kind = ua.VariantType.Boolean if isinstance(value, bool) else ua.VariantType.String
        try:
            node.write_value(ua.DataValue(ua.Variant(value, kind)))
        except ua.UaStatusCodeError as e:
            if "BadNodeIdUnknown" in str(e) or "BadNotWritable" in str(e) or "BadUserAccessDenied" in str(e):
                raise AddressRefused(f"OPC UA server {self.config.url} refuses writing {getattr(self.config, name)} "
                                     f"(opcua.{name}): {e}") from None
            self.close()
            raise Unreachable(f"OPC UA server {self.config.url}: writing {getattr(self.config, name)}: {e}") from None
        except Exception as e:  # noqa: BLE001 - connection lost, timed out
            self.close()
            raise Unreachable(f"OPC UA server {self.config.url}: writing {getattr(self.config, name)}: "
                              f"{type(e).__name__}: {e}") from None

    def set_reject(self, on: bool, fire: Fire | None = None) -> None:
        if on and fire is not None:  # the tags first, so the PLC reads them with the bit
            self._write("verdict_id_node", fire.verdict_id or "")  # "" for the watchdog's rejects
            self._write("reason_node", fire.reason)
        self._write("reject_node", on)

    def set_alarm(self, detail: str) -> None:
        self._write("alarm_node", True)

    @staticmethod
    def _close(client: Any) -> None:
        try:
            client.disconnect()
        except Exception:  # noqa: BLE001 - a half-open or broken session
            try:
                client.tloop.stop()  # asyncua.sync: the event loop thread the client started
            except Exception:  # noqa: BLE001
                pass

    def close(self) -> None:
        if self.client is not None:
            self._close(self.client)
            self.client = None
        self.nodes = {}


def build_output(config: ActuateConfig, log: Any) -> Output:
    if config.output == "modbus":
        return ModbusOutput(config.modbus)
    if config.output == "opcua":
        return OpcUaOutput(config.opcua)
    return LogOutput(log)
