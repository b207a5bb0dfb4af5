"""SparseGPT: one-shot pruning with OBS weight reconstruction (Frantar & Alistarh 2023,
"SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot", ICML, Algorithm 1).

Columns are visited left to right. When column ``i`` is pruned or frozen, the error it leaves is
spread over the columns still to come by the Optimal Brain Surgeon update

    w_F <- w_F - (w_i - q_i) / [H_F^-1]_ii * [H_F^-1]_(i, F)        F = columns >= i

where ``H_F^-1`` is the inverse of the Hessian restricted to those columns. Every row shares the
same ``H``, so one upper Cholesky factor ``U`` of ``H^-1`` holds all of the ``H_F^-1`` rows needed
(``[H_F^-1]_(i, F) = U_ii * U_(i, F)``), and updates to columns past the current block of
``blocksize`` columns are applied lazily, as one matrix product per block.

Joint sparsification and quantization (SparseGPT paper, section "Joint Sparsification &
Quantization"; with sparsity 0 this is GPTQ, Frantar et al. 2023, "GPTQ: Accurate Post-Training
Quantization for Generative Pre-trained Transformers", ICLR): given a ``quant`` (``2:4+int8``), each
kept weight is rounded to the grid when its column is visited (``q_i`` above becomes its quantized
value, 0 for a pruned one), and the rounding error is spread by the very same OBS update as the
pruning error. The rounding is :func:`prunus.core.quant.grid_values`, so the returned weight is
exactly the dequantized codes.

Deviation (measured): the reference fixes a row's grid from the dense weights before the sweep, but
the pruning updates grow the kept weights past that range, and clamping them cost more than the
joint update saved (at 50% + int8 the joint error came out ~0.3% above SparseGPT-then-RTN on random
layers). Here, when anything is pruned, a first sweep without rounding chooses the mask and yields
the pruned weights; the grid (scales, zeros, over the kept weights) is fitted to those, and a second
sweep with that mask fixed spreads pruning and rounding errors together. Twice the work, and never
worse than rounding the first sweep's result by more than noise. With nothing pruned (GPTQ) the grid
is fitted to the dense weights (GPTQ's "static groups") and there is one sweep.

Deviation from the reference implementation (IST-DASLab/sparsegpt, ``fasterprune``): inside each
block the reference prunes every score ``<=`` a threshold, which over-prunes on ties. Here each
block prunes an exact count through :func:`prunus.core.masks.topk` (stable ties), and the counts are
rounded cumulatively across blocks, so the layer ends at exactly ``n_pruned(out * in, sparsity)``
zeros whatever the block size.

Example:
    >>> from prunus.core.spec import Unstructured
    >>> w = torch.randn(8, 16); x = torch.randn(256, 16)
    >>> new_w, keep = sparsegpt(w, LayerStats(256, hessian=x.T @ x), 0.5, Unstructured(),
    ...                         SparseGPTOptions(), "demo")
    >>> int((~keep).sum())
    64
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from prunus.algorithms import method
from prunus.errors import SpecError
from prunus.core.finite import all_finite
from prunus.core.masks import check_divisible, n_pruned, topk
from prunus.core.quant import (QuantizedWeight, check_quant_shape, decode_values, from_codes, grid_values,
                               group_size, rtn)
from prunus.core.spec import NM, Pattern, Quant, Unstructured
from prunus.core.stats import LayerStats


@dataclass(frozen=True)
class SparseGPTOptions:
    """Options of :func:`sparsegpt`.

    Attributes:
        blocksize: columns per lazy block; updates beyond the block wait for one matmul. Rounded
            down to a multiple of M for N:M, so that no group straddles two blocks.
        percdamp: dampening added to diag(H), as a fraction of its mean; keeps H invertible.
    """

    blocksize: int = 128
    percdamp: float = 0.01


def inverse_hessian_factor(hessian: Tensor, percdamp: float, name: str) -> tuple[Tensor, Tensor]:
    """Upper Cholesky factor of the dampened inverse Hessian, and the mask of dead inputs.

    Args:
        hessian: (in, in) sum of x x^T over the calibration tokens (any positive scale).
        percdamp: dampening as a fraction of mean(diag(H)).
        name: layer name for errors.

    Returns:
        ``(U, dead)``: U (in, in) upper triangular with ``U^T U = (H + damp I)^-1``, and
        dead (in,) bool, True for inputs that were always zero (their diagonal is set to 1).

    The factorisations run in float32, like the reference (2-3x faster than float64 on CPU at
    in=1536), and are redone in float64 only if float32 finds the matrix not positive definite.
    Layers that read the same input (q/k/v, gate/up) share one Hessian tensor, so the last
    factorisation is kept and reused when the very same tensor comes back with the same dampening.
    """
    if _last is not None and _last[1]() is hessian and _last[2] == percdamp:
        return _last[3], _last[4]
    if not all_finite(hessian):
        raise SpecError(f"{name}: the Hessian contains NaN or inf (are the activations finite?)")
    u = dead = None
    for dtype in (torch.float32, torch.float64):
        h = hessian.detach().to(dtype).clone()
        diag = torch.arange(h.shape[0], device=h.device)
        dead = h[diag, diag] == 0
        # An input that was always zero has no curvature; 1 keeps H invertible and its weights are zeroed.
        h[dead, dead] = 1.0
        h[diag, diag] += percdamp * h[diag, diag].mean()
        u = _factor(h)
        if u is not None and all_finite(u):
            break
        u = None
    if u is None:
        raise SpecError(f"{name}: the Hessian is not positive definite; raise percdamp (now {percdamp:g})")
    _remember(hessian, percdamp, u, dead)
    return u, dead


class _Token:
    """Names one entry of ``_last``, for the finalizer that drops it."""


_last: Optional[tuple] = None  # (token, weakref to H, percdamp, U, dead) of the last factorisation
_finalizer: Optional[weakref.finalize] = None


def _remember(hessian: Tensor, percdamp: float, u: Tensor, dead: Tensor) -> None:
    """Keep the last factorisation for as long as its Hessian lives, and not longer: the factor of a
    1.5B model's down_proj is 256 MiB, and was held into the next block (the next factorisation)."""
    global _last, _finalizer
    if _finalizer is not None:
        _finalizer.detach()
    token = _Token()
    _last = (token, weakref.ref(hessian), percdamp, u, dead)
    _finalizer = weakref.finalize(hessian, _forget, token)


