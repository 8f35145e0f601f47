"""MegaContext controller micro-benchmark: everything a training step does besides the base model.

One jitted function, forward only, as the PyTorch reference's controller timing:
embed tokens → GistNet tree (LOD1 + LOD2, one batched call per level) → assemble 3
working contexts per sequence (a recency baseline and two random compressed layouts) →
LensNet on all of them → focus allocator (`allocator.iterations` rounds) on each. Also
times each stage alone (each its own jit, inputs precomputed) for the breakdown. Per call:
the median over `--steps` runs of 4 calls dispatched back to back between two
synchronisations, after warm-up (`mc_runner.timed_ms`).

    python bench/controller.py --config configs/run10_d12.yaml --batch 8 \
        megacontext.wc_capacity=1024 [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mcjax.config import load_config
from mcjax.megacontext.allocator import AllocatorParams, never_changed, refocus
from mcjax.megacontext.layout import assemble, check_layout, entry_count, recency_baseline
from mcjax.megacontext.tree import build_tree
from mcjax.model.gistnet import build_gistnet
from mcjax.model.gpt import GPT, build_gpt
from mcjax.model.lensnet import build_lensnet
from mcjax.train.mc_runner import timed_ms


def random_layout(rng: np.random.Generator, n1: int, k: int, capacity: int, recent_tokens: int) -> np.ndarray:
    """A random valid layout within `capacity` with the tail at LOD0 (benchmark input only)."""
    tail = -(-recent_tokens // k)
    lod = (rng.random(n1) < 0.5).astype(np.int8)  # LOD1 with probability ½
    for s in range(0, ((n1 - tail) // k) * k, k):
        if rng.random() < 0.2:
            lod[s : s + k] = 2
    lod[n1 - tail :] = 0
    zeros = [b for b in rng.permutation(n1 - tail) if lod[b] == 0]
    while entry_count(lod, k) > capacity and zeros:
        lod[zeros.pop()] = 1
    check_layout(lod, k, capacity=capacity, recent_tokens=recent_tokens)
    return lod


def main(argv=None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/run10_d12.yaml")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--json", default="")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    b, t, k = args.batch, cfg.dataset.context_tokens, cfg.dataset.block_size
    n1, w, variants = t // k, cfg.wc_capacity, 3
    mc = cfg.megacontext

    gpt, gist, lens = build_gpt(cfg), build_gistnet(cfg), build_lensnet(cfg)
    alloc = AllocatorParams.from_config(cfg)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.dataset.vocab_size, (b, t)), jnp.int32)
    layouts = np.stack([
        np.stack([recency_baseline(n1, k, w, max_lod=mc.max_lod)]
                 + [random_layout(rng, n1, k, w, mc.recent_tokens) for _ in range(variants - 1)])
        for _ in range(b)
    ])
    layouts = jnp.asarray(layouts)  # int8 [B, 3, N1]
    key = jax.random.key(0)
    gpt_p = nn.unbox(gpt.init(key, tokens[:1, :k]))
    emb0 = gpt.apply(gpt_p, tokens, method=GPT.embed)
    gist_p = nn.unbox(gist.init(key, emb0[:1, :k]))

    def tree_of(gist_p, emb):
        return build_tree(lambda x, mask=None: gist.apply(gist_p, x, mask), emb, k, mc.max_lod)

    def wcs_of(tree, layouts):
        per_seq = jax.vmap(lambda l, l0, l1, l2: assemble(l, l0, l1, l2, w), in_axes=(0, None, None, None))
        wc = jax.vmap(per_seq)(layouts, tree.lod0, tree.lod1, tree.lod2)  # [B, 3, W, ...]
        return jax.tree.map(lambda x: x.reshape((b * variants,) + x.shape[2:]), wc)

    tree0 = jax.jit(tree_of)(gist_p, emb0)
    wc0 = jax.jit(wcs_of)(tree0, layouts)
    lens_p = nn.unbox(lens.init(key, wc0))
    last = jnp.broadcast_to(never_changed(n1), (b * variants, n1))
    keys = jax.random.split(key, b * variants)

    def alloc_of(layouts, wc, scores):
        run = jax.vmap(lambda l, wc, s, lc, kk: refocus(l, wc, s, lc, jnp.int32(0), kk, alloc))
        new, _, stats = run(layouts.reshape(b * variants, n1), wc, scores, last, keys)
        return new, stats["swap_rate"].mean()

    def controller(gpt_p, gist_p, lens_p, tokens, layouts):
        emb = gpt.apply(gpt_p, tokens, method=GPT.embed)
        tree = tree_of(gist_p, emb)
        wc = wcs_of(tree, layouts)
        scores = lens.apply(lens_p, wc)
        return alloc_of(layouts, wc, scores)

    scores0 = jax.jit(lens.apply)(lens_p, wc0)
    result = {
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "batch": b, "seq": t, "dim": cfg.model_dim, "block": k, "wc_capacity": w, "layouts_per_seq": variants,
        "gistnet": f"{cfg.gistnet.kind}/{cfg.gistnet.layers}L/{cfg.gistnet.pooling}/{cfg.gistnet.head}",
        "lensnet": f"{lens.layers}L/{lens.dim}d",
        "allocator_iterations": alloc.iterations,
        "dtype": str(jnp.dtype(gist.dtype)),
        "total_ms": timed_ms(jax.jit(controller), gpt_p, gist_p, lens_p, tokens, layouts, reps=args.steps, warmup=3),
        "tree_ms": timed_ms(jax.jit(tree_of), gist_p, emb0, reps=args.steps, warmup=3),
        "assembly_ms": timed_ms(jax.jit(wcs_of), tree0, layouts, reps=args.steps, warmup=3),
        "lensnet_ms": timed_ms(jax.jit(lens.apply), lens_p, wc0, reps=args.steps, warmup=3),
        "allocator_ms": timed_ms(jax.jit(alloc_of), layouts, wc0, scores0, reps=args.steps, warmup=3),
    }
    result = {k_: (round(v, 3) if isinstance(v, float) else v) for k_, v in result.items()}
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
