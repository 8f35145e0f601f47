"""Base-model training throughput: tokens/s and MFU of the jitted train step.

Random tokens (throughput does not depend on the text), one optimizer step per timed
iteration, each step synchronised; the figure is the median over the timed steps after
warm-up. Usage (any config key can be overridden):

    python bench/gpt_throughput.py --config configs/run10_d12.yaml \
        training.batch_size=32 training.micro_batch_size=32 --steps 12 --warmup 3 [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from mcjax.config import load_config
from mcjax.model.gpt import build_gpt
from mcjax.train.flops import flops_per_token, mfu, peak_flops
from mcjax.train.memory import device_memory
from mcjax.train.optim import build_optimizer
from mcjax.train.sharding import batch_sharding, global_batch, make_mesh
from mcjax.train.state import create_state, state_shardings
from mcjax.train.step import jit_train_step, make_train_step


def main(argv=None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/run10_d12.yaml")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", default="")
    p.add_argument("--profile", default="", help="write a jax.profiler trace of 3 steps here")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    t, T = cfg.training, cfg.dataset.context_tokens
    accum = t.grad_accum_steps

    mesh = make_mesh(cfg)
    model, tx = build_gpt(cfg), build_optimizer(cfg)
    sample = jnp.zeros((1, T), jnp.int32)
    shardings = state_shardings(model, tx, mesh, sample)
    state = create_state(model, tx, shardings, 0, sample)
    sh = batch_sharding(mesh, leading=1)
    step = jit_train_step(make_train_step(model, tx, cfg), shardings, sh, mesh)
    rng = np.random.default_rng(0)
    batches = [
        global_batch(rng.integers(0, cfg.dataset.vocab_size, (accum, t.batch_size // accum, T + 1), dtype=np.int32), sh)
        for _ in range(2)
    ]

    t0 = time.perf_counter()
    state, m = step(state, batches[0])
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    for i in range(args.warmup):
        state, m = step(state, batches[i % 2])
    jax.block_until_ready(m)
    times = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        state, m = step(state, batches[i % 2])
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    if args.profile:
        jax.profiler.start_trace(args.profile)
        for i in range(3):
            state, m = step(state, batches[i % 2])
        jax.block_until_ready(m)
        jax.profiler.stop_trace()

    fpt = flops_per_token(cfg.base_model.depth, cfg.model_dim, cfg.dataset.vocab_size, T)
    med = statistics.median(times)
    tok_s = cfg.tokens_per_step / med
    result = {
        "device": jax.devices()[0].device_kind,
        "devices": jax.device_count(),
        "jax": jax.__version__,
        "config": args.config,
        "overrides": args.overrides,
        "batch": t.batch_size,
        "micro_batch": t.batch_size // accum,
        "seq": T,
        "dtype": str(jnp.dtype(model.dtype)),
        "attention": model.attention,
        "compile_s": round(compile_s, 1),
        "step_ms_median": round(med * 1e3, 2),
        "step_ms_min": round(min(times) * 1e3, 2),
        "step_ms_max": round(max(times) * 1e3, 2),
        "tok_per_sec": round(tok_s),
        "mfu": round(mfu(tok_s, fpt, jax.device_count(), peak_flops()), 4),
        "loss_last": float(jax.device_get(m)["train/loss"]),
        **{k: round(v, 2) for k, v in device_memory().items()},
    }
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
