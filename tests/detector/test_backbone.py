"""DinoV2Backbone: loading Meta's official key layout (with and without registers) and timm's,
agreement with a directly-built timm model, strict key checks; ClassicFeatures properties."""

from __future__ import annotations


import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from linewatch.detector.backbone import ClassicFeatures, DinoV2Backbone
from linewatch.detector.weights import WeightsError

SMALL = "vit_small_patch14_dinov2.lvd142m"
SMALL_REG = "vit_small_patch14_reg4_dinov2.lvd142m"
TINY = dict(depth=2, embed_dim=48, num_heads=2)  # same architecture family, ~0.1 M parameters
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def random_timm(name: str, img_size: int, seed: int, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, img_size=img_size, num_classes=0, **kwargs).eval()
    with torch.no_grad():  # timm inits layer-scale gammas to 1e-5, which would hide block bugs
        for name_, p in model.named_parameters():
            if name_.endswith(("gamma", "cls_token", "reg_token")):
                p.copy_(torch.randn_like(p) * 0.5)
    return model


def to_meta_layout(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """timm DINOv2 state dict -> Meta's official layout (dinov2_vits14_pretrain.pth keys):
    adds `mask_token` (1, C); with registers, `register_tokens` and a class slot in pos_embed
    whose value Meta adds to the class token (timm folds it into cls_token)."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    dim = state["cls_token"].shape[-1]
    gen = torch.Generator().manual_seed(seed)
    state["mask_token"] = torch.randn(1, dim, generator=gen)
    if "reg_token" in state:
        cls_pos = torch.randn(1, 1, dim, generator=gen)
        state["register_tokens"] = state.pop("reg_token")
        state["cls_token"] = state["cls_token"] - cls_pos
        state["pos_embed"] = torch.cat([cls_pos, state["pos_embed"]], dim=1)
    return state


def reference_features(model: torch.nn.Module, images01: torch.Tensor) -> torch.Tensor:
    """Patch map through timm's own intermediate API (independent of our prefix/reshape code)."""
    x = (images01 - MEAN) / STD
    (out,) = model.forward_intermediates(x, indices=1, norm=True, output_fmt="NCHW", intermediates_only=True)
    return out


def test_meta_layout_at_native_grid_matches_timm_model(tmp_path):
    model = random_timm(SMALL, 224, seed=0, **TINY)
    path = tmp_path / "dinov2_tiny_pretrain.pth"
    torch.save(to_meta_layout(model), path)
    backbone = DinoV2Backbone(SMALL, checkpoint=path, image_size=224, model_kwargs=TINY)
    images = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        out = backbone(images)
        ref = reference_features(model, images)
    assert out.shape == (2, 48, 16, 16) and backbone.out_channels == 48 and backbone.patch_size == 14
    assert backbone.num_prefix_tokens == 1
    assert torch.allclose(out, ref, atol=1e-5)


def test_meta_layout_at_518_resamples_pos_embed_like_meta(tmp_path):
    """Meta's files store pos_embed for 518 px (37x37); at 224 px the model must use it resampled
    as Meta's hub model does at run time (bicubic, scale (16 + 0.1) / 37, no antialias)."""
    src = random_timm(SMALL, 518, seed=1, **TINY)
    path = tmp_path / "dinov2_tiny_518.pth"
    torch.save(to_meta_layout(src), path)
    backbone = DinoV2Backbone(SMALL, checkpoint=path, image_size=224, model_kwargs=TINY)

    direct = random_timm(SMALL, 224, seed=99, **TINY)
    state = {k: v for k, v in src.state_dict().items() if k != "pos_embed"}
    pos = src.pos_embed.detach()
    grid = pos[:, 1:].reshape(1, 37, 37, 48).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=(16.1 / 37, 16.1 / 37), mode="bicubic", antialias=False)
    state["pos_embed"] = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, 256, 48)], dim=1)
    direct.load_state_dict(state, strict=True)

    images = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(backbone(images), reference_features(direct, images), atol=1e-5)


