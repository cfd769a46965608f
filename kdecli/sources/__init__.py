"""Input sources: every INPUT form, each a small module registered by name, read into one validated
``QKV`` in the (batch, heads, n, d) layout.

    from kdecli.sources import InputOptions, load_input
    qkv = load_input("sample:glove")
    qkv = load_input("acts.h5:/layer3/attn", InputOptions(q_key="Q", k_key="K", v_key="V"), n=512)

The forms: ``file.npz``, ``file.h5[:/group]``, ``file.pt`` and three ``.npy`` files (``--q/--k/--v``)
in ``array_files``; ``glove:PATH|NAME`` (the KDEformer paper's protocol); ``synthetic:n=…,d=…``;
``sample:NAME`` (data shipped with kdecli).  ``load_input`` picks the source, which reads what it
needs from ``InputOptions``; every source's result goes through the same validation
(``validate.validated``) and ``--n`` crop.  A new source is one module with a ``@register``-ed
``InputSource`` subclass and one import line below.  ``QKV.source`` names the input for reports,
by the rule of ``names.display_path`` for files.
"""

from kdecli.sources.base import LAYOUTS, InputOptions, InputSource, Loaded
from kdecli.sources.names import display_path
from kdecli.sources.registry import get_source, load_input, load_inputs, register, source_names

# Registration order is the order sources are listed and tried.
# isort: off
from kdecli.sources import array_files as _array_files  # noqa: F401  (npz, hdf5, pt, npy)
from kdecli.sources import glove as _glove  # noqa: F401
from kdecli.sources import synthetic as _synthetic  # noqa: F401
from kdecli.sources import sample as _sample  # noqa: F401
# isort: on

__all__ = [
    "LAYOUTS",
    "InputOptions",
    "InputSource",
    "Loaded",
    "display_path",
    "get_source",
    "load_input",
    "load_inputs",
    "register",
    "source_names",
]
