"""The template bank: everything SAM-LAD needs of the known-good images, computed once.

Per reference image z it holds the backbone features used for image-level retrieval (paper
3.3), the upsampled feature map, the object masks, and the object descriptors (3.4-3.5), so
a frame only runs its own image through the models. It is saved as one safetensors file
(no pickle) whose metadata carries a manifest (linewatch.detector.manifest, readable without
loading the bank): format version, linewatch version, the identity of every model and the
config hash. A bank built with another model or config is refused with a message that lists
what differs.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from linewatch.detector.calibration import Calibration
from linewatch.detector.manifest import (BANK_FORMAT_VERSION, COLOUR_MODES, IDENTITY_KEYS, TENSOR_NAMES, BankError,
                                         BankManifest, read_manifest)

__all__ = ["BANK_FORMAT_VERSION", "COLOUR_MODES", "IDENTITY_KEYS", "BankError", "BankManifest", "TemplateBank",
           "image_problem"]

_SEGMENTER_PREFIX = "segmenter."


@dataclass
class TemplateBank:
    """Tensors of Z reference images with up to N objects each.

    retrieval: (Z, D) float32, flattened backbone features (paper eq. 2).
    features: (Z, C, H', W') float16, upsampled feature maps.
    masks: (Z, N, H', W') float16, soft object masks at feature resolution (0 for padding).
    object_valid: (Z, N) bool. descriptors: (Z, N, C) float32, DCGA descriptors.
    boxes: (Z, N, 4) float32, object boxes x, y, w, h in working-resolution pixels.
    object_noise: (Z, N) float32, the peak of each object's anomaly map when its own image is
        judged against the rest of the bank (leave-one-out): what "normal" looks like for it.
    shapes: (Z, N, D) float32, outline descriptors (`linewatch.detector.shape`); D = 0 when the
        backend does not use them.
    textures: (Z, N, T) float32, grain statistics of each object (`ClassicFeatures.
        texture_channels` averaged over its mask); T = 0 when the backend does not use them.
    identities: (Z, N, I) float32, each object's identity descriptor (`linewatch.detector.identity.
        part_identities`, from its mask at the working size); I = 0 when part identity is off.
    segmenter_state: the backend's state fitted on the good images (`Backend.fit`: the classic
        background colour model; empty for samlad), saved under "segmenter." in the file.
    manifest: identity, calibration and provenance (`load` validates the file's through
        `BankManifest.from_dict`).
    """

    retrieval: torch.Tensor
    features: torch.Tensor
    masks: torch.Tensor
    object_valid: torch.Tensor
    descriptors: torch.Tensor
    boxes: torch.Tensor
    object_noise: torch.Tensor
    shapes: torch.Tensor
    textures: torch.Tensor
    identities: torch.Tensor
    manifest: BankManifest
    segmenter_state: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        z = self.retrieval.shape[0]
        for name in TENSOR_NAMES:
            if getattr(self, name).shape[0] != z:
                raise BankError(f"bank tensor {name} has {getattr(self, name).shape[0]} images, expected {z}")

    @property
    def size(self) -> int:
        return int(self.retrieval.shape[0])

    @property
    def bank_id(self) -> str:
        return self.manifest.bank_id

    @property
    def calibration(self) -> Calibration:
        return self.manifest.calibration

    @property
    def threshold(self) -> float:
        """The fail threshold (fail when score > threshold); inf until calibrated: nothing fails."""
        threshold = self.manifest.calibration.threshold
        return math.inf if threshold is None else float(threshold)

    def info(self) -> dict[str, Any]:
        """What `linewatch bank info` shows: the manifest without the good scores (calibration,
        score normalisation) and the good images' file names, then the tensors' sizes."""
        out = self.manifest.to_dict()
        out["calibration"].pop("scores")
        for stats in (out.get("score_normalisation") or {}).values():
            stats.pop("scores", None)
        out.pop("source_files")
        out["tensors"] = {
            "features": list(self.features.shape),
            "masks": list(self.masks.shape),
            "objects_per_image": self.object_valid.sum(1).tolist(),
        }
        return out

    def to(self, device: torch.device | str) -> "TemplateBank":
        moved = {name: getattr(self, name).to(device) for name in TENSOR_NAMES}
        return TemplateBank(**moved, manifest=self.manifest, segmenter_state=self.segmenter_state)

    def retrieve(self, query: torch.Tensor, k: int, exclude: torch.Tensor | None = None) -> torch.Tensor:
        """Indices (B, k) of the k nearest references by Euclidean distance (paper eq. 2).

        query: (B, D) flattened backbone features. exclude: (B,) reference index each query
        must not retrieve (itself, for leave-one-out calibration), or -1 for none.
        """
        if k > self.size - (0 if exclude is None else 1):
            raise BankError(f"k_references={k} but the bank holds only {self.size} images")
        distances = torch.cdist(query.float(), self.retrieval.float())  # (B, Z)
        if exclude is not None:
            rows = torch.arange(query.shape[0], device=query.device)
            keep = exclude >= 0
            distances[rows[keep], exclude[keep]] = float("inf")
        return distances.topk(k, dim=1, largest=False).indices

    def save(self, path: str | Path) -> None:
        path = Path(path)
        tensors = {name: getattr(self, name).contiguous().cpu() for name in TENSOR_NAMES}
        tensors["object_valid"] = tensors["object_valid"].to(torch.uint8)
        for key, value in self.segmenter_state.items():
            tensors[_SEGMENTER_PREFIX + key] = value.contiguous().cpu()
        manifest = dict(self.manifest.to_dict(), format_version=BANK_FORMAT_VERSION)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".part")
        save_file(tensors, str(tmp), metadata={"linewatch_manifest": json.dumps(manifest)})
        tmp.replace(path)  # a crash mid-write never leaves a half bank under the real name

    @classmethod
    def load(cls, path: str | Path) -> "TemplateBank":
        path = Path(path)
        manifest = read_manifest(path)  # a missing file, a corrupt header, another format: refused before any tensor
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise BankError(f"{path}: not a readable bank file (corrupt or not a linewatch bank): {e}") from None
        segmenter_state = {
            key[len(_SEGMENTER_PREFIX):]: value for key, value in tensors.items() if key.startswith(_SEGMENTER_PREFIX)
        }
        named = {name: tensors[name] for name in TENSOR_NAMES}
        named["object_valid"] = named["object_valid"].bool()
        try:
            return cls(**named, manifest=manifest, segmenter_state=segmenter_state)
        except BankError as e:
            raise BankError(f"{path}: {e}") from None

    def check_identity(self, expected: dict[str, str], source: str = "bank",
                       settings: dict[str, object] | None = None) -> None:
        """Refuse a bank built with other models or settings; the message lists the differences
        (with `settings`, the config's `fingerprint_settings()`, each setting that differs)."""
        have = self.manifest.identity
        keys = list(IDENTITY_KEYS) + sorted((set(have) | set(expected)) - set(IDENTITY_KEYS))  # a backend's own
        differences = [
            f"  {key}: bank has {have.get(key)!r}, this config has {expected.get(key)!r}"
            for key in keys
            if have.get(key) != expected.get(key)
        ]
        built = self.manifest.settings
        if differences and settings is not None:
            for key in sorted(set(built) | set(settings)):
                if built.get(key, "(absent)") != settings.get(key, "(absent)"):
                    differences.append(f"  detector.{key}: bank built with {built.get(key, '(absent)')!r}, "
                                        f"this config has {settings.get(key, '(absent)')!r}")
        if differences:
            raise BankError(
                f"{source}: this bank was built with another model or config; rebuild it with "
                "`linewatch bank build` or use the matching config:\n" + "\n".join(differences)
            )

    def check_settings(self, sample_window: tuple[int, int] | list[int], k_references: int) -> None:
        """Refuse a bank whose 16-bit images were scaled through another detector.sample_window,
        or that holds fewer good images than detector.k_references."""
        self.manifest.check_settings(sample_window, k_references, self.size)

    def check_calibration(self, target_false_reject_rate: float, source: str = "bank") -> None:
        """Refuse a bank whose threshold was calibrated for another false-reject target."""
        self.manifest.check_calibration(target_false_reject_rate, source)


def image_problem(image: Any, manifest: BankManifest | None) -> str | None:
    """Why a bank cannot judge `image`, or None when it can: not RGB uint8 (H, W, 3) or grey
    uint8 (H, W); grey for a colour bank or colour for a mono bank; another size than the good
    images (`manifest` None: no bank, any uint8 image)."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or not (
            image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        shape = getattr(image, "shape", None)
        dtype = getattr(image, "dtype", type(image).__name__)
        return f"expected an RGB uint8 image (H, W, 3) or a grey one (H, W), got shape {shape} dtype {dtype}"
    if manifest is None:
        return None
    mode = manifest.colour_mode
    if (image.ndim == 2) != (mode == "mono"):
        kind = "grey" if image.ndim == 2 else "colour"
        return (f"a {kind} image; the bank judges {'grey (mono)' if mode == 'mono' else 'colour'} "
                "images (built from " + ("grey" if mode == "mono" else "colour") + " good images)")
    expected = manifest.source_shape
    if expected and list(image.shape[:2]) != list(expected[:2]):
        return (f"image is {image.shape[1]}x{image.shape[0]} but the bank's good images are "
                f"{expected[1]}x{expected[0]}; use the same camera setup or rebuild the bank")
    return None
