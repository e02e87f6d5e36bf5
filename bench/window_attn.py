"""Window-attention family: dilated sliding windows (BENCH.md win-d1, win-d4, win-w256d2).

Peers: FlexAttention with a compiled block mask from a dilated-band mask_mod (CUDA only) and,
at small N, SDPA with a dense boolean mask.
"""
import torch
import torch.nn.functional as F

import gtkernels as gk
from bench.core.registry import Unsupported, impl, problem
from gtkernels.reference import window_attn as ref

FAMILY = "window_attn"
# name: (window, dilation, num_global)
PROBLEMS = {"win-d1": (64, 1, 0), "win-d4": (64, 4, 0), "win-w256d2": (256, 2, 0)}
DENSE_MASK_MAX_N = 4096


def max_rel_err(ours, peer):
    peer = peer.float()
    return f"max rel err {((ours.float() - peer).abs().max() / peer.abs().max()).item():.1e}"


def window_problem(window, dilation, num_global):
    def make(device, quick):
        n, heads, dim = (768, 2, 32) if quick else (300_000, 8, 64)
        q, k, v = (torch.randn(1, n, heads, dim, device=device, dtype=torch.bfloat16,
                               requires_grad=True) for _ in range(3))
        return {"q": q, "k": k, "v": v, "window": window, "dilation": dilation,
                "num_global": num_global}
    return make


for _name, _options in PROBLEMS.items():
    problem(FAMILY, _name, grads=("q", "k", "v"), compare=max_rel_err,
            note="N=300,000, H=8, D=64, bf16, (window, dilation, globals) = %s" % (_options,))(
        window_problem(*_options))


def band_mask_mod(window, dilation, num_global):
    """FlexAttention mask_mod of the dilated band with global tokens."""
    def mask_mod(b, h, q_idx, kv_idx):
        diff = q_idx - kv_idx
        band = (diff % dilation == 0) & (diff.abs() <= window * dilation)
        return band | (q_idx < num_global) | (kv_idx < num_global)
    return mask_mod


def heads_first(*tensors):
    """[B, N, H, D] -> [B, H, N, D] views."""
    return tuple(t.transpose(1, 2) for t in tensors)


@impl(FAMILY, "FlexAttention")
def flex_attention_peer(inputs):
    q = inputs["q"]
    if q.device.type != "cuda":
        raise Unsupported("FlexAttention runs on CUDA only")
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    n = q.shape[1]
    mask_mod = band_mask_mod(inputs["window"], inputs["dilation"], inputs["num_global"])
    block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=n, KV_LEN=n,
                                   device=q.device, _compile=True)
    flex = torch.compile(flex_attention)

    def forward():
        out = flex(*heads_first(inputs["q"], inputs["k"], inputs["v"]), block_mask=block_mask)
        return out.transpose(1, 2)
    return forward


@impl(FAMILY, "SDPA dense mask")
def dense_mask_peer(inputs):
    q = inputs["q"]
    n = q.shape[1]
    if n > DENSE_MASK_MAX_N:
        raise Unsupported(f"dense [N, N] mask only for N <= {DENSE_MASK_MAX_N}")
    mask = ref.window_mask(n, inputs["window"], inputs["dilation"], inputs["num_global"],
                           device=q.device)

    def forward():
        out = F.scaled_dot_product_attention(*heads_first(inputs["q"], inputs["k"], inputs["v"]),
                                             attn_mask=mask)
        return out.transpose(1, 2)
    return forward


@impl(FAMILY, "gtkernels", ours=True)
def gk_window_attention(inputs):
    def forward():
        return gk.window_attention(inputs["q"], inputs["k"], inputs["v"], inputs["window"],
                                   inputs["dilation"], num_global=inputs["num_global"])
    return forward
