"""Records whose dict form is derived from their fields: one mechanism writes and reads them all.

A record is a dataclass that subclasses ``Record``.  Its JSON object has one entry per field, in
field order (or in the class's ``json_order``), under the field's name, after the class's constant
``json_head`` entries (a document's kind and schema version).  The field's type says how its value
is written and how it is checked when read:

    str, int, float, bool        the JSON scalar (an integer is a float's value too; a bool is
                                 neither); a float reads back as a float
    X | None                     X or null; absent or null reads as None
    a Record                     its object
    tuple[X, ...], list[X]       a list of X
    dict[str, X]                 an object whose values are X
    dict, dict[str, Any], Any    any JSON object (or value), taken as it is
    a class with its own to_dict() and from_dict(dict): that form (``kdecli.sweeps.grid``)

``json_field(...)`` says what differs for one field: another JSON name (a dotted ``group.key``
puts the value in a nested object, written as null when every value in it is None), when to leave
it out (``omit``: "none", "default" or "falsy"), the value an absent entry reads as (``absent``),
older names it was written under (``legacy``), how to fill it in from the rest of an old document
(``migrate``), the values allowed (``choices``), that a document must hold it though the
constructor has a default (``required``), that it is derived, never written (``skip``), or a
writer of its own (``write``).  A name in ``json_order`` that is not a field is a property:
written, never read.

Reading is strict and says where: every complaint names the file and the field's path
(``results[3].errors.rel_spectral.mean``), what was expected and what was found.  An absent or
null entry reads as what ``migrate`` finds, else ``absent``, else None for an ``X | None`` field,
else the field's default; a field with none of those (or ``required``) must be there.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from kdecli.errors import UsageError


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()  # "no value": an absent entry, or a migration that found none
OMIT_RULES = ("none", "default", "falsy")
R = TypeVar("R", bound="Record")


# Every document names its kind and schema the same way: ``"kind": "compare"`` (or scale, drift,
# inspect) and ``"schema_version": N``, first.  Documents of kdecli 0.7 and before named the kind
# ``"document"`` (scale, drift) or ``"report"`` (inspect), and not at all (compare).
KIND = "kind"
LEGACY_KIND_KEYS = ("document", "report")


def document_kind(doc: Any) -> Any:
    """A parsed document's kind as it names it (``kind``, else an older document's name for it);
    None when it names none (a compare document before 0.8, or no kdecli document)."""
    if not isinstance(doc, dict):
        return None
    for key in (KIND, *LEGACY_KIND_KEYS):
        if doc.get(key) is not None:
            return doc[key]
    return None


class SchemaError(UsageError):
    """A file that is not the kdecli document it should be; the message names the file and the
    field at fault."""


def clean(value: Any) -> Any:
    """NaN and ±inf become None, recursively, so what is written is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


# ---- where a value sits, and complaints that name it ---------------------------------------------


class Place:
    """A value's place in a document: the file (``where``), the path to it, the hint a complaint
    carries, and what the enclosing records pass down (``context``: a header's environment).

    The path is spelled out only when a complaint needs it: a document holds many values and
    nearly all of them are fine."""

    __slots__ = ("where", "hint", "context", "_parent", "_step")

    def __init__(
        self,
        where: str,
        path: str = "",
        hint: str | None = None,
        context: dict[str, Any] | None = None,
    ):
        self.where, self.hint = where, hint
        self.context = {} if context is None else context
        self._parent, self._step = None, path

    def _child(self, step: str) -> Place:
        child = Place.__new__(Place)
        child.where, child.hint, child.context = self.where, self.hint, self.context
        child._parent, child._step = self, step
        return child

    @property
    def path(self) -> str:
        if self._parent is None:
            return self._step
        parent = self._parent.path
        if self._step.startswith("["):
            return parent + self._step
        return f"{parent}.{self._step}" if parent else self._step

    def at(self, key: str) -> Place:
        return self._child(key)

    def item(self, index: int) -> Place:
        return self._child(f"[{index}]")

    def error(self, problem: str, hint: Any = MISSING) -> SchemaError:
        """``where: `path` problem.`` (``where: the document problem.`` at the top)."""
        path = self.path
        subject = f"`{path}`" if path else "the document"
        return SchemaError(
            f"{self.where}: {subject} {problem}.", hint=self.hint if hint is MISSING else hint
        )

    def expected(self, what: str, value: Any) -> SchemaError:
        return self.error(f"must be {what}; got {kind(value)}")


