"""TemplateBank: save/load round trip, retrieval, and the errors a bad bank file gives."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import linewatch.detector.manifest as manifest_module
from linewatch.detector.bank import BANK_FORMAT_VERSION, IDENTITY_KEYS, BankError, BankManifest, TemplateBank
from linewatch.detector.calibration import Calibration, calibrate

IDENTITY = {
    "backend": "classic",
    "backbone": "classic-features/s4",
    "upsampler": "classic-jbu/1",
    "segmenter": "classic-seg/6",
    "config_hash": "0123456789abcdef",
}


def make_manifest(z: int = 4, **manifest) -> BankManifest:
    fields = dict(
        linewatch_version="0.0.test",
        identity=dict(IDENTITY),
        settings={"image_size": 32},
        images=z,
        source="/good",
        source_files=[f"{i:03d}.png" for i in range(z)],
        source_shape=[32, 32, 3],
        image_size=32,
        created="2024-01-01T00:00:00Z",
        calibration=Calibration(threshold=1.25, scores=(0.5, 1.0, 1.25)),
        bank_id="abcdef012345",
    )
    return BankManifest(**{**fields, **manifest})


def make_bank(z: int = 4, n: int = 3, c: int = 5, hw: int = 8, d: int = 6, seed: int = 0, **manifest) -> TemplateBank:
    g = torch.Generator().manual_seed(seed)
    valid = torch.ones(z, n, dtype=torch.bool)
    valid[0, -1] = False
    return TemplateBank(
        retrieval=torch.randn(z, d, generator=g),
        features=torch.randn(z, c, hw, hw, generator=g).half(),
        masks=(torch.rand(z, n, hw, hw, generator=g) > 0.5).half(),
        object_valid=valid,
        descriptors=torch.randn(z, n, c, generator=g),
        boxes=torch.rand(z, n, 4, generator=g) * 10,
        object_noise=torch.rand(z, n, generator=g) + 0.5,
        shapes=torch.rand(z, n, 7, generator=g),
        textures=torch.zeros(z, n, 0),  # a backend without grain statistics: zero-width, saved and loaded
        identities=torch.rand(z, n, 9, generator=g),
        manifest=make_manifest(z, **manifest),
        segmenter_state={"mean": torch.tensor([0.1, 0.2, 0.3]), "cov": torch.eye(3) * 2},
    )


def _raw_tensors(bank: TemplateBank) -> dict[str, torch.Tensor]:
    return {
        "retrieval": bank.retrieval, "features": bank.features, "masks": bank.masks,
        "object_valid": bank.object_valid.to(torch.uint8), "descriptors": bank.descriptors,
        "boxes": bank.boxes, "object_noise": bank.object_noise, "shapes": bank.shapes, "textures": bank.textures,
        "identities": bank.identities,
    }


def _file_manifest(path) -> str:
    """The manifest JSON as the bank file carries it."""
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()["linewatch_manifest"]


# ---------------------------------------------------------------------------- round trip


def test_save_load_round_trip(tmp_path):
    bank = make_bank()
    before = copy.deepcopy(bank.manifest)
    path = tmp_path / "sub" / "bank.lwbank"  # parent folder is created
    bank.save(path)
    loaded = TemplateBank.load(path)
    for name in ("retrieval", "features", "masks", "object_valid", "descriptors", "boxes", "object_noise"):
        a, b = getattr(bank, name), getattr(loaded, name)
        assert a.dtype == b.dtype, name
        assert torch.equal(a, b), name
    assert loaded.object_valid.dtype == torch.bool
    assert isinstance(loaded.manifest, BankManifest) and isinstance(loaded.calibration, Calibration)
    assert loaded.manifest.identity == IDENTITY
    assert loaded.calibration == Calibration(threshold=1.25, scores=(0.5, 1.0, 1.25))
    assert loaded.manifest.source_shape == [32, 32, 3]
    assert loaded.manifest.format_version == BANK_FORMAT_VERSION
    assert loaded.bank_id == "abcdef012345"
    assert loaded.threshold == 1.25
    assert loaded.size == 4
    assert set(loaded.segmenter_state) == {"mean", "cov"}
    assert torch.equal(loaded.segmenter_state["mean"], bank.segmenter_state["mean"])
    assert torch.equal(loaded.segmenter_state["cov"], bank.segmenter_state["cov"])
    assert loaded.manifest == bank.manifest
    assert bank.manifest == before  # saving leaves the in-memory manifest alone


def test_save_leaves_no_part_file_and_overwrites(tmp_path):
    path = tmp_path / "bank.lwbank"
    make_bank(seed=1).save(path)
    make_bank(seed=2).save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank.lwbank"]
    assert torch.equal(TemplateBank.load(path).retrieval, make_bank(seed=2).retrieval)


def test_failed_save_keeps_the_previous_bank(tmp_path, monkeypatch):
    import linewatch.detector.bank as bank_module

    path = tmp_path / "bank.lwbank"
    make_bank(seed=1).save(path)
    before = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"half a bank")
        raise OSError("disk full")

    monkeypatch.setattr(bank_module, "save_file", crash)
    with pytest.raises(OSError):
        make_bank(seed=2).save(path)
    assert path.read_bytes() == before  # the real name never holds a half-written bank
    assert torch.equal(TemplateBank.load(path).retrieval, make_bank(seed=1).retrieval)


def test_bank_without_segmenter_state_round_trips(tmp_path):
    bank = make_bank()
    bank.segmenter_state = {}
    bank.save(tmp_path / "b.lwbank")
    assert TemplateBank.load(tmp_path / "b.lwbank").segmenter_state == {}


def test_mismatched_tensor_count_refused():
    bank = make_bank()
    with pytest.raises(BankError, match="boxes"):
        TemplateBank(**{**_raw_tensors(bank), "object_valid": bank.object_valid, "boxes": bank.boxes[:2]},
                     manifest=bank.manifest)


# ---------------------------------------------------------------------------- retrieval


def _line_bank(points: list[float]) -> TemplateBank:
    bank = make_bank(z=len(points))
    bank.retrieval = torch.tensor([[p, 0.0] for p in points])
    return bank


def test_retrieve_k_nearest_euclidean():
    bank = _line_bank([0.0, 10.0, 3.0, -1.0, 7.0])
    query = torch.tensor([[2.5, 0.0], [9.0, 0.0]])
    idx = bank.retrieve(query, 2)
    assert idx.shape == (2, 2)
    assert idx[0].tolist() == [2, 0]  # distances 0.5, 2.5 (then 3.5, 4.5, 7.5)
    assert idx[1].tolist() == [1, 4]  # distances 1, 2


def test_retrieve_is_euclidean_not_dot_product():
    bank = make_bank(z=3)
    bank.retrieval = torch.tensor([[1.0, 0.0], [100.0, 0.0], [0.0, 1.0]])
    # a dot product would pick index 1 for this query; the Euclidean nearest is 0
    assert bank.retrieve(torch.tensor([[1.1, 0.1]]), 1).tolist() == [[0]]


def test_retrieve_exclude_removes_self():
    bank = _line_bank([0.0, 1.0, 5.0, 6.0])
    query = bank.retrieval.clone()
    plain = bank.retrieve(query, 1)
    assert plain.flatten().tolist() == [0, 1, 2, 3]
    loo = bank.retrieve(query, 2, exclude=torch.arange(4))
    assert loo.tolist() == [[1, 2], [0, 2], [3, 1], [2, 1]]
    for i in range(4):
        assert i not in loo[i].tolist()


def test_retrieve_exclude_minus_one_means_none():
    bank = _line_bank([0.0, 1.0, 5.0])
    query = bank.retrieval.clone()
    idx = bank.retrieve(query, 1, exclude=torch.tensor([-1, 1, -1]))
    assert idx.flatten().tolist() == [0, 0, 2]


def test_retrieve_more_than_bank_refused():
    bank = _line_bank([0.0, 1.0, 2.0])
    bank.retrieve(torch.zeros(1, 2), 3)  # exactly the bank: fine
    with pytest.raises(BankError, match="k_references=4"):
        bank.retrieve(torch.zeros(1, 2), 4)
    with pytest.raises(BankError, match="k_references=3"):  # leave-one-out leaves only 2
        bank.retrieve(torch.zeros(1, 2), 3, exclude=torch.tensor([0]))


def test_retrieve_does_not_modify_bank():
    bank = _line_bank([0.0, 1.0, 5.0])
    before = bank.retrieval.clone()
    bank.retrieve(bank.retrieval, 1, exclude=torch.arange(3))
    assert torch.equal(bank.retrieval, before)


# ---------------------------------------------------------------------------- load errors


def _load_error(path) -> str:
    with pytest.raises(BankError) as info:
        TemplateBank.load(path)
    message = str(info.value)
    assert str(path) in message, message
    return message


def test_load_missing_file(tmp_path):
    message = _load_error(tmp_path / "nope.lwbank")
    assert "no bank file" in message


def test_load_folder_is_not_a_bank(tmp_path):
    assert "no bank file" in _load_error(tmp_path)


@pytest.mark.parametrize("content", [
    b"",
    b"\x00" * 7,
    bytes(range(256)) * 8,
    b"\xff" * 64,  # header length 2**64-1
    b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all",
], ids=["empty", "short", "random", "huge-header", "bad-header"])
def test_load_corrupt_file(tmp_path, content):
    path = tmp_path / "bank.lwbank"
    path.write_bytes(content)
    assert "not a readable bank file" in _load_error(path)


def test_load_truncated_file(tmp_path):
    path = tmp_path / "bank.lwbank"
    make_bank().save(path)
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 1, 12):
        path.write_bytes(data[:cut])
        assert "not a readable bank file" in _load_error(path)


def test_load_safetensors_without_manifest(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file(_raw_tensors(make_bank()), str(path))
    assert "no manifest" in _load_error(path)
    save_file(_raw_tensors(make_bank()), str(path), metadata={"something": "else"})
    assert "no manifest" in _load_error(path)


def test_load_manifest_not_json(tmp_path):
    path = tmp_path / "bank.lwbank"
    save_file(_raw_tensors(make_bank()), str(path), metadata={"linewatch_manifest": "{oops"})
    assert "not valid JSON" in _load_error(path)


@pytest.mark.parametrize("version", [BANK_FORMAT_VERSION + 1, 0, None, "1"])
def test_load_wrong_format_version(tmp_path, version):
    bank = make_bank()
    manifest = dict(bank.manifest.to_dict(), format_version=version)
    if version is None:
        del manifest["format_version"]
    path = tmp_path / "bank.lwbank"
    save_file(_raw_tensors(bank), str(path), metadata={"linewatch_manifest": json.dumps(manifest)})
    message = _load_error(path)
    assert "format version" in message and "rebuild" in message


@pytest.mark.parametrize("name", ["retrieval", "masks", "object_noise"])
def test_load_missing_tensor(tmp_path, name):
    bank = make_bank()
    tensors = _raw_tensors(bank)
    del tensors[name]
    path = tmp_path / "bank.lwbank"
    manifest = bank.manifest.to_dict()
    save_file(tensors, str(path), metadata={"linewatch_manifest": json.dumps(manifest)})
    message = _load_error(path)
    assert name in message and "lacks tensors" in message


def test_load_without_calibration(tmp_path):
    assert "lacks 'calibration'" in _saved_with_manifest(tmp_path, lambda m: m.pop("calibration"))


def _saved_with_manifest(tmp_path, change) -> str:
    """The load error of a bank whose saved manifest went through `change(manifest)`."""
    bank = make_bank()
    manifest = bank.manifest.to_dict()
    change(manifest)
    path = tmp_path / "bank.lwbank"
    save_file(_raw_tensors(bank), str(path), metadata={"linewatch_manifest": json.dumps(manifest)})
    return _load_error(path)


@pytest.mark.parametrize("key", ["linewatch_version", "identity", "settings", "images", "source", "source_files",
                                 "source_shape", "image_size", "created", "bank_id"])
def test_load_manifest_without_a_required_key(tmp_path, key):
    message = _saved_with_manifest(tmp_path, lambda m: m.pop(key))
    assert f"lacks {key!r}" in message and "rebuild the bank" in message


@pytest.mark.parametrize("key, value", [
    ("images", "8"), ("images", True), ("image_size", 112.0), ("source_shape", [32, "32", 3]),
    ("source_files", "000.png"), ("identity", {"backend": 1}), ("identity", ["classic"]), ("bank_id", 12),
    ("calibration", [1.25]), ("settings", None), ("score_normalisation", [1.0]), ("build_seconds", "fast"),
])
def test_load_manifest_with_an_ill_typed_key(tmp_path, key, value):
    message = _saved_with_manifest(tmp_path, lambda m: m.update({key: value}))
    assert f"manifest's {key!r} is {value!r}" in message and "expected" in message


def test_load_manifest_with_an_unknown_key(tmp_path):
    assert "unknown keys ['thresold']" in _saved_with_manifest(tmp_path, lambda m: m.update(thresold=1.0))


@pytest.mark.parametrize("calibration", [{"scores": [1.0]}, {"threshold": "1.25"}])
def test_load_manifest_without_a_usable_threshold(tmp_path, calibration):
    assert "no calibration threshold" in _saved_with_manifest(tmp_path, lambda m: m.update(calibration=calibration))


def test_manifest_record_round_trip():
    record = make_manifest(build_seconds=3, score_normalisation={"patch": {"mean": 0.1}})
    again = BankManifest.from_dict(json.loads(json.dumps(record.to_dict())))
    assert again == record and isinstance(again.calibration, Calibration)
    assert again.build_seconds == 3 and again.score_normalisation == {"patch": {"mean": 0.1}}
    assert again.format_version == BANK_FORMAT_VERSION and again.images == 4
    bare = make_manifest().to_dict()
    assert "score_normalisation" not in bare and "build_seconds" not in bare  # None: left out
    assert set(manifest_module._MANIFEST_KEYS) == {f.name for f in dataclasses.fields(BankManifest)}
    assert set(manifest_module._CALIBRATION_KEYS) == {f.name for f in dataclasses.fields(Calibration)}
    assert list(bare["calibration"]) == [f.name for f in dataclasses.fields(Calibration)]


def test_a_calibrated_manifest_keeps_its_keys_and_values_through_a_file(tmp_path):
    """What the bank builder writes (a calibration record with its source) reads back as the
    same record, and saves again as the same bytes."""
    calibration = calibrate([0.5, 0.61, 0.72, 0.8, 0.93, 1.1, 1.25, 1.3], 0.05)
    record = Calibration.from_manifest(dict(calibration.to_manifest(), source="validation folder /val (8)"))
    bank = make_bank(calibration=record, build_seconds=1.5, score_normalisation={"objects": {"scale": 0.2}})
    bank.save(tmp_path / "a.lwbank")
    loaded = TemplateBank.load(tmp_path / "a.lwbank")
    assert loaded.manifest == bank.manifest and loaded.calibration.observed_false_reject_rate == 0.0
    loaded.save(tmp_path / "b.lwbank")
    assert (tmp_path / "a.lwbank").read_bytes() == (tmp_path / "b.lwbank").read_bytes()
    written = json.loads(_file_manifest(tmp_path / "a.lwbank"))
    assert list(written) == ["linewatch_version", "identity", "settings", "images", "source", "source_files",
                             "source_shape", "image_size", "created", "calibration", "bank_id", "score_normalisation",
                             "build_seconds", "colour_mode", "sample_window", "format_version"]
    assert list(written["calibration"]) == [  # the keys banks have carried since the fitted-tail calibration
        "threshold", "method", "target_false_reject_rate", "expected_false_reject_rate", "ci_low", "ci_high",
        "confidence", "observed_false_reject_rate", "n", "n_required", "enough", "warning", "mean", "std", "max",
        "scores", "source"]


# the calibration record of banks built before the fitted-tail calibration (format 2 already)
OLD_CALIBRATION = {"threshold": 2.5, "target_false_reject_rate": 0.005, "observed_false_reject_rate": 0.0,
                   "scores": [1.0, 1.5, 2.0], "mean": 1.5, "std": 0.408248, "max": 2.0, "n": 3,
                   "method": "leave-one-out over the good images"}


def test_a_bank_built_before_the_calibration_record_loads(tmp_path):
    path = tmp_path / "old.lwbank"
    bank = make_bank()
    old = dict(bank.manifest.to_dict(), calibration=OLD_CALIBRATION, build_seconds=12.5,
               score_normalisation={"objects": {"center": 0.1, "scale": 0.2}})  # no good scores kept then
    save_file(_raw_tensors(bank), str(path), metadata={"linewatch_manifest": json.dumps(old)})
    loaded = TemplateBank.load(path)
    cal = loaded.calibration
    assert loaded.threshold == 2.5 and cal.target_false_reject_rate == 0.005 and cal.n == 3
    assert cal.scores == (1.0, 1.5, 2.0) and cal.method == "leave-one-out over the good images"
    assert cal.expected_false_reject_rate is None and cal.enough is None and cal.source is None  # absent there
    assert {k: v for k, v in cal.to_manifest().items() if k in OLD_CALIBRATION} == OLD_CALIBRATION
    loaded.check_calibration(0.005)
    with pytest.raises(BankError, match="calibrated for calibration.target_false_reject_rate = 0.005"):
        loaded.check_calibration(0.01)


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(n="3"), "calibration's 'n' is '3', expected int or NoneType"),
    (lambda c: c.update(enough=1), "calibration's 'enough' is 1, expected bool or NoneType"),
    (lambda c: c.update(scores=[1.0, "x"]), "calibration's 'scores' is [1.0, 'x'], expected list of float"),
    (lambda c: c.update(treshold=1.0), "calibration has unknown keys ['treshold']"),
])
def test_load_refuses_an_ill_formed_calibration_record(tmp_path, change, message):
    def changed(manifest):
        change(manifest["calibration"])
    assert message in _saved_with_manifest(tmp_path, changed)


def test_an_uncalibrated_bank_fails_nothing():
    bank = make_bank(calibration=Calibration(threshold=None))
    assert bank.threshold == float("inf")
    assert BankManifest.from_dict(bank.manifest.to_dict()).calibration == Calibration(threshold=None)


def test_load_inconsistent_tensors_names_file(tmp_path):
    bank = make_bank()
    tensors = _raw_tensors(bank)
    tensors["boxes"] = tensors["boxes"][:2].contiguous()
    path = tmp_path / "bank.lwbank"
    manifest = bank.manifest.to_dict()
    save_file(tensors, str(path), metadata={"linewatch_manifest": json.dumps(manifest)})
    assert "boxes" in _load_error(path)


# ---------------------------------------------------------------------------- identity


def test_check_identity_same_passes():
    make_bank().check_identity(dict(IDENTITY))


def test_check_identity_lists_every_difference():
    bank = make_bank()
    expected = dict(IDENTITY, backbone="dinov2", config_hash="ffff", segmenter="sam")
    with pytest.raises(BankError) as info:
        bank.check_identity(expected, source="bank abc")
    message = str(info.value)
    assert message.startswith("bank abc:")
    for key in ("backbone", "config_hash", "segmenter"):
        assert f"  {key}:" in message
        assert repr(IDENTITY[key]) in message and repr(expected[key]) in message
    for key in ("backend", "upsampler"):
        assert f"  {key}:" not in message


def test_check_identity_every_key_checked():
    bank = make_bank()
    for key in IDENTITY_KEYS:
        with pytest.raises(BankError, match=key):
            bank.check_identity(dict(IDENTITY, **{key: "other"}))


def test_check_identity_bank_without_identity():
    bank = make_bank(identity={})
    with pytest.raises(BankError) as info:
        bank.check_identity(dict(IDENTITY))
    assert all(f"  {key}:" in str(info.value) for key in IDENTITY_KEYS)


def test_check_calibration_refuses_another_false_reject_target():
    bank = make_bank(calibration=Calibration(threshold=1.25, target_false_reject_rate=0.005))
    bank.check_calibration(0.005)
    with pytest.raises(BankError) as info:
        bank.check_calibration(0.001, source="bank abc")
    assert str(info.value).startswith("bank abc: its threshold was calibrated for calibration.target_false_reject_rate = 0.005")
    assert "0.001" in str(info.value)
