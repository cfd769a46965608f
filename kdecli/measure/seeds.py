"""Seeds derived from the run's: each consumer of randomness draws from its own stream.

A method's generator is seeded with crc32(``"{name}/{run_seed}"``), so adding or removing a method
never changes another's draws, and the correctness pass, the timing pass and a Ray worker that
runs one job all draw the same numbers for the same method and seed.  The row sample of a
``rows:R`` reference and the fixed output gradient of a timed backward take their seeds the same
way, from names of their own.
"""

from __future__ import annotations

import zlib

import torch

ROWS_SEED_NAME = "reference/rows"  # the row sample of a rows:R reference
GRAD_OUT_SEED_NAME = "timing/grad_out"  # the fixed output gradient of a timed backward


def derive_seed(run_seed: int, name: str) -> int:
    """The seed of ``name``'s draws under ``run_seed``: crc32 of ``"{name}/{run_seed}"``."""
    return zlib.crc32(f"{name}/{run_seed}".encode())


def generator(device: torch.device, run_seed: int, name: str) -> torch.Generator:
    """A generator on ``device`` seeded for ``name`` under ``run_seed``."""
    return torch.Generator(device=device).manual_seed(derive_seed(run_seed, name))
