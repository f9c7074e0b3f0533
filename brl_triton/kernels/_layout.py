"""Reading a tensor of any layout in its logical (row-major) element order, without a copy.

A streaming kernel addresses element ``i`` of the flattened tensor. For contiguous tensors and
1-D views with one stride (``scores[:, k]``, ``x[::2]``) that is ``i * stride``; after merging
dimensions that are contiguous with each other, a view with at most three dimensions left
(expanded stride-0 targets, ``logits[:, :, k]``, channels-last activations) is addressed by
division. Anything else is copied once. Logical order matters: positives tied in their logits
are ordered by flat position, which is what makes a view and its contiguous copy give the same
results.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

MAX_DIMS = 3


@dataclass(frozen=True)
class Layout:
    """``tensor``: what the kernel reads; ``args``: (d1, d2, st0, st1, st2) for :func:`element_address`."""

    tensor: torch.Tensor
    ndim: int  # 1: flat with stride st0; 3: three dims of sizes (., d1, d2)
    args: tuple


def _merged_dims(t: torch.Tensor):
    """Sizes and strides with size-1 dims dropped and mergeable neighbours merged."""
    sizes, strides = [], []
    for size, stride in zip(t.shape, t.stride()):
        if size == 1:
            continue
        if sizes and strides[-1] == size * stride:
            sizes[-1] *= size
            strides[-1] = stride
        else:
            sizes.append(size)
            strides.append(stride)
    return sizes, strides


def layout(t: torch.Tensor) -> Layout:
    """How a kernel reads ``t`` in logical order; a contiguous copy only beyond MAX_DIMS dims."""
    sizes, strides = _merged_dims(t)
    if len(sizes) <= 1:
        return Layout(t, 1, (1, 1, strides[0] if strides else 1, 0, 0))
    if len(sizes) > MAX_DIMS:
        return Layout(t.contiguous(), 1, (1, 1, 1, 0, 0))
    sizes, strides = [1] * (MAX_DIMS - len(sizes)) + sizes, [0] * (MAX_DIMS - len(strides)) + strides
    return Layout(t, MAX_DIMS, (sizes[1], sizes[2], *strides))


@triton.jit
def element_address(offs, d1, d2, st0, st1, st2, NDIM: tl.constexpr):
    """Memory offset (in elements) of logical element ``offs`` (int64)."""
    if NDIM == 1:
        return offs * st0
    else:
        inner = offs % d2
        outer = offs // d2
        return (outer // d1) * st0 + (outer % d1) * st1 + inner * st2


@triton.jit
def load_elements(ptr, offs, d1, d2, st0, st1, st2, NDIM: tl.constexpr, inside, whole_block, other):
    """Logical elements ``offs`` of a layout, ``other`` where not ``inside``. A block that lies
    wholly inside (``whole_block``, a scalar) is loaded without a mask: with a unit stride and a
    16-divisible start, the compiler can then prove 16-byte alignment and emit vector loads
    (``ld.global.v4``); a mask that may end anywhere keeps every load scalar."""
    address = ptr + element_address(offs, d1, d2, st0, st1, st2, NDIM)
    if whole_block:
        value = tl.load(address)
    else:
        value = tl.load(address, mask=inside, other=other)
    return value