def test_meta_layout_with_registers_drops_five_prefix_tokens(tmp_path):
    model = random_timm(SMALL_REG, 224, seed=2, **TINY)
    path = tmp_path / "dinov2_tiny_reg4_pretrain.pth"
    torch.save(to_meta_layout(model), path)
    backbone = DinoV2Backbone(SMALL_REG, checkpoint=path, image_size=224, model_kwargs=TINY)
    assert backbone.num_prefix_tokens == 5
    images = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        out = backbone(images)
        assert out.shape == (2, 48, 16, 16)
        assert torch.allclose(out, reference_features(model, images), atol=1e-5)


def test_timm_layout_safetensors_loads(tmp_path):
    model = random_timm(SMALL, 224, seed=3, **TINY)
    path = tmp_path / "timm_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    backbone = DinoV2Backbone(SMALL, checkpoint=path, image_size=224, model_kwargs=TINY)
    images = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(backbone(images), reference_features(model, images), atol=1e-5)


def test_bad_checkpoints_raise_weights_error_naming_file_and_keys(tmp_path):
    state = to_meta_layout(random_timm(SMALL, 224, seed=4, **TINY))
    missing = dict(state)
    del missing["blocks.1.attn.qkv.weight"]
    path = tmp_path / "missing.pth"
    torch.save(missing, path)
    with pytest.raises(WeightsError) as info:
        DinoV2Backbone(SMALL, checkpoint=path, image_size=224, model_kwargs=TINY)
    assert str(path) in str(info.value) and "blocks.1.attn.qkv.weight" in str(info.value)

    extra = dict(state, **{"blocks.7.norm1.weight": torch.ones(48)})
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(WeightsError, match=r"unexpected keys: blocks\.7\.norm1\.weight"):
        DinoV2Backbone(SMALL, checkpoint=tmp_path / "extra.pth", image_size=224, model_kwargs=TINY)

    torch.save(state, tmp_path / "tiny.pth")  # a 48-channel file into a 64-channel model
    with pytest.raises(WeightsError, match="shape mismatch"):
        DinoV2Backbone(SMALL, checkpoint=tmp_path / "tiny.pth", image_size=224, model_kwargs=dict(TINY, embed_dim=64))

    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"\x80\x02 definitely not a checkpoint" * 10)
    with pytest.raises(WeightsError, match="corrupt.pth"):
        DinoV2Backbone(SMALL, checkpoint=corrupt, image_size=224, model_kwargs=TINY)

    with pytest.raises(WeightsError, match="nowhere.pth"):
        DinoV2Backbone(SMALL, checkpoint=tmp_path / "nowhere.pth", image_size=224, model_kwargs=TINY)


def test_identity_and_input_size_check(tmp_path):
    a, b = random_timm(SMALL, 224, seed=5, **TINY), random_timm(SMALL, 224, seed=6, **TINY)
    torch.save(to_meta_layout(a), tmp_path / "a.pth")
    torch.save(to_meta_layout(b), tmp_path / "b.pth")
    ba = DinoV2Backbone(SMALL, checkpoint=tmp_path / "a.pth", image_size=224, model_kwargs=TINY)
    bb = DinoV2Backbone(SMALL, checkpoint=tmp_path / "b.pth", image_size=224, model_kwargs=TINY)
    b448 = DinoV2Backbone(SMALL, checkpoint=tmp_path / "a.pth", image_size=448, model_kwargs=TINY)
    assert len({ba.identity, bb.identity, b448.identity}) == 3
    assert ba.identity == DinoV2Backbone(SMALL, checkpoint=tmp_path / "a.pth", image_size=224, model_kwargs=TINY).identity
    with pytest.raises(ValueError, match="224x224"):
        ba(torch.rand(1, 3, 448, 448))


