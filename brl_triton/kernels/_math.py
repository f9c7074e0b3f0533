"""Scalar rules every kernel applies the same way: the step function, breakpoint rounding, the
encoding of the largest negative logit, and the power-of-two fixed-point scales.

float64 scalars (delta) reach the kernels as their int64 bit pattern: a Python float argument
becomes a float32 kernel argument on a GPU, which would round delta and 1/(2 delta).
"""

from __future__ import annotations

import struct

import triton
import triton.language as tl

# status words of one loss call (int64). The kernels after the scan read p and the edge count
# here, so that the host never needs them to size a launch; with ``validate`` the host reads the
# first seven once, for the exceptions of bad values.
STATUS_POSITIVES = tl.constexpr(0)  # positives found (the compaction's slot counter)
STATUS_NUM_EDGES = tl.constexpr(1)  # bin edges the reduction uses; 0: finiteness check only
STATUS_BAD_TARGETS = tl.constexpr(2)  # 2 if a float target is NaN/Inf, else 1 if one is above one
STATUS_BAD_LOGITS = tl.constexpr(3)  # 1 if a logit is NaN/Inf
STATUS_MAX_NEGATIVE = tl.constexpr(4)  # largest negative logit, encoded by max_negative_code (deterministic mode)
STATUS_LARGEST = tl.constexpr(5)  # the largest finite logit, encoded by max_negative_code
STATUS_LARGEST_NEGATED = tl.constexpr(6)  # the largest finite -logit (the smallest logit), encoded alike
STATUS_INVALID = tl.constexpr(7)  # 1: the call's values are bad (``finish`` decides; outputs are NaN)
STATUS_WORDS = tl.constexpr(8)


