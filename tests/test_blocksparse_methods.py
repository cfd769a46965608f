"""vertical_slash, xattention and flexprefill: the rules that choose the tiles.

The family battery of tests/test_blocksparse.py (exactness, key sets, density, the kernel) runs
over these methods too; here, what is particular to each rule: the planted lines vertical_slash
must find, xattention's antidiagonal scores against a loop, flexprefill's Jensen–Shannon switch,
the budget and threshold mappings, and where each choice may and may not read later keys.
"""

import math

import pytest
import torch

from kdecli.masks import FULL, Causal
from kdecli.measure.reference import exact_attention
from kdecli.methods import get_method_class, make_method
from kdecli.methods.flexprefill import gamma_lines, js_distance, query_aware_tiles
from kdecli.methods.tiles import KeyBlocks, TileLayout
from kdecli.methods.vertical_slash import VerticalSlash, lines_as_blocks
from kdecli.methods.xattention import antidiagonal_shares, tiles_from_mask
from tests.conftest import gen, make_qkv, rounding_bound

METHODS = ["vertical_slash", "xattention", "flexprefill"]

# (n_q, n_k, mask): ragged n for B = 16, causal with and without an offset (one not a multiple
# of B), cross attention both ways under FULL, and less than one tile
CASES = [
    (97, 97, Causal(0)),
    (97, 97, FULL),
    (50, 97, Causal(47)),
    (40, 97, FULL),
    (130, 50, FULL),
    (11, 11, Causal(0)),
]


def case_id(case):
    n_q, n_k, mask = case
    return f"{n_q}x{n_k}-{str(mask).replace('=', '')}"


def allowed(n_q, n_k, mask):
    """(n_q, n_k) bool: the keys each query may read."""
    if not mask.is_causal:
        return torch.ones(n_q, n_k, dtype=torch.bool)
    return torch.arange(n_k) <= (torch.arange(n_q) + mask.offset).unsqueeze(-1)


def read_sets(method, q, k, v, scale, mask):
    sets = method.key_sets(q, k, v, scale, gen(0), mask)
    return sets.rows(0, q.shape[-2])


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("name", METHODS)
def test_exact_at_the_limit(name, case):
    """Every column (vertical_slash), τ = 1 (xattention) or γ = 1 (flexprefill) with an uncapped
    budget keeps every allowed key: exact softmax attention, to rounding."""
    n_q, n_k, mask = case
    q, k, v = make_qkv(2, 2, n_q, n_k, 21, 13, seed=3)
    cls = get_method_class(name)
    method = cls(8, block=16, **cls.exact_limit(n_q, n_k))
    out = method(q, k, v, scale=0.3, mask=mask)
    ref = exact_attention(q, k, v, 0.3, mask=mask)
    assert (out - ref).abs().max() <= rounding_bound(q, k, v, 0.3)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("name", METHODS)
def test_the_forward_is_exact_softmax_over_its_key_sets(name, case):
    """Below the limit: the sets are inside the mask, and softmax restricted to each query's
    set, computed apart in float64, is the forward (so they are the keys it used)."""
    n_q, n_k, mask = case
    q, k, v = make_qkv(1, 3, n_q, n_k, 21, 13, seed=5)
    method = make_method(name, 24, block=16, **({"tau": 0.6} if name == "xattention" else {}))
    read = read_sets(method, q, k, v, 0.4, mask)
    assert not (read & ~allowed(n_q, n_k, mask)).any()
    assert (read.sum(-1) >= 1).all()
    logits = (0.4 * q @ k.transpose(-1, -2)).masked_fill(~read, float("-inf"))
    expected = torch.softmax(logits, dim=-1) @ v
    out = method(q, k, v, scale=0.4, mask=mask)
    assert (out - expected).abs().max() <= rounding_bound(q, k, v, 0.4)
    ref = exact_attention(q, k, v, 0.4, mask=mask)
    if bool((read != allowed(n_q, n_k, mask)).any()):  # a real approximation, not the limit
        assert (out - ref).abs().max() > 1e-6


