"""How a sweep is spread: which shard of the grid this run takes, the file it resumes, and the
engine that runs its jobs (``--num-shards/--shard-id``, ``--resume``, ``--executor``).

kdecli never schedules machines: a shard is any process given the same arguments and its own
``--shard-id`` (a SLURM array task, a CI runner, a laptop), and the Ray executor runs jobs on the
cluster Ray already has.  No scheduler variable is read implicitly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kdecli.errors import UsageError
from kdecli.experiments.compare.records import RunReport
from kdecli.sweeps.grid import check_shard

EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class SweepOptions:
    """``num_shards``/``shard_id``: run shard I of N (0-based) of the grid; ``resume``: a JSONL
    file that records are appended to as they finish, whose ``ok`` records a rerun skips;
    ``executor``: ``local`` (this process) or ``ray`` (each job a Ray task)."""

    num_shards: int | None = None
    shard_id: int | None = None
    resume: Path | None = None
    executor: str = "local"

    def check(self) -> None:
        check_shard(self.shard_id, self.num_shards)
        if self.executor not in EXECUTORS:
            raise UsageError(
                f"--executor must be one of {', '.join(EXECUTORS)}; got {self.executor!r}."
            )

    @property
    def sharded(self) -> bool:
        return self.num_shards is not None

    def shard_label(self) -> str:
        return f"shard {self.shard_id} of {self.num_shards}" if self.sharded else "the grid"


def executor(name: str) -> Callable[..., RunReport]:
    """The function that runs a grid's jobs: ``compare_layers``' signature, either engine."""
    if name == "ray":
        from kdecli.sweeps.ray_executor import run_on_ray

        return run_on_ray
    from kdecli.experiments.compare.run import compare_layers

    return compare_layers
