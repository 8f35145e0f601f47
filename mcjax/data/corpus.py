"""Reading raw text sources into (name, text) documents.

A source is either a glob of `.txt`/`.py` files (relative to the working directory, `~`
expanded, `**` recursive) or a built-in corpus:

  builtin:shakespeare  the 49 Project Gutenberg texts in `corpus/shakespeare_milton.tar.xz`
  builtin:python       the running interpreter's standard-library `.py` files (no tests)
  builtin              shakespeare, then python

Documents come back in a deterministic order (sorted names). Problems a user can cause raise
`DataError` with one line naming the config key, the source and the config file.
"""

from __future__ import annotations

import glob
import importlib.resources
import os
import sysconfig
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

from mcjax.errors import DataError

SUFFIXES = (".txt", ".py")
_STDLIB_EXCLUDE = frozenset(
    {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__", "lib2to3",
     "turtledemo"}
)
_TARBALL = "shakespeare_milton.tar.xz"

Document = tuple[str, str]


def read_documents(source: str, *, key: str, where: str, max_bytes: int = 0) -> list[Document]:
    """Read `source` as a list of (name, text) in sorted-name order.

    `max_bytes > 0` keeps whole documents from the start until their UTF-8 size reaches
    `max_bytes` (always at least one document).
    """
    if source == "builtin" or source.startswith("builtin:"):
        docs = _builtin(source, key, where)
    else:
        docs = _glob_documents(source, key, where)
    return _take(docs, max_bytes, source, key, where)


def _take(
    docs: Iterator[Document], max_bytes: int, source: str, key: str, where: str
) -> list[Document]:
    out: list[Document] = []
    total = 0
    for name, text in docs:
        if not text:
            continue
        out.append((name, text))
        total += len(text.encode("utf-8"))
        if 0 < max_bytes <= total:
            break
    if not out:
        raise DataError(f"{where}: {key}: source '{source}' has only empty documents")
    return out


# ----------------------------------------------------------------------------- built-ins


def _builtin(source: str, key: str, where: str) -> Iterator[Document]:
    readers: dict[str, Callable[[], Iterator[Document]]] = {
        "builtin:shakespeare": _shakespeare,
        "builtin:python": _python_stdlib,
    }
    if source == "builtin":
        return (doc for name in readers for doc in readers[name]())
    if source not in readers:
        known = ", ".join(["builtin", *readers])
        raise DataError(f"{where}: {key}: unknown built-in corpus '{source}' (known: {known})")
    return readers[source]()


def _shakespeare() -> Iterator[Document]:
    ref = importlib.resources.files("mcjax.data").joinpath("corpus", _TARBALL)
    with importlib.resources.as_file(ref) as path, tarfile.open(path, "r:xz") as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile()), key=lambda m: m.name)
        for m in members:
            f = tar.extractfile(m)
            assert f is not None  # regular file
            yield f"shakespeare/{m.name}", f.read().decode("utf-8", errors="replace")


def _python_stdlib() -> Iterator[Document]:
    root = Path(sysconfig.get_paths()["stdlib"])
    rels = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_EXCLUDE]
        rel_dir = Path(dirpath).relative_to(root)
        rels.extend((rel_dir / f).as_posix() for f in filenames if f.endswith(".py"))
    for rel in sorted(rels):
        try:
            text = (root / rel).read_bytes().decode("utf-8", errors="replace")
        except OSError:
            continue  # an unreadable stdlib file is not the user's problem
        yield f"python/{rel}", text


# ----------------------------------------------------------------------------- globs


def _glob_documents(source: str, key: str, where: str) -> Iterator[Document]:
    pattern = os.path.expanduser(source)
    paths = sorted(
        p for p in glob.glob(pattern, recursive=True)
        if p.endswith(SUFFIXES) and os.path.isfile(p)
    )
    if not paths:
        raise DataError(
            f"{where}: {key}: glob '{source}' matches no .txt or .py files "
            f"(relative to {os.getcwd()})"
        )
    return _read_files(paths, key, where)


def _read_files(paths: list[str], key: str, where: str) -> Iterator[Document]:
    for p in paths:
        try:
            data = Path(p).read_bytes()
        except OSError as e:
            raise DataError(f"{where}: {key}: cannot read {p}: {e.strerror or e}") from None
        yield p, data.decode("utf-8", errors="replace")
