"""Checkpoints: save a pruned model with its masks and provenance, load it back, refuse pickle.

Every format is a module with the same verbs (the safetensors habit):

    save(model, path, *, masks, metadata, tokenizer=None, overwrite=False) -> ExportInfo
    load(path, *, device="cpu", dtype=None) -> model
    load_masks(path) -> {module fqn: bool keep mask}
    read_metadata(path) -> dict

Formats (``FORMATS``):
    compressed  a folder with ``model.safetensors`` holding each pruned weight as packed mask bits +
                kept values (or values + column indices when that is smaller), SHA-256 checked on load.
    dense       an ordinary ``save_pretrained`` folder that plain ``from_pretrained`` loads, plus masks.

Both write ``prunus.json`` (the metadata and the layout) and go through
:func:`prunus.io.fsutil.atomic_dir`, so a checkpoint is complete or absent. Nothing here unpickles:
``.bin``/``.pt``/``.pth``/``.pkl`` weights are refused with a :class:`CheckpointError`.

Example:
    >>> import tempfile, pathlib, torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from prunus.core.masks import topk
    >>> from prunus.core.spec import Unstructured
    >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)).eval()
    >>> w = model.model.layers[0].mlp.up_proj.weight
    >>> mask = topk(w.abs(), 0.5, Unstructured())
    >>> _ = w.data.mul_(mask)
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "ckpt"
    >>> info = save(model, out, masks={"model.layers.0.mlp.up_proj": mask}, metadata={"spec": "0.5"})
    >>> info.format, detect_format(out)
    ('compressed', 'compressed')
    >>> torch.equal(load(out).model.layers[0].mlp.up_proj.weight, w)
    True
    >>> read_metadata(out)["spec"]
    '0.5'
"""

from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from prunus.errors import CheckpointError

MANIFEST = "prunus.json"
FORMAT_VERSION = 2  # 2: floating-point values may be coded (prunus.export.floatcode)
WEIGHTS = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")

# safetensors' dtype names, to size a dense file without writing one.
_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}


@dataclass(frozen=True)
class ExportInfo:
    """What a ``save`` wrote.

    Attributes:
        path: the checkpoint folder.
        format: ``"compressed"`` or ``"dense"``.
        bytes: bytes of the weight files (``*.safetensors``, masks included) on disk.
        dense_bytes: bytes a dense safetensors of the same (untied) state would take.
        total_bytes: bytes of the whole folder (config, tokenizer, ``prunus.json`` included).
        encodings: how each masked weight is stored, by state-dict key (``bitmask``/``csr``/``dense``).
    """

    path: Path
    format: str
    bytes: int
    dense_bytes: int
    total_bytes: int
    encodings: dict[str, str] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """``bytes / dense_bytes``: below 1 means the checkpoint is smaller than a dense one."""
        return self.bytes / max(1, self.dense_bytes)


# ----------------------------------------------------------------------------------------------
# Helpers shared by the format modules (defined before they are imported at the bottom).
# ----------------------------------------------------------------------------------------------


def sha256_tensor(t: Tensor) -> str:
    """SHA-256 of a tensor's raw bytes (row-major, native byte order)."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy()).hexdigest()  # no copy: a buffer view


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    """Inverse of :func:`dtype_name`; a CheckpointError for names torch does not know."""
    dt = getattr(torch, str(name), None)
    if not isinstance(dt, torch.dtype):
        raise CheckpointError(f"unknown dtype {name!r} in checkpoint metadata")
    return dt


def weight_key(fqn: str) -> str:
    """State-dict key of a module's weight: ``"model.layers.0.mlp.up_proj"`` -> ``"...up_proj.weight"``."""
    return f"{fqn}.weight" if fqn else "weight"


