"""`mcjax generate` and `mcjax infer` on tiny runs trained here: text from the run's tokenizer,
reproducible with a seed, runtime telemetry and traces written, and bad input stopped with
one line before anything is written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_config

from mcjax.cli import main
from mcjax.config import config_from_dict

RUNTIME = ["megacontext.wc_capacity=256", "runtime.max_tokens=8192", "runtime.lod_strip_every=2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, prepared_data) -> Path:
    """A MegaContext run and a plain GPT run of 4 steps each (artifacts/runs/{mc,plain})."""
    from mcjax.train.loop import train

    root = tmp_path_factory.mktemp("runs")
    data = tiny_config(prepared_data)["dataset"]
    for name, mc in (("plain", {}), ("mc", {"enabled": True, "num_random_variants": 1, "train_wc_length": 1.0,
                                             "curriculum_start": 1.0})):
        raw = tiny_config(root, megacontext={"recent_tokens": 32, **mc}, training={"max_steps": 4, "micro_batch_size": 8})
        raw.update(name=name, dataset=data)
        train(config_from_dict(raw), log=lambda *_: None)
    return root / "artifacts"


def _generate(capsys, run: Path, *extra: str) -> tuple[int, str, str]:
    code = main(["generate", "--run", str(run), *extra])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_streams_text_from_the_runs_tokenizer(runs, capsys):
    run = runs / "runs" / "mc"
    assert (run / "tokenizer.json").is_file()  # the run carries its tokenizer
    args = ["--prompt", "To be, or not to be", "--max-new-tokens", "40", "--temperature", "1.0", *RUNTIME]
    code, text, err = _generate(capsys, run, *args, "--seed", "3")
    assert code == 0, err
    assert "run mc step 4, mc engine" in err
    assert len(text.strip()) > 10 and "\ufffd" not in text
    code, again, _ = _generate(capsys, run, *args, "--seed", "3")
    assert code == 0 and again == text  # the same seed, the same text
    code, other, _ = _generate(capsys, run, *args, "--seed", "4")
    assert code == 0 and other != text


def test_generate_with_the_plain_engine_and_on_a_plain_run(runs, capsys, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Now is the winter of our discontent")
    for run, engine in (("plain", "auto"), ("mc", "plain")):
        code, text, err = _generate(capsys, runs / "runs" / run, "--prompt-file", str(prompt), "--engine", engine,
                                    "--max-new-tokens", "20", "--temperature", "0")
        assert code == 0, err
        assert "plain engine" in err and text.strip()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--engine", "mc"], "trained a plain GPT (megacontext.enabled is false"),
        (["--engine", "turbo"], "unknown engine 'turbo': choose mc or plain"),
        (["--temperature", "-1"], "--temperature -1.0: must be ≥ 0 (0 = greedy)"),
        (["--top-k", "-2"], "--top-k -2: must be ≥ 0 (0 = the whole vocabulary)"),
        (["--step", "3"], "no checkpoint at step 3"),
        (["base_model.depth=3"], "param ['blocks']['w_fc'] is [2, 64, 256] in the checkpoint but [3, 64, 256]"),
        (["runtime.refocus_interval=40"], "runtime.refocus_interval: must be a positive multiple of dataset.block_size (32)"),
        (["allocator.policy=best"], "allocator.policy: must be one of greedy, stochastic"),
    ],
)
def test_generate_rejects_bad_input_in_one_line(runs, capsys, args, message):
    code, text, err = _generate(capsys, runs / "runs" / "plain", "--prompt", "hi", *args)
    assert code == 2 and text == ""
    assert err.count("\n") == 1 and message in err, err


def test_generate_rejects_a_prompt_longer_than_max_tokens_and_missing_runs(runs, capsys, tmp_path):
    code, _, err = _generate(capsys, runs / "runs" / "mc", "--prompt", "word " * 3000, *RUNTIME[:1], "runtime.max_tokens=2048")
    assert code == 2 and "exceed runtime.max_tokens (2,048" in err and err.count("\n") == 1
    code, _, err = _generate(capsys, runs / "runs" / "mc", "--prompt", "hi", "megacontext.wc_capacity=64")
    assert code == 2 and "smaller than the protected tail (32) plus one block (32)" in err
    code, _, err = _generate(capsys, tmp_path / "nowhere", "--prompt", "hi")
    assert code == 2 and "no config.yaml" in err
    empty = tmp_path / "runs" / "copy"
    shutil.copytree(runs / "runs" / "mc", empty)
    code, _, err = _generate(capsys, empty, "--prompt", "hi")
    assert code == 2 and "no checkpoints in" in err


def test_infer_writes_runtime_telemetry_traces_and_plots(runs, capsys, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    text = (Path(__file__).parent / "test_runtime.py").read_text()[:15_000]  # ≈ 1 token a character (V = 300): within 16,384
    (docs / "a.py").write_text(text)
    (docs / "b.txt").write_text(text[: len(text) // 3])
    run = runs / "runs" / "mc"
    code = main(["infer", "--run", str(run), "--input", str(docs / "*.py"), "--input", str(docs / "b.txt"),
                 "--generate", "32", "--batch", "2",
                 *RUNTIME, "runtime.ingest_chunk=512", "runtime.max_tokens=16384"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "report card: mc infer (mc)" in out.out
    records = [json.loads(line) for line in (run / "infer" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in records if "runtime/tokens" in r]  # one per refocus (the others: LOD strips)
    decode = [r for r in rows if "runtime/latency_ms" in r]
    ingest = [r for r in rows if "runtime/ingest_ms" in r]
    assert len(decode) == 1 and len(ingest) >= 3
    for key in ("runtime/swap_rate", "runtime/num_expands", "runtime/num_collapses", "runtime/mean_residency",
                "runtime/token_budget_utilization", "runtime/active_tokens", "runtime/budget_limit", "runtime/rebuilt"):
        assert key in decode[0], key
    assert decode[0]["runtime/budget_limit"] == 256 and 0 < decode[0]["runtime/token_budget_utilization"] <= 1
    assert "hist" in decode[0]["runtime/residency"]
    traces = [json.loads(line) for line in (runs / "traces" / "mc.jsonl").read_text().splitlines()]
    assert {t["stream"] for t in traces} == {0, 1} and len(traces) == 2 * len(rows)
    last = traces[-2]
    assert set(last) >= {"step", "expanded", "collapsed", "working_context", "latency_ms"}
    wc = last["working_context"]
    blocks = sorted(wc["LOD0"] + wc["LOD1"] + [b for s in wc["LOD2"] for b in range(32 * s, 32 * s + 32)])
    assert blocks == list(range(len(blocks))) and len(wc["LOD1"]) + len(wc["LOD2"]) > 0  # compressed, no gap
    assert any(t["collapsed"] for t in traces)
    assert "refocus" in (run / "infer" / "lod_strips.txt").read_text()
    gens = [json.loads(line) for line in (run / "infer" / "generations.jsonl").read_text().splitlines()]
    assert len(gens) == 2 and all(g["text"] for g in gens)
    summary = json.loads((run / "infer" / "summary.json").read_text())
    assert summary["documents"] == 2 and summary["runtime/refocuses"] == len(rows)
    for png in ("focus.png", "latency.png", "lod_timeline.png"):
        assert (run / "infer" / "plots" / png).stat().st_size > 1000


def test_infer_writes_nothing_on_bad_input(runs, capsys, tmp_path):
    run = tmp_path / "runs" / "mc"
    shutil.copytree(runs / "runs" / "mc", run)
    shutil.rmtree(run / "infer", ignore_errors=True)
    (tmp_path / "checkpoints").symlink_to(runs / "checkpoints")
    long = tmp_path / "long.txt"
    long.write_text("the quick brown fox " * 2000)
    for args, message in (
        (["--input", str(tmp_path / "none*.txt")], "no file matches"),
        (["--input", str(long), "runtime.max_tokens=1024", *RUNTIME[:1]], "exceed runtime.max_tokens (1,024"),
        (["--input", str(long), "--batch", "0"], "--batch 0: must be ≥ 1"),
    ):
        assert main(["infer", "--run", str(run), *args]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (run / "infer").exists() and not (tmp_path / "traces").exists()
    assert np.all([p.name != "infer" for p in run.iterdir()])
