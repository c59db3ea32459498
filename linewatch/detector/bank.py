"""The template bank: everything SAM-LAD needs of the known-good images, computed once.

Per reference image z it holds the backbone features used for image-level retrieval (paper
3.3), the upsampled feature map, the object masks, and the object descriptors (3.4-3.5), so
a frame only runs its own image through the models. It is saved as one safetensors file
(no pickle) whose metadata carries a manifest: format version, linewatch version, the
identity of every model and the config hash. A bank built with another model or config is
refused with a message that lists what differs.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from linewatch.detector.calibration import Calibration

BANK_FORMAT_VERSION = 2  # 2: part outlines and grain statistics (shapes, textures)
COLOUR_MODES = ("colour", "mono")  # BankManifest.colour_mode
IDENTITY_KEYS = ("backend", "backbone", "upsampler", "segmenter", "config_hash")
_TENSOR_NAMES = ("retrieval", "features", "masks", "object_valid", "descriptors", "boxes", "object_noise", "shapes",
                 "textures")
_SEGMENTER_PREFIX = "segmenter."


class BankError(Exception):
    """A bank file that cannot be used; the message names the file and the problem."""


@dataclass
class BankManifest:
    """The bank's manifest as a typed record: identity, provenance and calibration.

    identity: Inspector.identity() of the models and config that built it. settings: the
    config's fingerprint_settings(), to name a difference. source / source_files /
    source_shape: the good images (folder, file names, (H, W, 3), or (H, W) when grey).
    calibration: the threshold and what it promises (`Calibration`; threshold None until
    calibrated). score_normalisation:
    each branch's spread on good images, with the good scores it was measured on (fused score
    only). colour_mode: "colour" (RGB good images; the frames must be colour) or "mono" (grey
    good images, grey frames). sample_window: the [low, high] through which 16-bit images were
    scaled to 8 bits (detector.sample_window; frames are scaled through the same). The fields
    with a default are absent in banks built before them: those banks are colour banks read
    through the full 16-bit window, and a None is left out of the file. `to_dict` / `from_dict`
    are the JSON form the bank file carries; `from_dict` checks every key against these
    fields' types.
    """

    linewatch_version: str
    identity: dict[str, str]
    settings: dict[str, Any]
    images: int
    source: str
    source_files: list[str]
    source_shape: list[int]
    image_size: int
    created: str
    calibration: Calibration
    bank_id: str
    score_normalisation: dict[str, Any] | None = None
    build_seconds: float | None = None
    colour_mode: str = "colour"
    sample_window: list[int] = field(default_factory=lambda: [0, 65535])
    format_version: int = BANK_FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (a copy); the optional keys that are None are left out."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.name in _OPTIONAL_KEYS:
                continue
            out[f.name] = value.to_manifest() if isinstance(value, Calibration) else copy.deepcopy(value)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "bank") -> "BankManifest":
        """Validate `data` (a manifest as read from a bank file); a BankError names the key."""
        if not isinstance(data, dict):
            raise BankError(f"{source}: the bank manifest is {type(data).__name__}, not a mapping; rebuild the bank")
        _check_keys(data, _MANIFEST_KEYS, _OPTIONAL_KEYS, "the bank manifest", source)
        calibration = data["calibration"]
        if "threshold" not in calibration or not _is(calibration["threshold"], (float, type(None))):
            raise BankError(f"{source}: bank has no calibration threshold; rebuild the bank")
        _check_keys(calibration, _CALIBRATION_KEYS, frozenset(_CALIBRATION_KEYS) - {"threshold"},
                    "the bank manifest's calibration", source)
        if data.get("colour_mode", "colour") not in COLOUR_MODES:
            raise BankError(f"{source}: the bank manifest's colour_mode is {data['colour_mode']!r}, expected one of "
                            f"{COLOUR_MODES}; rebuild the bank")
        window = data.get("sample_window", [0, 65535])
        if len(window) != 2 or not 0 <= window[0] < window[1] <= 65535:
            raise BankError(f"{source}: the bank manifest's sample_window is {window!r}, expected [low, high] with "
                            "0 <= low < high <= 65535; rebuild the bank")
        return cls(**dict(data, calibration=Calibration.from_manifest(calibration)))


def _is(value: Any, kinds: tuple[type, ...]) -> bool:
    """isinstance, where a bool is no number and an int is a float."""
    if isinstance(value, bool):
        return bool in kinds
    if isinstance(value, int) and float in kinds:
        return True
    return isinstance(value, kinds)


def _items_are(value: Any, kind: type) -> bool:
    items = value.values() if isinstance(value, dict) else value
    return all(_is(v, (kind,)) for v in items)


def _check_keys(data: dict[str, Any], table: dict[str, tuple[tuple[type, ...], type | None]], optional: frozenset[str],
                what: str, source: str) -> None:
    """Refuse unknown keys, a missing key that is not optional and a value of another type."""
    unknown = sorted(set(data) - set(table))
    if unknown:
        raise BankError(f"{source}: {what} has unknown keys {unknown}; rebuild the bank")
    for key, (kinds, item) in table.items():
        if key not in data:
            if key in optional:
                continue
            raise BankError(f"{source}: {what} lacks {key!r}; rebuild the bank")
        value = data[key]
        if not _is(value, kinds) or (item is not None and value is not None and not _items_are(value, item)):
            want = " or ".join(k.__name__ for k in kinds) + (f" of {item.__name__}" if item else "")
            raise BankError(f"{source}: {what}'s {key!r} is {value!r:.80}, expected {want}; rebuild the bank")


def _json_types(annotation: Any) -> tuple[tuple[type, ...], type | None]:
    """(accepted types, type of its items or values (None: any)) of a field's value in JSON: a
    tuple is a list there, a nested record (dataclass) a dict checked on its own."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        kinds = tuple(kind for arg in args for kind in _json_types(arg)[0])
        items = [item for arg in args if (item := _json_types(arg)[1]) is not None]
        return kinds, items[0] if items else None
    if origin is dict:
        return (dict,), None if args[1] is Any else args[1]
    if origin in (list, tuple):
        return (list,), args[0]
    if dataclasses.is_dataclass(annotation):
        return (dict,), None
    return (annotation,), None


