"""Every shared command-line option, defined once, and the groups that parse them into typed objects.

A command names the groups it takes as typed parameters; ``shared_options`` adds the options of
each group to the command's signature (for Typer) and hands the command one object per group::

    @app.command("compare")
    @c.handle_errors
    @shared_options(inputs=INPUT, run=RUN, out=OUTPUT, repeats=3)
    def compare_command(input_spec: c.InputArg = None, *, inputs, run, out): ...

so a new shared option is one entry in ``OPTIONS`` and one field of the object it fills (and, for
the run and input options, whose classes are imported only when a command runs, its name in the
group); the same option has the same name, help and meaning in every command.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, fields
from importlib import import_module
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from kdecli.errors import UsageError
from kdecli.sweeps.options import SweepOptions

# ``--output FILE`` names its format by its extension when ``--format`` is not given.
FORMAT_OF_SUFFIX = {
    ".json": "json", ".jsonl": "jsonl", ".csv": "csv", ".md": "markdown", ".txt": "table",
}  # fmt: skip


@dataclass(frozen=True)
class OutputOptions:
    """Where and how results are written.  ``fmt`` None: the format the output file's extension
    names (``FORMAT_OF_SUFFIX``), else a table; an explicit ``--format`` that contradicts the
    extension is refused (``out.json`` holding a table is read back as nothing)."""

    fmt: str | None = None
    output: Path | None = None
    quiet: bool = False
    columns: str | None = None
    verbose: bool = False

    def __post_init__(self) -> None:
        named = FORMAT_OF_SUFFIX.get(self.output.suffix.lower()) if self.output else None
        if self.fmt is None:
            object.__setattr__(self, "fmt", named or "table")
        elif named is not None and self.fmt != named:
            raise UsageError(
                f"--output {self.output} names {named} by its extension; got --format {self.fmt}.",
                hint=f"Drop --format, or give a file name ending in .{_suffix_of(self.fmt)}.",
            )


def _suffix_of(fmt: str) -> str:
    return next((s[1:] for s, f in FORMAT_OF_SUFFIX.items() if f == fmt), fmt)


@dataclass(frozen=True)
class Opt:
    """One option: its flags, type, default and help."""

    flags: tuple[str, ...]
    type: Any
    default: Any
    help: str


OPTIONS: dict[str, Opt] = {
    # input: which arrays to read, and how
    "q": Opt(("--q",), Optional[str], None, "Q as a .npy file (with --k and --v)."),
    "k": Opt(("--k",), Optional[str], None, "K as a .npy file."),
    "v": Opt(("--v",), Optional[str], None, "V as a .npy file."),
    "q_key": Opt(("--q-key",), Optional[str], None, "Name of the Q array/dataset."),
    "k_key": Opt(("--k-key",), Optional[str], None, "Name of the K array/dataset."),
    "v_key": Opt(("--v-key",), Optional[str], None, "Name of the V array/dataset."),
    "layout": Opt(("--layout",), str, "bhnd", "4-d arrays are bhnd (default) or bnhd."),
    "n": Opt(("--n",), Optional[int], None, "Crop to the first N queries and keys."),
    "batch": Opt(("--batch",), Optional[int], None, "glove: batch size (default 8)."),
    # run: how to measure
    "seeds": Opt(("--seeds",), int, 3, "Seeds per randomized method × budget."),
    "seed": Opt(("--seed",), int, 0, "Run seed; each method derives its own from it."),
    "device": Opt(("--device",), str, "auto", "auto | cpu | cuda[:i]."),
    "dtype": Opt(
        ("--dtype",),
        Optional[str],
        None,
        "float32 | float64 | float16 | bfloat16 (default: the input's).",
    ),
    "scale": Opt(
        ("--scale",),
        Optional[float],
        None,
        "Softmax temperature s in softmax(s·QKᵀ) (default 1/√d, or the input's own).",
    ),
    "all_layers": Opt(
        ("--all-layers",),
        bool,
        False,
        "Every layer of a capture (FILE.h5:/layer* picks some): one reference per layer.",
    ),  # fmt: skip
    "causal": Opt(
        ("--causal/--no-causal",),
        Optional[bool],
        None,
        "Causal mask: query i sees keys j ≤ i (default: the input's own flag, else off).",
    ),  # fmt: skip
    "query_offset": Opt(
        ("--query-offset",),
        Optional[int],
        None,
        "Under a causal mask, query i sits at key position N + i and sees keys j ≤ N + i; "
        "N in 0..n_k−n_q (default n_k−n_q: the queries are the last positions, as a decode step).",
    ),
    "phase": Opt(
        ("--phase",),
        str,
        "prefill",
        "prefill: every query at once | decode: the last --queries queries, each over its own "
        "prefix (a causal mask) | both: the two side by side.",
    ),
    "queries": Opt(
        ("--queries",),
        int,
        1,
        "--phase decode: how many of the last queries to measure, M in 1..n_q (1: one decode step).",
    ),
    "steps": Opt(
        ("--steps",),
        int,
        64,
        "--phase decode: the decode steps a method's one-off preparation of the cache is "
        "amortised over (amortised step = step + preparation / steps).",
    ),
    "diagnostics": Opt(
        ("--diagnostics/--no-diagnostics",),
        Optional[bool],
        None,
        "Also measure why each estimate is wrong: density, mass recall, selection vs estimation "
        "error, row-sum error (a second exact pass; default: on under a full reference, off "
        "under rows:R, where the split has rel_frobenius only).",
    ),
    "repeats": Opt(("--repeats",), int, 3, "Timed calls per method (median reported)."),
    "warmup": Opt(("--warmup",), int, 1, "Untimed calls before timing."),
    "min_time": Opt(
        ("--min-time",),
        float,
        0.2,
        "Seconds of timed calls per setting at least, beside --repeats (0: exactly --repeats).",
    ),
    "budget_mode": Opt(
        ("--budget-mode",),
        str,
        "paper",
        "paper: each method maps the budget as its paper does; keys: every method pays m keys "
        "or features per query.",
    ),
    "bound": Opt(
        ("--bound",),
        bool,
        False,
        "Add bound_normalized = ‖Õ−O‖₂/(‖D⁻¹A‖₂‖V‖₂) (power iteration: several exact passes).",
    ),
    "timing": Opt(("--timing/--no-timing",), bool, True, "Time methods against exact attention."),
    "backward": Opt(
        ("--backward/--no-backward",),
        bool,
        False,
        "Also time one forward + backward of each method and of exact attention (SDPA), "
        "inputs requiring grad.",
    ),
    "reference": Opt(
        ("--reference",),
        str,
        "auto",
        "full | rows:R | auto. rows:R: exact outputs of R seeded query rows only; errors become "
        "estimates with 95 % intervals (no rel_spectral). auto: full while it takes about a "
        "minute on a 2-core CPU, else rows:4096.",
    ),
    # sweep: which part of the grid, resumed from where, run by what
    "num_shards": Opt(
        ("--num-shards",),
        Optional[int],
        None,
        "Split the job grid into N shards, balanced by the cost model and the same on every "
        "machine; run one with --shard-id.",
    ),
    "shard_id": Opt(
        ("--shard-id",),
        Optional[int],
        None,
        "Which shard this run is, 0-based (a SLURM array: --shard-id $SLURM_ARRAY_TASK_ID).",
    ),
    "resume": Opt(
        ("--resume",),
        Optional[Path],
        None,
        "Append each record to FILE.jsonl as it finishes; run again, the same command skips "
        "the records already there with status ok.",
    ),
    "executor": Opt(
        ("--executor",),
        str,
        "local",
        "local: jobs in this process | ray: each job a Ray task, on the cluster RAY_ADDRESS "
        "names, else a local one (pip install 'kdecli\\[ray]').",
    ),
    # output: where and how
    "fmt": Opt(
        ("--format", "-f"),
        Optional[str],
        None,
        "table | json | jsonl | csv | markdown (default: from the --output file's extension: "
        ".json .jsonl .csv .md .txt; else table).",
    ),
    "output": Opt(("--output", "-o"), Optional[Path], None, "Write the results to FILE."),
    "quiet": Opt(("--quiet", "-q"), bool, False, "No progress or notes on stderr."),
    "columns": Opt(
        ("--columns",),
        Optional[str],
        None,
        "Table columns, comma-separated, or `all` (default: what fits the terminal).",
    ),
    "verbose": Opt(
        ("--verbose", "-v"),
        bool,
        False,
        "Under the table, also each setting's resolved parameters (the JSON always has them).",
    ),
}


@dataclass(frozen=True)
class Group:
    """Options that fill one typed object: ``make(**{field: value})``.

    ``build`` is the object's class, or its ``"module:Name"`` path, imported only when a command
    runs: the run and input options live beside torch, and ``--help`` must not import it.  Such a
    group names its fields here (in the class's order; ``tests/test_cli_surface.py`` checks them).
    """

    build: Callable[..., Any] | str
    names: tuple[str, ...]

    def make(self, **values: Any) -> Any:
        build = self.build
        if isinstance(build, str):
            module, _, name = build.partition(":")
            build = getattr(import_module(module), name)
        return build(**values)

    def only(self, *names: str) -> Group:
        """The same object, offering only some of its options (the rest keep their defaults)."""
        return Group(self.build, tuple(n for n in self.names if n in names))

    def without(self, *names: str) -> Group:
        return Group(self.build, tuple(n for n in self.names if n not in names))


def _group(cls: type) -> Group:
    return Group(cls, tuple(f.name for f in fields(cls) if f.name in OPTIONS))


INPUT = Group(
    "kdecli.sources:InputOptions",
    ("q", "k", "v", "q_key", "k_key", "v_key", "layout", "n", "batch", "all_layers"),
)
RUN = Group(
    "kdecli.measure.config:RunConfig",
    (
        "seeds", "seed", "device", "dtype", "scale", "causal", "repeats", "warmup", "min_time",
        "budget_mode", "bound", "timing", "reference", "backward", "query_offset", "phase",
        "queries", "steps", "diagnostics",
    ),
)  # fmt: skip
OUTPUT = _group(OutputOptions)
SWEEP = _group(SweepOptions)


def shared_options(
    *, helps: dict[str, str] | None = None, **groups_and_defaults: Any
) -> Callable[[Callable], Callable]:
    """Decorator: each keyword naming a ``Group`` becomes one typed parameter of the command, its
    options added to the signature Typer reads; any other keyword overrides an option's default
    for this command (``repeats=5``), and ``helps`` an option's help."""
    groups = {k: g for k, g in groups_and_defaults.items() if isinstance(g, Group)}
    defaults = {k: v for k, v in groups_and_defaults.items() if not isinstance(v, Group)}
    helps = helps or {}
    unknown = set(defaults) - set(OPTIONS)
    if unknown:
        raise TypeError(f"no shared option named {', '.join(sorted(unknown))}")

    def decorate(command: Callable) -> Callable:
        # The groups' own annotations (``run: RunConfig``) are not evaluated: a command module
        # names those classes for type checkers only, without importing them.
        signature = inspect.signature(command)
        own = [
            _evaluated(p, command.__globals__)
            for name, p in signature.parameters.items()
            if name not in groups
        ]
        added = []
        for group in groups.values():
            for name in group.names:
                opt = OPTIONS[name]
                option = typer.Option(*opt.flags, help=helps.get(name, opt.help))
                added.append(
                    inspect.Parameter(
                        name,
                        inspect.Parameter.KEYWORD_ONLY,
                        default=defaults.get(name, opt.default),
                        annotation=Annotated[opt.type, option],
                    )
                )

        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for param, group in groups.items():
                kwargs[param] = group.make(**{name: kwargs.pop(name) for name in group.names})
            return command(*args, **kwargs)

        parameters = [*own, *added]
        wrapper.__signature__ = signature.replace(parameters=parameters)
        # Typer reads the annotations too (``get_type_hints``): the evaluated ones, not the
        # command's own strings, which name classes its module does not import.
        wrapper.__annotations__ = {
            p.name: p.annotation for p in parameters if p.annotation is not p.empty
        }
        return wrapper

    return decorate


def _evaluated(parameter: inspect.Parameter, namespace: dict[str, Any]) -> inspect.Parameter:
    """The parameter with its annotation evaluated (``from __future__ import annotations`` leaves
    a string), as Typer needs it."""
    if isinstance(parameter.annotation, str):
        return parameter.replace(annotation=eval(parameter.annotation, namespace))
    return parameter


# ---- per head (compare, approx, report) --------------------------------------------------------

PerHead = Annotated[
    bool,
    typer.Option(
        "--per-head",
        help="Under the table, each setting's worst heads (batch × head slices, over every layer) "
        "beside its mean, with their diagnostics where measured (the JSON keeps every head's "
        "figures in any case).",
    ),
]
EveryHead = Annotated[
    bool,
    typer.Option(
        "--every-head",
        help="With --target-error: every head (the worst, over every layer) must meet the "
        "target, not the mean over heads.",
    ),
]


def check_per_head(
    per_head: bool, every_head: bool, target_error: float | None, fmt: str
) -> str | None:
    """Refuse ``--every-head`` without a target; the note to print where the ``--per-head``
    table is not drawn (the machine formats), else None."""
    if every_head and target_error is None:
        raise UsageError(
            "--every-head says how --target-error judges a setting; got no --target-error.",
            hint="Add --target-error E: every head's error must then be at most E.",
        )
    if per_head and fmt not in ("table", "markdown"):
        kept = "keeps every head's figures (errors.*.per_slice)"
        where = f"the {fmt.upper()} {kept}" if fmt != "csv" else "the CSV has one row per record"
        return f"--per-head: the worst-heads table is drawn in the table and Markdown; {where}."
    return None
