"""Differential tests against the public reference implementations of TEAL and WINA, on a tiny Llama.

The references (github.com/FasterDecoding/TEAL, github.com/microsoft/wina) are read from local git
mirrors (``$PRUNUS_MIRRORS``, default ``/work/.mirror``: ``FasterDecoding+TEAL/repo`` and
``microsoft+wina/repo``, bare git folders); without them these tests skip, and the hand-computed
tests in ``test_activation_methods.py`` still run. Nothing of the references is copied into prunus:
their modules are imported from a temporary checkout. Only the glue differs: the references patch
the attention and MLP forwards of a CUDA flash-attention Llama, so here their gating functions
(``SparsifyFn.apply``) are called from forward pre-hooks on the stock transformers layers, and their
``.to("cuda")`` calls are sent to the CPU.
"""

import csv
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from prunus.activation import calibrate_activations, gate_input
from prunus.activation.context import BlockCalibration
from prunus.activation.greedy import greedy_path, layer_weights
from prunus.activation.histogram import Distribution, score_threshold, teal_threshold
from prunus.core.targets import select
from prunus.oneshot.calibrate import capture_inputs, find_blocks

MIRRORS = Path(os.environ.get("PRUNUS_MIRRORS", "/work/.mirror"))
SHORT = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up",
         "down_proj": "down"}


def _checkout(repo: str, dest: Path, paths: list[str]) -> Path:
    git = MIRRORS / repo / "repo"
    if not git.is_dir() or shutil.which("git") is None or shutil.which("tar") is None:
        pytest.skip(f"reference mirror {git} not available")
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", f"--git-dir={git}", "archive", "HEAD", *paths], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def _forget(prefixes):
    for k in [k for k in sys.modules if k.split(".")[0] in prefixes]:
        del sys.modules[k]


@pytest.fixture
def on_cpu(monkeypatch):
    """The references move tensors and layers to "cuda"; keep them where they are."""
    t_to, m_to = torch.Tensor.to, nn.Module.to

    def cpu(args, kwargs):
        args = tuple("cpu" if a == "cuda" or (isinstance(a, str) and a.startswith("cuda")) else a for a in args)
        if str(kwargs.get("device", "")).startswith("cuda"):
            kwargs = {**kwargs, "device": "cpu"}
        return args, kwargs

    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: t_to(self, *cpu(a, k)[0], **cpu(a, k)[1]))
    monkeypatch.setattr(nn.Module, "to", lambda self, *a, **k: m_to(self, *cpu(a, k)[0], **cpu(a, k)[1]))


def _reference(monkeypatch, tmp_path, repo, package):
    root = _checkout(repo, tmp_path / package, [package, "utils"])
    _forget({"utils", "teal", "wina"})
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=None, concatenate_datasets=None))
    monkeypatch.syspath_prepend(str(root))
    import importlib

    mods = types.SimpleNamespace(utils=importlib.import_module("utils.utils"),
                                 greedy=importlib.import_module(f"{package}.greedyopt"))
    return mods


@pytest.fixture
def teal_ref(monkeypatch, tmp_path, on_cpu):
    yield _reference(monkeypatch, tmp_path, "FasterDecoding+TEAL", "teal")
    _forget({"utils", "teal"})


@pytest.fixture
def wina_ref(monkeypatch, tmp_path, on_cpu):
    yield _reference(monkeypatch, tmp_path, "microsoft+wina", "wina")
    _forget({"utils", "wina"})


@pytest.fixture
def setup(tiny_llama, tiny_tokenizer, tiny_text):
    from prunus.io.data import calibration_windows, eval_windows, tokenize

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    calib = calibration_windows(tokenize(tiny_text, tiny_tokenizer), 4, 48, 0)
    ev = eval_windows(tokenize(tiny_text[::-1], tiny_tokenizer), 48, 3)  # other tokens than the calibration's
    yield tiny_llama, calib, ev
    torch.set_num_threads(threads)


def _inputs(model, ids):
    got, handles = {}, []
    for t in select(model):
        handles.append(t.module.register_forward_pre_hook(lambda m, a, n=t.name: got.__setitem__(n, a[0])))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    return got


def _reference_distribution(ref, tmp_path, key, x):
    """The reference's histogram of ``x`` (batch, seq, in) under ``key``, built and loaded as it does."""
    am = ref.utils.ActivationModule(str(tmp_path / key))
    for row in x:
        am.grab_activations(row.unsqueeze(0), key)
    am.find_histogram()
    am.save_histogram()
    return ref.utils.Distribution(str(tmp_path / key), hidden_type=key)


def test_teal_histogram_thresholds_match_the_reference(teal_ref, setup, tmp_path):
    model, calib, _ = setup
    xs = _inputs(model, calib)
    ours = calibrate_activations(model, calib, select(model), 0.4, "teal", {"greedy": False, "stream": "ungated"},
                                 progress=False)
    for name, x in xs.items():
        distr = _reference_distribution(teal_ref, tmp_path, SHORT[name.rsplit(".", 1)[-1]] + name.split(".")[2], x)
        fn = teal_ref.utils.SparsifyFn(distr)
        for s in (0.0, 0.1, 0.4, 0.75):
            fn.set_threshold(s)
            assert teal_threshold(Distribution.binned(x), s) == pytest.approx(fn.threshold, rel=1e-6, abs=1e-9)
        fn.set_threshold(0.4)
        assert ours.gates[name].threshold == pytest.approx(max(0.0, fn.threshold), rel=1e-6, abs=1e-9), name