def _forget(token: _Token) -> None:
    global _last
    if _last is not None and _last[0] is token:
        _last = None


def _factor(h: Tensor) -> Optional[Tensor]:
    """``cholesky(cholesky_inverse(cholesky(h)), upper=True)``; None if ``h`` is not positive definite.

    An exactly symmetric ``h`` (``x.T @ x`` from BLAS is) is factorised in place, all three steps
    on its memory: ``h.t()`` is the same matrix in column-major order, which LAPACK works on where
    it lies, bit-identical to the out-of-place calls. At in=8192 (a 1.5B model's down_proj) each
    (in, in) float32 matrix is 256 MiB, and the out-of-place calls hold three. The result is then a
    transposed view (the sweep reads it by slices). Otherwise: the out-of-place calls (they read the
    lower triangle).
    """
    info = torch.empty((), dtype=torch.int32, device=h.device)
    if torch.equal(h, h.mT):
        u = h.t()
        torch.linalg.cholesky_ex(u, out=(u, info))
        if info.item() != 0:
            return None
        torch.cholesky_inverse(u, out=u)
    else:
        chol, info = torch.linalg.cholesky_ex(h)
        if info.item() != 0:
            return None
        u = torch.cholesky_inverse(chol)
        del chol
    torch.linalg.cholesky_ex(u, upper=True, out=(u, info))
    return u if info.item() == 0 else None


