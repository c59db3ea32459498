"""Count host synchronisations and aten ops per Inspector stage of the samlad path, on the CPU.

    python benchmarks/count_syncs.py [--batch 8] [--points-per-side N] [--json OUT.json]

Builds the tiny random-weight SAM-LAD models of the tests (tests/detector/samlad_models.py:
112 px frames and backbone input, 1-block ViT-S-like DINOv2 with 48 channels, two 2x JBU stages,
a 1-block 32-channel SAM whose encoder still takes 1024 x 1024, k = 2), a bank from 4 good and 2
validation sim images, then per prompt mode (full_grid, reference_seeded) judges one warm-up batch
uncounted and one batch of --batch frames under a TorchDispatchMode, one stage at a time
(Inspector.run(batch, (stage,))), counting:

  item          aten._local_scalar_dense: .item(), bool(), int(), float() of a tensor
  tolist        calls of Tensor.tolist (one each; the per-element reads inside are not counted)
  cpu           Tensor.cpu() calls (no-ops on a CPU run; on CUDA each is a blocking copy)
  nonzero       aten.nonzero (nonzero_static has a fixed shape: not a sync)
  masked_select aten.masked_select
  unique        aten._unique / _unique2 / unique_dim / unique_consecutive ...
  bool_index    aten.index / index_put(_) with a boolean index (result shape depends on the data)
  host_index    t[i] / t[i] = v with a Python list or numpy array in the index (Tensor.__getitem__ /
                __setitem__ patched): on CUDA the index is made on the host and copied over
  nms           torchvision.nms: its CUDA kernel copies the overlap mask to the host
  host_tensor   torch.tensor(data), torch.as_tensor(non-tensor data), torch.from_numpy (seen with a
                TorchFunctionMode): host data, so on CUDA a copy from the host (with device= or by a
                later .to(device)); e.g. torch.tensor([W, H], device=...) or torch.tensor(-inf)
The sum of these is "syncs". Reported beside them, not in the sum:
  numpy         Tensor.numpy / np.asarray(tensor) not on the result of a counted .cpu(): on CUDA a
                device tensor needs a .cpu() first (counted), so these are host tensors (preprocess
                fills its upload buffer through one); a `.to("cpu")` copy would show only here
  host_factory  factory calls (arange, zeros, ones, full, empty, linspace, rand*, eye, as_tensor,
                tensor) made without device= (seen with a TorchFunctionMode): on this CPU run they
                are where the model is; on CUDA they are host tensors, so the op that meets a device
                tensor copies them (e.g. segment-anything's get_rel_pos indexes with a CPU arange).
                Some are meant to be on the host (preprocess's uint8 frame batch).
  lift_fresh    aten.lift_fresh(_copy) / scalar_tensor not under a counted torch.tensor: a Python
                scalar made a tensor by `t[index] = scalar` (on CUDA created on the device: no sync)
  ops           every aten op dispatched (a CompositeImplicitAutograd op, e.g. linear or matmul, as
                the ops it decomposes into: under inference_mode the mode sees them whole); launches = ops less views and metadata-only ops (views,
                detach, empty*, lift_fresh, _local_scalar_dense): roughly the kernel launches CUDA
                would see per op (a CPU run may take other decompositions than CUDA; fused CUDA
                kernels, e.g. SDPA's, are one op either way).

Stream synchronisations (stream.synchronize, events) and device-side copies do not exist on a CPU
run and are not counted. Per-frame figures are the batch's divided by --batch.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter, defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # this checkout's linewatch (and tests' tiny models)
    sys.path.insert(0, str(ROOT))

aten = torch.ops.aten

SYNC_KINDS = ("item", "tolist", "cpu", "nonzero", "masked_select", "unique", "bool_index", "host_index",
              "host_tensor", "nms")
INFO_KINDS = ("numpy", "host_factory", "lift_fresh")
UNIQUE = {"_unique", "_unique2", "unique_dim", "unique_consecutive", "unique_dim_consecutive"}
INDEX = {"index", "index_put", "index_put_", "_index_put_impl", "_index_put_impl_", "_unsafe_index_put"}
NO_KERNEL = {"detach", "alias", "lift_fresh", "lift_fresh_copy", "_local_scalar_dense", "empty", "empty_strided",
             "_unsafe_view", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "scalar_tensor"}
INDEXING = (torch.Tensor.__getitem__, torch.Tensor.__setitem__)
FACTORIES = ("arange", "zeros", "ones", "full", "empty", "linspace", "rand", "randn", "randint", "eye", "as_tensor",
             "tensor")


KEEP_WHOLE = (torch.ops.prim.device.default, aten.scaled_dot_product_attention.default)


def decomposed(mode: TorchDispatchMode, func, args, kwargs):
    """A CompositeImplicitAutograd op (linear, matmul, layer_norm, to, ...) run as its decomposition
    through `mode` again (as torch.utils.flop_counter does, but always the C++ kernel), or NotImplemented for any other op.
    Under inference_mode such ops reach a dispatch mode whole; counted whole, a no-op `.to` would
    be a launch and a matmul that copies its operands one. Attention stays whole: one fused kernel
    on a GPU (its decomposition depends on the device and, on fake tensors, is the unfused one)."""
    composite = torch._C.DispatchKey.CompositeImplicitAutograd
    if func in KEEP_WHOLE or not torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), composite):
        return NotImplemented
    with mode:  # the C++ kernel eager runs (OpOverload.decompose would prefer a Python decomposition)
        return func._op_dk(composite, *args, **kwargs)


class SyncCounter(TorchDispatchMode):
    """Counts sync kinds and ops under `stage` (set it between stages); `counts[stage][kind]`.
    Use `with counter.active():` (the dispatch mode plus the Python-level patches)."""

    def __init__(self) -> None:
        super().__init__()
        self.stage = "all"
        self.counts: dict[str, Counter] = defaultdict(Counter)
        self._quiet = 0  # inside a patched Tensor method: its own dispatches are not counted as syncs
        self._host = set()  # ids of tensors returned by a counted .cpu()

    def add(self, kind: str, n: int = 1) -> None:
        self.counts[self.stage][kind] += n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = decomposed(self, func, args, kwargs)
        if out is not NotImplemented:
            return out
        name = func.overloadpacket.__name__
        self.add("ops")
        if not (func.is_view or name in NO_KERNEL):
            self.add("launches")
        if not self._quiet:
            kind = self.sync_kind(name, args, func.namespace)
            if kind:
                self.add(kind)
        return func(*args, **kwargs)

    @staticmethod
    def sync_kind(name: str, args, namespace: str = "aten") -> str | None:
        if namespace == "torchvision":
            return "nms" if name == "nms" else None
        if name == "_local_scalar_dense":
            return "item"
        if name == "nonzero":
            return "nonzero"
        if name == "masked_select":
            return "masked_select"
        if name in UNIQUE:
            return "unique"
        if name in INDEX and len(args) > 1:
            if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1]):
                return "bool_index"
        if name in ("lift_fresh", "lift_fresh_copy", "scalar_tensor"):
            return "lift_fresh"
        return None

    @contextmanager
    def active(self):
        counter = self
        # indexing is counted by FactoryCounter, not by patching torch.Tensor.__getitem__: a Python
        # __getitem__ set on the class, even once and set back, leaves CPython's sequence slot on it,
        # and torch.tensor() then takes every tensor for a sequence (len() of a 0-d tensor) in
        # whatever runs next in the process
        originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy", "cpu")}

        def patched(name, kind_of):
            original = originals[name]

            def method(tensor, *args, **kwargs):
                kind = None if counter._quiet else kind_of(tensor, *args)  # not again through __torch_function__
                if kind:
                    counter.add(kind)
                counter._quiet += 1
                try:
                    out = original(tensor, *args, **kwargs)
                finally:
                    counter._quiet -= 1
                if name == "cpu":
                    counter._host.add(id(out))
                return out
            return method

        from_numpy = torch.from_numpy  # no __torch_function__ and no dispatch: patched where code looks it up

        def counted_from_numpy(array):
            if not counter._quiet:
                counter.add("host_tensor")
            return from_numpy(array)

        torch.from_numpy = counted_from_numpy
        torch.Tensor.tolist = patched("tolist", lambda t: "tolist")
        torch.Tensor.numpy = patched("numpy", lambda t, *a: None if id(t) in counter._host else "numpy")
        torch.Tensor.cpu = patched("cpu", lambda t, *a: "cpu")
        try:
            with FactoryCounter(self), self:
                yield self
        finally:
            for name, original in originals.items():
                setattr(torch.Tensor, name, original)
            torch.from_numpy = from_numpy
            self._host.clear()

    def table(self) -> dict[str, dict[str, int]]:
        """{stage: {kind: count, ..., "syncs": sum of SYNC_KINDS}}."""
        out = {}
        for stage, counts in self.counts.items():
            row = {kind: counts.get(kind, 0) for kind in (*SYNC_KINDS, *INFO_KINDS, "ops", "launches")}
            row["syncs"] = sum(row[k] for k in SYNC_KINDS)
            out[stage] = row
        return out


def host_index(index) -> bool:
    """Whether an index holds a Python list (of numbers) or a numpy array: advanced indexing from host data."""
    import numpy as np

    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, (list, np.ndarray)) for p in parts)


class FactoryCounter(TorchFunctionMode):
    """host_tensor and host_factory: torch calls that make tensors from host data, and factory
    calls without device= (see the module docstring)."""

    def __init__(self, counter: SyncCounter) -> None:
        super().__init__()
        self.counter = counter
        self.factories = {getattr(torch, name) for name in FACTORIES}
        self.from_host = {torch.tensor, torch.as_tensor}  # torch.from_numpy: patched in SyncCounter.active

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        counter = self.counter
        if counter._quiet:
            return func(*args, **kwargs)
        if func in self.from_host and not (args and isinstance(args[0], torch.Tensor)):
            counter.add("host_tensor")
            counter._quiet += 1  # its lift_fresh is this one
            try:
                return func(*args, **kwargs)
            finally:
                counter._quiet -= 1
        if func in self.factories and kwargs.get("device") is None:
            counter.add("host_factory")
        if func in INDEXING and len(args) > 1 and host_index(args[1]):
            counter.add("host_index")  # the ops inside are counted too (x[x > 0] is a bool_index)
        return func(*args, **kwargs)


def count_function(fn, *args, **kwargs) -> dict[str, int]:
    """Counts of one call of fn (stage "all"), as SyncCounter.table's row."""
    counter = SyncCounter()
    with counter.active():
        fn(*args, **kwargs)
    return counter.table().get("all", {kind: 0 for kind in (*SYNC_KINDS, *INFO_KINDS, "ops", "launches", "syncs")})


