"""Atomic writes: a result folder or file appears complete, or not at all.

Hours of pruning should never end in a half-written checkpoint that looks like a good one. Every
writer builds its output in a hidden temporary sibling (same parent, so the final ``rename`` stays on
one file system and is atomic) and renames it into place only once it is complete. On any exception
the temporary is removed and nothing is left behind.

Callers that will write after a long job call :func:`check_out_dir` first, so a forgotten
``--overwrite`` fails in a second rather than after the job.

Example:
    >>> import json, tempfile, pathlib
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> with atomic_dir(root / "ckpt") as tmp:
    ...     _ = (tmp / "prunus.json").write_text("{}")
    >>> sorted(p.name for p in root.iterdir())
    ['ckpt']
    >>> with atomic_file(root / "results.json") as tmp:
    ...     _ = tmp.write_text(json.dumps({"ppl": 20.8}))
    >>> json.loads((root / "results.json").read_text())
    {'ppl': 20.8}
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterator, NoReturn

from prunus.errors import PrunusError


class OutputExistsError(PrunusError, FileExistsError):
    """The output path exists and ``overwrite`` was not given."""


class WriteError(PrunusError, OSError):
    """Writing an output failed (disk full, permission lost, I/O error); nothing was left behind."""


def _write_error(e: BaseException, path: Path) -> BaseException:
    """An OSError from a writer as a one-line :class:`WriteError` naming ``path``; others unchanged."""
    if isinstance(e, OSError) and not isinstance(e, PrunusError):
        why = e.strerror or (str(e).strip().splitlines() or [type(e).__name__])[0]
        err = WriteError(f"cannot write {path}: {why}; nothing was written (free some space or choose "
                         f"another output path)")
        err.errno = e.errno
        return err
    return e


def _exists_message(path: Path) -> str:
    return f"{path} already exists; pass --overwrite to replace it"


def _hidden_sibling(path: Path, tag: str, suffix: str = "") -> Path:
    """A fresh hidden name beside ``path``: ``.<name>.<tag>-<pid>-<random><suffix>``.

    The writer's process id in the name lets a later write to the same destination tell the
    leftovers of a killed process (``kill -9`` mid-save) from the work of a live one.
    """
    return path.parent / f".{path.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:12]}{suffix}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's live process
    return True


def remove_stale(path: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary siblings of ``path`` left by dead processes; return what was removed.

    Only names this module makes (``.<name>.tmp-<pid>-<hex>`` and ``.<name>.old-<pid>-<hex>``) whose
    process no longer exists are touched; a live writer's temporary is left alone.
    """
    p = Path(path).expanduser().absolute()
    removed: list[Path] = []
    if not p.parent.is_dir():
        return removed
    prefix = f".{p.name}."
    for q in p.parent.iterdir():
        if not q.name.startswith(prefix):
            continue
        tag, _, rest = q.name[len(prefix):].partition("-")
        pid = rest.split("-", 1)[0]
        if tag in ("tmp", "old") and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            _remove(q)
            removed.append(q)
    return removed


def _fsync_dir(path: Path) -> None:
    """Flush a directory entry (so a rename survives a crash); a no-op where unsupported."""
    _fsync_path(path)


def _fsync_path(path: str | os.PathLike[str]) -> None:
    """fsync one file or directory; silently skipped where the OS refuses."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush every file under ``root`` to disk before it is renamed into place."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            _fsync_path(os.path.join(dirpath, name))
        _fsync_dir(Path(dirpath))


def _remove(path: Path) -> None:
    """Remove a file or folder if it is there; never raises."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass


