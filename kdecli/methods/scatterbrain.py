"""ScatterBrain ("sblocal"): exact local band + Performer low-rank estimate everywhere else.

Chen, Dao, Winsor, Song, Rudra, Ré, "Scatterbrain: Unifying Sparse and Low-rank Attention
Approximation", NeurIPS 2021.  With the FAVOR+ features φ of ``kdecli.methods.features``,
Â = φ(Q)φ(K)ᵀ, a band B = {(i, j): |j − p_i| < w/2} and S = (e^ℓ − Â) on B, zero elsewhere:

    Õ = (ÂV + SV) / (Â1 + S1),   i.e. for each query i
    N_i = Σ_{j ∉ B_i} φ(q_i)·φ(k_j) ṽ_j + Σ_{j ∈ B_i} e^{ℓ_ij} ṽ_j,   ṽ_j = (v_j, 1)
    Õ_i = N_i[:d_v] / N_i[d_v]

so on the band the estimate is the exact entry and elsewhere the Performer entry.  p_i = ⌊i·n_k/n_q⌋
is query i's position among the keys (p_i = i in self-attention).  Never n × n: φ(K)ᵀṼ once gives
the all-keys low-rank sum, the band is computed in blocks of queries against a window of keys, and
the off-band low-rank sum is that total minus the band's feature products.

Shared shift.  The two parts are computed each under its own safe shift — the band under
c_i = max_{j∈B_i} ℓ_ij, the low-rank part under the features' exp(γ_i)/m (``features``) — and added
through their log-sum-exps (``merge_lse``), which is the same as shifting both by their common max.
Band subtraction and total use the same stabilised features, so the difference is consistent.

Non-positive mass.  With positive features the off-band sum is ≥ 0 in exact arithmetic; the
subtraction can leave a rounding residue of either sign.  When the off-band feature mass is no more
than 64·eps of the total (or the band holds every key), the off-band part is dropped and the query
gets its exact band attention; the output is always finite.  Exact when the band covers all keys.

Causal: the shared decomposition (``kdecli.methods.causal``), with the band by absolute position: a
full block's queries sit after its keys (p_i = offset + i), so the band is exact on the keys within
w/2 before each query wherever they fall, and a query whose band holds none of a block's keys gets
the Performer estimate alone.  L_i = log(Â1 + S1)_i, the estimated row sum.  Nothing depends on
other queries.

Key sets (``kdecli.methods.keysets``): B_i, the keys whose logits it computes exactly (causal: each
full block's band and the exact leaves); the low-rank part weighs every other key through the
features without reading its logit, so it estimates over more than its set (``exact_over_set``
False).  ``log_row_sums``: L_i, merged over the pieces under a causal mask.
"""

from __future__ import annotations

import torch

from kdecli.masks import FULL
from kdecli.methods.base import AttentionMethod, Param
from kdecli.methods.causal import CAUSAL_BUDGET_HELP, CAUSAL_LEAF, Partial
from kdecli.methods.common import gather_rows, merge_lse, pad_dim, with_ones_column, working_dtype
from kdecli.methods.features import favor_features, random_directions
from kdecli.methods.keyset_calls import decomposed_key_sets, decomposed_log_row_sums
from kdecli.methods.registry import register

GROUP_ELEMENTS = 2**24  # bound on the band temporaries of one group of query blocks


