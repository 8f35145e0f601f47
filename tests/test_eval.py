"""`mcjax eval` on a tiny MegaContext run trained here (K = 8, so superblocks are 64 tokens):
the full-context reference against the GPT's own forward, ΔNLL exactly 0 for the all-LOD0
layout, layouts valid and within budget, the oracle never worse than recency, the passkey
and boundary generators putting things where they say, every suite end to end with its
tables, plots and report, identical tables on a re-run, and bad input stopped in one line
with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st

from mcjax.cli import main
from mcjax.config import config_from_dict
from mcjax.data.corpus import read_documents
from mcjax.megacontext.layout import check_layout, entry_count

K = 8
EVAL = ["eval.horizons=[8,32]", "eval.wmax=[64,256]", "eval.rows=3", "eval.targets=[0.5,0.25]", "eval.oracle_rows=1",
        "eval.oracle_rounds=2", "eval.retrieval_lengths=[256,512]", "eval.retrieval_depths=[0,100]",
        "eval.retrieval_samples=1", "eval.full_context_max=256", "eval.boundary_samples=1",
        "eval.stability_refocuses=12", "eval.batch=4"]


def _corpus(root: Path) -> Path:
    """A few plays and stdlib files as .txt/.py on disk: both kinds of held-out documents."""
    folder = root / "corpus"
    folder.mkdir()
    for i, (_, text) in enumerate(read_documents("builtin:shakespeare", key="k", where="w")[:4]):
        (folder / f"play{i}.txt").write_text(text[:60_000])
    code = [d for d in read_documents("builtin:python", key="k", where="w", max_bytes=400_000) if len(d[1]) > 4000]
    for i, (_, text) in enumerate(code[:12]):
        (folder / f"mod{i}.py").write_text(text)
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """A MegaContext run (6 steps) and a plain GPT run (2 steps) on one held-out-aware corpus."""
    from mcjax.train.loop import train

    root = tmp_path_factory.mktemp("eval")
    source = str(_corpus(root) / "*")
    for name, steps, mc in (("mc", 6, {"enabled": True, "num_random_variants": 1, "train_wc_length": 0.5,
                                        "curriculum_start": 0.8}), ("plain", 2, {})):
        raw = tiny_config(
            root,
            dataset={"block_size": K, "context_tokens": 64, "horizon": 8, "eval_fraction": 0.25, "max_source_bytes": 0,
                     "splits": {"train": {"source": source, "output_path": str(root / "data" / "train.arrow")},
                                "val": {"source": source, "output_path": str(root / "data" / "val.arrow")}}},
            gistnet={"kind": "transformer", "layers": 1, "num_heads": 2},
            lensnet={"layers": 1, "dim": 32},
            megacontext={"recent_tokens": 16, **mc},
            runtime={"max_tokens": 4096, "refocus_interval": K, "ingest_chunk": 64},
            training={"max_steps": steps, "micro_batch_size": 8},
        )
        raw["name"] = name
        train(config_from_dict(raw), log=lambda *_: None)
    return root / "artifacts"


def _eval(capsys, run: Path, *extra: str) -> tuple[int, str]:
    code = main(["eval", "--run", str(run), *extra])
    return code, capsys.readouterr().err


def _plan(runs: Path, *overrides: str, suites=("delta", "focus", "boundary")):
    from mcjax.eval.setup import plan
    from mcjax.restore import load_run

    return plan(load_run(runs / "runs" / "mc", [*EVAL, *overrides]), suites)


# ----------------------------------------------------------------------------- held-out data


def test_held_out_documents_are_kept_out_of_every_row_and_recorded(runs):
    from mcjax.data.holdout import held_out_names
    from mcjax.eval.data import load_datasets
    from mcjax.restore import load_run

    run = load_run(runs / "runs" / "mc")
    meta = json.loads((Path(run.cfg.dataset.splits["train"].output_path).parent / "meta.json").read_text())
    names = sorted(Path(p).name for p in meta["held_out"]["narrative"] + meta["held_out"]["code"])
    folder = Path(meta["held_out"]["narrative"][0]).parent
    for kind, suffix in (("narrative", ".txt"), ("code", ".py")):
        assert len(meta["held_out"][kind]) == max(1, round(0.25 * len(list(folder.glob("*" + suffix)))))
    train = pa.ipc.open_file(run.cfg.dataset.splits["train"].output_path).read_all().column("tokens").to_pylist()
    rows = {tuple(r) for r in train}
    datasets = {d.name: d for d in load_datasets(run)}
    assert set(datasets) == {"narrative", "code"} and all(n.endswith((".txt", ".py")) for n in names)
    for d in datasets.values():  # no training row holds a window of held-out text
        window = d.stream[100:165]
        assert not any(tuple(window) == r[:65] for r in rows)
    # the choice depends on the names alone: more documents of another kind change nothing
    assert held_out_names(meta["held_out"]["code"] + ["x.txt", "y.txt"], 0.25)["code"] == held_out_names(
        meta["held_out"]["code"], 0.25)["code"]
    assert held_out_names(["a.txt"], 0.5)["narrative"] == []  # a lone document stays in training


# ----------------------------------------------------------------------------- the forward


def test_full_layout_reference_is_the_gpts_own_forward_and_its_delta_is_zero(runs):
    from mcjax.eval import policies as P
    from mcjax.eval.data import load_datasets
    from mcjax.eval.forward import Scorer
    from mcjax.model.xent import token_nll

    plan = _plan(runs)
    length = 64
    rows = load_datasets(plan.run)[0].rows(length, 3)
    scorer = Scorer(plan, length)
    full = scorer.tail_nll(rows, P.full(length // K))[:, 0]
    gpt, params = plan.run.model.gpt, plan.run.params["gpt"]
    hidden = gpt.apply({"params": params}, jnp.asarray(rows[:, :-1]))
    nll = np.asarray(token_nll(hidden.reshape(-1, hidden.shape[-1]), params["lm_head"], jnp.asarray(rows[:, 1:]).reshape(-1),
                               softcap=gpt.softcap)).reshape(3, length)
    np.testing.assert_allclose(full, nll[:, -plan.tail:], atol=2e-4)
    again = scorer.tail_nll(rows, np.stack([P.full(8), P.lod1(8, K, 4), P.full(8)]))  # another call shape
    np.testing.assert_allclose(again[:, 0], full, atol=2e-5)
    assert np.array_equal(again[:, 2], again[:, 0])  # the same layout in one call: bit for bit
    assert not np.allclose(again[:, 1], full)  # compression changes the tail's NLL


@settings(max_examples=60, deadline=None)
@given(n1=st.integers(6, 40), tail=st.integers(1, 5), head=st.integers(0, 2), frac=st.floats(0.05, 1.0),
       seed=st.integers(0, 10**6))
def test_budgeted_layouts_are_valid_and_within_budget(n1, tail, head, frac, seed):
    from mcjax.config import min_wc_entries
    from mcjax.eval import policies as P

    head = min(head, n1 - tail - 1)  # head, tail and one free block (the config's check)
    budget = int(frac * n1 * K)
    # the most compressed layout is the one the config's arithmetic counts
    assert entry_count(P.lod2(n1, K, tail, head), K) == min_wc_entries(n1, K, tail * K, 2, head * K)
    for name, lod in (("floor", P.floor(n1, K, tail, budget, head=head)), ("recency", P.recency(n1, K, tail, budget, head=head)),
                      ("random", P.random(np.random.default_rng(seed), n1, K, tail, budget, head=head))):
        if lod is None:  # only when even the most compressed layout does not fit
            assert entry_count(P.lod2(n1, K, tail, head), K) > budget, name
            continue
        check_layout(lod, K, capacity=budget, recent_tokens=tail * K, sink_tokens=head * K)
        if name == "recency":  # the raw blocks past the head are a suffix, as long as the budget allows
            raw = np.flatnonzero(lod[head:] == 0) + head
            assert np.array_equal(raw, np.arange(n1 - len(raw), n1))
            before = n1 - len(raw) - 1
            assert before < head or lod[before] != 1 or entry_count(lod, K) + K - 1 > budget
        if name == "random":
            assert entry_count(lod, K) > budget - (K - 1) or not (lod[head : n1 - tail] == 0).any()
    assert np.array_equal(P.random(np.random.default_rng(seed), n1, K, tail, budget, head=head),
                          P.random(np.random.default_rng(seed), n1, K, tail, budget, head=head))


def test_lensnet_layouts_come_from_the_runtime_engine_within_budget(runs):
    from mcjax.eval import policies as P
    from mcjax.eval.data import load_datasets

    plan = _plan(runs)
    rows = load_datasets(plan.run)[1].rows(256, 3)
    lay = P.lensnet_layouts(plan, rows, 96)
    for lod in lay:
        check_layout(lod, K, capacity=96, recent_tokens=plan.tail)
    assert np.array_equal(lay, P.lensnet_layouts(plan, rows, 96))


def test_a_protected_head_stays_raw_in_every_budgeted_policy(runs):
    from mcjax.eval import policies as P
    from mcjax.eval.data import load_datasets

    plan = _plan(runs, f"megacontext.sink_tokens={K}")
    assert plan.head == K and plan.least_entries(256) > _plan(runs).least_entries(256)
    rows = load_datasets(plan.run)[1].rows(256, 3)
    for lay in (P.lensnet_layouts(plan, rows, 96), P.scored_fill(plan, rows, 96, "lensnet")):
        for lod in lay:
            check_layout(lod, K, capacity=96, recent_tokens=plan.tail, sink_tokens=K)


# ----------------------------------------------------------------------------- generators


@pytest.mark.parametrize("task", ["passkey", "kv"])
def test_passkey_prompts_put_the_needle_where_they_say(runs, task):
    from mcjax.eval.passkey import make_prompt
    from mcjax.eval.data import filler_tokens, load_datasets
    from mcjax.restore import load_run

    run = load_run(runs / "runs" / "mc")
    tok = run.tokenizer
    filler = filler_tokens(load_datasets(run), tok.bos_id)
    for depth in (0, 50, 100):
        p = make_prompt(tok, filler, task, 512, depth, 0)
        assert len(p.tokens) == 512 and p.tokens[0] == tok.bos_id
        key = p.answer_text.strip()
        assert key.isdigit() and tok.decode(p.answer.tolist()) == p.answer_text
        assert key in tok.decode(p.tokens[p.needle_start : p.needle_start + p.needle_tokens].tolist())
        assert key not in tok.decode(p.tokens[: p.needle_start].tolist() + p.tokens[p.needle_start + p.needle_tokens :].tolist())
        room = 512 - 1 - p.needle_tokens - p.question_tokens  # filler tokens
        assert p.needle_start == 1 + round(depth / 100 * room)
        q = make_prompt(tok, filler, task, 512, depth, 0)
        assert np.array_equal(p.tokens, q.tokens)  # deterministic
    assert not np.array_equal(make_prompt(tok, filler, task, 512, 50, 0).tokens, make_prompt(tok, filler, task, 512, 50, 1).tokens)
    last = make_prompt(tok, filler, task, 512, 100, 0)
    assert last.needle_start + last.needle_tokens + last.question_tokens == 512  # depth 100: right before the question


def test_boundary_rows_put_the_critical_token_at_each_offset(runs):
    from mcjax.eval.boundary import make_row
    from mcjax.eval.data import filler_tokens, load_datasets

    plan = _plan(runs)
    tok = plan.run.tokenizer
    filler = filler_tokens(load_datasets(plan.run), tok.bos_id)
    length = plan.boundary_length()
    assert length == 96  # max(W_max 64, one superblock 64 + tail 32)
    block = 4  # 12 blocks, the last 4 the tail: the middle of the one superblock before it
    for offset in range(K):
        row, n_ans, touched = make_row(plan, filler, length, offset, 0)
        assert len(row) == length + 1
        c = block * K + offset  # the number's first token, the same ids as the answer at the end
        assert np.array_equal(row[c : c + n_ans], row[-n_ans:])
        assert tok.decode(row[-n_ans:].tolist()).strip().isdigit()
        assert block in touched and max(touched) < length // K - plan.tail // K  # the definition lies before the tail


# ----------------------------------------------------------------------------- end to end


def test_eval_all_writes_tables_plots_and_an_honest_report(runs, capsys):
    run = runs / "runs" / "mc"
    code, err = _eval(capsys, run, *EVAL)
    assert code == 0, err
    out = runs / "eval" / "mc"
    for name in ("eval_sweep", "focus", "retrieval", "boundary", "stability", "residency"):
        assert (out / f"{name}.parquet").is_file(), name
    for png in ("delta_scatter", "focus", "retrieval_full", "retrieval_megacontext", "retrieval_recency", "boundary",
                "stability", "residency"):
        assert (out / f"{png}.png").stat().st_size > 1000, png
    assert (runs / "deltas" / "mc_eval_sweep.parquet").is_file()
    sweep = pq.read_table(out / "eval_sweep.parquet")
    assert {"w_max", "dataset", "compression_ratio", "policy", "horizon", "delta_nll", "n_tokens"} <= set(sweep.column_names)
    rows = sweep.to_pylist()
    assert {r["policy"] for r in rows} == {"lod1", "lod2", "random", "lensnet"}
    assert {r["dataset"] for r in rows} == {"narrative", "code"} and {r["horizon"] for r in rows} == {8, 32}
    assert all(abs(r["delta_nll"] - (r["nll"] - r["nll_full"])) < 1e-9 for r in rows)
    assert {r["compression_ratio"] for r in rows if r["policy"] == "lod1"} == {8.0}
    focus = pq.read_table(out / "focus.parquet").to_pylist()
    assert {r["policy"] for r in focus} == {"lensnet", "recency", "random", "attention", "lensnet_dropped",
                                            "recency_dropped", "oracle"}
    assert all(r["entries"] <= r["budget"] for r in focus)  # equal budget, the rival's fill included
    for r in (r for r in focus if r["oracle_sample"] and r["horizon"] == 32 and r["policy"] == "oracle"):
        same = [x for x in focus if (x["w_max"], x["dataset"], x["row"], x["horizon"]) == (r["w_max"], r["dataset"], r["row"], 32)
                and not x["policy"].endswith("_dropped")]  # the same layouts read with the gists left out
        assert r["delta_nll"] <= min(x["delta_nll"] for x in same) + 1e-9  # never worse than recency (or any policy)
        assert r["entries"] <= r["budget"]
    retrieval = pq.read_table(out / "retrieval.parquet").to_pylist()
    assert {(r["method"], r["length"]) for r in retrieval} == {("full", 256), ("megacontext", 256), ("megacontext", 512),
                                                               ("recency", 256), ("recency", 512)}
    assert all(r["answer_nll"] > 0 for r in retrieval)
    report = (out / "report.md").read_text()
    accept = json.loads((out / "report.json").read_text())["acceptance"]
    assert len(accept) == 8 and all(a["status"] in ("PASS", "FAIL") for a in accept)
    assert [a["status"] for a in accept if "W_max = 8k" in a["criterion"]] == ["FAIL", "FAIL"]  # measured at 64, not 8k
    assert next(a for a in accept if a["criterion"].startswith("swap rate"))["status"] == "FAIL"  # 12 refocuses, not 1,000
    assert "## POC acceptance" in report and "![ΔNLL vs compression](delta_scatter.png)" in report
    assert "full context at 512 tokens: above eval.full_context_max (256)" in report
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    keys = {k for m in metrics for k in m}
    assert any(k.startswith("eval/delta/delta_nll/") for k in keys) and "eval/stability/swap_rate" in keys
    stability = pq.read_table(out / "stability.parquet").to_pylist()
    assert sum(r["phase"] == "decode" for r in stability) == 12

    # the same seed, the same tables (timings aside); another checkpoint's results would be cleared
    before = {n: pq.read_table(out / f"{n}.parquet") for n in ("eval_sweep", "focus", "retrieval", "boundary")}
    code, err = _eval(capsys, run, *EVAL, "--suite", "delta,focus,retrieval,boundary")
    assert code == 0, err
    for n, t in before.items():
        assert pq.read_table(out / f"{n}.parquet").equals(t), n
    assert (out / "stability.parquet").is_file()  # kept: the same checkpoint


@pytest.mark.parametrize("args, message", [
    (["--suite", "speed"], "--suite speed: unknown suite; choose from delta, focus, retrieval, boundary, stability or all"),
    (["eval.wmax=[20]"], "eval.wmax: 20 must be a multiple of dataset.block_size (8) of at least the protected tail (32 = max"),
    (["--data", "nothing=/no/such/*.txt"], "--data nothing: glob '/no/such/*.txt' matches no .txt or .py files"),
    (["eval.horizons=[]"], "eval.horizons: must be a non-empty list of positive token counts, got []"),
    (["eval.wmax=[100000]"], "fewer than the 100,001 one row of 100,000 needs"),
])
def test_bad_input_is_one_line_and_writes_nothing(runs, capsys, tmp_path, args, message):
    code, err = _eval(capsys, runs / "runs" / "mc", *EVAL, *args)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (runs / "eval" / "mc" / "config.yaml").exists() or _untouched(runs)


def _untouched(runs: Path) -> bool:
    """After the end-to-end test the eval directory exists; a refused run must not have changed it."""
    return yaml.safe_load((runs / "eval" / "mc" / "config.yaml").read_text())["eval"]["rows"] == 3


def test_a_plain_run_takes_retrieval_only(runs, capsys):
    code, err = _eval(capsys, runs / "runs" / "plain", "--suite", "delta", *EVAL)
    assert code == 2 and "trained a plain GPT" in err and "--suite retrieval" in err
    assert not (runs / "eval" / "plain").exists()
    code, err = _eval(capsys, runs / "runs" / "plain", "--suite", "retrieval", *EVAL)
    assert code == 0, err
    methods = {r["method"] for r in pq.read_table(runs / "eval" / "plain" / "retrieval.parquet").to_pylist()}
    assert methods == {"full", "recency"}
    code, err = _eval(capsys, runs / "runs" / "plain", "--suite", "retrieval", *EVAL, "eval.retrieval_methods=[recency]")
    assert code == 0, err
    rows = pq.read_table(runs / "eval" / "plain" / "retrieval.parquet").to_pylist()
    assert {r["method"] for r in rows} == {"recency"} and {r["length"] for r in rows} == {256, 512}
    assert "full: not in eval.retrieval_methods" in (runs / "eval" / "plain" / "report.md").read_text()


def test_acceptance_judges_only_what_was_measured_at_its_scale():
    from mcjax.eval.report import acceptance

    def delta(w, v):
        return [{"w_max": w, "horizon": 128, "dataset": "code", "policy": p, "delta_nll": v, "compression_ratio": 32.0}
                for p in ("lod1", "lod2")]

    def status(suites, trained):
        return {a["criterion"]: (a["status"], a["value"]) for a in acceptance(suites, trained)}

    suites = {"delta": {"summary": {"rows": delta(2048, 0.05) + delta(8192, -0.4)}}}
    got = status(suites, trained=2048)  # 8,192 is beyond the trained length: read at 2,048, too small for "8k"
    assert got["ΔNLL@128 at W_max = 8k, 32× (code)"] == ("FAIL", 0.05)
    assert got["ΔNLL@128 at 1024× (LOD2 gists, worst dataset)"] == ("PASS", 0.05)
    assert got["swap rate over a 1,000-refocus run"][0] == "NOT RUN"
    assert status(suites, trained=8192)["ΔNLL@128 at W_max = 8k, 32× (code)"] == ("PASS", -0.4)
    far = status({"delta": {"summary": {"rows": delta(8192, 0.01)}}}, trained=2048)
    assert far["ΔNLL@128 at 1024× (LOD2 gists, worst dataset)"][0] == "FAIL"  # only beyond the trained length
    st = {"refocuses": 1000, "w_max": 2048, "swap_rate": 0.3, "mean_residency_at_swap": float("nan"), "swaps": 0,
          "token_budget_utilization": 0.85, "latency_overhead": 0.05, "latency_ms_median": 1.05, "plain_latency_ms_median": 1.0}
    got = status({"stability": {"summary": st}}, trained=2048)
    assert got["swap rate over a 1,000-refocus run"] == ("FAIL", 0.3)
    assert got["mean residency (refocuses at a level before a swap)"] == ("PASS", float("inf"))  # no block ever swapped
    assert got["token budget utilization"][0] == got["latency overhead vs the plain engine"][0] == "PASS"
    short = status({"stability": {"summary": {**st, "refocuses": 999, "swap_rate": 0.1}}}, trained=2048)
    assert short["swap rate over a 1,000-refocus run"] == ("FAIL", 0.1)
