"""Nyströmformer: the Nyström approximation of the softmax matrix through segment-mean landmarks.

Xiong, Zeng, Chakraborty, Tan, Fung, Li, Singh, "Nyströmformer: A Nyström-Based Algorithm for
Approximating Self-Attention", AAAI 2021.  With landmarks Q̃ (m_q rows) and K̃ (m_k rows):

    F = softmax(s Q K̃ᵀ),  M = softmax(s Q̃ K̃ᵀ),  G = softmax(s Q̃ Kᵀ),  Õ = F · M⁺ · (G V)

computed right to left, so nothing n×n is formed.  Landmarks are the means of contiguous segments:
segment i holds rows ⌊i·n/m⌋ .. ⌊(i+1)·n/m⌋ − 1, so any n works and segment sizes differ by at most one
(the paper needs m | n).  Q̃ comes from Q's segments and K̃ from K's, so for cross attention
m_q = min(m, n_q) and m_k = min(m, n_k) and M is m_q × m_k (its pseudo-inverse still exists).
M⁺: ``iterations`` Newton–Schulz steps Z ← ¼Z(13I − MZ(15I − MZ(7I − MZ))) from
Z₀ = Mᵀ/(‖M‖₁‖M‖_∞) (the paper: 6), or ``pinv=exact`` (torch.linalg.pinv).  With m >= n_q and n_k
every landmark is one row, F = M = G = P = D⁻¹A and PP⁺PV = PV: exact with the exact pinv.  The
paper's depthwise convolution on V is a trained module, not part of the approximation, so it is left
out.  Half-precision inputs are computed in float32 (the pseudo-inverse needs it) and cast back.

Causal: the shared decomposition (``kdecli.methods.causal``).  Nyström has no row sum of its own
(its three softmaxes are each normalised), so a full block's is estimated with each key landmark
standing for its segment S_l: D̃_i = Σ_l |S_l|·e^{s q_i·k̃_l}.  It is exact when every segment is one
key, and by Jensen's inequality (e^{mean} ≤ mean of e) a lower estimate otherwise.  Query landmarks
are means over a full block's queries, so a later query moves an earlier one's estimate (never a
later key into it).
"""

from __future__ import annotations

import torch

from kdecli.masks import FULL
from kdecli.methods.base import AttentionMethod, Param
from kdecli.methods.causal import CAUSAL_BUDGET_HELP, CAUSAL_LEAF, Partial
from kdecli.methods.common import working_dtype
from kdecli.methods.keyset_calls import Call, decomposed_log_row_sums
from kdecli.methods.registry import register


