"""``drift``: what an approximation in some attention layers does to a model's output (docs/metrics.md).

The text's first K·N tokens, cut into K chunks of N (``kdecli.hf.text``), run through the model
with its stock attention once — H⁽ˡ⁾, the hidden states after each layer l, and the output — and
then, per method × budget × seed, with the method in the chosen layers (``kdecli.hf.patching``):
Ĥ⁽ˡ⁾ and its output.  Per method × budget, mean ± std over seeds of

- hidden-state drift per layer: ‖Ĥ⁽ˡ⁾ − H⁽ˡ⁾‖_F / ‖H⁽ˡ⁾‖_F, sums of squares over all tokens of all
  chunks;
- next-token models (a causal LM with its head), over positions t < N−1 of every chunk, with
  p = softmax(z_t) and p̂ = softmax(ẑ_t): KL(p ‖ p̂) = Σ_v p_v (log p_v − log p̂_v) averaged over
  positions, top-1 agreement = mean [argmax p = argmax p̂], and perplexity exp(mean −log p̂(x_{t+1}))
  beside the exact model's exp(mean −log p(x_{t+1}));
- embedding models (anything else): cos(e, ê) of the pooled last hidden states per chunk, averaged;
  the pooling is the folder's own (``kdecli.hf.pooling``), else the mean over tokens;
- the time of one forward over one chunk, stock and patched (warm-up, repeats, median).

The ``mean`` baseline in the same layers is always run: its drift is the floor beside every
figure.  A method that cannot run in a layer (unsupported there, a parameter it cannot take at N
keys, an error, out of memory) gets a status and a reason; the others' results stand.  Chunks are
the outer loop, so only one chunk's exact states are held at a time.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kdecli.devices import resolve_device, resolve_dtype
from kdecli.errors import UsageError
from kdecli.experiments.drift.generate import (
    GENERATION_PHASES,
    GenerationTally,
    check_generate,
    decode_time,
    exact_perplexity,
    run_generations,
    step_time,
)
from kdecli.experiments.drift.generate import figures as generation_figures
from kdecli.experiments.drift.records import (
    DriftReport,
    DriftResult,
    ExactRun,
    ModelInfo,
)
from kdecli.hf.interface import require_transformers
from kdecli.hf.models import (
    config_sha256,
    is_causal_lm,
    load_model,
    load_tokenizer,
    model_source,
    quiet_transformers,
)
from kdecli.hf.patching import Patch, prepare
from kdecli.hf.pooling import Pooling, pooling_of
from kdecli.hf.text import (
    check_counts,
    check_positions,
    chunk_ids,
    n_layers,
    parse_layers,
    read_text,
)
from kdecli.measure.environment import environment
from kdecli.measure.failures import Failure
from kdecli.measure.figures import ResultTime, SeedStats, TimeStat
from kdecli.measure.time_record import time_stat
from kdecli.measure.timing import Timing, time_call
from kdecli.methods import AttentionMethod, get_method_class, make_method, method_of_role

Progress = Callable[[int, int, str], None]
ResultFn = Callable[[DriftResult], None]


# ---- what one forward gives, and the sums over chunks ---------------------------------------------


@dataclass
class Outputs:
    """One chunk's forward: hidden states after each layer; log p over positions t < N−1 and
    the next tokens (next-token models) or the pooled embedding (embedding models)."""

    hidden: list[torch.Tensor]
    logp: torch.Tensor | None = None  # (N−1, V)
    targets: torch.Tensor | None = None  # (N−1,)
    embedding: torch.Tensor | None = None  # (1, D)


def forward(model, ids: torch.Tensor, n: int, pooling: Pooling | None) -> Outputs:
    with torch.inference_mode(), quiet_transformers():
        out = model(input_ids=ids, output_hidden_states=True)
    hidden = list(out.hidden_states)[-n:]  # the embeddings' entry first, then one per layer
    if pooling is not None:
        return Outputs(hidden, embedding=pooling(hidden[-1]).double())
    logp = torch.log_softmax(out.logits[0, :-1].float(), dim=-1)
    return Outputs(hidden, logp=logp, targets=ids[0, 1:])


@dataclass
class Tally:
    """Sums over chunks for one method × budget × seed (or the exact run: ``nll`` only)."""

    layers: int
    diff2: list[float] = field(default_factory=list)
    norm2: list[float] = field(default_factory=list)
    cosines: list[float] = field(default_factory=list)
    kl: float = 0.0
    agree: float = 0.0
    nll: float = 0.0
    positions: int = 0

    def __post_init__(self):
        self.diff2, self.norm2 = [0.0] * self.layers, [0.0] * self.layers

    def add_exact(self, exact: Outputs) -> None:
        if exact.logp is not None:
            self.nll -= float(exact.logp.gather(-1, exact.targets[:, None]).double().sum())
            self.positions += exact.logp.shape[0]

    def add(self, exact: Outputs, approx: Outputs) -> None:
        for layer, (h, h_hat) in enumerate(zip(exact.hidden, approx.hidden)):
            self.diff2[layer] += float((h_hat.double() - h.double()).square().sum())
            self.norm2[layer] += float(h.double().square().sum())
        if exact.embedding is not None:
            cos = torch.nn.functional.cosine_similarity(exact.embedding, approx.embedding, dim=-1)
            self.cosines += cos.tolist()
        if exact.logp is not None:
            p, q = exact.logp, approx.logp
            self.kl += float((p.exp() * (p - q)).sum(-1).double().sum())
            self.agree += float((p.argmax(-1) == q.argmax(-1)).sum())
            self.nll -= float(q.gather(-1, exact.targets[:, None]).double().sum())
            self.positions += p.shape[0]

    def hidden(self) -> list[float]:
        return [math.sqrt(d / n) if n > 0 else math.nan for d, n in zip(self.diff2, self.norm2)]

    def perplexity(self) -> float:
        return math.exp(self.nll / self.positions)


# ---- the plan --------------------------------------------------------------------------------------


@dataclass
class PatchedRun:
    """One method × budget to run: a bound patch per seed, their tallies, and how it went."""

    method: AttentionMethod
    seeds: tuple[int | None, ...]
    patches: list[Patch] = field(default_factory=list)
    tallies: list[Tally] = field(default_factory=list)
    status: str = "ok"
    reason: str | None = None

    def label(self, seed: int | None) -> str:
        budget = "" if self.method.budget is None else f" budget={self.method.budget}"
        return self.method.name + budget + ("" if seed is None else f" seed={seed}")


def seed_list(seeds: int | Sequence[int]) -> list[int]:
    """``3`` -> [0, 1, 2]; a list of seeds stays as given."""
    if isinstance(seeds, bool):
        raise UsageError(f"--seeds must be a count or a list of seeds; got {seeds!r}.")
    if isinstance(seeds, int):
        if seeds < 1:
            raise UsageError(f"--seeds must be at least 1; got {seeds}.")
        return list(range(seeds))
    chosen = list(seeds)
    if not chosen or not all(isinstance(s, int) and not isinstance(s, bool) for s in chosen):
        raise UsageError(f"seeds must be a non-empty list of integers; got {seeds!r}.")
    return chosen


def plan(
    methods: Sequence[str | AttentionMethod],
    budgets: Sequence[int],
    params: Mapping[str, Mapping[str, Any]] | None,
    seeds: list[int],
) -> tuple[PatchedRun, list[PatchedRun]]:
    """The floor (``mean``) and one patched run per method × budget, every name, budget and
    parameter checked before the model is loaded."""
    params = dict(params or {})
    names = [m if isinstance(m, str) else m.name for m in methods]
    for name in params:
        if name not in names:
            raise UsageError(f"params given for `{name}`, which is not among the methods run.")
    for budget in budgets:
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise UsageError(f"budgets must be positive integers; got {budget!r}.")
    runs = []
    for method in methods:
        if isinstance(method, AttentionMethod):
            built = [method]
        else:
            cls = get_method_class(method)  # unknown names: a usage error with the closest name
            if cls.uses_budget and not budgets:
                raise UsageError(f"`{method}` needs a budget; give --budgets.")
            own = params.get(method, {})
            built = [
                make_method(method, b, **own) for b in (budgets if cls.uses_budget else [None])
            ]
        runs += [PatchedRun(m, tuple(seeds) if m.randomized else (None,)) for m in built]
    floor = next((s for s in runs if s.method.role == "baseline"), None)
    if floor is None:
        floor = PatchedRun(method_of_role("baseline")(), (None,))
    return floor, runs


# ---- the run ---------------------------------------------------------------------------------------


def drift(
    model_path: str | Path,
    text: str | Path,
    methods: Sequence[str | AttentionMethod] = ("kdeformer",),
    budgets: Sequence[int] = (128,),
    *,
    layers: str | Sequence[int] | None = None,
    seeds: int | Sequence[int] = 3,
    tokens: int = 512,
    chunks: int = 1,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = None,
    params: Mapping[str, Mapping[str, Any]] | None = None,
    timing: bool = True,
    repeats: int = 3,
    warmup: int = 1,
    progress: Progress | None = None,
    on_result: ResultFn | None = None,
    generate: int | None = None,
    phase: str | None = None,
) -> DriftReport:
    """Measure the drift of each method × budget in ``layers`` (default all) of the model at
    ``model_path`` (a local folder or .gguf file) on ``chunks`` chunks of ``tokens`` tokens of the
    text file ``text``; see the module doc for the figures.  ``seeds`` is a count (0, 1, …) or a
    list; ``params`` maps a method name to its parameters; ``dtype`` is the working precision
    (default float32).  ``progress(done, total, label)`` is called before each forward,
    ``on_result(result)`` as each method × budget finishes.  Bad requests raise ``UsageError``
    before the model runs.

    ``generate=T`` (causal LMs): instead of the one-pass figures, T greedy steps after each chunk
    with exact attention and with each method active in ``phase`` ("decode", the default: calls
    with a KV cache; "prefill": the prompt's forward; "both"), compared step by step
    (``kdecli.experiments.drift.generate``); the times are one decode step's."""
    check_counts(tokens, chunks)
    if generate is None and phase is not None:
        raise UsageError("--phase goes with --generate (the phases of a generation).")
    if generate is not None:
        phase = phase or GENERATION_PHASES[0]
        check_generate(generate, phase, tokens, None)
    if repeats < 1 or warmup < 0:
        raise UsageError(f"--repeats must be >= 1 and --warmup >= 0; got {repeats} and {warmup}.")
    floor, runs = plan(methods, budgets, params, seed_list(seeds))
    src = model_source(model_path)
    text_path = Path(text)
    text_bytes, text_str = read_text(text_path)
    require_transformers()
    work_dtype = (
        dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype)
    ) or torch.float32
    work_device = resolve_device(device) if isinstance(device, str) else torch.device(device)

    causal_lm = is_causal_lm(src)
    if generate is not None and not causal_lm:
        raise UsageError(
            f"--generate needs a causal language model with its head; {src.name} is an encoder "
            "(no language-model head), so it generates nothing."
        )
    model = load_model(src, dtype=work_dtype, device=work_device, causal_lm=causal_lm)
    count = n_layers(model.config)
    chosen = parse_layers(layers, count)
    check_positions(model.config, tokens)
    if generate is not None:
        text_config = model.config.get_text_config()
        positions = getattr(text_config, "max_position_embeddings", None)
        check_generate(generate, phase, tokens, positions)
    ids = chunk_ids(
        load_tokenizer(src), text_str, model.config, tokens=tokens, chunks=chunks,
        model_name=src.name, text_name=text_path.name,
    )  # fmt: skip
    pooling = None if causal_lm else pooling_of(src.folder)
    every = [floor, *(s for s in runs if s is not floor)]
    for patched in every:
        for seed in patched.seeds:
            bound = prepare(model, patched.method, None, chosen, seed or 0, phase=phase or "both")
            patched.patches.append(bound)
            patched.tallies.append(Tally(count) if generate is None else GenerationTally(generate))

    info = ModelInfo(
        source=src.name,
        model_type=str(model.config.model_type),
        n_layers=count,
        output="next-token" if causal_lm else "embedding",
        pooling=None if pooling is None else pooling.label,
        config_sha256=config_sha256(src, model),
    )
    header = dict(
        environment=environment(work_device, work_dtype),
        model=info,
        text=text_path.name,
        text_sha256=hashlib.sha256(text_bytes).hexdigest(),
        tokens=tokens,
        chunks=chunks,
        layers=chosen,
    )
    if generate is not None:
        report = _generation_report(
            model, ids, floor, runs, every, generate, phase, header, timing, work_device, progress
        )
        for result in report.results:
            if on_result:
                on_result(result)
        return report

    exact_tally = Tally(count)
    total = chunks * (1 + sum(len(s.seeds) for s in every))
    done = 0
    for index in range(chunks):
        chunk = ids[index : index + 1].to(work_device)
        if progress:
            progress(done, total, f"chunk {index + 1}/{chunks}: exact")
        exact = forward(model, chunk, count, pooling)
        exact_tally.add_exact(exact)
        done += 1
        for patched in every:
            for patch, tally, seed in zip(patched.patches, patched.tallies, patched.seeds):
                if progress:
                    progress(done, total, f"chunk {index + 1}/{chunks}: {patched.label(seed)}")
                done += 1
                if patched.status == "ok":
                    _run_patched(patched, patch, tally, exact, chunk, count, pooling)

    exact_time = _time_forward(model, ids[:1].to(work_device), None, repeats, warmup, timing)
    if progress:
        progress(total, total, "done")
    report = DriftReport(
        **header,
        exact=ExactRun(
            perplexity=exact_tally.perplexity() if causal_lm else None,
            time=exact_time if isinstance(exact_time, TimeStat) else None,
        ),
    )
    for patched in every:
        timed = None
        if patched.status == "ok" and timing:
            fresh = prepare(model, patched.method, None, chosen, patched.seeds[0] or 0)
            timed = _time_forward(model, ids[:1].to(work_device), fresh, repeats, warmup, True)
        result = _result(patched, causal_lm, timed, exact_time)
        if patched is floor:
            report.floor = result
        if patched is not floor or any(s is floor for s in runs):
            report.results.append(result)
            if on_result:
                on_result(result)
    return report


