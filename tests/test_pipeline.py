"""Tests for mcjax.data.pipeline: the Arrow source, sharded/shuffled/resumable training batches
and the in-order eval batches."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from mcjax.config import config_from_dict
from mcjax.data import prep
from mcjax.data.pipeline import ArrowSequences, TrainIterator, eval_batches
from mcjax.errors import DataError

T = 8
N = 240  # rows; row i holds i*T, i*T+1, ..., i*T+T, so row id = row[0] // T


@pytest.fixture(scope="module")
def arrow(tmp_path_factory) -> Path:
    """A synthetic prepared file of N rows in record batches of 50 rows."""
    path = tmp_path_factory.mktemp("data") / "train.arrow"
    cfg = config_from_dict({
        "name": "t",
        "dataset": {"context_tokens": T, "block_size": 4, "horizon": 4, "vocab_size": 4096,
                    "splits": {"train": {"source": "unused", "output_path": str(path)}}},
        "training": {"max_steps": 1},
        "megacontext": {"recent_tokens": 4},
    })
    rows = np.arange(N)[:, None] * T + np.arange(T + 1)[None, :]
    with pytest.MonkeyPatch.context() as m:
        m.setattr(prep, "BATCH_ROWS", 50)
        prep.write_arrow(path, rows, cfg=cfg, tok=SimpleNamespace(vocab_size=4096, bos_id=0))
    return path


def ids(batch: np.ndarray) -> list[int]:
    return (batch[:, 0] // T).tolist()


def take(it, n: int) -> list[np.ndarray]:
    return [next(it) for _ in range(n)]


def test_source_rows_dtype_and_pickling(arrow):
    src = ArrowSequences(arrow)
    assert len(src) == N and src.width == T + 1
    for i in (0, 49, 50, 51, 199, N - 1):  # across record-batch edges
        row = src[i]
        assert row.dtype == np.int32 and row.shape == (T + 1,)
        np.testing.assert_array_equal(row, i * T + np.arange(T + 1))
    with pytest.raises(IndexError):
        src[N]
    clone = pickle.loads(pickle.dumps(src))
    np.testing.assert_array_equal(clone[123], src[123])


def test_source_errors_name_the_path_and_prep(tmp_path):
    with pytest.raises(DataError, match=r"missing\.arrow.*mcjax prep"):
        ArrowSequences(tmp_path / "missing.arrow")
    (tmp_path / "junk.arrow").write_bytes(b"not arrow at all" * 10)
    with pytest.raises(DataError, match=r"junk\.arrow: not a valid prepared Arrow file.*mcjax prep"):
        ArrowSequences(tmp_path / "junk.arrow")


def test_batches_shape_dtype(arrow):
    it = TrainIterator(arrow, batch_size=6, seed=0)
    b = next(it)
    assert b.shape == (6, T + 1) and b.dtype == np.int32
    np.testing.assert_array_equal(b[:, 1:] - b[:, :-1], 1)  # whole rows, not mixed


def test_each_epoch_is_a_new_permutation(arrow):
    it = TrainIterator(arrow, batch_size=10, seed=3)
    seen = [i for b in take(it, 3 * N // 10) for i in ids(b)]
    epochs = [seen[k * N:(k + 1) * N] for k in range(3)]
    for e in epochs:
        assert sorted(e) == list(range(N))
    assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != list(range(N))
    again = [i for b in take(TrainIterator(arrow, batch_size=10, seed=3), N // 10) for i in ids(b)]
    assert again == epochs[0]
    other = [i for b in take(TrainIterator(arrow, batch_size=10, seed=4), N // 10) for i in ids(b)]
    assert other != epochs[0]


def slices(path, p_count: int, batch: int, steps: int, seed: int = 0, state: dict | None = None) -> list[np.ndarray]:
    """The global batches of `steps` steps as `p_count` processes of `batch` rows read them."""
    its = [TrainIterator(path, batch_size=batch, seed=seed, process_index=p, process_count=p_count)
           for p in range(p_count)]
    for it in its:
        if state is not None:
            it.set_state(state)
    return [np.concatenate([next(it) for it in its]) for _ in range(steps)]


@pytest.mark.parametrize("p_count", [2, 3, 4])
def test_process_slices_are_disjoint_and_together_the_single_process_batch(arrow, p_count):
    steps = 25  # 24-row global batches: 2.5 epochs of 240 rows
    single = slices(arrow, 1, 24, steps)
    split = slices(arrow, p_count, 24 // p_count, steps)
    for one, many in zip(single, split):
        np.testing.assert_array_equal(one, many)
    seen = [i for b in split for i in ids(b)]
    assert sorted(seen[:N]) == list(range(N))  # the first epoch: every row once, none twice


@pytest.mark.parametrize("skip", [3, 10])  # 10 × 22 rows runs past an epoch end of 240 within the 15 that follow
def test_state_round_trips_through_json_and_resumes_exactly(arrow, skip):
    it = TrainIterator(arrow, batch_size=11, seed=1, process_index=1, process_count=2)
    take(it, skip)
    state = json.loads(json.dumps(it.get_state()))
    assert state == {"rows_read": skip * 22, "seed": 1, "rows": N}
    expected = take(it, 15)
    fresh = TrainIterator(arrow, batch_size=11, seed=1, process_index=1, process_count=2)
    fresh.set_state(state)
    for want, got in zip(expected, take(fresh, 15)):
        np.testing.assert_array_equal(want, got)


@pytest.mark.parametrize("before, after", [((2, 11), (1, 22)), ((1, 22), (2, 11)), ((4, 6), (3, 8))])
def test_state_resumes_on_another_process_count(arrow, before, after):
    """A position saved by P processes continues the same global stream read by P' processes."""
    its = [TrainIterator(arrow, batch_size=before[1], seed=2, process_index=p, process_count=before[0])
           for p in range(before[0])]
    for it in its:
        take(it, 7)
    assert len({json.dumps(it.get_state()) for it in its}) == 1  # every process holds the same state
    resumed = slices(arrow, *after, 12, seed=2, state=its[0].get_state())
    reference = slices(arrow, 1, before[0] * before[1], 19, seed=2)[7:]  # one process, uninterrupted
    np.testing.assert_array_equal(np.concatenate(resumed), np.concatenate(reference))


