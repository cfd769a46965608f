"""Small tensor helpers shared by several methods (padding, log-sum-exp merging)."""

from __future__ import annotations

import torch


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """float16/bfloat16 inputs are computed in float32: exp-sums over thousands of keys in an 8-bit
    mantissa lose every digit.  float32 and float64 are kept."""
    return torch.promote_types(dtype, torch.float32)


def needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd will record this call: then no in-place update may touch a tensor that
    backward needs.  Without it (inference, no_grad, the benchmarks) the methods keep their
    in-place fast paths, which save a copy of the largest temporaries."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class Workspace:
    """Buffers reused across the iterations of one call (never across calls: methods keep no state).

    On the CPU a fresh large tensor costs as much in page faults as the arithmetic done on it, so a
    loop over rounds that allocates its n × window logits anew each time runs at half speed.
    """

    def __init__(self, enabled: bool = True) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        self.enabled = enabled  # off under autograd: a reused buffer cannot hold a graph's value

    def get(
        self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor | None:
        """The buffer ``name`` of that shape (for ``out=``), or None when the workspace is off."""
        return self.tensor(name, shape, dtype, device) if self.enabled else None

    def tensor(
        self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """The buffer ``name`` of that shape, reused while the workspace is on (integer scratch,
        which never enters a graph, may always use it)."""
        buffer = self._buffers.get(name)
        if (
            buffer is None
            or buffer.shape != shape
            or buffer.dtype != dtype
            or buffer.device != device
        ):
            buffer = self._buffers[name] = torch.empty(shape, dtype=dtype, device=device)
        return buffer


def pad_dim(x: torch.Tensor, size: int, dim: int = -2, value: float = 0.0) -> torch.Tensor:
    """Pad ``x`` along ``dim`` with ``value`` up to ``size`` (no copy when already that long)."""
    missing = size - x.shape[dim]
    if missing <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x, x.new_full(shape, value)], dim=dim)


def with_ones_column(v: torch.Tensor) -> torch.Tensor:
    """(…, n, d_v) -> (…, n, d_v + 1): one matmul then gives numerator and row sum together."""
    return torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)


def gather_rows(
    x: torch.Tensor, index: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Rows of ``x`` (…, n, d) at ``index`` (…, m) -> (…, m, d), each slice indexing its own rows.

    One ``index_select`` of whole rows over the flattened slices: several times faster on the CPU
    than ``torch.gather`` with an index expanded to every element.  ``out`` (contiguous, m·d per
    slice) receives the rows when given, so loops can reuse one buffer.
    """
    lead, (n, d) = index.shape[:-1], x.shape[-2:]
    if x.shape[:-2] != lead:
        return torch.gather(x, -2, index.unsqueeze(-1).expand(*index.shape, d))
    offsets = torch.arange(0, lead.numel() * n, n, device=x.device).view(*lead, 1)
    flat_index = (index + offsets).reshape(-1)
    if out is None:
        return x.reshape(-1, d).index_select(0, flat_index).view(*lead, index.shape[-1], d)
    torch.index_select(x.reshape(-1, d), 0, flat_index, out=out.view(-1, d))
    return out.view(*lead, index.shape[-1], d)


def scatter_rows(rows: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of ``gather_rows`` for a permutation: out[…, index[…, i], :] = rows[…, i, :]."""
    lead, d = index.shape[:-1], rows.shape[-1]
    offsets = torch.arange(0, lead.numel() * n, n, device=rows.device).view(*lead, 1)
    out = rows.new_empty(lead.numel() * n, d)
    out.index_copy_(0, (index + offsets).reshape(-1), rows.reshape(-1, d))
    return out.view(*lead, n, d)


def inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    """inverse[…, order[…, i]] = i, without a second sort."""
    positions = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, positions)


def merge_lse(
    lse_a: torch.Tensor, out_a: torch.Tensor, lse_b: torch.Tensor, out_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two normalised partial attentions by their log-sum-exps.

    With L = log Σ e^ℓ over each part and O the part's softmax output,
    O = (e^{L_a} O_a + e^{L_b} O_b) / (e^{L_a} + e^{L_b}), computed without overflow.
    A part with L = -inf (no keys) contributes nothing.
    """
    lse = torch.logaddexp(lse_a, lse_b)
    lse_safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    w_a = torch.exp(lse_a - lse_safe).unsqueeze(-1)
    w_b = torch.exp(lse_b - lse_safe).unsqueeze(-1)
    return lse, w_a * out_a + w_b * out_b
