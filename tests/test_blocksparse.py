"""The block-sparse kernel and its family (kdecli/methods/tiles.py), blocktopk and topk_tiles.

The family battery runs over every registered ``TileSparse`` subclass, so a method that joins the
family is tested here without changing this file.
"""

import math

import pytest
import torch

from kdecli.masks import FULL, Causal
from kdecli.measure.metrics import slice_errors
from kdecli.measure.reference import exact_attention
from kdecli.methods import get_method_class, make_method, method_names
from kdecli.methods import tiles as tiles_module
from kdecli.methods.tiles import KeyBlocks, TileLayout, TileSparse, attend_blocks, diagonal_tiles
from tests.conftest import gen, make_qkv, rounding_bound

FAMILY = [name for name in method_names() if issubclass(get_method_class(name), TileSparse)]

# (n_q, n_k, block, mask): ragged n for B in {16, 64, 256}, full and causal, offsets that are
# and are not multiples of B, cross attention under FULL
CASES = [
    (97, 97, 16, Causal(0)),
    (200, 200, 64, Causal(0)),
    (300, 300, 256, Causal(0)),
    (130, 130, 64, FULL),
    (59, 97, 16, FULL),
    (97, 59, 16, FULL),
    (64, 150, 16, Causal(86)),
    (40, 200, 64, Causal(160)),
]


def case_id(case):
    n_q, n_k, block, mask = case
    return f"{n_q}x{n_k}-B{block}-{str(mask).replace('=', '')}"


def restricted_softmax(q, k, v, scale, sets):
    """Exact softmax attention of each query over the keys ``sets`` (b, h, n_q, n_k) marks."""
    logits = (q.double() * scale) @ k.double().transpose(-1, -2)
    logits = logits.masked_fill(~sets, float("-inf"))
    return torch.softmax(logits, dim=-1) @ v.double()


def dense_sets(method, q, k, v, scale, mask, generator_seed=0):
    sets = method.key_sets(q, k, v, scale, gen(generator_seed), mask)
    assert sets is not None and sets.exact_over_set
    return torch.cat([sets.rows(s, min(q.shape[-2], s + 7)) for s in range(0, q.shape[-2], 7)], -2)


def allowed_matrix(mask, n_q, n_k):
    allowed = mask.allowed(n_q, n_k)
    return torch.ones(n_q, n_k, dtype=torch.bool) if allowed is None else allowed


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("name", FAMILY)
def test_exact_when_every_tile_is_kept(name, case):
    n_q, n_k, block, mask = case
    cls = get_method_class(name)
    limit = cls.exact_limit(n_q, n_k)
    if limit is None:
        pytest.skip(f"{name} has no exact limit")
    q, k, v = make_qkv(2, 2, n_q, n_k, 21, 13)
    method = make_method(name, 16, **limit, block=block)
    reasons = method.not_supported_reasons(q, k, v, mask)
    assert not reasons, reasons
    out = method(q, k, v, scale=0.3, generator=gen(0), mask=mask)
    error = float((out - exact_attention(q, k, v, 0.3, mask=mask)).abs().max())
    assert error <= rounding_bound(q, k, v, 0.3)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("name", FAMILY)
def test_key_sets_are_the_keys_the_forward_used(name, case):
    """Exact softmax restricted to the reported sets reproduces the forward: the sets are the
    ones used; they lie inside the mask, and hold each query's own position when causal."""
    n_q, n_k, block, mask = case
    q, k, v = make_qkv(1, 2, n_q, n_k, 21, 13, seed=3)
    method = make_method(name, 2 * block, block=block)
    out = method(q, k, v, scale=0.3, generator=gen(0), mask=mask)
    sets = dense_sets(method, q, k, v, 0.3, mask)
    allowed = allowed_matrix(mask, n_q, n_k)
    assert not (sets & ~allowed).any()
    if mask.is_causal:
        own = torch.arange(n_q) + mask.offset
        assert sets[..., torch.arange(n_q), own].all()
    expected = restricted_softmax(q, k, v, 0.3, sets)
    assert float((out - expected).abs().max()) <= rounding_bound(q, k, v, 0.3)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("name", FAMILY)
