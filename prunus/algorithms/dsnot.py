"""DSnoT: training-free prune-and-grow on top of a one-shot mask (Zhang et al. 2023, "Dynamic
Sparse No Training: Training-Free Fine-tuning for Sparse LLMs", ICLR 2024).

For each output row ``r`` the residual ``d_r = W_r - Ŵ_r`` (dense minus pruned) leaves an expected
output error ``e_r = d_r . E[x]``. Each cycle, every row still running proposes one swap:

* grow the pruned weight that moves ``e_r`` most towards zero per unit of input variance,
  ``argmax sign(e_r) * W_rj E[x_j] / Var(x_j)^pow`` (the paper's growing criterion);
* prune the kept weight with the lowest Wanda score ``|Ŵ_rj| ||x_j||`` among those whose removal
  also moves ``e_r`` towards zero (unstructured), or among the kept weights of the grown weight's
  group of M (N:M), so that the count per row or per group never changes.

A weight is grown or pruned at most once. A row stops when ``|e_r|`` falls to ``update_threshold``,
when it has nothing left to propose, or after ``max_cycles``.

Deviations from the reference implementation (zyxxmu/DSnoT, ``prune_DSnoT``), and why:

* **Exact acceptance.** With the Hessian ``H = sum_t x x^T`` at hand, the layer's true
  reconstruction error ``err = sum_r d_r H d_r^T`` is known, and a swap changes only two entries of
  one row's ``d``, so its exact effect costs O(1) given ``H d_r``. A swap is applied only if it
  lowers ``err``; a rejected proposal retires its grow candidate and the row tries the next one.
  The reference applies every proposal while ``|e_r|`` exceeds the threshold, which can raise the
  true error because ``e_r`` sees only the mean of the inputs. Here DSnoT never raises ``err``
  (up to float64 rounding, against which acceptance keeps a relative margin of 1e-12).
* **Candidates that exist.** The reference walks one sorted list per score with two pointers;
  its growing list also holds the kept weights (scored 0), so a long run can move past the
  candidates of the right sign and "grow" a kept weight while pruning another, which lowers the
  count. Here each sign has its own list of eligible weights, so every proposal is a valid swap.
* **Scores.** The pruning score uses the current weight ``Ŵ`` (the reference uses the dense
  ``W``, equal unless the mask came from SparseGPT) and, for N:M too, Wanda's score: a refiner does
  not know which criterion made the mask. The reference's same-sign rule for N:M is dropped: the
  exact test supersedes it. A zero input variance is clamped to a tiny positive value.
* **Weights from SparseGPT.** When ``pruned_weight``'s kept weights were updated, a grown weight
  takes its *dense* value ``W_rj``; every other kept weight keeps its pruned (updated) value, and
  a pruned weight becomes 0. ``err`` is measured against the dense weight either way.
* **Optional exact selection** (``exact_selection=True``, a prunus extension, not in the paper):
  proposals minimise ``err`` directly. Unstructured: grow the weight whose growth alone lowers
  ``err`` most, then prune the kept weight that makes the swap best. N:M: the best swap over all
  (grown, pruned) pairs of every group of the row, and a row stops when that best swap does not
  help. The choice is computed in float32, the acceptance still in float64. It lowers ``err``
  further than the paper's scores, at several times the cost.

Not an option here: the reference skips DSnoT on MLP layers by default (``--skip_layer mlp``). Which
layers are refined is the pipeline's target selection, not the refiner's business.

Example:
    >>> x = torch.randn(512, 16) + 1.0; w = torch.randn(8, 16)
    >>> stats = LayerStats(512, input_sum=x.sum(0), hessian=x.T @ x)
    >>> keep = w.abs() >= w.abs().median(dim=1, keepdim=True).values
    >>> new_w, new_keep = dsnot(w, w * keep, keep, stats, Unstructured(), DSnoTOptions(), "demo")
    >>> bool((new_keep.sum(1) == keep.sum(1)).all())
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from prunus.algorithms import refiner
from prunus.errors import SpecError
from prunus.core.masks import check_divisible
from prunus.core.spec import NM, Pattern, Unstructured
from prunus.core.stats import LayerStats

_INF = float("inf")


@dataclass(frozen=True)
class DSnoTOptions:
    """Options of :func:`dsnot`; defaults are the reference's.

    Attributes:
        max_cycles: at most this many swap proposals per row.
        update_threshold: a row stops once its expected error ``|d_r . E[x]|`` is at most this
            (in the units of the layer's output). 0 lets rows run until no swap helps.
        pow_of_var_regrowing: exponent of the input variance dividing the growing score.
        exact_selection: choose swaps by their exact effect on the reconstruction error instead of
            the paper's scores (prunus extension; see the module docstring).
    """

    max_cycles: int = 50
    update_threshold: float = 0.1
    pow_of_var_regrowing: float = 1.0
    exact_selection: bool = False


def reconstruction_error(dense_weight: Tensor, weight: Tensor, hessian: Tensor) -> float:
    """The layer's output error on the calibration set, ``sum_r (W - Ŵ)_r H (W - Ŵ)_r^T``, in float64."""
    d = dense_weight.detach().double() - weight.detach().double()  # (out, in)
    return float(((d @ hessian.double()) * d).sum())


@refiner("dsnot", needs={"hessian", "input_sum"}, options=DSnoTOptions, patterns=(Unstructured, NM),
         paper="Zhang et al. 2023, Dynamic Sparse No Training: Training-Free Fine-tuning for "
               "Sparse LLMs (ICLR 2024)")
def dsnot(dense_weight: Tensor, pruned_weight: Tensor, mask: Tensor, stats: LayerStats,
          pattern: Pattern, options: DSnoTOptions, name: str) -> tuple[Tensor, Tensor]:
    """Refine a pruned layer by swapping kept and pruned weights, never raising its output error.

    Args:
        dense_weight: (out, in) weight before pruning, W.
        pruned_weight: (out, in) weight after pruning, Ŵ (may have updated kept weights).
        mask: (out, in) bool keep-mask of ``pruned_weight``.
        stats: needs ``hessian`` ((in, in) sum of x x^T), ``input_sum`` ((in,) sum of x) and
            ``tokens``.
        pattern: :class:`Unstructured` (counts kept per row) or :class:`NM` (per group of M).
        options: see :class:`DSnoTOptions`.
        name: layer name for errors.

    Returns:
        ``(weight, keep)``: (out, in) weight in ``pruned_weight``'s dtype, zero where ``keep`` is
        False, and the (out, in) bool keep-mask, with the same number kept in every row (or N:M
        group) as ``mask``. Inputs are not modified.
    """
    _check_inputs(dense_weight, pruned_weight, mask, stats, pattern, options, name)
    m = pattern.m if isinstance(pattern, NM) else 0

    # float64 bookkeeping: acceptance compares small differences of large quadratic forms.
    h = stats.hessian.detach().double()  # (in, in)
    h_diag = torch.diagonal(h)  # (in,) sum_t x_j^2
    mean = stats.input_sum.detach().double() / stats.tokens  # (in,) E[x_j]
    w = dense_weight.detach().double()  # (out, in)
    keep = mask.detach().to(torch.bool).clone()  # (out, in)
    cur = pruned_weight.detach().double() * keep  # (out, in) Ŵ
    d = w - cur  # (out, in) residual
    e = d @ mean  # (out,) expected output error, the reference's "reconstruction error"
    hd: _FullHd | _LazyHd

    proposer: _PaperProposer | _ExactProposer
    if options.exact_selection:
        hd = _FullHd(d, h)
        proposer = _ExactProposer(cur, d, hd.hd, h, keep, m)
    else:
        hd = _LazyHd(d, h, 2 * options.max_cycles)
        var = (h_diag / stats.tokens - mean.pow(2)).clamp_min(0.0)  # (in,) population variance
        var = var.clamp_min(1e-12 * float(var.mean()) + 1e-300)  # a constant input: no 0 divisor
        grow = w * mean / var.pow(options.pow_of_var_regrowing)  # (out, in) growing criterion
        proposer = _PaperProposer(grow, cur.abs() * h_diag.sqrt(), cur * mean, keep, m)

    active = torch.ones(w.shape[0], dtype=torch.bool, device=w.device)
    for _ in range(options.max_cycles):
        active &= e.abs() > options.update_threshold
        r = active.nonzero().squeeze(1)  # (k,) rows still running
        if r.numel() == 0:
            break
        g, p, has_g, has_p = proposer.propose(r, e[r])  # (k,) each
        # An unstructured row without a prune candidate has none for any g: it is done.
        ok = has_g & has_p if not m else has_g
        active[r[~ok]] = False

        a = -d[r, g]  # (k,) change of d at g: growing restores W_rg, so d_rg -> 0
        b = cur[r, p]  # (k,) change of d at p: pruning removes Ŵ_rp, so d_rp -> W_rp
        terms = torch.stack([2 * a * hd.at(r, g), 2 * b * hd.at(r, p), a * a * h_diag[g],
                             2 * a * b * h[g, p], b * b * h_diag[p]])  # (5, k)
        delta = terms.sum(0)  # (k,) exact change of each row's err
        # Accept only what float64 rounding cannot turn into an increase.
        accept = ok & has_p & (delta < -1e-12 * terms.abs().sum(0))
        rejected = ok & ~accept

        # A rejected proposal retires its grow candidate and the next cycle tries another; the
        # prune candidate stays, as it may pair with the next one.
        proposer.retire_grow(ok)
        proposer.retire_prune(accept)
        if options.exact_selection and m:
            active[r[rejected]] = False  # the row's best pair does not help, so (nearly) no pair does
        if not bool(accept.any()):
            continue
        r, g, p, a, b = r[accept], g[accept], p[accept], a[accept], b[accept]
        keep[r, g] = True
        keep[r, p] = False
        cur[r, g] = w[r, g]  # a grown weight takes its dense value
        cur[r, p] = 0.0
        d[r, g] = 0.0
        d[r, p] = w[r, p]
        hd.add(r, g, a, p, b)
        e[r] += a * mean[g] + b * mean[p]

    return cur.to(pruned_weight.dtype), keep


class _FullHd:
    """``H d_r`` for every row, kept up to date: O(in) per swap (for exact selection)."""

    def __init__(self, d: Tensor, h: Tensor) -> None:
        self.h = h
        self.hd = d @ h  # (out, in), H symmetric

    def at(self, rows: Tensor, cols: Tensor) -> Tensor:
        return self.hd[rows, cols]

    def add(self, rows: Tensor, g: Tensor, a: Tensor, p: Tensor, b: Tensor) -> None:
        """Rows ``rows`` had ``d`` change by ``a`` at column ``g`` and ``b`` at ``p``."""
        change = a.unsqueeze(1) * self.h.index_select(0, g)  # (k, in)
        change += b.unsqueeze(1) * self.h.index_select(0, p)
        self.hd.index_add_(0, rows, change)


class _LazyHd:
    """``H d_r`` at a few entries: the initial product plus the row's swaps so far.

    The paper's proposals need ``(H d_r)_j`` at two columns per row and cycle only. Replaying a
    row's at most ``2 * max_cycles`` changes costs O(cycles) per entry instead of O(in) per swap.
    """

    def __init__(self, d: Tensor, h: Tensor, capacity: int) -> None:
        self.h = h
        self.hd0 = d @ h  # (out, in), H symmetric
        out_f = d.shape[0]
        self.cols = torch.zeros(out_f, capacity, dtype=torch.long, device=d.device)  # (out, S)
        self.coef = torch.zeros(out_f, capacity, dtype=d.dtype, device=d.device)  # 0: unused slot
        self.n = torch.zeros(out_f, dtype=torch.long, device=d.device)  # (out,) slots used
        self.used = 0  # max over rows of n: the slots worth reading

    def at(self, rows: Tensor, cols: Tensor) -> Tensor:
        s = self.used
        if s == 0:
            return self.hd0[rows, cols]
        # H is symmetric: H[changed, col] = H[col, changed]; a row copy then a gather beats a
        # scattered 2-D gather by far on CPU.
        past = self.h.index_select(0, cols).gather(1, self.cols.index_select(0, rows)[:, :s])
        coef = self.coef.index_select(0, rows)[:, :s]  # (k, s)
        return self.hd0[rows, cols] + (coef * past).sum(dim=1)

    def add(self, rows: Tensor, g: Tensor, a: Tensor, p: Tensor, b: Tensor) -> None:
        n = self.n[rows]
        self.cols[rows, n], self.coef[rows, n] = g, a
        self.cols[rows, n + 1], self.coef[rows, n + 1] = p, b
        self.n[rows] = n + 2
        self.used = max(self.used, int(n.max()) + 2)


class _Queue:
    """Per-row candidate lists, sorted once, best first; a pointer per row walks past used heads.

    DSnoT's scores of the weights still eligible never change (only swapped weights change, and
    those leave the lists), so one sort replaces an arg-max per cycle, as in the reference.
    """

    def __init__(self, scores: Tensor, eligible: Tensor, descending: bool) -> None:
        fill = -_INF if descending else _INF
        masked = scores.masked_fill(~eligible, fill)  # (out, in) ineligible sort last
        self.order = torch.sort(masked, dim=1, descending=descending, stable=True).indices
        self.count = eligible.sum(dim=1)  # (out,)
        self.ptr = torch.zeros_like(self.count)  # (out,)

    def head(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """(k,) best remaining column of each row in ``rows``, and whether it has one."""
        ptr = self.ptr[rows]
        last = self.order.shape[1] - 1
        return self.order[rows, ptr.clamp(max=last)], ptr < self.count[rows]

    def pop(self, rows: Tensor) -> None:
        self.ptr[rows] += 1


class _PaperProposer:
    """The paper's swap: grow by ``sign(e) W E[x] / Var^pow``, prune by Wanda's score.

    Args:
        grow: (out, in) signed growing score ``W E[x] / Var^pow``.
        prune: (out, in) Wanda score ``|Ŵ| ||x||``; lowest is pruned first.
        contrib: (out, in) ``Ŵ E[x]``, what pruning a weight adds to ``e``.
        keep: (out, in) current keep-mask.
        m: M of N:M, or 0 for unstructured.
    """

    def __init__(self, grow: Tensor, prune: Tensor, contrib: Tensor, keep: Tensor, m: int) -> None:
        self.m = m
        # Growing a weight moves e by -W E[x]: positive scores help when e > 0, negative when e < 0.
        self.grow_up = _Queue(grow, ~keep & (grow > 0), descending=True)
        self.grow_down = _Queue(-grow, ~keep & (grow < 0), descending=True)
        if m:
            # N:M prunes inside the grown weight's group: a gather of M scores, no list needed.
            self.prune_group = prune.masked_fill(~keep, _INF)  # (out, in)
        else:
            self.prune_up = _Queue(prune, keep & (contrib < 0), descending=False)
            self.prune_down = _Queue(prune, keep & (contrib > 0), descending=False)

    def propose(self, rows: Tensor, e: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(grow column, prune column, has grow, has prune) for each of ``rows`` (k,)."""
        up = e > 0
        self.rows, self.up = rows, up
        g_up, ok_up = self.grow_up.head(rows)
        g_down, ok_down = self.grow_down.head(rows)
        g, has_g = torch.where(up, g_up, g_down), torch.where(up, ok_up, ok_down)
        if self.m:
            start = g - g % self.m  # (k,) the grown weight's group
            cols = start.unsqueeze(1) + torch.arange(self.m, device=g.device)  # (k, m)
            flat = rows.unsqueeze(1) * self.prune_group.shape[1] + cols  # (k, m)
            best, local = self.prune_group.view(-1)[flat].min(dim=1)
            p, has_p = start + local, best < _INF
        else:
            p_up, okp_up = self.prune_up.head(rows)
            p_down, okp_down = self.prune_down.head(rows)
            p, has_p = torch.where(up, p_up, p_down), torch.where(up, okp_up, okp_down)
        self.p = p
        return g, p, has_g, has_p

    def retire_grow(self, sel: Tensor) -> None:
        """The last proposal's grow candidates in rows ``sel`` (k,) bool are used up."""
        self.grow_up.pop(self.rows[sel & self.up])
        self.grow_down.pop(self.rows[sel & ~self.up])

    def retire_prune(self, sel: Tensor) -> None:
        """The last proposal's prune candidates in rows ``sel`` were pruned."""
        if self.m:
            self.prune_group[self.rows[sel], self.p[sel]] = _INF
        else:
            self.prune_up.pop(self.rows[sel & self.up])
            self.prune_down.pop(self.rows[sel & ~self.up])


class _ExactProposer:
    """Swaps chosen by their exact effect on ``err`` (``exact_selection=True``).

    Holds references to the refiner's live (out, in) tensors ``cur``, ``d`` and ``hd``. Choosing
    runs in float32 (only the choice depends on it; acceptance is checked in float64).
    """

    def __init__(self, cur: Tensor, d: Tensor, hd: Tensor, h: Tensor, keep: Tensor, m: int) -> None:
        self.cur, self.d, self.hd, self.m = cur, d, hd, m
        self.h = h.float()  # (in, in)
        self.h_diag = torch.diagonal(self.h)  # (in,)
        self.can_grow = ~keep  # (out, in) pruned and never touched
        self.can_prune = keep.clone()  # kept and never touched

    def propose(self, rows: Tensor, e: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        def take(t: Tensor) -> Tensor:  # (k, in); ``rows`` is sorted, so all rows means arange
            return t if rows.numel() == t.shape[0] else t.index_select(0, rows)

        cur, d, hd = take(self.cur).float(), take(self.d).float(), take(self.hd).float()
        # Growing j alone changes err by d_j^2 H_jj - 2 d_j (H d)_j (with a = -d_j).
        grow = (d * (d * self.h_diag - 2 * hd)).masked_fill_(~take(self.can_grow), _INF)  # (k, in)
        # Pruning j alone changes it by 2 Ŵ_j (H d)_j + Ŵ_j^2 H_jj.
        prune = cur * (2 * hd + cur * self.h_diag)  # (k, in)
        if self.m:
            prune.masked_fill_(~take(self.can_prune), _INF)
            g, p, has_g = _best_pair_in_groups(grow, prune, d, cur, self.h, self.m)
            has_p = has_g
        else:
            best, g = grow.min(dim=1)
            has_g = best < _INF
            a = -d.gather(1, g.unsqueeze(1))  # (k, 1)
            # Together with g, pruning j adds the cross term 2 a Ŵ_j H_gj.
            prune += 2 * a * cur * self.h.index_select(0, g)
            best, p = prune.masked_fill_(~take(self.can_prune), _INF).min(dim=1)
            has_p = best < _INF
        self.rows, self.g, self.p = rows, g, p
        return g, p, has_g, has_p

    def retire_grow(self, sel: Tensor) -> None:
        self.can_grow[self.rows[sel], self.g[sel]] = False

    def retire_prune(self, sel: Tensor) -> None:
        self.can_prune[self.rows[sel], self.p[sel]] = False


def _best_pair_in_groups(grow: Tensor, prune: Tensor, d: Tensor, cur: Tensor, h: Tensor,
                         m: int) -> tuple[Tensor, Tensor, Tensor]:
    """Best (grow, prune) pair within any group of ``m`` per row, by exact change of ``err``.

    Args:
        grow, prune: (k, in) change of err of growing / pruning each weight alone; inf if not allowed.
        d, cur: (k, in) residual and current weight.
        h: (in, in) Hessian.

    Returns:
        (k,) grow column, (k,) prune column, (k,) whether any pair was allowed.
    """
    k, in_f = grow.shape
    ng = in_f // m
    h_blocks = h.reshape(ng, m, ng, m).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # (ng, m, m)
    cross = 2 * (-d).reshape(k, ng, m, 1) * cur.reshape(k, ng, 1, m) * h_blocks  # (k, ng, m, m)
    total = grow.reshape(k, ng, m, 1) + prune.reshape(k, ng, 1, m) + cross  # inf + finite: no NaN
    best, idx = total.reshape(k, -1).min(dim=1)
    group, gi, pi = idx // (m * m), (idx // m) % m, idx % m
    return group * m + gi, group * m + pi, best < _INF


def _check_inputs(dense_weight: Tensor, pruned_weight: Tensor, mask: Tensor, stats: LayerStats,
                  pattern: Pattern, options: DSnoTOptions, name: str) -> None:
    """Raise a SpecError naming the layer for anything the refiner cannot work with."""
    check_divisible(tuple(dense_weight.shape), pattern, name)
    if not isinstance(pattern, (Unstructured, NM)):
        raise SpecError(f"{name}: dsnot supports unstructured and N:M, not {pattern}")
    shape = tuple(dense_weight.shape)
    if tuple(pruned_weight.shape) != shape or tuple(mask.shape) != shape:
        raise SpecError(f"{name}: dsnot needs dense weight, pruned weight and mask of one shape, "
                        f"got {shape}, {tuple(pruned_weight.shape)}, {tuple(mask.shape)}")
    in_f = shape[1]
    if stats.hessian is None or tuple(stats.hessian.shape) != (in_f, in_f):
        raise SpecError(f"{name}: dsnot needs an ({in_f}, {in_f}) Hessian in the layer statistics")
    if stats.input_sum is None or tuple(stats.input_sum.shape) != (in_f,) or stats.tokens <= 0:
        raise SpecError(f"{name}: dsnot needs the input sum over at least one calibration token")
    if options.max_cycles < 0 or options.update_threshold < 0:
        raise SpecError(f"{name}: dsnot needs max_cycles >= 0 and update_threshold >= 0")
