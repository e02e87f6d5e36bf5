"""The global rows of graph_attention's union (gtkernels/triton/graph_union.py) are computed
over S chunks of the nodes into fp32 partials [S, G, H, D]; these kernels fold the partials
into the node rows glob[g] in one launch each, in split order (deterministic, no atomics):
  `_merge_rows_kernel`: forward, (out, lse) of row glob[g] and the partial (out, lse) of each
      chunk merged by log-sum-exp (one softmax over disjoint key sets);
  `_add_partials_kernel`: backward, dq, dk, dv of row glob[g] plus the sum of its partials.
"""
import triton
import triton.language as tl

from . import interpreting

# Elements of one [splits, columns] tile: enough loads in flight to hide the latency.
TILE_ELEMENTS = 256 if interpreting() else 8192


@triton.jit
def _merge_rows_kernel(out_ptr, lse_ptr, glob_ptr, part_out_ptr, part_lse_ptr, num_splits,
                       count, H, D, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (g, h): out [N, H, D], lse [N, H] (fp32) at row glob[g] <- merge of themselves
    and part_out [S, G, H, D], part_lse [S, G, H] (fp32; lse -inf: no keys in that chunk)."""
    g = tl.program_id(0)
    h = tl.program_id(1)
    row = (tl.load(glob_ptr + g).to(tl.int64) * H + h)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    splits = tl.arange(0, BLOCK_S)
    lse_row = tl.load(lse_ptr + row)
    shift = lse_row
    for start in range(0, num_splits, BLOCK_S):
        s = start + splits
        part_lse = tl.load(part_lse_ptr + (s.to(tl.int64) * count + g) * H + h,
                           mask=s < num_splits, other=float("-inf"))
        shift = tl.maximum(shift, tl.max(part_lse, 0))
    shift = tl.where(shift == float("-inf"), 0.0, shift)  # no keys at all
    total = tl.exp(lse_row - shift)
    acc = total * tl.load(out_ptr + row * D + cols, mask=col_ok, other=0.0).to(tl.float32)
    for start in range(0, num_splits, BLOCK_S):
        s = start + splits
        part_rows = (s.to(tl.int64) * count + g) * H + h
        weight = tl.exp(tl.load(part_lse_ptr + part_rows, mask=s < num_splits,
                                other=float("-inf")) - shift)
        part = tl.load(part_out_ptr + part_rows[:, None] * D + cols[None, :],
                       mask=(s < num_splits)[:, None] & col_ok[None, :], other=0.0)
        total += tl.sum(weight, 0)
        acc += tl.sum(weight[:, None] * part, 0)
    has_keys = total > 0
    safe_total = tl.where(has_keys, total, 1.0)
    tl.store(out_ptr + row * D + cols, (acc / safe_total).to(out_ptr.dtype.element_ty),
             mask=col_ok)
    tl.store(lse_ptr + row, tl.where(has_keys, shift + tl.log(safe_total), float("-inf")))


@triton.jit
def _add_row_partials(grad_ptr, part_ptr, row, g, count, num_splits, cols, HD,
                      BLOCK_S: tl.constexpr):
    """grad [N, H * D] at row, columns cols += sum over s of part [S, G, H * D] at (s, g)."""
    col_ok = cols < HD
    acc = tl.load(grad_ptr + row * HD + cols, mask=col_ok, other=0.0).to(tl.float32)
    splits = tl.arange(0, BLOCK_S)
    for start in range(0, num_splits, BLOCK_S):
        s = start + splits
        part = tl.load(part_ptr + (s.to(tl.int64) * count + g)[:, None] * HD + cols[None, :],
                       mask=(s < num_splits)[:, None] & col_ok[None, :], other=0.0)
        acc += tl.sum(part, 0)
    tl.store(grad_ptr + row * HD + cols, acc.to(grad_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def _add_partials_kernel(dq_ptr, dk_ptr, dv_ptr, part_dq_ptr, part_dk_ptr, part_dv_ptr,
                         glob_ptr, num_splits, count, HD, BLOCK_S: tl.constexpr,
                         BLOCK_HD: tl.constexpr):
    """Program (g, column block, gradient): dq, dk or dv [N, H, D] at row glob[g] += the sum of
    part_dq, part_dk or part_dv [S, G, H, D] (fp32) at g."""
    g = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_HD + tl.arange(0, BLOCK_HD)
    which = tl.program_id(2)
    row = tl.load(glob_ptr + g).to(tl.int64)
    if which == 0:
        _add_row_partials(dq_ptr, part_dq_ptr, row, g, count, num_splits, cols, HD, BLOCK_S)
    elif which == 1:
        _add_row_partials(dk_ptr, part_dk_ptr, row, g, count, num_splits, cols, HD, BLOCK_S)
    else:
        _add_row_partials(dv_ptr, part_dv_ptr, row, g, count, num_splits, cols, HD, BLOCK_S)


def merge_global_rows(out, lse, glob, part_out, part_lse):
    """out [N, H, D], lse [N, H] fp32 (contiguous) at rows glob (int64 [G]) merged in place
    with the chunks' part_out [S, G, H, D], part_lse [S, G, H] (fp32)."""
    splits, count, heads, dim = part_out.shape
    block_d = triton.next_power_of_2(dim)
    _merge_rows_kernel[(count, heads)](
        out, lse, glob, part_out, part_lse, splits, count, heads, dim,
        BLOCK_S=max(1, min(TILE_ELEMENTS // block_d, triton.next_power_of_2(splits))),
        BLOCK_D=block_d, num_warps=4)


def add_global_row_partials(grads, glob, parts):
    """grads (dq, dk, dv) [N, H, D] (contiguous) at rows glob (int64 [G]) += the sums over the
    chunks of parts (part_dq, part_dk, part_dv) [S, G, H, D] (fp32), in place."""
    splits, count, heads, dim = parts[0].shape
    width = heads * dim
    block_hd = min(triton.next_power_of_2(width), 128)
    _add_partials_kernel[(count, triton.cdiv(width, block_hd), 3)](
        *grads, *parts, glob, splits, count, width,
        BLOCK_S=max(1, min(TILE_ELEMENTS // block_hd, triton.next_power_of_2(splits))),
        BLOCK_HD=block_hd, num_warps=4)


# Compiled for sm_90 by tests/triton_compile_check.py (no GPU needed).
_TYPES = {"lse_ptr": "*fp32", "glob_ptr": "*i64", "part_out_ptr": "*fp32",
          "part_lse_ptr": "*fp32", "part_dq_ptr": "*fp32", "part_dk_ptr": "*fp32",
          "part_dv_ptr": "*fp32"}
COMPILE_CASES = [
    ("_merge_rows_kernel", (("BLOCK_S", 256), ("BLOCK_D", 32)), _TYPES),
    ("_add_partials_kernel", (("BLOCK_S", 64), ("BLOCK_HD", 128)), _TYPES),
]
