"""The mask type (kdecli/masks.py, docs/methods.md) and the causal decomposition under an offset
(kdecli/methods/causal.py): validation messages, the allowed pairs, query chunks, the command
line's flag and offset, and the decomposition's pieces against the exact float64 reference.  Every
method under an offset is in the contract battery."""

import ast
import importlib.util
from pathlib import Path

import pytest
import torch

from kdecli.errors import UsageError
from kdecli.masks import FULL, Causal, mask_of
from kdecli.measure.reference import exact_attention
from kdecli.methods import make_method
from kdecli.methods.causal import (
    Partial,
    causal_with_offset,
    decomposed_flops,
    decomposed_keys_per_query,
    exact_partial,
)
from tests.conftest import make_qkv


@pytest.mark.parametrize("offset", [-1, 1.5, True, "3"])
def test_an_offset_must_be_a_non_negative_integer(offset):
    with pytest.raises(UsageError, match=r"query offset must be an integer >= 0; got"):
        Causal(offset)


def test_a_query_past_the_last_key_is_refused_with_the_largest_valid_offset():
    assert Causal(90).problem(7, 97) is None
    with pytest.raises(UsageError) as info:
        Causal(91).check(7, 97)
    message = info.value.message
    assert "offset 91" in message and "position 97" in message and "n_k - n_q = 90" in message
    assert "at most as many queries as keys" in Causal(0).problem(98, 97)
    assert FULL.problem(98, 97) is None  # any shape takes a full mask
    with pytest.raises(UsageError, match="at most as many queries as keys"):
        Causal.bottom_right(98, 97)


@pytest.mark.parametrize("mask", [Causal(0), Causal(5), Causal(40)])
def test_allowed_pairs_visible_keys_and_rows_agree(mask):
    n_q, n_k = 12, 52
    allowed = mask.allowed(n_q, n_k)
    expected = torch.tensor([[j <= mask.offset + i for j in range(n_k)] for i in range(n_q)])
    assert torch.equal(allowed, expected)
    assert torch.equal(allowed.sum(-1), mask.visible_keys(n_q, n_k))
    assert mask.key_span(n_q, n_k) == min(n_k, mask.offset + n_q)
    # a chunk of queries [4, 12) sits 4 positions later: its rows of the matrix
    assert mask.rows(4) == Causal(mask.offset + 4)
    assert torch.equal(mask.rows(4).allowed(n_q - 4, n_k), allowed[4:])


def test_a_full_mask_allows_everything_without_building_a_matrix():
    assert FULL.allowed(5, 9) is None
    assert torch.equal(FULL.visible_keys(5, 9), torch.full((5,), 9))
    assert FULL.rows(3) is FULL and FULL.key_span(5, 9) == 9 and FULL.effective(5, 9) is FULL
    assert not FULL.is_causal and Causal(3).is_causal
    assert str(FULL) == "full" and str(Causal(0)) == "causal" and "offset=3" in str(Causal(3))


def test_only_one_query_at_the_last_position_runs_as_full():
    assert Causal(96).effective(1, 97) is FULL
    assert Causal(95).effective(1, 97) == Causal(95)  # key 96 lies after it
    assert Causal(90).effective(7, 97) == Causal(90)
    assert Causal(0).effective(1, 1) is FULL
    assert Causal(0).effective(97, 97) == Causal(0)


def test_mask_of_reads_the_flag_and_the_offset():
    assert mask_of(False, None, 7, 97) is FULL
    assert mask_of(True, None, 7, 97) == Causal(90)  # bottom-right: the decode alignment
    assert mask_of(True, None, 97, 97) == Causal(0)  # prefill
    assert mask_of(True, 33, 7, 97) == Causal(33)
    with pytest.raises(UsageError, match="add --causal"):
        mask_of(False, 3, 7, 97)
    with pytest.raises(UsageError, match="n_k - n_q = 90"):
        mask_of(True, 91, 7, 97)


@pytest.mark.parametrize("wrong", [True, False, "causal", None, 0])
def test_a_mask_that_is_not_one_is_refused_by_name(wrong):
    """A bool (the old causal flag) or anything else where a mask goes: a TypeError naming
    `mask`, from the call and from ``not_supported_reasons``, never read as some mask."""
    method = make_method("exact")
    q, k, v = make_qkv(1, 1, 7, 7, 4)
    for call in (
        lambda: method(q, k, v, mask=wrong),
        lambda: method.not_supported_reasons(q, k, v, wrong),
    ):
        with pytest.raises(TypeError, match="exact: `mask` must be a kdecli.masks mask") as info:
            call()
        assert ("Causal(0) for True" in str(info.value)) == isinstance(wrong, bool)


def test_the_old_causal_keyword_is_gone():
    q, k, v = make_qkv(1, 1, 7, 7, 4)
    with pytest.raises(TypeError, match="causal"):
        make_method("exact")(q, k, v, causal=True)
    with pytest.raises(TypeError, match="causal"):
        exact_attention(q, k, v, 0.5, causal=True)