def float_bits(x: float) -> int:
    """The int64 bit pattern of a float64, for :func:`bits_to_float64` inside a kernel."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


@triton.jit
def bits_to_float64(bits):
    return bits.to(tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def upcast(x, dtype: tl.constexpr):
    """``x.to(dtype)`` that keeps bfloat16 subnormals: bfloat16 is the top half of a float32, so
    the bits are moved rather than converted (the Triton interpreter's conversion flushes them;
    a GPU's is exact, and this compiles to the same shift)."""
    if x.dtype == tl.bfloat16:
        x = (x.to(tl.int16, bitcast=True).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def step(x, inv_two_delta, SMOOTH: tl.constexpr):
    """H(x): clamp(x / 2delta + 1/2, 0, 1), or x >= 0 when delta == 0 (the 1/2 is added after the
    difference, where it cannot vanish next to huge logits)."""
    if SMOOTH:
        return tl.minimum(tl.maximum(x * inv_two_delta + 0.5, 0.0), 1.0)
    else:
        return (x >= 0).to(x.dtype)


@triton.jit
def positive_order_key(y):
    """An int64 whose order is that of the float64 ``y`` where y >= 0 (positives' targets): its
    bit pattern. Comparing keys in the tile loops takes integer instructions instead of float64
    ones (1/64 of the float32 rate on GeForce GPUs)."""
    return y.to(tl.float64).to(tl.int64, bitcast=True)


@triton.jit
def rounded_up_sum(a, b):
    """The smallest value of a's dtype that is >= the exact a + b (TwoSum gives the rounding
    error of a + b). Breakpoints ``s -/+ delta`` rounded up never leave values on both sides of a
    kink inside one bin."""
    total = a + b
    b_part = total - a
    error = (a - (total - b_part)) + (b - b_part)
    if total.dtype == tl.float64:
        bits = total.to(tl.int64, bitcast=True)
    else:
        bits = total.to(tl.int32, bitcast=True)
    up_bits = tl.where(total > 0, bits + 1, tl.where(total < 0, bits - 1, 1))
    up = up_bits.to(total.dtype, bitcast=True)
    return tl.where(error > 0, up, total)


@triton.jit
def max_negative_code(s):
    """An int64 whose order is that of the float64 ``s`` and which is > 0 for any finite value,
    so that an atomic max into a zeroed word finds the largest one. It rounds up by at most one
    unit in the last place (a safe bound)."""
    bits = s.to(tl.float64).to(tl.int64, bitcast=True)
    ordered = bits ^ ((bits >> 63) & 0x7FFFFFFFFFFFFFFF)
    return (ordered >> 1) + 4611686018427387904  # 2^62


def decode_code(code: int) -> float:
    """The host's :func:`decode_max_negative`: the float64 an int64 code stands for."""
    ordered = ((code - 4611686018427387904) << 1) | 1
    ordered &= 0xFFFFFFFFFFFFFFFF
    if ordered >= 1 << 63:  # as the kernel's signed int64
        ordered -= 1 << 64
    bits = ordered ^ ((ordered >> 63) & 0x7FFFFFFFFFFFFFFF)
    return struct.unpack("<d", struct.pack("<q", bits))[0]


@triton.jit
def decode_max_negative(code):
    ordered = ((code - 4611686018427387904) << 1) | 1
    bits = ordered ^ ((ordered >> 63) & 0x7FFFFFFFFFFFFFFF)
    return bits.to(tl.float64, bitcast=True)


@triton.jit
def power_of_two_scale(bound):
    """2^(62 - e) with 2^e >= bound (float64 > 0): integers of |x| * scale for values whose sum
    is at most ``bound`` in magnitude cannot overflow int64. Built from the exponent bits, exact."""
    exponent = ((bound.to(tl.int64, bitcast=True) >> 52) & 0x7FF) - 1022  # > log2(bound)
    e = tl.minimum(tl.maximum(62 - exponent, -1000), 1000)
    return ((e + 1023) << 52).to(tl.float64, bitcast=True)


@triton.jit
def offset_scale(status_ptr, edges_ptr, n):
    """Fixed-point scale of the per-bin offset sums (deterministic mode): every relevant negative's
    offset from its bin's lower edge is at most (largest negative logit - edges[0]), and at most
    n of them add up. Only relevant logits matter, so a far-off irrelevant one costs nothing."""
    code = tl.load(status_ptr + STATUS_MAX_NEGATIVE)
    largest = decode_max_negative(code) - tl.load(edges_ptr).to(tl.float64)
    largest = tl.where((code > 0) & (largest > 1e-30), largest, 1e-30)
    return power_of_two_scale(largest * n)


@triton.jit
def zero_sums(BLOCK: tl.constexpr, DETERMINISTIC: tl.constexpr):
    """Accumulators for :func:`fixed_sum`: int64 fixed point (DETERMINISTIC) or float64."""
    if DETERMINISTIC:
        return tl.zeros([BLOCK], dtype=tl.int64)
    else:
        return tl.zeros([BLOCK], dtype=tl.float64)


@triton.jit
def fixed_sum(acc, terms, scale, DETERMINISTIC: tl.constexpr):
    """``acc + sum(terms, axis=1)``: in the dtype of ``acc`` (float32 for a span of float32 tiles,
    see ``tiles.py``), or, DETERMINISTIC (deterministic mode), as int64 fixed point, which is exact
    whatever the tile shape."""
    if DETERMINISTIC:
        return acc + tl.sum(tl.floor(terms.to(tl.float64) * scale + 0.5).to(tl.int64), axis=1)
    else:
        return acc + tl.sum(terms, axis=1).to(acc.dtype)


@triton.jit
def fixed_value(acc, scale, DETERMINISTIC: tl.constexpr):
    if DETERMINISTIC:
        return acc.to(tl.float64) / scale
    else:
        return acc


@triton.jit
def bad_values(status_ptr, p_bound, n, delta, limit):
    """True where the host's checks would raise, decided on the device (``validate=False``): a
    bad target or logit, more positives than the launches were sized for (``p_bound``), or
    logits too far apart for the compute dtype, whose largest value is ``limit``
    (``_checks.check_logit_range``: ``n * ((high + delta) - (low - delta))`` must not overflow)."""
    flags = tl.load(status_ptr + STATUS_BAD_TARGETS) | tl.load(status_ptr + STATUS_BAD_LOGITS)
    high = decode_max_negative(tl.load(status_ptr + STATUS_LARGEST))
    low = -decode_max_negative(tl.load(status_ptr + STATUS_LARGEST_NEGATED))
    widest = ((high + delta) - (low - delta)) * n
    return (flags != 0) | (tl.load(status_ptr + STATUS_POSITIVES) > p_bound) | ~(widest <= limit)


@triton.jit
def positives_and_edges(status_ptr, p_bound):
    """p and the edge count of the call, as int32, from the status words (p at most ``p_bound``,
    the positives the buffers hold; more is a bad call, which ``bad_values`` reports)."""
    p = tl.minimum(tl.load(status_ptr + STATUS_POSITIVES), p_bound).to(tl.int32)
    return p, tl.load(status_ptr + STATUS_NUM_EDGES).to(tl.int32)
