"""Sparse kernels against the masked dense product; plans, their JSON and their errors."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunus.errors import PrunusError
from prunus.kernels import (KERNELS, KernelError, KernelSpec, SparseLinear, cpu, infer_pattern,
                            kernels_for, mask_satisfies, register_kernel)
from prunus.kernels.plans import LayerPlan, Plan, apply_plan, plan_model
from prunus.kernels.timing import time_linear
from prunus.core.spec import NM, Block, Unstructured

HAS_COMPILED = cpu.compiled_available()
CPU_KERNELS = ["torch_csr"] + (["cpu_csr", "cpu_bitmap"] if HAS_COMPILED else [])
BLOCK_KERNELS = ["torch_bsr"] + (["cpu_bsr"] if HAS_COMPILED else [])


def _linear(out_f: int, in_f: int, bias: bool, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias)


def _check(sp: nn.Module, lin: nn.Linear, mask: torch.Tensor, shape: tuple[int, ...]) -> None:
    x = torch.randn(*shape)
    ref = F.linear(x, lin.weight.detach() * mask, None if lin.bias is None else lin.bias.detach())
    y = sp(x)
    assert y.shape == ref.shape
    torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)


INPUTS = [(1, None), (3, None), (2, 5, None), (9, None), (16, None), (41, None)]


@pytest.mark.parametrize("kernel", CPU_KERNELS)
@pytest.mark.parametrize("shape", [(37, 53), (64, 64), (8, 300)])
@pytest.mark.parametrize("density", [0.0, 0.07, 0.5, 1.0])
@pytest.mark.parametrize("bias", [True, False])
def test_csr_kernels_match_dense(kernel: str, shape: tuple[int, int], density: float,
                                 bias: bool) -> None:
    lin = _linear(*shape, bias)
    mask = torch.rand(shape) < density
    sp = SparseLinear.from_dense(lin, mask, kernel)
    assert sp.kernel == kernel
    for dims in INPUTS:
        _check(sp, lin, mask, tuple(shape[1] if d is None else d for d in dims))
    torch.testing.assert_close(sp.dense_weight(), (lin.weight * mask).detach())


def test_empty_rows_and_wide_inputs() -> None:
    # empty rows, a fully dense row, and in_features past the uint16 index range
    lin = _linear(6, 70000, True)
    mask = torch.zeros(6, 70000, dtype=torch.bool)
    mask[1, ::7] = True
    mask[3] = True
    mask[5, 65530:] = True
    for kernel in CPU_KERNELS:
        sp = SparseLinear.from_dense(lin, mask, kernel)
        for n in (1, 5):
            _check(sp, lin, mask, (n, 70000))


@pytest.mark.skipif(not HAS_COMPILED, reason="compiled CPU kernels unavailable")
def test_compiled_csr_uses_uint16_indices_past_32767() -> None:
    lin = _linear(4, 40000, False)
    mask = torch.zeros(4, 40000, dtype=torch.bool)
    mask[:, 39990:] = True
    mask[2, :3] = True
    sp = SparseLinear.from_dense(lin, mask, "cpu_csr")
    assert sp.col.dtype == torch.int16
    _check(sp, lin, mask, (1, 40000))
    _check(sp, lin, mask, (3, 40000))


@pytest.mark.parametrize("kernel", BLOCK_KERNELS)
@pytest.mark.parametrize("block", [(4, 4), (2, 2), (4, 1), (1, 4), (8, 2)])
@pytest.mark.parametrize("bias", [True, False])
def test_block_kernels_match_dense(kernel: str, block: tuple[int, int], bias: bool) -> None:
    r, c = block
    if kernel == "torch_bsr" and r != c:
        pytest.skip("MKL BSR takes square blocks only")
    lin = _linear(8 * 5, 8 * 7, bias)
    keep = torch.rand(40 // r, 56 // c) < 0.4
    mask = keep.repeat_interleave(r, 0).repeat_interleave(c, 1)
    sp = SparseLinear.from_dense(lin, mask, kernel, pattern=Block(r, c))
    for dims in INPUTS:
        _check(sp, lin, mask, tuple(56 if d is None else d for d in dims))
    torch.testing.assert_close(sp.dense_weight(), (lin.weight * mask).detach())


@pytest.mark.parametrize("kernel", CPU_KERNELS + BLOCK_KERNELS)
def test_wrong_input_width_is_refused(kernel: str) -> None:
    lin = _linear(8, 64, True)
    sp = SparseLinear.from_dense(lin, torch.rand(8, 64) < 0.5, kernel, pattern=Block(4, 4))
    with pytest.raises(RuntimeError):
        sp(torch.randn(2, 60))


def test_block_pattern_inferred_and_applicability() -> None:
    keep = torch.rand(4, 6) < 0.5
    keep[0, 0], keep[0, 1] = True, False
    mask = keep.repeat_interleave(8, 0).repeat_interleave(8, 1)  # (32, 48)
    assert infer_pattern(mask) == Block(8, 8)
    assert infer_pattern(torch.ones(4, 8, dtype=torch.bool)) == Unstructured()
    nm = torch.tensor([[1, 0, 1, 0, 0, 1, 1, 0]], dtype=torch.bool)
    assert infer_pattern(nm.repeat(3, 1)) == NM(2, 4)
    assert mask_satisfies(nm, NM(2, 4)) and not mask_satisfies(~nm | nm, NM(2, 4))
    names = [k.name for k in kernels_for((32, 48), Block(8, 8), "cpu", torch.float32)]
    assert "torch_bsr" in names and "torch_csr" in names
    names = [k.name for k in kernels_for((32, 48), Block(4, 1), "cpu", torch.float32)]
    assert "torch_bsr" not in names  # MKL: square blocks only
    assert kernels_for((32, 48), Unstructured(), "cpu", torch.float16) == []
    lin = _linear(32, 48, True)
    sp = SparseLinear.from_dense(lin, mask, "torch_bsr")  # block shape inferred
    assert sp.block == Block(8, 8)
    _check(sp, lin, mask, (3, 48))


def test_fallback_is_used_when_compiled_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in cpu.COMPILED:
        monkeypatch.setitem(KERNELS, name,
                            dataclasses.replace(KERNELS[name], available=lambda: False))
    lin = _linear(37, 53, True)
    mask = torch.rand(37, 53) < 0.2
    sp = SparseLinear.from_dense(lin, mask)  # auto
    assert sp.kernel == "torch_csr"
    _check(sp, lin, mask, (2, 3, 53))


def test_auto_picks_the_compiled_kernel_when_built() -> None:
    lin = _linear(16, 16, True)
    sp = SparseLinear.from_dense(lin, torch.rand(16, 16) < 0.3)
    assert sp.kernel == ("cpu_csr" if HAS_COMPILED else "torch_csr")
    assert SparseLinear.from_dense(lin).nnz >= 16 * 16  # mask=None keeps the non-zeros


def test_build_info_reports_status() -> None:
    info = cpu.build_info()
    assert info["loaded"] == HAS_COMPILED
    assert HAS_COMPILED or info["error"]


def _register_fake_24() -> None:
    if "test_2of4" not in KERNELS:
        base = KERNELS["torch_csr"]
        register_kernel(KernelSpec("test_2of4", "cpu", (torch.float32,), (NM,), base.build,
                                   requires=NM(2, 4), priority=-1))


def test_errors_name_the_problem() -> None:
    lin = _linear(8, 16, True)
    with pytest.raises(KernelError, match="unknown kernel 'nope'.*torch_csr"):
        SparseLinear.from_dense(lin, None, "nope")
    with pytest.raises(KernelError, match="mask shape"):
        SparseLinear.from_dense(lin, torch.ones(16, 8, dtype=torch.bool))
    _register_fake_24()
    dense_mask = torch.ones(8, 16, dtype=torch.bool)
    with pytest.raises(KernelError, match=r"blocks\.0\.up: kernel 'test_2of4' needs a 2:4 mask"):
        SparseLinear.from_dense(lin, dense_mask, "test_2of4", name="blocks.0.up")
    mask24 = torch.tensor([1, 1, 0, 0], dtype=torch.bool).repeat(8, 4)
    sp = SparseLinear.from_dense(lin, mask24, "test_2of4")
    _check(sp, lin, mask24, (3, 16))
    with pytest.raises(KernelError, match="float32"):
        SparseLinear.from_dense(lin.half(), None, "torch_csr")
    with pytest.raises(KernelError, match="needs a block pattern"):
        SparseLinear.from_dense(_linear(8, 16, True), torch.rand(8, 16) < 0.5, "torch_bsr")
    assert issubclass(KernelError, PrunusError)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_without_cuda_is_a_clear_error() -> None:
    with pytest.raises(KernelError, match="CUDA is not available"):
        time_linear(torch.randn(8, 8), None, [1], device="cuda")
    with pytest.raises(KernelError, match="CUDA is not available"):
        plan_model(nn.Sequential(nn.Linear(8, 8)), {"0": torch.ones(8, 8, dtype=torch.bool)}, [1],
                   device="cuda")
    assert kernels_for((8, 8), Unstructured(), "cuda", torch.float16) == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_kernels_match_dense() -> None:
    for spec in [k for k in KERNELS.values() if k.device == "cuda" and k.available()]:
        dtype = spec.dtypes[0]
        lin = _linear(64, 128, True).to("cuda", dtype)
        pattern = spec.requires or Unstructured()
        mask = (torch.tensor([1, 1, 0, 0], dtype=torch.bool).repeat(64, 32) if pattern == NM(2, 4)
                else torch.rand(64, 128) < 0.3).cuda()
        sp = SparseLinear.from_dense(lin, mask, spec.name)
        x = torch.randn(16, 128, device="cuda", dtype=dtype)
        ref = F.linear(x, lin.weight * mask, lin.bias)
        torch.testing.assert_close(sp(x), ref, atol=2e-2, rtol=2e-2)


def test_time_linear_rows() -> None:
    lin = _linear(32, 48, True)
    rows = time_linear(lin, torch.rand(32, 48) < 0.1, [1, 3], repeats=2, warmup=1,
                       min_sample_ms=0.05, threads=1)
    assert {r.kernel for r in rows} == set(CPU_KERNELS)
    assert {r.tokens for r in rows} == {1, 3}
    for r in rows:
        d = r.to_dict()
        for key in ("device", "out_features", "in_features", "pattern", "sparsity", "tokens",
                    "dtype", "dense_ms", "sparse_ms", "speedup", "kernel"):
            assert key in d
        assert d["device"] == "cpu" and d["dtype"] == "float32" and d["threads"] == 1
        assert r.speedup == pytest.approx(r.dense_ms / r.sparse_ms)
    with pytest.raises(KernelError, match="positive"):
        time_linear(lin, None, [0])


def _tiny_model() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 32), nn.ReLU(),
                          nn.Sequential(nn.Linear(32, 24, bias=False), nn.Linear(24, 8)))
    masks = {"0": torch.rand(32, 48) < 0.1, "2.0": torch.rand(24, 32) < 0.5,
             "2.1": torch.rand(8, 24) < 0.3}
    with torch.no_grad():
        for name, m in masks.items():
            model.get_submodule(name).weight.mul_(m)
    return model, masks


def _fast_plan(model: nn.Module, masks: dict[str, torch.Tensor], **kw) -> Plan:
    return plan_model(model, masks, [1, 2], repeats=2, warmup=1, min_sample_ms=0.05, threads=1,
                      **kw)


def test_plan_round_trips_and_applies(tmp_path) -> None:
    model, masks = _tiny_model()
    plan = _fast_plan(model, masks, margin=1e-9)  # any kernel "pays": exercise the swap
    assert [layer.name for layer in plan.layers] == ["0", "2.0", "2.1"]
    assert all(layer.kernel != "dense" and layer.timings for layer in plan.layers)
    assert "all >=" in plan.layers[0].reason
    path = tmp_path / "plan.json"
    plan.save(path)
    again = Plan.load(path)
    assert again == plan
    assert json.loads(path.read_text())["layers"][1]["out_features"] == 24
    x = torch.randn(2, 5, 48)
    with torch.no_grad():
        ref = model(x)
        applied = apply_plan(model, again, masks)
        assert applied == plan.kernels
        assert isinstance(model[0], SparseLinear) and isinstance(model[2][1], SparseLinear)
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)
    assert apply_plan(model, again, masks) == plan.kernels  # idempotent
    print(plan.table())


def test_plan_keeps_dense_when_not_faster() -> None:
    model, masks = _tiny_model()
    plan = _fast_plan(model, masks, margin=1e9)
    assert all(layer.kernel == "dense" for layer in plan.layers)
    assert "below" in plan.layers[0].reason
    assert apply_plan(model, plan, masks) == {}
    assert isinstance(model[0], nn.Linear)


def test_plan_reuses_measurements_of_identical_layers() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
    masks = {"0": torch.rand(32, 32) < 0.25, "1": torch.rand(32, 32) < 0.25}
    masks["1"] = masks["0"].flip(0)
    plan = _fast_plan(model, masks)
    assert "timed on 0" in plan.layers[1].reason
    assert plan.layers[1].timings == plan.layers[0].timings


def test_plan_mismatch_and_bad_input_errors() -> None:
    model, masks = _tiny_model()
    plan = _fast_plan(model, masks, margin=1e-9)
    other = nn.Sequential(nn.Linear(48, 32), nn.ReLU(),
                          nn.Sequential(nn.Linear(32, 20, bias=False), nn.Linear(20, 8)))
    with pytest.raises(KernelError, match=r"'2\.0' is 24x32 in the plan but 20x32 in the model"):
        apply_plan(other, plan, masks)
    with pytest.raises(KernelError, match=r"layer '2\.1' is not in it"):
        apply_plan(nn.Sequential(nn.Linear(48, 32), nn.ReLU(), nn.Sequential(nn.Linear(32, 24))),
                   plan)
    with pytest.raises(KernelError, match="no masks"):
        plan_model(model, {}, [1])
    with pytest.raises(KernelError, match="no masks"):
        plan_model(model, None, [1])
    with pytest.raises(KernelError, match="'missing' has no matching module"):
        plan_model(model, {"missing": torch.ones(2, 2, dtype=torch.bool)}, [1])
    with pytest.raises(KernelError, match="not a prunus kernel plan"):
        Plan.from_json('{"layers": []}')
    with pytest.raises(KernelError, match="not valid JSON"):
        Plan.from_json("{")
    bad = Plan(plan.device, plan.dtype, 1, (1,), 1.1,
               (LayerPlan("0", 32, 48, "0.9", 0.9, "no_such_kernel", "test"),))
    with pytest.raises(KernelError, match="no_such_kernel"):
        apply_plan(model, bad, masks, strict=True)
    with pytest.warns(RuntimeWarning, match="stays dense"):
        assert apply_plan(model, bad, masks) == {}


def test_tiny_llama_with_a_plan_gives_the_masked_logits(tiny_llama) -> None:
    model = tiny_llama
    gen = torch.Generator().manual_seed(0)
    masks = {name: torch.rand(m.weight.shape, generator=gen) > 0.8
             for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and name.startswith("model.layers.")}
    with torch.no_grad():
        for name, m in masks.items():
            model.get_submodule(name).weight.mul_(m)
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=gen)
    with torch.no_grad():
        ref = model(ids).logits
    plan = plan_model(model, masks, [1], margin=1e-9, repeats=1, warmup=1, min_sample_ms=0.01,
                      cold=False)
    assert len(plan.layers) == len(masks)
    applied = apply_plan(model, plan, masks)
    assert set(applied) == set(masks)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, atol=1e-4, rtol=1e-4)
        out = model.generate(ids[:1], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 10)


class _MaskedDenseLinear(SparseLinear):
    """A kernel defined here: the masked weight kept dense (a stand-in for a new backend)."""

    kernel = "test_masked_dense"

    def __init__(self, weight: torch.Tensor, mask: torch.Tensor, bias) -> None:
        super().__init__(weight.shape[1], weight.shape[0], bias)
        self.register_buffer("w", (weight * mask).contiguous(), persistent=False)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.w, self.bias)

    def dense_weight(self) -> torch.Tensor:
        return self.w


@pytest.fixture
def test_kernel():
    from prunus.kernels import ALL_PATTERNS, unregister_kernel

    spec = register_kernel(KernelSpec("test_masked_dense", "cpu", (torch.float32,), ALL_PATTERNS,
                                      lambda w, m, b, p, name: _MaskedDenseLinear(w, m, b),
                                      priority=-5, description="a test's own kernel"))
    yield spec
    unregister_kernel(spec.name)
    assert spec.name not in KERNELS


def test_a_kernel_defined_in_a_test_is_selected_and_planned_by_name(test_kernel) -> None:
    lin = _linear(16, 32, bias=True)
    mask = torch.rand(16, 32, generator=torch.Generator().manual_seed(0)) > 0.5
    with torch.no_grad():
        lin.weight.mul_(mask)
    assert test_kernel in kernels_for((16, 32), Unstructured(), "cpu", torch.float32)
    sp = SparseLinear.from_dense(lin, mask, "test_masked_dense")
    assert isinstance(sp, _MaskedDenseLinear)
    _check(sp, lin, mask, (3, 32))
    model = nn.Sequential(lin)
    plan = plan_model(model, {"0": mask}, [1], 1e-9, kernels=["test_masked_dense"], repeats=1,
                      warmup=0, min_sample_ms=0.01)
    assert plan.kernels == {"0": "test_masked_dense"}
    assert apply_plan(model, Plan.from_json(plan.to_json()), {"0": mask}) == {"0": "test_masked_dense"}
    assert isinstance(model[0], _MaskedDenseLinear)
    with pytest.raises(KernelError, match="already registered"):
        register_kernel(test_kernel)
