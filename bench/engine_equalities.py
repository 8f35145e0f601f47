"""The runtime engine's exactness checks (tests/test_runtime.py, f32 on CPU) at a real model's size
in the device's compute dtype — bf16 on a GPU — as numbers: how far each cached path drifts from
one forward over the same entries, beside how far that forward itself drifts from f32. Random
weights (every matrix drawn afresh: `randomized`) and random tokens; one process, one device.

    PYTHONPATH=. python bench/engine_equalities.py --config configs/mc_d12.yaml megacontext.wc_capacity=2048 \\
        --json out.jsonl

Checks (each row: max |Δ log p| of the scored tokens against the same-dtype forward and against
the f32 forward, the same-dtype forward's own max |Δ| against f32, and the share of positions
whose greedy token equals the f32 forward's):
  fits      the MC engine (LensNet zero: nothing is compressed) and the plain engine, while the
            history fits W_max: a prompt, then --blocks blocks teacher-forced with `score`, against
            the GPT's forward over the raw tokens;
  rebuild   the MC engine on a stream of 1.5 × W_max with a random LensNet (edits at every refocus):
            after each block the synced cache's next-token logits against a fresh prefill of the
            assembled working context (K/V rows too: max |Δ| relative to the rows' max |x|);
  batched   4 streams of different lengths (two beyond W_max) decoded together against each alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runtime import fake_run  # noqa: E402  (bench/runtime.py)

from mcjax.config import load_config  # noqa: E402
from mcjax.megacontext.layout import rope_positions  # noqa: E402
from mcjax.model import kv_cache as kc  # noqa: E402
from mcjax.model.llama import merge_lora  # noqa: E402
from mcjax.runtime import Engine  # noqa: E402
from mcjax.runtime.engine import _compute_params as cast  # noqa: E402  (float leaves in a dtype, as the engine casts)


def randomized(run):
    """Every matrix drawn afresh (normal, std 1/√fan-in): a fresh init's zero projections make
    identity layers and uniform logits, which every path computes exactly and would hide drift."""
    leaves, tree = jax.tree.flatten(run.params)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    leaves = [jax.random.normal(k, x.shape, x.dtype) / np.sqrt(x.shape[-2]) if x.ndim >= 2 else x
              for x, k in zip(leaves, keys)]
    return dataclasses.replace(run, params=jax.tree.unflatten(tree, leaves))


def base_params(run):
    """The base's own (unfused) params with LoRA folded in, as the engine folds it (for `kv_cache`)."""
    gpt, p = run.model.gpt, run.params["gpt"]
    return merge_lora(gpt, p) if getattr(gpt, "lora_spec", None) is not None else p


def forward_logp(gpt, params, tokens: np.ndarray, dtype):
    """The GPT over tokens [B, L] in `dtype`: (log p of tokens[:, 1:] f32 [B, L-1], argmax int32 [B, L-1])."""
    model = gpt.clone(dtype=dtype)

    @jax.jit
    def run(p, t):
        logits = kc.logits(model, p, model.apply({"params": p}, t))[:, :-1]
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        return jnp.take_along_axis(logp, t[:, 1:, None], -1)[..., 0], jnp.argmax(logits, -1)

    return jax.device_get(run(cast(params, dtype), jnp.asarray(tokens)))


def scored(eng: Engine, prompts, tokens: np.ndarray):
    """Ingest `prompts`, then score tokens [B, n·R] block by block -> (log p, greedy) [B, n·R]."""
    eng.reset()
    eng.ingest(prompts)
    r = eng.block
    out = [eng.score(tokens[:, i : i + r]) for i in range(0, tokens.shape[1], r)]
    return np.concatenate([o[0] for o in out], 1), np.concatenate([o[1] for o in out], 1)


def max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def row(check: str, engine: str, got, same, f32, greedy=None, **extra) -> dict:
    """max |Δ| of got against the same-dtype and the f32 reference; greedy agreement with f32."""
    out = {"check": check, "engine": engine, "max_abs_vs_same_dtype": max_abs(got, same), "max_abs_vs_f32": max_abs(got, f32),
           "same_dtype_vs_f32": max_abs(same, f32), "values": int(np.size(got)), **extra}
    if greedy is not None:
        out["greedy_equal_f32"] = float(np.mean(greedy[0] == greedy[1]))
    return out


