"""window_attention's Triton kernels compile for sm_90 (Hopper) without a GPU.

The interpreter does not catch everything the GPU compiler rejects (e.g. non-constexpr globals
in kernels), so every kernel is also compiled ahead of time for sm_90 here, in a subprocess
without TRITON_INTERPRET (under the interpreter kernels are not compilable objects)."""
import itertools
import os
import subprocess
import sys

import pytest

from gtkernels.triton import HAS_TRITON

FP32_POINTERS = ("lse_ptr", "delta_ptr", "grad_lse_ptr", "part_out_ptr", "part_lse_ptr",
                 "part_dq_ptr", "part_dk_ptr", "part_dv_ptr", "init_lse_ptr")
# graph_attention's union: exclusion and live masks, the global-node list
OTHER_POINTERS = {"exclude_ptr": "*u8", "live_ptr": "*u8", "list_ptr": "*i64"}


def compile_for_sm90(kernel, dtype, constexprs, num_warps, num_stages):
    """Compiles a @triton.jit (or autotuned) kernel for sm_90; returns the compiled kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn  # through the autotuner
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in OTHER_POINTERS:
            signature[name] = OTHER_POINTERS[name]
        elif name.endswith("_ptr"):
            signature[name] = "*fp32" if name in FP32_POINTERS else f"*{dtype}"
        else:
            signature[name] = "fp32" if name in ("qk_scale", "scale") else "i32"
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def compile_all():
    from gtkernels.triton import window_attn as fwd
    from gtkernels.triton import window_attn_backward as bwd
    from gtkernels.triton import window_attn_backward_global as bwd_global

    band = {fwd._band_forward_kernel: (128, 64, 8, 3), bwd._band_dq_kernel: (128, 64, 8, 3),
            bwd._band_dkdv_kernel: (64, 128, 8, 3)}
    for (kernel, (block_m, block_n, warps, stages)), union in itertools.product(
            band.items(), (False, True)):  # with graph_attention's union (exclusion, lists)
        consts = dict(CAUSAL=False, HAS_EXCLUDE=union, UNION=union, DOT_PRECISION="tf32",
                      BLOCK_D=64, BLOCK_M=block_m, BLOCK_N=block_n)
        if kernel is bwd._band_dq_kernel:
            consts["HAS_GRAD_LSE"] = True
        compiled = compile_for_sm90(kernel, "bf16", consts, warps, stages)
        assert "warp_group_dot" in compiled.asm["ttgir"]  # Hopper's warp-group MMA
    for kernel in (fwd._global_query_forward_kernel, bwd_global._global_query_dq_kernel,
                   bwd_global._global_key_dkdv_kernel):
        consts = dict(CAUSAL=True, DOT_PRECISION="tf32", BLOCK_D=64, BLOCK_M=16, BLOCK_N=64)
        compile_for_sm90(kernel, "bf16", consts, 4, 3)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


if __name__ == "__main__":
    compile_all()
