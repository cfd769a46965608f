"""The job grid of a sweep: stable job keys, the grid's digest, and deterministic shards.

A *job* is one input × method × budget with its seeds: the seeds stay together because they share
one timing.  Each seed of a job is one *record*, and each record has a **key**: a digest of
everything that decides what it measures —

    the input's identity (a digest of Q, K and V's bytes, shapes and dtype, and its layer),
    method, budget, seed, resolved parameters, budget mode, working dtype, device kind,
    softmax scale, mask (``causal``, and the causal queries' ``query_offset`` where it is not 0,
    so that keys of earlier versions stay the same), the phase and its query count M for a decode
    measurement (a prefill key hashes no phase: it is what it was before phases), reference mode (``full``, or ``rows:R``
    with its row seed), and whether the run adds ``bound_normalized``, times at all, and times
    the backward —

and nothing that only says how well it was timed (``--repeats``, ``--min-time``) or where the
input's file lies (so two machines with the same data at different paths agree).  The **grid's
digest** is a digest of its sorted record keys: it changes exactly when the set of measurements
does, not with the order methods were listed in, nor with the shard.  What a key hashes is one
record, ``kdecli.measure.setting.Setting`` (the input's part), with the method's fields.

Shards (``--num-shards N --shard-id I``): the jobs are sorted by their estimated cost (the
method's cost model on the input's shape, times its seeds' and timing's calls, plus measuring
each seed's output; ties by key) and dealt round-robin, turning every round (0 … N−1, N−1 … 0) —
the same on every machine given the same arguments.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from kdecli.records import Record, json_field

if TYPE_CHECKING:  # results files import this module; reading one needs no torch
    import torch

    from kdecli.measure.setting import Setting
    from kdecli.methods.base import AttentionMethod

KEY_BYTES = 8  # 16 hex digits: a collision among even a million records has odds ~3e-8


def digest(value: Any, size: int = KEY_BYTES) -> str:
    """The BLAKE2b hex digest of ``value``'s canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.blake2b(text.encode(), digest_size=size).hexdigest()


def tensor_digest(*tensors: torch.Tensor) -> str:
    """A digest of the tensors' shapes, dtypes and bytes (on the CPU, contiguous).  SHA-256,
    as CPUs hash it in hardware: about 1 GB/s here, twice BLAKE2b's (an input of 2^20 tokens
    × d = 64 in float32 is 0.75 GB)."""
    import torch

    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().to("cpu").contiguous()
        h.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, not a copy
    return h.hexdigest()[: 2 * KEY_BYTES]


def record_key(
    setting: Setting,
    method: str,
    budget: int | None,
    params: dict[str, Any],
    seed: int | None,
) -> str:
    """The stable key of one record (see the module docstring): the digest of the setting's
    ``key_fields`` and the method's name, budget, resolved parameters and seed."""
    return digest(
        {
            **setting.key_fields(),
            "method": method,
            "budget": budget,
            "params": params,
            "seed": seed,
        }
    )


