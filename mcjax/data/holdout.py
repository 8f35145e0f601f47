"""Documents kept out of training for `mcjax eval`: a deterministic, whole-document hold-out.

`dataset.eval_fraction` > 0 sets aside that share of the train source's documents before
`mcjax prep` cuts rows, so neither train nor val rows contain a word of them. Documents
are grouped by kind — `code` (names ending in `.py`) and `narrative` (everything else: the
built-in plays and poems, a user's `.txt` files) — and in each kind the held-out ones are
the first round(fraction · n) by the SHA-256 of their name (at least one, never all of a
kind). The choice depends on the names alone: not on the seed, the tokenizer or the other
documents, so every run on a corpus holds out the same files and their evaluations compare.
prep records the names in meta.json (`held_out`); `mcjax eval` reads the documents back.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from mcjax.data.corpus import Document

KINDS = ("narrative", "code")


def kind(name: str) -> str:
    """A document's kind by its name: `code` for `.py` files, else `narrative`."""
    return "code" if name.endswith(".py") else "narrative"


def _rank(name: str) -> str:
    return hashlib.sha256(name.encode("utf-8")).hexdigest()


def held_out_names(names: Sequence[str], fraction: float) -> dict[str, list[str]]:
    """The held-out documents of each kind (see the module doc), each list in name order."""
    out: dict[str, list[str]] = {k: [] for k in KINDS}
    if fraction <= 0:
        return out
    for k in KINDS:
        group = [n for n in names if kind(n) == k]
        if len(group) < 2:
            continue  # a lone document of its kind stays in training
        count = min(len(group) - 1, max(1, round(fraction * len(group))))
        out[k] = sorted(sorted(group, key=_rank)[:count])
    return out


def split_documents(docs: Sequence[Document], fraction: float) -> tuple[list[Document], dict[str, list[Document]]]:
    """(the documents training keeps, the held-out documents of each kind)."""
    held = held_out_names([name for name, _ in docs], fraction)
    sets = {k: set(names) for k, names in held.items()}
    out = set().union(*sets.values())
    return [d for d in docs if d[0] not in out], {k: [d for d in docs if d[0] in sets[k]] for k in KINDS}
