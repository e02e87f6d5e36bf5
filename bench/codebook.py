"""Codebook family: exact nearest-code search (vq-*) and the soft-code distillation loss.

Every vq problem comes in bf16 and fp32 (BENCH.md: the papers hand fp32 to their code). The
first implementation registered, a float64 brute force, is the reference: every other
implementation's check column counts its indices that differ from float64's ranking.
"""
import torch
import torch.nn.functional as F

import gtkernels as gk
from bench.core.registry import Unsupported, impl, problem

FAMILY = "codebook"
CHUNK_ELEMENTS = 2 ** 29  # rows x codes per chunk of the dense peers (2 GiB in fp32)

# name: (N, G, K, D, note); G = 0 means a plain [K, D] codebook.
VQ_SHAPES = {
    "vq-lc": (65536, 0, 100_000, 8, "VQGAN-LC: 100k codes projected to D=8"),
    "vq-sim": (65536, 0, 262_144, 128, "SimVQ's largest codebook"),
    "vq-wide": (65536, 0, 16_384, 256, "wide codes"),
    "vq-fq": (65536, 2, 16_384, 8, "FQGAN: 2 sub-codebooks"),
}
QUICK_N, QUICK_K = 512, 1024
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def count_mismatches(ours, reference):
    if ours.shape != reference.shape:  # the bare GEMM returns scores, not indices
        return "scores only"
    return f"{int((ours != reference).sum())} idx mismatches"


def make_vq(name, dtype, device, quick):
    n, groups, num_codes, dim, _ = VQ_SHAPES[name]
    if quick:
        n, num_codes = QUICK_N, min(num_codes, QUICK_K)
    x_shape = (n, groups, dim) if groups else (n, dim)
    c_shape = (groups, num_codes, dim) if groups else (num_codes, dim)
    x = torch.randn(x_shape, device=device).to(dtype)
    codebook = torch.randn(c_shape, device=device).to(dtype)
    return {"x": x, "codebook": codebook}


def _register_vq(name, dtype_name):
    n, groups, num_codes, dim, note = VQ_SHAPES[name]
    shape = f"N={n:,}" + (f", G={groups}" if groups else "") + f", K={num_codes:,}, D={dim}"

    @problem(FAMILY, f"{name}-{dtype_name}", compare=count_mismatches,
             note=f"{note}: {shape}, {dtype_name}")
    def make(device, quick):
        return make_vq(name, DTYPES[dtype_name], device, quick)


for _name in VQ_SHAPES:
    for _dtype_name in DTYPES:
        _register_vq(_name, _dtype_name)


@problem(FAMILY, "cpu-8k", compare=count_mismatches,
         note="CPU acceptance: N=8192, K=4096, D=64, fp32 (same size with --quick)")
def cpu_8k(device, quick):
    return {"x": torch.randn(8192, 64, device=device), "codebook": torch.randn(4096, 64, device=device)}


VQ_PROBLEMS = [f"{n}-{d}" for n in VQ_SHAPES for d in DTYPES]
BF16_PROBLEMS = [f"{n}-bf16" for n in VQ_SHAPES]


def per_group(search):
    """Runs search(x [N, D], codebook [K, D]) -> idx [N] on each group of a factorized problem."""
    def run(x, codebook):
        if x.dim() == 2:
            return search(x, codebook)
        return torch.stack([search(x[:, g], codebook[g]) for g in range(x.shape[1])], 1)
    return run


