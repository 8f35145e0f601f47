"""Synthetic long-range task rows, mixed into the prepared data by `mcjax prep` (dataset.tasks).

A row of exactly L tokens is <|bos|>, filler with one or more *facts* inserted, a question,
and its answer: the answer is the row's last tokens, so training predicts it inside the
horizon at the end of the row, and the fact holding it lies anywhere before.

  passkey   1 fact  "\\nThe pass key is {key}. Remember it. {key} is the pass key.\\n"
            question "\\nWhat is the pass key? The pass key is"            answer " {key}"
  kv        4 facts "\\nOne of the special magic numbers for {word} is: {number}.\\n"
            question "\\nWhat is the special magic number for {word} mentioned in the
                      provided text? The special magic number for {word} mentioned in the
                      provided text is"                                   answer " {number}"
  vartrack  6 facts "\\nlet {name} = {value};\\n"
            question "\\nassert {name} =="                                  answer " {value}"

key: 5 digits; number: 7 digits; value: 3 or 4 digits; word: an adjective-noun pair of
`WORDS` ("amber-badger"), name the same with "_" ("amber_badger"). A row's words, numbers,
names and values are distinct and the question asks about one of its facts, drawn uniformly.
The filler is natural text (token ids, <|bos|> left out) read from an offset drawn per row
and wrapped around when the text is shorter than the row. Each fact goes at a depth drawn
uniformly over the filler (0 = right after <|bos|>, F = right before the question; the facts
keep their drawn order). Row i of a task is drawn from numpy's generator seeded by
(seed, stream, TASKS.index(task), *keys[i]) — keys[i] = (i,) at prep, stream naming the
split; the train pipeline redraws row r of epoch e ≥ 1 with the key (r, e) (`pipeline.py`):
the same arguments give the same rows, token for token. Each piece (filler, fact, question,
answer) is tokenized on its own, at whitespace, as the byte-level BPE pre-tokenizes anyway.

`texts` draws the (needle, question, answer) of one passkey or kv prompt; `mcjax eval`'s
prompts (eval/passkey.py) use it too.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from mcjax.data.tokenizer import Tokenizer

TASKS = ("passkey", "kv", "vartrack")
_ADJ = ("amber", "brisk", "calm", "dusty", "eager", "faint", "gentle", "hollow", "icy", "jolly", "keen", "lucky",
        "mellow", "noble", "odd", "proud", "quiet", "rusty", "silent", "tidy")
_NOUN = ("anchor", "badger", "candle", "dragon", "ember", "falcon", "garden", "harbor", "island", "jackal", "kettle",
         "lantern", "meadow", "needle", "orchard", "pebble", "quill", "river", "saddle", "tower")
WORDS = tuple(f"{a}-{n}" for a in _ADJ for n in _NOUN)
KV_FACTS, VARTRACK_FACTS = 4, 6


def split_stream(split: str) -> int:
    """The `stream` of a split's task rows: zlib.crc32 of its name."""
    return zlib.crc32(split.encode())


def _kv(word: str, number: int) -> tuple[str, str, str]:
    asked = f"the special magic number for {word} mentioned in the provided text"
    return (f"\nOne of the special magic numbers for {word} is: {number}.\n",
            f"\nWhat is {asked}? The{asked[3:]} is", f" {number}")


def texts(task: str, rng: np.random.Generator) -> tuple[str, str, str]:
    """(needle, question, answer) of one passkey or kv prompt, drawn from `rng`."""
    if task == "passkey":
        key = int(rng.integers(10_000, 100_000))
        return (f"\nThe pass key is {key}. Remember it. {key} is the pass key.\n",
                "\nWhat is the pass key? The pass key is", f" {key}")
    if task == "kv":
        word, number = WORDS[int(rng.integers(len(WORDS)))], int(rng.integers(1_000_000, 10_000_000))
        return _kv(word, number)
    raise ValueError(f"unknown task {task!r}: choose from passkey, kv")


