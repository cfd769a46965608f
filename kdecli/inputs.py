"""Compatibility: the names ``kdecli.inputs`` has always offered, now defined in their own modules.

``QKV`` lives in ``kdecli.qkv``, device and dtype names in ``kdecli.devices``, and input loading
in ``kdecli.sources`` (one module per INPUT form, registered by name).
"""

from kdecli.devices import DTYPES, resolve_device, resolve_dtype
from kdecli.qkv import QKV
from kdecli.sources import LAYOUTS, InputOptions, load_input
from kdecli.sources.synthetic import synthetic

__all__ = [
    "DTYPES",
    "LAYOUTS",
    "QKV",
    "InputOptions",
    "load_input",
    "resolve_device",
    "resolve_dtype",
    "synthetic",
]
