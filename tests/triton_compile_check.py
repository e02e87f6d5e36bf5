"""Compiles a module's Triton kernels for sm_90 without a GPU (Triton's bundled ptxas).

    python tests/triton_compile_check.py gtkernels.triton.hashing [more modules]

The module lists its cases in COMPILE_CASES: (kernel name, constexpr values, argument types
that differ from the default: "*bf16" for *_ptr arguments, "i32" for the others[, compile
options such as {"num_warps": 1}: 4 warps when left out[, text the TTGIR must contain, e.g.
"warp_group_dot" for Hopper's warp-group MMA]]). Pointers and d get the divisibility-by-16
hint the JIT gives them at the bench sizes.
"""
import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def compile_case(kernel, constants, arg_types, options=None):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = kernel
    while not hasattr(fn, "arg_names") or not hasattr(fn, "cache_key"):
        fn = fn.fn  # Autotuner -> JITFunction
    signature, attrs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        if arg in constants:
            signature[arg] = "constexpr"
            continue
        signature[arg] = arg_types.get(arg, "*bf16" if arg.endswith("_ptr") else "i32")
        if signature[arg].startswith("*") or arg == "d":
            attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn, signature, constexprs=constants, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": 4, **(options or {})})
    return compiled.asm


def main(module_name):
    module = importlib.import_module(module_name)
    for name, constants, arg_types, *rest in module.COMPILE_CASES:
        options, ttgir_has = (rest + [None, None])[:2]
        asm = compile_case(getattr(module, name), dict(constants), arg_types, options)
        assert "ld.global" in asm["ptx"], name
        assert ttgir_has is None or ttgir_has in asm["ttgir"], (name, ttgir_has)
        print(f"compiled {name} {constants} {options or ''}")


if __name__ == "__main__":
    for name in sys.argv[1:]:
        main(name)
