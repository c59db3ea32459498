"""JBU stack vs a naive unfold-based reference of FeatUp's algorithm; checkpoint loading with
FeatUp's exact key names; properties of the classical joint bilateral upsampler."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from linewatch.detector import upsample
from linewatch.detector.upsample import ClassicJointBilateralUpsampler, JBUStack, JBUStage, load_featup_jbu
from linewatch.detector.weights import WeightsError

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
FEATUP = dict(num_stages=3, use_norm=True)  # what load_featup_jbu defaulted to: FeatUp's published DINOv2 JBU at 8x


def featup_state(channels: int, use_norm: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    """A FeatUp-layout state dict (key names and shapes of the published .ckpt), random values,
    plus keys the loader must ignore (backbone, downsampler, scale_net)."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float = 0.5) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * scale

    state = {}
    for k in range(1, 5):
        pre = f"upsampler.up{k}."
        state[pre + "range_temp"] = rnd(1).reshape(())
        state[pre + "sigma_spatial"] = (0.4 + torch.rand((), generator=gen))
        state[pre + "range_proj.0.weight"] = rnd(32, 3, 1, 1, scale=0.3)
        state[pre + "range_proj.0.bias"] = rnd(32)
        state[pre + "range_proj.3.weight"] = rnd(32, 32, 1, 1, scale=0.15)
        state[pre + "range_proj.3.bias"] = rnd(32)
        state[pre + "fixup_proj.0.weight"] = rnd(49, 52, 1, 1, scale=0.3)
        state[pre + "fixup_proj.0.bias"] = rnd(49)
        state[pre + "fixup_proj.3.weight"] = rnd(49, 49, 1, 1, scale=0.3)
        state[pre + "fixup_proj.3.bias"] = rnd(49)
    state["upsampler.fixup_proj.1.weight"] = rnd(channels, channels, 1, 1)
    state["upsampler.fixup_proj.1.bias"] = rnd(channels)
    if use_norm:
        state["model.1.norm.weight"] = 1.0 + rnd(channels, scale=0.2)
        state["model.1.norm.bias"] = rnd(channels, scale=0.2)
    state["model.0.model.cls_token"] = rnd(1, 1, 8)
    state["downsampler.kernel_size"] = rnd(3)
    state["scale_net.net.weight"] = rnd(1, channels, 1, 1)
    return state


# ----------------------------------------------------------------------------- naive reference
def conv1x1(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return torch.einsum("oc,bchw->bohw", weight[:, :, 0, 0], x) + bias.view(1, -1, 1, 1)


def naive_stage(s: dict[str, torch.Tensor], pre: str, source: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
    """One JBU stage written straight from the algorithm, with 49x unfolds (DETECTOR_NOTES)."""
    b, _, h, w = guidance.shape
    c = source.shape[1]
    keys = conv1x1(F.gelu(conv1x1(guidance, s[pre + "range_proj.0.weight"], s[pre + "range_proj.0.bias"])),
                   s[pre + "range_proj.3.weight"], s[pre + "range_proj.3.bias"])
    queries = F.unfold(F.pad(keys, [3] * 4, mode="reflect"), 7).reshape(b, 32, 49, h, w)
    temp = s[pre + "range_temp"].exp().clamp(1e-4, 1e4)
    range_k = torch.softmax(temp * torch.einsum("bcphw,bchw->bphw", queries, keys), dim=1)
    lin = torch.linspace(-1, 1, 7)
    gx, gy = torch.meshgrid(lin, lin, indexing="ij")
    spatial = torch.exp(-(gx ** 2 + gy ** 2) / (2 * s[pre + "sigma_spatial"] ** 2)).reshape(1, 49, 1, 1)
    kernel = range_k * spatial
    kernel = kernel / kernel.sum(1, keepdim=True).clamp(1e-7)
    fix = conv1x1(F.gelu(conv1x1(torch.cat([kernel, guidance], 1), s[pre + "fixup_proj.0.weight"],
                                 s[pre + "fixup_proj.0.bias"])),
                  s[pre + "fixup_proj.3.weight"], s[pre + "fixup_proj.3.bias"])
    kernel = kernel + 0.1 * fix
    hr = F.interpolate(source, (h, w), mode="bicubic", align_corners=False)
    patches = F.unfold(F.pad(hr, [3] * 4, mode="reflect"), 7).reshape(b, c, 49, h, w)
    return torch.einsum("bcphw,bphw->bchw", patches, kernel)


def naive_stack(s: dict[str, torch.Tensor], feats: torch.Tensor, images01: torch.Tensor,
                num_stages: int, use_norm: bool) -> torch.Tensor:
    x = feats
    if use_norm:
        x = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), s["model.1.norm.weight"],
                         s["model.1.norm.bias"], eps=1e-5).permute(0, 3, 1, 2)
    guidance = (images01 - MEAN) / STD
    for k in range(1, num_stages + 1):
        h, w = x.shape[-2:]
        x = naive_stage(s, f"upsampler.up{k}.", x, F.adaptive_avg_pool2d(guidance, (2 * h, 2 * w)))
    return x + 0.1 * conv1x1(x, s["upsampler.fixup_proj.1.weight"], s["upsampler.fixup_proj.1.bias"])


