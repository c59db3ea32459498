"""benchmarks/count_syncs.py's counter catches each kind of host sync on hand-made functions, with
exact counts, and counts none for pure elementwise work."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.count_syncs import SYNC_KINDS, count_function


def only(counts: dict[str, int], **expected: int) -> None:
    """The sync kinds of `counts` are `expected` and zero elsewhere."""
    assert {k: counts[k] for k in SYNC_KINDS} == {k: expected.get(k, 0) for k in SYNC_KINDS}
    assert counts["syncs"] == sum(expected.values())


x = torch.tensor([[-1.0, 2.0], [3.0, -4.0]])


@pytest.mark.parametrize("fn, expected", [
    (lambda: x.sum().item(), {"item": 1}),
    (lambda: bool(x.sum() > 0), {"item": 1}),
    (lambda: int(x[0, 1]) + float(x[1, 0]), {"item": 2}),
    (lambda: x.nonzero(), {"nonzero": 1}),
    (lambda: x[x > 0], {"bool_index": 1}),
    (lambda: x[torch.arange(2, device="cpu") > 0], {"bool_index": 1}),
    (lambda: x.clone().__setitem__(x > 0, 0.0), {"bool_index": 1}),  # index_put_ with a mask
    (lambda: torch.masked_select(x, x > 0), {"masked_select": 1}),
    (lambda: torch.unique(x), {"unique": 1}),
    (lambda: torch.tensor([1, 2]), {"host_tensor": 1}),
    (lambda: torch.tensor(float("-inf")), {"host_tensor": 1}),
    (lambda: torch.from_numpy(np.zeros(3)), {"host_tensor": 1}),
    (lambda: x.tolist(), {"tolist": 1}),  # one per call, not one per element
    (lambda: x.cpu().numpy(), {"cpu": 1}),  # the numpy after a counted .cpu() is the same copy
])
def test_each_kind_is_counted_exactly(fn, expected) -> None:
    only(count_function(fn), **expected)


def test_elementwise_work_counts_no_sync_and_its_ops() -> None:
    def work():
        y = x * 2 + 1
        return torch.relu(y).exp() @ y

    counts = count_function(work)
    only(counts)
    assert counts["launches"] == 5 and counts["ops"] == 5  # mul, add, relu, exp, mm


def test_as_tensor_of_a_tensor_and_views_cost_nothing() -> None:
    counts = count_function(lambda: torch.as_tensor(x).view(4).t())
    only(counts)
    assert counts["launches"] == 0


def test_factory_without_device_is_reported_beside_the_syncs() -> None:
    counts = count_function(lambda: (torch.arange(4), torch.zeros(2, device="cpu")))
    only(counts)
    assert counts["host_factory"] == 1


def test_indexing_with_host_data_is_counted_once() -> None:
    only(count_function(lambda: x[[1, 0]]), host_index=1)
    only(count_function(lambda: x[:, np.array([0])]), host_index=1)
    only(count_function(lambda: x.clone().__setitem__(([0], [1]), 5.0)), host_index=1)
    only(count_function(lambda: x[0, 1:]))  # basic indexing: no index tensor at all


def test_torchvision_nms_is_a_sync() -> None:
    from torchvision.ops import nms

    boxes = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 2.0, 1.9]])
    only(count_function(nms, boxes, torch.tensor([0.9, 0.8]), 0.5), nms=1)


# ------------------------------------------------------------------ the SAM segment stage


@pytest.fixture(scope="module")
def tiny_segmenters():
    from linewatch.config import SamConfig
    from linewatch.detector.segment import AreaFilter, SamSegmenter, build_tiny_sam

    sam = build_tiny_sam(seed=0).eval()
    settings = dict(points_per_side=2, coarse_points_per_side=1, points_per_batch=4, pred_iou_thresh=0.0,
                    stability_score_thresh=0.0)
    return {prompts: SamSegmenter(sam, AreaFilter(0.0005, 0.9, 3), SamConfig(prompts=prompts, **settings))
            for prompts in ("full_grid", "reference_seeded")}


@pytest.mark.parametrize("prompts", ["full_grid", "reference_seeded"])
def test_sam_segment_stage_reads_nothing_back(tiny_segmenters, prompts) -> None:
    """SamSegmenter.segment (the Inspector's segment stage) on a batch of 2 with the batched generator:
    no host sync of any kind, whatever the prompts; the per-image list form reads the counts once."""
    seg = tiny_segmenters[prompts]
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    frames = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    seeds = (torch.rand(2, 3, 2, generator=torch.Generator().manual_seed(2)), torch.tensor([[True, True, False]] * 2))
    kwargs = dict(frames=frames, seeds=seeds if seg.wants_seeds else None)
    with torch.inference_mode():
        counts = count_function(seg.segment, images, **kwargs)
        only(counts)
        assert counts["launches"] > 100  # it did run the model
        only(count_function(seg, images, **kwargs), tolist=1)


def test_counting_leaves_torch_as_it_was() -> None:
    """Patching torch.Tensor.__getitem__ (even set back after) left tensors looking like sequences
    to CPython, and torch.tensor() of 0-d tensors failed in whatever test ran next in the process."""
    count_function(lambda: torch.ones(3)[torch.tensor([0])])
    x = torch.arange(5)
    assert torch.tensor([[x.min(), x.max()]]).tolist() == [[0, 4]]


def test_under_inference_mode_composite_ops_count_as_their_kernels() -> None:
    """There a dispatch mode sees linear, matmul or .to whole: they count as the kernels they run."""
    linear = torch.nn.Linear(2, 3)
    with torch.inference_mode():
        assert count_function(linear, x)["launches"] == 1  # addmm; its t() is a view
        assert count_function(lambda: x.to(torch.float32))["launches"] == 0  # already float32: no kernel
        assert count_function(lambda: x @ x)["launches"] == 1  # mm
