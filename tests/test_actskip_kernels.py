"""The kernels that skip zero inputs (cpu_skip_f32/int8/int4/bitmap_int8, torch_skip): products
against the dense reference at 0/25/50/100% zero inputs, with and without a weight mask, float32 /
int8 / int4 (zero points or not), decode and prefill; that zero inputs' weights are really not
read; the input-major formats by hand; and the registry keeping them out of ``auto``."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunus.core.quant import rtn
from prunus.core.spec import Unstructured, parse_quant
from prunus.kernels import KERNELS, SparseLinear, kernels_for
from prunus.kernels.actskip_formats import bitmap_q8_t, f32_t, padded, q4_t, q8_t
from prunus.kernels.cpu import compiled_available
from prunus.kernels.timing import sparse_input

needs_build = pytest.mark.skipif(not compiled_available(), reason="compiled kernels unavailable")
FLOAT = ["cpu_skip_f32", "torch_skip"]
QUANT = ["cpu_skip_int8", "cpu_skip_int4", "cpu_skip_bitmap_int8"]


def _available(kernel):
    return KERNELS[kernel].available()


def _layer(out_f, in_f, sparsity, spec, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    keep = torch.rand(out_f, in_f, generator=g) >= sparsity
    lin = nn.Linear(in_f, out_f)
    qw = None
    if spec:
        qw = rtn(w, keep, parse_quant(spec), "t")
        lin.weight.data = qw.dequantize()
    else:
        lin.weight.data = w * keep
    return lin, keep, qw


def _kernels(qw):
    names = list(FLOAT)
    if qw is not None:
        names += [k for k in QUANT if KERNELS[k].quant(qw.quant, tuple(qw.codes.shape))]
    return [k for k in names if _available(k)]


def _check(m, lin, qw, x):
    ref = F.linear(x.double(), lin.weight.double(), lin.bias.double())
    scale = 1.0 if qw is None else 16 * float(qw.scales.max())
    tol = 4 * x.shape[1] * 2.0 ** -24 * scale * x.abs().sum(1, keepdim=True) * 8 + 1e-5
    err = (m(x).double() - ref).abs()
    assert bool((err <= tol).all()), float(err.max())


@pytest.mark.parametrize("spec", [None, "int8", "int8z", "int8g64", "int4g32", "int4g64z", "int4c"])
@pytest.mark.parametrize("shape", [(40, 128), (70, 192)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5])
def test_skip_kernels_match_dense(spec, shape, sparsity, one_thread):
    lin, keep, qw = _layer(*shape, sparsity, spec)
    names = _kernels(qw)
    assert names, "no kernel ran"
    gen = torch.Generator().manual_seed(1)
    for kernel in names:
        m = SparseLinear.from_dense(lin, keep, kernel, qweight=qw)
        assert torch.equal(m.weight, lin.weight.detach()), kernel  # the format decodes exactly
        for n in (1, 2, 3, 4, 16):  # tiles of 4, 2, 1 tokens; 16: the prefill path
            for zeros in (0.0, 0.25, 0.5, 1.0):
                _check(m, lin, qw, sparse_input(n, shape[1], zeros, gen))


@needs_build
@pytest.mark.parametrize("shape", [(130, 576), (256, 320)])
def test_two_threads_split_the_inputs(shape):
    """Large enough for both threads: each takes half the non-zero inputs, whole rows, and the two
    partial sums are added; a share ends inside a group of the quantization grid, so each share
    applies the zero points with the sum of x over its own rows of that group. The same result as
    one thread (up to float summation order) and as the dense product."""
    n = torch.get_num_threads()
    try:
        lin4, keep, q4 = _layer(*shape, 0.5, "int4g64z")
        lin8, _, q8 = _layer(*shape, 0.5, "int8")  # the same seed: the same mask
        lin8z, _, q8z = _layer(*shape, 0.5, "int8g64z")
        gen = torch.Generator().manual_seed(2)
        for kernel, layer, q in (("cpu_skip_f32", lin8, None), ("cpu_skip_int4", lin4, q4),
                                 ("cpu_skip_int8", lin8, q8), ("cpu_skip_int8", lin8z, q8z),
                                 ("cpu_skip_bitmap_int8", lin8, q8)):
            m = SparseLinear.from_dense(layer, keep, kernel, qweight=q)
            for tokens in (1, 4):
                x = sparse_input(tokens, shape[1], 0.4, gen)
                torch.set_num_threads(1)
                one = m(x)
                torch.set_num_threads(2)
                two = m(x)
                _check(m, layer, q, x)
                torch.testing.assert_close(two, one, rtol=1e-5, atol=1e-4)
    finally:
        torch.set_num_threads(n)


def test_all_zero_input_gives_the_bias(one_thread):
    lin, keep, qw = _layer(20, 64, 0.5, "int8")
    for kernel in _kernels(qw):
        m = SparseLinear.from_dense(lin, keep, kernel, qweight=qw)
        torch.testing.assert_close(m(torch.zeros(3, 64)), lin.bias.detach().expand(3, -1), rtol=0, atol=0)


def test_hand_computed():
    # W = [[1, 2, 3], [4, 5, 6]], b = [0.5, -0.5], x = [0, 1, 0] and [2, 0, -1]:
    # y = [2.5, 4.5] and [2 - 3 + 0.5, 8 - 6 - 0.5] = [-0.5, 1.5]
    lin = nn.Linear(3, 2)
    lin.weight.data = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    lin.bias.data = torch.tensor([0.5, -0.5])
    x = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, -1.0]])
    want = torch.tensor([[2.5, 4.5], [-0.5, 1.5]])
    for kernel in [k for k in FLOAT if _available(k)]:
        m = SparseLinear.from_dense(lin, torch.ones(2, 3, dtype=torch.bool), kernel)
        assert torch.equal(m(x), want), kernel
        assert torch.equal(m(x[:1]), want[:1]), kernel
    # int8 per channel on the same row pair: scales 3/127 and 6/127 (rounded up onto float16),
    # codes round(w / s); y = s * sum_j x_j q_j + b, the zero input's code never used
    qw = rtn(lin.weight.detach(), torch.ones(2, 3, dtype=torch.bool), parse_quant("int8"), "t")
    s = qw.scales[:, 0].double()
    q = qw.codes.double()
    want8 = torch.stack([s * q[:, 1] + lin.bias.double(), s * (2 * q[:, 0] - q[:, 2]) + lin.bias.double()])
    for kernel in ("cpu_skip_int8", "cpu_skip_bitmap_int8"):
        if _available(kernel):
            lin.weight.data = qw.dequantize()
            m = SparseLinear.from_dense(lin, None, kernel, qweight=qw)
            torch.testing.assert_close(m(x).double(), want8, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("spec", ["int8", "int4g32z"])
def test_zero_inputs_are_not_read(spec, one_thread):
    """Poison the weights of the inputs that are zero in every token: the skip path must not see
    them (a kernel reading them would return NaN or a different sum)."""
    lin, keep, qw = _layer(64, 128, 0.5, spec)
    x = torch.randn(3, 128)
    dead = torch.arange(0, 128, 3)
    x[:, dead] = 0.0
    ref = F.linear(x, lin.weight.detach(), lin.bias.detach())
    for kernel in _kernels(qw):
        m = SparseLinear.from_dense(lin, keep, kernel, qweight=qw)
        store = {"cpu_skip_f32": "wt", "torch_skip": "wt", "cpu_skip_int8": "codes_t",
                 "cpu_skip_int4": "packed_t"}.get(kernel)
        if store is not None:
            buf = getattr(m, store)
            buf[dead] = float("nan") if buf.is_floating_point() else 7
        else:  # the bitmap format: every value of the dead rows
            wptr, bits = m.wptr, m.bits
            for j in dead.tolist():
                start = int(wptr[j, 0])
                count = int(sum(bin(int(w) & (2 ** 64 - 1)).count("1") for w in bits[j]))
                m.vals[start:start + count] = 100
        m.__dict__.pop("_cached_args", None)
        torch.testing.assert_close(m(x), ref, rtol=1e-4, atol=1e-4)


@needs_build
def test_prefill_runs_the_delegate_or_the_own_dense_product():
    lin, keep, _ = _layer(48, 128, 0.6, None)
    m = SparseLinear.from_dense(lin, keep, "cpu_skip_f32")
    assert m.prefill_kernel == "dense" and m.max_tokens == 4

    def no_skip(x):
        raise AssertionError("the skip path ran for a prefill")

    x16 = torch.randn(16, 128)
    ref = F.linear(x16, lin.weight.detach(), lin.bias.detach())
    m.__dict__["skip"] = no_skip
    torch.testing.assert_close(m(x16), ref, rtol=1e-5, atol=1e-5)  # own dense product
    m.set_prefill(SparseLinear.from_dense(lin, keep, "cpu_bitmap"))
    assert m.prefill_kernel == "cpu_bitmap" and "prefill=cpu_bitmap" in repr(m)
    torch.testing.assert_close(m(x16), ref, rtol=1e-5, atol=1e-5)  # the delegate
    assert "prefill" not in dict(m.named_modules())  # not a layer of the model
    with pytest.raises(AssertionError, match="skip path ran"):
        m(x16[:4])


def test_registry_keeps_skip_kernels_out_of_auto():
    shape = (32, 64)
    default = {k.name for k in kernels_for(shape, Unstructured(), "cpu", torch.float32, available_only=False)}
    gated = {k.name for k in kernels_for(shape, Unstructured(), "cpu", torch.float32, available_only=False,
                                         input_sparse=True)}
    assert not default & set(FLOAT) and set(FLOAT) <= gated
    assert all(KERNELS[k].input_sparse and KERNELS[k].exact for k in FLOAT + QUANT)
    lin = nn.Linear(64, 32)
    assert not SparseLinear.from_dense(lin, torch.rand(32, 64) > 0.5).kernel.startswith(("cpu_skip", "torch_skip"))
    q8 = {k.name for k in kernels_for(shape, Unstructured(), "cpu", torch.float32, available_only=False,
                                      quant=parse_quant("int8z"), input_sparse=True)}
    assert "cpu_skip_int8" in q8 and "cpu_skip_bitmap_int8" not in q8  # q - z may not fit int8


def test_formats_by_hand():
    assert padded(1) == 64 and padded(64) == 64 and padded(65) == 128
    w = torch.arange(6.0).reshape(2, 3)  # (out 2, in 3)
    wt = f32_t(w, torch.tensor([[True, False, True], [True, True, True]]))
    assert wt.shape == (3, 64) and wt[:, :2].tolist() == [[0, 3], [0, 4], [2, 5]] and not wt[:, 2:].any()
    # int4, one input row of 64 outputs, symmetric: stored q + 8; byte i = out i | out (i + 16) << 4
    codes = torch.arange(64).remainder(16) - 8
    qw = rtn(codes.float().reshape(64, 1).repeat(1, 32), torch.ones(64, 32, dtype=torch.bool),
             parse_quant("int4g32"), "t")
    packed, _, zeros, _ = q4_t(qw)
    u = (qw.codes[:, 0].to(torch.int16) + 8)
    assert packed.shape == (32, 32) and torch.all(zeros == 8)
    assert int(packed[0, 0]) == int(u[0]) | int(u[16]) << 4 and int(packed[0, 16]) == int(u[32]) | int(u[48]) << 4
    # int8 codes transposed, scales (G, ldw)
    qw8 = rtn(torch.randn(5, 32), torch.ones(5, 32, dtype=torch.bool), parse_quant("int8g16"), "t")
    c, s, z, g = q8_t(qw8)
    assert torch.equal(c[:, :5], qw8.codes.t()) and s.shape == (2, 64) and z is None and g == 16
    # bitmap: input 0 keeps outputs 1 and 3, input 1 keeps output 0: values in row-major order
    keep = torch.tensor([[False, True], [True, False], [False, False], [True, False]])  # (out 4, in 2)
    qb = rtn(torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]]), keep, parse_quant("int8"), "t")
    wptr, bits, vals, _, _ = bitmap_q8_t(qb)
    assert bits[:, 0].tolist() == [0b1010, 0b0001] and wptr.tolist() == [[0], [2]]
    assert vals[:3].tolist() == [int(qb.codes[1, 0]), int(qb.codes[3, 0]), int(qb.codes[0, 1])]
    assert vals.numel() == 3 + 64


def test_sparse_input_zeroes_the_smallest():
    x = sparse_input(3, 40, 0.25, torch.Generator().manual_seed(0))
    assert ((x == 0).sum(1) == 10).all()
    ref = torch.randn(3, 40, generator=torch.Generator().manual_seed(0))
    order = ref.abs().argsort(1)  # the zeros are the ten smallest magnitudes, the rest untouched
    assert (x.gather(1, order[:, :10]) == 0).all()
    assert torch.equal(x.gather(1, order[:, 10:]), ref.gather(1, order[:, 10:]))
    assert torch.equal(sparse_input(2, 8, 0.0, torch.Generator().manual_seed(0)),
                       torch.randn(2, 8, generator=torch.Generator().manual_seed(0)))
    assert (sparse_input(2, 8, 1.0, torch.Generator()) == 0).all()


@needs_build
def test_ops_have_shape_functions_for_compile():
    """torch.compile traces the ops: each fake (shape function) agrees with the real op."""
    lin, keep, q8 = _layer(70, 128, 0.5, "int8g64")
    _, _, q4 = _layer(70, 128, 0.5, "int4g32z")
    x = sparse_input(2, 128, 0.4, torch.Generator().manual_seed(0))
    ops = torch.ops.prunus_cpu
    mods = {k: SparseLinear.from_dense(lin, keep, k, qweight=qw) for k, qw in
            (("cpu_skip_f32", None), ("cpu_skip_int8", q8), ("cpu_skip_bitmap_int8", q8))}
    m4 = SparseLinear.from_dense(lin, keep, "cpu_skip_int4", qweight=q4)
    m8, mb = mods["cpu_skip_int8"], mods["cpu_skip_bitmap_int8"]
    calls = [(ops.skip_f32_linear, (x, mods["cpu_skip_f32"].wt, lin.bias.detach(), 70)),
             (ops.skip_q8_linear, (x, m8.codes_t, m8.scales_t, m8.zeros_t, None, 64, 70)),
             (ops.skip_q4_linear, (x, m4.packed_t, m4.scales_t, m4.zeros_t, None, 32, 70)),
             (ops.skip_bitmap_q8_linear, (x, mb.wptr, mb.bits, mb.vals, mb.scales_t, None, 64, 70)),
             (ops.skip_q8_dense, (m8.codes_t, m8.scales_t, m8.zeros_t, 64)),
             (ops.skip_q4_dense, (m4.packed_t, m4.scales_t, m4.zeros_t, 32)),
             (ops.skip_bitmap_q8_dense, (mb.wptr, mb.bits, mb.vals, mb.scales_t, 64))]
    for op, args in calls:
        torch.library.opcheck(op, args, test_utils="test_faketensor")



@pytest.mark.parametrize("scale", ["none", "colnorm"])
@pytest.mark.parametrize("spec", [None, "int8g64", "int4g32z"])
def test_a_fused_gate_computes_gate_then_dense(scale, spec, one_thread):
    """build_module takes the layer's gate hook (prunus.activation's) into a skip kernel: no
    pre-hook is left on a compiled one, decode (1-4 tokens: the kernel compares the scores with
    the threshold) and prefill (the hook on the input, then the prefill path) give gate-then-dense;
    a score equal to the threshold is kept; a gate removed from the model stops applying; a module
    built from this one gets the hook back."""
    from prunus.activation.gate import Gate, attach_gates, column_norms, gate_input
    from prunus.kernels.gating import carry_gate
    from prunus.kernels.swap import build_module

    lin, keep, qw = _layer(70, 128, 0.5, spec)
    thr = 0.6
    attach_gates(nn.ModuleDict({"l": lin}), {"l": Gate(thr, 0.4, scale)})
    sc = column_norms(lin) if scale == "colnorm" else None
    x = torch.randn(9, 128, generator=torch.Generator().manual_seed(3))
    x[:, 5] = thr / (1.0 if sc is None else float(sc[5]))
    score5 = x[0, 5].abs() * (1.0 if sc is None else sc[5])
    # with scale "none" that score equals the threshold (kept); with column norms float32 rounding
    # decides, and the kernel must decide as gate_input does
    assert scale == "colnorm" or not bool(score5 < thr)

    def want(z, gated=True):
        return F.linear(gate_input(z, thr, sc) if gated else z, lin.weight, lin.bias)

    for kernel in _kernels(qw):
        m = build_module(lin, kernel, name="l", mask=keep, qweight=qw)
        assert m.gate_hook is not None
        assert len(m._forward_pre_hooks) == 0
        for n in (1, 2, 3, 4, 9):
            _check_against(m(x[:n]), want(x[:n]), qw, x[:n])
        y0 = m(x[:1]).detach().clone()  # input 5 counts exactly when gate_input keeps it
        x2 = x[:1].clone()
        x2[0, 5] = 0.0
        assert torch.allclose(m(x2), y0) == bool(score5 < thr)
        new = nn.Linear(128, 70)
        new.weight.data, new.bias.data = lin.weight.data.clone(), lin.bias.data.clone()
        carry_gate(m, new)  # the hook goes on; its column norms are the layer's
        assert torch.allclose(new(x[:3]), want(x[:3]), atol=1e-5)
        del m.prunus_gate  # what detach_gates does: the fused gate is off
        _check_against(m(x[:2]), want(x[:2], gated=False), qw, x[:2])


def _check_against(got, want, qw, x):
    scale = 1.0 if qw is None else 16 * float(qw.scales.max())
    tol = 4 * x.shape[1] * 2.0 ** -24 * scale * x.abs().sum(1, keepdim=True) * 8 + 1e-5
    err = (got.double() - want.double()).abs()
    assert bool((err <= tol).all()), float(err.max())
