"""The integer-weight kernels (cpu_int8, cpu_int4, cpu_bitmap_int8, torch_int) and the runtime
path of a quantized checkpoint: exact decoding, products against F.linear on the dequantized
weight, the extremes, and the plan that picks them."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunus.cli import main
from prunus.core.quant import rtn
from prunus.core.spec import parse_quant
from prunus.kernels import KERNELS, KernelError, SparseLinear
from prunus.kernels.cpu import compiled_available
from prunus.kernels.quant_formats import bitmap_q8_arrays, q4_arrays, q4_codes

QUANT_KERNELS = ["cpu_int8", "cpu_int4", "cpu_bitmap_int8", "torch_int"]
needs_build = pytest.mark.skipif(not compiled_available(), reason="compiled kernels unavailable")


def _layer(out_f, in_f, sparsity, spec, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    keep = torch.rand(out_f, in_f, generator=g) >= sparsity
    qw = rtn(w, keep, parse_quant(spec), "t")
    lin = nn.Linear(in_f, out_f)
    lin.weight.data = qw.dequantize()
    return lin, keep, qw


def _serves(kernel, qw):
    return KERNELS[kernel].quant(qw.quant, tuple(qw.codes.shape))


@pytest.mark.parametrize("spec", ["int8", "int8z", "int8g64", "int4g32", "int4g64z", "int4c"])
@pytest.mark.parametrize("shape", [(40, 128), (7, 576)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 1.0])
def test_kernels_match_the_dequantized_weight(spec, shape, sparsity):
    lin, keep, qw = _layer(*shape, sparsity, spec)
    ref = qw.dequantize()
    ran = 0
    for kernel in QUANT_KERNELS:
        if not _serves(kernel, qw) or (kernel.startswith("cpu_") and not compiled_available()):
            continue
        m = SparseLinear.from_dense(lin, keep, kernel, qweight=qw)
        assert torch.equal(m.weight, ref), kernel  # the stored format decodes exactly
        for n in (1, 2, 3, 5, 16, 21):  # the token tiles and the prefill path (>= 16)
            x = torch.randn(n, shape[1])
            exact = F.linear(x.double(), ref.double(), lin.bias.double())
            # float32 sums of up to `in` terms of size <= 16 * scale * |x| (codes and zero points
            # are summed apart); one code off by one would be an error of about scale * |x_c|
            tol = 4 * shape[1] * 2.0 ** -24 * 16 * float(qw.scales.max()) * x.abs().sum(1, keepdim=True)
            err = (m(x).double() - exact).abs()
            assert bool((err <= tol + 1e-6).all()), (kernel, n, float(err.max()))
        ran += 1
    assert ran >= 1


def test_all_pruned_gives_the_bias():
    lin, keep, qw = _layer(16, 128, 1.0, "int8")
    assert not keep.any()
    for kernel in ("cpu_int8", "cpu_bitmap_int8", "torch_int"):
        if kernel.startswith("cpu_") and not compiled_available():
            continue
        m = SparseLinear.from_dense(lin, keep, kernel, qweight=qw)
        torch.testing.assert_close(m(torch.randn(3, 128)), lin.bias.expand(3, -1))


def test_hand_computed_int8_row():
    # one row, int8 per channel: max |w| = 2.54 -> scale 0.02 (rounded up onto the float16 grid:
    # 0.0200042724609375); codes 127, -63, 0 (pruned), 25
    w = torch.tensor([[2.54, -1.26, 0.5, 0.5]] * 1)
    keep = torch.tensor([[True, True, False, True]])
    qw = rtn(w.repeat(1, 4), keep.repeat(1, 4), parse_quant("int8"), "t")
    assert qw.codes[0, :4].tolist() == [127, -63, 0, 25]
    lin = nn.Linear(16, 1, bias=False)
    lin.weight.data = qw.dequantize()
    x = torch.ones(1, 16)
    want = 4 * 0.0200042724609375 * (127 - 63 + 25)
    for kernel in ("cpu_int8", "cpu_bitmap_int8", "torch_int"):
        if kernel.startswith("cpu_") and not compiled_available():
            continue
        got = SparseLinear.from_dense(lin, keep.repeat(1, 4), kernel, qweight=qw)(x)
        assert abs(float(got) - want) < 1e-4, kernel


def test_int4_packing_round_trips():
    _, _, qw = _layer(3, 64, 0.5, "int4g32z")
    packed, _, zeros, _ = q4_arrays(qw)
    assert packed.shape == (3, 32)
    assert torch.equal(q4_codes(packed, 64), qw.codes.to(torch.int16))
    _, _, qs = _layer(3, 64, 0.5, "int4g32")
    packed, _, zeros, _ = q4_arrays(qs)
    assert torch.equal(q4_codes(packed, 64) - 8, qs.codes.to(torch.int16)) and bool((zeros == 8).all())


def test_bitmap_int8_stores_only_kept_values():
    _, keep, qw = _layer(5, 100, 0.75, "int8")
    ptr, bits, vals, scales, _ = bitmap_q8_arrays(qw)
    assert int(ptr[-1]) == int(keep.sum()) and vals.numel() == int(keep.sum()) + 64
    assert bits.shape == (5, 2)


def test_quant_kernel_refuses_a_float_layer_and_wrong_grid():
    lin, keep, qw = _layer(8, 64, 0.5, "int8")
    with pytest.raises(KernelError, match="not stored quantized"):
        SparseLinear.from_dense(lin, keep, "torch_int")
    with pytest.raises(KernelError, match="cannot serve int8"):
        SparseLinear.from_dense(lin, keep, "cpu_int4", qweight=qw)
    _, _, qz = _layer(8, 64, 0.5, "int8z")
    with pytest.raises(KernelError, match="cannot serve int8z"):
        SparseLinear.from_dense(lin, keep, "cpu_bitmap_int8", qweight=qz)


FAST = ["--nsamples", "4", "--seqlen", "32", "--quiet", "--no-baselines"]


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, tiny_llama_dir, text_files):
    out = tmp_path_factory.mktemp("q") / "ck"
    assert main(["prune", str(tiny_llama_dir), "--method", "magnitude", "--sparsity", "50%+int8",
                 "--calib", str(text_files[0]), "--out", str(out), *FAST]) == 0
    return out


def test_load_quantized_gives_stored_codes(quantized):
    from prunus import export

    qws = export.load_quantized(quantized)
    masks = export.load_masks(quantized)
    assert set(masks) <= set(qws)
    model = export.load(quantized)
    for name, qw in qws.items():
        mod = model.get_submodule(name)
        assert torch.equal(qw.dequantize(), mod.weight.detach()), name


@needs_build
def test_export_auto_plans_integer_kernels(tmp_path, quantized):
    import prunus
    from prunus.export import read_metadata

    out = tmp_path / "planned"
    assert main(["export", str(quantized), "--runtime", "auto", "--out", str(out), "--margin", "1e-9",
                 "--tokens", "1,3"]) == 0
    plan = read_metadata(out)["kernel_plan"]
    quant_layers = [layer for layer in plan["layers"] if layer["quant"]]
    assert quant_layers and all(layer["quant"] == "int8" for layer in quant_layers)
    planned = prunus.load(out)
    kinds = {type(m).__name__ for m in planned.modules() if isinstance(m, SparseLinear)}
    assert kinds  # something was swapped in
    dense = prunus.load(out, runtime="dense")
    ids = torch.randint(0, 300, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(planned(input_ids=ids).logits, dense(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)
    # the re-saved checkpoint still stores the integers
    from prunus import export

    assert export.load_quantized(out)


def test_apply_plan_without_qweights_is_clear(tmp_path, quantized):
    from prunus import export
    from prunus.kernels.plans import LayerPlan, Plan, apply_plan

    model = export.load(quantized)
    name = next(iter(export.load_masks(quantized)))
    mod = model.get_submodule(name)
    plan = Plan("cpu", "float32", 1, (1,), 1.1, (LayerPlan(name, mod.out_features, mod.in_features,
                                                           "unstructured@0.5", 0.5, "torch_int",
                                                           "test", (), "int8"),))
    with pytest.raises(KernelError, match="stored integer weights"):
        apply_plan(model, plan, export.load_masks(quantized))


@needs_build
def test_quantized_plan_where_its_kernels_cannot_run(tmp_path, quantized, monkeypatch):
    """A plan naming an integer kernel this machine cannot run: the layer runs dense from its
    decoded floats (same logits), with a warning that says so and why."""
    import dataclasses

    import prunus
    from prunus.kernels import registry

    out = tmp_path / "planned"
    assert main(["export", str(quantized), "--runtime", "auto", "--out", str(out), "--margin", "1e-9",
                 "--tokens", "1"]) == 0
    planned_kernels = {layer["kernel"] for layer in
                       prunus.export.read_metadata(out)["kernel_plan"]["layers"]}
    for name in planned_kernels - {"dense"}:
        spec = registry.KERNELS[name]
        monkeypatch.setitem(registry.KERNELS, name, dataclasses.replace(
            spec, available=lambda: False, unavailable_reason=lambda: "no compiler here"))
    with pytest.warns(RuntimeWarning, match="no compiler here"):
        model = prunus.load(out)
    assert not any(isinstance(m, SparseLinear) for m in model.modules())
    dense = prunus.load(out, runtime="dense")
    ids = torch.randint(0, 300, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, dense(input_ids=ids).logits)


def _vnni():
    return compiled_available() and bool(torch.ops.prunus_cpu.vnni())


@pytest.mark.skipif(not _vnni(), reason="no AVX-512 VNNI build here")
@pytest.mark.parametrize("kernel,spec,width", [("cpu_int8_a8", "int8", 100),
                                               ("cpu_bitmap_int8_a8", "int8", 100),
                                               ("cpu_int4_a8", "int4g64", 128),
                                               ("cpu_int4_a8", "int4g64z", 192),
                                               ("cpu_int4_a8", "int4c", 64)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 1.0])
def test_w8a8_matches_its_own_definition(kernel, spec, width, sparsity):
    """W8A8 / W4A8 = the product of the integer weight with the activation rounded per token to
    int8: checked against that definition in float64 (and it is NOT the float product)."""
    lin, keep, qw = _layer(33, width, sparsity, spec)
    m = SparseLinear.from_dense(lin, keep, kernel, qweight=qw)
    assert torch.equal(m.weight, qw.dequantize())
    for n in (1, 2, 5, 19):
        x = torch.randn(n, width)
        sx = x.abs().amax(1, keepdim=True) / 127
        xq = torch.clamp(torch.round(x / sx), -127, 127) * sx
        want = F.linear(xq.double(), qw.dequantize().double(), lin.bias.double())
        assert float((m(x).double() - want).abs().max()) < 1e-4
    if sparsity < 1.0:
        x = torch.randn(4, width)
        assert float((m(x) - F.linear(x, qw.dequantize(), lin.bias)).abs().max()) > 1e-5


def test_w8a8_only_when_asked():
    from prunus.kernels.registry import kernels_for
    from prunus.core.spec import Unstructured

    q = parse_quant("int8")
    exact = {k.name for k in kernels_for((8, 64), Unstructured(), "cpu", torch.float32, quant=q,
                                         available_only=False)}
    approx = {k.name for k in kernels_for((8, 64), Unstructured(), "cpu", torch.float32, quant=q,
                                          available_only=False, approximate=True)}
    assert "cpu_int8_a8" not in exact and "cpu_int8_a8" in approx
    assert not KERNELS["cpu_int8_a8"].applicable((8, 64), Unstructured(), "cpu", torch.float32,
                                                 parse_quant("int8g64"))


@needs_build
def test_compiled_model_with_kernels_matches_eager(tiny_llama):
    """torch.compile traces the prunus ops (their shape functions are registered)."""
    from prunus.kernels.compiled_model import compile_model

    model = tiny_llama
    for name, mod in list(model.named_modules()):
        for child, lin in list(mod.named_children()):
            if isinstance(lin, nn.Linear) and child != "lm_head":
                keep = torch.rand_like(lin.weight) > 0.5
                qw = rtn(lin.weight.detach(), keep, parse_quant("int8"), child)
                lin.weight.data = qw.dequantize()
                kernel = "cpu_bitmap_int8" if "mlp" in name else "cpu_int8"
                setattr(mod, child, SparseLinear.from_dense(lin, keep, kernel, qweight=qw))
    ids = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        eager = model(input_ids=ids).logits
        compile_model(model)
        torch.testing.assert_close(model(input_ids=ids).logits, eager, rtol=1e-5, atol=1e-5)


@needs_build
def test_bench_times_the_integer_kernels(tmp_path, quantized):
    import json

    js = tmp_path / "b.json"
    assert main(["bench", str(quantized), "--tokens", "1", "--prompt-tokens", "4", "--new-tokens", "2",
                 "--threads", "1", "--json", str(js)]) == 0
    res = json.loads(js.read_text())
    assert res["quantized_layers"] > 0
    assert {"cpu_int8", "cpu_bitmap_int8"} & {row["kernel"] for row in res["layers"]}
    assert res["end_to_end"]["planned"]["decode_tok_s"] > 0


PORTABLE_CHECK = r"""
import torch, torch.nn.functional as F
from torch import nn
from prunus.kernels import cpu, SparseLinear
from prunus.core.quant import rtn
from prunus.core.spec import parse_quant
assert cpu.load_extension(), cpu.unavailable_reason()
assert cpu.build_info()["isa"] == "baseline", cpu.build_info()
torch.manual_seed(0)
skip = ("cpu_skip_f32", "cpu_skip_bitmap_int8")  # the portable loops of csrc/cpu_actskip.cpp
for spec, kernels in (("int8", ("cpu_int8", "cpu_bitmap_int8", "cpu_bitmap", "cpu_csr", "cpu_skip_int8",
                                 "cpu_csr_int8") + skip),
                      ("int4g32z", ("cpu_int4", "cpu_bitmap_int8", "cpu_skip_int4", "cpu_csr_int8") + skip)):
    w = torch.randn(20, 96); keep = torch.rand(20, 96) > 0.5
    qw = rtn(w, keep, parse_quant(spec), "t")
    lin = nn.Linear(96, 20); lin.weight.data = qw.dequantize()
    for k in kernels:
        m = SparseLinear.from_dense(lin, keep, k, qweight=qw if "int" in k else None)
        for n in (1, 3, 17):
            x = torch.randn(n, 96)
            x[:, ::3] = 0.0  # inputs the skip kernels skip
            torch.testing.assert_close(m(x), F.linear(x, qw.dequantize(), lin.bias), rtol=1e-4, atol=1e-4)
