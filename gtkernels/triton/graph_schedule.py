"""Work lists that balance CSR row work over Triton programs, built on the device without a
host sync: each row is cut into segments of at most `chunk` edges (a row without edges keeps
one empty segment, so that its output gets written). Rows of one segment are finished by the
segment's program; rows of several ("split" rows: hubs) write per-segment partials that a
combine pass reduces in segment order (deterministic).

A schedule is a pure function of indptr: `cached_segment_schedule` keeps it for as long as
the indptr tensor lives (a Graph's), so that repeated calls launch only the attention kernels.
Building it reads three counts back from the device (one host sync per graph), so that the
launches size their grids and partial buffers exactly and skip the combines of a graph
without hub rows; under CUDA-graph capture it takes their upper bounds instead, no sync.
"""
import weakref
from dataclasses import dataclass

import torch

_SCHEDULES = {}  # id(indptr) -> (weakref to indptr, (num_edges, chunk, version), schedule)


@dataclass
class SegmentSchedule:
    num_rows: int
    chunk: int
    num_segments: int   # number of segments (or an upper bound): grid size of the row pass
    num_partials: int   # partial slots to allocate: their number (or an upper bound), >= 1
                        # (a kernel argument needs a valid pointer)
    num_split: int      # number of split rows (or an upper bound): grid size of the combine
    seg_row: torch.Tensor     # int32 [num_segments]: row of each segment (>= num_rows: none)
    seg_count: torch.Tensor   # int32 [num_rows]: segments of each row
    seg_end: torch.Tensor     # int32 [num_rows]: inclusive prefix sum of seg_count
    part_end: torch.Tensor    # int32 [num_rows]: inclusive prefix sum of partial slots per row
    split_row: torch.Tensor   # int32 [num_split]: the split rows in order (>= num_rows: none)


def segment_schedule(indptr: torch.Tensor, num_edges: int, chunk: int,
                     exact: bool = True) -> SegmentSchedule:
    """indptr: int64 [R + 1] on the device; num_edges = indptr[-1] (known from a shape).
    exact: read the counts back (one host sync); False: their upper bounds, no sync."""
    num_rows = indptr.numel() - 1
    degree = indptr.diff()
    seg_count = torch.clamp((degree + (chunk - 1)) // chunk, min=1).to(torch.int32)
    seg_end = torch.cumsum(seg_count, 0, dtype=torch.int32)
    split = seg_count > 1
    part_end = torch.cumsum(torch.where(split, seg_count, 0), 0, dtype=torch.int32)
    split_rank_end = torch.cumsum(split, 0, dtype=torch.int32)
    if exact and num_rows > 0:
        num_segments, num_partials, num_split = torch.stack(
            [seg_end[-1], part_end[-1].clamp(min=1), split_rank_end[-1]]).tolist()
    else:
        # sum_r max(1, ceil(deg_r / chunk)) <= R + E // chunk; a split row (deg > chunk) has
        # ceil(deg / chunk) < 2 deg / chunk segments, and there are at most E // (chunk + 1).
        num_segments = num_rows + num_edges // chunk
        num_split = num_edges // (chunk + 1)
        num_partials = 2 * (num_edges // chunk) + 1
    positions = torch.arange(num_segments, device=indptr.device, dtype=torch.int32)
    seg_row = torch.searchsorted(seg_end, positions, right=True, out_int32=True)
    split_row = torch.searchsorted(split_rank_end, positions[:num_split], right=True,
                                   out_int32=True)
    return SegmentSchedule(num_rows, chunk, num_segments, num_partials, num_split, seg_row,
                           seg_count, seg_end, part_end, split_row)


def cached_segment_schedule(indptr: torch.Tensor, num_edges: int, chunk: int) -> SegmentSchedule:
    """segment_schedule(indptr, num_edges, chunk), computed once per indptr tensor (and
    recomputed if indptr is modified in place); dropped when the tensor is freed. Exact
    counts, except when first built during CUDA-graph capture (no sync there)."""
    key = (num_edges, chunk, indptr._version)
    entry = _SCHEDULES.get(id(indptr))
    if entry is not None and entry[0]() is indptr and entry[1] == key:
        return entry[2]
    schedule = segment_schedule(indptr, num_edges, chunk, exact=can_sync(indptr))
    tensor_id = id(indptr)
    ref = weakref.ref(indptr, lambda _: _SCHEDULES.pop(tensor_id, None))
    _SCHEDULES[tensor_id] = (ref, key, schedule)
    return schedule


def can_sync(indptr: torch.Tensor) -> bool:
    """False while a CUDA graph is being captured on indptr's device (no host sync there)."""
    return not (indptr.is_cuda and torch.cuda.is_current_stream_capturing())
