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
is written as ``OUT.PID@HOST.incomplete`` beside the target (two captures to one target never share
it) and renamed when complete; an error or Ctrl-C removes it, and the next capture to the target
removes one that a killed capture left (``kdecli.files.remove_stale``).  A target that is no regular
file (a device) is refused: renaming over it would replace it.
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
from kdecli.files import check_writable, incomplete_path, remove_stale, require_regular
from kdecli.hf.interface import (
    NAME,
    AttentionCall,
    attention_function,
    extra_terms,
    mask_problem,
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
from kdecli.hf.text import (
    check_counts,
    check_positions,
    chunk_ids,
    n_layers,
    parse_layers,
    read_text,
)

FORMAT_VERSION = 1
Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class CaptureSummary:
    """What a capture wrote: the file, its layers, K chunks of N tokens, seconds and bytes."""

    path: Path
    layers: list[int]
    chunks: int
    tokens: int
    seconds: float
    bytes: int


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
    extra = extra_terms(call)
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
    problem = mask_problem(call.mask, n_q, n_k, call.positions)
    if problem is not None:
        raise UsageError(f"{where}: the attention mask {problem}; use a smaller --tokens.")


def _storage_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float16, torch.float32, torch.float64) else torch.float32


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
    check_counts(tokens, chunks)
    check_writable(output, f"--output {output}")
    require_regular(output, f"--output {output}")
    src = model_source(model_path)
    text_bytes, text = read_text(text_path)
    transformers = require_transformers()
    work_dtype = (
        dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype)
    ) or torch.float32
    work_device = resolve_device(device) if isinstance(device, str) else device

    model = load_model(src, dtype=work_dtype, device=work_device)
    register()
    set_implementation(model, NAME)  # refuses a model that does not route through the interface
    config = model.config
    chosen = parse_layers(layers, n_layers(config))
    check_positions(config, tokens)
    ids = chunk_ids(
        load_tokenizer(src), text, config, tokens=tokens, chunks=chunks,
        model_name=src.name, text_name=text_path.name,
    )  # fmt: skip
    batches = ids.view(chunks, 1, tokens)

    import h5py

    recorder = Recorder(set(chosen))
    function = attention_function(recorder.handler)
    store = _storage_dtype(work_dtype)
    remove_stale(output)
    partial = incomplete_path(output)
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