def test_full_size_vits14_from_meta_layout(tmp_path):
    """One forward of the real ViT-S/14 architecture from a Meta-layout file (pos_embed at 518)."""
    with torch.device("meta"):  # shapes only; timm's random init of 22 M parameters is slow
        model = timm.create_model(SMALL, pretrained=False, img_size=518, num_classes=0)
    gen = torch.Generator().manual_seed(7)
    state = {k: torch.randn(v.shape, generator=gen) * 0.02 for k, v in model.state_dict().items()}
    state["mask_token"] = torch.zeros(1, 384)
    assert state["pos_embed"].shape == (1, 1 + 37 * 37, 384)
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(state, path)
    backbone = DinoV2Backbone(SMALL, checkpoint=path, image_size=224)
    with torch.no_grad():
        out = backbone(torch.rand(2, 3, 224, 224))
    assert out.shape == (2, 384, 16, 16) and backbone.out_channels == 384
    assert torch.isfinite(out).all()
    assert "dinov2_vits14_pretrain.pth" in backbone.identity


# ----------------------------------------------------------------------------- classic features
def test_classic_features_shape_no_parameters_deterministic():
    feats = ClassicFeatures(stride=8, position_gain=2.0)  # the constructor's former defaults
    images = torch.rand(8, 3, 224, 224)
    a, b = feats(images), feats(images.clone())
    assert a.shape == (8, feats.out_channels, 28, 28) and 24 <= feats.out_channels <= 48
    assert torch.equal(a, b) and list(feats.parameters()) == []
    assert torch.isfinite(a).all()
    assert "stride8" in feats.identity and feats.identity != ClassicFeatures(stride=16, position_gain=2.0).identity


def test_classic_features_respond_to_colour_edges_and_orientation():
    # channels: 0-2 colour (+), 3-5 colour (-), 6-8 colour std, then per scale from 9:
    # magnitude, 4 orientation bins, DoG, grey std
    feats = ClassicFeatures(stride=8, position_gain=0)
    flat = torch.full((1, 3, 64, 64), 0.5)
    base = feats(flat)
    assert base[:, 9:].abs().max() < 1e-3  # no gradients / texture on a flat image
    reddish = flat.clone()
    reddish[:, 0] += 0.2
    diff = (feats(reddish) - base).abs().amax(dim=(0, 2, 3))
    assert diff[1] > 0.3 and diff[4] < 1e-6 and diff[9:].max() < 1e-3  # R-G (+) moves, structure does not

    vertical = torch.zeros(1, 3, 64, 64)
    vertical[..., 36:] = 1.0  # edge inside cell column 4
    v = feats(vertical)[0, :, 3, 4]
    horizontal = vertical.transpose(-1, -2)
    hz = feats(horizontal)[0, :, 4, 3]
    assert v[9] > 0.5 and abs(v[9] - hz[9]) < 1e-5  # same magnitude for both orientations
    assert v[10] > 0.5 and v[12] < 1e-3  # vertical edge -> bin 0 (cos 2t = +1)
    assert hz[12] > 0.5 and hz[10] < 1e-3  # horizontal edge -> bin 2 (cos 2t = -1)
    assert feats(vertical)[0, 9, 3, 0] < 1e-3  # far from the edge: nothing


def test_classic_features_coordinate_channels():
    feats = ClassicFeatures(stride=8, position_gain=2.0)
    out = feats(torch.rand(2, 3, 32, 48))  # 4 x 6 cells
    x, one_minus_x, y, one_minus_y = out[0, -4:]
    assert torch.allclose(x[0], torch.linspace(0, 2, 6)) and torch.allclose(x + one_minus_x, torch.full_like(x, 2.0))
    assert torch.allclose(y[:, 0], torch.linspace(0, 2, 4)) and torch.allclose(y + one_minus_y, torch.full_like(y, 2.0))
    assert torch.equal(out[0, -4:], out[1, -4:])  # the same for every image
    assert ClassicFeatures(stride=8, position_gain=0).out_channels == feats.out_channels - 4
