"""pytest-benchmark cases for every registered (problem, implementation) at --quick sizes:

    python -m pytest bench/test_bench_cases.py --benchmark-only
"""
import pytest
import torch

from bench.core.registry import Unsupported, load_families

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = [(p, i) for p, impls in load_families().cases() for i in impls]


@pytest.fixture(scope="module")
def inputs_cache():
    return {}


@pytest.mark.parametrize("problem,impl", CASES,
                         ids=[f"{p.family}/{p.name}/{i.name}" for p, i in CASES])
def test_forward(benchmark, problem, impl, inputs_cache):
    key = (problem.family, problem.name)
    if key not in inputs_cache:
        inputs_cache.clear()
        inputs_cache[key] = problem.make(DEVICE, True)
    try:
        forward = impl.build(inputs_cache[key])
    except Unsupported as exc:
        pytest.skip(str(exc))
    if problem.train_step:  # one whole training step is the call of these problems
        forward = forward.step
    if DEVICE == "cuda":
        def forward_synced():
            out = forward()
            torch.cuda.synchronize()
            return out
        benchmark(forward_synced)
    else:
        benchmark(forward)
