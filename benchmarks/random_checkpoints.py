"""Write the official SAM-LAD checkpoints with RANDOM weights, in the official key layouts.

    python benchmarks/random_checkpoints.py DIR [--seed N]

Writes three files into DIR and prints their paths:
  random_dinov2_vits14_pretrain.pth       DINOv2 ViT-S/14 in Meta's layout (pos_embed for 518 px,
                                          `mask_token`), as dinov2_vits14_pretrain.pth
  random_dinov2_jbu_stack_cocostuff.ckpt  FeatUp's JBU stack for 384 channels with ChannelNorm, a
                                          Lightning file (weights under "state_dict", FeatUp's key
                                          names, 4 stages, plus backbone keys the loader skips)
  random_sam_vit_b.pth                    SAM vit_b, segment-anything's state dict

With them, the project's real loaders (DinoV2Backbone, load_featup_jbu, load_sam_weights) and so
`linewatch bank build` / `linewatch serve` run without downloads: the compute is that of the real
models, the outputs mean nothing. The names start with "random_" so that no file here can pass for
an official one in a weights folder (DINOv2 and FeatUp have no published sha256 to catch it), and
a config must name them by path (paths skip the registry's sha256 check; SAM's registry entry has
one). tests/test_random_checkpoints.py loads each through those loaders.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # this checkout's linewatch, also when another one is pip-installed
    sys.path.insert(0, str(ROOT))

DINOV2_MODEL = "vit_small_patch14_dinov2.lvd142m"
DINOV2_FILE = "random_dinov2_vits14_pretrain.pth"
FEATUP_FILE = "random_dinov2_jbu_stack_cocostuff.ckpt"
SAM_FILE = "random_sam_vit_b.pth"
META_IMAGE_SIZE = 518  # Meta's DINOv2 files hold pos_embed for a 37 x 37 grid


def dinov2_meta_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """ViT-S/14 with timm's random initialisation at 518 px, in Meta's key layout: timm's keys
    plus `mask_token` (1, 384) (timm's own converter drops it). No registers, so the class slot
    of pos_embed and cls_token are already Meta's."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(DINOV2_MODEL, pretrained=False, img_size=META_IMAGE_SIZE, num_classes=0)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state["mask_token"] = torch.zeros(1, state["cls_token"].shape[-1])
    return state


def featup_jbu_state(channels: int = 384, seed: int = 0) -> dict[str, torch.Tensor]:
    """FeatUp's JBU stack (4 stages, ChannelNorm) under FeatUp's key names, from JBUStack's own
    random initialisation, plus keys of the real file that the loader must skip (the backbone
    `model.0.*`, `scale_net`, `downsampler`)."""
    from linewatch.detector.upsample import JBUStack

    torch.manual_seed(seed)
    ours = JBUStack(channels, num_stages=4, use_norm=True).state_dict()
    state: dict[str, torch.Tensor] = {}
    for key, value in ours.items():
        if key.startswith("stages."):
            index, rest = key[len("stages."):].split(".", 1)
            state[f"upsampler.up{int(index) + 1}.{rest}"] = value.clone()
        elif key.startswith("norm."):
            state["model.1." + key] = value.clone()
        else:
            state["upsampler." + key] = value.clone()
    state["model.0.model.cls_token"] = torch.zeros(1, 1, channels)
    state["downsampler.kernel_size"] = torch.zeros(3)
    state["scale_net.net.weight"] = torch.zeros(1, channels, 1, 1)
    return state


def sam_vit_b_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """segment-anything's vit_b with its random initialisation, as its state dict."""
    from segment_anything import sam_model_registry

    torch.manual_seed(seed)
    return sam_model_registry["vit_b"](checkpoint=None).state_dict()


def write_random_checkpoints(directory: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write the three files into `directory` (created if needed).

    Returns:
        {"backbone": ..., "upsampler": ..., "sam": ...} file paths.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {"backbone": directory / DINOV2_FILE, "upsampler": directory / FEATUP_FILE, "sam": directory / SAM_FILE}
    torch.save(dinov2_meta_state(seed), paths["backbone"])
    torch.save({"state_dict": featup_jbu_state(seed=seed), "epoch": 0, "global_step": 0,
                "pytorch-lightning_version": "1.9.0"}, paths["upsampler"])
    torch.save(sam_vit_b_state(seed), paths["sam"])
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", help="folder to write the checkpoints into")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for path in write_random_checkpoints(args.dir, args.seed).values():
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
