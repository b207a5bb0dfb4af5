"""The CSR + int8 values kernel (cpu_csr_int8): its format decodes exactly, its products match the
dequantized weight (float64 reference) at 0-100% sparsity, per channel and in groups, int8 and
int4, decode and prefill; a hand-computed case; the grids it refuses; the op's shape function; the
registry entry."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunus.core.quant import QuantizedWeight, rtn
from prunus.core.spec import Unstructured, parse_quant
from prunus.kernels import KERNELS, KernelError, SparseLinear, kernels_for
from prunus.kernels.cpu import compiled_available
from prunus.kernels.quant_formats import (csr_columns, csr_q8_arrays, csr_q8_serves,
                                          expand_groups)

needs_build = pytest.mark.skipif(not compiled_available(), reason="compiled kernels unavailable")
KERNEL = "cpu_csr_int8"


def _layer(out_f, in_f, sparsity, spec, bias=True, seed=0):
    """A random layer whose weight is the dequantized rtn of a random weight at ``sparsity``."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    keep = torch.rand(out_f, in_f, generator=g) >= sparsity
    qw = rtn(w, keep, parse_quant(spec), "t")
    lin = nn.Linear(in_f, out_f, bias=bias)
    lin.weight.data = qw.dequantize()
    return lin, keep, qw


def _decoded(ptr, col, vals, scales, group, in_f):
    """The dense float32 weight of csr_q8_arrays' arrays, decoded here independently."""
    out_f = ptr.numel() - 1
    w = torch.zeros(out_f, in_f)
    cols = csr_columns(col)
    for r in range(out_f):
        for k in range(int(ptr[r]), int(ptr[r + 1])):
            w[r, cols[k]] = float(vals[k])
    return w * expand_groups(scales, group, in_f)


def _check(y, x, ref, bias, qw):
    """y against x @ ref^T + bias in float64, within float32 summation error."""
    exact = F.linear(x.double(), ref.double(), None if bias is None else bias.double())
    tol = 4 * x.shape[1] * 2.0 ** -24 * 16 * float(qw.scales.max()) * x.abs().sum(1, keepdim=True)
    err = (y.double() - exact).abs()
    assert bool((err <= tol + 1e-6).all()), float(err.max())


@needs_build
@pytest.mark.parametrize("spec", ["int8", "int8g64", "int4g32", "int8g8"])
@pytest.mark.parametrize("shape", [(40, 128), (70, 192), (64, 300)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("bias", [True, False])
def test_products_match_the_dequantized_weight(spec, shape, sparsity, bias):
    q = parse_quant(spec)
    if q.group is not None and shape[1] % q.group:
        pytest.skip("the group does not divide the input width")
    lin, keep, qw = _layer(*shape, sparsity, spec, bias)
    ref = qw.dequantize()
    m = SparseLinear.from_dense(lin, keep, KERNEL, qweight=qw)
    assert m.kernel == KERNEL and m.nnz == int(keep.sum())
    assert torch.equal(m.weight, ref)  # dense_weight() decodes exactly
    b = lin.bias.detach() if bias else None
    ops = torch.ops.prunus_cpu
    col32 = csr_columns(m.col).to(torch.int32)  # the int32-index path (in > 65536) on the same data
    gen = torch.Generator().manual_seed(1)
    for n in (1, 3, 4, 16, 33):  # tiles of 1, 2 + 1, 4; prefill from 16
        x = torch.randn(n, shape[1], generator=gen)
        y = m(x)
        _check(y, x, ref, b, qw)
        _check(ops.csr_q8_linear(x, m.row_ptr, col32, m.val, m.scales, b, m.group, shape[1]),
               x, ref, b, qw)
        if sparsity == 1.0:
            want = b.expand(n, -1) if bias else torch.zeros(n, shape[0])
            assert torch.equal(y, want)


@needs_build
def test_an_all_pruned_row_gives_its_bias():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(12, 128, generator=g)
    keep = torch.rand(12, 128, generator=g) >= 0.5
    keep[3] = False
    keep[11] = False  # the last row too
    qw = rtn(w, keep, parse_quant("int8g64"), "t")
    lin = nn.Linear(128, 12)
    lin.weight.data = qw.dequantize()
    m = SparseLinear.from_dense(lin, keep, KERNEL, qweight=qw)
    assert int(m.row_ptr[4]) == int(m.row_ptr[3]) and int(m.row_ptr[12]) == int(m.row_ptr[11])
    for n in (1, 2, 16):
        x = torch.randn(n, 128, generator=g)
        y = m(x)
        assert torch.equal(y[:, 3], lin.bias.detach()[3].expand(n))
        assert torch.equal(y[:, 11], lin.bias.detach()[11].expand(n))
        _check(y, x, qw.dequantize(), lin.bias.detach(), qw)


def _hand_2x4():
    """Codes by hand: row 0 = 0.5 * [3, (pruned), -2, 5], row 1 = 0.25 * [(pruned), 7, (pruned), -1]."""
    codes = torch.tensor([[3, 0, -2, 5], [0, 7, 0, -1]], dtype=torch.int8)
    keep = torch.tensor([[True, False, True, True], [False, True, False, True]])
    scales = torch.tensor([[0.5], [0.25]])
    return QuantizedWeight(parse_quant("int8"), codes, scales, None, keep)


def test_hand_computed_2x4_arrays():
    qw = _hand_2x4()
    ptr, col, vals, scales, group = csr_q8_arrays(qw)
    assert ptr.tolist() == [0, 3, 5] and ptr.dtype == torch.int32
    assert col.tolist() == [0, 2, 3, 1, 3] and col.dtype == torch.int16
    assert vals.tolist() == [3, -2, 5, 7, -1] and vals.dtype == torch.int8
    assert scales.tolist() == [[0.5], [0.25]] and group == 4


@needs_build
def test_hand_computed_2x4_product():
    qw = _hand_2x4()
    lin = nn.Linear(4, 2)
    lin.weight.data = qw.dequantize()
    lin.bias.data = torch.tensor([0.5, -1.0])
    m = SparseLinear.from_dense(lin, qw.keep, KERNEL, qweight=qw)
    assert m.weight.tolist() == [[1.5, 0.0, -1.0, 2.5], [0.0, 1.75, 0.0, -0.25]]
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [-1.0, 0.0, 1.0, 2.0]])
    # row 0: 0.5 * (3*1 - 2*3 + 5*4) + 0.5 = 9.0;  0.5 * (-3 - 2 + 10) + 0.5 = 3.0
    # row 1: 0.25 * (7*2 - 1*4) - 1 = 1.5;          0.25 * (0 - 2) - 1 = -1.5
    assert m(x).tolist() == [[9.0, 1.5], [3.0, -1.5]]
    assert m(x[:1]).tolist() == [[9.0, 1.5]]