def _pieces(task: str, rng: np.random.Generator) -> tuple[list[str], str, str, int]:
    """(facts, question, answer, which fact is asked) of one row of `task`: the strings of the module doc."""
    if task == "passkey":
        needle, question, answer = texts(task, rng)
        return [needle], question, answer, 0
    if task == "kv":
        words = rng.choice(len(WORDS), KV_FACTS, replace=False)
        numbers = 1_000_000 + rng.choice(9_000_000, KV_FACTS, replace=False)
        facts = [_kv(WORDS[w], int(v))[0] for w, v in zip(words, numbers)]
        asked = int(rng.integers(KV_FACTS))
        return facts, *_kv(WORDS[words[asked]], int(numbers[asked]))[1:], asked
    names = [WORDS[w].replace("-", "_") for w in rng.choice(len(WORDS), VARTRACK_FACTS, replace=False)]  # vartrack
    values = 100 + rng.choice(9_900, VARTRACK_FACTS, replace=False)
    asked = int(rng.integers(VARTRACK_FACTS))
    return [f"\nlet {n} = {v};\n" for n, v in zip(names, values)], f"\nassert {names[asked]} ==", f" {values[asked]}", asked


class TaskRows(NamedTuple):
    rows: np.ndarray  # int32 [count, tokens_per_row]
    answer_tokens: np.ndarray  # int16 [count]: row i's answer is its last answer_tokens[i] tokens
    needle: np.ndarray  # int32 [count]: index of the first token of the fact the question asks about


def task_rows(tokenizer: Tokenizer, filler: np.ndarray, task: str, count: int, tokens_per_row: int, *,
              seed: int, stream: int, keys: Sequence[tuple[int, ...]] | None = None) -> TaskRows:
    """`count` rows of `task` (module doc) from `filler` int [N] (text tokens, no <|bos|>);
    row i's generator is keyed by keys[i] (default (i,)). ValueError when a row cannot hold
    <|bos|>, the facts, the question and the answer, or when there is no filler to draw from.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: choose from {', '.join(TASKS)}")
    keys = [(i,) for i in range(count)] if keys is None else keys
    if len(keys) != count:
        raise ValueError(f"{len(keys)} keys for {count} rows")
    rngs = [np.random.default_rng((seed, stream, TASKS.index(task), *key)) for key in keys]
    drawn = [_pieces(task, rng) for rng in rngs]  # (facts, question, answer, index of the asked fact)
    ids = iter(np.asarray(x, np.int32) for x in tokenizer.encode_batch([s for f, q, a, _ in drawn for s in (*f, q, a)]))
    rows = np.empty((count, tokens_per_row), np.int32)
    answers = np.empty(count, np.int16)
    needles = np.empty(count, np.int32)
    for i, (rng, (facts, _, _, asked)) in enumerate(zip(rngs, drawn)):
        fact_ids = [next(ids) for _ in facts]
        q_ids, a_ids = next(ids), next(ids)
        room = tokens_per_row - 1 - sum(map(len, fact_ids)) - len(q_ids) - len(a_ids)
        if room < 0:
            raise ValueError(f"rows of {tokens_per_row} tokens cannot hold a {task} row's <|bos|>, facts, question "
                             f"and answer ({tokens_per_row - room} tokens)")
        if room and not len(filler):
            raise ValueError(f"no filler text for the {task} rows")
        start = int(rng.integers(max(1, len(filler))))
        fill = np.take(filler, np.arange(start, start + room), mode="wrap").astype(np.int32)
        at = np.sort(rng.integers(0, room + 1, len(facts)))
        parts = [np.array([tokenizer.bos_id], np.int32)]
        for j, (lo, hi, f) in enumerate(zip([0, *at[:-1]], at, fact_ids)):
            parts.append(fill[lo:hi])
            if j == asked:
                needles[i] = sum(map(len, parts))
            parts.append(f)
        rows[i] = np.concatenate([*parts, fill[at[-1]:], q_ids, a_ids])
        answers[i] = len(a_ids)
    return TaskRows(rows, answers, needles)
