"""`kdecli capture` and kdecli.hf: tiny models built from configs here, nothing downloaded.

The oracle is kdecli's float64 exact attention: it must reproduce every captured layer's `o` (the
model's own output) from the captured q, k, v with the recorded scale and causal flag, to float32
rounding, and must fail to with a wrong scale or flag.  Capturing must leave the model's output
bit-identical to stock SDPA.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from kdecli.cli import app
from kdecli.errors import UsageError
from kdecli.masks import FULL, Causal
from kdecli.measure.reference import exact_attention

needs_hf = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None, reason="needs kdecli[hf] (transformers)"
)
runner = CliRunner()
N, K = 24, 3  # tokens per chunk, chunks
POSITIONS = 64
EPS32 = torch.finfo(torch.float32).eps


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


# ---- tiny models, a real tokenizer and real English text, all built here ------------------------


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("text") / "topics.txt"
    path.write_text("\n\n".join(topics[name] for name in sorted(topics))[:60_000], "utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer(text_file):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=300, special_tokens=["[UNK]", "[PAD]"])
    tok.train_from_iterator([text_file.read_text("utf-8")], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


def _configs():
    from transformers import BertConfig, GPT2Config, LlamaConfig

    return {
        "bert": BertConfig(
            vocab_size=300,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=POSITIONS,
        ),
        "llama": LlamaConfig(  # GQA (4 query heads over 2 key/value heads) and RoPE
            vocab_size=300,
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            max_position_embeddings=POSITIONS,
        ),
        "gpt2": GPT2Config(  # a scale per layer: 1/√d/(layer+1)
            vocab_size=300,
            n_embd=32,
            n_layer=3,
            n_head=4,
            n_positions=POSITIONS,
            scale_attn_by_inverse_layer_idx=True,
        ),
    }


ARCHS = ["bert", "llama", "gpt2"]
CAUSAL = {"bert": False, "llama": True, "gpt2": True}


def _save(model, folder: Path, tokenizer=None) -> Path:
    torch.manual_seed(0)
    model.eval().save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tokenizer) -> dict[str, Path]:
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    root = tmp_path_factory.mktemp("models")
    dirs = {}
    for name, config in _configs().items():
        torch.manual_seed(0)
        cls = AutoModelForMaskedLM if name == "bert" else AutoModelForCausalLM
        dirs[name] = _save(cls.from_config(config), root / name, tokenizer)
    return dirs


@pytest.fixture(scope="module")
def captures(model_dirs, text_file, tmp_path_factory) -> dict[str, Path]:
    from kdecli.hf import capture

    root = tmp_path_factory.mktemp("captures")
    out = {}
    for name, folder in model_dirs.items():
        out[name] = root / f"{name}.h5"
        summary = capture(folder, text_file, tokens=N, chunks=K, output=out[name], device="cpu")
        assert summary.path == out[name] and summary.bytes == out[name].stat().st_size
    return out


def _read(path: Path, layer: int) -> dict:
    with h5py.File(path, "r") as f:
        g = f[f"layer{layer}"]
        data = {key: torch.from_numpy(g[key][...]) for key in ("q", "k", "v", "o", "kv_head")}
        data.update(dict(g.attrs))
    return data


def float32_bound(q, k, v, scale) -> float:
    """First-order worst-case float32 error of softmax(s·QKᵀ)V, twice (see conftest's
    rounding_bound, in float32), plus half an ulp for storing o."""
    logit_scale = abs(scale) * q.norm(dim=-1).max() * k.norm(dim=-1).max()
    return float(4 * EPS32 * v.abs().max() * (k.shape[-2] + q.shape[-1] * logit_scale))


def _stock_model(folder: Path):
    from transformers import AutoModel

    return AutoModel.from_pretrained(folder, attn_implementation="sdpa").eval()


def _chunk_ids(folder: Path, text_file: Path, index: int) -> torch.Tensor:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(folder)(
        text_file.read_text("utf-8"), add_special_tokens=False
    )
    return torch.tensor(ids["input_ids"][index * N : (index + 1) * N]).unsqueeze(0)


# ---- what a capture holds ----------------------------------------------------------------------


@needs_hf
@pytest.mark.parametrize("arch", ARCHS)
def test_capture_file_layout_and_attributes(arch, captures, model_dirs, text_file):
    import transformers

    with h5py.File(captures[arch], "r") as f:
        attrs = dict(f.attrs)
        groups = sorted(f)
    n_layers = len(groups)
    assert attrs["kdecli_capture"] == 1 and attrs["model"] == arch and attrs["model_type"] == arch
    assert attrs["tokens"] == N and attrs["chunks"] == K and attrs["dtype"] == "float32"
    assert attrs["text"] == text_file.name and len(attrs["text_sha256"]) == 64
    assert list(attrs["layers"]) == list(range(n_layers))
    config = (model_dirs[arch] / "config.json").read_bytes()
    import hashlib

    assert attrs["config_sha256"] == hashlib.sha256(config).hexdigest()
    versions = json.loads(attrs["versions"])
    assert versions["transformers"] == transformers.__version__
    assert set(versions) == {"kdecli", "torch", "transformers"}
    for layer in range(n_layers):
        data = _read(captures[arch], layer)
        assert data["layer"] == layer and bool(data["causal"]) is CAUSAL[arch]
        for key in ("q", "k", "v", "o"):
            assert data[key].shape == (K, 4, N, 8) and data[key].dtype == torch.float32


@needs_hf
@pytest.mark.parametrize("arch", ARCHS)
def test_exact_reference_reproduces_every_captured_o(arch, captures):
    for layer in range(len(h5py.File(captures[arch], "r").attrs["layers"])):
        data = _read(captures[arch], layer)
        q, k, v, o = data["q"], data["k"], data["v"], data["o"]
        scale, causal = float(data["scale"]), bool(data["causal"])
        ref = exact_attention(q, k, v, scale, mask=Causal(0) if causal else FULL)
        bound = float32_bound(q, k, v, scale)
        assert (o.double() - ref).abs().max() <= bound
        # the check can fail: the other causal flag, or a scale off by 5%, is far outside it
        wrong_flag = exact_attention(q, k, v, scale, mask=FULL if causal else Causal(0))
        assert (o.double() - wrong_flag).abs().max() > 100 * bound
        wrong_scale = exact_attention(q, k, v, scale * 1.05, mask=Causal(0) if causal else FULL)
        assert (o.double() - wrong_scale).abs().max() > 2 * bound


@needs_hf
@pytest.mark.parametrize("arch", ARCHS)
def test_the_scale_is_the_models_own_per_layer(arch, captures):
    for layer in range(3 if arch != "bert" else 2):
        scale = float(_read(captures[arch], layer)["scale"])
        expected = 8**-0.5 / (layer + 1 if arch == "gpt2" else 1)
        assert scale == pytest.approx(expected, rel=1e-12)


@needs_hf
def test_gqa_keys_are_expanded_and_the_mapping_recorded(captures):
    for layer in range(3):
        data = _read(captures["llama"], layer)
        assert data["kv_head"].tolist() == [0, 0, 1, 1] and data["kv_heads"] == 2
        k, v = data["k"], data["v"]
        assert torch.equal(k[:, 0], k[:, 1]) and torch.equal(k[:, 2], k[:, 3])
        assert torch.equal(v[:, 0], v[:, 1]) and not torch.equal(k[:, 1], k[:, 2])
        # each query head is paired with the right key/value head: o is reproduced per head
        # (test_exact_reference...), and pairing head 1 with group 1 instead does not
        q, o = data["q"], data["o"].double()
        swapped = exact_attention(
            q[:, 1:2], k[:, 2:3], v[:, 2:3], float(data["scale"]), mask=Causal(0)
        )
        assert (o[:, 1:2] - swapped).abs().max() > 100 * float32_bound(q, k, v, data["scale"])
    for arch in ("bert", "gpt2"):
        data = _read(captures[arch], 0)
        assert data["kv_head"].tolist() == [0, 1, 2, 3] and data["kv_heads"] == 4


@needs_hf
@pytest.mark.parametrize("arch", ARCHS)
def test_capturing_leaves_the_model_output_bit_identical(arch, model_dirs, text_file):
    from kdecli.hf import attention_function, load_model, use_attention
    from kdecli.hf.capturing import Recorder

    ids = _chunk_ids(model_dirs[arch], text_file, 1)
    with torch.inference_mode():
        stock = _stock_model(model_dirs[arch])(input_ids=ids).last_hidden_state
        model = load_model(model_dirs[arch])
        recorder = Recorder({0, 1})
        function = attention_function(recorder.handler)
        with use_attention(model, function):
            captured = model(input_ids=ids).last_hidden_state
        after = model(input_ids=ids).last_hidden_state  # back on its own attention afterwards
    assert torch.equal(captured, stock) and torch.equal(after, stock)
    assert set(recorder.records) == {0, 1} and all(function.calls[i] == 1 for i in (0, 1))
    assert model.config._attn_implementation == "sdpa"


@needs_hf
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_chunks_are_the_texts_tokens_in_order_without_padding(
    arch, captures, model_dirs, text_file
):
    """Chunk c is tokens [cN, (c+1)N) of the text tokenized once (no special tokens), run alone."""
    from kdecli.hf import attention_function, load_model, use_attention
    from kdecli.hf.capturing import Recorder

    model = load_model(model_dirs[arch])
    stored = _read(captures[arch], 1)
    for index in range(K):
        recorder = Recorder({1})
        with use_attention(model, attention_function(recorder.handler)), torch.inference_mode():
            model(input_ids=_chunk_ids(model_dirs[arch], text_file, index))
        call, tensors = recorder.records[1]
        assert torch.equal(tensors["q"][0], stored["q"][index])
        assert torch.equal(tensors["o"][0], stored["o"][index])


@needs_hf
def test_a_padding_mask_is_refused(model_dirs):
    """With the mask function registered under `kdecli`, padding reaches the attention function
    (it would arrive as None otherwise) and the recorder refuses it."""
    from kdecli.hf import attention_function, load_model, use_attention
    from kdecli.hf.capturing import Recorder

    model = load_model(model_dirs["llama"])
    ids = torch.randint(2, 300, (2, N))
    mask = torch.ones(2, N, dtype=torch.long)
    mask[0, -5:] = 0
    seen = []

    def spy(call):
        seen.append(call.mask)
        return call.stock()

    with torch.inference_mode(), use_attention(model, attention_function({0: spy})):
        model(input_ids=ids, attention_mask=mask)
    assert seen[0] is not None and not bool(seen[0][0, 0, -1, -1])
    recorder = Recorder({0})
    with pytest.raises(UsageError, match="padding"), torch.inference_mode():
        with use_attention(model, attention_function(recorder.handler)):
            model(input_ids=ids, attention_mask=mask)
    with torch.inference_mode(), use_attention(model, attention_function(recorder.handler)):
        model(input_ids=ids, attention_mask=torch.ones_like(mask))  # all ones: plain causal


@needs_hf
def test_layers_float64_and_the_cli(model_dirs, text_file, tmp_path):
    out = tmp_path / "sub.h5"
    res = invoke(
        "capture", model_dirs["gpt2"], "--text", text_file, "--tokens", 16, "--chunks", 2,
        "--layers", "0,2-2", "--dtype", "float64", "--device", "cpu", "-o", out,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert res.stdout == "" and "Wrote" in res.stderr
    with h5py.File(out, "r") as f:
        assert sorted(f) == ["layer0", "layer2"] and list(f.attrs["layers"]) == [0, 2]
        assert f.attrs["dtype"] == "float64" and f["layer2/q"].dtype == np.float64
    data = _read(out, 2)
    ref = exact_attention(data["q"], data["k"], data["v"], float(data["scale"]), mask=Causal(0))
    eps64 = torch.finfo(torch.float64).eps
    assert (data["o"] - ref).abs().max() <= float32_bound(
        data["q"], data["k"], data["v"], data["scale"]
    ) * eps64 / EPS32
    assert not list(tmp_path.glob("*.incomplete"))


@needs_hf
def test_vit_modules_without_layer_idx_are_numbered_in_order():
    from transformers import ViTConfig, ViTModel

    from kdecli.hf import attention_function, use_attention

    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=16,
        patch_size=4,
        attn_implementation="sdpa",
    )
    model = ViTModel(config).eval()
    pixels = torch.randn(1, 3, 16, 16)
    seen = []

    def spy(call):
        seen.append((call.layer, call.causal))
        return call.stock()

    with torch.inference_mode():
        stock = model(pixel_values=pixels).last_hidden_state
        with use_attention(model, attention_function(lambda layer: spy)):
            ours = model(pixel_values=pixels).last_hidden_state
    assert seen == [(0, False), (1, False), (2, False)] and torch.equal(ours, stock)


# ---- bad input: refused with a message, no file left -------------------------------------------


def _refused(tmp_path, *args, match: str):
    out = tmp_path / "out.h5"
    res = invoke("capture", *args, "-o", out, "--device", "cpu")
    assert res.exit_code == 2, res.output
    assert match in res.stderr, res.stderr
    assert not out.exists() and not list(tmp_path.glob("out.h5*"))
    return res


@needs_hf
def test_missing_model_folder(tmp_path, text_file):
    _refused(tmp_path, tmp_path / "nowhere", "--text", text_file, match="does not exist")


@needs_hf
def test_folder_without_config_or_tokenizer(tmp_path, text_file, model_dirs):
    (tmp_path / "empty").mkdir()
    _refused(tmp_path, tmp_path / "empty", "--text", text_file, match="no config.json")
    from transformers import AutoModel

    bare = _save(AutoModel.from_pretrained(model_dirs["llama"]), tmp_path / "bare")
    _refused(tmp_path, bare, "--text", text_file, "--tokens", 8, match="no tokenizer")


@needs_hf
def test_an_architecture_that_does_not_route_through_the_interface(tmp_path, text_file, tokenizer):
    from transformers import GPTNeoConfig, GPTNeoModel

    config = GPTNeoConfig(
        vocab_size=300,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        attention_types=[[["global", "local"], 1]],
        max_position_embeddings=POSITIONS,
        bos_token_id=0,
        eos_token_id=0,
    )
    folder = _save(GPTNeoModel(config), tmp_path / "neo", tokenizer)
    _refused(tmp_path, folder, "--text", text_file, "--tokens", 8, match="does not route")


@needs_hf
def test_text_shorter_than_k_times_n(tmp_path, model_dirs):
    short = tmp_path / "short.txt"
    short.write_text("the of and to a in is " * 5, "utf-8")
    args = (model_dirs["bert"], "--text", short, "--tokens", 16, "--chunks", 3)
    res = _refused(tmp_path, *args, match="is 35 tokens long")
    assert "needs 48" in res.stderr


@needs_hf
@pytest.mark.parametrize("layers", ["5", "0,2", "-1", "1-0", "x"])
def test_layers_out_of_range_or_malformed(tmp_path, model_dirs, text_file, layers):
    args = (model_dirs["bert"], "--text", text_file, "--tokens", 8, "--layers", layers)
    _refused(tmp_path, *args, match="--layers")


@needs_hf
def test_tokens_above_the_models_positions(tmp_path, model_dirs, text_file):
    args = (model_dirs["llama"], "--text", text_file, "--tokens", POSITIONS + 1)
    _refused(tmp_path, *args, match=f"at most {POSITIONS} positions")


@needs_hf
def test_missing_text_and_bad_counts(tmp_path, model_dirs, text_file):
    _refused(tmp_path, model_dirs["bert"], "--text", tmp_path / "no.txt", match="no such file")
    args = (model_dirs["bert"], "--text", text_file, "--chunks", 0)
    _refused(tmp_path, *args, match="--chunks must be a positive integer")


@needs_hf
def test_an_interrupted_capture_leaves_no_file_and_the_old_one_intact(
    tmp_path, model_dirs, text_file
):
    from kdecli.hf import capture

    out = tmp_path / "cap.h5"
    out.write_bytes(b"previous")

    def interrupt(done, total, label):
        if done == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        capture(
            model_dirs["llama"], text_file, tokens=N, chunks=K, output=out, progress=interrupt,
            device="cpu",
        )  # fmt: skip
    assert out.read_bytes() == b"previous" and sorted(p.name for p in tmp_path.iterdir()) == [
        "cap.h5"
    ]


# ---- the core install does not need transformers -----------------------------------------------


def _without_transformers(code: str) -> subprocess.CompletedProcess:
    prelude = "import sys; sys.modules['transformers'] = None\n"  # import transformers fails
    return subprocess.run(
        [sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=600
    )


def test_the_cli_does_not_import_transformers():
    code = "import sys, kdecli.cli, kdecli.hf; print('transformers' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"


def test_without_transformers_help_works_and_capture_says_how_to_install(tmp_path):
    run_cli = "import sys; from kdecli.cli import main; sys.argv = ['kdecli', *{args!r}]; main()"
    res = _without_transformers(run_cli.format(args=["--help"]))
    assert res.returncode == 0 and "capture" in res.stdout
    text = tmp_path / "t.txt"
    text.write_text("hello", "utf-8")
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}", "utf-8")
    out = tmp_path / "o.h5"
    args = ["capture", str(folder), "--text", str(text), "-o", str(out)]
    res = _without_transformers(run_cli.format(args=args))
    assert res.returncode == 2, res.stderr
    assert "pip install 'kdecli[hf]'" in res.stderr and not out.exists()


# ---- GGUF: a tiny Llama written with the gguf package as llama.cpp lays it out ------------------

needs_gguf = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("transformers", "gguf", "accelerate")),
    reason="needs transformers, gguf and accelerate (transformers 5 reads .gguf only with it)",
)


def _write_tiny_gguf(path: Path, model, text: str) -> None:
    """``model`` (a LlamaForCausalLM) as llama.cpp's converter writes it: F32 tensors under
    llama.cpp's names, q and k rows permuted per head, and a character-level sentencepiece-style
    vocabulary (so the file carries its own tokenizer)."""
    import gguf

    config = model.config
    vocab = config.vocab_size
    chars = sorted(set(text.replace(" ", "\u2581")) - {"\u2581"})
    tokens = ["<unk>", "<s>", "</s>", "\u2581", *chars][:vocab]
    tokens += [f"<extra{i}>" for i in range(vocab - len(tokens))]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(vocab)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * 3 + [-float(i) for i in range(vocab - 3)])
    writer.add_token_types(types + [gguf.TokenType.NORMAL] * (vocab - 3))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(False)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)

    def permute(w, heads):  # llama.cpp's rotary layout of q and k rows
        return (
            w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:])
            .swapaxes(1, 2)
            .reshape(w.shape)
        )

    for name, tensor in model.state_dict().items():
        array = tensor.numpy().astype(np.float32)
        if name.endswith("q_proj.weight"):
            array = permute(array, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            array = permute(array, config.num_key_value_heads)
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def gguf_model(tmp_path_factory, text_file):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(
        vocab_size=120,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=POSITIONS,
    )
    model = LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    _write_tiny_gguf(path, model, text_file.read_text("utf-8"))
    return path, model


@needs_gguf
def test_a_gguf_file_loads_as_the_model_it_was_written_from(gguf_model):
    from kdecli.hf import load_model

    path, source = gguf_model
    loaded = load_model(path).state_dict()
    expected = source.model.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[name], expected[name]) for name in expected)


@needs_gguf
def test_capture_from_a_gguf_file(gguf_model, text_file, tmp_path):
    path, _ = gguf_model
    out = tmp_path / "gguf.h5"
    res = invoke("capture", path, "--text", text_file, "--tokens", N, "--chunks", 2, "-o", out)
    assert res.exit_code == 0, res.output
    assert "GGUF" not in res.stderr  # transformers' own tqdm bar is kept off stderr
    with h5py.File(out, "r") as f:
        assert f.attrs["model"] == "tiny-llama.gguf" and f.attrs["model_type"] == "llama"
        assert len(f.attrs["config_sha256"]) == 64
    for layer in (0, 1):
        data = _read(out, layer)
        assert data["kv_head"].tolist() == [0, 0, 1, 1] and bool(data["causal"])
        q, k, v = data["q"], data["k"], data["v"]
        ref = exact_attention(q, k, v, float(data["scale"]), mask=Causal(0))
        assert (data["o"].double() - ref).abs().max() <= float32_bound(q, k, v, data["scale"])


def test_the_package_names_are_the_functions_whichever_module_was_imported_first():
    """A submodule named like the function it exports would replace that function on the package
    once imported (``kdecli.hf.capture`` the module, not the function): none is so named."""
    import kdecli.cli.capture_command  # noqa: F401  (imports the modules behind the names)
    import kdecli.cli.drift_command  # noqa: F401
    import kdecli.experiments.drift.run  # noqa: F401
    import kdecli.hf
    import kdecli.hf.capturing  # noqa: F401
    import kdecli.hf.patching  # noqa: F401

    for name in ("capture", "drift", "patch"):
        assert callable(getattr(kdecli.hf, name)) and not isinstance(
            getattr(kdecli.hf, name), type(kdecli.hf)
        ), name