@pytest.mark.parametrize("case", CASES[:3], ids=case_id)
@pytest.mark.parametrize("name", METHODS)
def test_realised_density_is_the_count_of_the_sets(name, case):
    """The keys column and the density are counted from the call's own choice: the entries of
    its key sets, over the allowed ones counted apart."""
    n_q, n_k, mask = case
    q, k, v = make_qkv(2, 2, n_q, n_k, 21, 13, seed=9)
    method = make_method(name, 24, block=16)
    read = read_sets(method, q, k, v, 0.4, mask)
    entries = read.sum((-2, -1)).double()
    density = method.realised_density(q, k, v, 0.4, gen(0), mask)
    assert density == pytest.approx(float(entries.mean()) / int(allowed(n_q, n_k, mask).sum()))
    keys = method.realised_keys_per_query(q, k, v, 0.4, gen(0), mask)
    assert keys == pytest.approx(float(entries.mean()) / n_q)
    assert 0 < density < 1


def planted_lines(n=256, columns=(0, 37, 150), offsets=(5, 20, 77), strength=6.0):
    """q, k (1, 2, n, n + 1) whose logits are `strength` on the planted columns and on the
    planted diagonals i − j = o, and small noise elsewhere: q_i = (1, e_i), k_j = (strength·[j
    planted], strength·Σ_o e_{j+o})."""
    g = gen(4)
    q = torch.zeros(1, 2, n, n + 1, dtype=torch.float64)
    k = torch.zeros(1, 2, n, n + 1, dtype=torch.float64)
    q[..., 0] = 1.0
    q[..., 1:] = torch.eye(n, dtype=torch.float64)
    k[..., list(columns), 0] = strength
    for o in offsets:
        j = torch.arange(n - o)
        k[..., j, 1 + j + o] = strength
    k = k + 0.05 * torch.randn(k.shape, generator=g, dtype=torch.float64)
    return q, k


@pytest.mark.parametrize("mask", [Causal(0), FULL], ids=str)
def test_vertical_slash_finds_the_planted_columns_and_diagonals_exactly(mask):
    columns, offsets = (0, 37, 150), (5, 20, 77)
    q, k = planted_lines(columns=columns, offsets=offsets)
    method = VerticalSlash(vertical=3, slash=3, block=32)
    layout = method.layout(q.shape[-2], k.shape[-2], mask)
    lines = method.lines(q, k, 1.0, layout)
    for head in range(2):
        assert set(lines.columns[0, head].tolist()) == set(columns)
        assert set(lines.offsets[0, head][lines.offset_valid[0, head]].tolist()) == set(offsets)
    # and every query tile reads them: the columns before it and its slash blocks
    blocks = lines_as_blocks(lines, layout).positions(layout.n_k)
    for t in range(layout.query_tiles):
        start = t * 32
        read = set(blocks.index[0, 0, t][blocks.valid[0, 0, t]].tolist())
        before = start if mask.is_causal else layout.n_k
        wanted = {c for c in columns if c < before}
        for o in (0, *offsets):
            wanted |= {j for j in range(start - o, start - o + 32) if 0 <= j < before}
        assert wanted <= read, t
        assert read <= wanted | set(range(start, layout.n_k)), t  # nothing else before s_t


@pytest.mark.parametrize("mode", ["paper", "keys"])
def test_vertical_slash_budget_mapping(mode):
    """Paper: ⌈m/2⌉ columns and ⌈m/2⌉ lines (MInference's line counts); keys: the diagonal's B
    keys, then ⌊r/(2B)⌋ lines of B keys and the rest of r = m − B in columns, so that a query
    reads at most m keys."""
    m = 1000
    method = make_method("vertical_slash", m, budget_mode=mode)
    expected = (500, 500) if mode == "paper" else (936 - 7 * 64, 7)
    assert (method.config["vertical"], method.config["slash"]) == expected
    if mode == "keys":
        q, k, v = make_qkv(1, 2, 1500, 1500, 16, 8, seed=2)
        full = method.realised_keys_per_query(q, k, v, 0.25, None, FULL)
        causal = method.realised_keys_per_query(q, k, v, 0.25, None, Causal(0))
        assert 0.5 * m < full <= m and causal <= m  # lines overlap; a causal query has fewer


