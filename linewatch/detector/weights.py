"""Checkpoint files: the registry of official weights, hashing, locating, reading and downloading.

This is the only detector module that touches the file system or the network; the networks in
`backbone.py` and `upsample.py` receive state dicts read here.

Nothing here downloads implicitly: `resolve_checkpoint` only looks on disk and says how to get a
missing file; `download` is called explicitly (`linewatch models download --dir D`) and fails
within seconds when the network is unreachable.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import nn

__all__ = [
    "WeightsError",
    "CheckpointSpec",
    "CHECKPOINTS",
    "sha256_file",
    "verify_checkpoint",
    "resolve_checkpoint",
    "download",
    "read_state_dict",
    "state_fingerprint",
]


class WeightsError(Exception):
    """A checkpoint is missing, unreadable, corrupt, or does not fit the model it is loaded into."""


@dataclass(frozen=True)
class CheckpointSpec:
    """One official checkpoint file.

    Attributes:
        file_name: name of the file on disk (the last part of the URL, unless that would collide).
        url: official download location.
        sha256: hex digest if it was found in a public source, else None (never guessed).
        approx_mb: approximate size in megabytes, for user messages only.
        note: what the file is / where the checksum came from.
    """

    file_name: str
    url: str
    sha256: str | None
    approx_mb: int
    note: str = ""


_DINOV2 = "https://dl.fbaipublicfiles.com/dinov2"
_SAM = "https://dl.fbaipublicfiles.com/segment_anything"
_FEATUP = "https://marhamilresearch4.blob.core.windows.net/feature-upsampling-public/pretrained"

# SAM sha256 values: published identically in several independent public download scripts
# (e.g. micro-sam's `_CHECKSUMS` table and many Dockerfiles that run `sha256sum -c`); sizes of
# vit_b/vit_h in bytes were published alongside (375042383, 2564550879).
# The hex digits in SAM's file names (4b8939, 0b3195, 01ec64) are the first digits of the files'
# MD5 digests, not sha256, so they are not used as a check here.
# DINOv2 and FeatUp: no sha256 found in a source we could check -> None (size/readability and the
# strict key check at load time are the remaining guards).
CHECKPOINTS: dict[str, CheckpointSpec] = {
    "dinov2_vits14": CheckpointSpec(
        "dinov2_vits14_pretrain.pth", f"{_DINOV2}/dinov2_vits14/dinov2_vits14_pretrain.pth", None, 85,
        "DINOv2 ViT-S/14 backbone, Meta key layout"),
    "dinov2_vitb14": CheckpointSpec(
        "dinov2_vitb14_pretrain.pth", f"{_DINOV2}/dinov2_vitb14/dinov2_vitb14_pretrain.pth", None, 330,
        "DINOv2 ViT-B/14 backbone, Meta key layout"),
    "dinov2_vitl14": CheckpointSpec(
        "dinov2_vitl14_pretrain.pth", f"{_DINOV2}/dinov2_vitl14/dinov2_vitl14_pretrain.pth", None, 1160,
        "DINOv2 ViT-L/14 backbone, Meta key layout"),
    "dinov2_vits14_reg4": CheckpointSpec(
        "dinov2_vits14_reg4_pretrain.pth", f"{_DINOV2}/dinov2_vits14/dinov2_vits14_reg4_pretrain.pth", None, 85,
        "DINOv2 ViT-S/14 with 4 registers, Meta key layout"),
    "sam_vit_b": CheckpointSpec(
        "sam_vit_b_01ec64.pth", f"{_SAM}/sam_vit_b_01ec64.pth",
        "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912", 375, "SAM ViT-B"),
    "sam_vit_l": CheckpointSpec(
        "sam_vit_l_0b3195.pth", f"{_SAM}/sam_vit_l_0b3195.pth",
        "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622", 1250, "SAM ViT-L"),
    "sam_vit_h": CheckpointSpec(
        "sam_vit_h_4b8939.pth", f"{_SAM}/sam_vit_h_4b8939.pth",
        "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e", 2565, "SAM ViT-H"),
    "featup_dinov2_jbu": CheckpointSpec(
        "dinov2_jbu_stack_cocostuff.ckpt", f"{_FEATUP}/dinov2_jbu_stack_cocostuff.ckpt", None, 100,
        "FeatUp JBU stack for DINOv2 ViT-S/14, trained with ChannelNorm (use_norm=True); "
        "Lightning file, size not verified"),
    "featup_dinov2_jbu_no_norm": CheckpointSpec(
        "dinov2_jbu_stack_cocostuff_no_norm.ckpt", f"{_FEATUP}/no_norm/dinov2_jbu_stack_cocostuff.ckpt", None, 100,
        "FeatUp JBU stack for DINOv2 ViT-S/14 without ChannelNorm (use_norm=False); the server's file "
        "name equals the normed one's, so it is stored under a distinct local name; size not verified"),
}


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 digest of a file, read in chunks (constant memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_checkpoint(path: str | Path, expected_sha256: str | None) -> None:
    """Raise WeightsError unless the file exists and (when a digest is known) matches it.

    Args:
        path: the checkpoint file.
        expected_sha256: hex digest, or None to only check that the file exists.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"checkpoint {path} does not exist")
    if expected_sha256 is None:
        return
    actual = sha256_file(path)
    if actual.lower() != expected_sha256.lower():
        raise WeightsError(
            f"checkpoint {path} is corrupt or not the official file: sha256 expected "
            f"{expected_sha256.lower()}, actual {actual}; delete it and download it again")


