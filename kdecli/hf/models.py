"""Models and tokenizers from local files: a ``save_pretrained`` folder or a ``.gguf`` file.

Nothing is fetched from a hub: transformers runs with ``local_files_only``.  A folder needs its
``config.json`` and weights; its tokenizer is read from the same folder.  A ``.gguf`` file carries
its own config and tokenizer, which transformers converts (with the ``gguf`` package) and
dequantizes to float.

No code from a model folder ever runs: transformers runs with ``trust_remote_code=False`` and with
no standard input to read an answer from (it never prompts), a config or tokenizer config that
names the folder's own Python (``auto_map``) is refused, and so are weights stored as pickles
(``pytorch_model.bin`` and the like, which run code when loaded): a folder's weights are read from
safetensors only.  A file transformers cannot read ends in one line naming it (``UsageError``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from kdecli.errors import KdecliError, UsageError, first_line, is_out_of_memory
from kdecli.hf.interface import INSTALL_HINT, require_transformers
from kdecli.render.safe import printable

# Config keys that say how the model was loaded, not what it is: left out of the GGUF digest.
_VOLATILE = (
    "_attn_implementation",
    "_attn_implementation_internal",
    "transformers_version",
    "dtype",
)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# Weights stored with pickle: loading one can run any code it holds.
_PICKLED = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle")
# Every from_pretrained call: this folder only, and none of its Python.
_LOCAL_ONLY = {"local_files_only": True, "trust_remote_code": False}


@dataclass(frozen=True)
class ModelSource:
    """Where a model lives: ``folder`` (and ``gguf_file`` inside it for a .gguf model)."""

    path: Path
    folder: Path
    gguf_file: str | None

    @property
    def name(self) -> str:
        """The folder or file name, never a machine path."""
        return self.path.resolve().name

    def kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def model_source(path: str | Path) -> ModelSource:
    """Check that ``path`` is a model folder (with config.json) or a .gguf file."""
    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(
                f"model folder {path} has no config.json.",
                hint="Give a folder as `save_pretrained` writes it, or a .gguf file.",
            )
        _check_config(path, "config.json", required=True)
        _check_config(path, "tokenizer_config.json", required=False)
        _check_weights(path)
        return ModelSource(path, path, None)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return ModelSource(path, path.parent if str(path.parent) else Path("."), path.name)
    if path.exists():
        raise UsageError(f"model {path}: not a folder or a .gguf file.")
    raise UsageError(
        f"model {path} does not exist.",
        hint="Give a local folder (config.json and safetensors) or a .gguf file; "
        "nothing is downloaded.",
    )


def _check_config(folder: Path, name: str, *, required: bool) -> None:
    """A JSON object that names no code of the folder's own (``auto_map``)."""
    path = folder / name
    if not required and not path.is_file():
        return
    try:
        config = json.loads(path.read_text("utf-8"))
    except (UnicodeDecodeError, RecursionError):
        config = None
    except json.JSONDecodeError as exc:
        raise UsageError(
            f"model folder {folder}: {name} is not JSON (line {exc.lineno}: {exc.msg})."
        ) from None
    except OSError as exc:
        raise UsageError(
            f"model folder {folder}: {name} cannot be read ({exc.strerror})."
        ) from None
    if not isinstance(config, dict):
        raise UsageError(f"model folder {folder}: {name} is not a JSON object of settings.")
    if "auto_map" in config:
        raise UsageError(
            f"model folder {folder}: its {name} names Python code of its own (auto_map); "
            "kdecli never runs code from a model folder.",
            hint="Use a model whose architecture transformers itself provides.",
        )