@register
class ScatterBrain(AttentionMethod):
    name = "scatterbrain"
    summary = "Sparse + low-rank: exact local band plus Performer random features elsewhere."
    paper = "Chen, Dao, Winsor, Song, Rudra, Ré, Scatterbrain, NeurIPS 2021"
    budget_help = (
        "m: local_context = m/2 band keys per query (|i − j| < w/2), features = m."
        + CAUSAL_BUDGET_HELP
    )
    params = (
        Param("local_context", int, 128, "band width w: keys |j − p_i| < w/2 are exact", 1, 2**24),
        Param("features", int, 256, "number of Performer random features (m)", 1, 2**16),
        Param("orthogonal", bool, True, "orthogonal random directions; false: i.i.d. Gaussian"),
        CAUSAL_LEAF,
    )
    randomized = True
    causal_mode = "decomposition"
    key_set_note = ""  # it returns its key sets
    estimates = "softmax"
    cost_help = (
        "2·(n_q+n_k)·d·m features + 2·(n_q+n_k)·m·(d_v+1) low-rank + about "
        "n_q·1.5·w·(2d + 2m + 4(d_v+1)) for the band and its feature products."
    )

    @classmethod
    def params_for_budget(cls, budget):
        return {"local_context": max(1, budget // 2), "features": budget, "causal_leaf": budget}

    @classmethod
    def params_for_keys(cls, budget):
        # half the budget in the band, the rest in features, so that band keys + features = m
        width = max(1, budget // 2)
        return {
            "local_context": width,
            "features": max(1, budget - band_keys(width)),
            "causal_leaf": budget,
        }

    def keys_per_query(self, n_q, n_k, mask=FULL):
        # the band's 2·radius + 1 exact keys (fewer at the edges; capped at n_k) + m features
        return float(min(band_keys(self.config["local_context"]), n_k) + self.config["features"])

    @classmethod
    def exact_limit(cls, n_q, n_k):
        # |j − p_i| ≤ n_k − 1 < w/2: the band is every key (causal: in a full block of a piece of
        # n' ≤ n_k positions, p_i − j ≤ n' − 1 too).
        return {"local_context": 2 * n_k}

    def forward_full(self, q, k, v, scale, generator):
        dtype, work = q.dtype, working_dtype(q.dtype)
        q, k, v = q.to(work), k.to(work), v.to(work)
        return self.partial(q, k, v, scale, generator, None).out.to(dtype)

    def partial(self, q, k, v, scale, generator, query_offset):
        b, h, n_q, d = q.shape
        n_k, work = k.shape[-2], q.dtype
        v_aug = with_ones_column(v)
        omega = random_directions(
            b,
            h,
            d,
            self.config["features"],
            orthogonal=self.config["orthogonal"],
            generator=generator,
            device=q.device,
            dtype=work,
        )
        qf, kf, log_shift = favor_features(q, k, scale, omega)
        lr_total = qf @ (kf.transpose(-1, -2) @ v_aug)  # (b, h, n_q, d_v+1), row sum >= 1

        radius = band_radius(self.config["local_context"])
        pos = query_positions(n_q, n_k, query_offset, q.device)
        band_lse, band_out, lr_band = local_band(q * scale, k, v_aug, qf, kf, pos, radius)

        # Off-band feature sums (in units of exp(log_shift)): ≥ 0 in exact arithmetic, since
        # every feature is positive; only the subtraction's rounding can make them ≤ 0.
        lr_off = lr_total - lr_band
        off_mass = lr_off[..., -1]
        covers_all = (pos - radius <= 0) & (pos + radius >= n_k - 1)
        keep = (off_mass > 64 * torch.finfo(work).eps * lr_total[..., -1]) & ~covers_all
        safe_mass = torch.where(keep, off_mass, torch.ones_like(off_mass))
        lr_lse = torch.where(keep, log_shift + torch.log(safe_mass), float("-inf"))
        lr_out = torch.where(keep.unsqueeze(-1), lr_off[..., :-1] / safe_mass.unsqueeze(-1), 0.0)
        # (e^{L_band} O_band + e^{L_lr} O_lr) / (e^{L_band} + e^{L_lr}) = (ÂV + SV) / (Â1 + S1)
        return Partial(*merge_lse(band_lse, band_out, lr_lse, lr_out))

    def block_sets(self, q, k, v, scale, generator, query_offset):
        """The keys whose exact logit a query reads: its band (``kdecli.methods.keyset_calls``).
        The low-rank part weighs every other key through the features; the band does not
        depend on the draws, so none is made here."""
        n_q, n_k = q.shape[-2], k.shape[-2]
        radius = band_radius(self.config["local_context"])
        pos = query_positions(n_q, n_k, query_offset, q.device)
        index = pos.unsqueeze(-1) + torch.arange(-radius, radius + 1, device=q.device)
        valid = (index >= 0) & (index < n_k)
        shape = (*q.shape[:2], *index.shape)
        return index.clamp(0, n_k - 1).expand(shape), valid.expand(shape)

    def key_sets(self, q, k, v, scale, generator, mask=FULL):
        # the set is the band, whose logits are exact; the low-rank part estimates the rest
        return decomposed_key_sets(self, q, k, v, scale, generator, mask, exact_over_set=False)

    def log_row_sums(self, q, k, v, scale, generator, mask=FULL):
        # log(Â1 + S1)_i, the band's exact sum and the features' off-band estimate
        return decomposed_log_row_sums(self, q, k, v, scale, generator, mask)

    def memory_bytes(self, b, h, n_q, n_k, d, d_v, itemsize):
        # Features of queries and keys (as performer), the band's outputs and feature sums per
        # query, and one group of band blocks at a time (GROUP_ELEMENTS, a few buffers).
        m = self.config["features"]
        per_row = 4 * m + 4 * (d_v + 1)
        return float(itemsize * (b * h * (n_q + n_k) * per_row + 4 * GROUP_ELEMENTS))

    def flops(self, b, h, n_q, n_k, d, d_v):
        m, w = self.config["features"], min(self.config["local_context"], 2 * n_k)
        return float(
            b
            * h
            * (
                2 * (n_q + n_k) * d * m
                + 2 * (n_q + n_k) * m * (d_v + 1)
                + n_q * 1.5 * w * (2 * d + 2 * m + 4 * (d_v + 1))
            )
        )


def query_positions(n_q: int, n_k: int, query_offset: int | None, device) -> torch.Tensor:
    """p_i, query i's position among the keys: ⌊i·n_k/n_q⌋ in a plain call (``query_offset``
    None: i in self-attention, spread over the keys in cross attention); offset + i in a full block
    of the causal decomposition, whose queries all sit past its keys."""
    i = torch.arange(n_q, device=device)
    return i * n_k // n_q if query_offset is None else query_offset + i


def band_radius(width: int) -> int:
    """|j − p_i| < w/2  <=>  |j − p_i| ≤ radius, for integer positions."""
    return (width + 1) // 2 - 1


def band_keys(width: int) -> int:
    """Keys in a query's band away from the edges: 2·radius + 1 (odd, w − 1 or w)."""
    return 2 * band_radius(width) + 1


def local_band(q_scaled, k, v_aug, qf, kf, pos, radius):
    """The band of every query, in blocks of queries against a window of keys.

    Returns (lse, out, feat): lse_i = log Σ_{j∈B_i} e^{ℓ_ij} (b, h, n_q), out_i the band's softmax
    output (b, h, n_q, d_v) and feat_i = Σ_{j∈B_i} qf_i·kf_j ṽ_j (b, h, n_q, d_v+1).  A query whose
    band holds no key (p_i past the keys, in a causal full block) gets lse = -inf and out = 0.  Query block t
    covers queries [t·Bq, (t+1)·Bq); its key window is W consecutive keys holding every band key of
    the block (W ≤ n_k), so a block never reaches outside its own batch×head slice.
    """
    b, h, n_q, d = q_scaled.shape
    n_k, width, m = k.shape[-2], v_aug.shape[-1], kf.shape[-1]
    block = min(n_q, max(16, radius + 1))
    nblocks = -(-n_q // block)
    starts = torch.arange(nblocks, device=k.device) * block
    span = int((pos[torch.clamp(starts + block - 1, max=n_q - 1)] - pos[starts]).max())
    window = min(n_k, span + 2 * radius + 1)
    key_start = torch.clamp(pos[starts] - radius, min=0, max=n_k - window)
    key_index = key_start.unsqueeze(-1) + torch.arange(window, device=k.device)  # (nblocks, W)
    q_pos = pad_dim(pos, nblocks * block, dim=0, value=0).view(nblocks, block)
    in_band = (key_index.unsqueeze(1) - q_pos.unsqueeze(-1)).abs() <= radius  # (nblocks, Bq, W)

    q_blocks = pad_dim(q_scaled, nblocks * block).view(b, h, nblocks, block, d)
    qf_blocks = pad_dim(qf, nblocks * block).view(b, h, nblocks, block, m)
    lse = q_scaled.new_empty(b, h, nblocks, block)
    out = q_scaled.new_empty(b, h, nblocks, block, width - 1)
    feat = q_scaled.new_empty(b, h, nblocks, block, width)
    per_block = b * h * window * (block + max(d, m, width))  # logits + one gathered window
    group = max(1, GROUP_ELEMENTS // per_block)
    for t0 in range(0, nblocks, group):
        t1 = min(nblocks, t0 + group)
        idx = key_index[t0:t1].reshape(1, 1, -1).expand(b, h, -1)
        k_win, v_win, kf_win = (
            gather_rows(x, idx).view(b, h, t1 - t0, window, x.shape[-1]) for x in (k, v_aug, kf)
        )
        mask = in_band[t0:t1]
        logits = (q_blocks[:, :, t0:t1] @ k_win.transpose(-1, -2)).masked_fill(~mask, float("-inf"))
        top = logits.amax(-1, keepdim=True)  # -inf only for a band that holds no key
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        num = torch.exp(logits - top) @ v_win
        lse[:, :, t0:t1] = top.squeeze(-1) + torch.log(num[..., -1])
        total = num[..., -1:]
        out[:, :, t0:t1] = num[..., :-1] / torch.where(total > 0, total, torch.ones_like(total))
        prods = (qf_blocks[:, :, t0:t1] @ kf_win.transpose(-1, -2)) * mask
        feat[:, :, t0:t1] = prods @ v_win

    def unblock(x: torch.Tensor) -> torch.Tensor:  # (b, h, blocks, block, ...) -> (b, h, n_q, ...)
        return x.reshape(b, h, nblocks * block, *x.shape[4:])[:, :, :n_q]

    return unblock(lse), unblock(out), unblock(feat)