def exact_block(scale, calls):
    def full_block(q, k, v, query_offset):
        calls.append((q.shape[-2], k.shape[-2], query_offset))
        return exact_partial(q * scale, k, v)

    return full_block


@pytest.mark.parametrize("n_q, offset", [(1, 96), (7, 90), (7, 3), (64, 86), (33, 1), (97, 0)])
@pytest.mark.parametrize("leaf", [1, 4, 16, 200])
def test_the_decomposition_under_an_offset_is_exact_with_exact_blocks(n_q, offset, leaf):
    """Keys [0, offset) as one full block seen by every query, the causal square recursing: with
    exact full blocks the merge is exact attention under Causal(offset), row sums included."""
    n_k = offset + n_q
    q, k, v = make_qkv(2, 3, n_q, n_k, 10, 6, dtype=torch.float64)
    calls = []
    lse, out = causal_with_offset(exact_block(0.4, calls), q, k, v, 0.4, leaf, offset)
    mask = Causal(offset)
    assert (out - exact_attention(q, k, v, 0.4, mask=mask)).abs().max() <= 1e-12
    logits = (0.4 * q @ k.mT).masked_fill(~mask.allowed(n_q, n_k), -torch.inf)
    assert (lse - torch.logsumexp(logits, -1)).abs().max() <= 1e-12
    if offset and n_k > leaf:  # the prefix block: every query, the keys before the first query
        assert calls[0] == (n_q, offset, offset)
    if n_k <= leaf:  # one exact piece
        assert calls == []


def test_the_prefix_block_is_merged_by_its_row_sums():
    """A prefix block that reports a wrong row sum moves every query's output (so the exactness
    above is not an accident of equal weights)."""
    q, k, v = make_qkv(1, 1, 7, 40, 8, dtype=torch.float64)

    def skewed(qb, kb, vb, query_offset):
        lse, out = exact_partial(qb * 0.5, kb, vb)
        return Partial(lse + (2.0 if query_offset == 33 else 0.0), out)

    _, out = causal_with_offset(skewed, q, k, v, 0.5, 1, 33)
    ref = exact_attention(q, k, v, 0.5, mask=Causal(33))
    assert ((out - ref).abs().amax(-1) > 1e-4).all()


class Counting:
    """A stand-in method whose cost is one per query–key pair, to read the cost model."""

    def __init__(self, leaf):
        self.leaf = leaf

    def causal_leaf(self):
        return self.leaf

    def flops(self, b, h, n_q, n_k, d, d_v):
        return float(b * h * n_q * n_k)

    def keys_per_query(self, n_q, n_k, mask=FULL):
        return float(n_k)


def test_the_cost_model_adds_the_prefix_block_to_the_square():
    method = Counting(leaf=8)
    square = decomposed_flops(method, 1, 2, 64, 4, 4)
    assert decomposed_flops(method, 1, 2, 64, 4, 4, offset=100) == square + 2 * 64 * 100
    keys = decomposed_keys_per_query(method, 64)
    assert decomposed_keys_per_query(method, 64, offset=100) == keys + 100
    # one exact piece: every allowed pair once, offset + (n + 1)/2 keys per query
    assert decomposed_keys_per_query(Counting(leaf=200), 7, offset=90) == 90 + 4
    assert decomposed_flops(Counting(leaf=200), 1, 1, 7, 1, 1, offset=90) == 7 * 94 * 5


def kdecli_imports(module: str) -> set[str]:
    """The kdecli modules ``module``'s source imports (its own import statements, not its
    package's ``__init__``)."""
    path = Path(importlib.util.find_spec(module).origin)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kdecli"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("kdecli")}
    return found


def test_the_decomposition_does_not_import_the_method_base():
    """methods/base.py imports methods/causal.py; nothing causal.py reaches may import base (an
    import circle)."""
    assert "kdecli.methods.causal" in kdecli_imports("kdecli.methods.base")
    seen, todo = set(), ["kdecli.methods.causal"]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += sorted(kdecli_imports(module))
    assert "kdecli.methods.base" not in seen, sorted(seen)


def test_the_library_call_takes_is_causal_as_bottom_right_or_a_mask():
    import kdecli

    q, k, v = make_qkv(2, 1, 7, 40, 8)
    out = kdecli.attention(q, k, v, method="exact", is_causal=True)
    assert torch.allclose(out, exact_attention(q, k, v, 8**-0.5, mask=Causal(33)), atol=1e-12)
    again = kdecli.attention(q, k, v, method="exact", mask=Causal(10))
    assert torch.allclose(again, exact_attention(q, k, v, 8**-0.5, mask=Causal(10)), atol=1e-12)
    with pytest.raises(UsageError, match="not both"):
        kdecli.attention(q, k, v, method="exact", is_causal=True, mask=Causal(10))
    with pytest.raises(UsageError, match="offset 34"):
        kdecli.attention(q, k, v, method="exact", mask=Causal(34))
