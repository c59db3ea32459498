"""Checkpoint registry, hashing, resolving, reading and downloading (with real local sockets)."""

from __future__ import annotations

import hashlib
import http.server
import re
import socket
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from linewatch.detector.weights import (
    CHECKPOINTS,
    CheckpointSpec,
    WeightsError,
    download,
    read_state_dict,
    resolve_checkpoint,
    sha256_file,
    state_fingerprint,
    verify_checkpoint,
)
from tests.ports import refused_port


def test_registry_is_consistent():
    for name in ("dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14", "sam_vit_b", "sam_vit_l", "sam_vit_h",
                 "featup_dinov2_jbu"):
        assert name in CHECKPOINTS
    for name, spec in CHECKPOINTS.items():
        assert spec.url.startswith("https://"), name
        assert spec.file_name.rsplit(".", 1)[0].startswith(spec.url.rsplit("/", 1)[1].rsplit(".", 1)[0]), name
        assert spec.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", spec.sha256), name
        assert spec.approx_mb > 0
    file_names = [spec.file_name for spec in CHECKPOINTS.values()]
    assert len(set(file_names)) == len(file_names)  # two entries must never share a local file
    assert CHECKPOINTS["sam_vit_b"].sha256.startswith("ec2df627")
    assert CHECKPOINTS["featup_dinov2_jbu"].url.endswith("/pretrained/dinov2_jbu_stack_cocostuff.ckpt")
    assert "/no_norm/" in CHECKPOINTS["featup_dinov2_jbu_no_norm"].url


def test_sha256_and_verify(tmp_path):
    path = tmp_path / "w.bin"
    data = b"linewatch" * 100_000
    path.write_bytes(data)
    good = hashlib.sha256(data).hexdigest()
    assert sha256_file(path) == good
    verify_checkpoint(path, good)
    verify_checkpoint(path, good.upper())
    verify_checkpoint(path, None)
    bad = "0" * 64
    with pytest.raises(WeightsError) as info:
        verify_checkpoint(path, bad)
    message = str(info.value)
    assert str(path) in message and bad in message and good in message
    with pytest.raises(WeightsError, match="does not exist"):
        verify_checkpoint(tmp_path / "absent.bin", None)


def test_resolve_checkpoint(tmp_path):
    with pytest.raises(WeightsError) as info:
        resolve_checkpoint("dinov2_vits14", tmp_path)
    message = str(info.value)
    assert "checkpoint dinov2_vits14 not found at" in message
    assert str(tmp_path / "dinov2_vits14_pretrain.pth") in message
    assert f"linewatch models download --dir {tmp_path}" in message and "copy the file there" in message

    (tmp_path / "dinov2_vits14_pretrain.pth").write_bytes(b"x")
    assert resolve_checkpoint("dinov2_vits14", tmp_path) == tmp_path / "dinov2_vits14_pretrain.pth"
    own = tmp_path / "sub" / "mine.pth"
    own.parent.mkdir()
    own.write_bytes(b"x")
    assert resolve_checkpoint(own, "/nonexistent") == own
    assert resolve_checkpoint("sub/mine.pth", tmp_path) == tmp_path / "sub" / "mine.pth"
    with pytest.raises(WeightsError, match="not found"):
        resolve_checkpoint("other.pth", tmp_path)


def _spec(url: str, data: bytes | None = None) -> dict[str, CheckpointSpec]:
    sha = hashlib.sha256(data).hexdigest() if data is not None else None
    return {"thing": CheckpointSpec("thing.pth", url, sha, 1)}


@pytest.mark.timeout(30)  # a hang fails the test; the download's own timeout is 2 s
def test_download_connection_refused_fails_fast(tmp_path):
    with refused_port() as port, pytest.raises(WeightsError) as info:  # bound, never listening: refused
        download(["thing"], tmp_path, timeout_s=2, progress=False, registry=_spec(f"http://127.0.0.1:{port}/thing.pth"))
    message = str(info.value)
    assert "cannot reach 127.0.0.1" in message and "manually" in message and str(tmp_path) in message
    assert list(tmp_path.iterdir()) == []  # no .part left behind


