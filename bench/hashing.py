"""Hashed-lookup family: sign hashing, MemoryFormer's memory layer, hashed embeddings.

Problems (BENCH.md): `mem-base` (T=16,384, d_in = d_out = 1024, tau=8, bf16), `mem-qkv` (the
same with one hash shared by 3 tables, MemoryFormer's Q/K/V), `hashed-emb` (1,000,000 x 128
table, 65,536 bags of 32 weighted rows, bf16) and `mem-cpu` (the CPU acceptance case: T=2048,
d=512, tau=8, fp32). Peers: eager torch (hash, gather [T, K, d_out], weighted sum),
`nn.EmbeddingBag` (sum, per_sample_weights) over the flattened tables (mem-base), the
`nn.Linear` that the layer replaces (another function: its check column is not meaningful),
and for hashed-emb `nn.EmbeddingBag` with and without deterministic algorithms. mem-cpu keeps
its acceptance size under --quick; its peers are the eager reference and nn.Linear only, to
keep the quick run short.
"""
import contextlib

import torch
import torch.nn.functional as F

import gtkernels as gk
from bench.core.registry import impl, problem
from gtkernels.reference import hashing as ref

FAMILY = "hashing"
MEMORY_PROBLEMS = ["mem-base", "mem-cpu"]


def count_mismatches(ours, peer):
    return f"{int((ours != peer).sum())} mismatches"


def relative_error(ours, peer):
    peer = peer.double()
    return f"rel err {((ours.double() - peer).norm() / peer.norm().clamp_min(1e-30)).item():.1e}"


@problem(FAMILY, "sign-hash", compare=count_mismatches,
         note="mem-base's hash: T=16,384 tokens x 1024, tau=8, bf16")
def sign_hash_problem(device, quick):
    tokens = 1024 if quick else 16384
    x = torch.randn(tokens, 1024, device=device, dtype=torch.bfloat16)
    return {"x": x, "tau": 8}


@impl(FAMILY, "eager torch", problems=["sign-hash"])
def eager_sign_hash(inputs):
    return lambda: ref.sign_hash(inputs["x"], inputs["tau"])


@impl(FAMILY, "gtkernels", ours=True, problems=["sign-hash"])
def gk_sign_hash(inputs):
    return lambda: gk.sign_hash(inputs["x"], inputs["tau"])


def memory_inputs(device, tokens, d, tau, dtype, num_tables=None):
    """x [T, d], tables [(M,) d / tau, 2**tau, d] scaled like a d -> d linear layer's output."""
    k = d // tau
    shape = (k, 2**tau, d) if num_tables is None else (num_tables, k, 2**tau, d)
    x = torch.randn(tokens, d, device=device, dtype=dtype, requires_grad=True)
    tables = (torch.randn(shape, device=device, dtype=dtype) * k**-0.5).requires_grad_()
    linear_weight = (torch.randn(d, d, device=device, dtype=dtype) * d**-0.5).requires_grad_()
    return {"x": x, "tables": tables, "linear_weight": linear_weight, "tau": tau}


@problem(FAMILY, "mem-base", grads=("x", "tables", "linear_weight"), compare=relative_error,
         note="T=16,384, d_in = d_out = 1024, tau=8 (K=128 tables of 256 x 1024), bf16")
def mem_base_problem(device, quick):
    return memory_inputs(device, 256 if quick else 16384, 256 if quick else 1024, 8,
                         torch.bfloat16)


@problem(FAMILY, "mem-cpu", grads=("x", "tables", "linear_weight"), compare=relative_error,
         note="CPU acceptance case: T=2048, d_in = d_out = 512, tau=8, fp32")
def mem_cpu_problem(device, quick):
    return memory_inputs(device, 2048, 512, 8, torch.float32)


@problem(FAMILY, "mem-qkv", grads=("x", "tables"), compare=relative_error,
         note="mem-base with one hash shared by 3 tables (Q, K, V): tables [3, 128, 256, 1024]")
def mem_qkv_problem(device, quick):
    return memory_inputs(device, 256 if quick else 16384, 128 if quick else 1024, 8,
                         torch.bfloat16, num_tables=3)


@impl(FAMILY, "eager torch", problems=MEMORY_PROBLEMS + ["mem-qkv"])
def eager_memory(inputs):
    x, tables, tau = inputs["x"], inputs["tables"], inputs["tau"]
    return lambda: ref.hashed_lookup(x, tables, tau)


