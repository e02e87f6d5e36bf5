"""References of the hashed-lookup family."""
import torch


def sign_hash(x: torch.Tensor, tau: int) -> torch.Tensor:
    """x [..., K * tau] -> int32 [..., K]; first element of each chunk is the top bit."""
    bits = (x >= 0).to(torch.int64).unflatten(-1, (-1, tau))
    weights = 2 ** torch.arange(tau - 1, -1, -1, device=x.device, dtype=torch.int64)
    return (bits * weights).sum(-1).to(torch.int32)