@register
class Nystromformer(AttentionMethod):
    name = "nystromformer"
    summary = "Nyström approximation F·M⁺·(G V) with segment-mean landmarks."
    paper = "Xiong et al., Nyströmformer, AAAI 2021"
    budget_help = (
        "m = number of landmarks (`landmarks`), segment means of Q and of K." + CAUSAL_BUDGET_HELP
    )
    params = (
        Param("landmarks", int, 64, "segment-mean landmarks per side (m)", 1, 2**20),
        Param(
            "pinv",
            str,
            "iterative",
            "M⁺ by Newton–Schulz (iterative) or torch.linalg.pinv (exact)",
            choices=("iterative", "exact"),
        ),
        Param("iterations", int, 6, "Newton–Schulz iterations for pinv=iterative", 1, 100),
        CAUSAL_LEAF,
    )
    causal_mode = "decomposition"
    key_set_note = (
        "a low-rank estimate: every key enters through its segment's landmark, so no key is "
        "left out; its row sums are reported"
    )
    causal_query_coupled = True  # query landmarks are means over a full block's queries
    cost_help = (
        "2·m·(n_q + n_k)·d + 2·m·n_k·d_v for F, G and GV, 2·m²·d for M, about 8·m³ per "
        "Newton–Schulz step, 2·n_q·m·d_v for the product."
    )

    @classmethod
    def params_for_budget(cls, budget):
        return {"landmarks": budget, "causal_leaf": budget}

    def keys_per_query(self, n_q, n_k, mask=FULL):
        # a query meets the m_k landmark keys (at most one per key)
        return float(min(self.config["landmarks"], n_k))

    @classmethod
    def exact_limit(cls, n_q, n_k):
        # A landmark per row: F = M = G = D⁻¹A = P, and P·P⁺·P = P with the exact pinv; causal:
        # the same in every full block, and each landmark's segment is one key, so D̃ = D.
        return {"landmarks": max(n_q, n_k), "pinv": "exact"}

    def forward_full(self, q, k, v, scale, generator):
        in_dtype, work = v.dtype, working_dtype(q.dtype)
        _, out = self.partial(q.to(work), k.to(work), v.to(work), scale, generator, None)
        return out.to(in_dtype)

    def log_row_sums(self, q, k, v, scale, generator, mask=FULL):
        # a plain call forms no row sum (its three softmaxes are normalised); the causal
        # decomposition merges its full blocks' D̃_i with the exact leaves'
        if not Call.of(self, q, k, v, mask).mask.is_causal:
            return None
        return decomposed_log_row_sums(self, q, k, v, scale, generator, mask)

    def partial(self, q, k, v, scale, generator, query_offset):
        m = self.config["landmarks"]
        q_land, k_land = segment_means(q, m), segment_means(k, m)
        landmark_logits = scale * q @ k_land.transpose(-1, -2)  # (b, h, n_q, m_k)
        f = torch.softmax(landmark_logits, dim=-1)
        # D̃_i = Σ_l |S_l| e^{s q_i·k̃_l}: each landmark stands for its segment of keys.
        log_sizes = torch.log(segment_sizes(k.shape[-2], m, k.device).to(q.dtype))
        lse = torch.logsumexp(landmark_logits + log_sizes, dim=-1)
        mid = torch.softmax(scale * q_land @ k_land.transpose(-1, -2), dim=-1)  # (b, h, m_q, m_k)
        g = torch.softmax(scale * q_land @ k.transpose(-1, -2), dim=-1)  # (b, h, m_q, n_k)
        if self.config["pinv"] == "exact":
            mid_pinv = torch.linalg.pinv(mid)
        else:
            mid_pinv = newton_schulz_pinv(mid, self.config["iterations"])
        return Partial(lse, f @ (mid_pinv @ (g @ v)))

    def memory_bytes(self, b, h, n_q, n_k, d, d_v, itemsize):
        # F (n_q × m) and G (m × n_k) with their softmax temporaries, the landmark grids (the
        # rows gathered per segment), M and its pseudo-inverse.
        m = self.config["landmarks"]
        m_q, m_k = min(m, n_q), min(m, n_k)
        per_rows = (n_q + n_k) * (3 * max(m_q, m_k) + d) + (n_q + n_k) * d
        return float(b * h * itemsize * (per_rows + 8 * m_q * m_k + n_q * d_v))

    def flops(self, b, h, n_q, n_k, d, d_v):
        m_q, m_k = min(self.config["landmarks"], n_q), min(self.config["landmarks"], n_k)
        steps = self.config["iterations"] if self.config["pinv"] == "iterative" else 4
        return float(
            b
            * h
            * (
                2 * n_q * m_k * d
                + 2 * m_q * m_k * d
                + 2 * m_q * n_k * (d + d_v)
                + steps * 8 * m_q * m_q * m_k
                + 2 * m_k * m_q * d_v
                + 2 * n_q * m_k * d_v
            )
        )


def segment_sizes(n: int, m: int, device: torch.device) -> torch.Tensor:
    """Rows in each of the min(m, n) segments of ``segment_means``: (min(m, n),) int64."""
    m = min(m, n)
    bounds = torch.arange(m + 1, device=device) * n // m
    return bounds[1:] - bounds[:-1]


def segment_means(x: torch.Tensor, m: int) -> torch.Tensor:
    """Means of min(m, n) contiguous segments of the rows of x (b, h, n, d): (b, h, min(m, n), d).

    Segment i holds rows ⌊i·n/m⌋ .. ⌊(i+1)·n/m⌋ − 1.  Rows are gathered into a (segments × longest)
    grid and masked, which keeps the sum in a fixed order (deterministic, unlike atomic adds).
    """
    n = x.shape[-2]
    m = min(m, n)
    bounds = torch.arange(m + 1, device=x.device) * n // m
    sizes = segment_sizes(n, m, x.device)
    longest = -(-n // m)
    rows = bounds[:-1, None] + torch.arange(longest, device=x.device)  # (m, longest)
    inside = rows < bounds[1:, None]
    grid = x[..., rows.clamp(max=n - 1), :] * inside[..., None].to(x.dtype)
    return grid.sum(-2) / sizes[:, None].to(x.dtype)


def newton_schulz_pinv(mat: torch.Tensor, iterations: int) -> torch.Tensor:
    """Newton–Schulz (hyperpower, order 3) iteration for the pseudo-inverse of each slice of mat.

    Z₀ = Mᵀ/(‖M‖₁‖M‖_∞) per slice makes ‖I − MZ₀‖₂ < 1, so the iteration converges to M⁺.
    """
    norm_1 = mat.abs().sum(-2).amax(-1)
    norm_inf = mat.abs().sum(-1).amax(-1)
    z = mat.transpose(-1, -2) / (norm_1 * norm_inf)[..., None, None]
    eye = torch.eye(mat.shape[-2], dtype=mat.dtype, device=mat.device)
    for _ in range(iterations):
        mz = mat @ z
        z = 0.25 * z @ (13 * eye - mz @ (15 * eye - mz @ (7 * eye - mz)))
    return z
