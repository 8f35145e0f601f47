"""Runtime engine benchmark: per-token decode latency of the MegaContext engine (refocus every
R tokens) against the plain GPT with a W_max-entry sliding-window KV cache, ingest speed,
and memory at a long history. Random weights (speed does not depend on them) and random
tokens; every figure is from one process on one device.

    PYTHONPATH=. python bench/runtime.py --config configs/mc_d12.yaml \\
        megacontext.wc_capacity=8192 runtime.max_tokens=1048576 \\
        --history 65536 --blocks 24 --batch 1 8 --lens zero random --memory 1048576

Per batch size B and engine:
  ingest   the history (B streams of --history tokens) in chunks of runtime.ingest_chunk,
           after a warm-up that compiled every program; tokens/s = B·history / wall time
           (MC: tree + LensNet + allocator per chunk, no base model; plain: the GPT over
           every token, sliding window). Then the first sync (MC: a whole-WC prefill) alone.
  decode   2 warm-up blocks, then --blocks blocks of R tokens, each timed between two
           device synchronisations (sync + R decode steps + gists + LensNet + allocator
           for MC; R decode steps for plain). Per-token latency = block ms / R: median, p99.
           MC also reports how many cache slots each block's sync rebuilt and the swap rate.
LensNet: "zero" is a fresh one (scores 0: only the budget's forced collapses move blocks);
"random" draws its output layer so scores spread over (−1, 1): edits anywhere, every
refocus — the worst case for cache rebuilds.
--memory N: one stream of N tokens (MC engine, runtime.max_tokens ≥ N): ingest speed at
that length and the device's peak memory, beside the engine state's and params' bytes. The
peak is the process's: with decode benchmarks before it, theirs too (`--engines` with no
names runs only this).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

from mcjax.config import collapse_margin, load_config
from mcjax.restore import LoadedRun
from mcjax.runtime import Engine, Sampling
from mcjax.runtime.monitor import Monitor
from mcjax.train.mc_runner import timed_ms
from mcjax.train.memory import device_memory
from mcjax.train.setup import build_parts


def fake_run(cfg, lens: str) -> LoadedRun:
    parts = build_parts(cfg)
    params = parts.fresh().model_params()
    if lens == "random":
        w = params["lensnet"]["w_out"]
        params["lensnet"]["w_out"] = 2.0 * jax.random.normal(jax.random.key(1), w.shape) / w.shape[0] ** 0.5
    return LoadedRun(cfg=cfg, run_dir=Path("."), tokenizer=None, model=parts.model, params=params, step=0)


def nbytes(tree) -> float:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)) / 1e9


HBM_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12}  # the SXM parts' peak memory bandwidth


def decode_bound(eng: Engine, batch: int) -> dict:
    """What one decode step must read from memory at least — every weight of the base once (the
    input embedding table only where a separate head exists: then one row of it) and every
    stream's whole W_max-slot KV cache — and the time that takes at the device's peak
    bandwidth. A step decodes one token per stream."""
    gpt, p = eng.rt.gpt, eng.params["gpt"]
    weights = nbytes(p) * 1e9
    if "lm_head" in p:  # untied: the head is read whole, the input table one row per stream
        table = p["wte"] if "wte" in p else p["embed"]
        weights -= table.size * table.dtype.itemsize
    itemsize = jax.numpy.dtype(gpt.dtype).itemsize
    cache = batch * gpt.depth * 2 * gpt.kv_heads * eng.cfg.wc_capacity * gpt.head_dim * itemsize
    kind = jax.devices()[0].device_kind
    peak = next((v for name, v in HBM_BYTES_PER_S.items() if name in kind), float("nan"))
    return {"step_weights_gb": weights / 1e9, "step_cache_gb": cache / 1e9,
            "hbm_bound_ms_per_step": (weights + cache) / peak * 1e3}


def measure(run: LoadedRun, kind: str, batch: int, history: int, blocks: int, trace: str = "", hlo: str = "") -> dict:
    rng = np.random.default_rng(0)
    vocab = run.cfg.dataset.vocab_size
    eng = Engine(run, kind=kind, batch=batch)
    r = eng.block
    # warm-up: compile ingest (the chunk shape), sync (every rebuild size) and generate
    eng.ingest([rng.integers(0, vocab, eng.chunk + 1).tolist() for _ in range(batch)])
    for _ in eng.generate(2 * r, Sampling(temperature=1.0)):
        pass
    eng.sync()
    eng.reset()
    streams = [rng.integers(0, vocab, history).tolist() for _ in range(batch)]
    t0 = time.perf_counter()
    eng.ingest(streams)
    jax.block_until_ready(eng.state)
    ingest_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    eng.sync()
    jax.block_until_ready(eng.state)
    sync_ms = (time.perf_counter() - t0) * 1e3
    for _ in eng.generate(2 * r, Sampling(temperature=1.0)):
        pass
    eng.monitor = Monitor(k=run.cfg.dataset.block_size, w_max=run.cfg.wc_capacity)
    for _ in eng.generate(blocks * r, Sampling(temperature=1.0)):
        pass
    rows = eng.monitor.rows
    ms = np.asarray([row["runtime/latency_ms"] for row in rows])
    out = {
        "engine": kind, "batch": batch, "history": history, "W_max": run.cfg.wc_capacity, "R": r,
        "ingest_tok_per_sec": batch * history / ingest_s, "first_sync_ms": sync_ms,
        "blocks": len(ms), "block_ms_median": float(np.median(ms)), "block_ms_p99": float(np.percentile(ms, 99)),
        "token_ms_median": float(np.median(ms)) / r, "token_ms_p99": float(np.percentile(ms, 99)) / r,
        "state_gb": nbytes(eng.state), "params_gb": nbytes(eng.params), **device_memory(), **decode_bound(eng, batch),
    }
    out["bound_fraction"] = out["hbm_bound_ms_per_step"] / out["token_ms_median"]  # per step: B tokens
    if trace:
        profile(eng, f"{trace}/{kind}_b{batch}")
    if hlo:  # the decode block's program as XLA compiled it (fusions, copies, loops)
        text = eng._generate.lower(eng.params, eng.state, Sampling(temperature=1.0)).compile().as_text()
        Path(hlo).mkdir(parents=True, exist_ok=True)
        Path(f"{hlo}/{kind}_b{batch}_generate.txt").write_text(text)
    if kind == "mc":
        out.update(breakdown(eng))
        rebuilt = [row["runtime/rebuilt"] for row in rows]
        out.update({
            "rebuilt_mean": float(np.mean(rebuilt)), "rebuilt_sizes": sorted({int(x) for x in rebuilt}),
            "swap_rate_mean": float(np.mean([row["runtime/swap_rate"] for row in rows])),
            "active_tokens_mean": float(np.mean([row["runtime/active_tokens"] for row in rows])),
            "prefill_sizes": list(eng.rt.sizes),
        })
    return out


def profile(eng: Engine, out: str) -> None:
    """Per-kernel GPU time (bench/gpt_throughput.py's summary) of 3 decode blocks, and for MC
    of each part of `parts` (3 calls each)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from gpt_throughput import summarize_trace

    def traced(name, run):
        run()
        jax.profiler.start_trace(f"{out}/{name}")
        for _ in range(3):
            run()
        jax.profiler.stop_trace()
        print(f"== {eng.kind}: {name}, per-kernel ms per call", flush=True)
        summarize_trace(f"{out}/{name}", steps=3, top=25)

    traced("block", lambda: list(eng.generate(eng.block, Sampling(temperature=1.0))))
    if eng.kind == "mc":
        for name, (fn, args) in parts(eng).items():
            traced(name, lambda fn=fn, args=args: jax.block_until_ready(fn(*args)))


def parts(eng: Engine) -> dict:
    """The parts of one MC decode block jitted alone on the current (synced) state, not donated."""
    rt, params, r = eng.rt, eng.params, eng.block
    eng.sync()
    state = eng.state
    wc = jax.jit(lambda p, s: rt.working_context(p, s, rt.w))(params, state)
    active = jax.numpy.ones(state.step.shape, bool)
    parts = {
        "decode": (jax.jit(lambda p, s: rt.decode(p, s, r, Sampling(temperature=1.0))), (params, state)),
        "pending": (jax.jit(rt.pending), (params, state)),
        "refocus": (jax.jit(lambda p, s: rt._refocus(p, s, rt.w, active)), (params, state)),
        "lensnet": (jax.jit(lambda p, w: rt.lensnet.apply({"params": p["lensnet"]}, w)), (params, wc)),
        "assemble": (jax.jit(lambda p, s: rt.working_context(p, s, rt.w)), (params, state)),
    }
    for size in rt.sizes[1:]:  # each rebuild, as if every slot from W − size on had changed
        parts[f"rebuild_{size}"] = (jax.jit(lambda p, s, size=size: rt.rebuild(p, s, size)), (params, state))
    return parts


def breakdown(eng: Engine) -> dict:
    """Each of `parts` timed by `timed_ms` (4 calls between two synchronisations, median of 3 runs)."""
    return {f"part_{name}_ms": timed_ms(fn, *args) for name, (fn, args) in parts(eng).items()}


def memory(run: LoadedRun, tokens: int) -> dict:
    eng = Engine(run, kind="mc", batch=1)
    rng = np.random.default_rng(1)
    eng.ingest([rng.integers(0, run.cfg.dataset.vocab_size, eng.chunk + 1).tolist()])  # compile
    eng.reset()
    stream = rng.integers(0, run.cfg.dataset.vocab_size, tokens - 2 * eng.block).tolist()  # + 2 blocks decoded
    t0 = time.perf_counter()
    eng.ingest([stream])
    jax.block_until_ready(eng.state)
    ingest_s = time.perf_counter() - t0
    for _ in eng.generate(2 * eng.block, Sampling(temperature=1.0)):
        pass
    return {"memory_history": tokens, "ingest_tok_per_sec": len(stream) / ingest_s, "state_gb": nbytes(eng.state),
            "params_gb": nbytes(eng.params), **device_memory()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--history", type=int, default=65536)
    p.add_argument("--blocks", type=int, default=24, help="timed decode blocks of R tokens per measurement")
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--lens", nargs="+", default=["zero"], choices=["zero", "random"])
    p.add_argument("--engines", nargs="*", default=["mc", "plain"], choices=["mc", "plain"],
                   help="decode benchmarks to run (none: only --memory)")
    p.add_argument("--memory", type=int, default=0, help="also measure one stream of this many tokens")
    p.add_argument("--json", default="", help="append every result here (JSON lines)")
    p.add_argument("--profile", default="", help="also trace 3 decode blocks per measurement into this folder")
    p.add_argument("--hlo", default="", help="also write each engine's compiled decode-block program (HLO text) here")
    argv = sys.argv[1:] if argv is None else argv
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]  # key.path=value, anywhere
    args = p.parse_args([a for a in argv if a not in overrides])
    cfg = load_config(args.config, overrides)
    print(f"{jax.devices()[0].device_kind}: {cfg.name} W_max {cfg.wc_capacity}, R {cfg.runtime.refocus_interval}, "
          f"prefill_buckets {cfg.runtime.prefill_buckets}, collapse_margin {collapse_margin(cfg)}", flush=True)
    results = []
    for lens in args.lens:
        run = fake_run(cfg, lens)
        for batch in args.batch:
            for kind in args.engines:
                if kind == "plain" and lens != args.lens[0]:
                    continue  # the plain engine has no LensNet
                res = {"lens": lens if kind == "mc" else "-", **measure(run, kind, batch, args.history, args.blocks, args.profile, args.hlo)}
                results.append(res)
                print(json.dumps(res), flush=True)
        del run  # its params: the memory figure below holds one engine's
    if args.memory:
        res = memory(fake_run(cfg, args.lens[0]), args.memory)
        results.append(res)
        print(json.dumps(res), flush=True)
    for b in args.batch:
        plain = [x for x in results if x.get("engine") == "plain" and x["batch"] == b]
        for x in results:
            if plain and x.get("engine") == "mc" and x["batch"] == b:
                print(f"batch {b}, plain: {plain[0]['token_ms_median']:.3f} ms per step, the HBM bound "
                      f"{plain[0]['hbm_bound_ms_per_step']:.3f} ({plain[0]['bound_fraction']:.0%} of it reached)", flush=True)
                print(f"batch {b}, LensNet {x['lens']}: MC/plain per-token latency median "
                      f"{x['token_ms_median'] / plain[0]['token_ms_median']:.3f}, p99 "
                      f"{x['token_ms_p99'] / plain[0]['token_ms_p99']:.3f}", flush=True)
    if args.json:
        with open(args.json, "a") as f:
            f.writelines(json.dumps(x) + "\n" for x in results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
