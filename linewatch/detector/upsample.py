"""Guided feature upsampling: FeatUp's learned JBU stack (checkpoint-compatible) and a
weights-free classical joint bilateral upsampler.

Both map low-resolution features (B, C, h, w) plus the image (B, 3, H, W) in [0, 1] to
(B, C, h * 2**n, w * 2**n), one 2x stage at a time, each stage guided by the image pooled to
that stage's output size. SAM-LAD (sec. 3.4.1, eq. 3) upsamples DINOv2 features 8x: 3 stages.

FeatUp's learned stage gathers each output pixel's 7x7 = 49 window once (`windows`: one copy of
an unfolded view) and takes the range logits and the weighted sum as matrix products over it: two
batched ops where a loop over the 49 offsets launched 49 each (in the operands' dtypes, as the
loop's products were, also under autocast). The window tensor holds 49 values per channel and
pixel, so it is made a band of rows at a time, at most `WINDOW_ELEMENTS` values a band (at
128 x 128 with 384 channels a batch of 8 takes 22 bands of 6 rows; the earlier stages fewer).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from linewatch.detector.backbone import imagenet_constants, imagenet_normalize, three_channels
from linewatch.detector.weights import WeightsError, read_state_dict, state_fingerprint

__all__ = ["JBUStage", "JBUStack", "load_featup_jbu", "ClassicJointBilateralUpsampler", "windows"]

WINDOW_ELEMENTS = 2**27  # values of the window tensor made at once (512 MiB of float32)


def windows(padded: torch.Tensor, start: int, stop: int, diameter: int) -> torch.Tensor:
    """The diameter x diameter window of every pixel of output rows [start, stop).

    padded: channels-last (B, H + d - 1, W + d - 1, C), the map padded by d // 2 on every side
    -> (B, stop - start, W, d * d, C), offsets row-major (p = i * d + j for row offset i, column
    offset j): one copy of an unfolded view."""
    band = padded[:, start:stop + diameter - 1].unfold(1, diameter, 1).unfold(2, diameter, 1)  # (B, r, W, C, d, d)
    return band.permute(0, 1, 2, 4, 5, 3).flatten(3, 4)


def operand_precision(like: torch.Tensor):
    """Autocast off on `like`'s device: the window products run in their operands' dtype, as the
    per-offset elementwise products they replaced did (autocast would make them bf16 matrix products:
    the float32 weighted sum of the bicubic map in bf16)."""
    return torch.autocast(device_type=like.device.type, enabled=False)


def promoted(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both in their promoted dtype (an elementwise product's): a matrix product takes one dtype."""
    dtype = torch.promote_types(a.dtype, b.dtype)
    return a.to(dtype), b.to(dtype)


def by_bands(fn, rows: int, band: int) -> torch.Tensor:
    """fn(start, stop) over bands of `band` rows, joined along dim 1 (one call when one band covers them)."""
    if band >= rows:
        return fn(0, rows)
    return torch.cat([fn(start, min(start + band, rows)) for start in range(0, rows, band)], dim=1)