def _generation_report(
    model, ids, floor, runs, every, steps, phase, header, timing, device, progress
) -> DriftReport:
    """``drift --generate``: the generations of every run, and the document of their figures."""
    stock_prefill = phase == "decode"  # the prompt's forward is then the same in every run
    exact = run_generations(model, ids, every, steps, device, progress, stock_prefill)
    exact_step = step_time([s for g in exact for s in g.step_seconds]) if timing else None
    report = DriftReport(
        **header,
        generate=steps,
        phase=phase,
        exact=ExactRun(perplexity=exact_perplexity(exact), time=exact_step),
    )
    for patched in every:
        base = dict(
            method=patched.method.name,
            budget=patched.method.budget,
            params=patched.method.resolved_params,
            role=patched.method.role,
            seeds=patched.seeds,
        )
        if patched.status != "ok":
            result = DriftResult(**base, status=patched.status, reason=patched.reason)
        else:
            seconds = [s for t in patched.tallies for s in t.step_seconds]
            result = DriftResult(
                **base,
                generation=generation_figures(patched.tallies),
                time=decode_time(seconds, exact_step) if timing else None,
            )
        if patched is floor:
            report.floor = result
        if patched is not floor or any(s is floor for s in runs):
            report.results.append(result)
    return report


def _run_patched(patched, patch: Patch, tally: Tally, exact, chunk, count, pooling):
    """One patched forward into ``tally``; a failure marks the run (its later forwards skip)."""
    try:
        with patch.applied():
            approx = forward(patch.model, chunk, count, pooling)
    except Exception as exc:  # one method's failure must not lose the others' results
        failure = Failure.of(exc)
        patched.status, patched.reason = failure.status, failure.reason
        return
    patch.check_routed()  # the model, not the method: no result would mean anything
    tally.add(exact, approx)


