"""Sharded checkpoints of an FSDP2 run, through ``torch.distributed.checkpoint`` (DCP), with ``--resume``.

A checkpoint is the folder ``<checkpoint_dir>/seed<S>.dcp/``:

- DCP's files (``.metadata`` and one ``__<rank>_0.distcp`` per rank): every rank writes the rows it
  holds of the parameters, of the optimizer state (momentum, Adam's moments) and of the masks, plus
  the tensors every rank holds whole (Adam's step counts, the sparsifier's tensor state such as LTH's
  rewind point, the RNG state), which DCP writes once;
- ``prunus-train.json``, written by rank 0 after every rank's files are complete: the config's
  fingerprint, the step, history and counters, the sparsifier's plain state, the optimizer's
  hyper-parameters, the name, shape, dtype and sharding of every tensor (to allocate what DCP loads
  into), and the SHA-256 of every other file in the folder.

The folder is written atomically (:func:`prunus.io.fsutil.atomic_dir`): rank 0 makes a hidden
temporary sibling and broadcasts its name, every rank writes into it, and after a barrier rank 0
adds the manifest and renames the folder into place; a run killed mid-write leaves the previous
checkpoint whole (the next write removes the dead run's temporary). :func:`check` verifies the
manifest, every file's digest and the fingerprint before the process group is joined (a corrupt or
foreign checkpoint fails on every rank alike, before any work); :func:`load` then reads the tensors
into the sharded model, optimizer and sparsifier.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from prunus.errors import CheckpointError
from prunus.io.fsutil import atomic_dir
from prunus.training.sharding import is_sharded
from prunus.training.sparsifier import Sparsifier
from prunus.training.trainer.checkpoints import check_fingerprint
from prunus.training.trainer.config import TrainConfig

FORMAT = "prunus-train-dcp-v1"
MANIFEST = "prunus-train.json"


def dcp_path(config: TrainConfig, seed: int) -> Path:
    """Where the sharded checkpoint of ``seed`` goes: ``<checkpoint_dir>/seed<S>.dcp``."""
    return Path(config.checkpoint_dir) / f"seed{seed}.dcp"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _split(tree: dict[str, Any], tensors: dict[str, Any], plain: dict[str, Any]) -> None:
    """Tensors (at any depth of nested dicts) into ``tensors``, everything else into ``plain``."""
    for k, v in tree.items():
        if isinstance(v, Tensor):
            tensors[k] = v
        elif isinstance(v, dict) and v and all(isinstance(x, Tensor) for x in v.values()):
            tensors[k] = dict(v)
        else:
            plain[k] = v


def _state(model: nn.Module, opt: torch.optim.Optimizer, sp: Optional[Sparsifier]) -> tuple[dict, dict]:
    """(the tensors DCP writes, the plain values the manifest holds) of a run."""
    osd = opt.state_dict()
    tensors: dict[str, Any] = {"model": model.state_dict(), "rng": torch.get_rng_state(), "optim": {}}
    plain: dict[str, Any] = {"param_groups": osd["param_groups"], "optim": {}, "sparsifier": None}
    for i, st in osd["state"].items():
        t, p = {}, {}
        _split(st, t, p)
        tensors["optim"][str(i)], plain["optim"][str(i)] = t, p
    if sp is not None:
        sd = sp.state_dict()
        t, p = {}, {}
        _split(sd["state"], t, p)
        tensors["masks"], tensors["sp_state"] = sd["masks"], t
        plain["sparsifier"] = {k: sd[k] for k in ("method", "step", "released", "dense_grad_steps")}
        plain["sparsifier"]["state"] = p
    return tensors, plain


def _entries(tree: Any, path: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Name, shape, dtype and sharding of every tensor below ``tree`` (the model's are left out)."""
    if isinstance(tree, Tensor):
        return [{"path": list(path), "shape": list(tree.shape), "dtype": str(tree.dtype).removeprefix("torch."),
                 "sharded": is_sharded(tree)}]
    out = []
    for k, v in tree.items():
        if path or k != "model":
            out += _entries(v, (*path, k))
    return out


