"""Evaluation text: held-out documents by dataset name, as token streams cut into rows.

By default the datasets are the run's held-out documents (`data/holdout.py`): `narrative`
and `code`, the documents of its train source that prep kept out of every train and val
row (`dataset.eval_fraction`). `--data NAME=GLOB` (repeatable) names the user's own files
instead. Each dataset is one token stream — <|bos|> + document, documents in name order,
as prep builds it — and `rows(L, n)` cuts n windows of L + 1 tokens from it, evenly spaced
(never overlapping), so a row may span documents as training rows do.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

import numpy as np

from mcjax.data.corpus import read_documents
from mcjax.data.holdout import KINDS, split_documents
from mcjax.data.prep import meta_path, token_stream
from mcjax.errors import DataError
from mcjax.restore import LoadedRun


@dataclasses.dataclass(frozen=True)
class EvalData:
    name: str
    stream: np.ndarray  # int32 [N] token ids
    documents: int
    source: str  # where the documents came from, for the report

    def rows(self, length: int, count: int) -> np.ndarray:
        """Up to `count` non-overlapping windows of length + 1 tokens, evenly spaced over the
        stream. int32 [n, length + 1]; DataError when not even one fits."""
        n_tokens = len(self.stream)
        fit = (n_tokens - 1) // length
        if fit < 1:
            raise DataError(
                f"dataset '{self.name}' ({self.source}): {n_tokens:,} tokens, fewer than the {length + 1:,} one row of "
                f"{length:,} needs (lower eval.wmax / eval.boundary_length, or give more text with --data)"
            )
        n = min(count, fit)
        room = n_tokens - 1 - n * length  # tokens left over, spread between the windows
        starts = [i * length + (room * i) // max(n - 1, 1) for i in range(n)]
        return np.stack([self.stream[s : s + length + 1] for s in starts])


def filler_tokens(datasets: list[EvalData], bos: int) -> np.ndarray:
    """Filler text for synthetic prompts: the narrative dataset (else the first), <|bos|> left out."""
    ds = next((d for d in datasets if d.name == "narrative"), datasets[0])
    return ds.stream[ds.stream != bos]


def parse_data(specs: Sequence[str]) -> list[tuple[str, str]]:
    """`--data` values -> (name, glob): NAME=GLOB, or a bare GLOB named data1, data2, …"""
    out = []
    for i, spec in enumerate(specs, 1):
        name, sep, pattern = spec.partition("=")
        if not sep or "/" in name or "*" in name:
            name, pattern = f"data{i}", spec
        if not pattern:
            raise DataError(f"--data {spec}: expected NAME=GLOB")
        out.append((name, pattern))
    names = [n for n, _ in out]
    if len(set(names)) < len(names):
        raise DataError(f"--data: dataset names repeat ({', '.join(names)})")
    return out


def load_datasets(run: LoadedRun, specs: Sequence[str] = ()) -> list[EvalData]:
    """The datasets of the module doc, tokenized by the run's tokenizer."""
    tok = run.tokenizer
    if specs:
        out = []
        for name, pattern in parse_data(specs):
            docs = read_documents(pattern, key=f"--data {name}", where="the command line")
            out.append(EvalData(name, token_stream(tok, docs).astype(np.int32), len(docs), pattern))
        return out
    d = run.cfg.dataset
    source = d.splits["train"].source
    if d.eval_fraction <= 0:
        raise DataError(
            f"run '{run.run_dir.name}' held out no documents (dataset.eval_fraction is 0 in its config): "
            f"pass --data NAME=GLOB with text it did not train on"
        )
    docs = read_documents(source, key="dataset.splits.train.source", where=run.cfg.source_file, max_bytes=d.max_source_bytes)
    _, held = split_documents(docs, d.eval_fraction)
    _check_meta(run, {k: [n for n, _ in v] for k, v in held.items()})
    out = []
    for kind in KINDS:
        if held[kind]:
            where = f"{len(held[kind])} held-out documents of {source}"
            out.append(EvalData(kind, token_stream(tok, held[kind]).astype(np.int32), len(held[kind]), where))
    if not out:
        raise DataError(f"run '{run.run_dir.name}': its train source {source} has too few documents to hold any out; pass --data NAME=GLOB")
    return out


def _check_meta(run: LoadedRun, held: dict[str, list[str]]) -> None:
    """The held-out documents must be the ones prep kept out (its meta.json, when present)."""
    path = meta_path(run.cfg)
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return  # the prepared data is gone: the rule alone decides
    recorded = meta.get("held_out")
    if recorded != held:
        raise DataError(
            f"run '{run.run_dir.name}': the documents held out now differ from those {path} records "
            f"(the corpus, or the prepared data, changed since training); pass --data NAME=GLOB"
        )
