"""What a timed forward + backward differentiates: the inputs as leaves, and a fixed gradient.

``--backward`` times one forward and ``torch.autograd.grad`` of its output against a fixed random
output gradient, for each method and for exact attention: q, k and v are copies of the working
inputs that require grad (made once per input), and the gradient is drawn once from a seed
derived from the run seed (``kdecli.measure.seeds``), so every method is differentiated against
the same one.  ``autograd.grad`` returns fresh gradients each call: nothing accumulates on the
leaves between timed calls.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kdecli.measure.seeds import GRAD_OUT_SEED_NAME, generator
from kdecli.qkv import QKV


@dataclass(frozen=True)
class GradInputs:
    """q, k, v as leaves that require grad and the fixed gradient of the output."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    grad_out: torch.Tensor

    @classmethod
    def of(cls, work: QKV, run_seed: int, device: torch.device) -> GradInputs:
        q, k, v = (t.detach().clone().requires_grad_(True) for t in (work.q, work.k, work.v))
        drawn = generator(device, run_seed, GRAD_OUT_SEED_NAME)
        shape = (*work.q.shape[:-1], work.v.shape[-1])
        grad_out = torch.randn(shape, generator=drawn, device=device, dtype=work.q.dtype)
        return cls(q, k, v, grad_out)

    def rows(self, part: int) -> GradInputs:
        """The first ``part`` query rows (a leaf of their own), every key."""
        if part == self.q.shape[-2]:
            return self
        q = self.q.detach()[..., :part, :].contiguous().requires_grad_(True)
        return GradInputs(q, self.k, self.v, self.grad_out[..., :part, :].contiguous())

    def step(self, forward: Callable[..., torch.Tensor]) -> Callable[[], object]:
        """One timed call: ``forward(q, k, v)``, then the gradients of its output against
        ``grad_out`` (``autograd.grad`` allocates them afresh, so nothing accumulates)."""
        leaves = (self.q, self.k, self.v)

        def call():
            with torch.enable_grad():
                out = forward(*leaves)
                return torch.autograd.grad(out, leaves, self.grad_out, allow_unused=True)

        return call

    def check(self, forward: Callable[..., torch.Tensor]) -> str | None:
        """One untimed forward + backward: why it cannot be timed (a detached output, no
        gradient, non-finite gradients), or None.  Raises what the method raises."""
        leaves = (self.q, self.k, self.v)
        with torch.enable_grad():
            out = forward(*leaves)
            if not out.requires_grad:
                return "backward: the output does not require grad (the method detaches it)"
            grads = torch.autograd.grad(out, leaves, self.grad_out, allow_unused=True)
        if all(g is None for g in grads):
            return "backward: no gradient reaches q, k or v"
        bad = sum(int((~torch.isfinite(g)).sum()) for g in grads if g is not None)
        if bad:
            return f"backward: non-finite gradients: {bad} NaN or infinite values"
        return None
