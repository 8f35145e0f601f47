"""Synthetic long-range prompts: passkey retrieval and a RULER-style needle in a haystack.

A prompt of exactly L tokens is <|bos|>, filler, a *needle* sentence at depth d % of the
filler, more filler, and a question; the answer follows it:

  passkey  needle   "\\nThe pass key is {key}. Remember it. {key} is the pass key.\\n"
           question "\\nWhat is the pass key? The pass key is"          answer " {key}"
  kv       needle   "\\nOne of the special magic numbers for {word} is: {number}.\\n"
           question "\\nWhat is the special magic number for {word} mentioned in the
                     provided text? The special magic number for {word} mentioned in the
                     provided text is"                                  answer " {number}"

key: 5 digits, number: 7 digits, word: an adjective-noun pair from `WORDS` (`texts` and
`WORDS` live in data/tasks.py, which builds the training task rows too). The filler is
held-out narrative text (its token ids, <|bos|> left out), read from an offset drawn per
prompt and wrapped around when the text is shorter than the prompt. The needle starts at
token 1 + round(d/100 · F) (F = filler tokens), so depth 0 puts it first and 100 right
before the question. Everything is drawn from numpy's generator seeded by (seed, task,
L, d, sample): the same arguments give the same prompt, token for token. Each piece
(filler, needle, question, answer) is tokenized on its own, at whitespace, as the
byte-level BPE pre-tokenizes anyway.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mcjax.data.tasks import WORDS, texts

TASKS = ("passkey", "kv")  # eval's own order: make_prompt seeds with TASKS.index(task)
__all__ = ["TASKS", "WORDS", "Prompt", "make_prompt", "texts"]


@dataclasses.dataclass(frozen=True)
class Prompt:
    task: str
    length: int  # tokens in `tokens`
    depth: int  # % of the filler before the needle
    sample: int
    tokens: np.ndarray  # int32 [length]: <|bos|>, filler, needle, filler, question
    answer: np.ndarray  # int32 [n]: the tokens that should follow
    answer_text: str
    needle_start: int  # index of the needle's first token in `tokens`
    needle_tokens: int
    question_tokens: int  # the prompt's last tokens


def make_prompt(tokenizer, filler: np.ndarray, task: str, length: int, depth: int, sample: int, seed: int = 0) -> Prompt:
    """The prompt of the module doc. filler int [N]: text tokens (no <|bos|>).
    ValueError when `length` cannot hold the needle and the question."""
    rng = np.random.default_rng((seed, TASKS.index(task), length, depth, sample))
    needle, question, answer = texts(task, rng)
    n_ids, q_ids, a_ids = (np.asarray(x, np.int32) for x in tokenizer.encode_batch([needle, question, answer]))
    room = length - 1 - len(n_ids) - len(q_ids)
    if room < 0:
        raise ValueError(f"{length} tokens cannot hold the {task} needle and question ({len(n_ids) + len(q_ids) + 1} tokens)")
    start = int(rng.integers(len(filler)))
    fill = np.take(filler, np.arange(start, start + room), mode="wrap").astype(np.int32)
    at = int(round(depth / 100 * room))
    tokens = np.concatenate([[tokenizer.bos_id], fill[:at], n_ids, fill[at:], q_ids]).astype(np.int32)
    return Prompt(task, length, depth, sample, tokens, a_ids, answer, 1 + at, len(n_ids), len(q_ids))
