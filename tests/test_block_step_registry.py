"""The block-step registry: a step defined outside the package shows in ``prunus list`` and runs from the CLI."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file

from prunus.cli import main
from prunus.oneshot import steps
from prunus.oneshot.steps import BlockContext, block_step

FAST = ["--nsamples", "4", "--seqlen", "32", "--windows", "4", "--quiet"]
NAME = "scale-kept-test"


@dataclass(frozen=True)
class ScaleOptions:
    factor: float = 1.0


@pytest.fixture
def scale_step():
    """Registers ``scale-kept-test`` (scales a block's kept weights; records each call); removed afterwards."""
    calls: list[tuple[int, float, list[str]]] = []

    @block_step(NAME, options=ScaleOptions, paper="test only", label="+scaled")
    def scale(ctx: BlockContext, options: ScaleOptions) -> None:
        calls.append((ctx.index, options.factor, [t.name for t in ctx.targets]))
        for t in ctx.targets:
            t.set(t.get() * options.factor)

    steps.load_all()
    yield calls
    steps.STEPS.pop(NAME, None)


def test_a_second_registration_under_the_same_name_is_refused(scale_step):
    with pytest.raises(ValueError, match="already registered"):
        block_step(NAME)(lambda ctx, o: None)


def test_listed_then_gone(capsys, scale_step):
    assert main(["list"]) == 0
    out, _ = capsys.readouterr()
    line = next(x for x in out.splitlines() if NAME in x)
    assert "block step" in line and "test only" in line
    del steps.STEPS[NAME]
    assert main(["list"]) == 0
    assert NAME not in capsys.readouterr()[0]


def _prune(capsys, model_dir, calib, out, *extra):
    code = main([str(a) for a in ("prune", model_dir, *extra, "--method", "magnitude", "--sparsity", "0.5",
                                  "--calib", calib, "--no-baselines", "--out", out, "--format", "dense",
                                  "--json", out.parent / f"{out.name}.json", *FAST)])
    _, err = capsys.readouterr()
    assert code == 0, err
    return load_file(out / "model.safetensors"), json.loads((out.parent / f"{out.name}.json").read_text())


def test_runs_from_the_cli_with_an_option(tmp_path, capsys, tiny_llama_dir, text_files, scale_step):
    calib, _ = text_files
    plain, _ = _prune(capsys, tiny_llama_dir, calib, tmp_path / "plain")
    assert scale_step == []
    scaled, r = _prune(capsys, tiny_llama_dir, calib, tmp_path / "scaled", f"steps.{NAME}.factor=0.5",
                       "--step", NAME)
    assert [(i, f) for i, f, _ in scale_step] == [(0, 0.5), (1, 0.5)]  # once per block, typed option
    assert all(all(n.startswith(f"model.layers.{i}.") for n in names) and len(names) == 7
               for i, _, names in scale_step)
    assert r["runs"][0]["label"] == "magnitude+scaled"
    assert r["sparsity"] == pytest.approx(0.5)
    lin = [k for k in plain if k.startswith("model.layers.") and k.endswith("proj.weight")]
    assert len(lin) == 14
    for k in lin:  # magnitude masks do not depend on the data: the saved weights are exactly halved
        assert torch.equal(scaled[k], plain[k] * 0.5), k
    norm = "model.layers.0.input_layernorm.weight"
    assert torch.equal(scaled[norm], plain[norm])  # only the targets were touched