def check_out_dir(path: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """Fail early if ``path`` cannot be written: call it before a long job, not after.

    Args:
        path: the output folder (or file) a later :func:`atomic_dir`/:func:`atomic_file` will write.
        overwrite: whether an existing ``path`` may be replaced.

    Returns:
        ``path`` as an absolute :class:`~pathlib.Path`.

    Raises:
        OutputExistsError: ``path`` exists and ``overwrite`` is False.
        PrunusError: the nearest existing parent is not a writable folder.

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> check_out_dir(d / "new").name
        'new'
        >>> try:
        ...     check_out_dir(d)
        ... except OutputExistsError as e:
        ...     print(str(e).endswith("already exists; pass --overwrite to replace it"))
        True
    """
    p = Path(path).expanduser().absolute()
    if (p.exists() or p.is_symlink()) and not overwrite:
        raise OutputExistsError(_exists_message(p))
    parent = p.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise PrunusError(f"cannot create {p}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PrunusError(f"cannot write to {parent}: permission denied; choose another output path")
    probe = _hidden_sibling(parent / "probe", "tmp")  # root passes os.access; a real write tells
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise PrunusError(f"cannot write to {parent}: {e.strerror or e}; choose another output path") from None
    return p


def check_out_file(path: str | os.PathLike[str]) -> Path:
    """Fail early if the result file ``path`` (``--json``, ``--plot``) cannot be written later.

    An existing file may be replaced (result files are rewritten); a folder, an empty path or an
    unwritable parent is an error now, before any work.
    """
    if not str(path).strip():
        raise PrunusError("an output file path is empty")
    p = check_out_dir(path, overwrite=True)
    if p.is_dir():
        raise PrunusError(f"{p} is a folder; give a file name")
    return p


def _make_parents(parent: Path) -> list[Path]:
    """Create missing parents of an output; return the ones created, deepest first."""
    created: list[Path] = []
    p = parent
    while not p.exists():
        created.append(p)
        p = p.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _remove_empty(created)
        raise _write_error(e, parent) from None
    return created


def _remove_empty(dirs: list[Path]) -> None:
    for d in dirs:  # deepest first
        try:
            d.rmdir()
        except OSError:
            break


def _commit(tmp: Path, path: Path, overwrite: bool) -> None:
    """Move the finished ``tmp`` to ``path``; an old ``path`` is replaced only after this succeeds."""
    if not (path.exists() or path.is_symlink()):
        # A plain rename would silently replace an *empty* folder that appeared meanwhile; that
        # folder was not there at the check, so treat it like any other existing output.
        os.rename(tmp, path)
        return
    if not overwrite:
        raise OutputExistsError(_exists_message(path))
    old = _hidden_sibling(path, "old")
    os.rename(path, old)  # the old output stays whole until the new one is in place
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old, path)  # put the old one back: never leave neither
        raise
    _remove(old)


def _abort(e: BaseException, tmp: Path, created: list[Path], path: Path) -> NoReturn:
    """Leave nothing behind after a failed write, then raise (an OSError as a one-line WriteError)."""
    _remove(tmp)
    _remove_empty(created)
    err = _write_error(e, path)
    if err is e:
        raise e
    raise err from None


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Write a folder atomically: yield a hidden temporary sibling, rename it to ``path`` on success.

    Args:
        path: the final folder.
        overwrite: replace an existing ``path``. The old folder is moved aside only once the new one
            is complete, and deleted after the new one is in place.

    Yields:
        The empty temporary folder to write into (same parent as ``path``, hidden name).

    Raises:
        OutputExistsError: ``path`` exists and ``overwrite`` is False (raised before any work).

    On any exception inside the block the temporary folder is removed, any parent folders this
    call created are removed again, and ``path`` is left as it was.

    Example:
        >>> import tempfile, pathlib
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "ckpt"
        >>> with atomic_dir(out) as tmp:
        ...     _ = (tmp / "a.txt").write_text("hi")
        >>> (out / "a.txt").read_text()
        'hi'
    """
    p = check_out_dir(path, overwrite)
    created = _make_parents(p.parent)
    remove_stale(p)
    tmp = _hidden_sibling(p, "tmp")
    try:
        tmp.mkdir()
        yield tmp
        _fsync_tree(tmp)
        _commit(tmp, p, overwrite)
        _fsync_dir(p.parent)
    except BaseException as e:
        _abort(e, tmp, created, p)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], overwrite: bool = True) -> Iterator[Path]:
    """Write one file atomically: yield a temporary path in the same folder, ``os.replace`` it in.

    The temporary name ends with the same suffix as ``path`` so writers that pick a format from
    the extension (``matplotlib.savefig``) still work.

    Args:
        path: the final file.
        overwrite: replace an existing file (the default: result files are usually rewritten).

    Yields:
        A path that does not exist yet; write the whole file there.

    Raises:
        OutputExistsError: ``path`` exists and ``overwrite`` is False.

    Example:
        >>> import tempfile, pathlib
        >>> f = pathlib.Path(tempfile.mkdtemp()) / "plot.txt"
        >>> with atomic_file(f) as tmp:
        ...     _ = tmp.write_text("data")
        >>> f.read_text()
        'data'
    """
    p = check_out_dir(path, overwrite)
    if p.is_dir():
        raise PrunusError(f"{p} is a folder; give a file name")
    if os.path.exists(p) and not os.path.isfile(p):
        # a device, pipe or terminal (--json /dev/stdout): renaming onto it would replace the node
        # itself, so the finished bytes are written into it instead
        with tempfile.TemporaryDirectory(prefix="prunus-out-") as d:
            tmp = Path(d) / f"out{p.suffix}"
            yield tmp
            if not tmp.exists():
                raise PrunusError(f"nothing was written to the temporary file for {p}")
            with open(p, "wb") as fh:
                fh.write(tmp.read_bytes())
        return
    if p.is_symlink():  # replace the file the link points to, and keep the link
        p = Path(os.path.realpath(p))
    created = _make_parents(p.parent)
    remove_stale(p)
    tmp = _hidden_sibling(p, "tmp", p.suffix)
    try:
        yield tmp
        if not tmp.exists():
            raise PrunusError(f"nothing was written to the temporary file for {p}")
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        if not overwrite and p.exists():
            raise OutputExistsError(_exists_message(p))
        os.replace(tmp, p)
        _fsync_dir(p.parent)
    except BaseException as e:
        _abort(e, tmp, created, p)


def write_text(path: str | os.PathLike[str], text: str, overwrite: bool = True) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically and return the path.

    Example:
        >>> import tempfile, pathlib
        >>> write_text(pathlib.Path(tempfile.mkdtemp()) / "r.json", "{}").read_text()
        '{}'
    """
    with atomic_file(path, overwrite=overwrite) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path).expanduser().absolute()
