"""Sparsity patterns and the sparsity spec: the only place where "2:4" or "50%" strings are parsed.

Every other module receives typed, frozen objects. Parsing happens once, at the edge (CLI, recipe,
``prunus.prune(..., sparsity="2:4")``), so a typo fails before any model is loaded.

Grammar accepted by :func:`parse_sparsity`::

    0.5  | 50%  | unstructured@0.5      unstructured, at a ratio in [0, 1]
    2:4  | 4:8  | 1:4                   N:M along the input dimension, 0 < N < M
    4x4@0.5 | 8x1@50%                   blocks of RxC weights, pruned whole, at a ratio
    channel@0.3                         whole output channels (rows of the weight), at a ratio

Structured removal (:class:`Structure`) comes first, each part joined by ``+``::

    mlp@0.3      30% of every MLP's intermediate channels removed (whole rows of gate/up, columns of down)
    heads@0.25   25% of the attention heads removed (GQA-aware: see prunus.structured)
    blocks@4     4 whole blocks removed

    mlp@0.3+heads@0.25   blocks@2+mlp@0.2+2:4   mlp@0.25+2:4+int8   (then N:M on what remains)

A sparsity may be followed by a weight quantization, ``SPARSITY+QUANT`` (:func:`parse_spec`)::

    QUANT   := "int" BITS [ "g" GROUP | "c" ] [ "z" ]
    BITS    := 8 | 4
    GROUP   := a power of two from 8 to 4096: scales are shared by GROUP consecutive inputs of a
               row; without it int8 has one scale per output channel and int4 groups of 128
    c       := one scale per output channel (spelled out only where it is not the default: int4c)
    z       := asymmetric: unsigned codes with an integer zero point per scale (default symmetric:
               signed codes, no zero point)

    2:4+int8   50%+int4   0.5+int4g64   4:8+int4g128z   0+int8   int8 (= 0+int8: dense, quantized)

Only the kept weights are quantized (:mod:`prunus.core.quant`); pruned weights stay exactly 0.
Anything else after ``+`` (``int3``, ``int4g0``, ``int8g7``, ``fp8``, ``int8a``) is a SpecError.
``str(spec)`` writes the canonical form, which parses back to an equal spec; a spec without
``+QUANT`` is exactly what it was before quantization existed (``quant`` is None).

Example:
    >>> parse_sparsity("2:4")
    (NM(n=2, m=4), 0.5)
    >>> SparsitySpec.parse("4x4@50%", allocation="global").pattern
    Block(rows=4, cols=4)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional, Union

from prunus.errors import SpecError


@dataclass(frozen=True)
class Unstructured:
    """Any weight may be pruned on its own."""

    def __str__(self) -> str:
        return "unstructured"


@dataclass(frozen=True)
class NM:
    """At most ``n`` non-zeros in every group of ``m`` consecutive weights along the input dim."""

    n: int
    m: int

    def __post_init__(self) -> None:
        if not (isinstance(self.n, int) and isinstance(self.m, int)):
            raise SpecError(f"N:M needs integers, got {self.n!r}:{self.m!r}")
        if self.m <= 0:
            raise SpecError(f"N:M needs M > 0, got {self.n}:{self.m}")
        if not 0 < self.n < self.m:
            raise SpecError(f"N:M needs 0 < N < M, got {self.n}:{self.m}")

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


@dataclass(frozen=True)
class Block:
    """Blocks of ``rows x cols`` weights (output x input) are kept or pruned whole."""

    rows: int
    cols: int

    def __post_init__(self) -> None:
        if self.rows <= 0 or self.cols <= 0:
            raise SpecError(f"block shape must be positive, got {self.rows}x{self.cols}")

    def __str__(self) -> str:
        return f"block{self.rows}x{self.cols}"


@dataclass(frozen=True)
class Channel:
    """Whole output channels (rows of an ``(out, in)`` weight) are kept or pruned."""

    def __str__(self) -> str:
        return "channel"


Pattern = Union[Unstructured, NM, Block, Channel]

_RATIO = r"(?P<ratio>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?%?|-[0-9]*\.?[0-9]+%?)"
_NM_RE = re.compile(r"^\s*(?P<n>-?\d+)\s*:\s*(?P<m>-?\d+)\s*$")
_BLOCK_RE = re.compile(r"^\s*(?:block)?(?P<r>\d+)x(?P<c>\d+)\s*@\s*" + _RATIO + r"\s*$", re.I)
_NAMED_RE = re.compile(r"^\s*(?P<kind>unstructured|channel|row)\s*@\s*" + _RATIO + r"\s*$", re.I)
_PLAIN_RE = re.compile(r"^\s*" + _RATIO + r"\s*$")


def parse_ratio(text: str | float) -> float:
    """Parse ``0.5``, ``.5`` or ``50%`` into a float in [0, 1]; anything else is a SpecError."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        s = str(text).strip()
        try:
            value = float(s[:-1]) / 100.0 if s.endswith("%") else float(s)
        except ValueError:
            raise SpecError(f"invalid sparsity {text!r}: expected a ratio like 0.5 or 50%") from None
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise SpecError(f"invalid sparsity {text!r}: a ratio must lie in [0, 1]")
    return value


