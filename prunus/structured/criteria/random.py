"""Random unit scores: the floor every structured criterion must beat. Seeded per layer; blocks
are drawn at random too."""

from __future__ import annotations

import torch
from torch import Tensor

from prunus.structured.registry import UnitView, generator, unit_criterion


@unit_criterion("random", blocks="random", paper="baseline: units removed uniformly at random")
def random(view: UnitView, options: object) -> Tensor:
    return torch.rand(view.units, generator=generator(view.seed))