@method("sparsegpt", needs={"hessian"}, options=SparseGPTOptions, patterns=(Unstructured, NM),
        quantizes=True,
        paper="Frantar & Alistarh 2023, SparseGPT: Massive Language Models Can Be Accurately "
              "Pruned in One-Shot (ICML); with a quant, GPTQ (Frantar et al. 2023, ICLR)")
def sparsegpt(weight: Tensor, stats: LayerStats, sparsity: float, pattern: Pattern,
              options: SparseGPTOptions, name: str, quant: Optional[Quant] = None
              ) -> "tuple[Tensor, Tensor] | tuple[Tensor, Tensor, QuantizedWeight]":
    """Prune one linear layer with SparseGPT, updating the kept weights to reconstruct its output.

    Args:
        weight: (out, in) dense weight; not modified.
        stats: needs ``hessian``, the (in, in) sum over calibration tokens of x x^T.
        sparsity: fraction to prune (unstructured); ignored for N:M, fixed at 1 - N/M.
        pattern: :class:`Unstructured` (mask chosen per block of columns, across all rows) or
            :class:`NM` (each group of M inputs keeps the N with the largest w^2 / [H_F^-1]_ii,
            chosen when the group is reached, on the already updated weights).
        options: block size and dampening.
        name: layer name for errors.
        quant: quantize the kept weights jointly (see the module docstring); None: float weights.

    Returns:
        With a ``quant``, ``(new_weight, keep, QuantizedWeight)`` where ``new_weight`` equals the
        quantized weight's ``dequantize()`` exactly. Without, ``(new_weight, keep)``: (out, in) float32 weight, exactly zero where ``keep`` is False,
        with the kept weights updated; (out, in) bool keep-mask. Weights of dead inputs (always
        zero during calibration) are zeroed too, as in the reference, whatever the mask says.
    """
    check_divisible(tuple(weight.shape), pattern, name)
    if not isinstance(pattern, (Unstructured, NM)):
        raise SpecError(f"{name}: sparsegpt supports unstructured and N:M, not {pattern}")
    out_f, in_f = weight.shape
    hessian = stats.hessian
    if hessian is None or tuple(hessian.shape) != (in_f, in_f):
        got = None if hessian is None else tuple(hessian.shape)
        raise SpecError(f"{name}: sparsegpt needs an ({in_f}, {in_f}) Hessian, got {got}")
    if options.blocksize <= 0 or options.percdamp < 0:
        raise SpecError(f"{name}: sparsegpt needs blocksize > 0 and percdamp >= 0")
    if quant is not None:
        check_quant_shape(tuple(weight.shape), quant, name)

    u, dead = inverse_hessian_factor(hessian, options.percdamp, name)
    u = u.to(torch.float32)  # the column sweep runs in float32, like the reference
    if quant is None:
        wt, prune_t, _ = _sweep(weight, u, dead, sparsity, pattern, options.blocksize, name)
        return wt.t().contiguous(), ~prune_t.t().contiguous()
    if isinstance(pattern, Unstructured) and n_pruned(weight.numel(), sparsity) == 0:
        wp, keep = weight.detach().float().clone(), torch.ones_like(weight, dtype=torch.bool)
        wp[:, dead] = 0.0
    else:  # pass 1: the mask, and the pruned weights the grid is fitted to
        wt, prune_t, _ = _sweep(weight, u, dead, sparsity, pattern, options.blocksize, name)
        wp, keep = wt.t(), ~prune_t.t()
    grid = rtn(wp, keep, quant, name)
    # pass 2: the same mask; pruning and rounding errors spread by one OBS sweep
    _, _, codes_t = _sweep(weight, u, dead, sparsity, pattern, options.blocksize, name,
                           fixed=~keep.t().contiguous(), grid=grid)
    qw = from_codes(codes_t.t(), grid.scales, grid.zeros, keep.contiguous(), quant)
    return qw.dequantize(), qw.keep, qw