@pytest.mark.parametrize("spec", ["int8", "int8g64", "int4g32", "int4g64z", "int8g8", "int8z"])
def test_the_arrays_decode_back_exactly(spec):
    _, keep, qw = _layer(33, 256, 0.7, spec)
    if not csr_q8_serves(qw.quant, tuple(qw.codes.shape)):
        assert spec == "int8z"
        return
    ptr, col, vals, scales, group = csr_q8_arrays(qw)
    assert int(ptr[-1]) == int(keep.sum()) == vals.numel() == col.numel()
    cols = csr_columns(col)
    for r in range(33):  # ascending columns within each row
        seg = cols[int(ptr[r]):int(ptr[r + 1])]
        assert bool((seg[1:] > seg[:-1]).all())
    assert torch.equal(_decoded(ptr, col, vals, scales, group, 256), qw.dequantize())


def test_wide_layer_takes_int32_columns_and_high_columns_stay_unsigned():
    qw = QuantizedWeight(parse_quant("int8"), torch.zeros(1, 70000, dtype=torch.int8),
                         torch.ones(1, 1), None, torch.zeros(1, 70000, dtype=torch.bool))
    qw.codes[0, 69999] = 5
    qw.keep[0, 69999] = True
    _, col, _, _, _ = csr_q8_arrays(qw)
    assert col.dtype == torch.int32 and col.tolist() == [69999]
    narrow = QuantizedWeight(parse_quant("int8"), qw.codes[:, :65536].clone(), torch.ones(1, 1),
                             None, qw.keep[:, :65536].clone())
    narrow.codes[0, 40000] = -3
    narrow.keep[0, 40000] = True
    _, col, vals, _, _ = csr_q8_arrays(narrow)
    assert col.dtype == torch.int16 and csr_columns(col).tolist() == [40000]
    assert vals.tolist() == [-3]


def test_asymmetric_int8_is_not_served():
    lin, keep, qz = _layer(8, 64, 0.5, "int8z")
    assert not csr_q8_serves(qz.quant, (8, 64))
    assert csr_q8_serves(parse_quant("int8"), (8, 64))
    assert csr_q8_serves(parse_quant("int4g32z"), (8, 64))
    with pytest.raises(KernelError, match="cannot serve int8z"):
        SparseLinear.from_dense(lin, keep, KERNEL, qweight=qz)
    with pytest.raises(KernelError, match="not stored quantized"):
        SparseLinear.from_dense(lin, keep, KERNEL)


@needs_build
def test_op_has_a_shape_function_for_compile():
    lin, keep, qw = _layer(70, 128, 0.5, "int8g64")
    m = SparseLinear.from_dense(lin, keep, KERNEL, qweight=qw)
    x = torch.randn(2, 128)
    op = torch.ops.prunus_cpu.csr_q8_linear
    for b in (lin.bias.detach(), None):
        torch.library.opcheck(op, (x, m.row_ptr, m.col, m.val, m.scales, b, m.group, 128),
                              test_utils="test_faketensor")


def test_registry_lists_it_for_a_quantized_layer():
    spec = KERNELS[KERNEL]
    assert spec.quant is csr_q8_serves and spec.exact and not spec.input_sparse
    assert spec.description == "compiled CSR + int8 values (high sparsity)"
    assert spec.priority < KERNELS["cpu_bitmap_int8"].priority
    for q in ("int8", "int8g64", "int4g32"):
        names = [k.name for k in kernels_for((40, 128), Unstructured(), "cpu", torch.float32,
                                             quant=parse_quant(q), available_only=False)]
        assert KERNEL in names, q
        assert names.index("cpu_bitmap_int8") < names.index(KERNEL)
    names = [k.name for k in kernels_for((40, 128), Unstructured(), "cpu", torch.float32,
                                         quant=parse_quant("int8z"), available_only=False)]
    assert KERNEL not in names
    floats = [k.name for k in kernels_for((40, 128), Unstructured(), "cpu", torch.float32,
                                          available_only=False)]
    assert KERNEL not in floats  # an integer kernel: only for layers stored quantized
    if compiled_available():
        assert KERNEL in [k.name for k in kernels_for((40, 128), Unstructured(), "cpu",
                                                      torch.float32, quant=parse_quant("int8"))]
