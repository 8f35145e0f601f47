"""`mcjax prep`: turn the configured text sources into Arrow files of fixed-length token rows.

For each split: read its documents, encode each with `<|bos|>` prepended and cut token
streams into rows of T+1 tokens (T = dataset.context_tokens):

    row i = stream[i*T : i*T + T + 1]      consecutive rows overlap by exactly one token

so every one of a row's T input positions has a next-token target, and the T inputs are T/K
blocks of K = dataset.block_size tokens. With dataset.packing "stream" the stream is all
documents concatenated. With "documents", each document of at least T+1 tokens (its <|bos|>
included) is cut on its own, so each of its rows is one continuous slice of it starting at
its <|bos|>; its tokens after its last row (stream[n*T+1:]) and the shorter documents are
concatenated, in document order, into one stream cut as above; the rows are the documents'
rows (in document order), then the stream's. When train and val share a source, val is a
seeded random selection of max(1, round(val_fraction * n)) of the n rows and train is the
rest (both in ascending row order). With `dataset.eval_fraction` > 0, whole documents of
the train source are set aside first (`holdout.py`), for `mcjax eval`: no row holds any of
them, and meta.json lists them (`held_out`, by kind).

With dataset.tasks (task → share w, S = the sum), each split's n natural rows get
round(n * w / (1 - S)) rows of each task (`tasks.py`; with S = 1, round(n * w) and the natural
rows are dropped), so the task's share of the split is w. Their filler is the split's own
natural text; task_rows' stream is tasks.split_stream(split name). The natural and task rows
are then shuffled by a generator seeded by (training.seed, stream).

Each split is written as an Arrow IPC file with the column `tokens: fixed_size_list<uint16|int32,
T+1>`, and with dataset.tasks three more: `task: int8` (0 = natural text, 1 + TASKS.index),
`answer_tokens: int16` (the answer is the row's last answer_tokens tokens; 0 for natural text)
and `needle: int32` (the first token of the fact the question asks about; −1 for natural text).
`tokenizer.json` and `meta.json` go beside the train file. Everything is built in memory and
in a temporary directory first, then moved into place (meta.json last), so a failure leaves
no half-written output. Same inputs give byte-identical files.

A pretrained base reads the ids of its own vocabulary: a dataset.tokenizer other than the
base's own must give every token the id the base's tokenizer gives it (`check_base_vocab`,
checked before anything is written and again when training starts).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from mcjax.config import Config, base_model_dir
from mcjax.data.corpus import Document, read_documents
from mcjax.data.holdout import split_documents
from mcjax.data.tasks import TASKS, split_stream, task_rows
from mcjax.data.tokenizer import Tokenizer, base_tokenizer_file, train_bpe
from mcjax.errors import ConfigError, DataError

BATCH_ROWS = 4096  # rows per Arrow record batch
META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.json"

Log = Callable[[str], None]


# ----------------------------------------------------------------------------- paths


def meta_path(cfg: Config) -> Path:
    return Path(cfg.dataset.splits["train"].output_path).parent / META_FILE


def tokenizer_path(cfg: Config) -> Path:
    """Where prep writes (and training reads) the tokenizer: beside the train Arrow file."""
    return Path(cfg.dataset.splits["train"].output_path).parent / TOKENIZER_FILE


def config_fingerprint(cfg: Config) -> str:
    """sha256 of the dataset section and training.seed: what the prepared files depend on.
    dataset.packing and dataset.tasks count only when set, so data prepared before they existed
    stays valid; dataset.task_refresh (the train pipeline's) never does."""
    dataset = dataclasses.asdict(cfg.dataset)
    del dataset["task_refresh"]
    for key, default in (("packing", "stream"), ("tasks", {})):
        if dataset[key] == default:
            del dataset[key]
    payload = {"dataset": dataset, "seed": cfg.training.seed}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def is_prepared(cfg: Config) -> bool:
    """True iff meta.json exists, matches this config's fingerprint and every output exists."""
    try:
        meta = json.loads(meta_path(cfg).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(meta, dict) or meta.get("config_fingerprint") != config_fingerprint(cfg):
        return False
    outputs = [Path(s.output_path) for s in cfg.dataset.splits.values()] + [tokenizer_path(cfg)]
    return all(p.is_file() for p in outputs)


# ----------------------------------------------------------------------------- prepare


def prepare(cfg: Config, *, force: bool = False, log: Log = print) -> dict[str, Any]:
    """Build every split's Arrow file plus tokenizer.json and meta.json; returns the meta dict.

    Skips the work (and returns the existing meta) when `is_prepared(cfg)` unless `force`.
    """
    if not force and is_prepared(cfg):
        log(f"prep: {meta_path(cfg).parent} is up to date (use --force to rebuild)")
        return {**json.loads(meta_path(cfg).read_text()), "skipped": True}

    d = cfg.dataset
    names = ["train"] + sorted(n for n in d.splits if n != "train")
    docs: dict[str, list[Document]] = {}
    seconds: dict[str, float] = {}
    for name in names:
        t0 = time.perf_counter()
        source = d.splits[name].source
        if source not in docs:
            docs[source] = read_documents(
                source,
                key=f"dataset.splits.{name}.source",
                where=cfg.source_file,
                max_bytes=d.max_source_bytes,
            )
        seconds[name] = time.perf_counter() - t0
    train_source = d.splits["train"].source
    docs[train_source], held = split_documents(docs[train_source], d.eval_fraction)

    t0 = time.perf_counter()
    tok = _tokenizer(cfg, docs[train_source])
    log(f"prep: tokenizer {d.tokenizer!r}: vocab {tok.vocab_size} ({time.perf_counter() - t0:.1f}s)")

    rows: dict[str, np.ndarray] = {}
    natural: dict[str, tuple[np.ndarray, int]] = {}  # source → (rows, tokens)
    for name in names:
        t0 = time.perf_counter()
        source = d.splits[name].source
        if source not in natural:
            natural[source] = _natural_rows(cfg, tok, docs[source])
        rows[name] = _rows_or_fail(cfg, name, *natural[source])
        seconds[name] += time.perf_counter() - t0
    if "val" in d.splits and d.splits["val"].source == d.splits["train"].source:
        rows["train"], rows["val"] = _hold_out(cfg, rows["train"])
    mixed: dict[str, Mixed] = {}
    if d.tasks:
        for name in names:
            t0 = time.perf_counter()
            mixed[name] = _mix_tasks(cfg, tok, name, rows[name])
            rows[name] = mixed[name].rows
            seconds[name] += time.perf_counter() - t0

    meta = _write_all(cfg, tok, rows, mixed, docs, {k: [name for name, _ in v] for k, v in held.items()})
    for name in names:
        s = meta["splits"][name]
        tasks = "".join(f", {n} {k}" for n, k in s.get("task_rows", {}).items())
        mix = f"; {s['natural_rows']} natural rows{tasks}" if d.tasks else ""
        log(
            f"prep: {name}: {s['rows']} rows × {d.context_tokens + 1} tokens "
            f"({s['tokens']} tokens, {s['documents']} documents{mix}) in {seconds[name]:.1f}s "
            f"→ {s['path']}"
        )
    return {**meta, "skipped": False}


def _tokenizer(cfg: Config, train_docs: list[Document]) -> Tokenizer:
    d = cfg.dataset
    if d.tokenizer == "bpe":
        return train_bpe((text for _, text in train_docs), d.vocab_size)
    tok = Tokenizer.load(os.path.expanduser(d.tokenizer))
    if tok.vocab_size > d.vocab_size:
        raise ConfigError(
            f"{cfg.source_file}: dataset.vocab_size: {d.vocab_size} is smaller than the "
            f"{tok.vocab_size} tokens of {d.tokenizer}"
        )
    check_base_vocab(cfg, tok)
    return tok


def check_base_vocab(cfg: Config, tok: Tokenizer) -> None:
    """ConfigError (one line) when a pretrained base would read `tok`'s ids as other tokens: some
    token of `tok` (dataset.tokenizer, or the prepared data's copy of it) has another id in the
    base's own tokenizer, or none. Nothing to check for the GPT, or when dataset.tokenizer is the
    base's own (the prepared data's fingerprint then follows the base)."""
    if not cfg.pretrained:
        return
    own = base_tokenizer_file(base_model_dir(cfg))
    named = Path(os.path.expanduser(cfg.dataset.tokenizer))
    if not own.is_file() or named.absolute() == own.absolute():
        return
    base = Tokenizer.load(own).hf.get_vocab(with_added_tokens=True)
    for token, i in sorted(tok.hf.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1]):
        if base.get(token) != i:
            there = f"id {base[token]}" if token in base else "not in it"
            raise ConfigError(
                f"{cfg.source_file}: dataset.tokenizer: {cfg.dataset.tokenizer} does not match the vocabulary of the "
                f"base ({own}): its token {i} {token!r} is {there} (leave dataset.tokenizer unset to use the base's)"
            )


def document_streams(tok: Tokenizer, docs: list[Document]) -> list[np.ndarray]:
    """Each document as its own stream `[N_d]` int64: bos, its tokens."""
    bos = [tok.bos_id]
    return [np.asarray(bos + seq, np.int64) for seq in tok.encode_batch([text for _, text in docs])]


def token_stream(tok: Tokenizer, docs: list[Document]) -> np.ndarray:
    """All documents as one stream `[N]` int64: bos, doc 0 tokens, bos, doc 1 tokens, ..."""
    return np.concatenate(document_streams(tok, docs))


def pack_documents(streams: list[np.ndarray], context_tokens: int) -> np.ndarray:
    """Packing "documents" (module doc): each stream of ≥ T+1 tokens cut on its own, then the
    rest (its tokens after its last row, and the shorter streams) as one stream → `[n, T+1]`."""
    t = context_tokens
    own = [cut_rows(s, t) for s in streams]
    rest = [s[len(r) * t + 1 :] if len(r) else s for s, r in zip(streams, own)]
    return np.concatenate([*own, cut_rows(np.concatenate([np.zeros(0, np.int64), *rest]), t)])


def cut_rows(stream: np.ndarray, context_tokens: int) -> np.ndarray:
    """`[N]` stream → `[n, T+1]` rows, row i = stream[i*T : i*T+T+1]; n = (N-1) // T."""
    t = context_tokens
    n = max(0, (len(stream) - 1) // t)
    if n == 0:
        return np.zeros((0, t + 1), dtype=stream.dtype)
    windows = np.lib.stride_tricks.sliding_window_view(stream, t + 1)
    return np.ascontiguousarray(windows[: n * t : t])


def _natural_rows(cfg: Config, tok: Tokenizer, docs: list[Document]) -> tuple[np.ndarray, int]:
    """(rows `[n, T+1]` of the documents, packed as dataset.packing says; their token count)."""
    t = cfg.dataset.context_tokens
    streams = document_streams(tok, docs)
    tokens = sum(map(len, streams))
    if cfg.dataset.packing == "documents":
        return pack_documents(streams, t), tokens
    return cut_rows(np.concatenate(streams), t), tokens


def _rows_or_fail(cfg: Config, name: str, rows: np.ndarray, tokens: int) -> np.ndarray:
    t = cfg.dataset.context_tokens
    if len(rows) == 0:
        raise DataError(
            f"{cfg.source_file}: dataset.splits.{name}: source "
            f"'{cfg.dataset.splits[name].source}' gives {tokens} tokens, fewer than the "
            f"context_tokens + 1 = {t + 1} one row needs"
        )
    return rows


def _hold_out(cfg: Config, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Shared source: seeded split of `[n, T+1]` rows into (train, val), each ascending."""
    n = len(rows)
    n_val = max(1, round(cfg.dataset.val_fraction * n))
    if n - n_val < 1:
        raise DataError(
            f"{cfg.source_file}: dataset.splits.train: source "
            f"'{cfg.dataset.splits['train'].source}' gives only {n} row(s) of "
            f"{cfg.dataset.context_tokens + 1} tokens; need ≥ 2 to hold out val"
        )
    perm = np.random.default_rng(cfg.training.seed).permutation(n)
    val_idx, train_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    return rows[train_idx], rows[val_idx]


@dataclasses.dataclass(frozen=True)
class Mixed:
    """A split's rows with task rows mixed in (module doc)."""

    rows: np.ndarray  # [n, T+1]
    task: np.ndarray  # int8 [n]: 0 = natural text, 1 + TASKS.index
    answer_tokens: np.ndarray  # int16 [n]: the answer is the row's last answer_tokens tokens
    needle: np.ndarray  # int32 [n]: the first token of the fact a task row's question asks about; −1 natural
    natural_rows: int
    task_rows: dict[str, int]


def _mix_tasks(cfg: Config, tok: Tokenizer, name: str, natural: np.ndarray) -> Mixed:
    """Split `name`'s natural rows `[n, T+1]` with dataset.tasks' rows mixed in (module doc)."""
    d, seed, stream = cfg.dataset, cfg.training.seed, split_stream(name)
    filler = natural[:, :-1].reshape(-1)
    filler = filler[filler != tok.bos_id]
    if len(filler) == 0:
        raise DataError(f"{cfg.source_file}: dataset.tasks: split {name} has no natural text for the task rows' filler")
    total = sum(d.tasks.values())
    whole = total > 1 - 1e-9  # only task rows
    n = len(natural)
    counts = {t: round(n * d.tasks[t] / (1 if whole else 1 - total)) for t in TASKS if t in d.tasks}
    keep = natural[:0] if whole else natural
    parts, tasks, answers = [keep], [np.zeros(len(keep), np.int8)], [np.zeros(len(keep), np.int16)]
    needles = [np.full(len(keep), -1, np.int32)]
    for t, k in counts.items():
        try:
            r, a, at = task_rows(tok, filler, t, k, d.context_tokens + 1, seed=seed, stream=stream)
        except ValueError as e:
            raise ConfigError(f"{cfg.source_file}: dataset.tasks.{t}: {e}: dataset.context_tokens is too small") from None
        parts.append(r)
        tasks.append(np.full(k, 1 + TASKS.index(t), np.int8))
        answers.append(a)
        needles.append(at)
    size = sum(map(len, parts))
    if size == 0:
        raise DataError(f"{cfg.source_file}: dataset.tasks: split {name} gets no rows ({n} natural rows, all dropped)")
    perm = np.random.default_rng((seed, stream)).permutation(size)
    return Mixed(np.concatenate(parts)[perm], np.concatenate(tasks)[perm], np.concatenate(answers)[perm],
                 np.concatenate(needles)[perm], len(keep), counts)


# ----------------------------------------------------------------------------- writing


def write_arrow(path: Path, rows: np.ndarray, *, cfg: Config, tok: Tokenizer, mixed: Mixed | None = None) -> None:
    """Write `[n, T+1]` rows as an Arrow IPC file, column `tokens` (with `mixed`, also `task`,
    `answer_tokens` and `needle` from it), ≤ BATCH_ROWS per batch."""
    d = cfg.dataset
    width = d.context_tokens + 1
    dtype = np.uint16 if tok.vocab_size <= 65536 else np.int32
    value_type = pa.uint16() if dtype == np.uint16 else pa.int32()
    metadata = {
        "block_size": str(d.block_size),
        "context_tokens": str(d.context_tokens),
        "vocab_size": str(tok.vocab_size),
        "bos_id": str(tok.bos_id),
    }
    fields = [pa.field("tokens", pa.list_(value_type, width))]
    if mixed is not None:
        fields += [pa.field("task", pa.int8()), pa.field("answer_tokens", pa.int16()), pa.field("needle", pa.int32())]
    schema = pa.schema(fields, metadata=metadata)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for start in range(0, len(rows), BATCH_ROWS):
            end = start + BATCH_ROWS
            chunk = rows[start:end].astype(dtype).reshape(-1)
            cols = [pa.FixedSizeListArray.from_arrays(pa.array(chunk, type=value_type), width)]
            if mixed is not None:
                cols += [pa.array(mixed.task[start:end]), pa.array(mixed.answer_tokens[start:end]),
                         pa.array(mixed.needle[start:end])]
            writer.write_batch(pa.record_batch(cols, schema=schema))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_all(
    cfg: Config, tok: Tokenizer, rows: dict[str, np.ndarray], mixed: dict[str, Mixed],
    docs: dict[str, list[Document]], held_out: dict[str, list[str]],
) -> dict[str, Any]:
    """Write every file into temp dirs beside the outputs, then move them into place."""
    d = cfg.dataset
    t = d.context_tokens
    targets = {name: Path(s.output_path) for name, s in d.splits.items()}
    targets[TOKENIZER_FILE] = tokenizer_path(cfg)
    targets[META_FILE] = meta_path(cfg)
    temps: dict[Path, Path] = {}  # output directory → its temp directory
    try:
        for p in targets.values():
            if p.parent not in temps:
                p.parent.mkdir(parents=True, exist_ok=True)
                temps[p.parent] = Path(tempfile.mkdtemp(prefix=".prep-", dir=p.parent))
        staged = {k: temps[p.parent] / p.name for k, p in targets.items()}

        splits: dict[str, Any] = {}
        for name, r in rows.items():
            write_arrow(staged[name], r, cfg=cfg, tok=tok, mixed=mixed.get(name))
            source = d.splits[name].source
            splits[name] = {
                "source": source,
                "path": d.splits[name].output_path,
                "documents": len(docs[source]),
                "rows": int(len(r)),
                "tokens": int(len(r) * t),
                "sha256": _sha256(staged[name]),
            }
            if name in mixed:
                splits[name].update(natural_rows=mixed[name].natural_rows, task_rows=mixed[name].task_rows)
        tok.save(staged[TOKENIZER_FILE])
        meta = {
            "dataset_name": d.dataset_name,
            "tokenizer": d.tokenizer,
            "vocab_size": tok.vocab_size,
            "bos_id": tok.bos_id,
            "context_tokens": t,
            "block_size": d.block_size,
            "splits": splits,
            "held_out": held_out,
            "tokenizer_sha256": _sha256(staged[TOKENIZER_FILE]),
            "config_fingerprint": config_fingerprint(cfg),
        }
        staged[META_FILE].write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")

        targets[META_FILE].unlink(missing_ok=True)  # stale meta must not vouch for new files
        for key, p in targets.items():
            if key != META_FILE:
                os.replace(staged[key], p)
        os.replace(staged[META_FILE], targets[META_FILE])
        return meta
    finally:
        for tmp in temps.values():
            shutil.rmtree(tmp, ignore_errors=True)
