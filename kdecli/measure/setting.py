"""``Setting``: what one measurement is, resolved once per input — the one record of its identity.

A ``RunConfig`` says what was asked (``device="auto"``, ``dtype=None``, ``causal=None``); a
``Setting`` is what that means on one input: the device and working dtype resolved, the softmax
scale, the mask (``kdecli.masks``: ``Full`` or ``Causal(offset)``), the reference plan (every row,
or R seeded rows), and the options that change what a record measures (budget mode, ``bound``,
``timing``, ``backward``).  Record keys are derived from it (``key_fields``,
``kdecli.sweeps.grid.record_key``), the measuring loop reads it, and the report's header is
written from it, so the three cannot disagree.

A setting has a *phase*: ``prefill`` measures every query of the input; ``decode`` measures its
last M queries (``queries``), each at its own position over its own prefix — Q's last M rows
(``measured``, ``QKV.last_queries``), K and V whole, under ``Causal(o + n_q − M)`` where
``Causal(o)`` is the input's causal mask (``Causal(n_k − M)`` by default).  Decode implies the
causal mask, whatever the input's own flag; ``--reference auto`` is the full reference of the M
rows.  ``RunConfig.phase == "both"`` resolves to one setting per phase (``phases_of``).

Keys of settings that existed before masks were types hash the same content as then: the mask
enters as ``causal`` (a bool), and ``query_offset`` is added only when it is not 0, so a resume
file of an earlier version still resumes; likewise ``phase`` and ``queries`` enter a decode
setting's key only, so prefill keys are those of before phases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from kdecli.devices import resolve_device, resolve_dtype
from kdecli.errors import UsageError
from kdecli.masks import Causal, Mask, mask_of
from kdecli.measure.row_reference import parse_reference, resolve_reference

if TYPE_CHECKING:
    from kdecli.measure.config import RunConfig
    from kdecli.qkv import QKV


# A measurement's phase: every query of the input (prefill), or its last M queries, each over its
# own prefix (decode).
PHASES = ("prefill", "decode")


@dataclass(frozen=True)
class Setting:
    """How one input is measured: resolved, checked, and the context of its record keys.

    ``input_digest`` and ``layer`` name the input (``QKV.digest``: its bytes, not its path);
    ``rows`` is the reference's sampled query rows (None: every row) and ``reference`` its name
    in keys (``full``, or ``rows:R@seed``)."""

    input_digest: str
    layer: int | None
    device: torch.device
    dtype: torch.dtype
    scale: float
    mask: Mask
    rows: int | None
    reference: str
    budget_mode: str
    bound: bool
    timing: bool
    backward: bool
    phase: str = "prefill"  # one of PHASES
    queries: int | None = None  # decode: the last M queries measured (None under prefill)

    @classmethod
    def of(cls, qkv: QKV, config: RunConfig, phase: str | None = None) -> Setting:
        """Resolve ``config`` on ``qkv`` for one phase (default: the config's; its first under
        ``both``); a ``UsageError`` for what this input cannot take (a device that is absent, a
        bad scale, a query offset outside 0..n_k − n_q, ``--queries`` outside 1..n_q)."""
        phase = phase or config.phase
        phase = "prefill" if phase == "both" else phase
        if phase not in PHASES:
            raise UsageError(f"a measurement's phase is one of {', '.join(PHASES)}; got {phase!r}.")
        shape = qkv.shape
        n_q, n_k = shape["n_q"], shape["n_k"]
        decode = phase == "decode"
        causal = True if decode else qkv.causal(config.causal)
        mask = resolve_mask(causal, config.query_offset, n_q, n_k)
        queries = None
        if decode:
            queries = config.queries
            if not 1 <= queries <= n_q:
                raise UsageError(
                    f"--queries must be in 1..{n_q} (the input's n_q = {n_q} queries); "
                    f"got {queries}."
                )
            # the last M queries keep their positions: they start n_q − M after the first
            mask = mask.rows(n_q - queries)
            shape = {**shape, "n_q": queries}
        device = config.device
        device = device if isinstance(device, torch.device) else resolve_device(device)
        dtype = config.dtype
        dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype) or qkv.q.dtype
        scale = qkv.scale(config.scale)
        if not math.isfinite(scale) or scale <= 0:
            raise UsageError(f"--scale must be a positive number; got {scale}.")
        spec = config.reference
        if decode and parse_reference(spec).mode == "auto":
            spec = "full"  # M rows: the full reference of the measured rows is cheap
        plan = resolve_reference(spec, shape)
        reference = "full" if plan.rows is None else f"rows:{plan.rows}@{config.seed}"
        return cls(
            input_digest=qkv.digest,
            layer=qkv.layer,
            device=device,
            dtype=dtype,
            scale=scale,
            mask=mask,
            rows=plan.rows,
            reference=reference,
            budget_mode=config.budget_mode,
            bound=config.bound,
            timing=config.timing,
            backward=config.backward,
            phase=phase,
            queries=queries,
        )

    @classmethod
    def phases_of(cls, qkv: QKV, config: RunConfig) -> list[Setting]:
        """One setting per phase the config asks for: two under ``both`` (prefill first)."""
        phases = PHASES if config.phase == "both" else (config.phase,)
        return [cls.of(qkv, config, phase) for phase in phases]

    def measured(self, qkv: QKV) -> QKV:
        """The part of ``qkv`` this setting measures: all of it under prefill, its last
        ``queries`` queries (K and V whole) under decode (``QKV.last_queries``)."""
        return qkv if self.queries is None else qkv.last_queries(self.queries)

    def prompt_queries(self, qkv: QKV) -> torch.Tensor | None:
        """Decode: the queries of ``qkv`` before the measured ones (the prompt's, which a method
        that chooses its cache from the prompt's attention prepares it with), on the setting's
        device and dtype; None under prefill."""
        if self.queries is None:
            return None
        prompt = qkv.q[..., : qkv.q.shape[-2] - self.queries, :]
        return prompt.to(self.device, self.dtype)

    @property
    def causal(self) -> bool:
        return self.mask.is_causal

    @property
    def query_offset(self) -> int:
        """Where the first query sits among the keys (0 without a causal mask)."""
        return self.mask.offset if isinstance(self.mask, Causal) else 0

    def key_fields(self) -> dict[str, Any]:
        """What every record key of this input hashes beside the method's own fields."""
        fields: dict[str, Any] = {
            "input_digest": self.input_digest,
            "layer": self.layer,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": self.device.type,  # the kind: the same job on another GPU is the same
            "scale": self.scale,
            "causal": self.causal,
            "reference": self.reference,
            "budget_mode": self.budget_mode,
            "bound": self.bound,
            "timing": self.timing,
            "backward": self.backward,
        }
        if self.query_offset:
            fields["query_offset"] = self.query_offset
        if self.phase != "prefill":  # prefill keys hash what they hashed before phases existed
            fields["phase"] = self.phase
            fields["queries"] = self.queries
        return fields

    def measuring_cost(self, shape: dict[str, int]) -> float:
        """FLOPs of measuring one output against the reference, which every record pays on top
        of its call: per slice, rel_spectral's SVD of the (rows × d_v) error (≈ 4·rows·d_v²)
        and the row norms.  It matters: on GloVe at n = 4096 it is as large as a kdeformer call
        at budget 64."""
        n_q, d_v = self.queries or shape["n_q"], shape["d_v"]
        rows = n_q if self.rows is None else min(n_q, self.rows)
        return shape["b"] * shape["h"] * rows * (4.0 * d_v * d_v + 10.0 * d_v)


def resolve_mask(causal: bool, offset: int | None, n_q: int, n_k: int) -> Mask:
    """The mask of the causal flag and ``--query-offset`` on n_q × n_k inputs (causal queries
    default to the last n_q positions); an offset that puts a query past the last key is refused
    with the allowed range, as is a causal mask over fewer keys than queries."""
    if causal and offset is not None and n_q <= n_k and offset > n_k - n_q:
        raise UsageError(
            f"--query-offset must be in 0..{n_k - n_q} for n_q = {n_q} queries over n_k = {n_k} "
            f"keys (the last query sits at offset + n_q − 1 < n_k); got {offset}."
        )
    return mask_of(causal, offset, n_q, n_k)