def loop_shares(q, k, scale, stride, layout):
    """xattention's tile shares from their definition, one antidiagonal at a time: the rows of
    the tile grid (query i at row lead + i), groups of S rows and S keys, the mean of
    ℓ_{aS+S−1−u, cS+u} over u (a missing row or key adds 0), a softmax per query group over the
    key groups it scores, summed into tiles and normalised per query tile."""
    b, h, n_q, _ = q.shape
    n_k, block = k.shape[-2], layout.block
    per_tile = block // stride
    shares = torch.zeros(b, h, layout.query_tiles, layout.key_tiles, dtype=torch.float64)
    for a in range(layout.query_tiles * per_tile):
        tile = a // per_tile
        rows = [a * stride + s - layout.lead for s in range(stride)]
        if not any(0 <= i < n_q for i in rows):
            continue
        last_group = math.ceil(n_k / stride)
        if layout.causal:
            last_group = min(last_group, int(layout.tile_starts()[tile]) // stride)
        if last_group == 0:
            continue
        reduced = torch.zeros(b, h, last_group, dtype=torch.float64)
        for c in range(last_group):
            for u in range(stride):
                i, j = a * stride + stride - 1 - u - layout.lead, c * stride + u
                if 0 <= i < n_q and j < n_k:
                    reduced[..., c] += scale * (q[..., i, :] * k[..., j, :]).sum(-1) / stride
        probs = torch.softmax(reduced, dim=-1)
        for c in range(last_group):
            shares[..., tile, c // per_tile] += probs[..., c]
    total = shares.sum(-1, keepdim=True)
    return shares / torch.where(total > 0, total, torch.ones_like(total))


@pytest.mark.parametrize(
    "n_q, n_k, mask", [(50, 50, Causal(0)), (37, 70, Causal(33)), (45, 45, FULL), (30, 61, FULL)]
)
def test_xattention_antidiagonal_shares_equal_a_loop(n_q, n_k, mask):
    q, k, _ = make_qkv(1, 2, n_q, n_k, 6, 6, seed=12)
    layout = TileLayout.of(n_q, n_k, 16, mask)
    shares = antidiagonal_shares(q, k, 0.5, 4, layout)
    assert torch.allclose(shares, loop_shares(q, k, 0.5, 4, layout), atol=1e-12)


def test_xattention_threshold_and_cap():
    """τ keeps the fewest tiles (after the diagonal) whose shares reach it, so the density grows
    with τ; the budget caps the tiles of every query tile."""
    q, k, v = make_qkv(1, 2, 400, 400, 16, 8, seed=6, spread=1.5)
    densities = [
        make_method("xattention", 10**6, tau=tau, block=16).realised_density(
            q, k, v, 0.5, None, Causal(0)
        )
        for tau in (0.3, 0.6, 0.9, 1.0)
    ]
    assert densities == sorted(densities) and densities[0] < densities[-1] == pytest.approx(1.0)
    capped = make_method("xattention", 48, tau=1.0, block=16)
    layout = capped.layout(400, 400, Causal(0))
    blocks = capped.blocks(q, k, 0.5, None, Causal(0))
    assert int(blocks.valid.sum(-1).max()) <= 3  # ⌈48/16⌉ tiles, the diagonal included
    shares = antidiagonal_shares(q, k, 0.5, 8, layout)
    kept = torch.zeros_like(shares, dtype=torch.bool)
    kept.scatter_(-1, blocks.index // 16, blocks.valid)
    # the two tiles before the diagonal are the two of highest share
    before = shares.masked_fill(~layout.allowed_mask() | layout.diagonal_mask(), -1.0)
    top = torch.topk(before[..., 3:, :], 2, dim=-1).indices
    assert kept[..., 3:, :].gather(-1, top).all()


@pytest.mark.parametrize("t", [0, 21, 63, 64, 150, 230])
def test_xattention_reads_no_later_key(t):
    """Its choice for a query tile reads the keys before the tile's diagonal only, so keys and
    values after any position t leave every output up to t bit-identical."""
    q, k, v = make_qkv(1, 2, 250, 250, 16, 8, seed=8)
    method = make_method("xattention", 64, tau=0.7, block=16)
    out = method(q, k, v, scale=0.5, mask=Causal(0))
    k2, v2 = k.clone(), v.clone()
    k2[..., t + 1 :, :] = k2[..., t + 1 :, :].flip(-2) * 3 + 1
    v2[..., t + 1 :, :] = -v2[..., t + 1 :, :]
    out2 = method(q, k2, v2, scale=0.5, mask=Causal(0))
    assert torch.equal(out[..., : t + 1, :], out2[..., : t + 1, :])


@pytest.mark.parametrize("name", ["vertical_slash", "flexprefill"])
def test_lines_from_the_last_queries_never_carry_a_later_value(name):
    """vertical_slash and flexprefill rank their lines from the last queries over every key (a
    later key can move which keys an earlier query reads); no later value ever reaches an
    earlier output, and the sets stay inside the mask (test_the_forward_is_exact_...)."""
    q, k, v = make_qkv(1, 2, 250, 250, 16, 8, seed=8)
    method = make_method(name, 64, block=16)
    out = method(q, k, v, scale=0.5, mask=Causal(0))
    for t in (0, 70, 200):
        v2 = v.clone()
        v2[..., t + 1 :, :] = -3 * v2[..., t + 1 :, :] + 1
        out2 = method(q, k, v2, scale=0.5, mask=Causal(0))
        assert torch.equal(out[..., : t + 1, :], out2[..., : t + 1, :])
        assert not torch.equal(out[..., t + 1 :, :], out2[..., t + 1 :, :])


def two_pattern_heads(n=128, block=32, d=8):
    """Head 0: keys constant within each tile and the last tile's queries all equal, so the
    pooled estimate is the true tile attention (distance 0); head 1: one strong key among keys
    that cancel it in the tile's mean, which pooling misses (a large distance)."""
    g = gen(21)
    q = torch.randn(1, 2, n, d, generator=g, dtype=torch.float64)
    k = torch.randn(1, 2, n, d, generator=g, dtype=torch.float64)
    centres = torch.randn(n // block, d, generator=g, dtype=torch.float64)
    k[0, 0] = centres.repeat_interleave(block, dim=0)
    q[0, 0, -block:] = torch.randn(d, generator=g, dtype=torch.float64)
    u = q[0, 1, -block:].mean(0)
    u = u / u.norm()
    k[0, 1, :block] = -6.0 * u / (block - 1)
    k[0, 1, 0] = 6.0 * u
    q[0, 1, -block:] = 2.0 * u + 0.1 * torch.randn(block, d, generator=g, dtype=torch.float64)
    return q, k


def independent_distance(q, k, scale, block):
    """√JS between the pooled estimate and the true tile attention of the last tile, from the
    formulas: ā_s ∝ exp(scale·mean(Q̂)·mean(K_s)), â_s = mean_i Σ_{j∈s} softmax_j(scale·q_i·k_j)."""
    q_last = q[..., -block:, :]
    tiles = k.shape[-2] // block
    pooled_keys = k.unflatten(-2, (tiles, block)).mean(-2)
    estimate = torch.softmax(scale * q_last.mean(-2, keepdim=True) @ pooled_keys.mT, -1)[..., 0, :]
    probs = torch.softmax(scale * q_last @ k.mT, dim=-1).mean(-2)
    true = probs.unflatten(-1, (tiles, block)).sum(-1)
    m = (estimate + true) / 2
    kl = (estimate * (estimate / m).log()).sum(-1), (true * (true / m).log()).sum(-1)
    return ((kl[0] + kl[1]) / 2).sqrt()


def tile_sets(blocks: KeyBlocks, n_k: int, head: int) -> list[set[int]]:
    flat = blocks.positions(n_k)
    return [
        set(flat.index[0, head, t][flat.valid[0, head, t]].tolist())
        for t in range(flat.index.shape[-2])
    ]


def test_flexprefill_pattern_follows_its_js_test():
    q, k = two_pattern_heads()
    method = make_method("flexprefill", 64, block=32, min_budget=32)
    layout = method.layout(128, 128, FULL)
    distance = independent_distance(q, k, 0.5, 32)[0]
    assert distance[0] < 1e-6 < 0.3 < distance[1]
    for tau in (0.1, 0.3, float(distance[1]) + 0.01):
        aware, probs = make_method("flexprefill", 64, block=32, tau=tau).query_aware(
            q, k, 0.5, layout
        )
        assert aware[0].tolist() == [bool(distance[0] < tau), bool(distance[1] < tau)]
    assert torch.allclose(js_distance(torch.eye(3)[0], torch.eye(3)[0]), torch.tensor(0.0))
    # the choice: head 0 the pooled tiles, head 1 the lines of the last tile's attention
    blocks = method.blocks(q, k, 0.5, None, FULL)
    aware, probs = method.query_aware(q, k, 0.5, layout)
    assert aware[0].tolist() == [True, False]
    tiles = tiles_from_mask(query_aware_tiles(q, k, 0.5, layout, 0.9, 1, 2), layout)
    lines = lines_as_blocks(gamma_lines(probs, 0.9, (32, 1), (64, 2), 127, False), layout)
    assert tile_sets(blocks, 128, 0) == tile_sets(tiles, 128, 0)
    assert tile_sets(blocks, 128, 1) == tile_sets(lines, 128, 1)
    assert all(0 in read for read in tile_sets(blocks, 128, 1))  # the strong key, a column


def test_flexprefill_gamma_and_floor():
    """γ keeps more as it grows; every query reads at least min_budget keys where it may."""
    q, k, v = make_qkv(1, 2, 512, 512, 16, 8, seed=14, spread=1.5)
    keys = [
        make_method(
            "flexprefill", 10**6, gamma=gamma, min_budget=64, block=16
        ).realised_keys_per_query(q, k, v, 0.5, None, Causal(0))
        for gamma in (0.5, 0.8, 0.95)
    ]
    assert keys == sorted(keys) and keys[0] < keys[-1]
    # the floor: ⌈128/16⌉ tiles per query tile (query-aware: τ = 1 passes every head), and 128
    # columns and 8 lines (vertical-slash: τ = 0 passes none)
    aware = make_method("flexprefill", 10**6, gamma=0.1, tau=1.0, min_budget=128, block=16)
    layout = aware.layout(512, 512, Causal(0))
    tiles = aware.blocks(q, k, 0.5, None, Causal(0)).valid.sum(-1)
    assert (tiles >= torch.clamp(layout.allowed_tiles(), max=8)).all()
    assert (tiles < layout.allowed_tiles()).any()
    lines = make_method("flexprefill", 10**6, gamma=0.1, tau=0.0, min_budget=128, block=16)
    _, probs = lines.query_aware(q, k, 0.5, layout)
    chosen = gamma_lines(probs, 0.1, (128, 8), (512, 32), 511, True)
    assert (chosen.column_valid.sum(-1) == 128).all() and (chosen.offset_valid.sum(-1) == 8).all()
    read = read_sets(lines, q, k, v, 0.5, Causal(0))
    tile_start = torch.arange(512) // 16 * 16
    for head in range(2):
        columns = chosen.columns[0, head]
        # each query reads every chosen column before its tile (the rest are after it or in it)
        assert read[0, head][:, columns][columns < tile_start.unsqueeze(-1)].all()