@pytest.mark.parametrize("change, why", [({"seed": 5}, "seed 5"), ({"rows": 99}, "99 rows"),
                                         ({"rows_read": None}, "older mcjax")])
def test_state_of_another_file_or_seed_is_one_clear_error(arrow, change, why):
    state = {"rows_read": 22, "seed": 1, "rows": N, **change}
    if state["rows_read"] is None:
        state = {"next_index": 2}  # grain's own iterator state, as older checkpoints held
    with pytest.raises(DataError, match=why):
        TrainIterator(arrow, batch_size=11, seed=1).set_state(state)


def test_too_few_rows_for_a_batch(arrow):
    with pytest.raises(DataError, match="fewer than one global batch of 242"):
        TrainIterator(arrow, batch_size=121, seed=0, process_count=2)


def test_eval_batches_are_the_first_rows_in_order(arrow):
    batches = list(eval_batches(arrow, batch_size=16, max_rows=100))
    assert len(batches) == 6  # 96 rows; the partial 7th batch is dropped
    assert all(b.shape == (16, T + 1) and b.dtype == np.int32 for b in batches)
    assert [i for b in batches for i in ids(b)] == list(range(96))
    assert len(list(eval_batches(arrow, batch_size=16, max_rows=5))) == 1  # at least one
    assert len(list(eval_batches(arrow, batch_size=16, max_rows=10_000))) == N // 16
    with pytest.raises(DataError, match="fewer than"):
        list(eval_batches(arrow, batch_size=N + 1, max_rows=10))


def test_eval_batches_split_over_processes(arrow):
    per = [list(eval_batches(arrow, batch_size=8, max_rows=100, process_index=p, process_count=2))
           for p in range(2)]
    assert len(per[0]) == len(per[1]) == 6
    rows = [i for p in range(2) for b in per[p] for i in ids(b)]
    assert sorted(rows) == list(range(96))


def test_task_refresh_draws_new_facts_every_epoch_after_the_first(tmp_path):
    """dataset.task_refresh: epoch 0 reads the prepared rows; in epoch 1 every task row (and
    only those) is a new row of its task — <|bos|> first, the answer a number stated earlier
    in the row — the same for every iterator, also after a resume; the prepared data does
    not depend on the key."""
    import re

    from conftest import tiny_config

    from mcjax.data.pipeline import TaskRefresh, row_tasks
    from mcjax.data.tasks import split_stream
    from mcjax.data.tokenizer import Tokenizer

    raw = tiny_config(tmp_path, dataset={"context_tokens": 256, "max_source_bytes": 100_000,
                                         "tasks": {"passkey": 0.2, "vartrack": 0.2}})
    cfg = config_from_dict(raw)
    prep.prepare(cfg, log=lambda _: None)
    raw["dataset"]["task_refresh"] = False
    assert prep.is_prepared(config_from_dict(raw))
    path, tok_path = cfg.dataset.splits["train"].output_path, prep.tokenizer_path(cfg)
    source, (task, _, _) = ArrowSequences(path), row_tasks(path)
    n, file_rows = len(source), {source[i].tobytes(): i for i in range(len(source))}
    tok = Tokenizer.load(tok_path)

    def iterator():
        refresh = TaskRefresh(path, tok_path, seed=0, stream=split_stream("train"))
        return TrainIterator(path, batch_size=1, seed=0, refresh=refresh)

    it = iterator()
    first, second = [next(it)[0] for _ in range(n)], [next(it)[0] for _ in range(n)]
    assert sorted(file_rows[r.tobytes()] for r in first) == list(range(n))  # epoch 0: the file
    kept = sorted(file_rows[r.tobytes()] for r in second if r.tobytes() in file_rows)
    assert kept == np.flatnonzero(task == 0).tolist()  # epoch 1: the natural rows as they were
    new = [r for r in second if r.tobytes() not in file_rows]
    assert len(new) == (task > 0).sum() > 0 and len({r.tobytes() for r in new}) == len(new)
    for row in new:
        assert row.shape == (257,) and row[0] == tok.bos_id
        text = tok.decode(row.tolist())
        answer = re.search(r"(\d+)\s*$", text).group(1)
        assert text.count(answer) >= 2, text[-200:]  # stated in a fact, asked at the end
    again = iterator()
    for _ in range(n + 5):
        next(again)
    state = again.get_state()
    np.testing.assert_array_equal(np.stack([next(again)[0] for _ in range(10)]), np.stack(second[5:15]))
    resumed = iterator()
    resumed.set_state(state)
    np.testing.assert_array_equal(np.stack([next(resumed)[0] for _ in range(10)]), np.stack(second[5:15]))
