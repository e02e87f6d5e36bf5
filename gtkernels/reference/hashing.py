"""References of the hashed-lookup family."""
import torch


def sign_hash(x: torch.Tensor, tau: int) -> torch.Tensor:
    """x [..., K * tau] -> int32 [..., K]; first element of each chunk is the top bit."""
    bits = (x >= 0).to(torch.int64).unflatten(-1, (-1, tau))
    weights = 2 ** torch.arange(tau - 1, -1, -1, device=x.device, dtype=torch.int64)
    return (bits * weights).sum(-1).to(torch.int32)


def code_signs(x: torch.Tensor, tau: int) -> torch.Tensor:
    """b = +1 where x >= 0 else -1, as x's dtype, shaped [..., K, tau]: the selected code."""
    chunks = x.unflatten(-1, (-1, tau))
    return torch.where(chunks >= 0, 1.0, -1.0).to(x.dtype)


def hash_weights(x: torch.Tensor, tau: int, weighting: str = "softmax",
                 temperature: float = 1.0) -> torch.Tensor:
    """Weights [..., K] of DESIGN.md in x's dtype. |x| is written b * x with the code's sign b,
    so its derivative at 0 is +1, that of the explicit softmax at the selected code."""
    chunks = x.unflatten(-1, (-1, tau))
    magnitude = code_signs(x, tau) * chunks
    softmax_weight = torch.sigmoid(2 * magnitude / temperature).prod(-1)
    if weighting == "softmax":
        return softmax_weight
    if weighting == "l1_softmax":
        return magnitude.sum(-1) * softmax_weight
    return torch.ones_like(softmax_weight)


def explicit_softmax_weights(x: torch.Tensor, tau: int, temperature: float = 1.0) -> torch.Tensor:
    """softmax over all 2**tau codes b in {-1, 1}**tau of <b, x_k> / T, taken at the code
    sign_hash picks: [..., K]. Enumerates the codes (small tau only)."""
    codes = torch.arange(2**tau, device=x.device)
    shifts = torch.arange(tau - 1, -1, -1, device=x.device)
    all_signs = (((codes[:, None] >> shifts) & 1) * 2 - 1).to(x.dtype)  # [2**tau, tau]
    logits = x.unflatten(-1, (-1, tau)) @ all_signs.T / temperature     # [..., K, 2**tau]
    selected = sign_hash(x, tau).long().unsqueeze(-1)
    return logits.softmax(-1).gather(-1, selected).squeeze(-1)


def hashed_lookup(x: torch.Tensor, tables: torch.Tensor, tau: int, weighting: str = "softmax",
                  temperature: float = 1.0, bias: torch.Tensor = None) -> torch.Tensor:
    """Eager hash + gather [..., K, d_out] + weighted sum.
    tables [K, 2**tau, d_out] -> [..., d_out]; tables [M, K, 2**tau, d_out] -> [M, ..., d_out]."""
    codes = sign_hash(x, tau).long()
    weights = hash_weights(x, tau, weighting, temperature)
    chunk_ids = torch.arange(codes.shape[-1], device=x.device)
    if tables.dim() == 3:
        y = (weights.unsqueeze(-1) * tables[chunk_ids, codes]).sum(-2)
        return y if bias is None else y + bias
    y = (weights.unsqueeze(-1) * tables[:, chunk_ids, codes]).sum(-2)
    if bias is None:
        return y
    return y + bias.view(bias.shape[0], *([1] * (y.dim() - 2)), bias.shape[1])


def weighted_gather_sum(table: torch.Tensor, idx: torch.Tensor,
                        weights: torch.Tensor = None) -> torch.Tensor:
    """table [R, d] or [M, R, d], idx [T, B] -> [T, d] or [M, T, d]."""
    rows = table[..., idx.long(), :]                                    # [(M,) T, B, d]
    if weights is None:
        return rows.sum(-2)
    return (weights.to(table.dtype).unsqueeze(-1) * rows).sum(-2)
