"""Room after the ingest of a long prompt, with and without `runtime.ingest_exchange` (CPU).

The runtime engine of a config with fresh weights (the base's are never read while ingesting:
only GistNet, and LensNet's place is taken by i.i.d. uniform scores in (−1, 1) — the case
where the best blocks spread over every superblock, the exchange's least favourable) ingests
`--prompts` random prompts of `--length` tokens in `runtime.ingest_chunk` chunks. After each:
the blocks expanded (raw, outside the protected head and tail), the superblocks at LOD2 and
the working context's entries. A needle ranked r-th is held raw only while r is below the
expansions (with allocator.span_blocks 2, a wanted block and the one after it rank together),
so the expansions are the rank the ingest reaches.

usage (repo root): PYTHONPATH=. python bench/exchange_room.py --config configs/smollm2_135m_mc.yaml \
    base_model.path=/tmp/rand135 [--length 32768] [--prompts 4] [overrides...]
"""

from __future__ import annotations

import argparse
import types

import jax
import jax.numpy as jnp
import numpy as np

from mcjax.config import load_config
from mcjax.megacontext.layout import entry_count
from mcjax.restore import LoadedRun
from mcjax.runtime import Engine
from mcjax.train.setup import build_parts


def uniform_scores(variables, wc):
    """LensNet's place: a uniform score per entry, drawn from the entry's block and level (the
    same block gets the same score in every chunk's working context)."""
    key = jax.random.key(0)
    u = jax.vmap(lambda p, l: jax.random.uniform(jax.random.fold_in(jax.random.fold_in(key, p), l), (), minval=-1.0,
                                                 maxval=1.0))(wc.pos.reshape(-1), wc.lod.reshape(-1).astype(jnp.int32))
    return jnp.where(wc.valid, u.reshape(wc.pos.shape), 0.0)


def room(cfg, length: int, prompts: int) -> list[tuple[int, int, int]]:
    """(blocks expanded, superblocks at LOD2, entries) after each prompt's ingest."""
    parts = build_parts(cfg)
    run = LoadedRun(cfg=cfg, run_dir=None, tokenizer=None, model=parts.model, params=parts.fresh().model_params(), step=0)
    k, mc = cfg.dataset.block_size, cfg.megacontext
    head, tail = -(-mc.sink_tokens // k), -(-mc.recent_tokens // k)
    n = length // k
    rows = []
    for i in range(prompts):
        engine = Engine(run, kind="mc", batch=1)
        engine.rt.lensnet = types.SimpleNamespace(apply=uniform_scores)
        engine.ingest([np.random.default_rng(i).integers(0, 1000, length).tolist()])
        lod = np.asarray(engine.state.block_lod)[0, :n]
        rows.append((int((lod[head : n - tail] == 0).sum()), int((lod == 2).sum()) // k, entry_count(lod, k)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--length", type=int, default=32768)
    ap.add_argument("--prompts", type=int, default=4)
    args, overrides = ap.parse_known_args()
    base = [f"runtime.max_tokens={args.length}", "runtime.ingest_gists=true", *overrides]
    cfg = load_config(args.config, base)
    print(f"W_max {cfg.wc_capacity}, K {cfg.dataset.block_size}, {args.length:,} tokens in chunks of "
          f"{cfg.runtime.ingest_chunk:,}, allocator.span_blocks {cfg.allocator.span_blocks}")
    for exchange in (False, True):
        cfg = load_config(args.config, [*base, f"runtime.ingest_exchange={str(exchange).lower()}"])
        rows = room(cfg, args.length, args.prompts)
        exp, sup, ent = (np.array(c) for c in zip(*rows))
        print(f"ingest_exchange {str(exchange).lower():5s}: expanded {exp.tolist()} (mean {exp.mean():.1f}), "
              f"superblocks at LOD2 {sup.tolist()}, entries {ent.tolist()}")


if __name__ == "__main__":
    main()
