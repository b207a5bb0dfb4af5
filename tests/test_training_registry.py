"""A training method registered from outside the package is listed and trains from the CLI, hooks included."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

pytest.importorskip("sklearn")

from prunus import cli  # noqa: E402
from prunus.core.spec import Unstructured  # noqa: E402
from prunus.training.registry import METHODS, RunPlan, TrainingMethod, WidthProblem, register, unregister  # noqa: E402
from prunus.training.sparsifier import (Sparsifier, layer_budgets, option_values, prepare,  # noqa: E402
                                        random_masks)

NAME = "test_half_static"
SEEN: dict = {}


@dataclass(frozen=True)
class HalfOptions:
    """Args:
        salt: added to the seed of the random masks.
    """

    salt: int = 0


def half_static(model, optimizer, spec, *, total_steps, seed=0, allocation=None, include=None, exclude=(),
                options=None, marker=None, **kwargs):
    """Random static masks; records what the trainer passed."""
    targets, spec, opts = prepare(model, spec, method=NAME, patterns=(Unstructured,), options=HalfOptions,
                                  values=option_values(options, kwargs), allocation=allocation,
                                  include=include, exclude=exclude)
    SEEN.update(opts=opts, marker=marker, total_steps=total_steps)
    masks = random_masks(targets, layer_budgets(targets, spec), spec.pattern, seed + opts.salt)
    return Sparsifier(model, optimizer, targets, masks, spec=spec, method=NAME, total_steps=total_steps,
                      seed=seed)


def _width(problem: WidthProblem) -> float:
    assert problem.dense_flops > 0 and problem.sparse_flops(1.0) < problem.dense_flops
    return 1.5


def _run_args(plan: RunPlan, opts: HalfOptions) -> dict:
    return {"marker": (plan.total_steps, plan.switch_step, opts.salt)}


@pytest.fixture
def registered():
    register(TrainingMethod(NAME, half_static, HalfOptions, "Test et al. 2025, a method from a test file",
                            width=_width, run_args=_run_args))
    try:
        yield
    finally:
        unregister(NAME)
        SEEN.clear()


def test_registered_method_is_listed(registered, capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert NAME in out and "Test et al. 2025" in out


def test_registered_method_trains_from_the_cli_with_its_hooks(registered, tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = cli.main(["train", "--task", "digits", "--model", "mlp", "--method", NAME, "--sparsity", "0.5",
                   "--epochs", "1", "--batch-size", "64", "--train-subset", "256", "-o", "salt=3",
                   "--json", str(out), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    doc = json.loads(out.read_text())
    assert doc["method"] == NAME and doc["width"] == 1.5
    assert doc["sparsity"] == pytest.approx(0.5, abs=1e-2)
    assert SEEN["opts"] == HalfOptions(salt=3)  # typed once at the edge, handed over as the dataclass
    assert SEEN["marker"] == (4, None, 3)  # 256 / 64 steps, one corpus


def test_unregistered_again():
    assert NAME not in METHODS
