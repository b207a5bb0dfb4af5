"""A model whose weights stay on disk: the skeleton on the meta device, tensors read when needed.

:class:`LazyModel` builds the class a ``save_pretrained`` folder names from its ``config.json`` with
every parameter on the meta device (``accelerate.init_empty_weights(include_buffers=False)``: the
buffers a model computes itself, such as rotary frequencies, are real), ties the weights as
transformers does, and maps each parameter to its tensor in the shards (:class:`ShardIndex`).
:meth:`load` reads the tensors of a part of the model (one block, or everything outside the blocks)
into place, cast to the working dtype the way ``from_pretrained(dtype=...)`` casts them;
:meth:`free` puts them back on the meta device. The streaming one-shot pipeline
(:mod:`prunus.oneshot.stream`) holds one block at a time this way.

Bad input is refused before any work: a shard the index names but the folder lacks, or a tensor the
model needs that no shard holds, is a ModelError naming the tensors. A checkpoint whose tensor names
differ from the model's (transformers renames some legacy layouts on load) raises
:class:`NotStreamable`, and ``prunus prune`` then loads it in memory.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch
from torch import Tensor, nn

from prunus.core.finite import check_finite, count_nonfinite, refuse_nonfinite
from prunus.core.units import find_blocks
from prunus.errors import ModelError
from prunus.io.dtypes import check_half_range, stored_dtype
from prunus.io.shards import ShardIndex, _names


class NotStreamable(ModelError):
    """The checkpoint can be loaded, but not streamed (the message says why)."""


@dataclass
class Tensorref:
    """One parameter or buffer of the skeleton, under every name it has (tied weights: several)."""

    key: str  # the name the shards hold it under
    owners: list[tuple[nn.Module, str, bool]] = field(default_factory=list)  # (module, leaf, is_param)
    names: list[str] = field(default_factory=list)


def config_dtype(config) -> Optional[torch.dtype]:  # noqa: ANN001
    """The dtype a config says (``dtype`` or the older ``torch_dtype``), as ``from_pretrained(dtype="auto")``."""
    for attr in ("dtype", "torch_dtype"):
        v = getattr(config, attr, None)
        if isinstance(v, torch.dtype):
            return v
        if isinstance(v, str) and isinstance(getattr(torch, v, None), torch.dtype):
            return getattr(torch, v)
    return None


@contextlib.contextmanager
def _empty_weights() -> Iterator[None]:
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        yield


class LazyModel:
    """The model in ``folder`` with its weights on disk (see the module docstring).

    Args:
        folder: a ``save_pretrained`` folder with ``config.json`` and ``*.safetensors``.
        dtype: the working dtype; None: the checkpoint's (its config's, else the shards' own).
        device: where loaded tensors go (the compute device).
    """

    def __init__(self, folder: Path, dtype: Optional[torch.dtype] = None, device: str | torch.device = "cpu") -> None:
        import transformers

        from prunus.export import arch

        self.folder = Path(folder)
        self.index = ShardIndex(self.folder)  # missing shards: refused here, before anything else
        try:
            config = transformers.AutoConfig.from_pretrained(str(self.folder), local_files_only=True)
        except Exception as e:  # transformers raises many types
            raise ModelError(f"cannot read {self.folder / 'config.json'}: {str(e).strip().splitlines()[0]}") from None
        self.stored = config_dtype(config) or stored_dtype(self.index.files()) or torch.float32
        self.dtype = dtype or self.stored
        self.device = torch.device(device)
        try:
            with _empty_weights():
                model = arch.build(config, dtype=self.dtype)
            model.tie_weights()
            self.prefix, self.blocks = find_blocks(model)
        except Exception as e:  # an architecture that cannot be built empty, or has no blocks
            raise NotStreamable(f"the model cannot be built without its weights ({str(e).strip().splitlines()[0]})") from None
        model.eval()
        model.requires_grad_(False)
        self.model = model
        self.refs = self._refs()

    def _refs(self) -> list[Tensorref]:
        by_id: dict[int, Tensorref] = {}
        order: list[Tensorref] = []
        persistent = set(self.model.state_dict().keys())
        for fqn, mod in self.model.named_modules(remove_duplicate=False):
            for leaf, t, is_param in ([(n, p, True) for n, p in mod._parameters.items()]
                                      + [(n, b, False) for n, b in mod._buffers.items()]):
                name = f"{fqn}.{leaf}" if fqn else leaf
                if t is None or (not is_param and name not in persistent):
                    continue
                ref = by_id.get(id(t))
                if ref is None:
                    ref = by_id[id(t)] = Tensorref(key="")
                    order.append(ref)
                if (mod, leaf, is_param) not in ref.owners:
                    ref.owners.append((mod, leaf, is_param))
                if name not in ref.names:
                    ref.names.append(name)
        missing, wrong = [], []
        for ref in order:
            ref.key = next((n for n in ref.names if n in self.index), "")
            mod, leaf, is_param = ref.owners[0]
            if not ref.key and is_param:
                missing.append(ref.names[0])
            cur = mod._parameters[leaf] if is_param else mod._buffers[leaf]
            if ref.key and tuple(cur.shape) != self.index.shape(ref.key):
                wrong.append(f"{ref.key} {list(self.index.shape(ref.key))} (the model expects {list(cur.shape)})")
        if wrong:
            raise ModelError(f"{self.folder}: {len(wrong)} tensor(s) do not fit the model ({_names(wrong, 2)}); "
                             f"was it saved from a different config?")
        if missing:
            known = {n for r in order for n in r.names}
            if any(k not in known for k in self.index.keys()):
                raise NotStreamable(f"the tensor names in {self.folder} differ from the model's "
                                    f"({_names(missing)} not found under those names)")
            raise ModelError(f"{self.folder} lacks {len(missing)} tensor(s) the model needs ({_names(missing)}); "
                             f"they would be random: restore the files or re-save the model")
        return [r for r in order if r.key]  # buffers the files lack keep their computed values

    # ------------------------------------------------------------------------------------ parts

    def block_refs(self, index: int) -> list[Tensorref]:
        head = f"{self.prefix}.{index}."
        return [r for r in self.refs if any(n.startswith(head) for n in r.names)]

    def outside_refs(self) -> list[Tensorref]:
        """Everything outside the blocks: embeddings, final norm, output head."""
        head = self.prefix + "."
        return [r for r in self.refs if not any(n.startswith(head) for n in r.names)]

    def load(self, refs: Iterable[Tensorref], what: str = "") -> None:
        """Read ``refs`` from the shards into the model, in the working dtype, on the device (as
        ordinary tensors, also when called under inference mode: block steps train them)."""
        with torch.inference_mode(False):
            self._load(refs)
        check_finite(self.model, what or str(self.folder))

    def _load(self, refs: Iterable[Tensorref]) -> None:
        for ref in refs:
            t = self.index.read(ref.key)
            want = ref.owners[0][0]._parameters[ref.owners[0][1]] if ref.owners[0][2] else None
            dtype = want.dtype if want is not None else t.dtype
            if t.is_floating_point() and t.dtype != dtype:
                if dtype == torch.float16:
                    check_half_range([(ref.key, t)], str(self.folder))
                t = t.to(dtype)
            self._put(ref, t.to(self.device))

    def free(self, refs: Iterable[Tensorref]) -> None:
        """Put ``refs`` back on the meta device (their memory is released)."""
        for ref in refs:
            mod, leaf, is_param = ref.owners[0]
            cur = mod._parameters[leaf] if is_param else mod._buffers[leaf]
            self._put(ref, torch.empty(cur.shape, dtype=cur.dtype, device="meta"))

    def state(self, refs: Iterable[Tensorref]) -> dict[str, Tensor]:
        """The current tensors of ``refs`` by their stored key (as a state dict has them, detached)."""
        out = {}
        for ref in refs:
            mod, leaf, is_param = ref.owners[0]
            out[ref.key] = (mod._parameters[leaf] if is_param else mod._buffers[leaf]).detach()
        return out

    def tied(self) -> dict[str, str]:
        """Alias name -> stored key, for every tensor known under more than one name."""
        return {n: r.key for r in self.refs for n in r.names if n != r.key}

    @staticmethod
    def _put(ref: Tensorref, value: Tensor) -> None:
        param = None
        for mod, leaf, is_param in ref.owners:
            if is_param:
                param = param if param is not None else nn.Parameter(value, requires_grad=False)
                mod._parameters[leaf] = param
            else:
                mod._buffers[leaf] = value

    def scan(self, what: str) -> None:
        """Every tensor read once, before any work (one in memory at a time): NaN/Inf anywhere is
        refused as :func:`~prunus.core.finite.check_finite` refuses it, and so is, when the working
        dtype is float16 and the checkpoint's is not, a weight beyond float16's range."""
        half = self.dtype == torch.float16
        bad = []
        for ref in self.refs:
            t = self.index.read(ref.key)
            if t.is_floating_point():
                n = count_nonfinite(t)
                if n:
                    bad.append((ref.names[0], n))
                elif half and t.dtype != torch.float16:
                    check_half_range([(ref.names[0], t)], what)
        refuse_nonfinite(bad, what)
