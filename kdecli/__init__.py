"""kdecli: how far is an attention approximation from exact softmax attention, and how fast is it?

Library use::

    import kdecli
    qkv = kdecli.load_input("sample_data/glove_sample.npz")
    report = kdecli.compare(qkv, methods=["kdeformer", "performer"], budgets=[64, 256], seeds=3)
    out = kdecli.attention(q, k, v, method="kdeformer", budget=256)   # drop-in for SDPA
"""

__version__ = "0.1.0"

import os as _os

# Large CPU tensors (logits of n × block, n × samples) are allocated afresh on every call, and
# page-faulting them in 4 KiB pages costs as much as the arithmetic: asking PyTorch for transparent
# huge pages makes kdeformer ~1.5× faster on the CPU and leaves exact attention unchanged.  PyTorch
# reads this at its first large allocation; a value the user set is kept.
_os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from kdecli.api import attention  # noqa: E402
from kdecli.inputs import QKV, load_input  # noqa: E402
from kdecli.runner import RunReport, approx, compare  # noqa: E402

__all__ = ["QKV", "RunReport", "approx", "attention", "compare", "load_input", "__version__"]
