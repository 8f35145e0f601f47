"""Tests for mcjax.data.tasks: the synthetic task rows' layout, answers, facts and determinism,
and that eval's prompts (mcjax.eval.passkey) are unchanged by sharing its texts."""

from __future__ import annotations

import re

import numpy as np
import pytest

from mcjax.data.corpus import read_documents
from mcjax.data.tasks import TASKS, task_rows
from mcjax.data.tokenizer import train_bpe

L = 513  # a kv row needs ~330 tokens of a 300-token BPE


@pytest.fixture(scope="module")
def tok_filler():
    texts = [t for _, t in read_documents("builtin:shakespeare", key="k", where="w", max_bytes=100_000)]
    tok = train_bpe(texts, 300)
    return tok, np.asarray(tok.encode_batch([texts[0][:20_000]])[0], np.int64)


# the asked fact (in the text before the question), the question's key, the answer's digits
FACT = {
    "passkey": (r"\nThe pass key is (\d{5})\. Remember it\. \1 is the pass key\.\n",
                r"\nWhat is the pass key\? The pass key is$", r" (\d{5})"),
    "kv": (r"\nOne of the special magic numbers for {key} is: (\d{{7}})\.\n",
           r"\nWhat is the special magic number for ([a-z]+-[a-z]+) mentioned in the provided text\? The special "
           r"magic number for \1 mentioned in the provided text is$", r" (\d{7})"),
    "vartrack": (r"\nlet {key} = (\d{{3,4}});\n", r"\nassert ([a-z]+_[a-z]+) ==$", r" (\d{3,4})"),
}
FACTS = {"passkey": (r"The pass key is \d+\.", 1), "kv": (r"magic numbers for ([a-z-]+) is", 4),
         "vartrack": (r"\nlet ([a-z_]+) = ", 6)}


@pytest.mark.parametrize("task", TASKS)
def test_rows_end_with_the_answer_to_a_fact_earlier_in_the_row(tok_filler, task):
    tok, filler = tok_filler
    rows, answers, needles = task_rows(tok, filler, task, 8, L, seed=3, stream=1)
    assert rows.shape == (8, L) and rows.dtype == np.int32 and answers.dtype == np.int16
    assert (rows[:, 0] == tok.bos_id).all() and (rows[:, 1:] != tok.bos_id).all()
    fact, question, answer = FACT[task]
    for row, a, at in zip(rows, answers, needles):
        value = re.fullmatch(answer, tok.decode(row[-a:].tolist())).group(1)
        text = tok.decode(row[:-a].tolist())
        q = re.search(question, text)
        assert q, text[-200:]
        before = text[: q.start()]
        key = q.group(1) if q.groups() else ""
        found = re.findall(fact.format(key=re.escape(key)) if "{key}" in fact else fact, before)
        assert found == [value]  # the asked fact is in the row, once, with the answer's value
        pattern = fact.format(key=re.escape(key)) if "{key}" in fact else fact
        assert re.match(pattern, tok.decode(row[at:].tolist())).group(1) == value  # `needle` starts the asked fact
        names = re.findall(FACTS[task][0], before)
        assert len(names) == FACTS[task][1] and len(set(names)) == len(names)  # distinct facts


def test_rows_are_deterministic_per_seed_stream_and_index(tok_filler):
    tok, filler = tok_filler
    rows, answers, _ = task_rows(tok, filler, "vartrack", 3, L, seed=0, stream=2)
    again, again_answers, _ = task_rows(tok, filler, "vartrack", 2, L, seed=0, stream=2)
    np.testing.assert_array_equal(rows[:2], again)  # row i does not depend on the count
    np.testing.assert_array_equal(answers[:2], again_answers)
    keyed = task_rows(tok, filler, "vartrack", 2, L, seed=0, stream=2, keys=[(2,), (0,)])[0]
    np.testing.assert_array_equal(keyed, rows[[2, 0]])  # default keys are (i,); others pick other rows
    assert not np.array_equal(rows[0], rows[1])
    assert not np.array_equal(rows, task_rows(tok, filler, "vartrack", 3, L, seed=1, stream=2)[0])
    assert not np.array_equal(rows, task_rows(tok, filler, "vartrack", 3, L, seed=0, stream=3)[0])
    short = np.arange(10, 30)  # a filler shorter than the row wraps around
    assert set(task_rows(tok, short, "passkey", 1, L, seed=0, stream=0)[0][0]) >= set(short.tolist())


def test_rows_too_short_or_unknown_task_fail(tok_filler):
    tok, filler = tok_filler
    with pytest.raises(ValueError, match="rows of 64 tokens cannot hold a kv row"):
        task_rows(tok, filler, "kv", 1, 64, seed=0, stream=0)
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        task_rows(tok, filler, "nope", 1, L, seed=0, stream=0)
    with pytest.raises(ValueError, match="no filler"):
        task_rows(tok, filler[:0], "passkey", 1, L, seed=0, stream=0)
    with pytest.raises(ValueError, match="1 keys for 2 rows"):
        task_rows(tok, filler, "passkey", 2, L, seed=0, stream=0, keys=[(0, 1)])


@pytest.mark.parametrize("task,length,depth,sample,seed,answer,start", [
    ("passkey", 256, 50, 3, 0, " 46674", 22334),
    ("passkey", 512, 100, 1, 7, " 55079", 81493),
    ("kv", 256, 50, 3, 0, " 5058281", 47750),
    ("kv", 512, 100, 1, 7, " 4418825", 80264),
])
def test_eval_prompts_are_unchanged(tok_filler, task, length, depth, sample, seed, answer, start):
    """Values recorded with mcjax/eval/passkey.py before texts moved to data/tasks.py."""
    from mcjax.eval.passkey import make_prompt

    tok, _ = tok_filler
    p = make_prompt(tok, np.arange(100_000), task, length, depth, sample, seed=seed)
    assert p.answer_text == answer and int(p.tokens[1]) == start  # filler offset: the draw after texts
    assert tok.decode(p.answer.tolist()) == answer and len(p.tokens) == length
