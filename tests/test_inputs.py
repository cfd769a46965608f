import h5py
import numpy as np
import pytest
import torch

from kdecli.devices import resolve_device, resolve_dtype
from kdecli.errors import InputError, UsageError
from kdecli.masks import FULL, Causal
from kdecli.sources import load_input


def arrays(b=2, h=3, n_q=47, n_k=59, d=21, d_v=13, dtype=np.float32):
    rng = np.random.default_rng(0)
    return (
        rng.standard_normal((b, h, n_q, d)).astype(dtype),
        rng.standard_normal((b, h, n_k, d)).astype(dtype),
        rng.standard_normal((b, h, n_k, d_v)).astype(dtype),
    )


def test_npz_with_long_names_and_cross_lengths(tmp_path):
    q, k, v = arrays()
    path = tmp_path / "x.npz"
    np.savez(path, query=q, key=k, value=v)
    qkv = load_input(str(path))
    assert qkv.shape == {"b": 2, "h": 3, "n_q": 47, "n_k": 59, "d": 21, "d_v": 13}
    assert torch.equal(qkv.q, torch.from_numpy(q))


def test_h5_group_and_custom_keys(tmp_path):
    q, k, v = arrays()
    path = tmp_path / "acts.h5"
    with h5py.File(path, "w") as f:
        g = f.create_group("layer3/attn")
        g["Q"], g["K"], g["V"] = q, k, v
    qkv = load_input(f"{path}:/layer3/attn", q_key="Q", k_key="K", v_key="V")
    assert torch.equal(qkv.v, torch.from_numpy(v))
    with pytest.raises(InputError, match="no group"):
        load_input(f"{path}:/layer9")
    with pytest.raises(InputError, match=r"no array for Q.*holds: K, Q, V"):
        load_input(f"{path}:/layer3/attn")


def test_three_npy_files_and_layouts(tmp_path):
    q, k, v = arrays(b=2, h=3, n_q=47, n_k=47)
    bnhd = [np.ascontiguousarray(x.transpose(0, 2, 1, 3)) for x in (q, k, v)]
    paths = []
    for name, x in zip("qkv", bnhd):
        paths.append(tmp_path / f"{name}.npy")
        np.save(paths[-1], x)
    qkv = load_input(None, q=str(paths[0]), k=str(paths[1]), v=str(paths[2]), layout="bnhd")
    assert torch.equal(qkv.q, torch.from_numpy(q))
    two_d = tmp_path / "two.npz"
    np.savez(two_d, q=q[0, 0], k=k[0, 0], v=v[0, 0])
    assert load_input(str(two_d)).q.shape == (1, 1, 47, 21)
    three_d = tmp_path / "three.npz"
    np.savez(three_d, q=q[0], k=k[0], v=v[0])
    assert load_input(str(three_d)).q.shape == (1, 3, 47, 21)


def test_pt_dict_and_stored_scale(tmp_path):
    q, k, v = (torch.from_numpy(x) for x in arrays())
    path = tmp_path / "acts.pt"
    torch.save(
        {
            "q": q.to(torch.bfloat16),
            "k": k.to(torch.bfloat16),
            "v": v.to(torch.bfloat16),
            "scale": torch.tensor(0.25),
        },
        path,
    )
    qkv = load_input(str(path))
    assert qkv.q.dtype == torch.bfloat16 and qkv.scale() == 0.25 and qkv.scale(0.5) == 0.5


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_float_dtypes_are_kept(tmp_path, dtype):
    path = tmp_path / "x.npz"
    np.savez(path, **dict(zip("qkv", arrays(dtype=dtype))))
    assert load_input(str(path)).q.dtype == torch.from_numpy(np.zeros(1, dtype)).dtype


def test_synthetic_forms():
    qkv = load_input("synthetic:n=64,nq=30,d=8,dv=5,b=2,h=3,seed=1,kind=clustered")
    assert qkv.shape == {"b": 2, "h": 3, "n_q": 30, "n_k": 64, "d": 8, "d_v": 5}
    again = load_input("synthetic:n=64,nq=30,d=8,dv=5,b=2,h=3,seed=1,kind=clustered")
    assert torch.equal(qkv.q, again.q)
    with pytest.raises(UsageError, match="kind"):
        load_input("synthetic:n=64,kind=spiky")
    with pytest.raises(UsageError, match="cannot read 'x'"):
        load_input("synthetic:x")


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda q, k, v: (q, k, v[..., :-1, :]), "K has 59 rows but V has 58"),
        (lambda q, k, v: (q[..., :-1], k, v), "Q has width 20 but K has width 21"),
        (lambda q, k, v: (q, k, np.where(np.arange(13) == 3, np.nan, v)), "V holds 354 NaN"),
        (lambda q, k, v: (q, k * np.inf, v), "K holds .* NaN or infinite"),
        (lambda q, k, v: (q.astype(np.int32), k, v), "Q holds int32 values"),
        (lambda q, k, v: (q[:, :, :0], k, v), "Q is empty"),
        (lambda q, k, v: (q[:1], k, v), "batch and head dimensions differ"),
        (lambda q, k, v: (q[None], k, v), "expected \\(n, d\\)"),
    ],
)
def test_bad_arrays_get_messages_naming_file_and_array(tmp_path, mutate, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **dict(zip("qkv", mutate(*arrays()))))
    with pytest.raises(InputError, match=message) as info:
        load_input(str(path))
    assert "bad.npz" in info.value.message


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_input(str(tmp_path / "nope.npz"))
    odd = tmp_path / "x.csv"
    odd.write_text("1,2")
    with pytest.raises(InputError, match="unknown input format"):
        load_input(str(odd))
    with pytest.raises(UsageError, match="no input given"):
        load_input(None)


def test_crop_with_n(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, **dict(zip("qkv", arrays(n_q=59))))
    assert load_input(str(path), n=20).shape["n_k"] == 20
    with pytest.raises(UsageError, match="--n must be in"):
        load_input(str(path), n=100)


def test_device_and_dtype_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no CUDA device"):
            resolve_device("cuda")
    with pytest.raises(UsageError):
        resolve_device("tpu")
    assert resolve_dtype("bfloat16") == torch.bfloat16
    with pytest.raises(UsageError, match="--dtype"):
        resolve_dtype("float8")


def test_an_inputs_mask_from_its_stored_flag_the_override_and_the_offset(tmp_path):
    """A capture's stored ``causal`` attribute still reads (``qkv.causal()``), and ``qkv.mask``
    turns it, the --causal override and the --query-offset into a mask: causal without an offset
    puts the queries at the last n_q positions."""
    q, k, v = arrays(n_q=7, n_k=59)
    path = tmp_path / "acts.h5"
    with h5py.File(path, "w") as f:
        g = f.create_group("layer0")
        g["q"], g["k"], g["v"] = q, k, v
        g.attrs["causal"] = True
    qkv = load_input(f"{path}:/layer0")
    assert qkv.causal() is True and qkv.default_causal is True
    assert qkv.mask() == Causal(52)  # bottom-right: 7 queries after 52 keys
    assert qkv.mask(offset=10) == Causal(10)
    assert qkv.mask(causal=False) is FULL
    with pytest.raises(UsageError, match="add --causal"):
        qkv.mask(causal=False, offset=3)
    with pytest.raises(UsageError, match="n_k - n_q = 52"):
        qkv.mask(offset=53)
    plain = load_input("synthetic:n=64,nq=30,d=8,dv=5")
    assert plain.causal() is False and plain.mask() is FULL and plain.mask(True) == Causal(34)
