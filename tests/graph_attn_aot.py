"""Compiles the graph-attention Triton kernels to sm_90 cubins without a GPU:
    python tests/graph_attn_aot.py H D
(run by test_graph_attn_triton.py with TRITON_INTERPRET=0)."""
import inspect
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from gtkernels.triton import graph_attn as fwd
from gtkernels.triton import graph_attn_bwd as bwd

SCALARS = {"scale": "fp32", "scale_log2": "fp32", "num_rows": "i32", "num_segments": "i32"}
INT64 = ("indptr", "csc_indptr")
INT32 = ("indices", "csc_indices", "csc_edge_ids", "seg_row", "seg_count", "seg_end",
         "part_end", "split_row")
FP32 = ("lse", "grad_lse", "prob", "dscore", "part_m", "part_l", "part_acc", "part_dq",
        "part_dk", "part_dv", "part", "delta_out")


def arg_type(name):
    """Index arrays int32 (indptr int64), node tensors bf16, lse / scratch / partials fp32."""
    if name in SCALARS:
        return SCALARS[name]
    return "*i64" if name in INT64 else "*i32" if name in INT32 else "*fp32" if name in FP32 \
        else "*bf16"


def compile_for_sm90(kernel, num_warps, **constexprs):
    names = list(inspect.signature(kernel.fn).parameters)
    signature = {n: "constexpr" if n in constexprs else arg_type(n) for n in names}
    source = ASTSource(kernel, signature, {(names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps})


def main(h, d):
    config = fwd.DEFAULT_CONFIG
    block_s, block_h, block_d = fwd.block_sizes(h, d, config.fwd_tile)
    shape = dict(H=h, D=d, BLOCK_H=block_h, BLOCK_D=block_d)
    rows = dict(shape, BLOCK_S=block_s, CHUNK=config.chunk)
    warps, combine_warps = config.num_warps, config.combine_warps
    kernels = [
        compile_for_sm90(fwd._forward_kernel, warps, **rows, HAS_BIAS=True, HAS_ATTR=True),
        compile_for_sm90(fwd._softmax_combine_kernel, combine_warps, **shape, BLOCK_P=8),
        compile_for_sm90(bwd._destination_kernel, warps, **rows, HAS_BIAS=True, HAS_ATTR=True,
                         HAS_GRAD_LSE=True, STORE_DELTA=True),
        compile_for_sm90(bwd._source_kernel, warps, **rows),
        compile_for_sm90(bwd._sum_combine_kernel, combine_warps, HD=h * d, BLOCK_P=8,
                         BLOCK_HD=block_h * block_d),
    ]
    assert all(k.asm.get("cubin") for k in kernels)
    print(f"compiled {len(kernels)} kernels")


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