# ---------------------------------------------------------------------------------------- the samlad run


def measure_mode(prompts: str, args, work: Path) -> dict:
    import numpy as np

    from linewatch.bank_builder import build_bank
    from linewatch.detector.inspector import STAGES, Batch, Inspector
    from linewatch.sim import render
    from tests.detector.samlad_models import samlad_config, tiny_samlad_models, write_images

    config = samlad_config(work, prompts)
    sam = config.detector.samlad.sam
    if args.points_per_side is not None:
        sam.points_per_side = args.points_per_side
    if args.coarse_points_per_side is not None:
        sam.coarse_points_per_side = args.coarse_points_per_side
    if args.points_per_batch is not None:
        sam.points_per_batch = args.points_per_batch
    torch.set_num_threads(args.threads)
    models = tiny_samlad_models(config)
    write_images(work / "good", 4, seed=1)
    write_images(work / "val", 2, seed=2)
    bank = build_bank(config, work / "good", work / "val", models=models, batch_size=2, progress=False)
    inspector = Inspector(config.detector, models, bank, torch.device("cpu"))

    def frames(seed: int) -> list:
        kinds = (None, "missing")
        return [render("screw_tray", np.random.default_rng([seed, i]), anomaly=kinds[i % 2], size=112)[0]
                for i in range(args.batch)]

    started = time.perf_counter()
    inspector.inspect(frames(10))  # warm-up, uncounted
    warm_s = time.perf_counter() - started
    counter = SyncCounter()
    batch = Batch(images=frames(11))
    started = time.perf_counter()
    with torch.no_grad(), counter.active():
        for stage in STAGES:
            counter.stage = stage
            batch = inspector.run(batch, (stage,))
    counted_s = time.perf_counter() - started
    assert len(batch.results) == args.batch
    table = counter.table()
    total = {kind: sum(row[kind] for row in table.values()) for kind in next(iter(table.values()))}
    return {"prompts": prompts, "batch": args.batch, "k_references": config.detector.k_references,
            "image_size": config.detector.image_size, "points_per_side": sam.points_per_side,
            "coarse_points_per_side": sam.coarse_points_per_side, "points_per_batch": sam.points_per_batch,
            "warm_up_s": round(warm_s, 2), "counted_s": round(counted_s, 2),
            "stages": table, "total": total}


