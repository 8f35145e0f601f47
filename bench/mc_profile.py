"""Where the MegaContext training step spends its time: per-kernel GPU profiles.

Builds the step of `mcjax bench` (random tokens, B sequences, N variants at `--wc-length`),
then writes a jax.profiler trace and a per-kernel summary (bench/gpt_throughput.py's
`summarize_trace`) for the whole step and for each controller part jitted alone (the
`mc/build_ms`, `mc/variant_pack_ms`, `mc/lens_ms` computations of mc_runner.py), and
checks that the cuDNN and XLA encoder attentions give the same LensNet scores and gists.

    python bench/mc_profile.py --config configs/mc_d12.yaml --batch 8 --out DIR [--no-trace] [--hlo] [key=value ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(__file__))
from gpt_throughput import summarize_trace  # noqa: E402

from mcjax.bench import bench_inputs, mc_setup  # noqa: E402
from mcjax.config import load_config  # noqa: E402
from mcjax.train.mc_runner import MCRunner, timed_ms  # noqa: E402
from mcjax.train.sharding import batch_sharding, global_batch, make_mesh  # noqa: E402


def trace(fn, args, out: str, reps: int = 3) -> str:
    jax.block_until_ready(fn(*args))
    jax.profiler.start_trace(out)
    for _ in range(reps):
        jax.block_until_ready(fn(*args))
    jax.profiler.stop_trace()
    return summarize_trace(out, steps=reps, top=30)


def attention_check(runner: MCRunner, params, tokens, layouts, wv: int) -> dict:
    """Max |Δ| between cuDNN and XLA encoder attention on this batch's gists and LensNet scores."""
    fw = runner.fw
    tree = jax.jit(fw.tree)(params, tokens)
    wc = jax.jit(lambda t, l: fw.assemble(t, l[:, 1:], wv))(tree, layouts)
    out = {}
    for name, module in (("gistnet", "gist"), ("lensnet", "lens")):
        net = getattr(fw, module)
        got = {}
        for impl in ("xla", "cudnn"):
            m = dataclasses.replace(net, attention=impl)
            if name == "gistnet":
                x = tree.lod0.reshape(-1, fw.k, tree.lod0.shape[-1])[:512]
                got[impl] = jax.jit(lambda p, x, m=m: m.apply({"params": p}, x))(params["gistnet"], x)
            else:
                got[impl] = jax.jit(lambda p, w, m=m: m.apply({"params": p}, w))(params["lensnet"], wc)
        out[f"{name}_max_abs_diff"] = float(jnp.max(jnp.abs(got["xla"].astype(jnp.float32) - got["cudnn"].astype(jnp.float32))))
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/mc_d12.yaml")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--wc-length", type=float, default=0.2)
    p.add_argument("--out", required=True)
    p.add_argument("--no-trace", action="store_true", help="only the timings and the attention check")
    p.add_argument("--hlo", action="store_true", help="also write each part's optimised HLO (<part>.hlo.txt)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    cfg, tokens = bench_inputs(load_config(args.config, args.overrides), args.batch)
    mesh = make_mesh(cfg)
    sh = batch_sharding(mesh, leading=1)
    runner, state, batch = mc_setup(cfg, tokens, args.wc_length)
    wv = batch.variant_capacity
    tok_g, lay_g = global_batch(tokens, sh), global_batch(batch.layouts, sh)
    box = {"state": state}

    def step(tok, lay):
        box["state"], m = runner.step_fn(box["state"], tok, lay, wv)
        return m

    os.makedirs(args.out, exist_ok=True)
    r = {"config": cfg.name, "overrides": args.overrides, "gistnet_attention": runner.fw.gist.attention,
         "lensnet_attention": runner.fw.lens.attention}
    r["step_ms"] = timed_ms(step, tok_g, lay_g, reps=10, warmup=3)
    r.update(runner.part_times(box["state"].params, batch))
    print(json.dumps(r), flush=True)
    if not args.no_trace:
        print("== whole step", flush=True)
        trace(step, (tok_g, lay_g), os.path.join(args.out, "step"))  # donates the state: parts come after
    parts = runner.part_programs(box["state"].params, batch)
    if not args.no_trace:
        for name, (fn, fn_args) in parts.items():
            print(f"== {name}", flush=True)
            trace(fn, fn_args, os.path.join(args.out, name))
    if args.hlo:  # maps the fusion names of the kernel summaries to the ops they hold
        for name, (fn, fn_args) in parts.items():
            with open(os.path.join(args.out, f"{name}.hlo.txt"), "w") as f:
                f.write(fn.lower(*fn_args).compile().as_text())
    if jax.default_backend() == "gpu":
        r.update(attention_check(runner, box["state"].params, global_batch(tokens[0], runner.sh0),
                                 global_batch(batch.layouts[0], runner.sh0), wv))
    with open(os.path.join(args.out, "result.json"), "w") as f:
        json.dump(r, f, indent=1)
    print(json.dumps(r), flush=True)
    return r


if __name__ == "__main__":
    main()
