"""Row norms: sum_j x[i, j]**2 in fp32, the codebook-norm precomputation of codebook search."""
import torch
import triton
import triton.language as tl


@triton.jit
def _row_sq_norms_kernel(x_ptr, out_ptr, n_rows, n_cols, stride_row,
                         BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    acc = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK_COLS):
        cols = start + tl.arange(0, BLOCK_COLS)
        mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        x = tl.load(x_ptr + rows[:, None] * stride_row + cols[None, :], mask=mask, other=0.0)
        x = x.to(tl.float32)
        acc += tl.sum(x * x, axis=1)
    tl.store(out_ptr + rows, acc, mask=rows < n_rows)


def row_sq_norms(x: torch.Tensor) -> torch.Tensor:
    """x: [R, C] float (rows may be strided, columns contiguous) -> float32 [R]."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    n_rows, n_cols = x.shape
    out = torch.empty(n_rows, device=x.device, dtype=torch.float32)
    if n_rows == 0:
        return out
    block_cols = min(256, triton.next_power_of_2(max(n_cols, 1)))
    block_rows = max(1, min(64, 4096 // block_cols))
    grid = (triton.cdiv(n_rows, block_rows),)
    _row_sq_norms_kernel[grid](x, out, n_rows, n_cols, x.stride(0),
                               BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols)
    return out
