"""Checkpoints written by an earlier prunus (format version 2) still load, tensor for tensor.

The fixtures in tests/fixtures/ were written by tests/fixtures/make_v2_checkpoints.py with the
format-version-2 code, before the kernels/export refactor; ``v2_expected.json`` holds a SHA-256 of
every tensor and mask recorded at write time.
"""

import hashlib
import json
from pathlib import Path

import pytest
import torch

import prunus
from prunus import export

FIXTURES = Path(__file__).resolve().parent / "fixtures"
EXPECTED = json.loads((FIXTURES / "v2_expected.json").read_text())


def sha(t: torch.Tensor) -> str:
    """SHA-256 of the raw bytes, -0.0 read as 0.0 (a pruned weight stored sparse loads as +0.0)."""
    t = t.detach().to("cpu")
    flat = (t + 0.0 if t.is_floating_point() else t).contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy()).hexdigest()


@pytest.mark.parametrize("fmt", ["compressed", "dense"])
def test_v2_checkpoint_loads_with_the_recorded_tensors(fmt):
    path = FIXTURES / f"v2_{fmt}"
    assert export.detect_format(path) == fmt
    assert export.read_manifest(path)["format_version"] == EXPECTED["format_version"]
    model = prunus.load(path, runtime="dense")
    state = {k: sha(v) for k, v in sorted(model.state_dict().items())}
    assert state == EXPECTED["tensors"]
    masks = export.load_masks(path)
    assert {k: sha(v) for k, v in sorted(masks.items())} == EXPECTED["masks"]
    assert all(bool((m.reshape(m.shape[0], -1, 4).sum(-1) <= 2).all()) for m in masks.values())
    assert export.read_metadata(path)["method"] == "magnitude"


def test_v2_compressed_has_coded_values():
    layout = export.read_manifest(FIXTURES / "v2_compressed")["tensors"]
    assert any(info.get("coding") == "exp-huffman-v1" for info in layout.values())
    assert {info["encoding"] for info in layout.values()} >= {"bitmask", "dense"}


def test_v2_stored_kernel_plan_is_applied():
    from prunus.kernels import SparseLinear

    path = FIXTURES / "v2_compressed"
    model = prunus.load(path)
    sparse = {n: m.kernel for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    assert sparse == {n: "torch_csr" for n in EXPECTED["planned"]}
    dense = prunus.load(path, runtime="dense")
    assert not any(isinstance(m, SparseLinear) for m in export.load(path).modules())  # weights only
    ids = torch.arange(10).reshape(1, 10)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, dense(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)
    for name in EXPECTED["planned"]:
        assert sha(model.get_submodule(name).dense_weight()) == EXPECTED["tensors"][name + ".weight"]