@pytest.mark.timeout(30)
def test_download_unreachable_discard_port_fails_fast(tmp_path):
    with pytest.raises(WeightsError, match="cannot reach 127.0.0.1"):
        download(["thing"], tmp_path, timeout_s=2, progress=False, registry=_spec("http://127.0.0.1:9/thing.pth"))


@pytest.mark.timeout(30)  # without the read timeout this would hang until pytest-timeout
def test_download_silent_server_times_out(tmp_path):
    """A server that accepts the connection but never answers must not hang the download."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)  # never accept()ed: the kernel completes the handshake, nobody answers
    try:
        port = server.getsockname()[1]
        with pytest.raises(WeightsError, match="cannot reach 127.0.0.1"):
            download(["thing"], tmp_path, timeout_s=0.1, progress=False,  # the read times out as a longer one would
                     registry=_spec(f"http://127.0.0.1:{port}/thing.pth"))
    finally:
        server.close()
    assert not (tmp_path / "thing.pth.part").exists()


class _Server:
    """Serves `payload` at /thing.pth and 404 elsewhere from a local thread."""

    def __init__(self, payload: bytes) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                if self.path != "/thing.pth":
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        # shutdown() waits for serve_forever's next look at its flag: every 20 ms, not the default 0.5 s
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def __enter__(self) -> "_Server":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_download_success_mismatch_and_404(tmp_path):
    payload = b"weights" * 50_000
    with _Server(payload) as server:
        (path,) = download(["thing"], tmp_path, timeout_s=5, progress=False,
                           registry=_spec(server.url + "/thing.pth", payload))
        assert path == tmp_path / "thing.pth" and path.read_bytes() == payload
        # present and valid: kept without downloading (server URL wrong on purpose)
        assert download(["thing"], tmp_path, progress=False, registry=_spec(server.url + "/gone", payload)) == [path]

        other = tmp_path / "other"
        wrong = {"thing": CheckpointSpec("thing.pth", server.url + "/thing.pth", "f" * 64, 1)}
        with pytest.raises(WeightsError, match="expected f+"):
            download(["thing"], other, timeout_s=5, progress=False, registry=wrong)
        assert list(other.iterdir()) == []

        with pytest.raises(WeightsError, match="HTTP 404"):
            download(["thing"], tmp_path / "x", timeout_s=5, progress=False,
                     registry=_spec(server.url + "/missing.pth"))
    with pytest.raises(WeightsError, match="unknown checkpoint"):
        download(["nope"], tmp_path, progress=False)


def test_read_state_dict_formats(tmp_path):
    tensors = {"a.weight": torch.ones(2, 3), "b": torch.zeros(4)}
    torch.save(tensors, tmp_path / "plain.pth")
    torch.save({"state_dict": tensors, "epoch": 3, "global_step": 10}, tmp_path / "lightning.ckpt")
    torch.save({"model": tensors, "args": {"lr": 0.1}}, tmp_path / "train.pth")
    save_file(tensors, str(tmp_path / "st.safetensors"))
    for name in ("plain.pth", "lightning.ckpt", "train.pth", "st.safetensors"):
        got = read_state_dict(tmp_path / name)
        assert set(got) == set(tensors) and torch.equal(got["a.weight"], tensors["a.weight"]), name

    torch.save({"obj": Path("x")}, tmp_path / "pickled.pth")  # arbitrary objects are refused
    with pytest.raises(WeightsError, match="pickled.pth"):
        read_state_dict(tmp_path / "pickled.pth")
    (tmp_path / "junk.pth").write_bytes(b"garbage")
    with pytest.raises(WeightsError, match="junk.pth"):
        read_state_dict(tmp_path / "junk.pth")
    torch.save({"note": "no tensors"}, tmp_path / "empty.pth")
    with pytest.raises(WeightsError, match="no tensors"):
        read_state_dict(tmp_path / "empty.pth")


def test_state_fingerprint_tracks_values_and_shapes():
    a = torch.nn.Linear(4, 3)
    fp = state_fingerprint(a)
    assert fp == state_fingerprint(a)
    with torch.no_grad():
        a.bias[0] += 1.0
    assert state_fingerprint(a) != fp
    assert state_fingerprint(torch.nn.Linear(4, 2)) != state_fingerprint(torch.nn.Linear(4, 3))
