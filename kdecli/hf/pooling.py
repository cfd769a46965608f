"""How an embedding model turns token states into one vector: its own pooling, else the mean.

A sentence-transformers folder says it in ``modules.json``: a ``Pooling`` module whose
``config.json`` picks the mode (``pooling_mode_mean_tokens``, ``…_cls_token``, ``…_max_tokens``,
``…_mean_sqrt_len_tokens``, ``…_weightedmean_tokens``, ``…_lasttoken``), and optionally a
``Normalize`` module (e = e/‖e‖; it has no files of its own, so its folder may be absent, as in
MiniLM-L6's).  Any other folder is mean-pooled.  Chunks are never padded, so every token counts.
Normalising does not change a cosine; it is applied anyway, so the vectors are the model's own.
(``cls`` is the first token of the chunk: kdecli's chunks carry no special tokens.)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

_MODES = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


@dataclass(frozen=True)
class Pooling:
    """Pooling modes (their vectors concatenated, as sentence-transformers does) and normalise."""

    modes: tuple[str, ...] = ("mean",)
    normalize: bool = False

    @property
    def label(self) -> str:
        return "+".join(self.modes) + ("+normalize" if self.normalize else "")

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """(b, n, d) token states -> (b, d·modes) embeddings."""
        n = hidden.shape[-2]
        parts = []
        for mode in self.modes:
            if mode == "cls":
                parts.append(hidden[:, 0])
            elif mode == "max":
                parts.append(hidden.amax(dim=-2))
            elif mode == "lasttoken":
                parts.append(hidden[:, -1])
            elif mode == "weightedmean":  # token t weighs t+1 (sentence-transformers' rule)
                w = torch.arange(1, n + 1, device=hidden.device, dtype=hidden.dtype)
                parts.append((hidden * w[:, None]).sum(-2) / w.sum())
            elif mode == "mean_sqrt_len":
                parts.append(hidden.sum(-2) / n**0.5)
            else:
                parts.append(hidden.mean(-2))
        out = torch.cat(parts, dim=-1)
        return torch.nn.functional.normalize(out, dim=-1) if self.normalize else out


def pooling_of(folder: Path) -> Pooling:
    """The folder's sentence-transformers pooling, or plain mean pooling without one."""
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return Pooling()
    try:
        modules = json.loads(modules_file.read_text("utf-8"))
    except (OSError, ValueError):
        return Pooling()
    types = {str(m.get("type", "")).rsplit(".", 1)[-1]: m for m in modules if isinstance(m, dict)}
    modes: tuple[str, ...] = ("mean",)
    if "Pooling" in types:
        config_file = folder / str(types["Pooling"].get("path", "")) / "config.json"
        try:
            config = json.loads(config_file.read_text("utf-8"))
        except (OSError, ValueError):
            config = {}
        chosen = tuple(mode for key, mode in _MODES.items() if config.get(key))
        modes = chosen or modes
    return Pooling(modes, normalize="Normalize" in types)
