"""benchmarks/roofline.py's counter: FLOPs, bytes and launches of hand-made functions, exact; CUDA
autocast's casts on fake CUDA tensors without a GPU."""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from benchmarks.roofline import RooflineCounter, cuda_autocast, unique_bytes


def counted(fn, *args) -> dict[str, int]:
    counter = RooflineCounter()
    with counter:
        fn(*args)
    return dict(counter.counts["other"])


def test_a_matrix_product_by_hand() -> None:
    a, b = torch.ones(2, 3), torch.ones(3, 4)
    counts = counted(torch.mm, a, b)
    assert counts["flops"] == 2 * 2 * 3 * 4  # a multiply-add is 2 FLOPs
    assert counts["bytes"] == 4 * (2 * 3 + 3 * 4 + 2 * 4)  # both inputs and the output, float32
    assert counts["launches"] == counts["ops"] == 1


def test_an_expanded_input_is_read_once_and_views_move_nothing() -> None:
    x, row = torch.ones(5, 4), torch.ones(1, 4)
    counts = counted(lambda: x + row.expand(5, 4))
    assert counts["bytes"] == 4 * (20 + 4 + 20)
    assert counts["launches"] == 1 and counts["ops"] == 2  # the expand is a view
    assert counted(lambda: x.t().reshape(20)).get("bytes", 0) == 4 * 40  # a copy of the transposed view
    assert unique_bytes(torch.ones(3, 1).expand(3, 7)) == 12


def test_under_inference_mode_composite_ops_count_as_their_kernels() -> None:
    linear = torch.nn.Linear(3, 2)
    x = torch.ones(4, 3)
    with torch.inference_mode():
        counts = counted(linear, x)
        assert counts["launches"] == 1 and counts["flops"] == 2 * 4 * 3 * 2  # addmm (the t() is a view)
        assert counted(lambda: x.to(torch.float32)).get("launches", 0) == 0  # a no-op .to is no kernel
        assert counted(lambda: x.to(torch.float64))["bytes"] == 4 * 12 + 8 * 12


def test_cuda_autocast_on_fake_cuda_tensors() -> None:
    """Matrix products in bf16, layer_norm back in float32, as torch.autocast("cuda") does on a GPU;
    autocast is off again after."""
    linear = torch.nn.Linear(8, 8)
    with FakeTensorMode(allow_non_fake_inputs=True):
        linear = linear.to_empty(device="cuda")
        x = torch.empty(2, 8, device="cuda")
        with cuda_autocast(torch.bfloat16):
            y = linear(x)
            z = torch.nn.functional.layer_norm(y, (8,))
        assert (y.dtype, z.dtype) == (torch.bfloat16, torch.float32)
        assert linear(x).dtype == torch.float32
    assert not torch.is_autocast_enabled("cuda")