def _check_weights(folder: Path) -> None:
    """Safetensors weights, not pickles."""
    if any(folder.glob("*.safetensors")):
        return
    pickled = sorted(p.name for pattern in _PICKLED for p in folder.glob(pattern))
    if pickled:
        raise UsageError(
            f"model folder {folder}: its weights are pickles ({', '.join(pickled[:3])}), which "
            "can run code when loaded; kdecli reads safetensors only.",
            hint="Convert them once where you trust them: load the model and "
            "`save_pretrained(folder)` (it writes model.safetensors).",
        )


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' own progress bars and notices off for the block (kdecli shows its own), and
    no standard input: nothing in it can prompt and wait for an answer."""
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    stdin, sys.stdin = sys.stdin, io.StringIO()
    try:
        yield
    finally:
        sys.stdin = stdin
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def _loading(src: ModelSource, what: str, load: Callable[[], object]):
    """``load()``, a failure of which (a broken or cut file: transformers and the gguf reader
    raise many kinds) ends in one line naming the model."""
    try:
        return load()
    except KdecliError:
        raise
    except Exception as exc:
        if is_out_of_memory(exc):
            raise
        raise UsageError(
            f"model {src.path}: transformers cannot load {what}: {printable(first_line(exc))}"
        ) from None


def is_causal_lm(source: str | Path | ModelSource) -> bool:
    """Whether the folder holds a causal language model with its head (its config's
    ``architectures`` says ``…ForCausalLM`` or ``…LMHeadModel``); a .gguf file, which records no
    architecture class, when its model type has a causal-LM class and no masked-LM one."""
    transformers = require_transformers()
    src = source if isinstance(source, ModelSource) else model_source(source)
    if not src.gguf_file:
        config = json.loads((src.folder / "config.json").read_text("utf-8"))
        names = config.get("architectures") or []
        return any(n.endswith(("ForCausalLM", "LMHeadModel")) for n in names if isinstance(n, str))
    from transformers.models.auto import modeling_auto as auto

    with quiet_transformers():
        model_type = _loading(
            src,
            "its config",
            lambda: (
                transformers.AutoConfig.from_pretrained(
                    src.folder, **_LOCAL_ONLY, **src.kwargs()
                ).model_type
            ),
        )
    return (
        model_type in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        and model_type not in auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES
    )


def load_model(
    source: str | Path | ModelSource,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    causal_lm: bool = False,
) -> torch.nn.Module:
    """The base model (no task head) in eval mode, with transformers' default attention; with
    ``causal_lm`` the model with its language-model head (its output has ``logits``)."""
    transformers = require_transformers()
    src = source if isinstance(source, ModelSource) else model_source(source)
    auto_class = transformers.AutoModelForCausalLM if causal_lm else transformers.AutoModel
    if src.gguf_file:
        _require_gguf()
    # a .gguf load draws its own tqdm bar, which transformers' switch does not reach
    hush = contextlib.redirect_stderr(io.StringIO()) if src.gguf_file else contextlib.nullcontext()
    # a folder's weights from safetensors only (its pickles were refused by model_source)
    weights = src.kwargs() if src.gguf_file else {"use_safetensors": True}
    with quiet_transformers(), hush:
        model = _loading(
            src,
            "it",
            lambda: auto_class.from_pretrained(src.folder, dtype=dtype, **_LOCAL_ONLY, **weights),
        )
    return model.to(device).eval()


def load_tokenizer(source: str | Path | ModelSource):
    """The tokenizer saved beside the model (or inside the .gguf file)."""
    transformers = require_transformers()
    src = source if isinstance(source, ModelSource) else model_source(source)
    if not src.gguf_file and not any((src.folder / name).is_file() for name in _TOKENIZER_FILES):
        # transformers 5 would build an empty tokenizer from the config alone
        raise UsageError(
            f"model folder {src.path} has no tokenizer ({' or '.join(_TOKENIZER_FILES)}).",
            hint="Save the tokenizer into the model folder (`tokenizer.save_pretrained`).",
        )
    with quiet_transformers():
        try:
            return transformers.AutoTokenizer.from_pretrained(
                src.folder, **_LOCAL_ONLY, **src.kwargs()
            )
        except Exception as exc:  # a broken tokenizer file: many kinds, one line
            if is_out_of_memory(exc):
                raise
            raise UsageError(
                f"model {src.path}: no usable tokenizer beside it ({printable(first_line(exc))}).",
                hint="Save the tokenizer into the model folder (`tokenizer.save_pretrained`).",
            ) from None


def config_sha256(src: ModelSource, model: torch.nn.Module) -> str:
    """A folder's config.json as stored; for a .gguf file, the config transformers built from it
    (canonical JSON, without the keys that only say how it was loaded)."""
    if not src.gguf_file:
        return hashlib.sha256((src.folder / "config.json").read_bytes()).hexdigest()
    config = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE}
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _require_gguf() -> None:
    """transformers reads .gguf files with the `gguf` package, and (5.x) refuses to without
    `accelerate` too."""
    import importlib.util

    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(
            f"reading .gguf files needs {' and '.join(missing)}, not installed.",
            hint=f"Run `{INSTALL_HINT}` (the extra holds both).",
        )
