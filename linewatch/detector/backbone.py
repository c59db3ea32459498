"""Feature extractors: DINOv2 patch features (timm) and a weights-free classical feature map.

Both take images01 (B, 3, H, W), RGB in [0, 1], or (B, 1, H, W), grey (a mono bank), and return
a dense map (B, C, h, w); both expose `out_channels` (for colour input), `channels_for(grey)`,
`stride` (input pixels per output cell) and `identity` (changes whenever the model, its weights
or its configuration change, so a template bank built with another extractor is refused).
DINOv2 was trained on RGB: a grey image is given to it as three equal channels
(`three_channels`). The classical features are defined on one channel for a grey image: no
colour channels that would be constant zero.
"""

from __future__ import annotations

import math
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import nn

from linewatch.detector.weights import WeightsError, read_state_dict, state_fingerprint

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "DinoV2Backbone", "ClassicFeatures", "imagenet_constants",
           "imagenet_normalize", "oriented_gradients", "resample_pos_embed_like_dinov2"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_constants() -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet's mean and std as (1, 3, 1, 1) float32 tensors on the CPU: a module registers them
    as non-persistent buffers (in no state dict, so no checkpoint or fingerprint changes), and
    `.to(device)` moves them with its weights, once, at model build -- not per batch."""
    return torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def imagenet_normalize(images01: torch.Tensor, mean: torch.Tensor | None = None,
                       std: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> ImageNet-normalised (B, 3, H, W).

    mean, std: `imagenet_constants()` already on the images' device (a module's buffers). Without
    them they are made here from Python numbers: a host-to-device copy, which waits for the
    device, when the images are on a GPU."""
    if mean is None or std is None:
        mean, std = imagenet_constants()
        mean, std = mean.to(images01.device), std.to(images01.device)
    return (images01 - mean.to(images01.dtype)) / std.to(images01.dtype)