def parse_activation_sparsity(text: str | float) -> float:
    """An activation sparsity (``0.25`` or ``25%``): the fraction of a linear's inputs zeroed at run
    time, in [0, 1) (1 would zero every input); anything else is a SpecError."""
    try:
        value = parse_ratio(text)
    except SpecError:
        value = math.nan
    if not 0.0 <= value < 1.0:
        raise SpecError(f"invalid activation sparsity {text!r}: expected a ratio in [0, 1) like 0.25 or 25%")
    return value


def parse_sparsity(text: str | float) -> tuple[Pattern, float]:
    """Parse a sparsity string into ``(pattern, sparsity)``. See the module docstring for the grammar."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return Unstructured(), parse_ratio(text)
    s = str(text)
    if m := _NM_RE.match(s):
        pat = NM(int(m["n"]), int(m["m"]))
        return pat, pat.sparsity
    if m := _BLOCK_RE.match(s):
        return Block(int(m["r"]), int(m["c"])), parse_ratio(m["ratio"])
    if m := _NAMED_RE.match(s):
        pat: Pattern = Unstructured() if m["kind"].lower() == "unstructured" else Channel()
        return pat, parse_ratio(m["ratio"])
    if _PLAIN_RE.match(s):
        return Unstructured(), parse_ratio(s)
    raise SpecError(
        f"invalid sparsity {s!r}: expected 0.5, 50%, N:M (2:4), RxC@ratio (4x4@0.5) or channel@ratio"
    )


def format_sparsity(pattern: Pattern, sparsity: float) -> str:
    """Inverse of :func:`parse_sparsity`: a string that parses back to the same pattern and ratio."""
    if isinstance(pattern, NM):
        return str(pattern)
    if isinstance(pattern, Block):
        return f"{pattern.rows}x{pattern.cols}@{sparsity:g}"
    if isinstance(pattern, Channel):
        return f"channel@{sparsity:g}"
    return f"{sparsity:g}"


QUANT_BITS = (8, 4)
DEFAULT_GROUP = {8: None, 4: 128}  # int8: per output channel; int4: groups of 128 inputs
_QUANT_RE = re.compile(r"^int(?P<bits>\d+)(?:g(?P<group>\d+))?(?P<z>z)?$")


@dataclass(frozen=True)
class Quant:
    """Round-to-grid weight quantization of the kept weights.

    Attributes:
        bits: 8 or 4.
        group: inputs per scale along a row (a power of two, 8..4096), or None for one scale per
            output channel.
        symmetric: True: signed codes ``q`` in [-2^(b-1), 2^(b-1)-1], value ``scale * q``; False:
            unsigned codes in [0, 2^b - 1] with an integer zero point ``z``, value ``scale * (q - z)``.
    """

    bits: int
    group: Optional[int] = None
    symmetric: bool = True

    def __post_init__(self) -> None:
        if self.bits not in QUANT_BITS or isinstance(self.bits, bool):
            raise SpecError(f"quantization supports int8 and int4, not int{self.bits}")
        g = self.group
        if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g < 8 or g > 4096
                              or g & (g - 1)):
            raise SpecError(f"quantization group must be a power of two from 8 to 4096, got g{g}")

    def __str__(self) -> str:
        g = "" if self.group == DEFAULT_GROUP[self.bits] else \
            "c" if self.group is None else f"g{self.group}"
        return f"int{self.bits}{g}{'' if self.symmetric else 'z'}"


def parse_quant(text: str) -> Quant:
    """Parse ``int8``, ``int4g64``, ``int4g128z`` (``c``: per channel, only where not the default)."""
    s = str(text).strip().lower()
    per_channel = False
    core = s[:-1] if s.endswith("z") else s
    if core.endswith("c") and "g" not in core:
        per_channel, s = True, core[:-1] + ("z" if s.endswith("z") else "")
    m = _QUANT_RE.match(s)
    if m is None:
        hint = " (activation quantization is not supported; zero points are 'z')" if s.endswith("a") else ""
        raise SpecError(f"invalid quantization {text!r}: expected int8 or int4, optionally gGROUP and z "
                        f"(int4g64, int8z){hint}")
    bits = int(m["bits"])
    if bits not in QUANT_BITS:
        raise SpecError(f"invalid quantization {text!r}: only int8 and int4 are supported")
    if m["group"] is not None and per_channel:
        raise SpecError(f"invalid quantization {text!r}: a group and per-channel 'c' exclude each other")
    group = None if per_channel else int(m["group"]) if m["group"] is not None else DEFAULT_GROUP[bits]
    try:
        return Quant(bits, group, m["z"] is None)
    except SpecError as e:
        raise SpecError(f"invalid quantization {text!r}: {e}") from None


@dataclass(frozen=True)
class Structure:
    """Structured removal: whole units go, and the model gets physically smaller.

    Attributes:
        mlp: fraction of each MLP's intermediate channels removed, in [0, 1).
        heads: fraction of the attention heads removed, in [0, 1).
        blocks: number of whole blocks removed.
    """

    mlp: float = 0.0
    heads: float = 0.0
    blocks: int = 0

    def __post_init__(self) -> None:
        for kind in ("mlp", "heads"):
            v = getattr(self, kind)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or not 0 <= v < 1:
                raise SpecError(f"{kind}@{v!r}: the fraction removed must lie in [0, 1)")
        if isinstance(self.blocks, bool) or not isinstance(self.blocks, int) or self.blocks < 0:
            raise SpecError(f"blocks@{self.blocks!r}: the number of blocks removed must be an integer >= 0")

    def __bool__(self) -> bool:
        return bool(self.mlp or self.heads or self.blocks)

    def __str__(self) -> str:
        parts = ([f"blocks@{self.blocks}"] if self.blocks else []) + \
            ([f"heads@{self.heads:g}"] if self.heads else []) + ([f"mlp@{self.mlp:g}"] if self.mlp else [])
        return "+".join(parts)


_STRUCT_RE = re.compile(r"^\s*(?P<kind>mlp|heads|blocks)\s*@\s*(?P<value>[^+]*?)\s*$", re.I)


def _parse_structure_part(part: str, found: dict[str, float | int]) -> None:
    m = _STRUCT_RE.match(part)
    assert m is not None
    kind, value = m["kind"].lower(), m["value"]
    if kind in found:
        raise SpecError(f"invalid structure {part!r}: {kind}@ given twice")
    if kind == "blocks":
        if not re.fullmatch(r"\d+", value):
            raise SpecError(f"invalid structure {part!r}: blocks@ takes a whole number of blocks (blocks@4)")
        found[kind] = int(value)
        return
    try:
        ratio = parse_ratio(value)
    except SpecError:
        raise SpecError(f"invalid structure {part!r}: {kind}@ takes a fraction in [0, 1) like 0.3 or 30%") from None
    if ratio >= 1:
        raise SpecError(f"invalid structure {part!r}: removing every {kind} unit leaves nothing; use < 1")
    found[kind] = ratio


def parse_structured(text: str | float) -> tuple[Optional[Structure], Pattern, float, Optional[Quant]]:
    """``"mlp@0.3+2:4+int8"`` -> ``(Structure(mlp=0.3), NM(2, 4), 0.5, Quant(8))``.

    The structure parts come first; then at most one sparsity and at most one quantization. A spec
    with only structure parts has sparsity 0 (nothing more is pruned) and no quantization.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return (None, *parse_sparsity(text), None)
    parts = [p for p in str(text).split("+")]
    found: dict[str, float | int] = {}
    while parts and _STRUCT_RE.match(parts[0]):
        _parse_structure_part(parts.pop(0), found)
    if any(_STRUCT_RE.match(p) for p in parts):
        raise SpecError(f"invalid sparsity {text!r}: structure parts (mlp@, heads@, blocks@) come first")
    structure = Structure(**found) if found else None  # type: ignore[arg-type]
    if not parts:
        return structure, Unstructured(), 0.0, None
    rest = "+".join(parts)
    if structure is not None and rest.lower().startswith("int"):
        rest = "0+" + rest
    return (structure, *parse_spec(rest))


