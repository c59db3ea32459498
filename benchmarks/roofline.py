"""FLOPs, bytes moved and kernel launches per stage of the samlad path, counted on fake CUDA tensors.

    python benchmarks/roofline.py [--batch 8] [--precision bf16] [--modes reference_seeded full_grid]
        [--points-per-side 32] [--json OUT.json]

The full-size models with random weights (DINOv2 ViT-S/14 at 224, FeatUp's JBU stack with 3 stages
(16 x 16 -> 128 x 128, 384 channels), SAM vit_b with linewatch's SdpaAttention, DCGA), k = 2,
`max_objects` 10, 1024 x 1024 camera frames, run under torch's FakeTensorMode on tensors that say
they are on "cuda": no value is computed and no GPU is needed, but every aten op is dispatched as
on a GPU, with CUDA autocast's casts (autocast is switched on at the dispatcher, as
`torch.autocast("cuda")` would be on a machine with a GPU). A TorchDispatchMode counts, per stage:

  flops     matrix products, convolutions and attention (torch.utils.flop_counter's formulas;
            a multiply-add is 2 FLOPs; elementwise ops are not counted, they are bandwidth-bound)
  bytes     the bytes of every op's tensor inputs plus its outputs (an expanded dimension, stride 0,
            counted once): what the op would move between the GPU's memory and its cores if
            nothing stayed in cache between ops, the usual roofline estimate for unfused kernels
  launches  ops less views and metadata-only ops (as benchmarks/count_syncs.py counts them; a
            CompositeImplicitAutograd op as the ops it decomposes into)

Stages: backbone; upsample (JBU); segment encoder (SAM's preprocessing and image encoder);
segment decoder (linewatch.detector.sam_masks.decode_masks: every chunk of prompts; per prompt =
the stage over B x the prompts decoded per frame, padding prompts included); segment rest (prompt
embedding, filters, NMS, upsampling the kept masks, the area filter); describe (masks resized,
masked max pooling, DCGA); match (OMM: Sinkhorn over the B x k query/reference pairs). The measure
stage sizes its work from counts it reads back from the device (no fixed shapes), so it cannot run
on fake tensors and is not counted here.

Predicted time per stage = max(FLOPs / peak FLOP/s, bytes / bandwidth): on an H100, 3.0 TB/s
(a device-to-device copy) and 790 TFLOP/s (bf16 dense matrix products), as measured on this
workplace's H100 according to issue 20; the --bandwidth and --flops options set others. It is
a lower bound: launch gaps, imperfect kernels and host work come on top.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

aten = torch.ops.aten
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # this checkout's linewatch
    sys.path.insert(0, str(ROOT))

from benchmarks.count_syncs import NO_KERNEL, decomposed  # noqa: E402

# scaled_dot_product_attention is counted whole (count_syncs.KEEP_WHOLE), as the fused kernel a GPU runs
FLOP_FORMULAS = {**flop_registry,
                 aten.scaled_dot_product_attention: flop_registry[aten._scaled_dot_product_efficient_attention]}
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
STAGE_ORDER = ("backbone", "upsample", "segment encoder", "segment decoder", "segment rest", "describe", "match")


def unique_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a tensor addresses: a stride-0 (expanded) dimension counts once."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if size == 0:
            return 0
        if stride != 0:
            n *= size
    return n * t.element_size()


def tensors_in(tree) -> list[torch.Tensor]:
    flat, _ = torch.utils._pytree.tree_flatten(tree)
    return [x for x in flat if isinstance(x, torch.Tensor)]


class RooflineCounter(TorchDispatchMode):
    """Per `stage` (set it between pieces of work): ops, launches, bytes, bytes by dtype, flops."""

    def __init__(self) -> None:
        super().__init__()
        self.stage = "other"
        self.counts: dict[str, Counter] = defaultdict(Counter)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = decomposed(self, func, args, kwargs)
        if out is not NotImplemented:
            return out
        out = func(*args, **kwargs)
        counts = self.counts[self.stage]
        name = func.overloadpacket.__name__
        counts["ops"] += 1
        if func.is_view or name in NO_KERNEL:
            return out
        counts["launches"] += 1
        for t in tensors_in((args, kwargs)) + tensors_in(out):
            size = unique_bytes(t)
            counts["bytes"] += size
            counts[f"bytes {str(t.dtype).removeprefix('torch.')}"] += size
        formula = FLOP_FORMULAS.get(func.overloadpacket)
        if formula is not None:
            counts["flops"] += formula(*args, **kwargs, out_val=out)
        return out

    @contextmanager
    def stage_of(self, name: str):
        previous, self.stage = self.stage, name
        try:
            yield
        finally:
            self.stage = previous


@contextmanager
def cuda_autocast(dtype: torch.dtype | None):
    """torch.autocast("cuda", dtype) at the dispatcher: torch.autocast refuses to switch it on
    without a GPU, the dispatcher's autocast works on fake CUDA tensors all the same."""
    if dtype is None:
        yield
        return
    enabled, previous = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", dtype)
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()
        torch.set_autocast_enabled("cuda", enabled)
        torch.set_autocast_dtype("cuda", previous)