def test_realised_density_is_the_count_of_computed_entries(name, case):
    n_q, n_k, block, mask = case
    q, k, v = make_qkv(1, 2, n_q, n_k, 21, 13, seed=5)
    method = make_method(name, 2 * block, block=block)
    sets = dense_sets(method, q, k, v, 0.3, mask)
    allowed = int(allowed_matrix(mask, n_q, n_k).sum())
    counted = float(sets.sum(dim=(-2, -1)).double().mean())  # per slice, then the mean
    assert method.realised_density(q, k, v, 0.3, gen(0), mask) == pytest.approx(counted / allowed)
    keys = method.realised_keys_per_query(q, k, v, 0.3, gen(0), mask)
    assert keys == pytest.approx(counted / n_q)


def perturbed_after(k, v, t):
    k2, v2 = k.clone(), v.clone()
    k2[..., t + 1 :, :] = k2[..., t + 1 :, :].flip(-2) * 3 + 1
    v2[..., t + 1 :, :] = -5 * v2[..., t + 1 :, :]
    return k2, v2


@pytest.mark.parametrize("name", FAMILY)
def test_no_future_key_or_value_enters_an_output(name):
    """Over the blocks a method chose, keys and values after position t never reach the outputs
    up to t: the kernel masks every listed key by position (the diagonal tile included)."""
    q, k, v = make_qkv(1, 2, 150, 150, 21, 13, seed=7)
    method = make_method(name, 48, block=16)
    blocks = method.blocks(q, k, 0.4, gen(1), Causal(0))
    out = attend_blocks(q, k, v, 0.4, Causal(0), blocks)
    for t in (0, 15, 16, 70, 130):
        k2, v2 = perturbed_after(k, v, t)
        out2 = attend_blocks(q, k2, v2, 0.4, Causal(0), blocks)
        assert torch.equal(out[..., : t + 1, :], out2[..., : t + 1, :]), t


@pytest.mark.parametrize(
    "name, ends", [("blocktopk", (0, 15, 16, 70, 130)), ("topk_tiles", (15, 63, 127))]
)
def test_no_future_leak_through_the_choice(name, ends):
    """blocktopk ranks only key tiles before a query tile's diagonal (the diagonal is kept
    whatever its score), so a later key moves no earlier output; topk_tiles ranks a tile by the
    mass of all its rows, so its choice for a query reads the keys up to the end of that query's
    tile, never past it."""
    q, k, v = make_qkv(1, 2, 150, 150, 21, 13, seed=7)
    method = make_method(name, 48, block=16)
    out = method(q, k, v, scale=0.4, mask=Causal(0))
    for t in ends:
        k2, v2 = perturbed_after(k, v, t)
        out2 = method(q, k2, v2, scale=0.4, mask=Causal(0))
        assert torch.equal(out[..., : t + 1, :], out2[..., : t + 1, :]), t


@pytest.mark.parametrize("name", FAMILY)
def test_prefill_only_and_refuses_decode(name):
    method = make_method(name, 64)
    assert method.phase_reasons("prefill") == []
    assert method.phase_reasons("decode")
    assert method.key_set_note == ""


def blocktopk_loop(q, k, scale, block, keys, mask):
    """An independent blocktopk: pooled means and a top-R per query tile by explicit loops, the
    key set of every query as a dense (n_q, n_k) bool for one slice (offset 0 or FULL)."""
    n_q, n_k = q.shape[-2], k.shape[-2]
    tiles_q, tiles_k = math.ceil(n_q / block), math.ceil(n_k / block)
    kept_tiles = math.ceil(keys / block)
    sets = torch.zeros(n_q, n_k, dtype=torch.bool)
    key_means = [k[r * block : (r + 1) * block].mean(0) for r in range(tiles_k)]
    for t in range(tiles_q):
        rows = range(t * block, min(n_q, (t + 1) * block))
        query_mean = q[t * block : (t + 1) * block].mean(0)
        diagonal = t  # n_q == n_k
        allowed = range(diagonal + 1) if mask.is_causal else range(tiles_k)
        others = sorted(
            (r for r in allowed if r != diagonal),
            key=lambda r: -float(scale * query_mean @ key_means[r]),
        )
        chosen = [diagonal] + others[: kept_tiles - 1]
        for i in rows:
            for r in chosen:
                for j in range(r * block, min(n_k, (r + 1) * block)):
                    if not mask.is_causal or j <= i:
                        sets[i, j] = True
    return sets


