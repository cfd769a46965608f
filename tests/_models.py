"""Tiny Hugging Face models built from configs, a tokenizer trained here and real English text,
for the tests of ``kdecli.hf.patch`` and ``kdecli drift``: nothing is downloaded.

The same recipe as ``test_capture``: BERT (an encoder), Llama with grouped-query attention and
RoPE, GPT-2 with a scale per layer; the causal models are saved with their language-model heads.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

needs_hf = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None, reason="needs kdecli[hf] (transformers)"
)
POSITIONS = 64
VOCAB = 300


def write_text(folder: Path) -> Path:
    from pydoc_data.topics import topics

    path = folder / "topics.txt"
    path.write_text("\n\n".join(topics[name] for name in sorted(topics))[:60_000], "utf-8")
    return path


def train_tokenizer(text_file: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=VOCAB, special_tokens=["[UNK]", "[PAD]"])
    tok.train_from_iterator([text_file.read_text("utf-8")], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


def configs() -> dict:
    from transformers import BertConfig, GPT2Config, LlamaConfig

    return {
        "bert": BertConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=POSITIONS,
        ),
        "llama": LlamaConfig(  # GQA (4 query heads over 2 key/value heads) and RoPE
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=64, max_position_embeddings=POSITIONS,
            bos_token_id=0, eos_token_id=0, pad_token_id=1,
        ),
        "gpt2": GPT2Config(  # a scale per layer: 1/√d/(layer+1)
            vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=POSITIONS,
            scale_attn_by_inverse_layer_idx=True, bos_token_id=0, eos_token_id=0,
        ),
    }  # fmt: skip


def build(name: str):
    """The tiny model ``name`` with random weights from seed 0 (causal models with their head)."""
    from transformers import AutoModel, AutoModelForCausalLM

    torch.manual_seed(0)
    cls = AutoModel if name == "bert" else AutoModelForCausalLM
    return cls.from_config(configs()[name], attn_implementation="sdpa").eval()


def save_models(root: Path, tokenizer) -> dict[str, Path]:
    dirs = {}
    for name in configs():
        folder = root / name
        build(name).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        dirs[name] = folder
    return dirs