def three_channels(images01: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) grey -> (B, 3, H, W) with three equal channels (a view), for models trained on
    RGB (DINOv2, FeatUp's JBU, SAM); (B, 3, H, W) is returned as it is."""
    return images01.expand(-1, 3, -1, -1) if images01.shape[1] == 1 else images01


def resample_pos_embed_like_dinov2(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Resample a square position embedding to `grid` exactly as Meta's DINOv2 hub model does
    at run time (bicubic, scale factor (g + 0.1) / M, no antialias), so that our features match
    those FeatUp's JBU was trained on. timm's own resampling (size=, antialias) differs slightly.

    Args:
        pos_embed: (1, P + M*M, C) with P = 0 or 1 leading class-token slots.
        grid: (gh, gw) target patch grid.

    Returns:
        (1, P + gh*gw, C), same dtype.
    """
    n = pos_embed.shape[1]
    prefix = 0 if math.isqrt(n) ** 2 == n else 1
    m = math.isqrt(n - prefix)
    if m * m != n - prefix:
        raise ValueError(f"pos_embed with {n} tokens is not a square grid (+0/1 prefix)")
    if (m, m) == tuple(grid):
        return pos_embed
    dim = pos_embed.shape[2]
    patch = pos_embed[:, prefix:].float().reshape(1, m, m, dim).permute(0, 3, 1, 2)
    scale = ((grid[0] + 0.1) / m, (grid[1] + 0.1) / m)
    patch = F.interpolate(patch, scale_factor=scale, mode="bicubic", antialias=False)
    if tuple(patch.shape[-2:]) != tuple(grid):
        raise ValueError(f"pos_embed resample gave {tuple(patch.shape[-2:])}, wanted {grid}")
    patch = patch.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], dim)
    return torch.cat([pos_embed[:, :prefix].float(), patch], dim=1).to(pos_embed.dtype)


def oriented_gradients(gx: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    """Gradient magnitude and its soft orientation, from derivatives (B, 1, H, W) -> (B, 5, H, W):
    magnitude, then the doubled-angle vector (cos 2t, sin 2t) times the magnitude split into its
    positive and negative parts (c2+, s2+, c2-, s2-). Doubling the angle makes an edge's
    orientation independent of which side is brighter; the four parts change smoothly with the
    angle (no hard orientation bins, so a small rotation moves them a little)."""
    mag = (gx * gx + gy * gy + 1e-12).sqrt()
    c2 = (gx * gx - gy * gy) / mag  # = magnitude * cos 2t
    s2 = 2.0 * gx * gy / mag  # = magnitude * sin 2t
    return torch.cat([mag, c2.clamp_min(0), s2.clamp_min(0), (-c2).clamp_min(0), (-s2).clamp_min(0)], dim=1)


def _list_keys(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


class DinoV2Backbone(nn.Module):
    """DINOv2 ViT patch features through timm.

    Loads Meta's official checkpoints (e.g. dinov2_vits14_pretrain.pth: keys `mask_token`,
    `blocks.N.ls1.gamma`, `register_tokens` for reg4, pos_embed at 518 px) or timm-layout files,
    converted by timm's own `checkpoint_filter_fn`, and checks the result strictly.

    Args:
        model_name: a timm DINOv2 model name (`vit_{small,base,large}_patch14_{dinov2,reg4_dinov2}.lvd142m`;
            samlad.backbone).
        checkpoint: .pth/.safetensors file; None gives random weights (tests only).
        image_size: input side in pixels, a multiple of the patch size (14); inputs must match it
            (detector.image_size).
        model_kwargs: extra timm overrides (e.g. depth/embed_dim for tiny test models).
    """

    def __init__(self, model_name: str, checkpoint: str | Path | None = None, *, image_size: int,
                 model_kwargs: dict | None = None) -> None:
        super().__init__()
        build = dict(pretrained=False, img_size=image_size, num_classes=0, **(model_kwargs or {}))
        mean, std = imagenet_constants()  # moved to the device with the weights (no copy per batch)
        self.register_buffer("imagenet_mean", mean, persistent=False)
        self.register_buffer("imagenet_std", std, persistent=False)
        if checkpoint is None:
            self.model = timm.create_model(model_name, **build)
        else:
            # Built on the meta device: timm's random init of a ViT costs seconds (ViT-L: tens of
            # seconds) and would be overwritten by the checkpoint anyway.
            with torch.device("meta"):
                self.model = timm.create_model(model_name, **build)
        self.patch_size = int(self.model.patch_embed.patch_size[0])
        if image_size % self.patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of the patch size {self.patch_size}")
        self.image_size = image_size
        self.out_channels = int(self.model.num_features)
        self.stride = self.patch_size
        if checkpoint is not None:
            self._load(Path(checkpoint))
        self.model.eval().requires_grad_(False)  # frozen feature extractor
        source = Path(checkpoint).name if checkpoint is not None else "random-init"
        self.identity = (f"dinov2:{model_name}:img{image_size}:C{self.out_channels}:"
                         f"{source}:{state_fingerprint(self.model)}")

    def _load(self, path: Path) -> None:
        """Read, convert and strictly load a checkpoint; WeightsError names the file and keys."""
        state = read_state_dict(path)
        grid = tuple(int(g) for g in self.model.patch_embed.grid_size)
        if "pos_embed" in state:
            try:
                state["pos_embed"] = resample_pos_embed_like_dinov2(state["pos_embed"], grid)
            except (ValueError, RuntimeError) as exc:
                raise WeightsError(f"checkpoint {path}: bad pos_embed {tuple(state['pos_embed'].shape)}: {exc}")
        try:
            # timm's filter: Meta layout -> timm layout (mask_token dropped, SwiGLU renamed,
            # registers moved); a timm-layout dict passes through.
            state = checkpoint_filter_fn(state, self.model, antialias=False)
        except Exception as exc:
            raise WeightsError(f"checkpoint {path} could not be converted for {type(self.model).__name__}: "
                               f"{type(exc).__name__}: {exc}") from exc
        expected = self.model.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        wrong_shape = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
        problems = []
        if missing:
            problems.append(f"missing keys: {_list_keys(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {_list_keys(unexpected)}")
        if wrong_shape:
            problems.append("shape mismatch: " + _list_keys(
                [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in wrong_shape]))
        if problems:
            raise WeightsError(f"checkpoint {path} does not fit {self.model.default_cfg.get('architecture', '')}"
                               f" ({self.out_channels} channels): " + "; ".join(problems))
        self.model.load_state_dict(state, strict=True, assign=True)
        left = [n for n, t in [*self.model.named_parameters(), *self.model.named_buffers()] if t.is_meta]
        if left:  # non-persistent buffers are not in checkpoints; none exist in timm's DINOv2 ViTs
            raise WeightsError(f"checkpoint {path}: model tensors not initialised by loading: {_list_keys(left)}")

    def channels_for(self, grey: bool) -> int:
        """Feature channels for grey or colour input: the same (a grey image is replicated)."""
        return self.out_channels

    @property
    def num_prefix_tokens(self) -> int:
        """Class token plus register tokens preceding the patch tokens (1, or 5 with 4 registers)."""
        return int(self.model.num_prefix_tokens)

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        """images01 (B, 3, S, S) RGB or (B, 1, S, S) grey (given as three equal channels) in [0, 1],
        S = image_size -> patch features (B, C, S/14, S/14).

        The features are the final-LayerNorm patch tokens (Meta's `x_norm_patchtokens`).
        """
        images01 = three_channels(images01)
        b, _, h, w = images01.shape
        if (h, w) != (self.image_size, self.image_size):
            raise ValueError(f"DinoV2Backbone expects {self.image_size}x{self.image_size} inputs, got {h}x{w}")
        normalized = imagenet_normalize(images01, self.imagenet_mean, self.imagenet_std)
        tokens = self.model.forward_features(normalized)  # (B, prefix + h*w, C)
        patches = tokens[:, self.num_prefix_tokens:]
        gh, gw = h // self.patch_size, w // self.patch_size
        return patches.reshape(b, gh, gw, self.out_channels).permute(0, 3, 1, 2).contiguous()


class ClassicFeatures(nn.Module):
    """Weights-free, deterministic feature map: colour, gradients and texture at 3 scales.

    Channels (34 with num_scales=3 for colour input, 28 for grey), all average-pooled into
    stride x stride cells:
      - colour: opponent colour (L-0.5, R-G, Y-B) mean split into positive and negative parts
        (6) and local standard deviation (3); for a grey image (B, 1, H, W) the grey level alone,
        L-0.5 split the same way (2) and its local standard deviation (1): a mono camera has no
        R-G or Y-B to measure, so there are no channels for them;
      - per scale s (image pyramid level, 2**s downsampled): gradient magnitude (1), magnitude
        in 4 soft orientation bins on the doubled angle, sign-invariant (4), band-pass
        |difference of Gaussians| (1), local grey standard deviation (1).
    Fixed gains bring channels to comparable O(1) scales without per-image statistics (which
    would hide global colour or contrast changes): colour means lie in [-2, 2], and a
    full-contrast step edge crossing a cell gives about 1 in that cell's gradient channels.

      - position: x, 1-x, y, 1-y times position_gain (4; none when position_gain is 0).

    Args:
        stride: output cell size in pixels; H and W should be multiples of it (classic.feature_stride).
        position_gain: weight of the coordinate channels, 0 leaves them out (classic.position_gain).
        num_scales: pyramid levels (1-3 sensible); stride must be divisible by 2**(num_scales-1).
    """

    def __init__(self, stride: int, *, position_gain: float, num_scales: int = 3) -> None:
        super().__init__()
        if num_scales < 1 or stride % (2 ** (num_scales - 1)):
            raise ValueError(f"stride {stride} must be divisible by 2**(num_scales-1) = {2 ** (num_scales - 1)}")
        self.stride = stride
        self.num_scales = num_scales
        self.position_gain = float(position_gain)
        self.out_channels = self.channels_for(grey=False)
        self.identity = f"classic:v3:stride{stride}:scales{num_scales}:pos{position_gain:g}:C{self.out_channels}"

    def channels_for(self, grey: bool) -> int:
        """Feature channels for grey (one-channel) or colour input."""
        return self.colour_channels(grey) + 7 * self.num_scales + (4 if self.position_gain > 0 else 0)

    @staticmethod
    def colour_channels(grey: bool) -> int:
        """The leading colour block: L, R-G, Y-B split by sign and their spreads (9); grey: L (3)."""
        return 3 if grey else 9

    @staticmethod
    def blur_and_gradients(grey: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Binomial 3x3 blur and Sobel derivatives (per pixel) of (B, 1, H, W), replicate border.

        Written with shifted slices: single-channel convolutions are several times slower on CPU.
        Returns (smooth, gx, gy, smooth2), each (B, 1, H, W): gx/gy are Sobel derivatives of the
        smoothed image, smooth2 is smooth blurred once more (for a difference of Gaussians).
        """
        p = F.pad(grey, (2, 2, 2, 2), mode="replicate")
        rows = p[..., :, :-2] + 2.0 * p[..., :, 1:-1] + p[..., :, 2:]  # (B,1,H+4,W+2)
        smooth_p = (rows[..., :-2, :] + 2.0 * rows[..., 1:-1, :] + rows[..., 2:, :]) / 16.0  # (B,1,H+2,W+2)
        dx = smooth_p[..., :, 2:] - smooth_p[..., :, :-2]  # (B,1,H+2,W)
        dy = smooth_p[..., 2:, :] - smooth_p[..., :-2, :]  # (B,1,H,W+2)
        gx = (dx[..., :-2, :] + 2.0 * dx[..., 1:-1, :] + dx[..., 2:, :]) / 8.0
        gy = (dy[..., :, :-2] + 2.0 * dy[..., :, 1:-1] + dy[..., :, 2:]) / 8.0
        smooth = smooth_p[..., 1:-1, 1:-1]
        # second blur of smooth (inside the padded frame) for the difference of Gaussians
        r2 = smooth_p[..., :, :-2] + 2.0 * smooth_p[..., :, 1:-1] + smooth_p[..., :, 2:]
        smooth2 = (r2[..., :-2, :] + 2.0 * r2[..., 1:-1, :] + r2[..., 2:, :]) / 16.0
        return smooth, gx, gy, smooth2

    def texture_channels(self, features: torch.Tensor) -> torch.Tensor:
        """Grain statistics per cell from this extractor's output (B, out_channels, h, w) ->
        (B, 4 * num_scales, h, w): per scale the gradient magnitude, |difference of Gaussians|,
        grey standard deviation, and the coherence of the cell's edge orientations
        |mean doubled-angle vector| / mean magnitude (near 1 where edges in the cell share one
        direction, as along a long grain; near 0 for round grains), times 3 to be O(1) as
        the others. Averaged over a part they tell one granular texture from another of the
        same colour (rice from millet) where per-position comparisons cannot."""
        grey = features.shape[1] == self.channels_for(grey=True)
        out = []
        for level in range(self.num_scales):
            o = self.colour_channels(grey) + 7 * level
            mag, c2p, s2p, c2n, s2n, dog, g_std = features[:, o:o + 7].unbind(1)
            coherence = torch.sqrt((c2p - c2n) ** 2 + (s2p - s2n) ** 2) / (mag + 1e-3)
            out += [mag, dog, g_std, 3.0 * coherence]
        return torch.stack(out, dim=1)

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        """images01 (B, 3, H, W) RGB or (B, 1, H, W) grey in [0, 1] -> (B, channels_for(grey),
        H // stride, W // stride)."""
        b, c, h, w = images01.shape
        if c not in (1, 3):
            raise ValueError(f"ClassicFeatures takes 3 (RGB) or 1 (grey) channels, got {c}")

        if h % self.stride or w % self.stride:
            raise ValueError(f"image size {h}x{w} is not a multiple of stride {self.stride}")

        def pool(x: torch.Tensor) -> torch.Tensor:
            return F.avg_pool2d(x, self.stride)

        if c == 1:
            lum = opponent = images01
        else:
            r, g, bl = images01[:, 0:1], images01[:, 1:2], images01[:, 2:3]
            lum = (r + g + bl) / 3.0
            opponent = torch.cat([lum, (r - g) / 2.0, (r + g - 2.0 * bl) / 4.0], dim=1)
        mean = pool(opponent)
        std = (pool(opponent * opponent) - mean * mean).clamp_min(0.0).add(1e-8).sqrt()
        # luminance less 0.5; no constant tensor (one from Python numbers is a host-to-device copy on a GPU)
        centred = torch.cat([mean[:, :1] - 0.5, mean[:, 1:]], dim=1) * 4.0
        # signed colour split into its positive and negative parts: the object descriptors max-pool
        # (SAM-LAD's GMP), which would keep only one sign of a signed channel
        feats = [centred.clamp_min(0), (-centred).clamp_min(0), std * 4.0]

        grey = lum
        for level in range(self.num_scales):
            if level > 0:
                grey = F.avg_pool2d(grey, 2)
            smooth, gx, gy, smooth2 = self.blur_and_gradients(grey)
            dog = (smooth - smooth2).abs()
            k = self.stride // (2 ** level)
            cell = F.avg_pool2d(torch.cat([oriented_gradients(gx, gy), dog, grey, grey * grey], dim=1), k)
            g_std = (cell[:, 7:8] - cell[:, 6:7] ** 2).clamp_min(0.0).add(1e-8).sqrt()
            # edge pixels per cell shrink with the cell's size at this level -> gain stride / 2**level
            gain = float(k)
            feats += [cell[:, 0:5] * gain, cell[:, 5:6] * gain * 4.0, g_std * 4.0]
        if self.position_gain > 0:
            # coordinates (CoordConv): ViT features carry a position embedding; these let the
            # max-pooled descriptor of an object encode its extent and place (x, 1-x, y, 1-y)
            ys = torch.linspace(0, 1, h // self.stride, device=images01.device, dtype=images01.dtype)
            xs = torch.linspace(0, 1, w // self.stride, device=images01.device, dtype=images01.dtype)
            gy, gx = torch.meshgrid(ys, xs, indexing="ij")
            pos = torch.stack([gx, 1 - gx, gy, 1 - gy])[None].expand(b, -1, -1, -1) * self.position_gain
            feats.append(pos)
        return torch.cat(feats, dim=1)
