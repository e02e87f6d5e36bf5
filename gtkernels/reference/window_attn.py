"""Reference of window attention: a dense [N, N] boolean mask and masked softmax attention."""
import torch


def window_mask(n, window, dilation=1, num_global=0, causal=False, device=None):
    """bool [N, N]: mask[i, j] is True when query i attends key j.

    j = i + t * dilation with |t| <= window, or i < num_global, or j < num_global; j <= i if
    causal. A key that is both global and in the window is one entry: it counts once."""
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(n, device=device)[None, :]
    diff = j - i
    band = (diff % dilation == 0) & (diff.abs() <= window * dilation)
    mask = band | (i < num_global) | (j < num_global)
    if causal:
        mask = mask & (j <= i)
    return mask


def window_attention(q, k, v, window, dilation=1, num_global=0, causal=False, scale=None):
    """q, k, v [B, N, H, D] (or [N, H, D]) -> (out like q, lse [B, N, H]) computed in q's dtype
    (pass float64 tensors for the oracle)."""
    squeeze = q.dim() == 3
    if squeeze:
        q, k, v = q[None], k[None], v[None]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    mask = window_mask(q.shape[1], window, dilation, num_global, causal, q.device)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    out = torch.einsum("bhij,bjhd->bihd", torch.softmax(scores, -1), v)
    lse = lse.transpose(1, 2)
    if squeeze:
        out, lse = out[0], lse[0]
    return out, lse
