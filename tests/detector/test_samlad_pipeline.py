"""The SAM-LAD composition end to end with random weights: DINOv2 (timm, tiny) + JBU stack +
SAM (tiny) + DCGA/OMM/AMM + bank build + calibration. Random weights mean nothing about
accuracy; this checks that the real model classes plug into the same Inspector and bank code,
and that the samlad backend refuses to start without its checkpoints, saying what to do."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from linewatch.bank_builder import build_bank
from linewatch.config import config_from_dict
from linewatch.detector.inspector import Batch, Inspector
from linewatch.detector.models import build_models
from linewatch.detector.weights import WeightsError
from linewatch.sim import render
from tests.detector.samlad_models import samlad_config, tiny_samlad_models, write_images


@pytest.fixture(scope="module")
def samlad_bank(tmp_path_factory):
    """`samlad_bank(prompts)`: (config, bank) of the tiny random models (seeded: every
    tiny_samlad_models(config) holds the same weights) from 4 good and 2 validation sim images,
    built once per module for each prompt mode. The stage test and the host-data test judge with
    the same bank; neither changes it (the Inspector only reads its bank, build_bank leaves the
    models as given), and each test builds its own models to patch or count."""
    built = {}

    def get(prompts: str):
        if prompts not in built:
            root = tmp_path_factory.mktemp(f"samlad-{prompts}")
            config = samlad_config(root, prompts)
            write_images(root / "good", 4, seed=1)
            write_images(root / "val", 2, seed=2)
            bank = build_bank(config, root / "good", root / "val", models=tiny_samlad_models(config), batch_size=2,
                              progress=False)
            built[prompts] = (config, bank)
        return built[prompts]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("prompts", ["full_grid", "reference_seeded"])
def test_samlad_stages_build_a_bank_and_inspect_with_random_weights(samlad_bank, prompts: str) -> None:
    config, bank = samlad_bank(prompts)
    models = tiny_samlad_models(config)
    assert bank.manifest.identity["backend"] == "samlad"
    assert bank.features.shape[1] == 48 and bank.features.shape[-1] == 112 // 14 * 4  # two 2x JBU stages
    assert bank.calibration.n == 2 + 4  # validation + leave-one-out over the 4 good images

    inspector = Inspector(config.detector, models, bank, torch.device("cpu"))
    if prompts == "reference_seeded":  # one prompt inside each bank part, then the 1-point coarse grid
        calls = []
        generator = models.segmenter.generator

        class Recording:
            def padded(self, frames, points, valid, output_size):
                calls.append((points, valid))
                return generator.padded(frames, points, valid, output_size=output_size)

        models.segmenter.generator = Recording()
    image, _, _ = render("screw_tray", np.random.default_rng(9), anomaly="missing", size=112)
    (result,) = inspector.inspect([image])
    assert result.backend == "samlad"
    assert result.heatmap.shape == (112, 112) and np.isfinite(result.heatmap).all()
    assert np.isfinite(result.score) and result.verdict in ("pass", "fail")
    assert set(result.timings) >= {"backbone", "upsample", "segment", "describe", "match", "measure"}
    if prompts == "reference_seeded":
        ((points, valid),) = calls
        n = bank.object_valid.shape[1]
        assert points.shape == (1, 2 * n + 1, 2) and valid.shape == (1, 2 * n + 1)
        refs = inspector.run(Batch(images=[image]), ("preprocess", "backbone")).references[0]
        assert valid[0, :-1].tolist() == bank.object_valid[refs].flatten().tolist()
        assert points[0, -1].tolist() == [56.0, 56.0]  # the coarse grid's one point, mid-frame


@pytest.mark.slow
def test_a_samlad_mono_bank_is_the_colour_bank_of_its_images_as_three_equal_channels(tmp_path: Path) -> None:
    # DINOv2, JBU and SAM take a grey image as three equal channels: a bank of grey images holds
    # what a bank of the same images written as RGB holds, and judges a grey frame alike.
    from linewatch.images import write_image

    config = samlad_config(tmp_path)
    for folder, count, seed in (("good", 4, 1), ("val", 2, 2)):
        for i in range(count):
            grey = render("screw_tray", np.random.default_rng([seed, i]), size=112, mono=True)[0]
            write_image(tmp_path / "grey" / folder / f"{i:03d}.png", grey)
            write_image(tmp_path / "rgb" / folder / f"{i:03d}.png", np.dstack([grey] * 3))
    models = tiny_samlad_models(config)
    banks = {kind: build_bank(config, tmp_path / kind / "good", tmp_path / kind / "val", models=models, batch_size=2,
                              progress=False) for kind in ("grey", "rgb")}
    assert (banks["grey"].manifest.colour_mode, banks["rgb"].manifest.colour_mode) == ("mono", "colour")
    for name in ("retrieval", "features", "masks", "descriptors"):
        assert torch.equal(getattr(banks["grey"], name), getattr(banks["rgb"], name)), name
    frame = render("screw_tray", np.random.default_rng(9), anomaly="missing", size=112, mono=True)[0]
    (grey,) = Inspector(config.detector, models, banks["grey"], torch.device("cpu")).inspect([frame])
    (rgb,) = Inspector(config.detector, models, banks["rgb"], torch.device("cpu")).inspect([np.dstack([frame] * 3)])
    assert grey.score == rgb.score and np.array_equal(grey.heatmap, rgb.heatmap)


def test_samlad_backend_without_checkpoints_says_how_to_get_them(tmp_path: Path) -> None:
    config = samlad_config(tmp_path)
    with pytest.raises(WeightsError) as info:
        build_models(config.detector, torch.device("cpu"))
    message = str(info.value)
    assert "linewatch models download" in message and str(tmp_path / "models") in message


def test_featup_checkpoint_outside_its_training_setup_is_refused_unless_allowed() -> None:
    from linewatch.config import ConfigError

    def detector(**samlad):
        return {"detector": {"backend": "samlad", "image_size": 448, "samlad": samlad}}

    with pytest.raises(ConfigError, match="trained at image_size 224.*allow_untrained_upsampler_setup"):
        config_from_dict(detector())
    with pytest.raises(ConfigError, match="vit_small_patch14_reg4_dinov2"):
        config_from_dict({"detector": {"backend": "samlad", "samlad": {
            "backbone": "vit_small_patch14_reg4_dinov2.lvd142m", "backbone_checkpoint": "dinov2_vits14_reg4"}}})
    assert config_from_dict(detector(allow_untrained_upsampler_setup=True)).detector.image_size == 448
    # an upsampler given as a file path: linewatch cannot know what it was trained on
    assert config_from_dict(detector(upsampler_checkpoint="/models/my_jbu.ckpt")).detector.image_size == 448
    assert config_from_dict({"detector": {"backend": "samlad"}}).detector.image_size == 224


class _HostData(TorchFunctionMode):
    """Counts the calls that make a tensor from host data (`torch.tensor`, `torch.as_tensor` and
    `Tensor.new_tensor` of Python numbers or lists: on a GPU each is a host-to-device copy that waits
    for the device) and those that read tensor data back to the host (`.item()`, `.tolist()`,
    `bool(t)`, `nonzero`, ... : each waits for the device)."""

    MAKE = {"tensor", "as_tensor", "new_tensor"}
    READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "argwhere", "cpu",
             "masked_select", "unique", "unique_consecutive"}

    def __init__(self):
        super().__init__()
        self.calls: dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        data = args[1] if name == "new_tensor" else (args[0] if args else None)
        if (name in self.MAKE and not isinstance(data, torch.Tensor)) or name in self.READS:
            self.calls[name] = self.calls.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("prompts", ["full_grid", "reference_seeded"])
def test_hot_stages_make_no_tensor_from_host_data_and_read_nothing_back(samlad_bank, prompts: str) -> None:
    """The CPU half of tests/detector/test_cuda.py::test_hot_stages_do_not_synchronise: backbone,
    upsample, segment, describe and match neither copy constants from the host (they are the models'
    buffers, moved to the device with the weights at build) nor read the device back."""
    config, bank = samlad_bank(prompts)
    models = tiny_samlad_models(config)
    inspector = Inspector(config.detector, models, bank, torch.device("cpu"))
    images = [render("screw_tray", np.random.default_rng(s), anomaly=a, size=112)[0] for s, a in ((1, None), (2, "missing"))]
    batch = inspector.run(Batch(images=images), ("preprocess",))
    seen = {}
    for name in ("backbone", "upsample", "segment", "describe", "match", "measure"):
        with _HostData() as host:
            batch = inspector.run(batch, (name,))
        seen[name] = host.calls
    assert {name: seen[name] for name in ("backbone", "upsample", "segment", "describe", "match")} == {
        "backbone": {}, "upsample": {}, "segment": {}, "describe": {}, "match": {}}
    assert len(batch.results) == 2