def print_mode(result: dict, flush: bool = False) -> None:
    b = result["batch"]
    print(f"\n{result['prompts']}: batch {b}, k={result['k_references']}, {result['image_size']} px, "
          f"grid {result['points_per_side']}^2 (coarse {result['coarse_points_per_side']}^2), "
          f"points_per_batch {result['points_per_batch']}; counted batch {result['counted_s']} s")
    kinds = [k for k in (*SYNC_KINDS, *INFO_KINDS) if result["total"][k]]
    header = f"{'stage':<11}" + "".join(f"{k:>14}" for k in kinds) + f"{'syncs/batch':>13}{'launches/batch':>16}{'launches/frame':>16}{'ops/frame':>11}"
    print(header)
    for stage, row in [*result["stages"].items(), ("TOTAL", result["total"])]:
        print(f"{stage:<11}" + "".join(f"{row[k]:>14}" for k in kinds)
              + f"{row['syncs']:>13}{row['launches']:>16}{row['launches'] / b:>16.1f}{row['ops'] / b:>11.1f}",
              flush=flush)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--modes", nargs="+", default=["reference_seeded", "full_grid"],
                        choices=["reference_seeded", "full_grid", "coarse_grid"])
    parser.add_argument("--points-per-side", type=int, help="full grid (default: the tests' 2)")
    parser.add_argument("--coarse-points-per-side", type=int, help="coarse grid (default: the tests' 1)")
    parser.add_argument("--points-per-batch", type=int, help="SAM decoder chunk (default 64)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the counts here")
    args = parser.parse_args(argv)
    results = []
    for mode in args.modes:
        with tempfile.TemporaryDirectory() as tmp:
            results.append(measure_mode(mode, args, Path(tmp)))
        print_mode(results[-1], flush=True)
        if args.json:  # after each mode: a run stopped in the next one keeps this one's counts
            args.json.write_text(json.dumps({"torch": torch.__version__, "device": "cpu", "modes": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
