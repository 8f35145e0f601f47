"""The likelihood of a row's tail under a working context: the training forward, batched for eval.

A row is L + 1 tokens (L inputs, a multiple of K, and one lookahead). A layout `block_lod
int8 [L/K]` keeps the last `tail` tokens raw. `Scorer.tail_nll` builds each row's LOD tree
(GistNet, one call per level), assembles the working contexts of its layouts exactly as
the training step does (`MCForward`: the same gists, positions, Gaussian-RoPE spans), runs
the GPT on all of them and returns the NLL of every tail token — the entry at position
L − tail + i predicting token L − tail + i + 1 — so ΔNLL@H for any H ≤ tail is a mean over
the last H columns, and the all-LOD0 layout gives the full-context reference through the
very same program (its ΔNLL is exactly 0).

Only the tail entries go through the head and the loss. Calls hold a power of two up to
M_CHUNK layouts per row and rows × layouts × width ≤ `eval.batch` × L tokens (at least one row);
widths are the layouts' largest entry count rounded up to L/8, and partial calls are
padded to full ones, so a sweep compiles a handful of programs.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mcjax.eval.setup import Plan, derive
from mcjax.megacontext.layout import entry_count, rope_positions
from mcjax.model.gistnet import base_heads
from mcjax.model.xent import token_nll
from mcjax.train.mc_step import MCForward

LOSS_CHUNK = 16384  # tokens per head + loss chunk (the tail entries of a call)
M_CHUNK = 32  # layouts of a row per call: many candidates (the oracle's) go in calls of this many


_PROGRAMS: dict = {}  # one jitted program per (model, derived config) in a process, as the engines'


class Scorer:
    """NLL of the raw tail of rows of `length` tokens under given layouts (see the module doc)."""

    def __init__(self, plan: Plan, length: int):
        self.plan, self.length, self.tail = plan, length, plan.tail
        cfg = derive(plan.cfg, {"dataset.context_tokens": length, "megacontext.wc_capacity": length,
                                "megacontext.recent_tokens": plan.tail})
        self.params = plan.run.params
        self.n1 = length // plan.k
        key = (plan.run.model, repr(sorted(cfg.to_dict().items())))
        if key not in _PROGRAMS:
            fw = MCForward(plan.run.model, cfg)
            _PROGRAMS[key] = jax.jit(lambda p, t, lay, cap, drop: _tail_nll(fw, plan.tail, p, t, lay, cap, drop),
                                     static_argnums=(3, 4))
        self._fn = _PROGRAMS[key]

    def width(self, layouts: np.ndarray) -> int:
        """The WC width a call of these layouts runs at."""
        most = max(entry_count(lod, self.plan.k) for lod in layouts.reshape(-1, self.n1))
        bucket = max(self.plan.k, self.length // 8)
        return min(self.length, -(-most // bucket) * bucket)

    def tail_nll(self, rows: np.ndarray, layouts: np.ndarray, progress: Callable[[int], None] | None = None,
                 drop_gists: bool = False) -> np.ndarray:
        """rows int [R, L+1]; layouts int8 [R, M, N1] (or [M, N1] / [N1]: the same for every
        row). -> f32 [R, M, tail] (see the module doc). `progress(rows)` after each call.
        drop_gists: the base reads no gist (its read gate shut): the layout's raw entries alone."""
        rows = np.asarray(rows)
        layouts = np.asarray(layouts, np.int8)
        if layouts.ndim == 1:
            layouts = layouts[None]
        if layouts.ndim == 2:
            layouts = np.broadcast_to(layouts, (len(rows),) + layouts.shape)
        r, m, _ = layouts.shape
        cap, mc = self.width(layouts), min(M_CHUNK, 1 << (m - 1).bit_length())  # a power of two
        per_call = max(1, min(r, self.plan.ev.batch * self.length // (mc * cap)))
        out = np.empty((r, m, self.tail), np.float32)
        for j in range(0, m, mc):  # fixed-size calls: the last of each axis padded with its last entry
            cols = np.minimum(np.arange(j, j + mc), m - 1)
            for start in range(0, r, per_call):
                idx = np.minimum(np.arange(start, start + per_call), r - 1)
                got = np.asarray(self._fn(self.params, jnp.asarray(rows[idx]), jnp.asarray(layouts[idx][:, cols]), cap,
                                          drop_gists))
                n, w = min(per_call, r - start), min(mc, m - j)
                out[start : start + n, j : j + w] = got[:n, :w]
                if progress is not None and j + mc >= m:
                    progress(n)
        return out


def _tail_nll(fw: MCForward, tail: int, params, tokens, layouts, capacity: int, drop: bool = False):
    """tokens int [R, L+1], layouts int8 [R, M, N1] -> f32 [R, M, tail] (see the module doc)."""
    r, m, _ = layouts.shape
    wc = fw.assemble(fw.tree(params, tokens), layouts, capacity)  # [R·M, capacity]
    gpt = {"params": params["gpt"]}
    gate = (jnp.full((fw.gpt.depth, base_heads(fw.cfg)), -1e9), wc.lod > 0) if drop else fw.gist_gate(params, wc)
    hidden = fw.gpt.apply(gpt, embeddings=wc.emb, positions=rope_positions(wc, fw.cfg.megacontext.positions),
                          spans=wc.span if fw.gaussian else None,
                          gist_gate=gate)
    idx = wc.valid.sum(-1)[:, None] - tail + jnp.arange(tail)  # the tail: the last `tail` entries, all raw
    h = jnp.take_along_axis(hidden, idx[..., None], axis=1)
    targets = jnp.take_along_axis(jnp.repeat(tokens, m, axis=0), jnp.take_along_axis(wc.pos, idx, axis=1) + 1, axis=1)
    head = fw.gpt.apply(gpt, method="head")
    nll = token_nll(h.reshape(-1, h.shape[-1]), head, targets.reshape(-1), softcap=fw.gpt.softcap,
                    chunk_tokens=LOSS_CHUNK)
    return nll.reshape(r, m, tail)


def horizon_mean(tail_nll: np.ndarray, horizon: int) -> np.ndarray:
    """Mean NLL over the last `horizon` tokens: f32 [..., tail] -> [...]."""
    return tail_nll[..., -horizon:].mean(-1)
