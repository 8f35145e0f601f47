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
import optax

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
    p.add_argument("--profile", default="", help="write a jax.profiler trace of 3 steps here (and a kernel summary)")
    p.add_argument(
        "--mode",
        default="step",
        choices=["step", "grad", "fwd", "opt", "loss", "attn"],
        help="step: the full train step; ablations: grad (loss+grads, no optimizer), fwd (loss only), "
        "opt (optimizer update only), loss (head+cross-entropy fwd+bwd only), attn (attention fwd+bwd, all layers)",
    )
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
    if args.mode != "step":
        step, state = _ablation(args.mode, cfg, model, tx, state, batches[0])

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
        summarize_trace(args.profile, steps=3)

    fpt = flops_per_token(cfg.base_model.depth, cfg.model_dim, cfg.dataset.vocab_size, T)
    med = statistics.median(times)
    tok_s = cfg.tokens_per_step / med
    result = {
        "device": jax.devices()[0].device_kind,
        "devices": jax.device_count(),
        "jax": jax.__version__,
        "config": args.config,
        "overrides": args.overrides,
        "mode": args.mode,
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
        "loss_last": float(jax.device_get(m)["train/loss"]) if isinstance(m, dict) else None,
        **{k: round(v, 2) for k, v in device_memory().items()},
    }
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


def _ablation(mode, cfg, model, tx, state, batch):
    """(step(state, batch) -> (state, out), state) timing one part of the train step."""
    from mcjax.model.xent import token_nll
    from mcjax.train.step import sequence_nll

    m = cfg.base_model
    tokens = batch[0]

    def loss(params, tok):
        return sequence_nll(model, params, tok, chunk_tokens=m.loss_chunk_tokens, mode=m.loss_impl).mean()

    if mode == "fwd":
        return jax.jit(lambda s, b: (s, loss(s.params, b[0]))), state
    if mode == "grad":

        def g(s, b):
            val, grads = jax.value_and_grad(loss)(s.params, b[0])
            return s, (val, optax.global_norm(grads))

        return jax.jit(g), state
    if mode == "opt":
        grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), state.params)

        def o(s, b):
            updates, opt_state = tx.update(grads, s.opt_state, s.params)
            return s.replace(params=optax.apply_updates(s.params, updates), opt_state=opt_state), b[0, 0, 0]

        return jax.jit(o, donate_argnums=0), state
    n = tokens.shape[0] * (tokens.shape[1] - 1)
    key = jax.random.key(1)
    if mode == "loss":
        h = jax.random.normal(key, (n, cfg.model_dim), model.dtype)
        w = (0.02 * jax.random.normal(key, (cfg.model_dim, cfg.dataset.vocab_size))).astype(model.dtype)
        tg = tokens[:, 1:].reshape(-1)

        def lf(h, w):
            return token_nll(h, w, tg, softcap=m.softcap, chunk_tokens=m.loss_chunk_tokens, mode=m.loss_impl).mean()

        vg = jax.value_and_grad(lf, argnums=(0, 1))
        return jax.jit(lambda s, b: (s, vg(h, w))), state
    if mode == "attn":
        b, t = tokens.shape[0], tokens.shape[1] - 1
        nh = cfg.model_dim // m.head_dim
        qkv = jax.random.normal(key, (3, b, t, nh, m.head_dim), model.dtype)
        impl = "cudnn" if model.attention == "cudnn" else None

        def af(qkv):
            def one(c, _):
                y = jax.nn.dot_product_attention(qkv[0] + c, qkv[1], qkv[2], is_causal=True, implementation=impl)
                return c + 1e-3 * y.mean().astype(c.dtype), None

            return jax.lax.scan(one, jnp.zeros((), model.dtype), None, length=m.depth)[0].astype(jnp.float32)

        ag = jax.grad(af)
        return jax.jit(lambda s, b: (s, ag(qkv))), state
    raise ValueError(mode)


def summarize_trace(log_dir: str, steps: int, top: int = 70) -> str:
    """Per-kernel GPU time from the newest .xplane.pb under log_dir (ms per step); printed and saved."""
    import collections
    import glob
    import os
    import re

    paths = sorted(glob.glob(os.path.join(log_dir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    if not paths:
        return ""
    data = jax.profiler.ProfileData.from_file(paths[-1])
    by_op, by_kernel, cats = collections.Counter(), collections.Counter(), collections.Counter()
    count = collections.Counter()
    total, busy_lo, busy_hi = 0.0, None, None
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if not line.name.lower().startswith("stream"):
                continue
            for ev in line.events:
                stats = dict(ev.stats)
                op = stats.get("hlo_op", "") or ""
                name = ev.name
                d = ev.duration_ns / 1e6
                base = re.sub(r"[._]\d+$", "", op)  # one row per op kind, not per layer
                key = f"{base} | {name[:70]}"
                by_op[key] += d
                count[key] += 1
                by_kernel[name[:90]] += d
                low = name.lower()
                if re.search(r"fmha|flash|cudnn|attn|sdpa", low):
                    c = "attention"
                elif re.search(r"gemm|nvjet|cutlass|cublas|matmul|xmma|sm90_", low) or "dot" in op or "gemm" in op:
                    c = "matmul"
                elif "memcpy" in low or "memset" in low:
                    c = "copy/memset"
                else:
                    c = "fusion/other"
                cats[c] += d
                total += d
                busy_lo = ev.start_ns if busy_lo is None else min(busy_lo, ev.start_ns)
                busy_hi = ev.end_ns if busy_hi is None else max(busy_hi, ev.end_ns)
    lines = [f"GPU kernel time per step: {total / steps:.2f} ms; first..last kernel span per step: "
             f"{((busy_hi or 0) - (busy_lo or 0)) / 1e6 / steps:.2f} ms; kernels per step: {sum(count.values()) / steps:.0f}"]
    lines += [f"  {c:14s} {v / steps:8.2f} ms" for c, v in cats.most_common()]
    lines.append(f"top {top} (hlo op | kernel): ms/step, calls/step")
    lines += [f"  {v / steps:8.3f}  {count[k] / steps:6.1f}  {k}" for k, v in by_op.most_common(top)]
    out = "\n".join(lines)
    print(out)
    with open(os.path.join(log_dir, "summary.txt"), "w") as f:
        f.write(out + "\n")
    return out


if __name__ == "__main__":
    sys.exit(main() and 0)