def _missing_message(what: str, path: Path, weights_dir: Path) -> str:
    return (f"checkpoint {what} not found at {path}; run `linewatch models download --dir {weights_dir}` "
            f"on a machine with internet, or copy the file there")


def resolve_checkpoint(name_or_path: str | Path, weights_dir: str | Path) -> Path:
    """Path of a checkpoint given a registry name (e.g. "dinov2_vits14") or a file path.

    A registry name resolves to `weights_dir / file_name`; a relative path is tried as given and
    then under `weights_dir`. Only existence is checked (hashing GBs at every start is slow);
    `verify_checkpoint` does the full check.

    Raises:
        WeightsError: the file is absent, with instructions to get it.
    """
    weights_dir = Path(weights_dir)
    key = str(name_or_path)
    if key in CHECKPOINTS:
        path = weights_dir / CHECKPOINTS[key].file_name
        if path.is_file():
            return path
        raise WeightsError(_missing_message(key, path, weights_dir))
    path = Path(name_or_path).expanduser()
    for candidate in ([path] if path.is_absolute() else [path, weights_dir / path]):
        if candidate.is_file():
            return candidate
    shown = path if path.is_absolute() else weights_dir / path
    known = ", ".join(sorted(CHECKPOINTS))
    raise WeightsError(_missing_message(key, shown, weights_dir) + f" (registry names: {known})")


def _resolve_host(host: str, port: int, timeout_s: float) -> None:
    """getaddrinfo with a deadline: the socket timeout does not cover DNS, which can hang offline."""
    outcome: list[BaseException | None] = []

    def work() -> None:
        try:
            socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            outcome.append(None)
        except BaseException as exc:  # reported to the caller below
            outcome.append(exc)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if not outcome:
        raise TimeoutError(f"name lookup took longer than {timeout_s} s")
    if outcome[0] is not None:
        raise outcome[0]


