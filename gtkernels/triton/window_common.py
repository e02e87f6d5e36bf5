"""Shared pieces of the dilated-window attention Triton kernels (window_attn.py, the
window_attn_backward*.py modules and graph_attention's union, graph_union.py): constants,
the band autotuner, tile loads, band program decoding and masks (band bounds, unmasked
interior, exclusion mask), global-node list helpers, and the launch-side helpers (input
layout, grids, chunks of the global passes)."""
import torch
import triton
import triton.language as tl

from . import interpreting



LOG2E = 1.4426950408889634
# The same constants inside kernels (jit code reads only constexpr globals).
LOG2E_K = tl.constexpr(LOG2E)
LN2_K = tl.constexpr(0.6931471805599453)
# Bound of S * G * B * H rows of the fp32 partial buffers of the global passes.
PARTIAL_ROWS_BUDGET = 1 << 18
# Fewest tiles along the long axis per chunk of a global pass (amortises the partial buffers).
MIN_TILES_PER_SPLIT = 8
# A band program splits its tiles into masked edges and an unmasked interior only when the
# interior holds this many tiles: each split ends a software-pipelined loop, whose refill
# costs more than the masks of one or two tiles save.
MIN_INTERIOR_TILES = tl.constexpr(3)
# Band kernels are autotuned only from this many (query, head) rows (N * H) on: small problems
# (tests) run the first config, compiling one variant instead of all.
AUTOTUNE_MIN_ROWS = 1 << 18
# Head dims above this run one small config that fits shared memory in every dtype.
LARGE_HEAD_DIM = 128
LARGE_HEAD_CONFIG = (32, 32, 4, 1)
SHARED_MEMORY_BUDGET = 200 * 1024


def _fits_shared_memory(config, named_args):
    """An upper estimate of a band config's shared memory within SHARED_MEMORY_BUDGET:
    num_stages buffers of the query and key tiles, twice (operands and layout conversions).
    At D = 128 in bf16 the 3-stage 64 x 128 tiles need 256 KB, over the H200's 227 KB."""
    block_d = triton.next_power_of_2(named_args["D"])
    size = named_args["q_ptr"].element_size()
    tiles = config.kwargs["BLOCK_M"] + config.kwargs["BLOCK_N"]
    return 2 * config.num_stages * tiles * block_d * size <= SHARED_MEMORY_BUDGET


def band_autotune(configs):
    """Autotuner of a band kernel over (BLOCK_M, BLOCK_N, num_warps, num_stages) configs, the first
    being the default. Under the interpreter: one small config (it is slow)."""
    if interpreting():
        configs = [(16, 16, 1, 1)]
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
               for m, n, w, s in configs + [LARGE_HEAD_CONFIG]]

    def prune(configs, named_args, **kwargs):
        fitting = [c for c in configs[:-1] if _fits_shared_memory(c, named_args)]
        if named_args["D"] > LARGE_HEAD_DIM or not fitting:
            return configs[-1:]
        large = named_args["N"] * named_args["H"] >= AUTOTUNE_MIN_ROWS
        return fitting if large else fitting[:1]

    return triton.autotune(configs=configs, key=["N", "H", "window", "dilation", "D", "CAUSAL"],
                           prune_configs_by={"early_config_prune": prune})


@triton.jit
def load_rows(ptr, rows, row_ok, stride_n, cols, D):
    """Tile [len(rows), BLOCK_D] of rows `rows` (token indices) of a [N, D] view; 0 elsewhere."""
    offsets = rows.to(tl.int64)[:, None] * stride_n + cols[None, :]
    return tl.load(ptr + offsets, mask=row_ok[:, None] & (cols < D)[None, :], other=0.0)


