"""``drift --generate T``: greedy generation with exact attention and with a method, compared.

After each prompt x (a chunk of N tokens) the model generates T tokens greedily, with its own KV
cache: one forward over the prompt (no past: the prefill), then one decode step per further token
(one query over the cache).  Once with stock attention — tokens y_1..y_T and p_t = softmax(z_t),
the distribution y_t was drawn from — and, per method × budget × seed, once with the method active
in the chosen phases and layers (``kdecli.hf.patching``, ``phase``): ŷ_1..ŷ_T free-running, and
p̂_t teacher-forced on the exact generation (y_1..y_{t−1} fed token by token through the cache, so
each step is a decode step, as in generation; one parallel forward would be a prefill).  Per
generation:

- first divergence d = min{t : ŷ_t ≠ y_t} (0-based), T when the two never differ;
- token agreement (1/T) Σ_t [ŷ_t = y_t] (positional: after a divergence the texts may re-align);
- per step t, teacher-forced: KL(p_t ‖ p̂_t) = Σ_v p_t(v) (log p_t(v) − log p̂_t(v)) and top-1
  agreement [argmax p̂_t = y_t], each also as a curve over t (error accumulates along a
  generation), and the perplexity of the exact continuation exp(mean_t −log p̂_t(y_t)).

Per method × budget the first divergence is the median over prompts (one value per seed; a
generation that never differs counts as T, and how many did is kept), the others the mean over
prompts and steps; mean ± std over seeds.  A decode step's time is the wall time of the model's
forward, median over the steps of the free-running generations.
"""

from __future__ import annotations

import copy
import inspect
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch

from kdecli.errors import UsageError
from kdecli.experiments.drift.records import GenerationFigures
from kdecli.hf.models import quiet_transformers
from kdecli.measure.failures import Failure
from kdecli.measure.figures import ResultTime, SeedStats, TimeStat

GENERATION_PHASES = ("decode", "prefill", "both")  # the default first


def check_generate(generate: int, phase: str, tokens: int, positions: int | None) -> None:
    """A positive step count and a known phase, within the model's positions (one line each)."""
    if isinstance(generate, bool) or not isinstance(generate, int) or generate < 1:
        raise UsageError(f"--generate must be a positive number of tokens; got {generate!r}.")
    if phase not in GENERATION_PHASES:
        raise UsageError(f"--phase must be one of {', '.join(GENERATION_PHASES)}; got {phase!r}.")
    if isinstance(positions, int) and positions > 0 and tokens + generate > positions:
        raise UsageError(
            f"--tokens {tokens} + --generate {generate} = {tokens + generate} positions; the "
            f"model takes at most {positions} (max_position_embeddings)."
        )


# ---- one generation ------------------------------------------------------------------------------


@dataclass
class Generation:
    """T greedy steps after a prompt: the tokens fed or chosen, log p of each step's
    distribution (float64), and the wall time of each decode step's forward."""

    tokens: torch.Tensor  # (T,) long
    logp: torch.Tensor  # (T, V) float64
    step_seconds: list[float] = field(default_factory=list)


def _cache_name(model) -> str:
    """The keyword under which this model's forward takes its KV cache (transformers renamed
    ``past_key_values`` to ``cache``)."""
    names = inspect.signature(model.forward).parameters
    return "cache" if "cache" in names else "past_key_values"


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


@dataclass
class Prefill:
    """The prompt's forward: the logits of the first generated token and the KV cache after it."""

    logits: torch.Tensor  # (1, 1, V)
    cache: Any


def prefill(model, prompt: torch.Tensor) -> Prefill:
    with torch.inference_mode(), quiet_transformers():
        out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    return Prefill(out.logits, _cache_of(out))


