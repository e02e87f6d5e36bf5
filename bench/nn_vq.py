"""VectorQuantizer layer family ("vq_layer"): one EMA training step (search, EMA update of
cluster sizes and sums, commitment loss, straight-through output and its backward).

Problems (issue 8): N=65,536 vectors, K=100,000 codes, D=8 (VQGAN-LC's projected codes) and
D=256, fp32 as the quantizers run. Peer: vector-quantize-pytorch's EuclideanCodebook EMA step
re-implemented in bench/peers/vq.py (cdist [N, K], argmax, one-hot [N, K] fp32, one_hot @ embed
for the picked codes, one_hot.T @ x for the EMA sums). At full size its peak is about 105 GB
(dist, and F.one_hot's int64 [N, K] beside its fp32 copy, 26 GB per fp32 [N, K]): it fits the
H200; where it does not, the runner reports "out of memory" for it and goes on. Each
implementation returns ``quantized + loss`` first (so backward covers the straight-through
output and the loss) and the indices second; the check compares the first call's outputs,
before the codebooks drift apart.
"""
import torch

import gtkernels as gk
from bench.core.registry import impl, problem
from bench.peers.vq import OneHotEMAQuantizer

FAMILY = "vq_layer"
SHAPES = {"vq-step-d8": 8, "vq-step-d256": 256}
N, K = 65536, 100_000
QUICK_N, QUICK_K = 2048, 4096
DECAY, COMMITMENT = 0.99, 0.25


def max_difference(ours, peer):
    return f"max abs diff {(ours.double() - peer.double()).abs().max().item():.1e}"


def make_step_inputs(dim, device, quick):
    n, k = (QUICK_N, QUICK_K) if quick else (N, K)
    x = torch.randn(n, dim, device=device, requires_grad=True)
    codebook = torch.randn(k, dim, device=device)
    return {"x": x, "codebook": codebook}


for _name, _dim in SHAPES.items():
    problem(FAMILY, _name, grads=("x",), compare=max_difference,
            note=f"EMA VQ training step, N=65,536, K=100,000, D={_dim}, fp32")(
        lambda device, quick, dim=_dim: make_step_inputs(dim, device, quick))


@impl(FAMILY, "vector-quantize-pytorch (one-hot EMA, re-implemented)")
def one_hot_ema_step(inputs):
    quantizer = OneHotEMAQuantizer(inputs["codebook"], DECAY, COMMITMENT)

    def step():
        quantized, idx, loss = quantizer(inputs["x"])
        return quantized + loss, idx
    return step


@impl(FAMILY, "gk.nn.VectorQuantizer", ours=True)
def gk_vq_step(inputs):
    codebook = inputs["codebook"]
    vq = gk.nn.VectorQuantizer(codebook.shape[0], codebook.shape[1], ema_decay=DECAY,
                               commitment=COMMITMENT, device=codebook.device).train()
    with torch.no_grad():
        vq.embedding.copy_(codebook)
        vq.ema_embed_sum.copy_(codebook)

    def step():
        quantized, idx, loss = vq(inputs["x"])
        return quantized + loss, idx
    return step
