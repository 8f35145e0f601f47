"""The runtime engine's host side: one object that streams B histories through a trained run.

    from mcjax.runtime import Engine, Sampling
    engine = Engine.from_run("tiny_mc_cpu", kind="mc", batch=1)   # or kind="plain"
    engine.ingest([engine.encode("a long document ...")])          # one token list per stream
    for block in engine.generate(128, Sampling(temperature=0.8, top_k=50), seed=0):
        print(engine.tokenizer.decode(block[0]), end="")           # int32 [B, R] per block

It holds the device state (`mc.MCState` or `plain.PlainState`), the params its programs read
(`Engine.params`: the base's in its compute dtype, LoRA adapters folded in, q | k | v and
gate | up fused into one matrix each by `kv_cache.fuse_projections` — not the model's own tree:
`Engine.run.params` is) and the jitted programs
(ingest, generate, score, and for MegaContext the cache rebuilds; the state donated to each),
picks the rebuild each block needs from the size the previous block reported, cuts
prompts into chunks of at most `runtime.ingest_chunk` tokens (a power of two ≥ 64 for
shorter prompts, so a few program sizes serve every prompt), checks capacities before
anything runs (one clear error),
and — when a `Monitor` is attached — times every call between device synchronisations and
hands the refocus statistics and layouts to it (runtime telemetry, traces, LOD strips).
Generation goes by whole blocks of R = `runtime.refocus_interval` tokens: a stream holds
every token of every block it generated.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mcjax.config import runtime_capacity, validate_runtime
from mcjax.errors import UserError
from mcjax.model import kv_cache as kc
from mcjax.model.llama import merge_lora
from mcjax.restore import LoadedRun, load_run
from mcjax.runtime.mc import MCRuntime
from mcjax.runtime.plain import PlainRuntime
from mcjax.runtime.sampling import Sampling, stream_keys

KINDS = ("auto", "mc", "plain")


def _compute_params(params, dtype):
    """Float params in the compute dtype, cast once (decode reads every weight per token)."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


# The plain engine's ingest attends a chunk of P tokens to its W-slot ring with explicit
# logits (kv_cache.cached_attention): f32 [B, N, P, W + P], about three live copies per layer.
ATTENTION_BYTES = 2 << 30


def plain_chunk(limit: int, w: int, batch: int, heads: int) -> int:
    """The plain engine's ingest chunk: at most `limit` and W, and — a power of two ≥ 64
    where it must shrink — small enough that one layer's attention logits stay within
    ATTENTION_BYTES (at W = 16k, batch 8 and 9 heads: 128 tokens, where 8,192 would need
    about 170 GB)."""
    chunk = min(limit, w)
    while chunk > 64 and 12 * batch * heads * chunk * (w + chunk) > ATTENTION_BYTES:
        chunk = 1 << (chunk - 1).bit_length() - 1 if chunk & (chunk - 1) else chunk // 2
    return chunk


_PROGRAMS: dict = {}
_PROGRAMS_CALLED: dict[int, set] = {}  # per jitted program set: the (program, shape) keys already compiled


def _programs(kind: str, model, cfg):
    """The runtime's device functions and its jitted programs (ingest, generate, score,
    rebuild, pending; the state donated), built once per (engine kind, model, config) in a
    process, so engines made again for the same run (a notebook, a test, an eval suite)
    reuse their compilations."""
    key = (kind, model, repr(sorted(cfg.to_dict().items())))
    if key not in _PROGRAMS:
        mc = kind == "mc"
        rt = MCRuntime(model, cfg) if mc else PlainRuntime(model, cfg)
        _PROGRAMS[key] = (
            rt,
            jax.jit(rt.ingest, donate_argnums=1),
            jax.jit(rt.generate, static_argnums=2, donate_argnums=1),
            jax.jit(rt.score, donate_argnums=1),
            jax.jit(rt.rebuild, static_argnums=2, donate_argnums=1) if mc else None,
            jax.jit(rt.pending) if mc else None,
        )
    return _PROGRAMS[key]


