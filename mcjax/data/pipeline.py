"""Input pipeline: prepared Arrow rows → batches of token ids, on grain.

`ArrowSequences(path)` is a memory-mapped random-access source of `[T+1]` int32 rows.
`TrainIterator(...)` shuffles the rows with a new order every epoch, repeats forever, cuts the
stream into global batches and gives each process its slice `[B, T+1]`, prefetched in threads;
its `get_state()` is a small JSON-able position in that global stream, the same on every
process, and `set_state()` on a fresh iterator resumes exactly — with any process count.
`eval_batches(...)` yields the first rows in order, for validation.
`row_tasks(path)` reads the rows' task labels (prep's dataset.tasks): which rows are synthetic
task rows, and how many of their last tokens are the answer.
`TaskRefresh` (dataset.task_refresh) gives the train iterator's task rows new facts in every
epoch after the first, so a model cannot learn a row's answer by heart from its filler.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grain
import numpy as np
import pyarrow as pa

from mcjax.data.tasks import TASKS, task_rows
from mcjax.data.tokenizer import Tokenizer
from mcjax.errors import DataError


class ArrowSequences:
    """Random-access rows of a prepared Arrow file: `ds[i]` → `[T+1]` int32.

    Implements grain's RandomAccessDataSource protocol (`__len__`, `__getitem__`). The file is
    memory-mapped (opened once here to check it); a pickled copy carries only the path and
    row index and reopens the file on first use, so grain worker processes can use it.
    """

    def __init__(self, path: str | Path):
        self.path = str(path)
        self._reader: pa.ipc.RecordBatchFileReader | None = None
        self._open()  # fail now, with a clear message, rather than inside a worker
        assert self._reader is not None
        self.width = self._reader.schema.field("tokens").type.list_size  # T + 1
        sizes = [self._reader.get_batch(i).num_rows for i in range(self._reader.num_record_batches)]
        self._starts = np.cumsum([0, *sizes])
        self._num_rows = int(self._starts[-1])
        self._batches: list[np.ndarray | None] = [None] * len(sizes)

    def _open(self) -> None:
        fail = f"{self.path}: {{}}; run `mcjax prep` for this config"
        if not Path(self.path).is_file():
            raise DataError(fail.format("prepared data file not found"))
        try:
            reader = pa.ipc.open_file(pa.memory_map(self.path, "r"))
            field = reader.schema.field("tokens")
        except (pa.ArrowException, KeyError, OSError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(fail.format(f"not a valid prepared Arrow file ({msg})")) from None
        if not pa.types.is_fixed_size_list(field.type):
            raise DataError(fail.format(f"column 'tokens' has type {field.type}, not fixed_size_list"))
        self._reader = reader

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_reader"] = None
        state["_batches"] = [None] * len(self._batches)
        return state

    def __len__(self) -> int:
        return self._num_rows

    def _batch(self, b: int) -> np.ndarray:
        """Record batch b as a zero-copy `[rows, T+1]` view of the mapped file."""
        arr = self._batches[b]
        if arr is None:
            if self._reader is None:
                self._open()
            col = self._reader.get_batch(b).column(0)
            flat = col.flatten().to_numpy(zero_copy_only=True)
            arr = flat.reshape(-1, self.width)
            self._batches[b] = arr
        return arr

    def __getitem__(self, index: int) -> np.ndarray:
        """Row `index` → `[T+1]` int32."""
        i = int(index)
        if not 0 <= i < self._num_rows:
            raise IndexError(f"row {i} out of range for {self._num_rows} rows in {self.path}")
        b = int(np.searchsorted(self._starts, i, side="right")) - 1
        return self._batch(b)[i - self._starts[b]].astype(np.int32)

    def __repr__(self) -> str:
        return f"ArrowSequences({self.path!r}, rows={self._num_rows}, width={self.width})"


class TrainIterator:
    """Endless `[batch_size, T+1]` int32 batches: this process's slice of the global stream.

    The global stream is every row of the file in a fresh seeded permutation per epoch,
    repeated forever, cut into global batches of batch_size × process_count rows; process p
    gets rows [p·B, (p+1)·B) of each (B = batch_size). So the processes' slices are disjoint,
    together they are the single-process batch, and the stream does not depend on how many
    processes read it. Batches may straddle epoch boundaries. With `refresh`, a task row read
    in epoch e ≥ 1 is `refresh(row index, e, row)`.

    `get_state()` is the position in the global stream (rows consumed, the seed, the file's
    row count): the same on every process, so one copy in a checkpoint resumes any process
    count and batch split, including a run with more or fewer processes than saved it.
    """

    def __init__(self, path: str | Path, *, batch_size: int, seed: int, process_index: int = 0,
                 process_count: int = 1, num_threads: int = 2, prefetch: int = 4,
                 refresh: TaskRefresh | None = None):
        self.path, self.seed, self.refresh = str(path), seed, refresh
        self.source = ArrowSequences(path)
        self.batch, self.process = batch_size, process_index
        self.global_batch = batch_size * process_count
        if len(self.source) < self.global_batch:
            raise DataError(
                f"{path}: {len(self.source)} rows, fewer than one global batch of {self.global_batch} "
                f"(batch size {batch_size} × {process_count} process(es))"
            )
        self._options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
        self._order = grain.MapDataset.range(len(self.source)).shuffle(seed=seed).repeat(None)
        self._position = 0
        self._batches = self._read_from(0)

    def _row(self, g: int) -> np.ndarray:
        """Row g of the global stream."""
        r = int(self._order[g])
        row = self.source[r]
        return row if self.refresh is None else self.refresh(r, g // len(self.source), row)

    def _read_from(self, position: int) -> grain.DatasetIterator:
        first = position + self.process * self.batch

        def batch(k: int) -> np.ndarray:
            start = first + k * self.global_batch
            return np.stack([self._row(g) for g in range(start, start + self.batch)])

        return iter(grain.MapDataset.range(sys.maxsize).map(batch).to_iter_dataset(self._options))

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> np.ndarray:
        out = next(self._batches)
        self._position += self.global_batch
        return out

    def get_state(self) -> dict[str, int]:
        return {"rows_read": self._position, "seed": self.seed, "rows": len(self.source)}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue from `state` (a `get_state()` of any process count); DataError if it is of
        another file or seed."""
        if "rows_read" not in state:
            raise DataError(f"{self.path}: the checkpoint's data position is not a global row count "
                            "(written by an older mcjax); start a new run")
        if (state["rows"], state["seed"]) != (len(self.source), self.seed):
            raise DataError(
                f"{self.path}: the checkpoint read a file of {state['rows']} rows with seed {state['seed']}, "
                f"this run has {len(self.source)} rows and training.seed {self.seed}; resume with the "
                "same prepared data and seed"
            )
        self._position = int(state["rows_read"])
        self._batches = self._read_from(self._position)