def _download_one(spec: CheckpointSpec, dest: Path, timeout_s: float, progress: bool) -> None:
    """Stream `spec.url` to `dest` through `dest.part`, verifying sha256 when known."""
    parsed = urllib.parse.urlparse(spec.url)
    host = parsed.hostname or "?"
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    manual = f"copy {spec.file_name} (from {spec.url}) manually to {dest}"
    part = dest.with_name(dest.name + ".part")
    try:
        _resolve_host(host, port, timeout_s)
        # timeout= bounds the connect and every single read, so a silent server cannot hang us.
        with urllib.request.urlopen(spec.url, timeout=timeout_s) as response:
            total = int(response.headers.get("Content-Length") or 0)
            digest = hashlib.sha256()
            bar = None
            if progress:
                from tqdm import tqdm

                bar = tqdm(total=total or None, unit="B", unit_scale=True, desc=spec.file_name, file=sys.stderr)
            try:
                with open(part, "wb") as out:
                    while True:
                        chunk = response.read(1 << 20)
                        if not chunk:
                            break
                        out.write(chunk)
                        digest.update(chunk)
                        if bar is not None:
                            bar.update(len(chunk))
            finally:
                if bar is not None:
                    bar.close()
    except urllib.error.HTTPError as exc:
        part.unlink(missing_ok=True)
        raise WeightsError(f"download of {spec.url} failed: HTTP {exc.code} {exc.reason}; {manual}") from exc
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        part.unlink(missing_ok=True)
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        raise WeightsError(f"cannot reach {host}: {reason}; {manual}") from exc
    if total and part.stat().st_size != total:
        size = part.stat().st_size
        part.unlink(missing_ok=True)
        raise WeightsError(f"download of {spec.url} truncated: {size} of {total} bytes; {manual}")
    actual = digest.hexdigest()
    if spec.sha256 is not None and actual != spec.sha256.lower():
        part.unlink(missing_ok=True)
        raise WeightsError(
            f"downloaded {spec.file_name} has sha256 {actual}, expected {spec.sha256}; not kept")
    os.replace(part, dest)


def download(names: Iterable[str], dest_dir: str | Path, timeout_s: float = 10.0,
             progress: bool = True, registry: Mapping[str, CheckpointSpec] | None = None) -> list[Path]:
    """Download registry checkpoints into `dest_dir`; files already present and valid are kept.

    Args:
        names: registry names (keys of `CHECKPOINTS`).
        dest_dir: directory to write into (created if needed).
        timeout_s: bound on name lookup, connect, and each read; offline failure takes about this long.
        progress: show a tqdm bar on stderr.
        registry: alternative registry (tests); defaults to `CHECKPOINTS`.

    Returns:
        The paths of the checkpoints, in the order of `names`.

    Raises:
        WeightsError: unknown name, unreachable host, HTTP error, truncation or sha256 mismatch.
    """
    registry = CHECKPOINTS if registry is None else registry
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        if name not in registry:
            raise WeightsError(f"unknown checkpoint {name!r}; known: {', '.join(sorted(registry))}")
        spec = registry[name]
        dest = dest_dir / spec.file_name
        if dest.is_file():
            try:
                verify_checkpoint(dest, spec.sha256)
                paths.append(dest)
                continue
            except WeightsError:
                pass  # a bad existing copy is replaced
        _download_one(spec, dest, timeout_s, progress)
        paths.append(dest)
    return paths


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a flat name -> tensor dict from .safetensors, a plain torch state dict, or a
    Lightning/training checkpoint (its "state_dict" or "model" entry). Never unpickles code.

    Raises:
        WeightsError: absent, unreadable, or not a dict of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw = load_file(str(path), device="cpu")
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip/safetensors errors have many types
        raise WeightsError(
            f"cannot read checkpoint {path}: {type(exc).__name__}: {str(exc)[:300]}. If it holds "
            f"Python objects besides tensors, extract its state dict on a trusted machine and "
            f"save that (torch.save(ckpt['state_dict'], ...)).") from exc
    if isinstance(raw, Mapping):
        for wrapper in ("state_dict", "model"):
            if wrapper in raw and isinstance(raw[wrapper], Mapping):
                raw = raw[wrapper]
                break
    if not isinstance(raw, Mapping):
        raise WeightsError(f"checkpoint {path} holds a {type(raw).__name__}, not a state dict")
    state = {str(k): v for k, v in raw.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise WeightsError(f"checkpoint {path} holds no tensors")
    return state


def state_fingerprint(module: nn.Module) -> str:
    """Short hex fingerprint of a module's parameters and buffers (names, shapes, values).

    Used in `identity` strings so that a template bank built with other weights is refused.
    Hashes a strided sample of at most 4096 values per tensor, so it costs milliseconds even for
    ViT-L, yet any real retraining or another checkpoint changes it.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().reshape(-1).to("cpu", torch.float32)
        step = max(1, flat.numel() // 4096)
        digest.update(f"{name}:{tuple(tensor.shape)}".encode())
        digest.update(flat[::step].contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]
