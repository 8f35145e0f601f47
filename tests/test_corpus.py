"""Tests for mcjax.data.corpus: built-in corpora, globs, byte limits and error messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from mcjax.data import corpus
from mcjax.data.corpus import read_documents
from mcjax.errors import DataError

KEY = "dataset.splits.train.source"
WHERE = "configs/x.yaml"


def read(source: str, max_bytes: int = 0):
    return read_documents(source, key=KEY, where=WHERE, max_bytes=max_bytes)


def test_builtin_shakespeare_is_49_sorted_texts():
    docs = read("builtin:shakespeare")
    names = [n for n, _ in docs]
    assert len(docs) == 49
    assert names == sorted(names) and len(set(names)) == 49
    assert all(text.strip() for _, text in docs)
    hamlet = dict(docs)["shakespeare/hamlet_gut.txt"]
    assert "To be, or not to be" in hamlet


def test_builtin_python_is_the_stdlib_without_tests():
    docs = read("builtin:python")
    names = [n for n, _ in docs]
    assert names == sorted(names)
    assert "python/os.py" in names and "python/json/__init__.py" in names
    for n in names:
        parts = set(n.split("/"))
        assert not parts & corpus._STDLIB_EXCLUDE, n
        assert n.endswith(".py")
    assert len(docs) > 300 and all(text for _, text in docs)


def test_builtin_is_shakespeare_then_python():
    docs = read("builtin")
    names = [n for n, _ in docs]
    assert names[:49] == [n for n, _ in read("builtin:shakespeare")]
    assert all(n.startswith("python/") for n in names[49:]) and len(names) > 49


def test_max_bytes_keeps_whole_leading_documents():
    full = read("builtin:shakespeare")
    some = read("builtin:shakespeare", max_bytes=300_000)
    assert some == full[: len(some)] and 1 < len(some) < len(full)
    sizes = [len(t.encode()) for _, t in some]
    assert sum(sizes) >= 300_000 > sum(sizes[:-1])
    assert read("builtin:shakespeare", max_bytes=1) == full[:1]  # at least one document


def test_glob_recursive_sorted_and_filtered(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes" / "deep").mkdir(parents=True)
    (tmp_path / "notes" / "b.txt").write_text("bee")
    (tmp_path / "notes" / "deep" / "a.py").write_text("print('a')")
    (tmp_path / "notes" / "deep" / "c.txt").write_text("")  # empty: skipped
    (tmp_path / "notes" / "skip.md").write_text("not text or python")
    docs = read("notes/**/*")
    assert docs == [("notes/b.txt", "bee"), ("notes/deep/a.py", "print('a')")]


def test_glob_expands_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "n").mkdir()
    (tmp_path / "n" / "x.txt").write_bytes(b"caf\xc3\xa9 \xff")  # invalid byte → replacement
    ((name, text),) = read("~/n/**/*.txt")
    assert name == str(tmp_path / "n" / "x.txt") and text == "café \ufffd"


def test_glob_without_match_names_key_source_and_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as e:
        read("nothing/**/*.txt")
    msg = str(e.value)
    assert KEY in msg and "nothing/**/*.txt" in msg and WHERE in msg and "\n" not in msg


def test_all_empty_files_is_an_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.txt").write_text("")
    with pytest.raises(DataError, match=r"configs/x\.yaml: dataset\.splits\.train\.source: .*\*\.txt.*empty"):
        read("*.txt")


def test_unreadable_file_names_the_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ok.txt").write_text("fine")
    (tmp_path / "bad.txt").write_text("locked")
    real = Path.read_bytes

    def read_bytes(self):
        if self.name == "bad.txt":
            raise PermissionError(13, "Permission denied")
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    with pytest.raises(DataError, match=r"dataset\.splits\.train\.source: cannot read bad\.txt"):
        read("*.txt")


def test_unknown_builtin_lists_known_ones():
    with pytest.raises(DataError) as e:
        read("builtin:klingon")
    msg = str(e.value)
    assert "builtin:klingon" in msg and "builtin:shakespeare" in msg and "builtin:python" in msg
    assert KEY in msg and WHERE in msg
