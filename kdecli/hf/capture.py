"""``capture``: each layer's q, k, v and the model's own attention output o, for chunks of a text.

The text is tokenized once (no special tokens added) and its first K·N tokens are cut into K chunks
of N; each chunk runs through the model alone, so no padding ever enters a capture.  In every
captured layer the registered attention function (``kdecli.hf.interface``) records the query, key
and value the model passes it (after projections and RoPE; grouped-query keys and values repeated
to the query heads, the mapping kept in ``kv_head``) and returns the stock SDPA output unchanged,
which is recorded as ``o``: the model computes exactly what it computes without kdecli.

File layout (HDF5)::

    /            kdecli_capture=1, model, model_type, config_sha256, text, text_sha256,
                 tokens (N), chunks (K), layers, versions (JSON), dtype
    /layer{i}/   q (K, H, N, d), k (K, H, N, d), v (K, H, N, d_v), o (K, H, N, d_v), kv_head (H,)
                 attributes layer, scale (the model's `scaling`), causal, kv_heads

Arrays are stored in the working dtype (bfloat16, which HDF5 lacks, as float32: exact).  The file
is written as ``OUT.incomplete`` beside the target and renamed when complete; an error or Ctrl-C
removes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kdecli.devices import resolve_device, resolve_dtype
from kdecli.errors import RuntimeFailure, UsageError
from kdecli.files import check_writable
from kdecli.hf.interface import (
    NAME,
    AttentionCall,
    attention_function,
    not_routed,
    register,
    require_transformers,
    set_implementation,
    use_attention,
)
from kdecli.hf.models import (
    config_sha256,
    load_model,
    load_tokenizer,
    model_source,
    quiet_transformers,
)

FORMAT_VERSION = 1
Progress = Callable[[int, int, str], None]

# kwargs of the attention call that add terms softmax(s·QKᵀ)V does not have
_EXTRA_TERMS = ("position_bias", "softcap", "s_aux", "sinks")


@dataclass(frozen=True)
class CaptureSummary:
    """What a capture wrote: the file, its layers, K chunks of N tokens, seconds and bytes."""

    path: Path
    layers: list[int]
    chunks: int
    tokens: int
    seconds: float
    bytes: int


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


@dataclass
class Recorder:
    """A handler that keeps each captured layer's q, k, v (expanded to the query heads) and o."""

    layers: set[int]
    records: dict[int, tuple[AttentionCall, dict[str, torch.Tensor]]] = field(default_factory=dict)

    def handler(self, layer: int):
        return self if layer in self.layers else None

    def __call__(self, call: AttentionCall) -> torch.Tensor:
        check_plain(call)
        out = call.stock()
        key, value = call.expanded_kv()
        tensors = {"q": call.query, "k": key, "v": value, "o": out}
        self.records[call.layer] = (call, tensors)
        return out


def check_plain(call: AttentionCall) -> None:
    """Refuse what exact softmax attention (with the recorded scale and causal flag) cannot
    reproduce: extra score terms, cross-attention or a cache, a mask other than full or causal
    (padding, a sliding window narrower than the chunk)."""
    where = f"layer {call.layer}"
    extra = [name for name in _EXTRA_TERMS if call.kwargs.get(name) is not None]
    if extra:
        raise UsageError(
            f"{where} adds {', '.join(extra)} to its attention scores; kdecli captures plain "
            "softmax(s·QKᵀ)V only."
        )
    n_q, n_k = call.query.shape[-2], call.key.shape[-2]
    if n_q != n_k:
        raise UsageError(
            f"{where}: {n_q} queries against {n_k} keys (cross-attention or a cache); kdecli "
            "captures self-attention only."
        )
    if call.mask is None:
        return
    mask = call.mask
    if mask.dtype == torch.bool:
        allowed = mask
    else:
        allowed = mask == 0
        if not (allowed | (mask <= torch.finfo(mask.dtype).min / 2)).all():
            raise UsageError(f"{where}: the attention mask adds a bias to the scores.")
    expected = torch.ones(n_q, n_k, dtype=torch.bool, device=mask.device)
    if call.causal:
        expected = expected.tril()
    if not torch.equal(allowed.expand(*allowed.shape[:-2], n_q, n_k), expected.expand_as(allowed)):
        kind = "causal" if call.causal else "full"
        raise UsageError(
            f"{where}: the attention mask is not the plain {kind} pattern (padding, or a sliding "
            f"window narrower than {n_q} tokens); use a smaller --tokens."
        )


def _storage_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float16, torch.float32, torch.float64) else torch.float32


def _read_text(text_path: Path) -> bytes:
    if not text_path.is_file():
        raise UsageError(f"--text {text_path}: no such file.")
    return text_path.read_bytes()


def _n_layers(config) -> int:
    text_config = config.get_text_config()
    n = getattr(text_config, "num_hidden_layers", None)
    if not isinstance(n, int):
        raise UsageError(f"model type `{config.model_type}`: its config gives no layer count.")
    return n


def _max_positions(config) -> int | None:
    n = getattr(config.get_text_config(), "max_position_embeddings", None)
    return n if isinstance(n, int) and n > 0 else None


