import json
from dataclasses import dataclass

import pytest
import torch

from prunus import criteria
from prunus.algorithms import get_method
from prunus.errors import SpecError
from prunus.core.masks import topk
from prunus.core.spec import NM, Unstructured
from prunus.core.stats import LayerStats


def test_wanda_equals_formula():
    torch.manual_seed(0)
    w = torch.randn(8, 16)
    x = torch.randn(100, 16) * torch.linspace(0.1, 3, 16)
    st = LayerStats()
    st.add(x, frozenset({"input_sq_norm"}))
    expect = w.abs() * torch.sqrt((x ** 2).sum(0)).reshape(1, -1)
    assert torch.allclose(criteria.get("wanda")(w, st), expect)
    # the method compares per output row
    new_w, keep = get_method("wanda").prune(w, st, 0.5, Unstructured(), None, "l")
    assert torch.equal(keep, topk(expect, 0.5, Unstructured(), per_row=True))
    assert ((~keep).sum(1) == 8).all()
    assert torch.equal(new_w, w * keep)


def test_wanda_hand_computed():
    # activations make column 0 matter most, though its weights are smallest
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    st = LayerStats(input_sq_norm=torch.tensor([100.0, 1.0, 1.0, 1.0]))
    keep = get_method("wanda").prune(w, st, 0.5, NM(2, 4), None, "l")[1]
    assert keep.int().tolist() == [[1, 0, 0, 1]]  # scores 10, 2, 3, 4


def test_magnitude_and_random():
    w = torch.tensor([[0.1, -5.0, 0.3, 2.0]])
    keep = get_method("magnitude").prune(w, LayerStats(), 0.5, Unstructured(), None, "l")[1]
    assert keep.int().tolist() == [[0, 1, 0, 1]]
    a = criteria.get("random")(torch.zeros(4, 4), LayerStats(seed=3))
    b = criteria.get("random")(torch.zeros(4, 4), LayerStats(seed=3))
    c = criteria.get("random")(torch.zeros(4, 4), LayerStats(seed=4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_registry_errors():
    with pytest.raises(SpecError, match="registered: .*magnitude"):
        criteria.get("nope")
    with pytest.raises(SpecError, match="unknown method"):
        get_method("nope")
    with pytest.raises(ValueError, match="already registered"):
        criteria.criterion("magnitude")(lambda w, s: w)


@dataclass(frozen=True)
class ScaleOptions:
    x: float = 1.0


SEEN: list = []


@pytest.fixture
def test_criterion():
    """A criterion registered after prunus.algorithms.oneshot was imported; removed afterwards."""
    from prunus.algorithms import METHODS, load_all

    load_all()  # the score methods already exist: the new criterion must still become a method
    name = "test_scaled_magnitude"

    @criteria.criterion(name, options=ScaleOptions, paper="a test, 2026")
    def scaled(weight, stats, options):
        SEEN.append(options)
        return weight.detach().abs().float() * options.x

    SEEN.clear()
    yield name
    del criteria.CRITERIA[name]
    METHODS.pop(name, None)


def test_criterion_options_reach_the_method(test_criterion):
    meth = get_method(test_criterion)
    assert meth.options is ScaleOptions and meth.paper == "a test, 2026" and meth.needs == frozenset()
    w = torch.tensor([[0.1, -5.0, 0.3, 2.0]])
    keep = meth.prune(w, LayerStats(), 0.5, Unstructured(), ScaleOptions(x=2.0), "l")[1]
    assert keep.int().tolist() == [[0, 1, 0, 1]] and SEEN == [ScaleOptions(x=2.0)]
    meth.prune(w, LayerStats(), 0.5, Unstructured(), None, "l")  # None: the defaults
    assert SEEN[-1] == ScaleOptions()


def test_criterion_from_a_test_runs_from_the_cli(test_criterion, capsys, tmp_path, tiny_llama_dir, text_files):
    from prunus.cli import main

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert any(line.split()[:2] == ["method", test_criterion] and "a test, 2026" in line
               for line in out.splitlines())
    calib, ev = text_files
    js = tmp_path / "r.json"
    flags = ["--method", test_criterion, "--sparsity", "0.5", "--calib", str(calib), "--eval", str(ev),
             "--nsamples", "4", "--seqlen", "32", "--windows", "2", "--quiet", "--no-baselines", "--json", str(js)]
    # the dotted override sits beside the model: argparse takes positionals before the flags
    assert main(["prune", str(tiny_llama_dir), "method_options.x=0.25", *flags]) == 0, capsys.readouterr().err
    assert SEEN and all(o == ScaleOptions(x=0.25) for o in SEEN)  # coerced from the string "0.25"
    assert json.loads(js.read_text())["sparsity"] == pytest.approx(0.5)
    SEEN.clear()
    assert main(["prune", str(tiny_llama_dir), "method_options.y=1", *flags]) == 2
    err = capsys.readouterr().err
    assert f"method {test_criterion}: unknown option(s) ['y']; known: ['x']" in err and not SEEN


def test_criterion_options_must_be_a_dataclass():
    with pytest.raises(ValueError, match="dataclass"):
        criteria.criterion("test_bad_options", options=dict)
    assert "test_bad_options" not in criteria.CRITERIA