print("portable ok")
"""


@pytest.mark.skipif(not compiled_available(), reason="no compiler here")
def test_portable_build_computes_the_same():
    """The build for CPUs without AVX2/AVX-512 (PRUNUS_ISA=base): every kernel still correct."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PRUNUS_ISA": "base"}
    r = subprocess.run([sys.executable, "-c", PORTABLE_CHECK], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0 and "portable ok" in r.stdout, r.stderr[-2000:]


@needs_build
def test_tune_plan_measures_the_whole_model(quantized):
    """tune_plan tries dense and the best kernels per group of like layers on the decode of the
    whole model, records why, and leaves the model as it was given."""
    from prunus import export
    from prunus.kernels.plans import plan_model
    from prunus.kernels.tune import tune_plan

    model = export.load(quantized)
    masks, qws = export.load_masks(quantized), export.load_quantized(quantized)
    plan = plan_model(model, masks, [1], 1.1, qweights=qws, repeats=3, warmup=1)
    lines = []
    tuned = tune_plan(model, plan, masks, qweights=qws, prompt_tokens=4, new_tokens=2, repeats=1, rounds=2,
                      progress=lines.append)
    assert [layer.name for layer in tuned.layers] == [layer.name for layer in plan.layers]
    assert all("end to end:" in layer.reason and "dense" in layer.reason for layer in tuned.layers)
    assert lines and not any(isinstance(m, SparseLinear) for m in model.modules())
    # like layers get one decision
    by_shape = {}
    for layer in tuned.layers:
        by_shape.setdefault((layer.out_features, layer.in_features, layer.quant), set()).add(layer.kernel)
    assert all(len(kinds) == 1 for kinds in by_shape.values())