def parse_spec(text: str | float) -> tuple[Pattern, float, Optional[Quant]]:
    """``"2:4+int8"`` -> ``(NM(2, 4), 0.5, Quant(8))``; without ``+`` the quant is None."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return (*parse_sparsity(text), None)
    s = str(text).strip()
    if s.lower().startswith("int"):
        s = "0+" + s
    head, plus, tail = s.partition("+")
    if plus and "+" in tail:
        raise SpecError(f"invalid sparsity {text!r}: at most one '+QUANT' (2:4+int8)")
    pattern, sparsity = parse_sparsity(head)
    return pattern, sparsity, parse_quant(tail) if plus else None


@dataclass(frozen=True)
class SparsitySpec:
    """What to prune to: a pattern, a target ratio over the targeted weights, and a layer budget.

    Args:
        pattern: how zeros may be laid out (:class:`Unstructured`, :class:`NM`, :class:`Block`,
            :class:`Channel`).
        sparsity: the fraction of targeted weights to set to zero, in [0, 1]. For N:M it is 1 - N/M.
        allocation: how the budget is split over layers; a name registered in :mod:`prunus.budgets`
            (checked against the registry where the spec is used: ``prunus.budgets.get``)
            (``uniform``, ``global``, ``erk``, ``owl``).
        quant: optional :class:`Quant` of the kept weights (``2:4+int8``); None: float weights.
        structure: optional :class:`Structure` removed first (``mlp@0.3``); the pattern and
            sparsity then apply to what remains.
    """

    pattern: Pattern
    sparsity: float
    allocation: str = "uniform"
    quant: Optional[Quant] = None
    structure: Optional[Structure] = None

    def __post_init__(self) -> None:
        parse_ratio(self.sparsity)
        if isinstance(self.pattern, NM):
            if not math.isclose(self.sparsity, self.pattern.sparsity):
                raise SpecError(f"{self.pattern} fixes sparsity at {self.pattern.sparsity:g}")
            if self.allocation != "uniform":
                raise SpecError(
                    f"N:M ({self.pattern}) fixes every layer's sparsity; allocation "
                    f"{self.allocation!r} cannot apply, use 'uniform'"
                )
        if not isinstance(self.allocation, str) or not self.allocation:
            raise SpecError(f"allocation must be a budget name, got {self.allocation!r}")
        if self.quant is not None and not isinstance(self.quant, Quant):
            raise SpecError(f"quant must be a Quant, got {self.quant!r}")
        if self.structure is not None and not isinstance(self.structure, Structure):
            raise SpecError(f"structure must be a Structure, got {self.structure!r}")
        if self.structure is not None and not self.structure:
            object.__setattr__(self, "structure", None)  # mlp@0 removes nothing: no structure

    @classmethod
    def parse(cls, text: str | float, allocation: str = "uniform") -> "SparsitySpec":
        """Build a spec from ``[STRUCTURE+]SPARSITY[+QUANT]`` (see :func:`parse_structured`) and an
        allocation name."""
        structure, pattern, sparsity, quant = parse_structured(text)
        return cls(pattern, sparsity, allocation, quant, structure)

    @property
    def remainder(self) -> bool:
        """Whether anything is left to do after the structure: a sparsity or a quantization."""
        return self.sparsity > 0 or self.quant is not None or not isinstance(self.pattern, Unstructured)

    def __str__(self) -> str:
        s = format_sparsity(self.pattern, self.sparsity)
        if self.quant is not None:
            s += f"+{self.quant}"
        if self.structure is not None:
            if self.quant is not None and self.sparsity == 0 and isinstance(self.pattern, Unstructured):
                s = str(self.quant)
            s = str(self.structure) + ("+" + s if self.remainder else "")
        return s if self.allocation == "uniform" else f"{s} ({self.allocation})"