def dense_safetensors_bytes(tensors: Mapping[str, Tensor]) -> int:
    """Size of a dense safetensors file of ``tensors`` (header with ``{"format": "pt"}`` included)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES.get(t.dtype, "F32"), "shape": list(t.shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    head = len(json.dumps(header, separators=(",", ":")).encode())
    return 8 + head + (-head % 8) + offset


def folder_bytes(path: Path, pattern: str = "*") -> int:
    """Total size of the files directly in ``path`` matching ``pattern``."""
    return sum(f.stat().st_size for f in path.glob(pattern) if f.is_file())


def unique_state(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The model's state dict with tied tensors kept once.

    Returns:
        ``(tensors, tied)``: ``tensors`` maps each stored key to a detached tensor; ``tied`` maps each
        dropped key (``lm_head.weight``) to the stored key it aliases (``model.embed_tokens.weight``).
        A tensor that overlaps another's storage without being the same view is copied instead.
    """
    for name, mod in model.named_modules():
        if getattr(mod, "parametrizations", None):
            raise CheckpointError(
                f"{name or 'model'} is parametrized; squash the masks into the weights first "
                f"(torch.nn.utils.parametrize.remove_parametrizations) and save again"
            )
    tensors: dict[str, Tensor] = {}
    tied: dict[str, str] = {}
    views: dict[tuple, str] = {}
    storages: set[tuple[str, int]] = set()
    for key, t in model.state_dict().items():
        t = t.detach()
        if t.device.type == "meta":
            raise CheckpointError(f"{key} is on the meta device (not loaded); load the model fully first")
        if t.numel() == 0:
            tensors[key] = t
            continue
        store = (t.device.type, t.untyped_storage().data_ptr())
        view = (*store, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if view in views:
            tied[key] = views[view]
            continue
        if store in storages:
            t = t.clone()  # a different view of shared memory: store its own copy
        else:
            storages.add(store)
        views[view] = key
        tensors[key] = t
    return tensors, tied


@dataclass
class StoredMask:
    """A mask as it is stored: in its weight's layout, with the names it was given under."""

    mask: Tensor  # bool, shaped like the weight, on CPU
    modules: list[str]  # module fqns the mask was given for (two for a tied weight)
    transposed: list[str] = field(default_factory=list)  # of those, given (out, in) for a Conv1D

    def layout(self) -> dict[str, Any]:
        """The manifest entries that let :func:`masks_by_module` hand the masks back as given."""
        nnz = int(torch.count_nonzero(self.mask))
        return {"modules": self.modules, "transposed_modules": self.transposed, "nnz": nnz,
                "sparsity": round(1.0 - nnz / max(1, self.mask.numel()), 6)}


def masks_by_module(mask: Tensor, info: Mapping[str, Any]) -> dict[str, Tensor]:
    """Inverse of :class:`StoredMask`: module fqn -> mask, in the layout each was given in."""
    flipped = set(info.get("transposed_modules", []))
    return {fqn: mask.t().contiguous() if fqn in flipped else mask for fqn in info.get("modules", [])}


def _is_transposed(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2) keeps its weight as (in, out); prunus masks are (out, in)."""
    return type(module).__name__ == "Conv1D"


def resolve_masks(model: nn.Module, tensors: Mapping[str, Tensor], tied: Mapping[str, str],
                  masks: Mapping[str, Tensor] | None) -> dict[str, StoredMask]:
    """Check the masks against the model and map them to stored state-dict keys.

    Args:
        model: the pruned model.
        tensors, tied: from :func:`unique_state`.
        masks: module fqn (or ``fqn.weight``) -> bool keep mask shaped like the module's weight.
            For a transposed ``Conv1D`` weight (in, out) the (out, in) mask that
            :mod:`prunus.core.targets` works with is expected (a weight-shaped one is taken too when the
            weight is not square); it is handed back by ``load_masks`` in the layout given.

    Returns:
        stored key -> :class:`StoredMask`. A mask given for a tied alias (``lm_head``) lands on the
        stored key (``model.embed_tokens.weight``).

    Raises:
        CheckpointError: unknown module, wrong shape or dtype, two different masks on one tied
            weight, or a weight that is non-zero where its mask prunes (masks not applied).
    """
    out: dict[str, StoredMask] = {}
    for name, mask in (masks or {}).items():
        fqn = name
        if weight_key(name) not in tensors and weight_key(name) not in tied and name.endswith(".weight"):
            fqn = name[: -len(".weight")]
        key = weight_key(fqn)
        key = tied.get(key, key)
        if key not in tensors:
            raise CheckpointError(
                f"mask for {name!r}: the model has no weight {weight_key(fqn)!r}; "
                f"masks are keyed by module name, e.g. 'model.layers.0.mlp.up_proj'"
            )
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise CheckpointError(f"mask for {name!r} must be a torch.bool tensor (True = keep)")
        weight = tensors[key]
        mask = mask.detach().to("cpu")
        shape, wshape = tuple(mask.shape), tuple(weight.shape)
        transposed = (weight.dim() == 2 and shape == wshape[::-1] and _is_transposed(model.get_submodule(fqn))
                      and (shape != wshape or wshape[0] == wshape[1]))
        if transposed:
            mask = mask.t().contiguous()
        elif shape != wshape:
            raise CheckpointError(f"mask for {name!r} has shape {shape} but the weight is {wshape}")
        pruned_nonzero = torch.gt(weight.to("cpu") != 0, mask)  # non-zero and not kept
        if bool(pruned_nonzero.any()):
            bad = int(torch.count_nonzero(pruned_nonzero))
            raise CheckpointError(
                f"{name}: {bad} weights are non-zero where the mask prunes them; "
                f"apply the masks to the weights before saving"
            )
        if key in out:
            if not torch.equal(out[key].mask, mask):
                raise CheckpointError(
                    f"masks for {out[key].modules[0]!r} and {name!r} differ but the weights are tied; "
                    f"give one mask for the shared weight"
                )
        else:
            out[key] = StoredMask(mask, [])
        out[key].modules.append(fqn)
        if transposed:
            out[key].transposed.append(fqn)
    return out


def with_provenance(metadata: Mapping[str, Any] | None, model: nn.Module) -> dict[str, Any]:
    """A JSON-checked copy of ``metadata`` with ``prunus_version``, ``created`` and ``source_model``
    filled in where missing."""
    from prunus import __version__

    meta = dict(metadata or {})
    meta.setdefault("prunus_version", __version__)
    meta.setdefault("created", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    source = getattr(getattr(model, "config", None), "_name_or_path", None)
    if source:
        meta.setdefault("source_model", str(source))
    try:
        json.dumps(meta)  # NaN (a diverged perplexity) is allowed: failing after hours would be worse
    except (TypeError, ValueError) as e:
        raise CheckpointError(
            f"metadata is not JSON-serialisable ({e}); use str, int, float, bool, list and dict values"
        ) from None
    return meta


def plain_config(model: nn.Module, dtype: torch.dtype | None) -> Any:
    """A copy of ``model.config`` without ``quantization_config`` (a GGUF model's config carries one,
    and the saved weights are plain dequantized tensors), with ``dtype`` set to the stored dtype."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "save_pretrained"):
        return None
    cfg = copy.deepcopy(cfg)
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    if dtype is not None:
        cfg.dtype = dtype
    return cfg


def main_dtype(tensors: Mapping[str, Tensor]) -> torch.dtype | None:
    """The most common floating dtype by element count, or None without floating tensors."""
    count: dict[torch.dtype, int] = {}
    for t in tensors.values():
        if t.is_floating_point():
            count[t.dtype] = count.get(t.dtype, 0) + t.numel()
    return max(count, key=count.__getitem__) if count else None


def save_extras(model: nn.Module, folder: Path, tokenizer: Any | None) -> None:
    """Write the generation config (when the model has one) and the tokenizer files."""
    gen = getattr(model, "generation_config", None)
    can_generate = getattr(model, "can_generate", lambda: False)
    if gen is not None and can_generate():
        gen.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def write_manifest(folder: Path, manifest: Mapping[str, Any]) -> None:
    """Write ``prunus.json`` (sorted keys, indented: it is read by people too)."""
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The whole ``prunus.json`` of a checkpoint folder ({} for a plain transformers folder).

    Raises:
        CheckpointError: the path is missing, refused (pickle), or ``prunus.json`` is not valid JSON.
    """
    folder = check_checkpoint_path(path)
    f = folder / MANIFEST
    if not f.exists():
        return {}
    try:
        doc = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{f} is corrupt: {e}; re-export the checkpoint") from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"{f} is corrupt: expected a JSON object; re-export the checkpoint")
    return doc


def _looks_like_pickle(path: Path) -> bool:
    """torch.save writes a zip (``PK``) around a pickle; a bare pickle starts with ``\\x80``."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return False
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def _refuse_pickle(path: Path) -> CheckpointError:
    return CheckpointError(
        f"{path} is a pickle file; prunus refuses pickle because loading it can run arbitrary code. "
        f"Convert it to safetensors where you trust it (safetensors.torch.save_file) and load that"
    )


def check_checkpoint_path(path: str | os.PathLike[str]) -> Path:
    """Return ``path`` as a folder that may hold a checkpoint, or raise a CheckpointError.

    Refuses a missing path, a pickle file, any other single file, and a folder whose only weights
    are pickle files. Never opens a pickle.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"{p} does not exist; give a folder written by prunus export or save_pretrained")
    if p.is_file():
        sniff = p.suffix.lower() not in (".safetensors", ".json", ".gguf")  # their first bytes vary
        if p.suffix.lower() in PICKLE_SUFFIXES or (sniff and _looks_like_pickle(p)):
            raise _refuse_pickle(p)
        raise CheckpointError(f"{p} is a file; give the checkpoint folder (config.json + *.safetensors)")
    has_safetensors = any(p.glob("*.safetensors")) or (p / f"{WEIGHTS}.index.json").exists()
    if not has_safetensors:
        pickles = sorted(f.name for f in p.iterdir() if f.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise _refuse_pickle(p / pickles[0])
    return p


def detect_format(path: str | os.PathLike[str]) -> str:
    """The format name of a checkpoint folder: from ``prunus.json``, else from the weights' header,
    else ``"dense"`` for a plain transformers safetensors folder.

    Raises:
        CheckpointError: not a checkpoint (see :func:`check_checkpoint_path`), or an unknown format.
    """
    folder = check_checkpoint_path(path)
    manifest = read_manifest(folder)
    if manifest:
        fmt = manifest.get("format")
        if fmt not in FORMATS:
            raise CheckpointError(
                f"{folder / MANIFEST} names format {fmt!r}; this prunus reads {', '.join(FORMATS)}"
            )
        return str(fmt)
    if (folder / WEIGHTS).exists() and compressed.header_format(folder / WEIGHTS) == "compressed":
        return "compressed"
    has_weights = (folder / WEIGHTS).exists() or (folder / f"{WEIGHTS}.index.json").exists()
    if has_weights and (folder / "config.json").exists():
        return "dense"
    raise CheckpointError(
        f"{folder} is not a prunus or transformers checkpoint (no prunus.json, config.json or "
        f"model.safetensors); give the folder that prunus export or save_pretrained wrote"
    )


def assign_tensor(model: nn.Module, key: str, value: Tensor) -> None:
    """Put ``value`` in place of the parameter or buffer ``key`` (no copy; keeps requires_grad)."""
    mod_name, _, leaf = key.rpartition(".")
    try:
        mod = model.get_submodule(mod_name)
    except AttributeError:
        raise CheckpointError(f"the checkpoint has {key!r} but the model has no module {mod_name!r}") from None
    if leaf in mod._parameters and mod._parameters[leaf] is not None:
        old = mod._parameters[leaf]
        mod._parameters[leaf] = nn.Parameter(value, requires_grad=bool(old.requires_grad))
    elif leaf in mod._buffers:
        mod._buffers[leaf] = value
    else:
        raise CheckpointError(f"the checkpoint has {key!r} but the model has no such parameter or buffer")


# ----------------------------------------------------------------------------------------------
# The registry and the format-agnostic verbs.
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Format:
    """One checkpoint format: a name and its verbs."""

    name: str
    module: ModuleType
    save: Callable[..., ExportInfo]
    load: Callable[..., nn.Module]
    load_masks: Callable[..., dict[str, Tensor]]
    read_metadata: Callable[..., dict[str, Any]]


# Imported here, after the helpers above that they use (the package is their common base).
from prunus.export import compressed, dense  # noqa: E402

FORMATS: dict[str, Format] = {
    m.NAME: Format(m.NAME, m, m.save, m.load, m.load_masks, m.read_metadata) for m in (compressed, dense)
}


def _format(name: str) -> Format:
    if name not in FORMATS:
        raise CheckpointError(f"unknown export format {name!r}; choose one of {', '.join(FORMATS)}")
    return FORMATS[name]


def save(model: nn.Module, path: str | os.PathLike[str], format: str = "compressed", *,
         masks: Mapping[str, Tensor] | None = None, metadata: Mapping[str, Any] | None = None,
         tokenizer: Any | None = None, overwrite: bool = False, **options: Any) -> ExportInfo:
    """Save ``model`` to the folder ``path`` in ``format`` (see ``FORMATS``), atomically.

    Args:
        model: the pruned model (masks already applied to its weights).
        path: the output folder; it must not exist unless ``overwrite``.
        format: ``"compressed"`` (default) or ``"dense"``.
        masks: module fqn -> bool keep mask shaped like that module's ``.weight``.
        metadata: JSON-serialisable provenance (spec, method, per-layer sparsity, ...); prunus fills
            in ``prunus_version``, ``created`` and ``source_model`` where missing.
        tokenizer: saved beside the weights when given.
        overwrite: replace an existing folder (only once the new one is complete).
        options: format-specific; ``compressed`` takes ``code_values`` (default True).

    Returns:
        :class:`ExportInfo` with the bytes on disk and the dense-equivalent bytes.
    """
    return _format(format).save(model, path, masks=masks, metadata=metadata, tokenizer=tokenizer,
                                overwrite=overwrite, **options)


def load(path: str | os.PathLike[str], device: str | torch.device = "cpu",
         dtype: torch.dtype | None = None, runtime: str = "auto") -> nn.Module:
    """Load a checkpoint folder of any format (detected), in eval mode.

    Args:
        path: a folder written by :func:`save` or by transformers' ``save_pretrained``.
        device: where the weights go.
        dtype: cast floating weights to this dtype; ``None`` keeps the stored dtype.
        runtime: ``auto`` applies the kernel plan stored by ``prunus export --runtime auto``
            (sparse kernels only where they were measured faster); ``dense`` ignores it.

    Raises:
        CheckpointError: missing, not a checkpoint, pickle, truncated or tampered with.
        KernelError: the stored plan does not match the model.
    """
    model = _format(detect_format(path)).load(path, device=device, dtype=dtype)
    if runtime == "auto":
        meta = read_metadata(path)
        if "kernel_plan" in meta:
            from prunus.kernels.runtime import apply_stored_plan

            apply_stored_plan(model, meta, load_masks(path))
    return model


def load_masks(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """The keep masks stored with a checkpoint: module fqn -> bool tensor ({} if none)."""
    return _format(detect_format(path)).load_masks(path)


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The metadata given to :func:`save` (plus provenance); {} for a plain transformers folder."""
    return _format(detect_format(path)).read_metadata(path)


__all__ = [
    "ExportInfo", "Format", "FORMATS", "save", "load", "load_masks", "read_metadata",
    "read_manifest", "detect_format", "check_checkpoint_path",
]