class _RefLayer(nn.Module):
    """A transformers Llama block with the reference's gating functions on its linears, called the way
    TEAL's ``layer_forward`` calls its patched block."""

    def __init__(self, block, rotary, fns):
        super().__init__()
        self.block, self.rotary = block, rotary
        self.self_attn = types.SimpleNamespace(sparse_fns={k: fns[k] for k in ("q", "k", "v", "o")})
        self.mlp = types.SimpleNamespace(sparse_fns={k: fns[k] for k in ("gate", "up", "down")})
        self.handles = []
        for long, short in SHORT.items():
            owner = block.self_attn if short in ("q", "k", "v", "o") else block.mlp
            mod = getattr(owner, long)
            self.handles.append(mod.register_forward_pre_hook(lambda m, a, f=fns[short]: (f.apply(a[0]),)))

    def forward(self, hidden, attention_mask, position_ids, *rest):
        return (self.block(hidden, attention_mask=None, position_ids=position_ids,
                           position_embeddings=self.rotary(hidden, position_ids)),)


def test_teal_greedy_search_matches_the_reference(teal_ref, setup, tmp_path):
    model, calib, _ = setup
    prefix, blocks = find_blocks(model)
    chunk = capture_inputs(model, blocks, calib, calib.shape[0], torch.device("cpu"))[0]
    layers = [t for t in select(model) if t.name.startswith(f"{prefix}.0.")]
    ctx = BlockCalibration.collect(0, blocks[0], layers, [(chunk.hidden, chunk.kwargs)])
    dists = {t.name: Distribution.binned(ctx.input(t.name)) for t in layers}
    target, step = 0.3, 0.05
    with torch.no_grad():
        ours = greedy_path(ctx, target, lambda n, v: teal_threshold(dists[n], v), "none", step, 1.0)

    # the reference: histograms of the same inputs, its SparsifyFns, its process_layer on the same block input
    xs = {t.name: ctx.input(t.name).reshape(chunk.hidden.shape[0], chunk.hidden.shape[1], -1) for t in layers}
    fns = {SHORT[n.rsplit(".", 1)[-1]]: teal_ref.utils.SparsifyFn(
        _reference_distribution(teal_ref, tmp_path, SHORT[n.rsplit(".", 1)[-1]], x)) for n, x in xs.items()}
    teal_ref.greedy.weight_dict["tiny"] = {SHORT[n.rsplit(".", 1)[-1]]: w for n, w in layer_weights(ctx).items()}
    (tmp_path / "ref" / "activations").mkdir(parents=True)
    torch.save(chunk.hidden, tmp_path / "ref" / "activations" / "act_0.pt")
    layer = _RefLayer(blocks[0], model.model.rotary_emb, fns)
    with torch.no_grad():
        teal_ref.greedy.process_layer(layer, "tiny", 0, target, step, 1.0, str(tmp_path / "ref"))
    with open(tmp_path / "ref" / "lookup" / "layer-0" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(ours) > 10
    for (eff, levels), row in zip(ours, rows):
        assert eff == pytest.approx(float(row["Effective Sparsity"]), rel=1e-9)
        assert {SHORT[n.rsplit(".", 1)[-1]]: v for n, v in levels.items()} == \
            pytest.approx({k: float(row[k]) for k in fns}, rel=1e-9)


def test_teal_model_outputs_match_the_reference_gating(teal_ref, setup, tmp_path):
    model, calib, ev = setup
    xs = _inputs(model, calib)
    ours = calibrate_activations(model, calib, select(model), 0.5, "teal", {"greedy": False, "stream": "ungated"},
                                 progress=False)
    handles = []
    for name, x in xs.items():
        fn = teal_ref.utils.SparsifyFn(_reference_distribution(teal_ref, tmp_path, name.replace(".", "_"), x))
        fn.set_threshold(0.5)
        mod = dict(model.named_modules())[name]
        handles.append(mod.register_forward_pre_hook(lambda m, a, f=fn: (f.apply(a[0]),)))
    with torch.no_grad():
        ref = model(input_ids=ev).logits
    for h in handles:
        h.remove()
    from prunus.activation import attach_gates, detach_gates

    attach_gates(model, ours.gates)
    with torch.no_grad():
        got = model(input_ids=ev).logits
    detach_gates(model)
    with torch.no_grad():
        dense = model(input_ids=ev).logits
    assert not torch.allclose(got, dense, atol=1e-3)  # the gates do something
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_wina_thresholds_and_gating_match_the_reference(wina_ref, setup, tmp_path):
    model, calib, ev = setup
    xs = _inputs(model, calib)
    evs = _inputs(model, ev)
    modules = dict(model.named_modules())
    for name, x in xs.items():
        norms = modules[name].weight.norm(dim=0)
        key = name.replace(".", "_")
        am = wina_ref.utils.ActivationModule(str(tmp_path / key))
        for row in x:  # the reference grabs |x * ||W[:, j]||| in float16
            am.grab_activations((row * norms).unsqueeze(0), key)
        am.find_histogram()
        am.save_histogram()
        fn = wina_ref.utils.SparsifyFn(wina_ref.utils.Distribution(str(tmp_path / key), key), sparse_mode="wina",
                                       mask_by="threshold")
        scores16 = (x * norms).to(torch.float16).abs().float()  # the values the reference's histogram holds
        for s in (0.0, 0.2, 0.5, 0.9):
            fn.set_threshold(s)
            assert score_threshold(Distribution.exact(scores16), s) == pytest.approx(fn.threshold, rel=2e-3, abs=1e-6)
        # the gating itself, on other inputs: the reference masks score > t, prunus keeps score >= t
        fn.set_threshold(0.5)
        e = evs[name]
        ref = e * fn.apply(e * norms).to(e.dtype)
        torch.testing.assert_close(gate_input(e, fn.threshold, norms), ref, rtol=0, atol=0)