def chunked_argmin(x, codebook, distances):
    """argmin_j distances(x_chunk, codebook) over row chunks that fit in CHUNK_ELEMENTS."""
    rows = max(1, CHUNK_ELEMENTS // codebook.shape[0])
    return torch.cat([distances(x[i:i + rows], codebook).argmin(1) for i in range(0, len(x), rows)])


def float64_brute_force(x, codebook):
    """Exact enough to rank: float64 ||x||^2 + ||c||^2 - 2 x c^T, first index on ties."""
    x64, c64 = x.double(), codebook.double()
    c_norm = c64.pow(2).sum(1)
    return chunked_argmin(x64, c64, lambda xb, c: torch.addmm(c_norm, xb, c.T, alpha=-2))


def papers_fp32(x, codebook):
    x32, c32 = x.float(), codebook.float()
    c_norm = c32.pow(2).sum(1)
    return chunked_argmin(
        x32, c32, lambda xb, c: xb.pow(2).sum(1, keepdim=True) + c_norm - 2 * xb @ c.T)


@impl(FAMILY, "float64 brute force", problems=VQ_PROBLEMS + ["cpu-8k"])
def float64_impl(inputs):
    search = per_group(float64_brute_force)
    return lambda: search(inputs["x"], inputs["codebook"])


@impl(FAMILY, "gtkernels", ours=True, problems=VQ_PROBLEMS + ["cpu-8k"])
def gk_search(inputs):
    return lambda: gk.codebook_search(inputs["x"], inputs["codebook"])[1][..., 0]


@impl(FAMILY, "papers' fp32 (chunked)", problems=VQ_PROBLEMS)
def papers_impl(inputs):
    search = per_group(papers_fp32)
    return lambda: search(inputs["x"], inputs["codebook"])


@impl(FAMILY, "bf16 addmm + argmin", problems=BF16_PROBLEMS)
def addmm_impl(inputs):
    def search(x, codebook):
        c_norm = codebook.float().pow(2).sum(1).to(codebook.dtype)
        return chunked_argmin(x, codebook, lambda xb, c: torch.addmm(c_norm, xb, c.T, alpha=-2))
    search = per_group(search)
    return lambda: search(inputs["x"], inputs["codebook"])


@impl(FAMILY, "bare GEMM (roofline)", problems=BF16_PROBLEMS)
def gemm_impl(inputs):
    x, codebook = inputs["x"], inputs["codebook"]
    if x.dim() == 3:
        return lambda: torch.bmm(x.transpose(0, 1), codebook.transpose(1, 2))
    if x.shape[0] * codebook.shape[0] * x.element_size() > 40 * 2 ** 30:
        raise Unsupported("output over 40 GiB")
    return lambda: x @ codebook.T


@impl(FAMILY, "cdist + argmin (chunked)", problems=VQ_PROBLEMS + ["cpu-8k"])
def cdist_impl(inputs):
    search = per_group(lambda x, c: chunked_argmin(x.float(), c.float(), torch.cdist))
    return lambda: search(inputs["x"], inputs["codebook"])


# --- soft-code distillation ------------------------------------------------------------------

def max_rel_err(ours, peer):
    return f"rel err {float((ours.double() - peer.double()).abs() / peer.double().abs().clamp_min(1e-12)):.1e}"


@problem(FAMILY, "distill", grads=("student", "codebook"), compare=max_rel_err,
         note="soft-code KL: N=65,536, K=16,384, D=64, T=1, fp32")
def distill_problem(device, quick):
    n, num_codes = (256, 512) if quick else (65536, 16384)
    return {"student": torch.randn(n, 64, device=device, requires_grad=True),
            "teacher": torch.randn(n, 64, device=device),
            "codebook": torch.randn(num_codes, 64, device=device, requires_grad=True),
            "temperature": 1.0}


def distill_args(inputs):
    return inputs["student"], inputs["teacher"], inputs["codebook"], inputs["temperature"]


def dense_sq_distances(x, codebook):
    return x.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * x @ codebook.T


def dense_logits(x, codebook, temperature):
    """[N, K] logits of the soft code assignment: -||x - c||^2 / T."""
    return -dense_sq_distances(x, codebook) / temperature


@impl(FAMILY, "dense log_softmax + kl_div", problems=["distill"])
def dense_distill(inputs):
    """The teacher's assignment as log-probabilities (log_target=True): the leaner dense form."""
    s, t, c, temp = distill_args(inputs)

    def loss():
        log_q = F.log_softmax(dense_logits(s, c, temp), dim=-1)
        log_p = F.log_softmax(dense_logits(t, c, temp), dim=-1)
        return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)
    return loss


@impl(FAMILY, "VQGraph's kl_div (softmax target)", problems=["distill"])
def vqgraph_distill(inputs):
    """VQGraph's training loop: the teacher's assignment as probabilities (softmax) and
    kl_div's default probability target, which keeps p and takes its log inside kl_div."""
    s, t, c, temp = distill_args(inputs)

    def loss():
        log_q = F.log_softmax(dense_logits(s, c, temp), dim=-1)
        p = F.softmax(dense_logits(t, c, temp), dim=-1)
        return F.kl_div(log_q, p, reduction="batchmean")
    return loss


@impl(FAMILY, "gtkernels", ours=True, problems=["distill"])
def gk_distill(inputs):
    s, t, c, temp = distill_args(inputs)
    return lambda: gk.code_distill_loss(s, t, c, temperature=temp)