@pytest.mark.parametrize("mask", [Causal(0), FULL], ids=str)
def test_blocktopk_keeps_the_tiles_a_loop_chooses(mask):
    q, k, v = make_qkv(1, 1, 150, 150, 21, 13, seed=11)
    method = make_method("blocktopk", 48, block=16)
    expected = blocktopk_loop(q[0, 0], k[0, 0], 0.4, 16, 48, mask)
    sets = dense_sets(method, q, k, v, 0.4, mask)[0, 0]
    assert torch.equal(sets, expected)
    out = method(q, k, v, scale=0.4, mask=mask)
    reference = restricted_softmax(q, k, v, 0.4, expected)
    assert float((out - reference).abs().max()) <= rounding_bound(q, k, v, 0.4)


def planted_tiles(seed, n=256, d=16, block=16):
    """Random heads in which each query tile has a few heavy earlier key tiles: keys of those
    tiles aligned with the tile's queries, plus a cancelling component that hides them from the
    pooled mean (half the keys of a planted tile get +u, half −u)."""
    g = gen(seed)
    q = torch.randn(1, 2, n, d, generator=g, dtype=torch.float64)
    k = torch.randn(1, 2, n, d, generator=g, dtype=torch.float64)
    v = torch.randn(1, 2, n, d, generator=g, dtype=torch.float64)
    tiles = n // block
    for t in range(2, tiles):
        for _ in range(2):
            r = int(torch.randint(0, t, (1,), generator=g))
            direction = q[..., t * block : (t + 1) * block, :].mean(-2, keepdim=True)
            sign = torch.ones(block, 1, dtype=torch.float64)
            sign[: block // 2] = -1
            keys = k[..., r * block : (r + 1) * block, :]
            k[..., r * block : (r + 1) * block, :] = keys + 2.0 * sign * direction
    return q, k, v


@pytest.mark.parametrize("mask", [Causal(0), FULL], ids=str)
def test_the_tile_oracle_is_the_ceiling_of_blocktopk(mask):
    """At the same count, topk_tiles keeps at least blocktopk's attention mass in every query tile
    (by construction), and its error is lower on heads with planted heavy tiles."""
    block = 16
    oracle_errors, gate_errors = [], []
    for seed in range(3):
        q, k, v = planted_tiles(seed, block=block)
        reference = exact_attention(q, k, v, 0.5, mask=mask)
        probs = torch.softmax(
            ((q * 0.5) @ k.transpose(-1, -2)).masked_fill(
                ~allowed_matrix(mask, 256, 256), float("-inf")
            ),
            dim=-1,
        )
        masses = {}
        for name in ("topk_tiles", "blocktopk"):
            method = make_method(name, 4 * block, block=block)
            sets = dense_sets(method, q, k, v, 0.5, mask)
            masses[name] = (probs * sets).sum(-1).unflatten(-1, (-1, block)).sum(-1)
            error = slice_errors(method(q, k, v, scale=0.5, mask=mask), reference)["rel_spectral"]
            (oracle_errors if name == "topk_tiles" else gate_errors).append(float(error.mean()))
            density = method.realised_density(q, k, v, 0.5, None, mask)
            masses[name + "_density"] = density
        assert masses["topk_tiles_density"] == pytest.approx(masses["blocktopk_density"])
        assert (masses["topk_tiles"] >= masses["blocktopk"] - 1e-12).all()
        assert oracle_errors[-1] <= gate_errors[-1]
    assert sum(oracle_errors) < 0.9 * sum(gate_errors)


def test_the_tile_oracle_refuses_large_inputs():
    q, k, v = make_qkv(1, 1, 300, 300, 8)
    reasons = make_method("topk_tiles", 64, max_n=256).not_supported_reasons(q, k, v)
    assert reasons and "max_n=256" in reasons[0]


@pytest.mark.parametrize("mode", ["paper", "keys"])
def test_the_budget_is_kept_keys_per_query(mode):
    """Budget m: ⌈m/B⌉ tiles per query tile, the diagonal included; the modelled keys per query
    is what a call reads (causal: exactly), under both budget modes."""
    q, k, v = make_qkv(1, 1, 1024, 1024, 16)
    for name in ("blocktopk", "topk_tiles"):
        method = make_method(name, 256, budget_mode=mode, block=64)
        assert method.config["keys"] == 256
        realised = method.realised_keys_per_query(q, k, v, 0.25, None, Causal(0))
        assert method.keys_per_query(1024, 1024, Causal(0)) == pytest.approx(realised)
        # tiles 0..3 keep all they may, the rest 4 tiles (3 whole, the diagonal masked)
        rows = torch.arange(1024)
        expected = torch.where(rows < 256, rows + 1, 3 * 64 + rows % 64 + 1)
        assert realised == pytest.approx(float(expected.double().mean()))
        full = method.realised_keys_per_query(q, k, v, 0.25, None, FULL)
        assert full == pytest.approx(256.0)


def test_density_keeps_a_share_of_each_tiles_allowed_keys():
    q, k, v = make_qkv(1, 1, 2048, 2048, 16)
    method = make_method("blocktopk", 64, density=0.1, block=32)
    layout = TileLayout.of(2048, 2048, 32, Causal(0))
    kept = method.model_tiles(layout)
    assert torch.equal(kept, torch.ceil(0.1 * torch.arange(1, 65).double()).long())
    density = method.realised_density(q, k, v, 0.25, None, Causal(0))
    assert 0.1 <= density <= 0.15


def test_kernel_over_single_keys_merged_with_tiles():
    """KeyBlocks of single positions (with repeats, merged by ``cat``) and whole tiles: the kernel
    gives exact softmax over their union, causally masked, the diagonal tile always present."""
    n, block = 90, 16
    q, k, v = make_qkv(1, 2, n, n, 12, 5, seed=2)
    layout = TileLayout.of(n, n, block, Causal(0))
    g = gen(3)
    positions = torch.randint(0, n, (1, 2, layout.query_tiles, 9), generator=g)
    positions[..., 1] = positions[..., 0]  # a repeat, kept once
    singles = KeyBlocks.from_positions(
        positions, torch.ones_like(positions, dtype=torch.bool), block
    )
    tiles = torch.zeros(1, 2, layout.query_tiles, 1, dtype=torch.long)  # the first tile everywhere
    first = KeyBlocks.from_tiles(tiles, torch.ones_like(tiles, dtype=torch.bool), block, n)
    blocks = KeyBlocks.cat([singles, first], n)
    out = attend_blocks(q, k, v, 0.5, Causal(0), blocks)
    sets = torch.zeros(1, 2, n, n, dtype=torch.bool)
    rows = torch.arange(n)
    for t in range(layout.query_tiles):
        mine = slice(t * block, min(n, (t + 1) * block))
        listed = torch.cat([positions[..., t, :], torch.arange(block).expand(1, 2, block)], -1)
        sets[..., mine, :] |= torch.zeros(1, 2, n, dtype=torch.bool).scatter(-1, listed, True)[
            ..., None, :
        ]
        sets[..., mine, t * block : (t + 1) * block] = True  # the diagonal tile
    sets &= rows.view(-1, 1) >= rows.view(1, -1)
    expected = restricted_softmax(q, k, v, 0.5, sets)
    assert float((out - expected).abs().max()) <= rounding_bound(q, k, v, 0.5)
    assert int(blocks.pairs(layout).sum()) == int(sets.sum())


def test_the_chunking_does_not_change_the_result(monkeypatch):
    q, k, v = make_qkv(2, 2, 300, 300, 16, 8, dtype=torch.float32)
    method = make_method("blocktopk", 96, block=16)
    whole = method(q, k, v, scale=0.25, mask=Causal(0))
    monkeypatch.setattr(tiles_module, "CHUNK_ELEMENTS", 1)  # one query tile per chunk
    chunked = method(q, k, v, scale=0.25, mask=Causal(0))
    assert torch.allclose(whole, chunked, rtol=1e-5, atol=1e-6)
    assert whole.dtype == torch.float32


@pytest.mark.parametrize("block", [16, 64, 256])
def test_the_layout_counts_every_allowed_pair_once(block):
    """Tiles on the key grid under an offset: the queries of all tiles are the n_q queries, and
    the diagonal's pairs plus every whole earlier tile make the allowed pairs."""
    for n_q, n_k, mask in [(200, 200, Causal(0)), (77, 300, Causal(223)), (50, 120, FULL)]:
        layout = TileLayout.of(n_q, n_k, block, mask)
        assert int(layout.query_sizes().sum()) == n_q
        assert int(layout.key_sizes().sum()) == n_k
        if mask.is_causal:
            earlier = (layout.tile_starts() * layout.query_sizes()).sum()
            assert int(earlier + layout.near_pairs().sum()) == layout.allowed_pairs()
            assert torch.equal(*layout.diagonal())


def test_a_slice_output_does_not_depend_on_the_other_slices_counts():
    """Data-driven rules keep different counts per head: the kernel's chunks never span slices,
    so one head's output is bit-identical whatever another head keeps."""
    n, block = 600, 32  # a size at which chunks spanning the heads would change the rounding
    q, k, v = make_qkv(1, 2, n, n, 64, 64, seed=4)
    layout = TileLayout.of(n, n, block, Causal(0))
    tiles = torch.arange(layout.key_tiles).expand(1, 2, layout.query_tiles, -1)
    few = torch.arange(layout.key_tiles) < 2
    valid = few.expand(1, 2, layout.query_tiles, -1).clone()
    out = attend_blocks(q, k, v, 0.5, Causal(0), KeyBlocks.from_tiles(tiles, valid, block, n))
    valid[:, 1] = True  # the second head keeps every tile now
    out2 = attend_blocks(q, k, v, 0.5, Causal(0), KeyBlocks.from_tiles(tiles, valid, block, n))
    assert torch.equal(out[:, 0], out2[:, 0])
    assert not torch.equal(out[:, 1], out2[:, 1])
    exact = exact_attention(q, k, v, 0.5, mask=Causal(0))
    assert float((out2[:, 1] - exact[:, 1]).abs().max()) <= rounding_bound(q, k, v, 0.5)


def test_the_diagonal_tiles_hold_the_positions_of_a_tiles_queries():
    """Under FULL the queries sit bottom-right on the keys: with n_q ≠ n_k a query tile's
    positions can straddle two key tiles, and ``diagonal_tiles`` lists both."""
    n_q, n_k, block = 40, 70, 16  # positions 30..69: query tile 0 at 30..45, key tiles 1 and 2
    q, k, v = make_qkv(1, 1, n_q, n_k, 8, 4, seed=6)
    layout = TileLayout.of(n_q, n_k, block, FULL)
    blocks = diagonal_tiles(layout, (1, 1))
    out = attend_blocks(q, k, v, 0.5, FULL, blocks)
    sets = torch.zeros(1, 1, n_q, n_k, dtype=torch.bool)
    for i in range(n_q):
        t = i // block
        first, last = 30 + t * block, min(n_k - 1, 30 + t * block + block - 1)
        sets[..., i, (first // block) * block : (last // block + 1) * block] = True
    assert sets[0, 0, 0].sum() == 2 * block
    expected = restricted_softmax(q, k, v, 0.5, sets)
    assert float((out - expected).abs().max()) <= rounding_bound(q, k, v, 0.5)
