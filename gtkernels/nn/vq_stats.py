"""Code-usage statistics of a quantizer's ``code_counts`` histogram ([K] or [G, K], int64)."""
import torch


class CodeUsageMixin:
    """perplexity / usage_fraction / reset_usage over the ``code_counts`` buffer."""

    def perplexity(self) -> torch.Tensor:
        """exp(entropy) of the code histogram: K when all codes are used equally, 1 when one
        code takes everything. float32 scalar, or [G] with groups. 0 before any forward."""
        counts = self.code_counts.float()
        probs = counts / counts.sum(-1, keepdim=True).clamp_min(1)
        entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1)
        return torch.where(counts.sum(-1) > 0, entropy.exp(), torch.zeros_like(entropy))

    def usage_fraction(self) -> torch.Tensor:
        """Fraction of codes chosen at least once since reset_usage: float32 scalar, or [G]."""
        return (self.code_counts > 0).float().mean(-1)

    @torch.no_grad()
    def reset_usage(self):
        """Clears the histogram (e.g. at the start of an epoch)."""
        self.code_counts.zero_()
