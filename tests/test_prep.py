"""Tests for mcjax.data.tokenizer and mcjax.data.prep: determinism, row layout, splits, atomicity."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from mcjax.config import config_from_dict
from mcjax.data import prep
from mcjax.data.corpus import read_documents
from mcjax.data.prep import cut_rows, is_prepared, prepare, token_stream
from mcjax.data.tokenizer import Tokenizer, train_bpe
from mcjax.errors import ConfigError, DataError

T = 64
SHAKESPEARE = "builtin:shakespeare"


def make_cfg(out: Path, train: str = SHAKESPEARE, val: str | None = SHAKESPEARE, **dataset):
    splits = {"train": {"source": train, "output_path": str(out / "train.arrow")}}
    if val is not None:
        splits["val"] = {"source": val, "output_path": str(out / "val.arrow")}
    d = {"vocab_size": 300, "context_tokens": T, "block_size": 32, "horizon": 16,
         "max_source_bytes": 200_000, "val_fraction": 0.05, "splits": splits, **dataset}
    return config_from_dict({"name": "t", "dataset": d, "training": {"max_steps": 1},
                             "megacontext": {"recent_tokens": 32}},
                            where="configs/t.yaml")


def read_rows(path: Path) -> np.ndarray:
    with pa.memory_map(str(path)) as f:
        table = pa.ipc.open_file(f).read_all()
    col = table.column("tokens").combine_chunks()
    return col.values.to_numpy().reshape(len(col), -1).astype(np.int64)


def write_texts(root: Path, texts: dict[str, str]) -> None:
    for name, text in texts.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def lorem(seed: int, words: int) -> str:
    rng = np.random.default_rng(seed)
    vocab = "the quick brown fox jumps over a lazy dog and then sleeps in warm sun".split()
    return " ".join(rng.choice(vocab, words)) + ".\n"


def quiet(_: str) -> None:
    pass


# ----------------------------------------------------------------------------- tokenizer


def test_bpe_is_deterministic_and_round_trips(tmp_path):
    texts = [t for _, t in read_documents(SHAKESPEARE, key="k", where="w", max_bytes=200_000)]
    a, b = train_bpe(texts, 400), train_bpe(texts, 400)
    assert a.to_json() == b.to_json()
    assert a.vocab_size == 400 and a.bos_id == 0
    s = "Wherefore art thou, Romeo? naïve — 日本 \t\n  def f(x): return x"
    assert a.decode(a.encode_batch([s])[0]) == s
    a.save(tmp_path / "tok.json")
    c = Tokenizer.load(tmp_path / "tok.json")
    assert c.encode_batch([s]) == a.encode_batch([s]) and c.vocab_size == 400


def test_bpe_is_deterministic_across_processes():
    code = (
        "import hashlib; from mcjax.data.tokenizer import train_bpe; "
        "t = train_bpe(['the cat sat on the mat. ' * 50, 'def f(x):\\n    return x\\n' * 40], 290); "
        "print(hashlib.sha256(t.to_json().encode()).hexdigest())"
    )
    root = str(Path(__file__).resolve().parents[1])
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, cwd=root, env={"PYTHONPATH": root}).stdout for _ in range(2)}
    assert len(runs) == 1


def test_tokenizer_load_errors_name_the_path(tmp_path):
    with pytest.raises(DataError, match="nope.json"):
        Tokenizer.load(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="bad.json.*not a valid tokenizer"):
        Tokenizer.load(tmp_path / "bad.json")


# ----------------------------------------------------------------------------- prep


def test_prep_is_byte_identical_across_runs(tmp_path, monkeypatch):
    for run in ("a", "b"):  # same relative output paths, different working directories
        (tmp_path / run).mkdir()
        monkeypatch.chdir(tmp_path / run)
        prepare(make_cfg(Path("out")), log=quiet)
    names = ["meta.json", "tokenizer.json", "train.arrow", "val.arrow"]
    for run in ("a", "b"):  # nothing else left behind (no temp dirs)
        assert sorted(p.name for p in (tmp_path / run / "out").iterdir()) == names
    for name in names:
        a = (tmp_path / "a" / "out" / name).read_bytes()
        assert a and a == (tmp_path / "b" / "out" / name).read_bytes(), name


def test_rows_overlap_by_one_and_decode_to_the_source(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    texts = {f"corpus/doc{i}.txt": lorem(i, 150 + 40 * i) for i in range(6)}
    write_texts(tmp_path, texts)
    held = lorem(99, 400)
    write_texts(tmp_path, {"held/v.txt": held})
    monkeypatch.setattr(prep, "BATCH_ROWS", 7)  # several record batches
    cfg = make_cfg(Path("out"), train="corpus/*.txt", val="held/*.txt", max_source_bytes=0)
    meta = prepare(cfg, log=quiet)

    with pa.memory_map("out/train.arrow") as f:
        reader = pa.ipc.open_file(f)
        assert reader.schema.field("tokens").type == pa.list_(pa.uint16(), T + 1)
        assert {k.decode(): v.decode() for k, v in reader.schema.metadata.items()} == {
            "block_size": "32", "context_tokens": str(T), "vocab_size": "300", "bos_id": "0"}
        assert reader.num_record_batches > 1
        assert all(reader.get_batch(i).num_rows <= 7 for i in range(reader.num_record_batches))
    rows = read_rows(Path("out/train.arrow"))
    n = len(rows)
    assert n == meta["splits"]["train"]["rows"] and n > 10
    np.testing.assert_array_equal(rows[1:, 0], rows[:-1, -1])  # overlap by exactly one token
    stream = np.concatenate([rows[:, :-1].reshape(-1), rows[-1, -1:]])  # n*T + 1 tokens
    tok = Tokenizer.load("out/tokenizer.json")
    full = "".join("<|bos|>" + texts[f"corpus/doc{i}.txt"] for i in range(6))
    decoded = tok.decode(stream.tolist())
    assert full.startswith(decoded) and len(full) - len(decoded) < 4 * T
    assert rows[0, 0] == tok.bos_id == 0
    # the val split is its own stream
    val = read_rows(Path("out/val.arrow"))
    assert tok.decode(val[0].tolist()).startswith("<|bos|>" + held[:20])


def test_shared_source_val_and_train_are_disjoint_and_cover_all_rows(tmp_path):
    cfg = make_cfg(tmp_path, val_fraction=0.1)
    prepare(cfg, log=quiet)
    train, val = read_rows(tmp_path / "train.arrow"), read_rows(tmp_path / "val.arrow")
    docs = read_documents(SHAKESPEARE, key="k", where="w", max_bytes=200_000)
    every = cut_rows(token_stream(Tokenizer.load(tmp_path / "tokenizer.json"), docs), T)
    index = {r.tobytes(): i for i, r in enumerate(every)}
    assert len(index) == len(every)  # rows are distinct, so they identify their position
    ti = [index[r.tobytes()] for r in train]
    vi = [index[r.tobytes()] for r in val]
    assert len(vi) == max(1, round(0.1 * len(every)))
    assert ti == sorted(ti) and vi == sorted(vi)
    assert not set(ti) & set(vi) and sorted(ti + vi) == list(range(len(every)))
    assert vi != list(range(len(vi)))  # a random selection, not the head


def test_a_failing_split_leaves_no_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = make_cfg(Path("out"), val="missing/**/*.txt")
    with pytest.raises(DataError, match=r"configs/t\.yaml: dataset\.splits\.val\.source: .*missing"):
        prepare(cfg, log=quiet)
    assert not Path("out").exists() or not any(Path("out").rglob("*"))


def test_an_interrupt_while_writing_leaves_no_files(tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path / "out")
    real = prep.write_arrow

    def write_arrow(path, rows, **kw):
        if path.name == "val.arrow":
            raise KeyboardInterrupt
        real(path, rows, **kw)

    monkeypatch.setattr(prep, "write_arrow", write_arrow)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg, log=quiet)
    assert not any((tmp_path / "out").rglob("*"))
    assert not is_prepared(cfg)


def test_is_prepared_tracks_config_and_files(tmp_path):
    cfg = make_cfg(tmp_path)
    assert not is_prepared(cfg)
    lines: list[str] = []
    meta = prepare(cfg, log=lines.append)
    assert is_prepared(cfg) and not meta["skipped"]
    assert sum(line.startswith("prep: train:") for line in lines) == 1
    assert sum(line.startswith("prep: val:") for line in lines) == 1
    assert prepare(cfg, log=quiet)["skipped"]
    assert not is_prepared(make_cfg(tmp_path, val_fraction=0.2))
    assert not is_prepared(make_cfg(tmp_path, vocab_size=301))
    assert not is_prepared(make_cfg(tmp_path, packing="documents"))
    assert not is_prepared(make_cfg(tmp_path, tasks={"passkey": 0.1}))
    assert is_prepared(make_cfg(tmp_path, packing="stream", tasks={}))  # the defaults, spelled out
    reseeded = config_from_dict({**json.loads(json.dumps(cfg.to_dict())),
                                 "training": {"max_steps": 1, "seed": 7}})
    assert not is_prepared(reseeded)
    (tmp_path / "val.arrow").unlink()
    assert not is_prepared(cfg)
    assert not prepare(cfg, log=quiet)["skipped"] and is_prepared(cfg)


def test_a_split_too_short_for_one_row(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_texts(tmp_path, {"tiny/a.txt": "just a few words"})
    cfg = make_cfg(Path("out"), val="tiny/*.txt")
    with pytest.raises(DataError) as e:
        prepare(cfg, log=quiet)
    msg = str(e.value)
    assert "dataset.splits.val" in msg and f"{T + 1}" in msg and "tokens" in msg
    assert not Path("out").exists() or not any(Path("out").rglob("*"))


def test_a_given_tokenizer_is_used_and_checked(tmp_path):
    texts = [t for _, t in read_documents(SHAKESPEARE, key="k", where="w", max_bytes=100_000)]
    train_bpe(texts, 280).save(tmp_path / "given.json")
    cfg = make_cfg(tmp_path / "out", tokenizer=str(tmp_path / "given.json"), vocab_size=300)
    meta = prepare(cfg, log=quiet)
    assert meta["vocab_size"] == 280
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (tmp_path / "given.json").read_bytes()
    small = make_cfg(tmp_path / "out2", tokenizer=str(tmp_path / "given.json"), vocab_size=270)
    with pytest.raises(ConfigError, match=r"dataset\.vocab_size"):
        prepare(small, log=quiet)
    missing = make_cfg(tmp_path / "out3", tokenizer=str(tmp_path / "nope.json"))
    with pytest.raises(DataError, match="nope.json"):
        prepare(missing, log=quiet)


def test_eval_fraction_keeps_whole_documents_out_of_every_row(tmp_path, monkeypatch):
    """Held-out documents (by kind, chosen by name) appear in no row: train and val together are
    exactly the rows of the stream of the documents kept; meta.json names the held-out ones."""
    monkeypatch.chdir(tmp_path)
    texts = {f"corpus/doc{i}.txt": lorem(i, 400) for i in range(8)}
    texts.update({f"corpus/mod{i}.py": f"def f{i}(x):\n    return x * {i}\n" * 60 for i in range(4)})
    write_texts(tmp_path, texts)
    cfg = make_cfg(Path("out"), train="corpus/*", val="corpus/*", eval_fraction=0.25, max_source_bytes=0)
    meta = prepare(cfg, log=quiet)
    held = meta["held_out"]
    assert len(held["narrative"]) == 2 and len(held["code"]) == 1  # round(0.25 · 8), round(0.25 · 4)
    assert set(held["narrative"]) <= set(texts) and held["code"][0].endswith(".py")
    kept = [(n, t) for n, t in sorted(texts.items()) if n not in held["narrative"] + held["code"]]
    rows = cut_rows(token_stream(Tokenizer.load("out/tokenizer.json"), kept), T)
    got = np.concatenate([read_rows(Path("out/train.arrow")), read_rows(Path("out/val.arrow"))])
    assert sorted(map(tuple, got)) == sorted(map(tuple, rows))
    assert meta["splits"]["train"]["documents"] == len(kept)


# ----------------------------------------------------------------------------- packing, tasks


def test_document_packing_gives_long_documents_rows_of_their_own(tmp_path, monkeypatch):
    """packing: documents: a document of ≥ T+1 tokens is cut on its own (row 0 starts at its
    bos, rows are contiguous slices of its stream); its rest and the short documents are one
    stream, cut after the documents' rows. packing: stream is the default, unchanged."""
    monkeypatch.chdir(tmp_path)
    words = [300, 20, 150, 10, 500, 30]
    texts = {f"corpus/doc{i}.txt": lorem(i, w) for i, w in enumerate(words)}
    write_texts(tmp_path, {**texts, "held/v.txt": lorem(99, 400)})
    kw = dict(train="corpus/*.txt", val="held/*.txt", max_source_bytes=0)
    prepare(make_cfg(Path("docs"), packing="documents", **kw), log=quiet)
    tok = Tokenizer.load("docs/tokenizer.json")
    rows = read_rows(Path("docs/train.arrow"))
    streams = prep.document_streams(tok, sorted(texts.items()))
    long = [s for s in streams if len(s) >= T + 1]
    assert 0 < len(long) < len(streams)
    at = 0
    for s in long:  # document order, each from its bos
        n = (len(s) - 1) // T
        assert rows[at, 0] == tok.bos_id
        for j in range(n):
            np.testing.assert_array_equal(rows[at + j], s[j * T : j * T + T + 1])
        at += n
    rest = np.concatenate([s[((len(s) - 1) // T) * T + 1 :] if len(s) >= T + 1 else s for s in streams])
    np.testing.assert_array_equal(rows[at:], cut_rows(rest, T))

    prepare(make_cfg(Path("stream"), packing="stream", **kw), log=quiet)
    prepare(make_cfg(Path("default"), **kw), log=quiet)
    for name in ("train.arrow", "val.arrow", "tokenizer.json"):
        assert Path("stream", name).read_bytes() == Path("default", name).read_bytes()
    np.testing.assert_array_equal(read_rows(Path("stream/train.arrow")), cut_rows(np.concatenate(streams), T))


TASK_T = 512  # rows long enough for every task with a 300-token BPE


def test_task_rows_are_mixed_in_by_share_and_labelled(tmp_path, monkeypatch):
    from mcjax.data.pipeline import ArrowSequences, row_tasks
    from mcjax.data.tasks import TASKS

    shares = {"vartrack": 0.1, "passkey": 0.15, "kv": 0.05}
    lines: list[str] = []
    for run in ("a", "b", "plain"):  # same relative output paths, different working directories
        (tmp_path / run).mkdir()
        monkeypatch.chdir(tmp_path / run)
        tasks = {} if run == "plain" else {"tasks": shares}
        prepare(make_cfg(Path("out"), context_tokens=TASK_T, **tasks), log=lines.append if run == "a" else quiet)
    monkeypatch.chdir(tmp_path)
    for name in ("meta.json", "tokenizer.json", "train.arrow", "val.arrow"):  # deterministic
        assert Path("a/out", name).read_bytes() == Path("b/out", name).read_bytes(), name
    meta = json.loads(Path("a/out/meta.json").read_text())
    plain = json.loads(Path("plain/out/meta.json").read_text())
    assert "natural_rows" not in plain["splits"]["train"] and "task_rows" not in plain["splits"]["val"]
    tok = Tokenizer.load("a/out/tokenizer.json")
    for split in ("train", "val"):
        s, natural = meta["splits"][split], plain["splits"][split]["rows"]
        want = {t: round(natural * w / 0.7) for t, w in shares.items()}
        assert s["natural_rows"] == natural and s["task_rows"] == want and s["rows"] == natural + sum(want.values())
        path = Path("a/out", f"{split}.arrow")
        with pa.memory_map(str(path)) as f:
            assert pa.ipc.open_file(f).schema.names == ["tokens", "task", "answer_tokens", "needle"]
        rows, (task, answers, needles) = read_rows(path), row_tasks(path)
        assert len(rows) == len(task) == s["rows"]
        assert np.bincount(task, minlength=4).tolist() == [natural] + [want[t] for t in TASKS]
        assert (answers[task == 0] == 0).all() and (answers[task > 0] > 0).all()
        assert (needles[task == 0] == -1).all() and (needles[task > 0] > 0).all()
        assert (needles[task > 0] < TASK_T - answers[task > 0]).all()  # the fact comes before the question
        for i in np.flatnonzero(task > 0)[:12]:  # the answer is the row's last tokens, after the question
            head, tail = tok.decode(rows[i, : -answers[i]].tolist()), tok.decode(rows[i, -answers[i] :].tolist())
            assert re.fullmatch(r" \d+", tail) and re.search(r"(is|==)$", head) and rows[i, 0] == tok.bos_id
        # the natural rows are the plain prep's rows, shuffled in among the task rows
        plain_rows = read_rows(Path("plain/out", f"{split}.arrow"))
        assert sorted(map(tuple, rows[task == 0])) == sorted(map(tuple, plain_rows))
        assert task[: len(task) // 2].any() and not np.array_equal(rows[task == 0], plain_rows)
        src = ArrowSequences(path)  # training reads the tokens column of the wider file
        np.testing.assert_array_equal(np.stack([src[i] for i in range(len(src))]), rows)
    assert any(line.startswith("prep: val:") and "natural rows, passkey" in line for line in lines)
    plain_tasks, plain_answers, plain_needles = row_tasks(Path("plain/out/train.arrow"))  # no tasks: zeros
    assert not plain_tasks.any() and not plain_answers.any() and len(plain_tasks) == plain["splits"]["train"]["rows"]
    assert (plain_needles == -1).all()
    with pa.memory_map("plain/out/train.arrow") as f:
        assert pa.ipc.open_file(f).schema.names == ["tokens"]


def test_tasks_summing_to_one_drop_the_natural_rows(tmp_path):
    lines: list[str] = []
    meta = prepare(make_cfg(tmp_path, context_tokens=TASK_T, tasks={"passkey": 0.5, "vartrack": 0.5}), log=lines.append)
    s = meta["splits"]["train"]
    assert s["natural_rows"] == 0 and s["rows"] == sum(s["task_rows"].values()) > 0
    assert any(line.startswith("prep: train:") and "0 natural rows, passkey" in line for line in lines)


def test_task_rows_too_long_for_the_context(tmp_path):
    with pytest.raises(ConfigError, match=r"^configs/t\.yaml: dataset\.tasks\.kv: rows of 65 tokens cannot hold"):
        prepare(make_cfg(tmp_path, tasks={"kv": 0.1}), log=quiet)
    assert not any(tmp_path.rglob("*"))


def test_row_tasks_errors_name_the_path(tmp_path):
    from mcjax.data.pipeline import row_tasks

    with pytest.raises(DataError, match="nope.arrow: prepared data file not found"):
        row_tasks(tmp_path / "nope.arrow")
    (tmp_path / "bad.arrow").write_bytes(b"not arrow")
    with pytest.raises(DataError, match="bad.arrow: not a valid prepared Arrow file"):
        row_tasks(tmp_path / "bad.arrow")
