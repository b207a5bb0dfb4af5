"""NaN/Inf checks a slice at a time: same answers as torch.isfinite on every layout."""

from __future__ import annotations

import pytest
import torch

from prunus.core import finite
from prunus.core.finite import all_finite, count_nonfinite


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(finite, "CHUNK", 7)  # many slices even on tiny tensors


@pytest.mark.parametrize("make", [
    lambda: torch.randn(13, 11),
    lambda: torch.randn(11, 13).t(),  # a transposed view: sliced, never copied
    lambda: torch.randn(3, 4, 5)[:, 1:, ::2],
    lambda: torch.randn(40),
    lambda: torch.tensor(1.5),
    lambda: torch.randn(5, 6, dtype=torch.bfloat16),
    lambda: torch.empty(0, 4),
])
def test_matches_isfinite(make, small_chunks):
    t = make()
    assert count_nonfinite(t) == 0 and all_finite(t)
    if t.numel():  # three bad entries, written through the tensor's own layout
        g = torch.Generator().manual_seed(0)
        for k, v in zip(torch.randperm(t.numel(), generator=g)[:3].tolist(), (float("nan"), float("inf"), -float("inf"))):
            t[torch.unravel_index(torch.tensor(k), t.shape)] = v
        want = int((~torch.isfinite(t)).sum())
        assert want == min(3, t.numel())
        assert count_nonfinite(t) == want and not all_finite(t)


def test_bad_entry_in_the_last_slice(small_chunks):
    t = torch.zeros(20, 3)
    t[-1, -1] = float("nan")
    assert count_nonfinite(t) == 1 and not all_finite(t)
