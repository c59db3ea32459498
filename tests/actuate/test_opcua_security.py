"""The OPC UA output's security options against an asyncua server that demands them: user name
and password (from a file), Basic256Sha256 SignAndEncrypt with this client's certificate."""

from __future__ import annotations

import pytest

pytest.importorskip("asyncua", reason="the `line` extra (asyncua): pip install -e '.[line]'")

from linewatch.actuate.gate import Fire  # noqa: E402
from linewatch.actuate.outputs import AddressRefused, OpcUaOutput  # noqa: E402
from linewatch.config import OpcUaOutputConfig  # noqa: E402
from tests.actuate.plc import OpcUaPlc, self_signed  # noqa: E402
from tests.waiting import wait_until  # noqa: E402


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    folder = tmp_path_factory.mktemp("opcua-pki")
    server_cert, server_key = self_signed(folder, "plc", "urn:linewatch:test-plc")
    plc = OpcUaPlc(certificate=server_cert, private_key=server_key, users={"gate": "s3cret"})
    plc.start()
    client_cert, client_key = self_signed(folder, "actuator", "urn:linewatch:actuate")
    (folder / "password").write_text("s3cret\n")
    (folder / "wrong").write_text("guess\n")
    yield plc, folder, client_cert, client_key
    plc.stop()


def output(plc: OpcUaPlc, folder, client_cert: str, client_key: str, password: str = "password") -> OpcUaOutput:
    return OpcUaOutput(OpcUaOutputConfig(
        url=plc.url, reject_node=plc.node_id("Reject"), verdict_id_node=plc.node_id("VerdictId"),
        username="gate", password_file=str(folder / password), security_policy="Basic256Sha256",
        security_mode="SignAndEncrypt", certificate_file=client_cert, private_key_file=client_key))


def test_signed_encrypted_session_with_user_and_password_writes_the_bit(secured):
    plc, folder, client_cert, client_key = secured
    out = output(plc, folder, client_cert, client_key)
    out.connect()
    try:
        out.set_reject(True, Fire(1.0, "cam0", "cam0/1", "run-1", "fail"))
        assert wait_until(lambda: plc.value("Reject") is True and plc.value("VerdictId") == "run-1", 10)
        out.set_reject(False)
        assert wait_until(lambda: plc.value("Reject") is False, 10)
    finally:
        out.close()


def test_a_wrong_password_is_refused_not_retried(secured):
    plc, folder, client_cert, client_key = secured
    out = output(plc, folder, client_cert, client_key, password="wrong")
    with pytest.raises(AddressRefused, match="refuses the session"):
        out.connect()
    out.close()


def test_no_security_against_a_secured_server_is_a_config_error(secured):
    plc, *_ = secured
    out = OpcUaOutput(OpcUaOutputConfig(url=plc.url, reject_node=plc.node_id("Reject")))
    with pytest.raises(AddressRefused, match="security_policy None"):
        out.connect()
    out.close()