def _key_table(record: type) -> dict[str, tuple[tuple[type, ...], type | None]]:
    """Each field of the record class -> the JSON types `_check_keys` accepts for it."""
    hints = typing.get_type_hints(record)
    return {f.name: _json_types(hints[f.name]) for f in fields(record)}


_MANIFEST_KEYS = _key_table(BankManifest)
_OPTIONAL_KEYS = frozenset(f.name for f in fields(BankManifest)
                           if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING)
_CALIBRATION_KEYS = _key_table(Calibration)


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
    manifest: BankManifest
    segmenter_state: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        z = self.retrieval.shape[0]
        for name in _TENSOR_NAMES:
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
        moved = {name: getattr(self, name).to(device) for name in _TENSOR_NAMES}
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
        tensors = {name: getattr(self, name).contiguous().cpu() for name in _TENSOR_NAMES}
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
        if not path.is_file():
            raise BankError(f"{path}: no bank file here; build one with `linewatch bank build`")
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise BankError(f"{path}: not a readable bank file (corrupt or not a linewatch bank): {e}") from None
        if "linewatch_manifest" not in metadata:
            raise BankError(f"{path}: not a linewatch bank (no manifest in its metadata)")
        try:
            manifest = json.loads(metadata["linewatch_manifest"])
        except json.JSONDecodeError as e:
            raise BankError(f"{path}: the bank manifest is not valid JSON: {e}") from None
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        if version != BANK_FORMAT_VERSION:
            raise BankError(
                f"{path}: bank format version {version}, this linewatch reads version {BANK_FORMAT_VERSION}; rebuild the bank"
            )
        missing = [name for name in _TENSOR_NAMES if name not in tensors]
        if missing:
            raise BankError(f"{path}: bank file lacks tensors {missing}; rebuild the bank")
        manifest = BankManifest.from_dict(manifest, source=str(path))
        segmenter_state = {
            key[len(_SEGMENTER_PREFIX):]: value for key, value in tensors.items() if key.startswith(_SEGMENTER_PREFIX)
        }
        named = {name: tensors[name] for name in _TENSOR_NAMES}
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
        if list(self.manifest.sample_window) != list(sample_window):
            raise BankError(
                f"bank {self.bank_id}: its 16-bit images were scaled through detector.sample_window "
                f"{list(self.manifest.sample_window)}, this config has {list(sample_window)}; frames must "
                "be read as the good images were: set it back or rebuild the bank")
        if self.size < k_references:
            raise BankError(
                f"bank {self.bank_id} holds {self.size} good images, fewer than detector.k_references = "
                f"{k_references}; lower k_references or rebuild the bank with more good images"
            )

    def check_calibration(self, target_false_reject_rate: float, source: str = "bank") -> None:
        """Refuse a bank whose threshold was calibrated for another false-reject target."""
        built = self.manifest.calibration.target_false_reject_rate
        if built is not None and built != target_false_reject_rate:
            raise BankError(
                f"{source}: its threshold was calibrated for calibration.target_false_reject_rate = {built}, "
                f"this config asks for {target_false_reject_rate}; rebuild the bank with this config "
                "(`linewatch bank build`) or set the config back"
            )


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