def check_fits(run, blocks: int, rng) -> list[dict]:
    run = dataclasses.replace(run, params=dict(run.params, lensnet=jax.tree.map(jnp.zeros_like, run.params["lensnet"])))
    w, vocab, gpt = run.cfg.wc_capacity, run.cfg.dataset.vocab_size, run.model.gpt
    eng_mc = Engine(run, kind="mc")
    r = eng_mc.block
    prompt_len = w - (blocks + 1) * r
    seq = rng.integers(0, vocab, (1, prompt_len + blocks * r)).astype(np.int32)
    refs = {dt: forward_logp(gpt, run.params["gpt"], seq, dt) for dt in (gpt.dtype, jnp.float32)}
    want = lambda dt, i: refs[dt][i][:, prompt_len - 1 :]  # noqa: E731  (predicting the scored tokens)
    out = []
    for kind, eng in (("mc", eng_mc), ("plain", Engine(run, kind="plain"))):
        logp, greedy = scored(eng, [seq[0, :prompt_len].tolist()], seq[:, prompt_len:])
        out.append(row("fits", kind, logp, want(gpt.dtype, 0), want(jnp.float32, 0), (greedy, want(jnp.float32, 1)),
                       prompt=prompt_len, compressed=bool((np.asarray(eng.state.block_lod) > 0).any()) if kind == "mc" else False))
    return out


def check_rebuild(run, blocks: int, rng) -> list[dict]:
    w, vocab, gpt = run.cfg.wc_capacity, run.cfg.dataset.vocab_size, run.model.gpt
    eng = Engine(run, kind="mc")
    eng.ingest([rng.integers(0, vocab, 3 * w // 2).tolist()])
    refs = {}  # per dtype: the base, its params cast once, its prefill jitted once
    for dt in (gpt.dtype, jnp.float32):
        model = gpt.clone(dtype=dt)
        refs[dt] = (model, cast(base_params(run), dt), jax.jit(functools.partial(kc.prefill, model)))
    out = []
    for b in range(blocks):
        before = np.asarray(eng.state.block_lod).copy()
        eng.score(rng.integers(0, vocab, (1, eng.block)))
        size = eng.sync()
        wc = eng.rt.working_context(eng.params, eng.state, w)
        n = int(np.asarray(wc.valid[0]).sum())
        bias = eng.rt._read_bias(eng.params)
        logits, rows = {}, {}
        gate = None if bias is None else (bias.astype(jnp.float32), wc.lod > 0)
        for dt, (model, gp, prefill) in refs.items():
            hidden, cache = prefill(gp, wc.emb.astype(dt), rope_positions(wc, eng.rt.positions),
                                    wc.span if eng.rt.gaussian else None, gate)
            logits[dt] = np.asarray(kc.logits(model, gp, hidden[0, n - 1]), np.float32)
            rows[dt] = [np.asarray(x[0, :, :n], np.float32) for x in (*cache.k, *cache.v)]
        got = [np.asarray(x[0, :, :n], np.float32) for x in (*eng.state.cache.k, *eng.state.cache.v)]
        rel = lambda a, b: max(float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-9)) for x, y in zip(a, b))  # noqa: E731
        out.append(row("rebuild", "mc", np.asarray(eng.state.logits[0], np.float32), logits[gpt.dtype], logits[jnp.float32],
                       (np.argmax(np.asarray(eng.state.logits[0])), np.argmax(logits[jnp.float32])),
                       block=b, rebuilt=size, entries=n, changed=int((np.asarray(eng.state.block_lod) != before).sum()),
                       kv_rel_vs_same_dtype=rel(got, rows[gpt.dtype]), kv_rel_vs_f32=rel(got, rows[jnp.float32])))
    return out


def check_batched(run, blocks: int, rng) -> list[dict]:
    w, vocab = run.cfg.wc_capacity, run.cfg.dataset.vocab_size
    lengths = [w // 4, w // 2 + 7, 5 * w // 4, 2 * w + 13]
    prompts = [rng.integers(0, vocab, n).tolist() for n in lengths]
    eng = Engine(run, kind="mc", batch=len(prompts))
    tokens = rng.integers(0, vocab, (len(prompts), blocks * eng.block)).astype(np.int32)
    logp, greedy = scored(eng, prompts, tokens)
    one = Engine(run, kind="mc")
    alone = [scored(one, [p], tokens[i : i + 1]) for i, p in enumerate(prompts)]
    lp1, g1 = np.concatenate([a[0] for a in alone]), np.concatenate([a[1] for a in alone])
    return [{"check": "batched", "engine": "mc", "max_abs_vs_same_dtype": max_abs(logp, lp1),  # against alone: no f32 here
             "values": int(logp.size), "prompts": lengths, "greedy_equal_alone": float(np.mean(greedy == g1))}]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--blocks", type=int, default=4, help="decode blocks per check")
    ap.add_argument("--checks", nargs="+", default=["fits", "rebuild", "batched"])
    ap.add_argument("--json", default="", help="append the rows (JSON lines) here")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    run = randomized(fake_run(cfg, "random"))
    rng = np.random.default_rng(0)
    head = {"device": jax.devices()[0].device_kind, "dtype": str(jnp.dtype(run.model.gpt.dtype)), "config": args.config,
            "W_max": cfg.wc_capacity, "R": cfg.runtime.refocus_interval}
    fns = {"fits": check_fits, "rebuild": check_rebuild, "batched": check_batched}
    for name in args.checks:
        for r in fns[name](run, args.blocks, rng):
            r = {**head, **r}
            print(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in r.items()}), flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