class JBUStage(nn.Module):
    """One learned 2x joint bilateral upsampling stage (FeatUp's `JBULearnedRange`, inference).

    Parameters (FeatUp names under `upsampler.up{k}.`): `range_temp` (), `sigma_spatial` (),
    `range_proj.{0,3}` 1x1 convs 3->32->32, `fixup_proj.{0,3}` 1x1 convs (3+49)->49->49. The
    Dropout2d layers of the original are inference no-ops, kept as Identity so indices match.

    Args:
        guidance_dim: channels of the guidance image (3).
        key_dim: range-projection width (32 in the published checkpoints).
        radius: window radius (3 -> 7x7 window).
    """

    def __init__(self, guidance_dim: int = 3, key_dim: int = 32, radius: int = 3) -> None:
        super().__init__()
        self.radius = radius
        self.diameter = 2 * radius + 1
        taps = self.diameter ** 2
        self.range_temp = nn.Parameter(torch.tensor(0.0))
        self.sigma_spatial = nn.Parameter(torch.tensor(1.0))
        self.range_proj = nn.Sequential(
            nn.Conv2d(guidance_dim, key_dim, 1), nn.GELU(), nn.Identity(), nn.Conv2d(key_dim, key_dim, 1))
        self.fixup_proj = nn.Sequential(
            nn.Conv2d(guidance_dim + taps, taps, 1), nn.GELU(), nn.Identity(), nn.Conv2d(taps, taps, 1))

    def spatial_kernel(self) -> torch.Tensor:
        """(P,) Gaussian over the window on a [-1, 1]^2 grid, row-major offsets, P = diameter**2."""
        axis = torch.linspace(-1.0, 1.0, self.diameter, device=self.sigma_spatial.device)
        dist2 = (axis.view(-1, 1) ** 2 + axis.view(1, -1) ** 2).reshape(-1)
        return torch.exp(-dist2 / (2.0 * self.sigma_spatial ** 2))

    def kernel(self, guidance: torch.Tensor) -> torch.Tensor:
        """guidance (B, 3, H, W), ImageNet-normalised -> per-pixel filter weights (B, P, H, W)."""
        b, _, h, w = guidance.shape
        keys = self.range_proj(guidance)  # (B, K, H, W)
        keys_p = F.pad(keys, [self.radius] * 4, mode="reflect").permute(0, 2, 3, 1)  # channels-last
        keys_l = keys.permute(0, 2, 3, 1)[..., None]  # (B, H, W, K, 1)
        keys_p, keys_l = promoted(keys_p, keys_l)
        d, k = self.diameter, keys.shape[1]

        def band(start: int, stop: int) -> torch.Tensor:  # (B, r, W, P): each window key . the pixel's key
            return (windows(keys_p, start, stop, d) @ keys_l[:, start:stop])[..., 0]

        with operand_precision(keys_p):
            logits = by_bands(band, h, max(1, WINDOW_ELEMENTS // (b * w * d * d * k))).permute(0, 3, 1, 2)  # (B, P, H, W)
        temp = self.range_temp.exp().clamp(1e-4, 1e4)
        range_k = torch.softmax(temp * logits, dim=1)
        combined = range_k * self.spatial_kernel().view(1, -1, 1, 1)
        combined = combined / combined.sum(1, keepdim=True).clamp(min=1e-7)
        return combined + 0.1 * self.fixup_proj(torch.cat([combined, guidance], dim=1))

    def forward(self, source: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        """source (B, C, h, w), guidance (B, 3, H, W) ImageNet-normalised -> (B, C, H, W).

        The source is bicubically resized to (H, W) and each output pixel is the kernel-weighted
        sum of its 7x7 neighbourhood (reflect-padded); H, W must exceed the radius.
        """
        b, c, _, _ = source.shape
        _, _, h, w = guidance.shape
        weights = self.kernel(guidance)
        hr = F.interpolate(source, size=(h, w), mode="bicubic", align_corners=False)
        hr_p = F.pad(hr, [self.radius] * 4, mode="reflect").permute(0, 2, 3, 1)  # channels-last (B, H+6, W+6, C)
        weights_l = weights.permute(0, 2, 3, 1)[..., None, :]  # (B, H, W, 1, P)
        hr_p, weights_l = promoted(hr_p, weights_l)
        d = self.diameter

        def band(start: int, stop: int) -> torch.Tensor:  # (B, r, W, C): the weighted sum over each window
            return (weights_l[:, start:stop] @ windows(hr_p, start, stop, d))[..., 0, :]

        with operand_precision(hr_p):
            out = by_bands(band, h, max(1, WINDOW_ELEMENTS // (b * w * d * d * c)))
        return out.permute(0, 3, 1, 2).contiguous()


class JBUStack(nn.Module):
    """FeatUp's JBU stack: optional channel LayerNorm, n learned 2x stages, final 1x1 fixup.

    Always owns 4 stages (the published checkpoints have 4) but runs the first `num_stages`;
    the output is `x + 0.1 * fixup_proj(x)` after the last stage run.

    Args:
        channels: feature channels C (384 for DINOv2 ViT-S/14).
        num_stages: stages to run, 1-4 (SAM-LAD: 3 = 8x; samlad.upsample_stages).
        use_norm: apply the checkpoint's LayerNorm over channels to the input features first
            (FeatUp's `ChannelNorm`, `model.1.norm`); the "no_norm" checkpoints have none
            (samlad.upsampler_use_norm).
    """

    def __init__(self, channels: int, *, num_stages: int, use_norm: bool) -> None:
        super().__init__()
        if not 1 <= num_stages <= 4:
            raise ValueError(f"num_stages must be 1..4, got {num_stages}")
        self.channels = channels
        self.out_channels = channels
        self.num_stages = num_stages
        self.use_norm = use_norm
        self.source = "random-init"
        self.norm = nn.LayerNorm(channels) if use_norm else None
        self.stages = nn.ModuleList(JBUStage() for _ in range(4))
        self.fixup_proj = nn.Sequential(nn.Identity(), nn.Conv2d(channels, channels, 1))
        mean, std = imagenet_constants()  # moved to the device with the weights (no copy per batch)
        self.register_buffer("imagenet_mean", mean, persistent=False)
        self.register_buffer("imagenet_std", std, persistent=False)

    @property
    def identity(self) -> str:
        """Description that changes with configuration or weights."""
        return (f"featup-jbu:C{self.channels}:stages{self.num_stages}:norm{int(self.use_norm)}:"
                f"{self.source}:{state_fingerprint(self)}")

    def forward(self, features: torch.Tensor, images01: torch.Tensor) -> torch.Tensor:
        """features (B, C, h, w), images01 (B, 3, H, W) RGB or (B, 1, H, W) grey (guiding as three
        equal channels, as JBU was trained on RGB) in [0, 1] -> (B, C, h*2**n, w*2**n)."""
        x = features
        if self.norm is not None:
            x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        guidance = imagenet_normalize(three_channels(images01), self.imagenet_mean, self.imagenet_std)
        for stage in self.stages[:self.num_stages]:
            h, w = x.shape[-2:]
            x = stage(x, F.adaptive_avg_pool2d(guidance, (2 * h, 2 * w)))
        return x + 0.1 * self.fixup_proj(x)


_STAGE_KEY = re.compile(r"^upsampler\.up([1-4])\.(.+)$")


def _featup_key(ours: str) -> str:
    """Our parameter name -> FeatUp's checkpoint key (for error messages)."""
    if ours.startswith("stages."):
        index, rest = ours[len("stages."):].split(".", 1)
        return f"upsampler.up{int(index) + 1}.{rest}"
    if ours.startswith("norm."):
        return "model.1." + ours
    return "upsampler." + ours


def load_featup_jbu(path: str | Path, channels: int, *, num_stages: int, use_norm: bool) -> JBUStack:
    """Build a JBUStack (num_stages, use_norm as there) from FeatUp's published checkpoint (e.g.
    dinov2_jbu_stack_cocostuff.ckpt).

    Accepts the Lightning file (weights under "state_dict"), a plain state dict or .safetensors
    with FeatUp's key names. Keys with `scale_net`/`downsampler` and the backbone (`model.0.*`)
    are ignored; every key the stack owns must be present with the right shape.

    Raises:
        WeightsError: naming the file and the missing / unexpected / mis-shaped keys.
    """
    path = Path(path)
    state = read_state_dict(path)
    stack = JBUStack(channels, num_stages=num_stages, use_norm=use_norm)
    mapped: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if "scale_net" in key or "downsampler" in key:
            continue
        match = _STAGE_KEY.match(key)
        if match:
            mapped[f"stages.{int(match[1]) - 1}.{match[2]}"] = value
        elif key.startswith("upsampler."):
            mapped[key[len("upsampler."):]] = value
        elif key.startswith("model.1.norm."):
            if not use_norm:
                raise WeightsError(f"checkpoint {path} was trained with ChannelNorm ({key}) but use_norm=False; "
                                   f"use use_norm=True or the no_norm checkpoint")
            mapped["norm." + key[len("model.1.norm."):]] = value
        # everything else (the backbone, model.0.*) is not ours
    expected = stack.state_dict()
    missing = sorted(_featup_key(k) for k in expected if k not in mapped)
    unexpected = sorted(_featup_key(k) for k in mapped if k not in expected)
    wrong = sorted(f"{_featup_key(k)} {tuple(mapped[k].shape)} vs expected {tuple(v.shape)}"
                   for k, v in expected.items() if k in mapped and mapped[k].shape != v.shape)
    problems = []
    if missing:
        problems.append("missing keys: " + ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else ""))
    if unexpected:
        problems.append("unexpected keys: " + ", ".join(unexpected[:10]) + (" ..." if len(unexpected) > 10 else ""))
    if wrong:
        problems.append("shape mismatch: " + ", ".join(wrong[:10]))
    if problems:
        raise WeightsError(f"checkpoint {path} is not a FeatUp JBU stack for C={channels}, "
                           f"use_norm={use_norm}: " + "; ".join(problems))
    stack.load_state_dict(mapped, strict=True)
    stack.source = path.name
    return stack.eval().requires_grad_(False)


class ClassicJointBilateralUpsampler(nn.Module):
    """Weights-free joint bilateral upsampling (Kopf et al. 2007), one 2x stage at a time.

    Each output pixel p is a weighted mean of the low-resolution samples q in a
    (2r+1) x (2r+1) window around it:
        w(p, q) = exp(-|p' - q|^2 / (2 sigma_spatial^2)) * (exp(-|I(p) - I_low(q)|^2 / (2 sigma_range^2)) + 1e-6)
    with p' the position of p in source pixels (pixel-centre convention, align_corners=False),
    I the image (RGB in [0, 1]) pooled to the output size and I_low pooled to the source size.
    Comparing I(p) with the colour *at the source sample* is what keeps edges sharp: a source
    cell straddling an edge has a mixed colour and gets little weight on either side. The 1e-6
    floor keeps the weights from all underflowing (then it degrades to Gaussian interpolation).
    Borders replicate.

    Args:
        num_stages: number of 2x stages (classic.upsample_stages).
        radius: window radius in source pixels of each stage.
        sigma_spatial: spatial Gaussian sigma in source pixels.
        sigma_range: colour-difference sigma in [0, 1] RGB units (Euclidean over channels).
    """

    def __init__(self, num_stages: int, radius: int = 3, sigma_spatial: float = 1.0,
                 sigma_range: float = 0.1) -> None:
        super().__init__()
        self.num_stages = num_stages
        self.radius = radius
        self.sigma_spatial = sigma_spatial
        self.sigma_range = sigma_range
        self.identity = (f"classic-jbu:v1:stages{num_stages}:r{radius}:ss{sigma_spatial:g}:"
                         f"sr{sigma_range:g}")

    def stage(self, source: torch.Tensor, guide_high: torch.Tensor, guide_low: torch.Tensor) -> torch.Tensor:
        """One 2x stage: source (B, C, h, w), guide_high (B, G, 2h, 2w), guide_low (B, G, h, w)
        -> (B, C, 2h, 2w)."""
        r = self.radius
        b, c, h, w = source.shape
        hh, ww = 2 * h, 2 * w
        # Nearest 2x of the padded source: output pixel y sees source row y//2 + d at row y + 2(d + r).
        src = F.interpolate(F.pad(source, [r] * 4, mode="replicate"), scale_factor=2, mode="nearest")
        src = src.permute(0, 2, 3, 1).contiguous()  # channels-last, (B, 2h+4r, 2w+4r, C)
        low = F.interpolate(F.pad(guide_low, [r] * 4, mode="replicate"), scale_factor=2, mode="nearest")
        # offset of each output pixel centre from its base source pixel, in source pixels: -1/4 or +1/4
        frac_y = (torch.arange(hh, device=source.device) % 2).to(source.dtype) * 0.5 - 0.25
        frac_x = (torch.arange(ww, device=source.device) % 2).to(source.dtype) * 0.5 - 0.25
        inv_s = 1.0 / (2.0 * self.sigma_spatial ** 2)
        inv_r = 1.0 / (2.0 * self.sigma_range ** 2)
        num = source.new_zeros(b, hh, ww, c)
        den = source.new_zeros(b, hh, ww, 1)
        for dy in range(-r, r + 1):
            wy = torch.exp(-(frac_y - dy) ** 2 * inv_s).view(hh, 1)
            oy = 2 * (dy + r)
            for dx in range(-r, r + 1):
                wx = torch.exp(-(frac_x - dx) ** 2 * inv_s).view(1, ww)
                ox = 2 * (dx + r)
                diff2 = (low[..., oy:oy + hh, ox:ox + ww] - guide_high).pow(2).sum(1)  # (B, 2h, 2w)
                weight = ((wy * wx) * (torch.exp(-diff2 * inv_r) + 1e-6)).unsqueeze(-1)
                num.addcmul_(src[:, oy:oy + hh, ox:ox + ww], weight)
                den += weight
        return (num / den).permute(0, 3, 1, 2).contiguous()

    def forward(self, features: torch.Tensor, images01: torch.Tensor) -> torch.Tensor:
        """features (B, C, h, w), images01 (B, 3, H, W) RGB or (B, 1, H, W) grey in [0, 1] ->
        (B, C, h*2**n, w*2**n). The range weight is on the squared distance of the guide's
        channels: the colour distance, or for a grey image the grey difference."""
        x = features
        for _ in range(self.num_stages):
            h, w = x.shape[-2:]
            high = F.adaptive_avg_pool2d(images01, (2 * h, 2 * w))
            low = F.adaptive_avg_pool2d(images01, (h, w))
            x = self.stage(x, high, low)
        return x
