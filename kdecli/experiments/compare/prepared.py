"""One input made ready to measure against, once: the working tensors, the exact target, the
report's header and exact attention's timings.  A decode setting measures the input's last M
queries only (``Setting.measured``): the reference, floors and timings are those rows'.

The float64 target (every row, or a row sample) is computed on the measuring device; running out
of memory there is a ``RuntimeFailure`` that says what to shrink.  The header holds the
environment, the input as run (shape, scale, mask), the floors (``kdecli.measure.floors``) and the
reference.  Exact attention is timed at most once per prepared input, in the working dtype on the
working device.  ``reuse`` keeps the last prepared input per process, for a worker that runs one
job per call on the same input (a Ray worker): its reference and exact timings are computed once,
not once per job.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from kdecli.errors import RuntimeFailure, first_line, is_out_of_memory
from kdecli.experiments.compare.records import RunReport
from kdecli.measure.config import RunConfig
from kdecli.measure.environment import describe_input, environment
from kdecli.measure.figures import InputInfo
from kdecli.measure.floors import floors
from kdecli.measure.grads import GradInputs
from kdecli.measure.row_reference import parse_reference
from kdecli.measure.setting import Setting
from kdecli.measure.target import Target
from kdecli.measure.timed import Timed, TimingOptions, time_exact
from kdecli.qkv import QKV


@dataclass
class Prepared:
    """An input ready to measure against (see the module docstring)."""

    identity: tuple
    work: QKV
    target: Target
    report: RunReport
    exact_time: Timed | None = None
    exact_backward: Timed | None = None
    grads: GradInputs | None = None
    timed: bool = False

    @classmethod
    def of(cls, qkv: QKV, setting: Setting, config: RunConfig, reuse: bool) -> Prepared:
        """``qkv`` prepared under ``setting``; with ``reuse``, the last one if it is the same."""
        global _LAST
        timing = (config.repeats, config.warmup, config.min_time, config.seed)
        identity = (setting, str(setting.device), timing)
        if reuse and _LAST is not None and _LAST.identity == identity:
            return _LAST
        _LAST = None  # free the last input's tensors before computing this one's
        prepared = cls._compute(qkv, setting, config, identity)
        if reuse:
            _LAST = prepared
        return prepared

    @classmethod
    def _compute(cls, qkv: QKV, setting: Setting, config: RunConfig, identity) -> Prepared:
        device, mask = setting.device, setting.mask
        causal_input = qkv.causal(config.causal)
        qkv = setting.measured(qkv)  # decode: the last M queries, K and V whole
        float64 = qkv.to(device, torch.float64)
        try:
            target = Target.compute(
                float64, setting.scale, mask, setting.rows, config.seed, config.bound
            )
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            shape = qkv.shape
            raise RuntimeFailure(
                f"out of memory computing the float64 exact reference on {device} (b·h = "
                f"{shape['b'] * shape['h']}, n_q = {shape['n_q']}, n_k = {shape['n_k']}): "
                f"{first_line(exc)}",
                hint="Use a smaller --n or --batch, or another --device.",
            ) from None
        work = qkv.to(device, setting.dtype)
        report = RunReport(
            environment=environment(device, setting.dtype),
            input=_input_info(qkv, setting, causal_input),
            floors=floors(target, float64.v, mask),
            reference=target.info(str(parse_reference(config.reference)), config.seed),
        )
        return cls(identity, work, target, report)

    def time_exact(self, setting: Setting, options: TimingOptions, run_seed: int) -> None:
        """Exact attention's time (and with ``backward`` its forward + backward), once."""
        if self.timed:
            return
        scale, mask = setting.scale, setting.mask
        self.exact_time = time_exact(self.work, scale, mask, options)
        if setting.backward:
            self.grads = GradInputs.of(self.work, run_seed, self.work.q.device)
            self.exact_backward = time_exact(self.work, scale, mask, options, grads=self.grads)
        self.timed = True


def _input_info(qkv: QKV, setting: Setting, causal_input: bool) -> InputInfo:
    """The input as measured, with its phase: decode says how many queries, and says so where
    it put a causal mask on an input that is not causal itself."""
    info = describe_input(qkv, setting.scale, setting.mask)
    if setting.phase == "prefill":
        return info
    note = None
    if not causal_input:
        note = (
            "the input is not causal; decode measures each of the last queries over its own "
            "prefix (a causal mask)"
        )
    return replace(info, phase=setting.phase, queries=setting.queries, note=note)


_LAST: Prepared | None = None
