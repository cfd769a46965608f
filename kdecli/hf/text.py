"""A text as a model's tokens: read once, tokenized once, cut into K equal chunks of N tokens.

Shared by ``capture`` and ``drift``: the text is tokenized without special tokens and its first
K·N tokens are cut into K chunks of N, each run as its own sequence, so no padding ever enters a
run (a padded batch would need a mask that no approximation method takes).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from kdecli.errors import UsageError
from kdecli.hf.models import quiet_transformers


def check_counts(tokens: int, chunks: int) -> None:
    for name, value in (("tokens", tokens), ("chunks", chunks)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"--{name} must be a positive integer; got {value!r}.")


def read_text(text_path: Path) -> tuple[bytes, str]:
    """The file's bytes (for its digest) and its UTF-8 text."""
    if not text_path.is_file():
        raise UsageError(f"--text {text_path}: no such file.")
    data = text_path.read_bytes()
    try:
        return data, data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"--text {text_path}: not UTF-8 text ({exc.reason}).") from None


def n_layers(config) -> int:
    """The number of transformer layers the config declares."""
    n = getattr(config.get_text_config(), "num_hidden_layers", None)
    if not isinstance(n, int):
        raise UsageError(f"model type `{config.model_type}`: its config gives no layer count.")
    return n


def check_positions(config, tokens: int) -> None:
    positions = getattr(config.get_text_config(), "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0 and tokens > positions:
        raise UsageError(
            f"--tokens {tokens}: the model takes at most {positions} positions "
            f"(max_position_embeddings)."
        )


def chunk_ids(
    tokenizer, text: str, config, *, tokens: int, chunks: int, model_name: str, text_name: str
) -> torch.Tensor:
    """The first K·N token ids of ``text`` as a (K, N) tensor, refusing a text too short for them
    or a tokenizer whose ids the model's vocabulary does not hold."""
    with quiet_transformers():  # "sequence longer than the model's maximum": we cut it ourselves
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    vocab = getattr(config.get_text_config(), "vocab_size", None)
    if ids and isinstance(vocab, int) and max(ids) >= vocab:
        raise UsageError(
            f"the tokenizer beside {model_name} makes token id {max(ids)}, but the model's "
            f"vocabulary has {vocab} entries: they do not belong together."
        )
    if len(ids) < tokens * chunks:
        raise UsageError(
            f"--text {text_name} is {len(ids)} tokens long for this model's tokenizer; "
            f"--chunks {chunks} × --tokens {tokens} needs {tokens * chunks}.",
            hint="Give a longer text, or fewer or shorter chunks.",
        )
    return torch.tensor(ids[: tokens * chunks], dtype=torch.long).view(chunks, tokens)


def parse_layers(spec: str | Sequence[int] | None, n_layers: int) -> list[int]:
    """``"0,3-5"`` (or a list of ints, or None for all) -> sorted layer indices in [0, n_layers)."""
    if spec is None:
        return list(range(n_layers))
    if isinstance(spec, str):
        layers: set[int] = set()
        for item in (part.strip() for part in spec.split(",")):
            first, dash, last = item.partition("-")
            try:
                lo = int(first)
                hi = int(last) if dash else lo
            except ValueError:
                raise UsageError(
                    f"--layers must look like 0,3-5 (indices and ranges); got {spec!r}."
                ) from None
            if hi < lo:
                raise UsageError(f"--layers: range {item} runs backwards; got {spec!r}.")
            layers.update(range(lo, hi + 1))
    else:
        layers = {int(i) for i in spec}
    if not layers:
        raise UsageError("--layers is empty.")
    bad = sorted(i for i in layers if not 0 <= i < n_layers)
    if bad:
        raise UsageError(
            f"--layers {', '.join(map(str, bad))}: out of range; the model has {n_layers} "
            f"layers (0–{n_layers - 1})."
        )
    return sorted(layers)