def greedy(
    model,
    prompt: torch.Tensor,
    steps: int,
    forced: torch.Tensor | None = None,
    start: Prefill | None = None,
) -> Generation:
    """Greedy decoding of ``steps`` tokens after ``prompt`` (1, N), through the model's own KV
    cache object (as ``generate`` does: the argmax of the float logits).  With ``forced`` (T,),
    those tokens are fed instead of the argmax (teacher forcing); log p is the model's either way.
    ``start``: the prompt's forward already made (a copy of its cache is extended; ``start`` is
    left as it was), for generations whose prefill is stock."""
    keyword = _cache_name(model)
    chosen, logps, seconds = [], [], []
    with torch.inference_mode(), quiet_transformers():
        if start is None:
            out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
        else:
            out = SimpleNamespace(logits=start.logits, cache=copy.deepcopy(start.cache))
        for step in range(steps):
            logits = out.logits[0, -1]
            token = logits.argmax() if forced is None else forced[step].to(logits.device)
            chosen.append(token)
            logps.append(torch.log_softmax(logits.double(), dim=-1).cpu())
            if step + 1 == steps:
                break
            start = time.perf_counter()
            out = model(input_ids=token.view(1, 1), use_cache=True, **{keyword: _cache_of(out)})
            if out.logits.is_cuda:  # the step's kernels, not only their launch
                torch.cuda.synchronize(out.logits.device)
            seconds.append(time.perf_counter() - start)
    return Generation(torch.stack(chosen).cpu(), torch.stack(logps), seconds)


# ---- comparing two generations -------------------------------------------------------------------


def _tokens(sequence: Sequence[int] | torch.Tensor) -> list[int]:
    return sequence.tolist() if isinstance(sequence, torch.Tensor) else list(sequence)


def first_divergence(
    exact: Sequence[int] | torch.Tensor, other: Sequence[int] | torch.Tensor
) -> int:
    """The first step (0-based) where two generations of the same length choose different
    tokens; their length T when they never do."""
    a, b = _tokens(exact), _tokens(other)
    if len(a) != len(b):
        raise ValueError(f"generations of different lengths: {len(a)} and {len(b)}")
    return next((t for t, (x, y) in enumerate(zip(a, b)) if x != y), len(a))


def token_agreement(
    exact: Sequence[int] | torch.Tensor, other: Sequence[int] | torch.Tensor
) -> float:
    """The share of steps at which two generations of the same length hold the same token."""
    a, b = _tokens(exact), _tokens(other)
    if len(a) != len(b) or not a:
        raise ValueError(f"need two generations of one positive length: {len(a)} and {len(b)}")
    return sum(x == y for x, y in zip(a, b)) / len(a)


def step_kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p_t ‖ q_t) per step t from log-probabilities (T, V): Σ_v p (log p − log q)."""
    return (logp.exp() * (logp - logq)).sum(-1)


@dataclass
class GenerationTally:
    """One method × budget × seed over the prompts: per-prompt divergence and agreement, and the
    per-step sums of the teacher-forced figures."""

    steps: int
    divergences: list[int] = field(default_factory=list)
    agreements: list[float] = field(default_factory=list)
    kl: torch.Tensor = field(init=False)
    top1: torch.Tensor = field(init=False)
    nll: float = 0.0
    step_seconds: list[float] = field(default_factory=list)

    def __post_init__(self):
        self.kl = torch.zeros(self.steps, dtype=torch.float64)
        self.top1 = torch.zeros(self.steps, dtype=torch.float64)

    def add(self, exact: Generation, free: Generation, forced: Generation) -> None:
        self.divergences.append(first_divergence(exact.tokens, free.tokens))
        self.agreements.append(token_agreement(exact.tokens, free.tokens))
        self.kl += step_kl(exact.logp, forced.logp)
        self.top1 += (forced.logp.argmax(-1) == exact.tokens).double()
        self.nll -= float(forced.logp.gather(-1, exact.tokens[:, None]).sum())
        self.step_seconds += free.step_seconds

    @property
    def prompts(self) -> int:
        return len(self.divergences)

    def perplexity(self) -> float:
        return math.exp(self.nll / (self.prompts * self.steps))


def exact_perplexity(generations: Sequence[Generation]) -> float:
    """exp(mean −log p_t(y_t)): the exact model's perplexity of its own greedy continuations."""
    nll = sum(-float(g.logp.gather(-1, g.tokens[:, None]).sum()) for g in generations)
    return math.exp(nll / sum(len(g.tokens) for g in generations))