def build_models(args):
    """The full-size random-weight models, on the CPU (moved to fake CUDA by the caller)."""
    from linewatch.config import SamConfig
    from linewatch.detector.backbone import DinoV2Backbone
    from linewatch.detector.describe import DCGA
    from linewatch.detector.sam_attention import use_sdpa_attention
    from linewatch.detector.segment import AreaFilter
    from linewatch.detector.upsample import JBUStack
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    backbone = DinoV2Backbone("vit_small_patch14_dinov2.lvd142m", image_size=args.image_size).eval()
    upsampler = JBUStack(backbone.out_channels, num_stages=3, use_norm=True).eval()
    sam = sam_model_registry["vit_b"](checkpoint=None).eval()
    use_sdpa_attention(sam.image_encoder)
    dcga = DCGA(kernel_size=3, context_weight=0.5).eval()
    area_filter = AreaFilter(0.0005, 0.9, args.max_objects)
    return backbone, upsampler, sam, dcga, area_filter, SamConfig


def count(args, prompts: str) -> dict:
    """Counts of one batch through every stage but measure, for one prompt mode."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    import linewatch.detector.sam_masks as sam_masks
    from linewatch.detector.describe import masked_global_max_pool, padded_soft_masks
    from linewatch.detector.match import match_objects, matching_vectors
    from linewatch.detector.segment import SamSegmenter

    backbone, upsampler, sam, dcga, area_filter, SamConfig = build_models(args)
    b, k, m, s = args.batch, args.k, args.max_objects, args.image_size
    settings = SamConfig(prompts=prompts, points_per_side=args.points_per_side,
                         coarse_points_per_side=args.coarse_points_per_side, points_per_batch=args.points_per_batch)
    counter = RooflineCounter()
    decoded = Counter()
    original_decode = sam_masks.decode_masks

    def counted_decode(decoder, embeddings, image_pe, image_index, sparse, dense):
        decoded["prompts"] += sparse.shape[0]
        with counter.stage_of("segment decoder"):
            return original_decode(decoder, embeddings, image_pe, image_index, sparse, dense)

    cuda = torch.device("cuda")
    with FakeTensorMode(allow_non_fake_inputs=True):
        backbone, upsampler, sam, dcga = (x.to_empty(device=cuda) for x in (backbone, upsampler, sam, dcga))
        segmenter = SamSegmenter(sam, area_filter, settings, model_name="vit_b-random")
        sam.image_encoder.register_forward_pre_hook(lambda *_: setattr(counter, "stage", "segment encoder"))
        sam.image_encoder.register_forward_hook(lambda *_: setattr(counter, "stage", "segment rest"))
        images01 = torch.empty(b, 3, s, s, device=cuda)
        frames = torch.empty(b, args.frame_size, args.frame_size, 3, dtype=torch.uint8, device=cuda)
        seeds = None
        if prompts == "reference_seeded":  # one point inside each part of each of the k references
            seeds = (torch.empty(b, k * m, 2, device=cuda), torch.ones(b, k * m, dtype=torch.bool, device=cuda))
        bank_descriptors = torch.empty(b * k, m, upsampler.channels, device=cuda)
        bank_valid = torch.ones(b * k, m, dtype=torch.bool, device=cuda)
        descriptor_mean = torch.empty(upsampler.channels, device=cuda)
        sam_masks.decode_masks = counted_decode
        try:
            with torch.inference_mode(), counter:
                with cuda_autocast(PRECISIONS[args.precision]):  # the model stages, as Inspector.run
                    with counter.stage_of("backbone"):
                        features = backbone(images01)
                    with counter.stage_of("upsample"):
                        upsampled = upsampler(features, images01).float()
                    with counter.stage_of("segment rest"):
                        masks = segmenter.segment(images01, frames=frames, seeds=seeds)
                with counter.stage_of("describe"):
                    soft, valid, _ = padded_soft_masks(masks.masks, masks.valid, tuple(upsampled.shape[-2:]))
                    descriptors = dcga(masked_global_max_pool(upsampled, soft), valid)
                with counter.stage_of("match"):
                    query = matching_vectors(descriptors, None, descriptor_mean, None, 0.0)
                    reference = matching_vectors(bank_descriptors, None, descriptor_mean, None, 0.0)
                    m_query = query.shape[1]
                    match_objects(query[:, None].expand(b, k, m_query, -1).reshape(b * k, m_query, -1), reference,
                                  valid[:, None].expand(b, k, m_query).reshape(b * k, m_query), bank_valid,
                                  dustbin=1.0, threshold=0.2, iterations=args.sinkhorn_iterations)
        finally:
            sam_masks.decode_masks = original_decode
    stages = {name: dict(counter.counts[name]) for name in STAGE_ORDER if name in counter.counts}
    per_frame_prompts = decoded["prompts"] // b
    return {"prompts": prompts, "batch": b, "prompts_decoded_per_frame": per_frame_prompts, "stages": stages}


def count_measure(args) -> dict:
    """Counts of the measure stage (Inspector.measure, with the CUDA chunk sizes) on real CPU tensors of
    the target shapes: it reads counts back from the device to size its work, which fake tensors cannot.
    Random features; M parts per frame and per good image, each a 24 x 24-cell square on a grid, the
    frame's parts matching its references' (descriptors near theirs): every part matched, none missing."""
    from types import SimpleNamespace

    from linewatch.config import config_from_dict
    from linewatch.detector.inspector import Batch, Encoded, Inspector

    class CudaChunkInspector(Inspector):  # chunks as on a GPU; built without __init__ (no bank file)
        _chunk_floats = Inspector.CUDA_CHUNK_ELEMENTS

    b, k, m, c, side = args.batch, args.k, args.max_objects, 384, args.image_size * 8 // 14
    z = 2 * k  # good images in the bank
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(m, side, side)
    for j in range(m):
        y, x = 4 + 30 * (j // 4), 4 + 30 * (j % 4)
        masks[j, y:y + 24, x:x + 24] = 1.0
    parts = torch.nn.functional.normalize(torch.randn(m, c, generator=g), dim=-1)
    config = config_from_dict({"detector": {
        "backend": "samlad", "device": "cpu", "image_size": args.image_size, "k_references": k,
        "objects": {"max_objects": m}, "score": {"source": "objects"},
        "matching": {"sinkhorn_iterations": args.sinkhorn_iterations}}}).detector
    inspector = object.__new__(CudaChunkInspector)
    inspector.config, inspector.device, inspector.backend = config, torch.device("cpu"), "samlad"
    inspector.models = SimpleNamespace(shape_weight=0.0)
    inspector.bank = SimpleNamespace(
        features=torch.randn(z, c, side, side, generator=g), masks=masks.expand(z, -1, -1, -1).clone(),
        object_valid=torch.ones(z, m, dtype=torch.bool), object_noise=torch.ones(z, m),
        boxes=torch.tensor([[4.0, 4.0, 24.0, 24.0]]).expand(z, m, 4).clone(), shapes=torch.zeros(z, m, 1),
        descriptors=parts + 0.05 * torch.randn(z, m, c, generator=g), threshold=float("inf"))
    inspector.descriptor_mean = inspector.shape_mean = inspector.slots = inspector.patch_index = None
    inspector.noise_floor, inspector.normalisation, inspector.keep_component_maps = 0.25, None, False
    batch = Batch(images=[], sizes=[(args.frame_size, args.frame_size)] * b,
                  references=torch.arange(b * k).view(b, k) % z)
    batch.encoded = Encoded(upsampled=torch.randn(b, c, side, side, generator=g), soft_masks=masks.expand(b, -1, -1, -1),
                            valid=torch.ones(b, m, dtype=torch.bool), boxes=inspector.bank.boxes[:1].expand(b, m, 4),
                            descriptors=parts + 0.05 * torch.randn(b, m, c, generator=g))
    torch.set_num_threads(args.threads)
    batch = inspector.run(batch, ("match",))
    counter = RooflineCounter()
    with torch.inference_mode(), counter, counter.stage_of("measure"):
        batch = inspector.run(batch, ("measure",))
    statuses = Counter(o["status"] for r in batch.results for o in r.objects)
    return {"stages": {"measure": dict(counter.counts["measure"])}, "statuses": dict(statuses)}


def predicted_ms(row: dict, batch: int, bandwidth: float, flops: float) -> float:
    """Roofline time per frame in ms: max(compute, memory) of the batch, over the batch."""
    return max(row.get("flops", 0) / flops, row.get("bytes", 0) / bandwidth) / batch * 1e3


def print_mode(result: dict, bandwidth: float, flops: float) -> None:
    b = result["batch"]
    print(f"\n{result['prompts']}: batch {b}, {result['prompts_decoded_per_frame']} prompts decoded per frame")
    print(f"{'stage':<17}{'GFLOP/frame':>13}{'MB/frame':>11}{'launches/frame':>16}{'bound':>9}{'ms/frame':>10}")
    total = Counter()
    for name, row in result["stages"].items():
        total.update({key: row.get(key, 0) for key in ("flops", "bytes", "launches")})
        bound = "compute" if row.get("flops", 0) / flops > row.get("bytes", 0) / bandwidth else "memory"
        print(f"{name:<17}{row.get('flops', 0) / b / 1e9:>13.2f}{row.get('bytes', 0) / b / 1e6:>11.1f}"
              f"{row['launches'] / b:>16.1f}{bound:>9}{predicted_ms(row, b, bandwidth, flops):>10.3f}")
    stage_ms = sum(predicted_ms(row, b, bandwidth, flops) for row in result["stages"].values())
    print(f"{'TOTAL':<17}{total['flops'] / b / 1e9:>13.2f}{total['bytes'] / b / 1e6:>11.1f}"
          f"{total['launches'] / b:>16.1f}{'':>9}{stage_ms:>10.3f}")
    decoder = result["stages"].get("segment decoder")
    if decoder:
        n = result["prompts_decoded_per_frame"] * b
        dtypes = ", ".join(f"{key.split()[1]} {value / n / 1e6:.1f}" for key, value in sorted(decoder.items())
                           if key.startswith("bytes "))
        print(f"decoder per prompt: {decoder.get('flops', 0) / n / 1e9:.3f} GFLOP, {decoder['bytes'] / n / 1e6:.1f} MB "
              f"({dtypes}), {decoder['launches'] / n:.2f} launches")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="bf16")
    parser.add_argument("--modes", nargs="+", default=["reference_seeded", "full_grid"],
                        choices=["reference_seeded", "full_grid", "coarse_grid"])
    parser.add_argument("--points-per-side", type=int, default=32)
    parser.add_argument("--coarse-points-per-side", type=int, default=8)
    parser.add_argument("--points-per-batch", type=int, default=64)
    parser.add_argument("--k", type=int, default=2, help="reference images per frame")
    parser.add_argument("--max-objects", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--frame-size", type=int, default=1024)
    parser.add_argument("--sinkhorn-iterations", type=int, default=100)
    parser.add_argument("--bandwidth", type=float, default=3.0e12, help="bytes/s")
    parser.add_argument("--flops", type=float, default=790e12, help="FLOP/s")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for the measure stage")
    parser.add_argument("--no-measure", action="store_true", help="skip counting the measure stage")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    results = []
    measure = None
    if not args.no_measure:
        counted = count_measure(args)
        measure = counted["stages"]["measure"]
        print(f"measure counted on the CPU, object statuses of the batch: {counted['statuses']}")
    for mode in args.modes:
        results.append(count(args, mode))
        if measure is not None:
            results[-1]["stages"]["measure"] = measure
        print_mode(results[-1], args.bandwidth, args.flops)
        if args.json:
            args.json.write_text(json.dumps({"torch": torch.__version__, "precision": args.precision,
                                             "bandwidth": args.bandwidth, "flops": args.flops, "modes": results},
                                            indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
