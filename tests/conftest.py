"""Shared fixtures: a tiny random Llama (2 blocks) with a byte-level BPE tokenizer, built in-test.

Nothing here touches the network or the real SmolLM2 model, so the suite stays fast and offline.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

WORDS = (
    "the a of and to in is was that it he she for on with as his her at by had not be but from "
    "they you all were this which have one there an are or been when said would so who what their "
    "if no my more them out up into could did only time then very some man lady miss house letter "
    "sister mother father heart mind friend little great good well much every such own must might"
).split()


def make_text(n_words: int = 6000, seed: int = 0) -> str:
    """Deterministic pseudo-English: sentences of common words, so a BPE has real structure."""
    rng = random.Random(seed)
    out, line = [], []
    for i in range(n_words):
        w = rng.choice(WORDS)
        line.append(w.capitalize() if not line else w)
        if len(line) > rng.randint(6, 14):
            out.append(" ".join(line) + ".")
            line = []
    return "\n".join(out) + "\n"


def make_tokenizer(text: str, vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def make_tiny_llama(vocab_size: int = 300, seed: int = 0, hidden: int = 64, inter: int = 128,
                    layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=inter,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(autouse=True)
def _threads_restored():
    """Every test leaves torch's thread count as it found it: a leaked count changes float sums in
    later tests that compare a run in this process with one in a child process."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture
def one_thread():
    """Single-threaded torch for tests on tiny layers: worker threads only add overhead there
    (and stall on a busy machine). Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_text() -> str:
    return make_text()


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_text):
    return make_tokenizer(tiny_text)


@pytest.fixture
def tiny_llama(tiny_tokenizer):
    return make_tiny_llama(vocab_size=len(tiny_tokenizer))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A save_pretrained folder (safetensors + tokenizer) of the tiny Llama. Do not modify it."""
    d = tmp_path_factory.mktemp("tiny_llama")
    make_tiny_llama(vocab_size=len(tiny_tokenizer)).save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def text_files(tmp_path_factory, tiny_text) -> tuple[Path, Path]:
    """(calibration, evaluation) text files of pseudo-English."""
    d = tmp_path_factory.mktemp("text")
    calib, ev = d / "calib.txt", d / "eval.txt"
    calib.write_text(tiny_text)
    ev.write_text(make_text(seed=1))
    return calib, ev
