"""prunus.io.heap on glibc (Linux CI): after a large block has been freed, glibc serves 4 MiB
tensors from its heap, and freeing them (small tensors still alive between them) leaves the resident
set where it was; with the threshold pinned and the heap trimmed, the memory goes back. Each case
runs in a fresh process (the allocator's state is per process)."""

import platform
import subprocess
import sys
from pathlib import Path

import pytest

from prunus.io import heap

ROOT = Path(__file__).resolve().parents[1]
CHILD = r"""
import resource, sys, torch
from prunus.io import heap
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() / 2**20
big = torch.empty(16 * 2**18); del big   # a freed 16 MiB mmap chunk raises glibc's dynamic threshold
fix = sys.argv[1] == "fix"
if fix:
    assert heap.fixed_mmap_threshold(1 << 20)
before = rss()
keep, ts = [], []
for _ in range(64):
    ts.append(torch.ones(2**20))   # 4 MiB each
    keep.append(torch.ones(256))   # small survivors between them
mid = rss()
del ts
if fix:
    heap.release_freed()
print(round(mid - before), round(rss() - before))
"""


def _run(case: str) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", CHILD, case], cwd=ROOT, capture_output=True, text=True,
                         check=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    grown, left = out.stdout.split()
    return int(grown), int(left)


@pytest.mark.skipif(platform.system() != "Linux" or heap._libc() is None, reason="glibc only")
def test_freed_tensors_go_back_to_the_system():
    grown, left = _run("none")
    assert grown > 200 and left > 200  # glibc keeps them
    grown, left = _run("fix")
    assert grown > 200 and left < 30


def test_without_glibc_they_do_nothing(monkeypatch):
    monkeypatch.setattr(heap, "_libc", lambda: None)
    assert heap.fixed_mmap_threshold() is False and heap.release_freed() is False