@dataclass(frozen=True)
class GridJob:
    """One input × method × budget with its seeds, planned once and run as planned.

    ``setting`` is how its input is measured (``kdecli.measure.setting``), ``method`` the
    method's name, ``params`` its parameters as given and ``resolved`` its resolved parameters
    (what the key and the records name); ``keys`` has one key per seed (``None`` is the one seed
    of a method that draws nothing); ``cost`` the cost model's FLOPs of all its seeds, which
    balances the shards.  ``instance()`` is the method object, built once per job: the plan's own
    (it resolved the parameters and the cost); a job sent to another process (a Ray task) travels
    without it and builds it there once, refusing a method that resolves its parameters
    differently there (another kdecli installed).
    """

    layer: int | None
    method: str
    budget: int | None
    params: dict[str, Any]
    resolved: dict[str, Any]
    seeds: tuple[int | None, ...]
    keys: tuple[str, ...]
    cost: float
    setting: Setting
    built: AttentionMethod | None = field(default=None, compare=False, repr=False)

    def key_of(self, seed: int | None) -> str:
        return self.keys[self.seeds.index(seed)]

    def wanted(self, only: Collection[str] | None) -> list[tuple[int | None, str]]:
        """(seed, key) of the records ``only`` holds (None: every one), in seed order."""
        return [(s, k) for s, k in zip(self.seeds, self.keys) if only is None or k in only]

    def instance(self) -> AttentionMethod:
        """The method object of this job, built at most once in this process."""
        if self.built is not None:
            return self.built
        from kdecli.errors import RuntimeFailure
        from kdecli.methods import make_method

        budget_mode = self.setting.budget_mode
        built = make_method(self.method, self.budget, budget_mode=budget_mode, **self.params)
        if built.resolved_params != self.resolved:
            raise RuntimeFailure(
                f"`{self.method}` resolves its parameters differently here than where the grid "
                f"was planned ({_short(built.resolved_params)} vs {_short(self.resolved)}).",
                hint="Install the same kdecli version wherever the jobs run.",
            )
        object.__setattr__(self, "built", built)
        return built

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without the built method: a process that runs the job builds its own."""
        return {**self.__dict__, "built": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def entries(self) -> list[JobEntry]:
        phase = self.setting.phase
        return [
            JobEntry(key, self.layer, self.method, self.budget, seed, phase)
            for seed, key in zip(self.seeds, self.keys)
        ]


@dataclass(frozen=True)
class JobEntry(Record):
    """One record of the grid, as a results file lists it: its key and what a person reads."""

    key: str
    layer: int | None
    method: str
    budget: int | None
    seed: int | None
    phase: str = json_field("prefill", omit="default")  # written for decode records only

    def describe(self) -> str:
        """``layer 3 kdeformer budget=64 seed=1`` (``decode`` first for a decode record)."""
        parts = [] if self.phase == "prefill" else [self.phase]
        parts += [] if self.layer is None else [f"layer {self.layer}"]
        parts.append(self.method)
        if self.budget is not None:
            parts.append(f"budget={self.budget}")
        if self.seed is not None:
            parts.append(f"seed={self.seed}")
        return " ".join(parts)


@dataclass(frozen=True)
class GridInfo(Record):
    """What a results file says of its grid: the digest, every record of the whole grid, the
    settings that define it (``spec``, to name a difference between two grids), and which
    shard of how many this file's run was (None: the whole grid)."""

    json_order: ClassVar[tuple[str, ...]] = ("digest", "shard_id", "num_shards", "spec", "jobs")

    digest: str
    jobs: tuple[JobEntry, ...] = json_field(absent=())
    spec: dict[str, Any] = json_field(absent={})
    shard_id: int | None = None
    num_shards: int | None = None

    def unsharded(self) -> GridInfo:
        return GridInfo(self.digest, self.jobs, self.spec)

    def difference(self, other: GridInfo) -> str | None:
        """None for the same grid, else what differs, in words: the first setting of ``spec``
        that differs, else the job sets' sizes."""
        if self.digest == other.digest:
            return None
        for name in sorted(set(self.spec) | set(other.spec)):
            mine, theirs = self.spec.get(name), other.spec.get(name)
            if mine != theirs:
                return f"different {name} ({_short(mine)} vs {_short(theirs)})"
        return f"the job sets differ ({len(self.jobs)} vs {len(other.jobs)} records)"


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass
class Grid:
    """Every job of a sweep, in the order the run takes them (input by input, methods and
    budgets as given), and the settings that define it."""

    jobs: list[GridJob]
    spec: dict[str, Any] = field(default_factory=dict)

    @property
    def keys(self) -> list[str]:
        return [key for job in self.jobs for key in job.keys]

    @property
    def digest(self) -> str:
        return digest(sorted(self.keys))

    def entries(self) -> tuple[JobEntry, ...]:
        return tuple(entry for job in self.jobs for entry in job.entries())

    def shard(self, shard_id: int, num_shards: int) -> list[GridJob]:
        """The jobs of shard ``shard_id`` of ``num_shards`` (0-based), in the grid's order: the
        jobs sorted by estimated cost, largest first (ties by key), dealt round-robin, the
        direction turning every round (0, 1, …, N−1, N−1, …, 0, …) so that the shard dealt the
        costliest job of one round is dealt the cheapest of the next."""
        check_shard(shard_id, num_shards)
        ranked = sorted(self.jobs, key=lambda job: (-_finite(job.cost), job.keys[0]))
        mine = {id(job) for rank, job in enumerate(ranked) if dealt(rank, num_shards) == shard_id}
        return [job for job in self.jobs if id(job) in mine]

    def info(self, shard_id: int | None = None, num_shards: int | None = None) -> GridInfo:
        return GridInfo(self.digest, self.entries(), self.spec, shard_id, num_shards)


def dealt(rank: int, num_shards: int) -> int:
    """The shard the job of cost rank ``rank`` goes to: round-robin, turning every round."""
    turn, seat = divmod(rank, num_shards)
    return seat if turn % 2 == 0 else num_shards - 1 - seat


def check_shard(shard_id: int | None, num_shards: int | None) -> None:
    from kdecli.errors import UsageError

    if (shard_id is None) != (num_shards is None):
        raise UsageError("--shard-id and --num-shards go together: give both or neither.")
    if num_shards is None:
        return
    if num_shards < 1:
        raise UsageError(f"--num-shards must be at least 1; got {num_shards}.")
    if not 0 <= shard_id < num_shards:
        raise UsageError(
            f"--shard-id counts from 0, so it must be in 0..{num_shards - 1} for --num-shards "
            f"{num_shards}; got {shard_id}."
        )


def _finite(cost: float) -> float:
    """Unknown costs (inf, NaN) rank first: the cost model cannot say they are small."""
    return cost if math.isfinite(cost) else math.inf


def keys_of(jobs: Iterable[GridJob]) -> set[str]:
    return {key for job in jobs for key in job.keys}


def spec_of(
    settings: Sequence[Setting],
    methods: Sequence[str],
    budgets: Sequence[int],
    params: dict[str, dict[str, Any]],
    seeds: Sequence[int],
) -> dict[str, Any]:
    """The settings that define a grid, by name, for ``GridInfo.difference`` to name."""
    fields = [setting.key_fields() for setting in settings]
    shared = fields[0] if fields else {}
    inputs = []
    for f in fields:
        entry = {
            "layer": f["layer"],
            "digest": f["input_digest"],
            "scale": f["scale"],
            "causal": f["causal"],
            "reference": f["reference"],
        }
        if "query_offset" in f:  # only where it is not 0: older grids' specs read the same
            entry["query_offset"] = f["query_offset"]
        if "phase" in f:  # decode only: prefill grids' specs read as before phases
            entry["phase"] = f["phase"]
            entry["queries"] = f["queries"]
        inputs.append(entry)
    return {
        "inputs": inputs,
        "methods": list(methods),
        "budgets": list(budgets),
        "params": {name: dict(values) for name, values in sorted(params.items())},
        "seeds": list(seeds),
        **{
            name: shared.get(name)
            for name in ("dtype", "device", "budget_mode", "bound", "timing", "backward")
        },
    }