@triton.jit
def band_program(N, H, dilation, BLOCK: tl.constexpr):
    """Decodes a band program id into (first position, residue class r, b, h, length of the
    class). Consecutive programs take consecutive blocks of one class: they share K/V in L2."""
    pid = tl.program_id(0)
    blocks = ((N + dilation - 1) // dilation + BLOCK - 1) // BLOCK
    rest = pid // blocks
    r = rest % dilation
    bh = rest // dilation
    length = (N - r + dilation - 1) // dilation
    return (pid % blocks) * BLOCK, r, bh // H, bh % H, length


@triton.jit
def global_program(num_global, num_splits, H, BLOCK: tl.constexpr):
    """Decodes a global-pass program id into (first global row, split, b, h)."""
    pid = tl.program_id(0)
    blocks = (num_global + BLOCK - 1) // BLOCK
    first = (pid % blocks) * BLOCK
    split = (pid // blocks) % num_splits
    bh = pid // (blocks * num_splits)
    return first, split, bh // H, bh % H


@triton.jit
def first_band_position(num_global, r, dilation):
    """First position p of residue class r whose token r + p * dilation is not global."""
    return (num_global - r + dilation - 1) // dilation


@triton.jit
def band_bounds(offs, window, hi, CAUSAL: tl.constexpr):
    """Per row (query position) of a band tile, the first and last key position it attends:
    [p - window, min(p + window, hi - 1)] (p instead of p + window if causal). Two bounds per
    row make the tile mask two compares per element."""
    return offs - window, tl.minimum(offs + (0 if CAUSAL else window), hi - 1)


@triton.jit
def interior_split(lo, hi, full_start, full_end, BLOCK: tl.constexpr):
    """Splits the tiles lo, lo + BLOCK, ... below hi at mid_lo <= mid_hi: the tiles of
    [mid_lo, mid_hi) lie inside [full_start, full_end), where every row of the program meets
    every column, so they need no mask; the tiles outside are masked."""
    tiles = tl.maximum(hi - lo + BLOCK - 1, 0) // BLOCK
    first = tl.minimum(tl.maximum(full_start - lo + BLOCK - 1, 0) // BLOCK, tiles)
    last = tl.minimum(tl.maximum(tl.maximum(tl.minimum(full_end, hi) - lo, 0) // BLOCK, first),
                      tiles)
    return lo + first * BLOCK, lo + last * BLOCK


@triton.jit
def list_rows(list_ptr, offs, ok, FROM_LIST: tl.constexpr):
    """Node ids of list positions offs: list_ptr[offs], or offs itself (int64)."""
    if FROM_LIST:
        return tl.load(list_ptr + offs, mask=ok, other=0).to(tl.int64)
    return offs.to(tl.int64)


@triton.jit
def load_live(live_ptr, q_pos, k_pos, q_ok, k_ok, live_q_stride):
    """bool [len(q_pos), len(k_pos)]: live_ptr[q_pos * live_q_stride + k_pos] != 0."""
    ptrs = live_ptr + q_pos.to(tl.int64)[:, None] * live_q_stride + k_pos[None, :]
    return tl.load(ptrs, mask=q_ok[:, None] & k_ok[None, :], other=0) != 0


@triton.jit
def list_key_tile(k_ptr, v_ptr, list_ptr, live_ptr, q_pos, q_ok, start, hi, live_q_stride,
                  stride_n, cols, D, K_FROM_LIST: tl.constexpr, BLOCK_N: tl.constexpr):
    """(k, v, live) of the keys at list positions start, ..., start + BLOCK_N - 1 (< hi): node
    ids list_ptr[pos] (or pos itself), live where live_ptr[q_pos * live_q_stride + pos] != 0."""
    offs_n = start + tl.arange(0, BLOCK_N)
    k_ok = offs_n < hi
    k_rows = list_rows(list_ptr, offs_n, k_ok, K_FROM_LIST)
    k = load_rows(k_ptr, k_rows, k_ok, stride_n, cols, D)
    v = load_rows(v_ptr, k_rows, k_ok, stride_n, cols, D)
    return k, v, load_live(live_ptr, q_pos, offs_n, q_ok, k_ok, live_q_stride)


@triton.jit
def global_key_tile(k_ptr, v_ptr, start, hi, offs_m, stride_n, cols, D, CAUSAL: tl.constexpr,
                    BLOCK_N: tl.constexpr):
    """(k, v, valid) of the keys start, ..., start + BLOCK_N - 1 (< hi) met by the global query
    rows offs_m (causal: keys up to the row)."""
    offs_n = start + tl.arange(0, BLOCK_N)
    k = load_rows(k_ptr, offs_n, offs_n < hi, stride_n, cols, D)
    v = load_rows(v_ptr, offs_n, offs_n < hi, stride_n, cols, D)
    valid = (offs_n < hi)[None, :]
    if CAUSAL:
        valid = valid & (offs_n[None, :] <= offs_m[:, None])
    return k, v, valid


@triton.jit
def load_node_tile(ptr, rows, ok, h, H, D, cols):
    """[len(rows), BLOCK_D] fp32 of a contiguous [N, H, D] tensor at head h."""
    return tl.load(ptr + (rows.to(tl.int64) * H + h)[:, None] * D + cols[None, :],
                   mask=ok[:, None] & (cols < D)[None, :], other=0.0).to(tl.float32)


@triton.jit
def band_valid(offs_n, key_lb, key_ub, excl_rows, HAS_EXCLUDE: tl.constexpr):
    """[M, N] mask of the band keys offs_n of each query row: inside [key_lb, key_ub] and, with
    HAS_EXCLUDE, not dropped: excl_rows [M] points at the exclusion byte of key position 0 of
    each row (rows outside the sequence must have an empty range)."""
    valid = (offs_n[None, :] >= key_lb[:, None]) & (offs_n[None, :] <= key_ub[:, None])
    if HAS_EXCLUDE:
        dropped = tl.load(excl_rows[:, None] + offs_n[None, :], mask=valid, other=1)
        valid = valid & (dropped == 0)
    return valid


@triton.jit
def band_key_tile(k_ptr, v_ptr, tile, hi, r, dilation, stride_n, cols, D, key_lb, key_ub,
                  excl_rows, HAS_EXCLUDE: tl.constexpr, BLOCK_N: tl.constexpr):
    """(k, v, valid) of the band keys at positions tile, ..., tile + BLOCK_N - 1 (< hi) of
    residue class r; valid as band_valid."""
    offs_n = tile + tl.arange(0, BLOCK_N)
    rows_n = r + offs_n * dilation
    k = load_rows(k_ptr, rows_n, offs_n < hi, stride_n, cols, D)
    v = load_rows(v_ptr, rows_n, offs_n < hi, stride_n, cols, D)
    return k, v, band_valid(offs_n, key_lb, key_ub, excl_rows, HAS_EXCLUDE)


@triton.jit
def exclusion_rows(exclude_ptr, rows_m, offs_m, row_ok, key_ub, exclude_stride, exclude_center,
                   HAS_EXCLUDE: tl.constexpr):
    """(excl_rows, key_ub) for band_valid: with HAS_EXCLUDE, the pointer of each query row's
    exclusion byte for key position 0 (exclude[i, t + center] with t = key - query position),
    and key_ub emptied on rows outside the sequence so that nothing is read there."""
    if HAS_EXCLUDE:
        excl_rows = (exclude_ptr + rows_m.to(tl.int64) * exclude_stride
                     + (exclude_center - offs_m))
        return excl_rows, tl.where(row_ok, key_ub, -1)
    return exclude_ptr + 0 * offs_m, key_ub


def dot_precision(dtype):
    """fp32 inputs keep fp32 products (torch's default matmul precision); others use MMA."""
    return "ieee" if dtype == torch.float32 else "tf32"


def prepare_inputs(*tensors):
    """The tensors with one set of strides and a unit last stride (copies only when needed)."""
    first = tensors[0]
    if first.stride(-1) == 1 and all(t.stride() == first.stride() for t in tensors):
        return tensors
    return tuple(t.contiguous() for t in tensors)


def effective_window(n, window, dilation):
    """(window, dilation) bounded by N with the same key sets: keys past the ends do not exist."""
    dilation = min(dilation, max(n, 1))
    return min(window, max(n - 1, 0) // dilation), dilation


def global_blocks(num_global, dim):
    """(rows per program, tile along the long axis, num_stages) of the global passes."""
    if interpreting():
        return 16, 16, 1
    if dim > LARGE_HEAD_DIM:
        return max(16, min(32, triton.next_power_of_2(num_global))), 32, 1
    return max(16, min(64, triton.next_power_of_2(num_global))), 64, 3


def split_count(long_len, num_global, batch_heads, block):
    """(number of chunks, chunk length) of a global pass over `long_len` keys or queries: enough
    chunks to fill the GPU, few enough for the fp32 partial buffers to stay small."""
    budget = max(1, PARTIAL_ROWS_BUDGET // max(1, num_global * batch_heads))
    splits = max(1, min(triton.cdiv(long_len, block * MIN_TILES_PER_SPLIT), budget))
    per_split = triton.cdiv(triton.cdiv(long_len, splits), block) * block
    return triton.cdiv(long_len, per_split), per_split


def band_grid(batch_heads, n, dilation, block_key):
    """Grid of a band kernel: one program per block of meta[block_key] positions of a residue
    class, for every class and (b, h)."""
    def grid(meta):
        blocks = triton.cdiv(triton.cdiv(n, dilation), meta[block_key])
        return (batch_heads * dilation * blocks,)
    return grid


def exclusion_args(exclude, window, placeholder):
    """(tensor, row stride, centre column) of the optional exclusion mask [N, 2 * window + 1]
    for the band kernels (`placeholder`, never read, when None)."""
    if exclude is None:
        return placeholder, 0, 0
    return exclude.contiguous().view(torch.uint8), 2 * window + 1, window


# Compiled for sm_90 by tests/triton_compile_check.py (no GPU needed): the window kernels'
# argument types other than the defaults (*bf16 for *_ptr, i32 otherwise) and the band
# kernels' constexprs; the band kernels must use Hopper's warp-group MMA.
COMPILE_TYPES = {
    **{n: "*fp32" for n in ("lse_ptr", "delta_ptr", "grad_lse_ptr", "part_out_ptr",
                            "part_lse_ptr", "part_dq_ptr", "part_dk_ptr", "part_dv_ptr",
                            "init_lse_ptr")},
    "exclude_ptr": "*u8", "live_ptr": "*u8", "list_ptr": "*i64",  # graph_attention's union
    "qk_scale": "fp32", "scale": "fp32"}
WARP_GROUP_MMA = "warp_group_dot"


def band_compile_cases(name, block_m, block_n, **constants):
    """Compile cases of a band kernel alone and in graph_attention's union (exclusion, lists)."""
    return [(name, dict(constants, CAUSAL=False, HAS_EXCLUDE=union, UNION=union,
                        DOT_PRECISION="tf32", BLOCK_D=64, BLOCK_M=block_m, BLOCK_N=block_n),
             COMPILE_TYPES, {"num_warps": 8, "num_stages": 3}, WARP_GROUP_MMA)
            for union in (False, True)]


def global_compile_case(name):
    """The compile case of a global-pass kernel."""
    return (name, dict(CAUSAL=True, DOT_PRECISION="tf32", BLOCK_D=64, BLOCK_M=16, BLOCK_N=64),
            COMPILE_TYPES, {"num_warps": 4, "num_stages": 3})
