"""Triton backend: the losses of ``docs/losses.md`` as a handful of Triton launches and at
most one host sync, reading inputs of any layout in place (``brl_triton.kernels``).

It supplies the steps of ``pipeline`` (N elements, p positives, E <= 2p edges); for p below
``min(N, 32768)`` and float32 compute:

forward
    ``find_positives`` (fused with the bin reduction)
    1. ``torch.zeros`` of the status words (positives found, edge count, error flags).
    2. ``positives.scan``: one pass over the targets compacts the positives' positions.
    3. ``positives.prepare`` (one program per block of positives): sorts them by counting ranks,
       builds the bin edges, zeroes the bins; aLRP: places the regression losses.
    4. ``streaming.reduce``: one pass over logits and targets: count and offset sum per bin, and the
       finiteness check of the logits. It reads the edge count from the device.
    5. with ``validate`` only: the one host sync, the status words, to raise for bad values.
    ``reduce_bins``: hands on the bins of step 4.
    ``gradient_tables``
    6. ``tiles.per_positive``: FP, rank+, sorting sums and the per-positive formulas.
       (``tiles.running_maximum`` for the interpolated AP; ``tiles.localisation`` for aLRP.)
    7. ``tiles.finish``: sorting gradient, per-bin gradient tables and the loss outputs.
backward
    8. ``distribute``, ``streaming.distribute``: one pass writes every element's gradient, scaled by the upstream
       gradients read on the device; extra programs of the same launch write the positives'.

That is 7 launches for forward+backward (8 for the interpolated AP, 9 for aLRP with the
multiply of its regression losses' gradient), and one host sync with ``validate``, none
without: the grids are sized by bounds the host knows, and the kernels read p and the edge
count from the status words. More positives than one program sorts, float64 logits, and
``process_group`` take a slower path with torch ops for the positives (sort, edges, all-gather),
more launches and the host read; a second compaction pass runs when p exceeds the first's room.

Streaming traffic per element (float32 logits and targets): scan 4 B, reduction 8 B,
distribution 12 B, 24 B in all; deterministic mode reads the logits in the scan too (28 B).
Everything else is O(p^2) work on O(p + E) data, or from ``TRITON_SWEEP_FROM`` positives on, the torch
backend's O(p log p) sweeps on the same bins (torch ops, about 15 per level of log2 p).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import torch

from . import _tables, pipeline
from ._edges import bin_edges
from ._checks import NON_FINITE_LOGITS, NON_FINITE_TARGETS, TARGETS_ABOVE_ONE, NonFiniteError, check_logit_range
from ._common import compute_dtype
from ._distributed import all_reduce_bins, gather_positives
from .kernels import _math, positives, streaming, tiles
from .kernels._config import on_device, read_host
from .kernels._layout import layout

# From this many positives on, step 3 runs the torch backend's sweeps (O(p log p)) instead of the
# register tiles (O(p^2) in few launches). An estimate, not a measurement: no GPU was at hand. At
# 32k positives the tiles do ~10^9 pair terms (a few ms on a large GPU). A forward+backward on the
# sweeps, counted with a TorchDispatchMode (the bound is asserted in tests/test_gpu_semantics.py):
# Rank & Sort about 1,060 + 70 log2(p / 600) launches (~1,460 at 32k: one wavelet level per bit
# of p), the AP losses and aLRP at most 300 whatever p, and at most 6 host syncs for every loss:
# ~10 ms and ~2 ms of launch latency. So the crossover is likely higher for Rank & Sort than for
# AP; one threshold until it is measured. `python -m benchmarks.gpu_check` times both (its
# crossover step) on a GPU.
TRITON_SWEEP_FROM = 32768



def streamed_bytes_per_element(logits_dtype: torch.dtype, targets_dtype: torch.dtype,
                               deterministic: bool = False) -> int:
    """Bytes that one forward+backward moves per element through memory: the scan reads the
    targets (and, deterministic, the logits), the reduction logits and targets, the distribution
    logits and targets and writes the gradient (in the logits' dtype)."""
    s, y = logits_dtype.itemsize, targets_dtype.itemsize
    return y + (s if deterministic else 0) + (s + y) + (s + y + s)


@dataclass
class KernelBins:
    """The bins as the kernels read them: edges (E,) in the compute dtype, count and offset sum
    (E + 1, key 0 = no bin; offsets int64 fixed point when ``fixed_point``), the status words,
    the elements the reduction saw and a bound on the relevant negatives."""

    edges: torch.Tensor
    count: torch.Tensor
    offset_sum: torch.Tensor
    status: torch.Tensor
    n: int
    fixed_point: bool
    fp_bound: int


@dataclass
class TritonPositives(pipeline.Positives):
    """The positives, and what ``find_positives`` hands on to ``reduce_bins``: the bins it reduced
    ahead (when one program sorted the positives), or the status words of its pass."""

    status: torch.Tensor | None = None
    reduced: KernelBins | None = None
    flat_rank: torch.Tensor | None = None  # aLRP, when ``prepare`` placed the regression losses
    regression_count: int = 0  # and how many there are (the buffers have room for at least one)


def _loadable(targets: torch.Tensor) -> torch.Tensor:
    return targets.view(torch.uint8) if targets.dtype == torch.bool else targets


def triton_inputs(logits: torch.Tensor, targets: torch.Tensor):
    """The kernels read logits and targets as they are: any layout, any supported dtype."""
    return logits.detach(), _loadable(targets.detach())


def _checked_status(status: torch.Tensor, delta, n: int, compute: torch.dtype) -> tuple[int, int]:
    """The host's one read of the status words: p and the edge count, after raising for bad
    targets or logits (the flags the scan and the reduction set) and logits too far apart."""
    p, num_edges, bad_targets, bad_logits, _, largest, smallest_negated = read_host(
        status[:_math.STATUS_LARGEST_NEGATED.value + 1])
    if bad_targets == 2:
        raise NonFiniteError(NON_FINITE_TARGETS)
    if bad_targets == 1:
        raise ValueError(TARGETS_ABOVE_ONE.format(""))
    if bad_logits:
        raise NonFiniteError(NON_FINITE_LOGITS)
    if n:
        check_logit_range(-_math.decode_code(smallest_negated), _math.decode_code(largest), delta, n, compute)
    return p, num_edges


def _host_offset_scale(status: torch.Tensor, edges: torch.Tensor, n: int) -> float:
    """The fixed-point scale ``_math.offset_scale`` computed on the device, here on the host."""
    code, low = int(status[_math.STATUS_MAX_NEGATIVE.value]), float(edges[0])
    largest = _math.decode_code(code) - low
    largest = largest if code > 0 and largest > 1e-30 else 1e-30
    bound_bits = struct.unpack("<q", struct.pack("<d", largest * n))[0]
    exponent = ((bound_bits >> 52) & 0x7FF) - 1022
    return 2.0 ** min(max(62 - exponent, -1000), 1000)


def _sorted_positives_by_torch(logits, targets, pos_index, compute, group, regression):
    """The positives in ascending (logit, position) order with torch ops, optionally gathered
    over a process group: (s_pos, y_pos float64, sorted_index, mine or None, l_pos or None)."""
    s_flat, y_flat = logits.reshape(-1), targets.reshape(-1)
    pos_index = torch.sort(pos_index).values
    s_values = s_flat[pos_index].to(compute)
    if group is not None:
        s_pos, y_pos, mine, own_index, l_pos = gather_positives(s_values, y_flat[pos_index], pos_index, group,
                                                                regression)
        return s_pos, y_pos, own_index, mine, l_pos
    s_pos, order = torch.sort(s_values, stable=True)
    sorted_index = pos_index[order]
    l_pos = None if regression is None else regression.reshape(-1).double()[order].contiguous()
    return s_pos, y_flat[sorted_index].double(), sorted_index, None, l_pos


class TritonBackend(pipeline.PipelineBackend):
    """Triton kernels; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``."""

    name = "triton"
    checks_finite = True  # the scan checks targets, the reduction logits
    inputs = staticmethod(triton_inputs)

    def forward(self, s, y, delta, spec, settings, regression=None):
        with on_device(s.device):
            return pipeline.forward(self, s, y, delta, spec, settings, regression)

    def backward(self, tables, s, y, grad_outputs):
        with on_device(s.device):
            return pipeline.backward(self, tables, s, y, grad_outputs)

    @staticmethod
    def find_positives(logits, targets, delta, spec, settings, regression=None):
        """``logits``/``targets`` as :func:`triton_inputs` gives them. One pass finds the
        positives; when one program can sort them (up to ``capacity``, a bound the host knows
        without reading p), the edges are built and the bins reduced on the device, and the
        later kernels read p and the edge count there (``TritonPositives.reduced``). The host
        reads the status words once, for the exceptions of bad values, only with ``validate``
        (or where it needs p: aLRP, float64, a process group, more positives than ``capacity``)."""
        s, y = layout(logits), layout(targets)
        n, device = logits.numel(), logits.device
        compute = compute_dtype(logits.dtype)
        group, deterministic = settings.process_group, settings.deterministic
        offset_dtype = torch.int64 if deterministic else compute

        status = torch.zeros(_math.STATUS_WORDS.value, dtype=torch.int64, device=device)
        capacity = min(n, positives.SORT_BY_RANK_MAX, TRITON_SWEEP_FROM - 1)
        placed = None  # aLRP's regression losses, when prepare places them
        if regression is not None and group is None:
            # aLRP: one regression loss per positive, so the host knows p (the kernels check it)
            regression = regression.reshape(-1).contiguous()
            if regression.numel() <= capacity:
                capacity, placed = max(regression.numel(), 1), regression
        check_above_one = not settings.allow_targets_above_one
        pos_buffer = positives.scan(s, y, status, capacity, max_negative=deterministic,
                                    check_above_one=check_above_one)
        on_device = group is None and compute == torch.float32 and n < 2**32 and capacity > 0
        l_pos = flat_rank = None
        if on_device:
            edges_kind = positives.edges_kind(float(delta) + 0.0, spec.bucketed)
            s_pos, y_pos, sorted_index, edges, count, offset_sum, l_pos, flat_rank = positives.prepare(
                s, y, pos_buffer, status, float(delta) + 0.0, edges_kind, offset_dtype, placed)
        else:  # the reduction only checks finiteness (edge count 0)
            edges = torch.empty(1, dtype=compute, device=device)
            count = offset_sum = torch.empty(1, dtype=torch.int64, device=device)
        streaming.reduce(s, y, edges, status, count, offset_sum, deterministic)

        if on_device and not settings.validate and (regression is None or flat_rank is not None):
            # no host sync: buffers and grids for `capacity` positives; bad values give NaN outputs
            reduced = KernelBins(edges, count, offset_sum, status, n, deterministic, n)
            return TritonPositives(s_pos, y_pos, sorted_index, None, l_pos, status=status, reduced=reduced,
                                   flat_rank=flat_rank, regression_count=0 if placed is None else placed.numel())
        p, num_edges = _checked_status(status, delta, n, compute)
        if regression is not None and group is None and regression.numel() != p:  # unchecked: validate=False
            raise ValueError(f"regression_losses must hold one value per positive target ({p}, in the flat order "
                             f"of targets > 0), got {regression.numel()}")
        if p == 0 and group is None:
            return None
        if num_edges > 0:
            s_pos, y_pos, sorted_index = s_pos[:p], y_pos[:p], sorted_index[:p]
            if regression is not None and flat_rank is None:  # positives in flat order are their positions sorted
                l_pos = torch.empty(p, dtype=torch.float64, device=device)
                l_pos[torch.argsort(sorted_index)] = regression.reshape(-1).double()
            elif flat_rank is not None:
                l_pos, flat_rank = l_pos[:p], flat_rank[:p]
            reduced = KernelBins(edges[:num_edges], count[:num_edges + 1], offset_sum[:num_edges + 1], status, n,
                                 deterministic, n)
            return TritonPositives(s_pos, y_pos, sorted_index, None, l_pos, status=status, reduced=reduced,
                                   flat_rank=flat_rank, regression_count=p)
        if p > capacity:  # the first pass had room for `capacity` positions only
            status = torch.zeros_like(status)
            pos_buffer = positives.scan(s, y, status, p, max_negative=deterministic, check_above_one=False)
        s_pos, y_pos, sorted_index, mine, l_pos = _sorted_positives_by_torch(logits, targets, pos_buffer[:p], compute,
                                                                             group, regression)
        if s_pos.numel() == 0:
            return None
        return TritonPositives(s_pos, y_pos, sorted_index, mine, l_pos, status=status)

    @staticmethod
    def reduce_bins(logits, targets, found: TritonPositives, delta, spec, settings) -> KernelBins:
        """The bins reduced ahead by ``find_positives``, or (more positives than one program
        sorts, float64, process group) the edges of ``_edges.bin_edges`` and one reduction."""
        if found.reduced is not None:
            return found.reduced
        status, n, device = found.status, logits.numel(), logits.device
        deterministic = settings.deterministic
        edges = bin_edges(found.s, delta, spec).contiguous()
        count = torch.zeros(edges.numel() + 1, dtype=torch.int64, device=device)
        offset_dtype = torch.int64 if deterministic else compute_dtype(logits.dtype)
        offset_sum = torch.zeros(edges.numel() + 1, dtype=offset_dtype, device=device)
        # the kernels read p (of all ranks) and the edge count from the status words
        status[_math.STATUS_POSITIVES.value] = found.s.numel()
        status[_math.STATUS_NUM_EDGES.value] = edges.numel()
        streaming.reduce(layout(logits), layout(targets), edges, status, count, offset_sum, deterministic)
        fixed_point, fp_bound, group = deterministic, n, settings.process_group
        if group is not None:
            if deterministic:  # ranks scale their offsets differently: meet in float64
                offset_sum = offset_sum.double() / _host_offset_scale(status, edges, n)
                fixed_point = False
            count, offset_sum = all_reduce_bins(count, offset_sum, group)
            fp_bound = int(count.sum())
        return KernelBins(edges, count, offset_sum, status, n, fixed_point, fp_bound)

    @staticmethod
    def gradient_tables(found: TritonPositives, reduced: KernelBins, delta, spec, settings) -> pipeline.GradientTables:
        """Two launches (three for the interpolated AP) for every term of the pipeline's step 3;
        from ``TRITON_SWEEP_FROM`` positives on, the torch backend's O(p log p) sweeps on these bins."""
        if found.s.numel() >= TRITON_SWEEP_FROM:
            return _swept_terms(found, reduced, delta, spec, settings)
        delta_bits = _math.float_bits(float(delta) + 0.0)  # -0.0 is 0
        losses = tuple(torch.empty((), dtype=found.s.dtype, device=found.s.device)
                       for _ in range(spec.ranking_outputs))
        options = {"fixed_point": reduced.fixed_point, "deterministic": settings.deterministic}
        common = (found.s, found.y, reduced.edges, reduced.count, reduced.offset_sum, reduced.status, reduced.n)
        table = tiles.per_positive(*common, reduced.fp_bound, delta_bits, sorting=spec.sorting,
                                     interpolated=spec.interpolated, l_pos=found.regression, **options)
        if spec.interpolated:
            tiles.running_maximum(table, reduced.status, losses[0])
        localisation = None
        if found.flat_rank is not None:  # aLRP's localisation part in a kernel, its value from finish
            losses += (torch.empty((), dtype=found.s.dtype, device=found.s.device),)
            weights = tiles.localisation(found.s, found.index, found.flat_rank, found.regression, table,
                                         reduced.status, reduced.n, delta_bits)
            localisation = (losses[-1], weights[:found.regression_count])
        const, slope = tiles.finish(*common, delta_bits, table, losses, sorting=spec.sorting,
                                    has_slope=spec.has_slope(delta), interpolated=spec.interpolated,
                                    regression=spec.regression, localisation=localisation is not None, **options)
        return pipeline.GradientTables(losses[:spec.ranking_outputs], table[tiles.T_RANK_GRAD.value],
                                       table[tiles.T_SORT_GRAD.value] if spec.sorting else None, const, slope,
                                       table[tiles.T_RANK.value] if spec.regression else None, localisation)

    @staticmethod
    def distribute(tables: pipeline.SavedTables, logits, targets, grad_outputs) -> torch.Tensor:
        """Flat gradient in the logits' dtype, for the upstream gradients (read on the device)."""
        return streaming.distribute(layout(logits), layout(targets), tables.bins.edges, tables.bins.status,
                                    tables.const, tables.slope,
                                    tables.pos_index, tables.pos_rank_grad, tables.pos_sort_grad, grad_outputs,
                                    logits.dtype)


def _swept_terms(found, reduced: KernelBins, delta, spec, settings) -> pipeline.GradientTables:
    """Step 3 by the torch sweeps of ``_tables`` on the kernels' bins; the tables keep the kernels'
    keys (``#{edges <= s}`` over all E edges, equal ones included)."""
    offset_sum = reduced.offset_sum.double()
    if reduced.fixed_point:
        offset_sum = offset_sum / _host_offset_scale(reduced.status, reduced.edges, reduced.n)
    lower_of_key = torch.cat([reduced.edges[:1], reduced.edges])
    as_torch = _tables.ReducedBins(**_tables.ReducedBins.occupied_of(lower_of_key, reduced.count, offset_sum,
                                                                   torch.float64))
    return _tables.gradient_tables(found, as_torch, delta, spec, settings)


TRITON = TritonBackend()