def _time_forward(model, chunk, patch: Patch | None, repeats, warmup, enabled):
    """One forward's time (stock when ``patch`` is None): a ``TimeStat``, or why there is none."""
    if not enabled:
        return None

    def call():
        with torch.inference_mode(), quiet_transformers():
            model(input_ids=chunk)

    try:
        if patch is None:  # at least two warm-ups: the first calls of a process set up buffers
            timing: Timing = time_call(call, chunk.device, repeats=repeats, warmup=max(warmup, 2))
        else:
            with patch.applied():
                timing = time_call(call, chunk.device, repeats=repeats, warmup=warmup)
    except Exception as exc:
        return Failure.of(exc).reason
    return time_stat(timing)


def _result(patched: PatchedRun, causal_lm: bool, timed, exact_time) -> DriftResult:
    method = patched.method
    base = dict(
        method=method.name,
        budget=method.budget,
        params=method.resolved_params,
        role=method.role,
        seeds=patched.seeds,
    )
    if patched.status != "ok":
        return DriftResult(**base, status=patched.status, reason=patched.reason)
    tallies = patched.tallies
    per_layer = list(zip(*(t.hidden() for t in tallies)))
    figures: dict[str, Any] = {"hidden": tuple(SeedStats.of(list(v)) for v in per_layer)}
    if causal_lm:
        figures["kl"] = SeedStats.of([t.kl / t.positions for t in tallies])
        figures["top1"] = SeedStats.of([t.agree / t.positions for t in tallies])
        figures["perplexity"] = SeedStats.of([t.perplexity() for t in tallies])
    else:
        figures["cosine"] = SeedStats.of([sum(t.cosines) / len(t.cosines) for t in tallies])
    return DriftResult(**base, **figures, time=_result_time(timed, exact_time))


def _result_time(timed, exact_time) -> ResultTime | None:
    if timed is None:
        return None
    if isinstance(timed, str):
        return ResultTime(None, None, None, note=timed)
    if not isinstance(exact_time, TimeStat):
        return ResultTime(timed, None, None, note=exact_time)
    speedup = exact_time.median / timed.median if timed.median else None
    return ResultTime(timed, exact_time, speedup)
