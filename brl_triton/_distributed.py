"""Global ranking across the ranks of a ``torch.distributed`` process group.

Only O(P) numbers cross the network: one all-gather of the positives (logit and target, and
aLRP's regression loss; variable P per rank) and one all-reduce of the per-bin count and offset
sum. Every rank then sorts the same positives, computes the same losses and per-bin gradient
tables, and writes the gradient of its own elements. The ranks' sums meet in the all-reduce, so
results equal the single-process ones on the concatenated batch up to float round-off.

From ``_tables.SWEEP_FROM`` positives on, the work that grows with the positives is split
too: each rank sums the positive terms of one slice of the sorted positives, and one more
all-gather (``share_slices``, a few float64 per positive) gives every rank all of them; a second
one shares the slices' sorting gradients (Rank & Sort) and the bins' gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ._common import stable_sort


def _all_gather_rows(rows: torch.Tensor, group) -> tuple[torch.Tensor, list[int]]:
    """Concatenate every rank's (k_r, C) tensor in rank order; k_r may differ. Also returns the k_r."""
    world = dist.get_world_size(group)
    count = torch.tensor([rows.shape[0]], dtype=torch.int64, device=rows.device)
    counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    counts = [int(c) for c in counts]
    padded = rows.new_zeros((max(counts), rows.shape[1]))
    padded[: rows.shape[0]] = rows
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded, group=group)
    return torch.cat([g[:c] for g, c in zip(gathered, counts)]), counts


def gather_positives(s_pos: torch.Tensor, y_pos: torch.Tensor, pos_index: torch.Tensor, group, regression=None):
    """All ranks' positives, sorted ascending by logit (ties by rank, then position).

    ``pos_index``: this rank's positives' flat positions, ascending; ``regression``: their
    regression losses in that order (aLRP), or None.
    Returns ``(s_sorted, y_sorted, mine, local_index, l_sorted)``: logits (s_pos.dtype) and
    float64 targets of all positives; ``mine``: positions in that order of this rank's
    positives; ``local_index``: their flat positions in this rank's tensor; ``l_sorted``: the
    float64 regression losses in that order, or None.
    """
    rank = dist.get_rank(group)
    # only values travel: a row's rank and position follow from where it sits in the gather
    columns = [s_pos.double(), y_pos.double()]
    if regression is not None:
        columns.append(regression.detach().reshape(-1).double())
    rows, counts = _all_gather_rows(torch.stack(columns, dim=1), group)  # float64 holds float32 exactly
    s_all = rows[:, 0].to(s_pos.dtype)
    # rank-major, each rank's rows in flat order: a stable sort breaks ties by rank, then position
    s_sorted, order = stable_sort(s_all)
    start = sum(counts[:rank])
    mine = torch.where((order >= start) & (order < start + counts[rank]))[0]
    y_sorted = rows[:, 1].index_select(0, order)
    l_sorted = rows[:, 2].index_select(0, order) if regression is not None else None
    return s_sorted, y_sorted, mine, pos_index.index_select(0, order.index_select(0, mine) - start), l_sorted


def all_reduce_bins(count: torch.Tensor, offset_sum: torch.Tensor, group):
    """Sum per-bin counts and offset sums over the ranks in one all-reduce (float64 holds counts
    below 2^53 exactly)."""
    both = torch.stack([count.double(), offset_sum.double()])
    dist.all_reduce(both, op=dist.ReduceOp.SUM, group=group)
    return both[0].round().long(), both[1]


def _slice_of(rank: int, world: int, total: int) -> tuple[int, int]:
    return rank * total // world, (rank + 1) * total // world


def rank_slice(total: int, group) -> tuple[int, int]:
    """This rank's contiguous share ``[start, end)`` of ``total`` items: rank r of R takes the r-th R-th."""
    return _slice_of(dist.get_rank(group), dist.get_world_size(group), total)


def share_slices(parts: list, group) -> list:
    """``parts``: ``(rows, total)`` pairs, this rank's rows (k, C) for its :func:`rank_slice` of
    ``total`` items, C the same in every part. One all-gather; per part, everyone's rows in item
    order, (total, C). Every rank knows every slice's size, so no counts or indices travel."""
    world = dist.get_world_size(group)
    sizes = [[end - start for start, end in (_slice_of(r, world, total) for _, total in parts)] for r in range(world)]
    mine = torch.cat([rows for rows, _ in parts])
    padded = mine.new_zeros((max(sum(row) for row in sizes), mine.shape[1]))
    padded[: mine.shape[0]] = mine
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded, group=group)
    shared = []
    for j in range(len(parts)):
        starts = [sum(sizes[r][:j]) for r in range(world)]
        shared.append(torch.cat([gathered[r][starts[r]: starts[r] + sizes[r][j]] for r in range(world)]))
    return shared
