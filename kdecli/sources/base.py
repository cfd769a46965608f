"""What every input source shares: the options it may read, the record it returns, its base class.

A source turns one INPUT form into a ``Loaded`` record: Q, K, V as it read them (numpy arrays or
tensors of 2, 3 or 4 dimensions), its name, and the softmax scale the input carries, if any.
``load_input`` validates every ``Loaded`` with the same function and crops it to ``--n``, so a
source never checks shapes, dtypes or finiteness itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

LAYOUTS = ("bhnd", "bnhd")


@dataclass(frozen=True)
class InputOptions:
    """The options that shape how an INPUT is read; each source takes the ones it uses.

    ``q``/``k``/``v``: three .npy files instead of INPUT; ``q_key``/``k_key``/``v_key``: the names
    of the arrays in a file; ``layout``: how 4-d arrays are laid out (``bhnd`` or ``bnhd``); ``n``:
    keep the first n queries and keys (every source); ``batch``: the GloVe protocol's batch size;
    ``all_layers``: read every layer of a capture (``load_inputs``).
    """

    q: str | None = None
    k: str | None = None
    v: str | None = None
    q_key: str | None = None
    k_key: str | None = None
    v_key: str | None = None
    layout: str = "bhnd"
    n: int | None = None
    batch: int | None = None
    all_layers: bool = False

    @property
    def keys(self) -> dict[str, str | None]:
        """The array names asked for, by role: {"q": q_key, "k": k_key, "v": v_key}."""
        return {"q": self.q_key, "k": self.k_key, "v": self.v_key}


@dataclass(frozen=True)
class Loaded:
    """What a source read, before validation.

    ``name`` is what reports print (``glove:6B.50d``; see ``display_path``); ``where`` is what error
    messages name, the input as the person gave it (default: ``name``).  ``layout`` says how 4-d
    arrays are laid out; ``scale`` is a stored softmax temperature (checked to be one positive
    number) or None; ``causal`` a stored causal flag or None; ``layer`` the model layer of a capture.
    """

    q: Any
    k: Any
    v: Any
    name: str
    where: str | None = None
    layout: str = "bhnd"
    scale: Any = None
    notes: dict[str, Any] | None = None
    causal: Any = None
    layer: int | None = None


KINDS = ("prefix", "file", "options")


class InputSource:
    """One INPUT form.  Subclasses set the metadata and implement ``read``; ``kind`` says how
    ``load_input`` picks the source and what ``read`` gets as ``spec``:

    - ``prefix``: INPUT is ``name:SPEC``; ``read`` gets SPEC, the text after the first colon.
    - ``file``: INPUT is a path ending in one of ``suffixes``; ``read`` gets INPUT as given.
    - ``options``: there is no INPUT, the options name the files (``--q/--k/--v``); ``spec`` is "".
    """

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "prefix"
    summary: ClassVar[str] = ""  # one line: what the source reads
    form: ClassVar[str] = ""  # how INPUT names it, for help texts: "glove:PATH|NAME"
    suffixes: ClassVar[tuple[str, ...]] = ()  # file formats: the suffixes they claim, lower case
    locations: ClassVar[bool] = (
        False  # file formats: FILE:LOCATION reads inside the file (HDF5 groups)
    )

    def read(self, spec: str, options: InputOptions) -> Loaded:
        raise NotImplementedError
