"""Models and tokenizers from local files: a ``save_pretrained`` folder or a ``.gguf`` file.

Nothing is fetched from a hub: transformers runs with ``local_files_only``.  A folder needs its
``config.json`` and weights; its tokenizer is read from the same folder.  A ``.gguf`` file carries
its own config and tokenizer, which transformers converts (with the ``gguf`` package) and
dequantizes to float.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from kdecli.errors import UsageError
from kdecli.hf.interface import INSTALL_HINT, require_transformers

# Config keys that say how the model was loaded, not what it is: left out of the GGUF digest.
_VOLATILE = (
    "_attn_implementation",
    "_attn_implementation_internal",
    "transformers_version",
    "dtype",
)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


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


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' own progress bars and notices off for the block (kdecli shows its own)."""
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


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
        model_type = transformers.AutoConfig.from_pretrained(
            src.folder, local_files_only=True, **src.kwargs()
        ).model_type
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
    with quiet_transformers(), hush:
        try:
            model = auto_class.from_pretrained(
                src.folder,
                dtype=dtype,
                local_files_only=True,
                **src.kwargs(),
            )
        except (ValueError, KeyError, OSError) as exc:
            raise UsageError(f"model {src.path}: transformers cannot load it: {exc}") from None
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
                src.folder, local_files_only=True, **src.kwargs()
            )
        except (ValueError, KeyError, OSError, TypeError) as exc:
            raise UsageError(
                f"model {src.path}: no usable tokenizer beside it ({exc}).",
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