# ----------------------------------------------------------------------------- JBU stack
@pytest.mark.parametrize("use_norm,num_stages", [(True, 3), (False, 3), (True, 4)])
def test_jbu_stack_matches_naive_reference(tmp_path, use_norm, num_stages):
    state = featup_state(4, use_norm=use_norm)
    path = tmp_path / "dinov2_jbu_stack_cocostuff.ckpt"
    torch.save({"state_dict": state, "epoch": 1, "pytorch-lightning_version": "1.9.0"}, path)
    stack = load_featup_jbu(path, channels=4, num_stages=num_stages, use_norm=use_norm)
    gen = torch.Generator().manual_seed(1)
    feats = torch.randn(2, 4, 4, 4, generator=gen)
    images = torch.rand(2, 3, 40, 40, generator=gen)  # 40 is not a multiple of 8/16/32: adaptive pooling
    with torch.no_grad():
        out = stack(feats, images)
        ref = naive_stack(state, feats, images, num_stages, use_norm)
    side = 4 * 2 ** num_stages
    assert out.shape == (2, 4, side, side)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5), (out - ref).abs().max()
    # the comparison is not vacuous: the result is far from plain bicubic upsampling
    plain = F.interpolate(feats, (side, side), mode="bicubic", align_corners=False)
    assert (ref - plain).abs().max() > 1e-1


def loop_stage(stage: JBUStage, source: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
    """JBUStage.forward as it was before its windows became matrix products: both the range
    logits and the weighted sum loop over the 49 offsets, one op each."""
    _, _, h, w = guidance.shape
    r, d = stage.radius, stage.diameter
    keys = stage.range_proj(guidance)
    keys_p = F.pad(keys, [r] * 4, mode="reflect").permute(0, 2, 3, 1)
    keys_l = keys.permute(0, 2, 3, 1)
    logits = torch.stack([(keys_p[:, i:i + h, j:j + w] * keys_l).sum(-1) for i in range(d) for j in range(d)], dim=1)
    range_k = torch.softmax(stage.range_temp.exp().clamp(1e-4, 1e4) * logits, dim=1)
    combined = range_k * stage.spatial_kernel().view(1, -1, 1, 1)
    combined = combined / combined.sum(1, keepdim=True).clamp(min=1e-7)
    weights = combined + 0.1 * stage.fixup_proj(torch.cat([combined, guidance], dim=1))
    hr = F.interpolate(source, size=(h, w), mode="bicubic", align_corners=False)
    hr_p = F.pad(hr, [r] * 4, mode="reflect").permute(0, 2, 3, 1)
    weights_l = weights.permute(0, 2, 3, 1)
    out = hr.new_zeros(hr.shape[0], h, w, hr.shape[1])
    for i in range(d):
        for j in range(d):
            out.addcmul_(hr_p[:, i:i + h, j:j + w], weights_l[..., i * d + j:i * d + j + 1])
    return out.permute(0, 3, 1, 2)


@pytest.mark.parametrize("budget", [1, 5 * 10 * 49 * 32, 10**9])  # a band per row, bands of a few rows, one band
def test_jbu_stage_in_bands_equals_the_loop_over_offsets(tmp_path, monkeypatch, budget):
    torch.save({"state_dict": featup_state(5, use_norm=False, seed=2)}, tmp_path / "jbu.ckpt")
    stage = load_featup_jbu(tmp_path / "jbu.ckpt", 5, num_stages=1, use_norm=False).stages[0]
    gen = torch.Generator().manual_seed(5)
    source = torch.randn(1, 5, 5, 5, generator=gen)
    guidance = torch.randn(1, 3, 10, 10, generator=gen)
    monkeypatch.setattr(upsample, "WINDOW_ELEMENTS", budget)
    with torch.no_grad():
        out, ref = stage(source, guidance), loop_stage(stage, source, guidance)
    assert out.shape == ref.shape == (1, 5, 10, 10)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)  # the same sums, in another order


