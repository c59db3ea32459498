"""The template bank's manifest, and reading it from a bank file without loading the bank.

A bank file (linewatch.detector.bank) is a safetensors file whose header carries the manifest
as metadata. `read_manifest` reads and validates that header alone: no tensor is loaded and
torch is not imported, so a command finds a missing, corrupt or unfitting bank file in a
fraction of a second, before it starts the models (`BankManifest.check_fits`). Every
`BankError` here is one `TemplateBank.load` raises too, with the same words.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from linewatch.detector.calibration import Calibration

if TYPE_CHECKING:
    from linewatch.config import Config

BANK_FORMAT_VERSION = 3  # 2: part outlines and grain statistics (shapes, textures); 3: part identities
COLOUR_MODES = ("colour", "mono")  # BankManifest.colour_mode
IDENTITY_KEYS = ("backend", "backbone", "upsampler", "segmenter", "config_hash")
TENSOR_NAMES = ("retrieval", "features", "masks", "object_valid", "descriptors", "boxes", "object_noise", "shapes",
                 "textures", "identities")


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

    def check_calibration(self, target_false_reject_rate: float, source: str = "bank") -> None:
        """Refuse a bank whose threshold was calibrated for another false-reject target."""
        built = self.calibration.target_false_reject_rate
        if built is not None and built != target_false_reject_rate:
            raise BankError(
                f"{source}: its threshold was calibrated for calibration.target_false_reject_rate = {built}, "
                f"this config asks for {target_false_reject_rate}; rebuild the bank with this config "
                "(`linewatch bank build`) or set the config back"
            )

    def check_settings(self, sample_window: tuple[int, int] | list[int], k_references: int, size: int) -> None:
        """Refuse a bank (of `size` good images) whose 16-bit images were scaled through another
        detector.sample_window, or that holds fewer good images than detector.k_references."""
        if list(self.sample_window) != list(sample_window):
            raise BankError(
                f"bank {self.bank_id}: its 16-bit images were scaled through detector.sample_window "
                f"{list(self.sample_window)}, this config has {list(sample_window)}; frames must "
                "be read as the good images were: set it back or rebuild the bank")
        if size < k_references:
            raise BankError(
                f"bank {self.bank_id} holds {size} good images, fewer than detector.k_references = "
                f"{k_references}; lower k_references or rebuild the bank with more good images"
            )

    def check_fits(self, config: Config, source: str = "bank") -> None:
        """What `linewatch.recipe.load_processor` refuses of this bank under `config` that the
        manifest alone decides, in its order: another false-reject target, then -- when the
        bank was built by this backend under these fingerprint settings, so that only the
        models' own identities are left for the Inspector to compare -- another sample window
        or too few images for k_references. The other identity differences need the models
        to be named: the Inspector refuses those."""
        self.check_calibration(config.calibration.target_false_reject_rate, source=source)
        detector = config.detector
        if (self.identity.get("backend"), self.identity.get("config_hash")) == (detector.backend,
                                                                                detector.identity_hash()):
            self.check_settings(detector.sample_window, detector.k_references, self.images)


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


def read_manifest(path: str | Path) -> BankManifest:
    """The validated manifest of the bank file at `path`, read from the file's header: every
    check `TemplateBank.load` makes before it loads the tensors (the file is there, is a
    safetensors file with a linewatch manifest of this format version, names every tensor),
    with the same BankError, and no tensor read."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise BankError(f"{path}: no bank file here; build one with `linewatch bank build`")
    try:
        with safe_open(str(path), framework="numpy") as handle:  # the header only; numpy: no torch
            metadata = handle.metadata() or {}
            names = set(handle.keys())
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
    missing = [name for name in TENSOR_NAMES if name not in names]
    if missing:
        raise BankError(f"{path}: bank file lacks tensors {missing}; rebuild the bank")
    return BankManifest.from_dict(manifest, source=str(path))