def _template(entries: list[dict[str, Any]], model: nn.Module) -> dict[str, Any]:
    """Empty tensors to load into: sharded like the parameters where the checkpoint's were sharded."""
    import torch.distributed.tensor as dt

    like = next(p for p in model.parameters() if is_sharded(p))
    tree: dict[str, Any] = {"model": model.state_dict()}
    for e in entries:
        dtype = getattr(torch, e["dtype"])
        t = (dt.zeros(e["shape"], dtype=dtype, device_mesh=like.device_mesh, placements=like.placements)
             if e["sharded"] else torch.zeros(e["shape"], dtype=dtype))
        node = tree
        for k in e["path"][:-1]:
            node = node.setdefault(k, {})
        node[e["path"][-1]] = t
    return tree


def save(path: Path, meta: dict[str, Any], model: nn.Module, opt: torch.optim.Optimizer,
         sp: Optional[Sparsifier]) -> None:
    """Every rank writes its shards; rank 0 adds the manifest and renames the folder into place."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    rank = dist.get_rank()
    tensors, plain = _state(model, opt, sp)
    ctx, box = None, [None, None]
    if rank == 0:
        try:
            ctx = atomic_dir(path, overwrite=True)
            box[0] = str(ctx.__enter__())
        except Exception as e:
            ctx, box[1] = None, str(e)
    dist.broadcast_object_list(box, src=0)  # the temporary folder, or why rank 0 could not make it
    if box[1] is not None:
        raise CheckpointError(f"cannot write checkpoint {path}: {box[1]}")
    tmp, err = Path(box[0]), None
    try:
        dcp.save(tensors, storage_writer=dcp.FileSystemWriter(tmp, single_file_per_rank=True, thread_count=1,
                                                              sync_files=True))
        dist.barrier()  # every rank's files are complete
        if rank == 0:
            doc = {"format": FORMAT, **meta, "plain": plain, "entries": _entries(tensors),
                   "files": {p.name: _sha256(p) for p in sorted(tmp.iterdir())}}
            (tmp / MANIFEST).write_text(json.dumps(doc, indent=1) + "\n")
    except BaseException as e:
        err = e
    if ctx is not None:  # rank 0: rename into place, or remove the temporary
        try:
            if err is None:
                ctx.__exit__(None, None, None)
            else:
                ctx.__exit__(type(err), err, err.__traceback__)
        except BaseException as e:
            if err is None:
                err = e
    status = [None if err is None else f"{type(err).__name__}: {err}".splitlines()[0]]
    dist.broadcast_object_list(status, src=0)  # rank 0's outcome for all; the folder is in place now
    if err is not None:
        raise err
    if status[0] is not None:
        raise CheckpointError(f"cannot write checkpoint {path}: rank 0 failed: {status[0]}")


def check(path: Path, config: TrainConfig) -> dict[str, Any]:
    """The verified manifest of the checkpoint at ``path`` (files' digests and the fingerprint checked)."""
    try:
        doc = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} has no readable {MANIFEST} ({type(e).__name__}); it is not a "
                              f"complete prunus sharded checkpoint: delete it or use another --checkpoint-dir") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("files"), dict):
        raise CheckpointError(f"{path} is not a prunus sharded training checkpoint")
    for name, want in doc["files"].items():
        f = path / name
        if not f.is_file() or _sha256(f) != want:
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} is missing or its SHA-256 does not match "
                                  f"the one written with it; delete it (or use another --checkpoint-dir) and train again")
    check_fingerprint(path, doc.get("fingerprint", {}), config)
    return doc


def load(path: Path, config: TrainConfig, model: nn.Module, opt: torch.optim.Optimizer,
         sp: Optional[Sparsifier]) -> dict[str, Any]:
    """Read a verified checkpoint into the sharded model, optimizer and sparsifier; returns the manifest."""
    import torch.distributed.checkpoint as dcp

    doc = check(path, config)
    if doc.get("done"):
        return doc
    plain = doc["plain"]
    if (sp is None) != (plain["sparsifier"] is None):
        raise CheckpointError(f"checkpoint {path} was written for another run (sparsifier state)")
    tensors = _template(doc["entries"], model)
    dcp.load(tensors, storage_reader=dcp.FileSystemReader(path))
    model.load_state_dict(tensors["model"])
    states = {int(i): {**tensors.get("optim", {}).get(i, {}), **p} for i, p in plain["optim"].items()}
    opt.load_state_dict({"state": states, "param_groups": plain["param_groups"]})
    if sp is not None:
        sd = dict(plain["sparsifier"])
        sd["masks"], sd["state"] = tensors["masks"], {**sd["state"], **tensors.get("sp_state", {})}
        sp.load_state_dict(sd)
    torch.set_rng_state(tensors["rng"])
    return doc