def test_windows_are_row_major_offsets():
    """windows() of a map whose value is its own (row, column): offset p = i * 3 + j of pixel (y, x)
    holds (y + i, x + j) of the padded map."""
    rows, cols = torch.meshgrid(torch.arange(6.0), torch.arange(7.0), indexing="ij")
    padded = torch.stack([rows, cols], dim=-1)[None]  # (1, 6, 7, 2): a 4 x 5 map padded by 1
    win = upsample.windows(padded, 1, 3, 3)  # output rows 1 and 2
    assert win.shape == (1, 2, 5, 9, 2)
    for y in range(2):
        for x in range(5):
            for i in range(3):
                for j in range(3):
                    assert win[0, y, x, i * 3 + j].tolist() == [y + 1 + i, x + j]


def test_loader_accepts_plain_and_safetensors_state_dicts(tmp_path):
    state = featup_state(4)
    torch.save(state, tmp_path / "plain.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "jbu.safetensors"))
    feats, images = torch.randn(1, 4, 4, 4), torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        a = load_featup_jbu(tmp_path / "plain.pth", 4, **FEATUP)(feats, images)
        b = load_featup_jbu(tmp_path / "jbu.safetensors", 4, **FEATUP)(feats, images)
    assert torch.equal(a, b)


def test_missing_key_raises_naming_file_and_key(tmp_path):
    state = featup_state(4)
    del state["upsampler.up3.fixup_proj.3.bias"]
    path = tmp_path / "broken.ckpt"
    torch.save({"state_dict": state}, path)
    with pytest.raises(WeightsError) as info:
        load_featup_jbu(path, 4, **FEATUP)
    assert "upsampler.up3.fixup_proj.3.bias" in str(info.value)
    assert str(path) in str(info.value)


def test_shape_mismatch_and_norm_mismatch_raise(tmp_path):
    path = tmp_path / "c4.ckpt"
    torch.save({"state_dict": featup_state(4)}, path)
    with pytest.raises(WeightsError, match=r"upsampler\.fixup_proj\.1\.weight"):
        load_featup_jbu(path, channels=8, **FEATUP)
    with pytest.raises(WeightsError, match="use_norm=False"):
        load_featup_jbu(path, channels=4, num_stages=3, use_norm=False)
    no_norm = tmp_path / "no_norm.ckpt"
    torch.save({"state_dict": featup_state(4, use_norm=False)}, no_norm)
    with pytest.raises(WeightsError, match=r"model\.1\.norm\.weight"):
        load_featup_jbu(no_norm, channels=4, num_stages=3, use_norm=True)


def test_unexpected_upsampler_key_raises(tmp_path):
    state = featup_state(4)
    state["upsampler.up5.range_temp"] = torch.tensor(0.0)
    path = tmp_path / "five.ckpt"
    torch.save({"state_dict": state}, path)
    with pytest.raises(WeightsError, match=r"upsampler\.up5\.range_temp"):
        load_featup_jbu(path, 4, **FEATUP)


def test_identity_tracks_weights_and_config(tmp_path):
    torch.save({"state_dict": featup_state(4, seed=0)}, tmp_path / "a.ckpt")
    torch.save({"state_dict": featup_state(4, seed=1)}, tmp_path / "b.ckpt")
    a3 = load_featup_jbu(tmp_path / "a.ckpt", 4, num_stages=3, use_norm=True)
    a2 = load_featup_jbu(tmp_path / "a.ckpt", 4, num_stages=2, use_norm=True)
    b3 = load_featup_jbu(tmp_path / "b.ckpt", 4, num_stages=3, use_norm=True)
    assert len({a3.identity, a2.identity, b3.identity}) == 3
    assert a3.identity == load_featup_jbu(tmp_path / "a.ckpt", 4, num_stages=3, use_norm=True).identity


def test_jbu_stack_realistic_size_shape():
    """DINOv2 at 224: 16 x 16 -> 128 x 128 in 3 stages (64 channels instead of 384 to keep the
    test fast; the channel count only scales the work)."""
    stack = JBUStack(64, num_stages=3, use_norm=True).eval()
    with torch.no_grad():
        out = stack(torch.randn(1, 64, 16, 16), torch.rand(1, 3, 224, 224))
    assert out.shape == (1, 64, 128, 128)
    assert torch.isfinite(out).all()


# ----------------------------------------------------------------------------- classical JBU
def naive_classic_stage(source: torch.Tensor, image01: torch.Tensor, radius: int, ss: float,
                        sr: float) -> torch.Tensor:
    """Per-pixel joint bilateral upsampling (Kopf et al.), loops written out: output pixel (y, x)
    sits at ((y + .5) / 2 - .5, (x + .5) / 2 - .5) in source pixels; its window is the source
    pixels (y//2 + dy, x//2 + dx), |dy|, |dx| <= radius, clamped at the border."""
    _, c, h, w = source.shape
    high = F.adaptive_avg_pool2d(image01, (2 * h, 2 * w))[0]
    low = F.adaptive_avg_pool2d(image01, (h, w))[0]
    out = torch.zeros(c, 2 * h, 2 * w)
    for y in range(2 * h):
        for x in range(2 * w):
            py, px = (y + 0.5) / 2 - 0.5, (x + 0.5) / 2 - 0.5
            num, den = torch.zeros(c), 0.0
            for dy in range(-radius, radius + 1):
                for dx in range(-radius, radius + 1):
                    qy, qx = y // 2 + dy, x // 2 + dx
                    cy, cx = min(max(qy, 0), h - 1), min(max(qx, 0), w - 1)
                    spatial = math.exp(-((py - qy) ** 2 + (px - qx) ** 2) / (2 * ss ** 2))
                    colour = float((high[:, y, x] - low[:, cy, cx]).pow(2).sum())
                    weight = spatial * (math.exp(-colour / (2 * sr ** 2)) + 1e-6)
                    num += weight * source[0, :, cy, cx]
                    den += weight
            out[:, y, x] = num / den
    return out.unsqueeze(0)


def test_classic_matches_naive_per_pixel_reference():
    gen = torch.Generator().manual_seed(3)
    feats = torch.randn(1, 2, 4, 5, generator=gen)
    image = torch.rand(1, 3, 8, 10, generator=gen)
    up = ClassicJointBilateralUpsampler(num_stages=1, radius=2, sigma_spatial=1.3, sigma_range=0.2)
    ref = naive_classic_stage(feats, image, 2, 1.3, 0.2)
    assert torch.allclose(up(feats, image), ref, atol=1e-5)
    flat = torch.full_like(image, 0.4)  # flat guidance: pure Gaussian interpolation
    assert torch.allclose(up(feats, flat), naive_classic_stage(feats, flat, 2, 1.3, 0.2), atol=1e-5)


def test_classic_has_no_parameters_and_shape():
    up = ClassicJointBilateralUpsampler(num_stages=2)
    assert list(up.parameters()) == []
    out = up(torch.randn(2, 5, 7, 9), torch.rand(2, 3, 56, 72))
    assert out.shape == (2, 5, 28, 36)
    assert "stages2" in up.identity and up.identity != ClassicJointBilateralUpsampler(num_stages=3).identity


def test_classic_constant_features_stay_constant_for_any_guidance():
    up = ClassicJointBilateralUpsampler(num_stages=3)
    feats = torch.full((1, 3, 4, 4), 0.7)
    feats[:, 1] = -2.0
    out = up(feats, torch.rand(1, 3, 32, 32))
    assert torch.allclose(out, feats[:, :, :1, :1].expand(-1, -1, 32, 32), atol=1e-6)


def test_classic_flat_guidance_equals_spatial_interpolation_and_keeps_ramps():
    """With flat guidance the range term is constant: the output is the spatial-only Gaussian
    interpolation, the same for any flat colour; a linear ramp stays (nearly) linear inside."""
    up = ClassicJointBilateralUpsampler(num_stages=1, radius=3, sigma_spatial=1.0)
    feats = torch.randn(1, 2, 8, 8)
    a = up(feats, torch.full((1, 3, 16, 16), 0.3))
    b = up(feats, torch.full((1, 3, 16, 16), 0.8))
    assert torch.allclose(a, b, atol=1e-6)
    ramp = torch.arange(8.0).view(1, 1, 1, 8).expand(1, 1, 8, 8).contiguous()
    out = up(ramp, torch.full((1, 3, 16, 16), 0.3))
    ramp_up = F.interpolate(ramp, (16, 16), mode="bilinear", align_corners=False)
    assert torch.allclose(out[..., 6:-6, 6:-6], ramp_up[..., 6:-6, 6:-6], atol=0.05)


def test_classic_preserves_edges_better_than_bilinear():
    """A vertical boundary at column 37 of 64 (not on the 8-pixel grid): the true feature is a
    step; the low-res feature is its 8x8 average; the image shows the same boundary."""
    truth = torch.zeros(1, 1, 64, 64)
    truth[..., 37:] = 1.0
    image = torch.zeros(1, 3, 64, 64)
    image[:, :, :, 37:] = torch.tensor([0.9, 0.6, 0.2]).view(1, 3, 1, 1)
    image[:, :, :, :37] = torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)
    low = F.avg_pool2d(truth, 8)
    jbu = ClassicJointBilateralUpsampler(num_stages=3, sigma_range=0.1)(low, image)
    bil = F.interpolate(low, (64, 64), mode="bilinear", align_corners=False)
    err_jbu = (jbu - truth).abs().mean()
    err_bil = (bil - truth).abs().mean()
    assert err_jbu < 0.6 * err_bil, (err_jbu, err_bil)
