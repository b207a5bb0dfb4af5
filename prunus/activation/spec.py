"""What a ``prunus prune`` job asks of activation sparsity: ``--activation-sparsity F
[--activation-method NAME]``, or the recipe key ``activation: {sparsity: 0.25, method: teal,
options: {step: 0.1}}`` (dotted overrides: ``activation.options.greedy=false``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

from prunus.activation.registry import get, options_for
from prunus.core.options import coerce
from prunus.core.spec import parse_activation_sparsity
from prunus.errors import SpecError

DEFAULT_METHOD = "teal"
KEYS = ("sparsity", "method", "options")


@dataclass(frozen=True)
class ActivationSpec:
    """A typed activation request: the target, the method, and the method's options dataclass."""

    sparsity: float
    method: str = DEFAULT_METHOD
    options: Any = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "sparsity", parse_activation_sparsity(self.sparsity))
        object.__setattr__(self, "method", get(coerce(self.method, str, "activation method")).name)
        object.__setattr__(self, "options", options_for(self.method, self.options))


def activation_spec(raw: Any) -> Optional[ActivationSpec]:
    """The recipe's ``activation`` mapping as an :class:`ActivationSpec`; None when it asks for none."""
    if raw is None or isinstance(raw, ActivationSpec):
        return raw
    if not isinstance(raw, Mapping):
        raise SpecError(f"activation must be a mapping like {{sparsity: 0.25, method: teal}}, got {raw!r}")
    if unknown := sorted(set(map(str, raw)) - set(KEYS)):
        raise SpecError(f"activation: unknown key(s) {unknown}; known: {list(KEYS)}")
    if raw.get("sparsity") is None:
        if raw.get("method") is not None or raw.get("options"):
            raise SpecError("--activation-method needs --activation-sparsity (a ratio in [0, 1) like 0.25)")
        return None
    return ActivationSpec(raw["sparsity"], raw.get("method") or DEFAULT_METHOD, raw.get("options"))
