"""Every bundled recipe parses into a valid job (the edge where strings become typed objects)."""

from pathlib import Path

import pytest

from prunus.io.recipe import load_recipe
from prunus.oneshot.job import job_from_mapping

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", [p for p in RECIPES if "task:" not in p.read_text()], ids=lambda p: p.name)  # training recipes have a task
def test_recipe_parses(path):
    job = job_from_mapping(load_recipe(path))
    assert job.methods and job.specs


def test_override_changes_typed_job():
    job = job_from_mapping(load_recipe(Path(__file__).parent.parent / "recipes/sparsegpt_2of4.yaml", ["nsamples=8", "sparsity=4:8",
                                                                    "method_options.blocksize=64"]))
    assert job.methods == ("sparsegpt",) and job.nsamples == 8 and str(job.specs[0]) == "4:8"
    opts = job.options_of("sparsegpt")
    assert (opts.blocksize, opts.percdamp) == (64, 0.01)  # typed: the dataclass, not a mapping
    assert type(opts).__name__ == "SparseGPTOptions"