def _sweep(weight: Tensor, u: Tensor, dead: Tensor, sparsity: float, pattern: Pattern, blocksize: int,
           name: str, fixed: Optional[Tensor] = None, grid: Optional[QuantizedWeight] = None
           ) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """The column sweep: ``(weight (in, out), pruned (in, out), codes (in, out) or None)``.

    ``fixed`` (in, out) bool, True = pruned: use this mask instead of choosing one. ``grid``: round
    each kept weight to its scales (and zeros) as its column is visited, the rounding error spread
    like the pruning error; the codes are returned.
    """
    out_f, in_f = weight.shape
    # A transposed copy, (in, out): a column of W is a contiguous row, so each step of the sweep
    # touches contiguous memory. Always a copy (``contiguous()`` would alias a 1-row weight): the
    # caller keeps the dense weight.
    wt = weight.detach().t().to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    wt[dead] = 0.0
    prune_t = torch.zeros(in_f, out_f, dtype=torch.bool, device=wt.device) if fixed is None \
        else fixed.clone()  # (in, out) True = pruned
    codes_t = None
    if grid is not None:
        quant = grid.quant
        qg = group_size(in_f, quant)
        codes_t = torch.zeros_like(wt)  # (in, out) float codes
        scales_t = grid.scales.t().contiguous()  # (in / qg, out)
        zeros_t = None if grid.zeros is None else grid.zeros.t().float().contiguous()
    if isinstance(pattern, NM):
        blocksize = max(pattern.m, blocksize // pattern.m * pattern.m)
    for i1 in range(0, in_f, blocksize):
        i2 = min(i1 + blocksize, in_f)
        w1 = wt[i1:i2]  # (b, out) view, updated in place as its columns are visited
        u1 = u[i1:i2, i1:i2]  # (b, b)
        d1 = torch.diagonal(u1).unsqueeze(1)  # (b, 1) sqrt([H_F^-1]_ii)
        prune1 = prune_t[i1:i2]  # (b, out) view: filling it fills ``prune_t``
        if isinstance(pattern, Unstructured) and fixed is None:
            # Cumulative rounding: block counts add up to the layer's exact count.
            k = n_pruned(out_f * i2, sparsity) - n_pruned(out_f * i1, sparsity)
            scores = (w1.pow(2) / d1.pow(2)).t()  # (out, b) OBS saliency
            prune1.copy_(~topk(scores, k / w1.numel(), Unstructured(), name=name).t())
        scale = prune1 / d1  # (b, out): 1 / d_i where pruned, 0 where kept
        err1 = torch.empty_like(w1)  # (b, out) scaled errors, replayed on columns >= i2 at the end
        for i in range(i2 - i1):
            if isinstance(pattern, NM) and i % pattern.m == 0 and fixed is None:
                # The group is chosen on weights already updated by every column before it.
                g = slice(i, i + pattern.m)
                scores = (w1[g].pow(2) / d1[g].pow(2)).t()  # (out, m)
                prune1[g] = ~topk(scores, pattern.sparsity, pattern, name=name).t()
                scale[g] = prune1[g] / d1[g]
            if codes_t is None:
                e = torch.mul(w1[i], scale[i], out=err1[i])  # (out,) zero for kept weights
                # OBS: spread the pruned weights' error over the rest of the block.
                w1[i:].addr_(u1[i, i:], e, alpha=-1.0)
                continue
            c = i1 + i
            sc, zc = scales_t[c // qg], None if zeros_t is None else zeros_t[c // qg]
            codes_t[c] = grid_values(w1[i], sc, zc, quant)
            q = torch.where(prune1[i], 0.0, decode_values(codes_t[c], sc, zc))  # (out,) q_i
            e = torch.div(w1[i] - q, d1[i], out=err1[i])  # pruning and rounding error alike
            w1[i:].addr_(u1[i, i:], e, alpha=-1.0)
            w1[i] = q  # exact: the update leaves q_i only up to rounding
        w1[prune1] = 0.0  # the update leaves w_i - e_i * d_i, zero only up to rounding
        # lazy update of every later column at once, in place (no (in, out) temporary)
        wt[i2:].addmm_(u[i1:i2, i2:].t(), err1, alpha=-1.0)
    return wt, prune_t, codes_t