def figures(tallies: Sequence[GenerationTally]) -> GenerationFigures:
    """One method × budget's figures over its seeds' tallies (module doc)."""
    steps = tallies[0].steps
    weight = sum(t.prompts for t in tallies)
    return GenerationFigures(
        steps=steps,
        first_divergence=SeedStats.of([float(statistics.median(t.divergences)) for t in tallies]),
        never_diverged=sum(d == steps for t in tallies for d in t.divergences),
        generations=weight,
        token_agreement=SeedStats.of([statistics.fmean(t.agreements) for t in tallies]),
        kl=SeedStats.of([float(t.kl.sum()) / (t.prompts * steps) for t in tallies]),
        top1_agreement=SeedStats.of([float(t.top1.sum()) / (t.prompts * steps) for t in tallies]),
        perplexity=SeedStats.of([t.perplexity() for t in tallies]),
        kl_per_step=tuple((sum(t.kl for t in tallies) / weight).tolist()),
        top1_agreement_per_step=tuple((sum(t.top1 for t in tallies) / weight).tolist()),
    )


def step_time(seconds: Sequence[float]) -> TimeStat | None:
    """Median and inter-quartile range of decode steps' wall times."""
    if not seconds:
        return None
    q1, median, q3 = statistics.quantiles(seconds, n=4) if len(seconds) > 1 else [seconds[0]] * 3
    return TimeStat(median, q3 - q1, len(seconds))


def decode_time(method_seconds: Sequence[float], exact: TimeStat | None) -> ResultTime | None:
    """The method's decode step against the exact one (speed-up = exact / method)."""
    method = step_time(method_seconds)
    if method is None:
        return None
    if exact is None or not method.median:
        return ResultTime(method, exact, None)
    return ResultTime(method, exact, exact.median / method.median)


def run_generations(
    model, ids: torch.Tensor, runs, steps: int, device, progress=None, stock_prefill=False
):
    """The exact generation after each prompt (a row of ``ids``), then each run's (``PatchedRun``
    of ``kdecli.experiments.drift.run``: a bound patch and a ``GenerationTally`` per seed)
    free-running and teacher-forced generations beside it.  A run that fails is marked and
    skipped from then on; the others go on.  Returns the exact generations.

    ``stock_prefill`` (the methods run in the decode steps only): the prompt's forward is the
    same in every generation, so it is made once per prompt and each generation extends a copy of
    its cache."""
    prompts = ids.shape[0]
    total = prompts * (1 + sum(len(run.seeds) for run in runs))
    done, exact_runs = 0, []
    for index in range(prompts):
        prompt = ids[index : index + 1].to(device)
        if progress:
            progress(done, total, f"prompt {index + 1}/{prompts}: exact")
        start = prefill(model, prompt) if stock_prefill and steps > 1 else None
        exact = greedy(model, prompt, steps, start=start)
        exact_runs.append(exact)
        done += 1
        for run in runs:
            for patch, tally, seed in zip(run.patches, run.tallies, run.seeds):
                if progress:
                    progress(done, total, f"prompt {index + 1}/{prompts}: {run.label(seed)}")
                done += 1
                if run.status == "ok":
                    _generate_patched(run, patch, tally, exact, prompt, steps, start)
    if progress:
        progress(total, total, "done")
    return exact_runs


def _generate_patched(run, patch, tally: GenerationTally, exact, prompt, steps, start) -> None:
    try:
        with patch.applied():
            free = greedy(patch.model, prompt, steps, start=start)
            forced = greedy(patch.model, prompt, steps, forced=exact.tokens, start=start)
    except Exception as exc:  # one method's failure must not lose the others' results
        failure = Failure.of(exc)
        run.status, run.reason = failure.status, failure.reason
        return
    patch.check_routed()
    tally.add(exact, free, forced)