def kind(value: Any) -> str:
    """How a complaint names what it found: ``null``, ``a list``, ``a string``, ``a float``."""
    if value is None:
        return "null"
    names = {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "an integer",
    }
    return names.get(type(value), f"a {type(value).__name__}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class Reader:
    """The fields of one JSON object, read with complaints that name the file and the path.

    The typed getters (``str``, ``int``, ``number``, ``bool``, ``dict``, ``list``) take a default
    for an absent or null entry; without one the entry is required."""

    def __init__(self, data: Any, where: str | Place, path: str = "", hint: str | None = None):
        place = where if isinstance(where, Place) else Place(where, path, hint)
        if not isinstance(data, dict):
            raise place.expected("an object", data)
        self.data, self.place = data, place

    @property
    def where(self) -> str:
        return self.place.where

    @property
    def path(self) -> str:
        return self.place.path

    def child(self, key: str) -> Reader:
        if key not in self.data:
            raise self.place.at(key).error("is missing")
        return Reader(self.data[key], self.place.at(key))

    def optional_child(self, key: str) -> Reader | None:
        return None if self.data.get(key) is None else self.child(key)

    def str(self, key: str, default: Any = MISSING) -> Any:
        return self._get(key, default, str)

    def int(self, key: str, default: Any = MISSING) -> Any:
        return self._get(key, default, int)

    def number(self, key: str, default: Any = MISSING) -> Any:
        return self._get(key, default, float)

    def bool(self, key: str, default: Any = MISSING) -> Any:
        return self._get(key, default, bool)

    def dict(self, key: str, default: Any = MISSING) -> Any:
        return self._get(key, default, dict)

    def list(self, key: str) -> list[Any]:
        return self._get(key, MISSING, list)

    def _get(self, key: str, default: Any, tp: Any) -> Any:
        value = self.data.get(key)
        if value is None:
            if default is not MISSING:
                return default
            if key not in self.data:
                raise self.place.at(key).error("is missing")
            raise self.place.at(key).expected(_codec(tp).what, None)
        return _codec(tp).read(value, self.place.at(key))


# ---- field metadata ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Json:
    """How one field differs from the plain rule (module docstring)."""

    name: str | None = None  # the JSON key, when it is not the field's name; "group.key" nests
    omit: str | None = None  # leave the entry out when the value is None / the default / falsy
    absent: Any = MISSING  # what an absent or null entry reads as (copied)
    legacy: tuple[str, ...] = ()  # older keys of the same value, read when the key is absent
    # fills an absent entry from the rest of the object (or returns MISSING: no value)
    migrate: Callable[[Reader], Any] | None = None
    choices: tuple[Any, ...] = ()  # the values allowed
    required: bool = False  # must be in a document, though the constructor has a default
    skip: bool = False  # neither written nor read: derived from the rest when read
    write: Callable[[Any], Any] | None = None  # a writer of its own (reading stays derived)

    def __post_init__(self):
        if self.omit is not None and self.omit not in OMIT_RULES:
            raise ValueError(f"omit must be one of {OMIT_RULES}; got {self.omit!r}")


def json_field(default: Any = MISSING, *, default_factory: Any = MISSING, **spec: Any) -> Any:
    """A dataclass field with its ``Json`` metadata: ``note: str | None = json_field(None,
    omit="none")``."""
    return dataclasses.field(
        default=dataclasses.MISSING if default is MISSING else default,
        default_factory=dataclasses.MISSING if default_factory is MISSING else default_factory,
        metadata={"json": Json(**spec)},
    )


class Record:
    """Base of every record: ``to_dict`` and ``from_dict`` derived from the dataclass fields.

    ``json_head``: constant entries written first; ``json_order``: the JSON keys in the order
    written, where it is not the fields' order (may name properties, written only)."""

    json_head: ClassVar[dict[str, Any]] = {}
    json_order: ClassVar[tuple[str, ...]] = ()
    reads_hint: ClassVar[str | None] = None  # the hint of a complaint about this kind of document

    def to_dict(self) -> dict[str, Any]:
        return write_record(self)

    @classmethod
    def read(cls: type[R], reader: Reader) -> R:
        """The record from a checked JSON object (override to check more, or to pass context)."""
        return read_record(cls, reader)

    @classmethod
    def from_dict(cls: type[R], data: Any, where: str = "document", path: str = "") -> R:
        """The record from a parsed JSON object; ``where`` (the file) and ``path`` name it in
        complaints.  A document's ``schema_version`` must be an integer: ``true`` or ``1.0`` is
        no version (Python would take both for 1)."""
        place = Place(where, path, cls.reads_hint)
        if "schema_version" in cls.json_head and isinstance(data, dict):
            version = data.get("schema_version", 0)
            if not _is_int(version):
                raise place.at("schema_version").expected("an integer", version)
        return cls.read(Reader(data, place))


# ---- codecs: how a type is written and read ------------------------------------------------------


@dataclass(frozen=True)
class _Codec:
    write: Callable[[Any], Any]
    read: Callable[[Any, Place], Any]
    what: str = "a value"  # what a complaint says is expected
    optional: bool = False


def _same(value: Any) -> Any:
    return value


def _scalar(check: Callable[[Any], bool], what: str, convert: Callable = _same) -> _Codec:
    def read(value: Any, place: Place) -> Any:
        if not check(value):
            raise place.expected(what, value)
        return convert(value)

    return _Codec(_same, read, what)


_SCALARS = {
    str: _scalar(lambda v: isinstance(v, str), "a string"),
    int: _scalar(_is_int, "an integer"),
    float: _scalar(_is_number, "a number", float),
    bool: _scalar(lambda v: isinstance(v, bool), "true or false"),
    dict: _Codec(dict, _scalar(lambda v: isinstance(v, dict), "an object", dict).read, "an object"),
    list: _scalar(lambda v: isinstance(v, list), "a list", list),
    Any: _Codec(_same, lambda value, place: value),
}
_CODECS: dict[Any, _Codec] = {}


def _codec(tp: Any) -> _Codec:
    """The codec of a resolved type annotation (cached)."""
    try:
        return _CODECS[tp]
    except (KeyError, TypeError):
        pass
    codec = _make_codec(tp)
    try:
        _CODECS[tp] = codec
    except TypeError:
        pass
    return codec


def _make_codec(tp: Any) -> _Codec:
    if tp in _SCALARS:
        return _SCALARS[tp]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1 or len(args) != 2:
            raise TypeError(f"records support X | None only; got {tp}")
        codec = _codec(inner[0])
        return _Codec(
            _same if codec.write is _same else (lambda v: None if v is None else codec.write(v)),
            lambda v, place: None if v is None else codec.read(v, place),
            codec.what,
            optional=True,
        )
    if origin in (tuple, list):
        if origin is tuple and (len(args) != 2 or args[1] is not Ellipsis):
            raise TypeError(f"records support tuple[X, ...] only; got {tp}")
        item = _codec(args[0])

        # per-slice values, the bulk of a document: floats (or null) pass as they are
        floats, nulls = args[0] in (float, float | None), args[0] is not float

        def read_items(value: Any, place: Place) -> Any:
            if not isinstance(value, list):
                raise place.expected("a list", value)
            if floats and all(type(v) is float or (nulls and v is None) for v in value):
                return origin(value)
            try:  # quick, under the list's place; read again to name the item at fault
                return origin([item.read(v, place) for v in value])
            except SchemaError:
                return origin([item.read(v, place.item(i)) for i, v in enumerate(value)])

        write = list if item.write is _same else (lambda v: [item.write(x) for x in v])
        return _Codec(write, read_items, "a list")
    if origin is dict:
        if args[1] is Any:
            return _SCALARS[dict]
        value_codec = _codec(args[1])

        def read_map(value: Any, place: Place) -> Any:
            if not isinstance(value, dict):
                raise place.expected("an object", value)
            try:  # quick, under the object's place; read again to name the value at fault
                return {k: value_codec.read(v, place) for k, v in value.items()}
            except SchemaError:
                return {k: value_codec.read(v, place.at(k)) for k, v in value.items()}

        return _Codec(
            lambda v: {k: value_codec.write(x) for k, x in v.items()}, read_map, "an object"
        )
    if isinstance(tp, type) and issubclass(tp, Record):
        return _Codec(
            lambda v: v.to_dict(), lambda v, place: tp.read(Reader(v, place)), "an object"
        )
    if isinstance(tp, type) and hasattr(tp, "from_dict") and hasattr(tp, "to_dict"):
        return _Codec(lambda v: v.to_dict(), _foreign(tp), "an object")
    raise TypeError(f"records cannot write or read a value of type {tp}")


def _foreign(tp: type) -> Callable[[Any, Place], Any]:
    """A class that reads itself from a dict: its exceptions become a complaint naming the path."""

    def read(value: Any, place: Place) -> Any:
        if not isinstance(value, dict):
            raise place.expected("an object", value)
        try:
            return tp.from_dict(value)
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise place.error(f"is malformed ({exc})") from None

    return read


# ---- the schema of one record class --------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    field: dataclasses.Field
    key: str  # the JSON key; "group.key" for a member of a nested object
    spec: Json
    codec: _Codec

    @property
    def name(self) -> str:
        return self.field.name

    @property
    def group(self) -> str:
        return self.key.rpartition(".")[0]

    @property
    def member(self) -> str:
        return self.key.rpartition(".")[2]

    def default(self) -> Any:
        if self.field.default is not dataclasses.MISSING:
            return self.field.default
        if self.field.default_factory is not dataclasses.MISSING:
            return self.field.default_factory()
        return MISSING

    def omitted(self, value: Any) -> bool:
        rule = self.spec.omit
        if rule == "none":
            return value is None
        if rule == "falsy":
            return not value
        return rule == "default" and value == self.default()


@dataclass(frozen=True)
class _Schema:
    entries: tuple[_Entry, ...]
    writes: tuple[_Write, ...]  # what is written, in order
    groups: tuple[str, ...]  # nested objects written as null when all their values are None


@dataclass(frozen=True)
class _Write:
    """One entry of the dict form: its key, the attribute it comes from, when it is left out,
    and its encoder (None: the value as it is; a property's values are encoded by ``_write_any``)."""

    key: str
    attribute: str
    omitted: Callable[[Any], bool] | None = None
    encode: Callable[[Any], Any] | None = None

    @classmethod
    def of(cls, entry: _Entry) -> _Write:
        omitted = None if entry.spec.omit is None else entry.omitted
        encode = entry.spec.write or entry.codec.write
        return cls(entry.key, entry.name, omitted, None if encode is _same else encode)


_SCHEMAS: dict[type, _Schema] = {}


def _schema(cls: type) -> _Schema:
    if cls not in _SCHEMAS:
        _SCHEMAS[cls] = _make_schema(cls)
    return _SCHEMAS[cls]


def _make_schema(cls: type) -> _Schema:
    hints = typing.get_type_hints(cls)
    entries = []
    for f in dataclasses.fields(cls):
        spec = f.metadata.get("json", Json())
        if spec.skip:
            continue
        entries.append(_Entry(f, spec.name or f.name, spec, _codec(hints[f.name])))
    by_key = {e.key: _Write.of(e) for e in entries}
    if cls.json_order:
        unwritten = set(by_key) - set(cls.json_order)
        if unwritten:
            raise TypeError(f"{cls.__name__}.json_order leaves out {sorted(unwritten)}")
        writes = tuple(
            by_key.get(key, _Write(key, key, None, _write_any)) for key in cls.json_order
        )
    else:
        writes = tuple(by_key.values())
    groups = tuple(dict.fromkeys(e.key.split(".")[0] for e in entries if "." in e.key))
    return _Schema(tuple(entries), writes, groups)


def write_record(record: Record, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """The record's dict form (module docstring), without the keys in ``exclude``."""
    schema = _schema(type(record))
    out: dict[str, Any] = dict(type(record).json_head)
    for write in schema.writes:
        key = write.key
        if exclude and key in exclude:
            continue
        value = getattr(record, write.attribute)
        if write.omitted is not None and write.omitted(value):
            continue
        if write.encode is not None:
            value = write.encode(value)
        if "." in key:
            group, _, member = key.rpartition(".")
            out.setdefault(group, {})[member] = value
        else:
            out[key] = value
    for group in schema.groups:
        if group in out and all(v is None for v in out[group].values()):
            out[group] = None
    return out


def _write_any(value: Any) -> Any:
    if isinstance(value, Record):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_write_any(v) for v in value]
    return value


def read_record(cls: type[R], reader: Reader, **known: Any) -> R:
    """Read ``cls`` from a checked JSON object; ``known`` fields are given, not read."""
    values = dict(known)
    for entry in _schema(cls).entries:
        if entry.name not in values:
            values[entry.name] = _read_entry(entry, reader)
    return cls(**values)


def _read_entry(entry: _Entry, reader: Reader) -> Any:
    data, place, key = reader.data, reader.place, entry.key
    if "." in key:
        group, key = entry.group, entry.member
        place, data = place.at(group), data.get(group)
        if data is None:
            data = {}
        elif not isinstance(data, dict):
            raise place.expected("an object", data)
    value = data.get(key)
    if value is None and entry.spec.legacy:
        key = next((k for k in entry.spec.legacy if data.get(k) is not None), key)
        value = data.get(key)
    if value is None:
        return _absent(entry, reader, place.at(key), present=key in data)
    try:  # quick, under the object's place; read again to name the entry at fault
        value = entry.codec.read(value, place)
    except SchemaError:
        value = entry.codec.read(value, place.at(key))
    if entry.spec.choices and value not in entry.spec.choices:
        raise place.at(key).error(f"must be {_either(entry.spec.choices)}; got {value!r}")
    return value


def _absent(entry: _Entry, reader: Reader, at: Place, present: bool) -> Any:
    """What an absent or null entry reads as (module docstring), or why it may not be absent."""
    spec = entry.spec
    if spec.migrate is not None:
        value = spec.migrate(reader)
        if value is not MISSING:
            return value
    if spec.absent is not MISSING:
        return copy.copy(spec.absent)
    if entry.codec.optional and (present or not spec.required):
        return None
    if not spec.required and (default := entry.default()) is not MISSING:
        return default
    raise at.error("is missing") if not present else at.expected(entry.codec.what, None)


def _either(choices: tuple[Any, ...]) -> str:
    names = [str(c) for c in choices]
    return " or ".join(names) if len(names) == 2 else "one of " + ", ".join(names)