def capture(
    model_path: str | Path,
    text_path: str | Path,
    *,
    tokens: int,
    chunks: int,
    layers: str | Sequence[int] | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "auto",
    output: str | Path,
    progress: Progress | None = None,
) -> CaptureSummary:
    """Capture q, k, v and o of ``layers`` (default all) for ``chunks`` chunks of ``tokens`` tokens
    of the text, into the HDF5 file ``output`` (layout in the module doc).  ``dtype`` is the
    working precision (default float32).  Every bad input raises ``UsageError`` before the file is
    opened; a failure or interrupt during the run leaves no file."""
    started = time.perf_counter()
    output, text_path = Path(output), Path(text_path)
    for name, value in (("tokens", tokens), ("chunks", chunks)):
        if not isinstance(value, int) or value < 1:
            raise UsageError(f"--{name} must be a positive integer; got {value!r}.")
    check_writable(output, f"--output {output}")
    src = model_source(model_path)
    text_bytes = _read_text(text_path)
    try:
        text = text_bytes.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"--text {text_path}: not UTF-8 text ({exc.reason}).") from None
    transformers = require_transformers()
    work_dtype = (
        dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype)
    ) or torch.float32
    work_device = resolve_device(device) if isinstance(device, str) else device

    model = load_model(src, dtype=work_dtype, device=work_device)
    register()
    set_implementation(model, NAME)  # refuses a model that does not route through the interface
    config = model.config
    n_layers = _n_layers(config)
    chosen = parse_layers(layers, n_layers)
    positions = _max_positions(config)
    if positions is not None and tokens > positions:
        raise UsageError(
            f"--tokens {tokens}: the model takes at most {positions} positions "
            f"(max_position_embeddings)."
        )
    ids = _token_ids(load_tokenizer(src), text)
    vocab = getattr(config.get_text_config(), "vocab_size", None)
    if ids and isinstance(vocab, int) and max(ids) >= vocab:
        raise UsageError(
            f"the tokenizer beside {src.name} makes token id {max(ids)}, but the model's "
            f"vocabulary has {vocab} entries: they do not belong together."
        )
    if len(ids) < tokens * chunks:
        raise UsageError(
            f"--text {text_path.name} is {len(ids)} tokens long for this model's tokenizer; "
            f"--chunks {chunks} × --tokens {tokens} needs {tokens * chunks}.",
            hint="Give a longer text, or fewer or shorter chunks.",
        )
    batches = torch.tensor(ids[: tokens * chunks], dtype=torch.long).view(chunks, 1, tokens)

    import h5py

    recorder = Recorder(set(chosen))
    function = attention_function(recorder.handler)
    store = _storage_dtype(work_dtype)
    partial = output.with_name(output.name + ".incomplete")
    try:
        with use_attention(model, function), h5py.File(partial, "w") as f:
            f.attrs.update(
                {
                    "kdecli_capture": FORMAT_VERSION,
                    "model": src.name,
                    "model_type": str(config.model_type),
                    "config_sha256": config_sha256(src, model),
                    "text": text_path.name,
                    "text_sha256": hashlib.sha256(text_bytes).hexdigest(),
                    "tokens": tokens,
                    "chunks": chunks,
                    "layers": np.asarray(chosen, dtype=np.int64),
                    "versions": json.dumps(_versions(transformers)),
                    "dtype": str(work_dtype).removeprefix("torch."),
                }
            )
            for index in range(chunks):
                if progress is not None:
                    progress(index, chunks, f"capture chunk {index + 1}/{chunks}")
                recorder.records.clear()
                function.calls.clear()
                with torch.inference_mode(), quiet_transformers():
                    model(input_ids=batches[index].to(work_device))
                _check_calls(model, function.calls, chosen)
                for layer in chosen:
                    _write_layer(f, layer, index, chunks, *recorder.records[layer], store)
            if progress is not None:
                progress(chunks, chunks, "capture")
        os.replace(partial, output)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return CaptureSummary(
        path=output,
        layers=chosen,
        chunks=chunks,
        tokens=tokens,
        seconds=time.perf_counter() - started,
        bytes=output.stat().st_size,
    )


def _token_ids(tokenizer, text: str) -> list[int]:
    with quiet_transformers():  # "sequence longer than the model's maximum": we cut it ourselves
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return list(ids)


def _versions(transformers) -> dict[str, str]:
    import kdecli

    return {
        "kdecli": kdecli.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def _check_calls(model, calls: dict[int, int], chosen: list[int]) -> None:
    if not calls:
        raise not_routed(model, "no layer called the registered attention function")
    missing = [i for i in chosen if calls.get(i, 0) == 0]
    twice = [i for i in chosen if calls.get(i, 0) > 1]
    if missing:
        raise UsageError(
            f"layers {', '.join(map(str, missing))} never called the registered attention "
            "function; this architecture routes only some of its attention through transformers' "
            "AttentionInterface."
        )
    if twice:
        raise UsageError(
            f"layers {', '.join(map(str, twice))} called attention more than once per forward "
            "(cross-attention?); kdecli captures one self-attention per layer."
        )


def _write_layer(f, layer: int, index: int, chunks: int, call, tensors, store) -> None:
    name = f"layer{layer}"
    if name not in f:
        group = f.create_group(name)
        for key, tensor in tensors.items():
            _, h, n, d = tensor.shape
            group.create_dataset(key, shape=(chunks, h, n, d), dtype=_numpy_dtype(store))
        group.create_dataset("kv_head", data=call.kv_head().numpy().astype(np.int64))
        group.attrs.update(
            {
                "layer": layer,
                "scale": call.scale,
                "causal": call.causal,
                "kv_heads": call.key.shape[1],
            }
        )
    group = f[name]
    if group.attrs["scale"] != call.scale or bool(group.attrs["causal"]) != call.causal:
        raise RuntimeFailure(f"layer {layer}: its scale or causal flag changed between chunks.")
    for key, tensor in tensors.items():
        group[key][index] = tensor[0].detach().to("cpu", store).numpy()


def _numpy_dtype(dtype: torch.dtype):
    return {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}[dtype]
