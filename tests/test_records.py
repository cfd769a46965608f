"""Records whose dict form is derived from their fields (``kdecli.records``), the figures every
document shares (``kdecli.measure.figures``): the rules of writing and reading, each shown on a
small record, and the one mean ± std record built from values, from records and from timings."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass

import pytest

from kdecli.measure.figures import Interval, SeedStats, Summary, TimeStat
from kdecli.measure.timing import time_call
from kdecli.records import Reader, Record, SchemaError, json_field, read_record


@dataclass(frozen=True)
class Point(Record):
    x: int
    y: float | None = None


@dataclass(frozen=True)
class Shape(Record):
    name: str
    points: tuple[Point, ...] = ()
    labels: dict[str, Point] = json_field(default_factory=dict, absent={})
    colour: str = json_field("black", legacy=("color",), choices=("black", "red"))
    note: str | None = json_field(None, omit="none")
    closed: bool = json_field(False, omit="falsy")
    size: int = json_field(1, omit="default")
    unit: str | None = json_field(None, name="scale.unit")
    factor: float | None = json_field(None, name="scale.factor")
    kind: str = json_field(
        "shape", migrate=lambda r: "polygon" if r.data.get("points") else "empty"
    )
    corners: int = json_field(0, required=True)

    json_order = (
        "kind",
        "name",
        "corners",
        "count",
        "points",
        "labels",
        "colour",
        "note",
        "closed",
        "size",
        "scale.unit",
        "scale.factor",
    )

    @property
    def count(self) -> int:
        return len(self.points)


def test_the_dict_form_follows_the_fields_and_their_rules():
    shape = Shape("tri", (Point(1), Point(2, 0.5)), {"a": Point(3)}, kind="polygon", corners=3)
    assert list(shape.to_dict().items()) == [
        ("kind", "polygon"),
        ("name", "tri"),
        ("corners", 3),
        ("count", 2),  # a property: written, never read
        ("points", [{"x": 1, "y": None}, {"x": 2, "y": 0.5}]),
        ("labels", {"a": {"x": 3, "y": None}}),
        ("colour", "black"),
        ("scale", None),  # a group whose values are all None is null
    ]
    marked = Shape("sq", note="n", closed=True, size=2, unit="cm", kind="polygon", corners=4)
    doc = marked.to_dict()
    assert (doc["note"], doc["closed"], doc["size"]) == ("n", True, 2)
    assert doc["scale"] == {"unit": "cm", "factor": None}
    assert Shape.from_dict(json.loads(json.dumps(doc))) == marked
    assert Shape.from_dict(shape.to_dict()) == shape


def test_reading_fills_what_older_documents_lack():
    old = {"name": "tri", "points": [{"x": 1}], "color": "red", "corners": 3}
    shape = Shape.from_dict(old)
    assert shape.colour == "red"  # a legacy name
    assert shape.kind == "polygon"  # migrated from the rest of the document
    assert shape.points == (Point(1, None),)  # absent optional -> None
    assert shape.labels == {} and shape.size == 1 and shape.unit is None
    other = Shape.from_dict({"name": "x", "corners": 0})
    other.labels["a"] = Point(0)  # an absent value is a copy, never shared
    assert Shape.from_dict({"name": "y", "corners": 0}).labels == {}
    assert Point.from_dict({"x": 2, "y": 3}).y == 3.0 and isinstance(
        Point.from_dict({"x": 2, "y": 3}).y, float
    )


@pytest.mark.parametrize(
    "doc, message",
    [
        ({"corners": 1}, "`name` is missing"),
        ({"name": "a"}, "`corners` is missing"),  # required, though the constructor has a default
        ({"name": None, "corners": 1}, "`name` must be a string; got null"),
        ({"name": "a", "corners": True}, "`corners` must be an integer; got a boolean"),
        ({"name": "a", "corners": 1, "points": {}}, "`points` must be a list; got an object"),
        ({"name": "a", "corners": 1, "points": [{"x": 1}, {"x": 1.5}]}, "`points[1].x` must be an integer; got a float"),
        ({"name": "a", "corners": 1, "labels": {"b": {"y": 1}}}, "`labels.b.x` is missing"),
        ({"name": "a", "corners": 1, "colour": "blue"}, "`colour` must be black or red; got 'blue'"),
        ({"name": "a", "corners": 1, "scale": 3}, "`scale` must be an object; got an integer"),
        ({"name": "a", "corners": 1, "scale": {"factor": "2"}}, "`scale.factor` must be a number; got a string"),
        ([1], "the document must be an object; got a list"),
    ],
)  # fmt: skip
def test_a_bad_value_is_named_by_file_and_path(doc, message):
    with pytest.raises(SchemaError) as info:
        Shape.from_dict(doc, "shape.json")
    assert info.value.message.startswith("shape.json: ") and message in info.value.message


@dataclass(frozen=True)
class Item(Record):
    unit: str = json_field(migrate=lambda r: r.place.context.get("unit"))


@dataclass(frozen=True)
class Box(Record):
    unit: str
    items: tuple[Item, ...]


def test_context_reaches_nested_records_and_known_fields_are_not_read():
    reader = Reader({"unit": "ignored", "items": [{}, {"unit": "mm"}]}, "box.json")
    reader.place.context["unit"] = "cm"
    box = read_record(Box, reader, unit="given")
    assert box.unit == "given" and [i.unit for i in box.items] == ["cm", "mm"]


def test_an_order_that_leaves_out_a_field_is_refused():
    @dataclass(frozen=True)
    class Lossy(Record):
        a: int
        b: int

        json_order = ("a",)

    with pytest.raises(TypeError, match="leaves out"):
        Lossy(1, 2).to_dict()


# ---- the figures ---------------------------------------------------------------------------------


def test_seed_stats_of_values():
    stats = SeedStats.of([0.1, 0.3])
    assert stats.mean == pytest.approx(0.2) and stats.std == pytest.approx(
        statistics.stdev([0.1, 0.3])
    )
    assert stats.per_seed == (0.1, 0.3) and stats.worst == 0.3
    assert SeedStats.of([0.5]).std == 0.0
    assert (
        SeedStats.of([1.0, math.inf]).mean == math.inf and SeedStats.of([1.0, math.inf]).std is None
    )
    assert SeedStats.of([]) == SeedStats(None, None)
    # the drift form: mean, std, per_seed only
    assert list(SeedStats.of([0.1, 0.3]).to_dict()) == ["mean", "std", "per_seed"]


def test_seed_stats_over_summaries_and_over_seed_stats():
    a = Summary(0.2, 0.5, (0.1, 0.3), Interval(0.1, 0.3))
    b = Summary(0.4, 0.9, (0.3, 0.5), Interval(0.3, 0.7), lower_bound=True)
    stats = SeedStats.over([a, b])
    assert (stats.mean, stats.max, stats.low, stats.high) == pytest.approx((0.3, 0.9, 0.2, 0.5))
    assert stats.lower_bound and stats.per_seed == (0.2, 0.4)
    assert SeedStats.over([a, Summary(0.4, 0.9)]).low is None  # one seed without bounds: none
    assert SeedStats.over([a, Summary(0.4, None)]).max == math.inf  # a null max: non-finite
    assert SeedStats.over([Summary.unavailable("needs every row")]) is None
    layers = SeedStats.over([stats, SeedStats.over([a])])  # over layers: the layers' figures
    assert (
        layers.mean == pytest.approx(0.25)
        and layers.max == 0.9
        and layers.low == pytest.approx(0.15)
    )


def test_time_stat_of_samples_is_what_timing_measures():
    ticks = iter(range(100))
    timing = time_call(lambda: None, "cpu", repeats=5, warmup=0, clock=lambda: next(ticks) ** 2)
    stat = TimeStat.of_samples(timing.samples, calls_per_sample=timing.calls_per_sample)
    assert (stat.median, stat.iqr, stat.repeats) == (timing.median, timing.iqr, timing.repeats)
    assert stat.iqr > 0 and not stat.extrapolated
    scaled = TimeStat.of_samples([2.0], extrapolated_rows=64, min_time=0.5)
    assert (scaled.iqr, scaled.extrapolated, scaled.extrapolated_rows) == (0.0, True, 64)
    with pytest.raises(ValueError):
        TimeStat.of_samples([])


def test_a_time_stat_before_0_4_reads_its_peak_as_cuda():
    assert (
        TimeStat.from_dict({"median": 1, "iqr": 0, "peak_memory_bytes": 8}).memory_source == "cuda"
    )
    assert TimeStat.from_dict({"median": 1, "iqr": 0}).memory_source is None
    assert TimeStat.from_dict({"median": 1, "iqr": 0}).repeats == 0