class Engine:
    """B streams through a trained run (see the module doc). kind: "mc" (MegaContext),
    "plain" (the GPT with a W_max-entry sliding-window cache) or "auto" (mc for a
    MegaContext run, else plain)."""

    def __init__(self, run: LoadedRun, *, kind: str = "auto", batch: int = 1, seed: int = 0):
        cfg = run.cfg
        if kind not in KINDS:
            raise UserError(f"unknown engine '{kind}': choose mc or plain")
        if kind == "auto":
            kind = "mc" if run.megacontext else "plain"
        if kind == "mc" and not run.megacontext:
            raise UserError(
                f"run '{run.run_dir.name}' trained a plain GPT (megacontext.enabled is false in "
                f"{cfg.source_file}): it has no GistNet or LensNet; use --engine plain"
            )
        if batch < 1:
            raise UserError(f"batch {batch}: must be ≥ 1")
        self.run, self.cfg, self.kind, self.batch = run, cfg, kind, batch
        self.tokenizer = run.tokenizer
        gpt = run.model.gpt if run.megacontext else run.model
        if kind == "mc":
            validate_runtime(cfg)
            params = run.params
            self.capacity = runtime_capacity(cfg)
        else:
            params = {"gpt": run.params["gpt"] if run.megacontext else run.params}
            self.capacity = 2**31 - 1 - cfg.runtime.refocus_interval  # a ring: positions are the only limit
        self.rt, self._ingest, self._generate, self._score, self._rebuild, self._pending_fn = _programs(
            kind, run.model if kind == "mc" else gpt, cfg
        )
        if getattr(gpt, "lora_spec", None) is not None:  # a pretrained base: adapters folded in once
            params = dict(params, gpt=merge_lora(gpt, params["gpt"]))
        params = _compute_params(params, gpt.dtype)
        self.params = dict(params, gpt=kc.fuse_projections(params["gpt"]))  # one matmul per group of siblings
        self.block = cfg.runtime.refocus_interval
        self.chunk = cfg.runtime.ingest_chunk if kind == "mc" else plain_chunk(cfg.runtime.ingest_chunk, cfg.wc_capacity,
                                                                                 batch, gpt.num_query_heads)
        self.monitor = None
        self.reset(seed)

    @classmethod
    def from_run(cls, run: str, overrides: Sequence[str] = (), *, step: int | None = None, **kwargs) -> Engine:
        """Restore `run` (a run name or directory; `mcjax.restore.load_run`) and build its engine."""
        return cls(load_run(run, overrides, step), **kwargs)

    def reset(self, seed: int = 0) -> None:
        """Empty every stream; `seed` seeds each stream's sampling key."""
        self.state = self.rt.init(self.batch, seed)
        self.lengths = np.zeros(self.batch, np.int64)  # host mirror of the tokens each stream holds
        self._pending: int | None = 0  # cache slots the next rebuild needs (None: ask the device)

    def chunk_for(self, tokens: int) -> int:
        """The ingest chunk for a prompt of `tokens`: a power of two ≥ 64 (a short prompt, a
        small program), at most `runtime.ingest_chunk`."""
        return min(self.chunk, max(64, 1 << max(tokens - 1, 0).bit_length()))

    def encode(self, text: str, *, bos: bool = True) -> list[int]:
        """Token ids of `text`, after <|bos|> (as every training document starts)."""
        return ([self.tokenizer.bos_id] if bos else []) + self.tokenizer.encode_batch([text])[0]

    # ------------------------------------------------------------------ streaming
    def ingest(self, streams: Sequence[Sequence[int]], progress=None, chunk: int | None = None) -> None:
        """Append streams[i] (token ids) to stream i, in chunks of `chunk` tokens (default: the
        longest stream rounded up to a power of two ≥ 64, at most `runtime.ingest_chunk`; give
        one size for many calls to compile one program). `progress(tokens)` is called after
        each chunk with the tokens it added."""
        if len(streams) != self.batch:
            raise UserError(f"{len(streams)} prompts for an engine of {self.batch} streams")
        arrays = [np.asarray(s, np.int32).reshape(-1) for s in streams]
        for i, a in enumerate(arrays):
            if self.lengths[i] + a.size > self.capacity:
                raise UserError(
                    f"stream {i}: {a.size:,} new tokens after {self.lengths[i]:,} held exceed runtime.max_tokens "
                    f"({self.cfg.runtime.max_tokens:,}; set runtime.max_tokens=N)"
                )
            self._check_ids(a, f"stream {i}")
        longest = max((a.size for a in arrays), default=0)
        p = min(self.chunk, chunk or self.chunk_for(longest))
        for c in range(-(-longest // p)):
            chunk = np.zeros((self.batch, p), np.int32)
            n_valid = np.zeros(self.batch, np.int32)
            for i, a in enumerate(arrays):
                part = a[c * p : (c + 1) * p]
                chunk[i, : part.size], n_valid[i] = part, part.size
            t0 = time.perf_counter()
            compiling = self._first(("ingest", p))
            self.state, stats = self._ingest(self.params, self.state, jnp.asarray(chunk), jnp.asarray(n_valid))
            self.lengths += n_valid
            self._pending = None
            if self.monitor is not None:
                self._report("ingest", stats, t0, tokens=int(n_valid.sum()), compiling=compiling)
            if progress is not None:
                progress(int(n_valid.sum()))

    def generate(self, max_new_tokens: int, sampling: Sampling = Sampling(), *,
                 seed: int | Sequence[int] | None = None) -> Iterator[np.ndarray]:
        """Decode ceil(max_new_tokens / R) blocks of R tokens per stream, yielding each block
        (int32 [B, R]) as it completes; every stream must hold a prompt. `seed` re-seeds
        the streams' sampling keys: one seed for all, or one per stream (`stream_keys`)."""
        try:
            sampling.check()
        except ValueError as e:
            raise UserError(str(e)) from None
        if max_new_tokens < 0:
            raise UserError(f"max_new_tokens must be ≥ 0, got {max_new_tokens}")
        blocks = -(-max_new_tokens // self.block)
        if blocks:
            self._check_room(blocks * self.block, "to generate")
        if seed is not None:
            try:
                keys = stream_keys(seed, self.batch)
            except ValueError as e:
                raise UserError(str(e)) from None
            self.state = self.state._replace(keys=keys)
        for _ in range(blocks):
            yield self._block(("generate", sampling), lambda: self._generate(self.params, self.state, sampling))

    def score(self, tokens) -> tuple[np.ndarray, np.ndarray]:
        """Teacher forcing: decode the given tokens (int [B, n], 1 ≤ n ≤ R) as one block, exactly
        as `generate` would decode them, and append them to the streams (the block is
        gisted and refocused like a generated one). -> (log-probability of each given
        token f32 [B, n], the greedy choice at its position int32 [B, n]) — so a greedy
        `generate` would have produced the tokens iff greedy == tokens everywhere."""
        tokens = np.asarray(tokens, np.int32)
        if tokens.ndim != 2 or tokens.shape[0] != self.batch or not 1 <= tokens.shape[1] <= self.block:
            raise UserError(f"score takes int tokens [{self.batch}, n] with 1 ≤ n ≤ runtime.refocus_interval "
                            f"({self.block}), got shape {list(tokens.shape)}")
        self._check_ids(tokens, "score")
        self._check_room(tokens.shape[1], "to score")
        toks = jnp.asarray(tokens)
        logp, greedy = self._block(("score", tokens.shape[1]), lambda: self._score(self.params, self.state, toks))
        return np.asarray(logp), np.asarray(greedy)

    def _check_ids(self, ids: np.ndarray, where: str) -> None:
        vocab = self.cfg.dataset.vocab_size
        if ids.size and not (0 <= ids.min() and ids.max() < vocab):
            raise UserError(f"{where}: token ids must lie in [0, {vocab}), got {ids.min()}..{ids.max()}")

    def _check_room(self, tokens: int, what: str) -> None:
        empty = np.flatnonzero(self.lengths == 0)
        if empty.size:
            raise UserError(f"stream {empty[0]} holds no tokens: ingest a prompt first (at least <|bos|>)")
        over = np.flatnonzero(self.lengths + tokens > self.capacity)
        if over.size:
            i = over[0]
            raise UserError(
                f"stream {i}: {self.lengths[i]:,} tokens + {tokens:,} {what} exceed "
                f"runtime.max_tokens ({self.cfg.runtime.max_tokens:,})"
            )

    def _block(self, program, call):
        """Run one decode block (`call()` -> (state, out, stats)) on a synced cache, timed for
        the monitor. -> out, as numpy."""
        t0 = time.perf_counter()
        compiling = self._first(program) | (self._pending is None and self._first(("pending",)))
        size = self._pending_size()
        compiling |= size > 0 and self._first(("rebuild", size))
        rebuilt = self.sync()
        self.state, out, stats = call()
        out = jax.device_get(out)  # waits for the block: the latency a streaming reader sees
        n = jax.tree.leaves(out)[0].shape[1]
        self.lengths += n
        if self.kind == "mc":
            self._pending = int(stats["pending"][0])
            stats = {**stats, "rebuilt": np.full(self.batch, rebuilt)}
        if self.monitor is not None:
            self._report("decode", stats, t0, tokens=n * self.batch, compiling=compiling)
        return out

    def sync(self) -> int:
        """Bring the KV cache up to date with the layout (generate does it before every block);
        returns the cache slots recomputed."""
        if self.kind != "mc":
            return 0
        size = self._pending_size()
        if size:
            self.state = self._rebuild(self.params, self.state, size)
        self._pending = 0
        return size

    def _pending_size(self) -> int:
        """The rebuild the cache needs (asks the device after an ingest, else already known)."""
        if self._pending is None:
            self._pending = int(self._pending_fn(self.params, self.state)) if self.kind == "mc" else 0
        return self._pending

    def next_logits(self) -> np.ndarray:
        """f32 [B, V]: the next-token logits of every stream, from the synced cache."""
        self.sync()
        return np.asarray(self.state.logits)

    def _first(self, program) -> bool:
        """Is this the first call of `program` (a key) by this engine's programs in this
        process — one whose time includes compiling it?"""
        seen = _PROGRAMS_CALLED.setdefault(id(self._generate), set())
        first = program not in seen
        seen.add(program)
        return first

    def _report(self, phase: str, stats, t0: float, *, tokens: int, compiling: bool) -> None:
        stats = jax.device_get(stats)  # waits for the call: t0 → now is its latency
        ms = (time.perf_counter() - t0) * 1e3
        layout = jax.device_get((self.state.block_lod, self.state.last_changed, self.state.step)) if self.kind == "mc" else None
        self.monitor.record(phase, stats, ms, tokens=tokens, lengths=self.lengths.copy(), layout=layout, compiling=compiling)