def eval_batches(
    path: str | Path,
    *,
    batch_size: int,
    max_rows: int,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[np.ndarray]:
    """Yield `[batch_size, T+1]` int32 batches over the first `max_rows` rows, in order.

    Step k covers global rows [k*B*P, (k+1)*B*P) (B = batch_size, P = process_count) and
    process p gets the p-th slice of B rows, so every process yields the same number of
    batches and together they cover the rows once. Rows that do not fill a step are dropped,
    but at least one step is yielded.
    """
    source = ArrowSequences(path)
    per_step = batch_size * process_count
    if len(source) < per_step:
        raise DataError(
            f"{path}: {len(source)} rows, fewer than one eval step of {batch_size} rows × "
            f"{process_count} process(es)"
        )
    steps = max(1, min(max_rows, len(source)) // per_step)
    for k in range(steps):
        start = k * per_step + process_index * batch_size
        yield np.stack([source[i] for i in range(start, start + batch_size)])


def row_tasks(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(task int8 [n], answer_tokens int16 [n], needle int32 [n]) of a prepared file's rows,
    row for row as `ArrowSequences(path)` reads them: task 0 = natural text, 1 +
    data.tasks.TASKS.index(name) = that task's row, whose answer is its last answer_tokens
    tokens and whose asked fact starts at token `needle` (−1: natural text, or a file
    prepared before prep recorded it). Zeros (and −1) for a file without these columns (no
    dataset.tasks); DataError for a missing or invalid file."""
    source = ArrowSequences(path)  # checks the file
    assert source._reader is not None
    reader, n = source._reader, len(source)
    types = {f.name: f.type for f in reader.schema}
    have = [c for c in ("task", "answer_tokens", "needle") if c in types]
    if not have:
        return np.zeros(n, np.int8), np.zeros(n, np.int16), np.full(n, -1, np.int32)
    if not {"task", "answer_tokens"} <= set(have) or not all(pa.types.is_integer(types[c]) for c in have):
        raise DataError(f"{path}: columns 'task', 'answer_tokens' (and 'needle') must be integer columns; "
                        "run `mcjax prep` for this config")
    table = reader.read_all().select(have)  # memory-mapped: the tokens are not copied
    needle = table.column("needle").to_numpy().astype(np.int32) if "needle" in have else np.full(n, -1, np.int32)
    return (table.column("task").to_numpy().astype(np.int8),
            table.column("answer_tokens").to_numpy().astype(np.int16), needle)


class TaskRefresh:
    """New facts for a prepared file's task rows in every epoch after the first.

    `refresh(r, e, row)` is row r of the file as read in epoch e: itself for e = 0 and for
    natural rows; for a task row, a new row of that task (`tasks.task_rows` keyed (r, e), in
    the split's stream) whose filler is one of the file's natural rows (any row when it has
    none), drawn by the same key — so the answer of epoch e is never one seen before, and
    nothing beyond the memory-mapped file is held. Deterministic in (file, tokenizer, seed,
    stream, r, e). The tokenizer is loaded on first use.
    """

    def __init__(self, path: str | Path, tokenizer: str | Path, *, seed: int, stream: int):
        self.tokenizer_path, self.seed, self.stream = str(tokenizer), seed, stream
        self.source = ArrowSequences(path)
        self.task = row_tasks(path)[0]
        natural = np.flatnonzero(self.task == 0)
        self.fillers = natural if len(natural) else np.arange(len(self.source))
        if not Path(self.tokenizer_path).is_file():
            raise DataError(f"{self.tokenizer_path}: tokenizer not found; run `mcjax prep` for this config")
        self._tok: Tokenizer | None = None

    def __call__(self, index: int, epoch: int, row: np.ndarray) -> np.ndarray:
        kind = int(self.task[index])
        if epoch == 0 or kind == 0:
            return row
        if self._tok is None:
            self._tok = Tokenizer.load(self.tokenizer_path)
        key = (int(index), int(epoch))
        pick = np.random.default_rng((self.seed, self.stream, *key)).integers(len(self.fillers))
        filler = self.source[int(self.fillers[pick])][:-1]
        drawn = task_rows(self._tok, filler[filler != self._tok.bos_id], TASKS[kind - 1], 1, len(row),
                          seed=self.seed, stream=self.stream, keys=[key])
        return drawn.rows[0]