@impl(FAMILY, "nn.EmbeddingBag", problems=["mem-base"])
def embedding_bag_memory(inputs):
    x, tables, tau = inputs["x"], inputs["tables"], inputs["tau"]
    k, buckets, d = tables.shape
    first_row = torch.arange(k, device=x.device) * buckets

    def forward():
        rows = ref.sign_hash(x, tau).long() + first_row           # bag t: rows k * 2**tau + h_k
        weights = ref.hash_weights(x, tau)
        return F.embedding_bag(rows, tables.view(k * buckets, d), mode="sum",
                               per_sample_weights=_no_grad_if_bf16_cuda(weights))
    return forward


def _no_grad_if_bf16_cuda(weights):
    """torch has no CUDA bf16 backward for EmbeddingBag's per_sample_weights: there the peer
    skips that gradient (less work than ours, so its ratio flatters the peer)."""
    if weights.is_cuda and weights.dtype == torch.bfloat16:
        return weights.detach()
    return weights


@impl(FAMILY, "nn.Linear (replaced layer)", problems=MEMORY_PROBLEMS, baseline=True)
def linear_memory(inputs):
    return lambda: F.linear(inputs["x"], inputs["linear_weight"])


@impl(FAMILY, "gtkernels x3 (hash not shared)", ours=True, problems=["mem-qkv"])
def gk_memory_unshared(inputs):
    x, tables, tau = inputs["x"], inputs["tables"], inputs["tau"]
    return lambda: torch.stack([gk.hashed_lookup(x, t, tau=tau) for t in tables.unbind(0)])


@impl(FAMILY, "gtkernels", ours=True, problems=MEMORY_PROBLEMS + ["mem-qkv"])
def gk_memory(inputs):
    x, tables, tau = inputs["x"], inputs["tables"], inputs["tau"]
    return lambda: gk.hashed_lookup(x, tables, tau=tau)


@problem(FAMILY, "hashed-emb", grads=("table", "weights"), compare=relative_error,
         note="one 1,000,000 x 128 table, 65,536 bags of 32 weighted random rows, bf16")
def hashed_embedding_problem(device, quick):
    rows, bags = (5000, 512) if quick else (1_000_000, 65536)
    table = torch.randn(rows, 128, device=device, dtype=torch.bfloat16, requires_grad=True)
    idx = torch.randint(0, rows, (bags, 32), device=device)
    weights = torch.rand(bags, 32, device=device, dtype=torch.bfloat16, requires_grad=True)
    return {"table": table, "idx": idx, "weights": weights}


@contextlib.contextmanager
def deterministic_algorithms():
    """torch.use_deterministic_algorithms(True) inside the block only."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


class DeterministicEmbeddingBag(torch.autograd.Function):
    """F.embedding_bag (sum, per-sample weights) with deterministic algorithms on in its forward
    and its backward, and nowhere else (the setting is global: it must not leak to other cases)."""

    @staticmethod
    def forward(ctx, table, idx, weights):
        with deterministic_algorithms(), torch.enable_grad():
            weights = _no_grad_if_bf16_cuda(weights.detach().requires_grad_())
            table = table.detach().requires_grad_()
            out = F.embedding_bag(idx, table, mode="sum", per_sample_weights=weights)
        ctx.inner = (out, table, weights)
        return out.detach()

    @staticmethod
    def backward(ctx, grad):
        out, table, weights = ctx.inner
        leaves = [table] + ([weights] if weights.requires_grad else [])
        with deterministic_algorithms():
            grads = torch.autograd.grad(out, leaves, grad)
        return grads[0], None, grads[1] if len(grads) > 1 else None


@impl(FAMILY, "eager torch", problems=["hashed-emb"])
def eager_embedding(inputs):
    return lambda: ref.weighted_gather_sum(inputs["table"], inputs["idx"], inputs["weights"])


@impl(FAMILY, "nn.EmbeddingBag", problems=["hashed-emb"])
def embedding_bag(inputs):
    table, idx, weights = inputs["table"], inputs["idx"], inputs["weights"]
    return lambda: F.embedding_bag(idx, table, mode="sum",
                                   per_sample_weights=_no_grad_if_bf16_cuda(weights))


@impl(FAMILY, "nn.EmbeddingBag deterministic", problems=["hashed-emb"])
def deterministic_embedding_bag(inputs):
    table, idx, weights = inputs["table"], inputs["idx"], inputs["weights"]
    return lambda: DeterministicEmbeddingBag.apply(table, idx, weights)


@impl(FAMILY, "gtkernels", ours=True, problems=["hashed-emb"])
def gk_embedding(inputs):
    table, idx, weights = inputs["table"], inputs["idx"], inputs["weights"]
    # Indices come from torch.randint: checked once here, not per call (that is a host sync).
    gk.weighted_gather_sum(table, idx, weights)
    return lambda: gk.weighted_gather_sum(table, idx, weights, check_index=False)
