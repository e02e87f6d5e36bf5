"""Vector quantization layer on gk.codebook_search: straight-through output, EMA codebook
updates by index-add, usage statistics, dead-code restart, factorized sub-codebooks (FQGAN),
a frozen codebook behind a learned linear map (SimVQ, VQGAN-LC), soft-code distillation
(VQGraph)."""
import torch
import torch.nn.functional as F
from torch import nn

from .. import _validate as V
from ..codebook import MAX_DIM, MIN_DIM, code_distill_loss, codebook_search
from .vq_stats import CodeUsageMixin

METRICS = ("l2", "cosine")
TRANSFORMS = (None, "linear")


class VectorQuantizer(CodeUsageMixin, nn.Module):
    """Vector quantizer: each vector of x is replaced by its nearest code.

    Args:
        num_codes: K, codes per (sub-)codebook.
        dim: D, size of the vectors quantized.
        metric: ``"l2"`` (squared Euclidean) or ``"cosine"`` (x and codes are l2-normalised
            first; the output is then the normalised code).
        commitment: beta of the commitment loss.
        ema_decay: None: the codebook is a parameter learned through the codebook loss. A float
            in (0, 1): the codebook is a buffer updated in training mode by exponential moving
            averages of the cluster sizes and sums (VQ-VAE-2), with Laplace smoothing eps.
        groups: G > 1 splits x into G parts of D / G, each searched in its own sub-codebook
            (FQGAN's factorized codebooks); indices get a trailing group axis.
        codebook_transform: None or ``"linear"``: the base codebook is a frozen buffer and a
            learned matrix W (identity at init; one [D/G, D/G] per group) gives
            ``codebook = base @ W.T`` (SimVQ, VQGAN-LC). Not combinable with ema_decay.
        soft_temperature: T of ``distill_loss`` (VQGraph's soft code assignments).
        dead_code_threshold: None, or a usage level: in training mode, after each forward,
            codes whose EMA usage (``cluster_size``) is below it are replaced by random vectors
            of the batch (``restart_dead_codes``).
        usage_decay: decay of the EMA usage without ema_decay (with it, ema_decay is used).
        eps: Laplace smoothing of the EMA cluster sizes.

    Forward: x float ``[..., D]`` -> ``(quantized, indices, loss)``:
        quantized: x's dtype ``[..., D]``, ``x + sg(q - x)`` (straight-through: its gradient
        w.r.t. x is the identity); indices: int64 ``[...]`` (``[..., G]`` with groups);
        loss: float32 scalar (float64 for float64 inputs),
        ``||sg(x) - q||^2 + commitment * ||x - sg(q)||^2`` (means over elements; the first
        term is absent with EMA updates). With metric "cosine", x and q are the normalised ones.

    The search is ``gk.codebook_search`` (exact, never N x K) in the wider of x's and the
    codebook's dtypes. Buffers: ``cluster_size`` (EMA usage per code), ``code_counts`` (int64
    histogram of chosen codes since ``reset_usage``; see ``perplexity``, ``usage_fraction``).

    Example::

        vq = gk.nn.VectorQuantizer(16384, 64, ema_decay=0.99, dead_code_threshold=1e-3)
        quantized, indices, loss = vq(torch.randn(8, 256, 64))   # [8, 256, 64], [8, 256], []
    """

    def __init__(self, num_codes: int, dim: int, metric: str = "l2", commitment: float = 0.25,
                 ema_decay: float = None, groups: int = 1, codebook_transform: str = None,
                 soft_temperature: float = None, dead_code_threshold: float = None,
                 usage_decay: float = 0.99, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        V.check_int_range("num_codes", num_codes, 1, 2**31 - 1)
        V.check_int_range("groups", groups, 1, max(1, dim))
        if dim % groups != 0:
            raise ValueError(f"dim ({dim}) must be divisible by groups ({groups})")
        V.check_int_range("dim / groups", dim // groups, MIN_DIM, MAX_DIM)
        V.check_choice("metric", metric, METRICS)
        V.check_choice("codebook_transform", codebook_transform, TRANSFORMS)
        if not (isinstance(commitment, (int, float)) and commitment >= 0):
            raise ValueError(f"commitment must be a number >= 0, got {commitment!r}")
        for name, decay in (("ema_decay", ema_decay), ("usage_decay", usage_decay)):
            if decay is not None and not (isinstance(decay, (int, float)) and 0 < decay < 1):
                raise ValueError(f"{name} must be in (0, 1), got {decay!r}")
        if ema_decay is not None and codebook_transform is not None:
            raise ValueError("ema_decay and codebook_transform exclude each other: EMA updates "
                             "write the codebook, the transform learns it through W")
        if soft_temperature is not None:
            V.check_positive("soft_temperature", soft_temperature)
        if dead_code_threshold is not None:
            V.check_positive("dead_code_threshold", dead_code_threshold)
        V.check_positive("eps", eps)
        self.num_codes, self.dim, self.groups, self.metric = num_codes, dim, groups, metric
        self.commitment, self.ema_decay, self.eps = float(commitment), ema_decay, float(eps)
        self.codebook_transform, self.soft_temperature = codebook_transform, soft_temperature
        self.dead_code_threshold, self.usage_decay = dead_code_threshold, usage_decay
        factory = {"device": device, "dtype": dtype}
        sub_dim = dim // groups
        shape = (num_codes, dim) if groups == 1 else (groups, num_codes, sub_dim)
        initial = torch.randn(shape, **factory)
        if ema_decay is not None:
            self.register_buffer("embedding", initial)
            # Each code starts as if chosen once by its own initial vector.
            self.register_buffer("ema_embed_sum", initial.clone())
        elif codebook_transform == "linear":
            self.register_buffer("base_codebook", initial)
            eye = torch.eye(sub_dim, **factory)
            self.transform_weight = nn.Parameter(eye if groups == 1 else eye.repeat(groups, 1, 1))
        else:
            self.embedding = nn.Parameter(initial)
        stat_shape = shape[:-1]
        self.register_buffer("cluster_size", torch.ones(stat_shape, device=device,
                                                        dtype=initial.dtype))
        self.register_buffer("code_counts", torch.zeros(stat_shape, device=device,
                                                        dtype=torch.int64))
        self.register_buffer("group_offsets", torch.arange(groups, device=device) * num_codes,
                             persistent=False)

    def grouped_codebook(self) -> torch.Tensor:
        """The effective codebook as [G, K, D / G] (differentiable where learned)."""
        G, K, d = self.groups, self.num_codes, self.dim // self.groups
        if self.codebook_transform == "linear":
            codebook = torch.matmul(self.base_codebook.view(G, K, d),
                                    self.transform_weight.view(G, d, d).transpose(-1, -2))
        else:
            codebook = self.embedding.view(G, K, d)
        return F.normalize(codebook, dim=-1) if self.metric == "cosine" else codebook

    @property
    def codebook(self) -> torch.Tensor:
        """The effective codebook the search uses: [K, D], or [G, K, D / G] with groups."""
        codebook = self.grouped_codebook()
        return codebook[0] if self.groups == 1 else codebook

    def _prepare(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """x [..., D] -> [N, G, D / G] in dtype, normalised for the cosine metric."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"x's last dim must be dim = {self.dim}, got {list(x.shape)}")
        grouped = x.reshape(-1, self.groups, self.dim // self.groups).to(dtype)
        return F.normalize(grouped, dim=-1) if self.metric == "cosine" else grouped

    def forward(self, x: torch.Tensor):
        codebook = self.grouped_codebook()
        dtype = torch.promote_types(x.dtype, codebook.dtype)
        flat = self._prepare(x, dtype)                                   # [N, G, d]
        codebook = codebook.to(dtype)
        _, idx = codebook_search(flat.detach(), codebook.detach(), 1, metric=self.metric)
        idx = idx[..., 0]                                                # [N, G]
        rows = (idx + self.group_offsets).reshape(-1)
        G, K, d = codebook.shape
        q = codebook.reshape(G * K, d).index_select(0, rows).view_as(flat)
        acc = torch.promote_types(dtype, torch.float32)  # losses in fp32 or better
        loss = self.commitment * F.mse_loss(flat.to(acc), q.detach().to(acc))
        if self.ema_decay is None:
            loss = loss + F.mse_loss(q.to(acc), flat.detach().to(acc))
        self._record(flat.detach(), rows)
        quantized = flat + (q - flat).detach()
        lead = x.shape[:-1]
        indices = idx.view(*lead) if self.groups == 1 else idx.view(*lead, G)
        return quantized.reshape(*lead, self.dim).to(x.dtype), indices, loss

    @torch.no_grad()
    def _record(self, flat: torch.Tensor, rows: torch.Tensor):
        """Usage histogram always; in training: EMA usage, EMA codebook, dead-code restart."""
        counts = torch.zeros(self.groups * self.num_codes, device=rows.device,
                             dtype=self.cluster_size.dtype)
        counts.index_add_(0, rows, torch.ones_like(rows, dtype=counts.dtype))
        self.code_counts.view(-1).add_(counts.to(torch.int64))
        if not self.training:
            return
        decay = self.usage_decay if self.ema_decay is None else self.ema_decay
        self.cluster_size.view(-1).mul_(decay).add_(counts, alpha=1 - decay)
        if self.ema_decay is not None:
            d = self.dim // self.groups
            sums = torch.zeros_like(self.ema_embed_sum).view(-1, d)
            sums.index_add_(0, rows, flat.reshape(-1, d).to(sums.dtype))
            self.ema_embed_sum.view(-1, d).mul_(decay).add_(sums, alpha=1 - decay)
            self._refresh_ema_codebook()
        if self.dead_code_threshold is not None:
            self._restart(flat, self.dead_code_threshold)

    def _refresh_ema_codebook(self):
        """codebook = EMA sums / Laplace-smoothed EMA cluster sizes (per group)."""
        G, K, d = self.groups, self.num_codes, self.dim // self.groups
        size = self.cluster_size.view(G, K)
        total = size.sum(-1, keepdim=True)
        smoothed = (size + self.eps) / (total + K * self.eps) * total
        self.embedding.view(G, K, d).copy_(self.ema_embed_sum.view(G, K, d)
                                           / smoothed.unsqueeze(-1))

    @torch.no_grad()
    def restart_dead_codes(self, x: torch.Tensor, threshold: float):
        """Replaces every code whose EMA usage (``cluster_size``) is below threshold by a random
        vector of x ``[..., D]`` (drawn with replacement). Restarted codes get usage threshold
        (and, with EMA, sums threshold * vector). No host sync: a masked select over the
        whole codebook."""
        V.check_positive("threshold", threshold)
        self._restart(self._prepare(x.detach(), self.cluster_size.dtype), threshold)

    def _restart(self, flat: torch.Tensor, threshold: float):
        if self.codebook_transform is not None:
            raise ValueError("restart_dead_codes needs a codebook stored code by code; with "
                             "codebook_transform='linear' every code is base @ W.T")
        if flat.shape[0] == 0:
            return
        G, K, d = self.groups, self.num_codes, self.dim // self.groups
        picks = torch.randint(0, flat.shape[0], (G, K), device=flat.device)
        samples = flat[picks, torch.arange(G, device=flat.device).unsqueeze(1)]  # [G, K, d]
        samples = samples.to(self.embedding.dtype)
        size = self.cluster_size.view(G, K)
        dead = size < threshold
        codes = self.embedding.view(G, K, d)
        codes.copy_(torch.where(dead.unsqueeze(-1), samples, codes))
        if self.ema_decay is not None:
            sums = self.ema_embed_sum.view(G, K, d)
            sums.copy_(torch.where(dead.unsqueeze(-1), samples * threshold, sums))
        size.copy_(torch.where(dead, torch.full_like(size, threshold), size))

    def distill_loss(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """VQGraph's soft-assignment distillation through ``gk.code_distill_loss``: student and
        teacher ``[..., D]``; mean over rows (and groups) of
        ``KL(softmax(-d(teacher, C) / T) || softmax(-d(student, C) / T))`` with
        T = soft_temperature and d this layer's metric. Differentiable in all three."""
        if self.soft_temperature is None:
            raise ValueError("distill_loss needs soft_temperature (set it at construction)")
        codebook = self.grouped_codebook()
        dtype = torch.promote_types(torch.promote_types(student.dtype, teacher.dtype),
                                    codebook.dtype)
        student, teacher = (self._prepare(t, dtype) for t in (student, teacher))
        losses = [code_distill_loss(student[:, g].contiguous(), teacher[:, g].contiguous(),
                                    codebook[g].to(dtype), temperature=self.soft_temperature,
                                    metric=self.metric)
                  for g in range(self.groups)]
        return torch.stack(losses).to(torch.promote_types(dtype, torch.float32)).mean()

    def extra_repr(self) -> str:
        return (f"num_codes={self.num_codes}, dim={self.dim}, metric={self.metric!r}, "
                f"commitment={self.commitment}, ema_decay={self.ema_decay}, groups={self.groups}, "
                f"codebook_transform={self.codebook_transform!r}, "
                f"soft_temperature={self.soft_temperature}, "
                f"dead_code_threshold={self.dead_code_threshold}")
