"""The jitted train and eval steps: pure functions of (state, batch).

A batch is int tokens [A, B, T+1]: A gradient-accumulation micro-steps of B sequences,
each with one lookahead token so all T positions have a next-token target. The step
scans over the A micro-steps inside one XLA program, averages the gradients, and makes
one optimizer update of every parameter. Metrics come back as a pytree of scalars, with
`train/finite`: whether the step's loss, gradient norm and new state are all finite.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mcjax.model.gpt import GPT
from mcjax.model.xent import token_nll
from mcjax.train.frozen import merge
from mcjax.train.optim import lr_multiplier
from mcjax.train.state import TrainState


FINITE = "train/finite"  # the metrics key of `finite_flag`; the loop takes it out before logging


def finite_flag(loss: jnp.ndarray, grad_norm: jnp.ndarray, new_state: TrainState) -> jnp.ndarray:
    """bool []: the step's loss and global gradient norm, and every float of the state the step
    made (params, optimizer state, stats), are finite.

    The one scalar the host checks to stop a non-finite run (`nan_guard.py`). It reads the new
    state once, inside the program that writes it, so a save can rely on it.
    """
    ok = [jnp.isfinite(loss), jnp.isfinite(grad_norm)]
    ok += [jnp.isfinite(x).all() for x in jax.tree.leaves(new_state) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.stack(ok).all()


def sequence_nll(model: GPT, params, tokens: jnp.ndarray, *, chunk_tokens: int, mode: str, dropout_key=None) -> jnp.ndarray:
    """Next-token NLL of every position. tokens int [B, T+1] -> f32 [B, T]. dropout_key: LoRA
    dropout of a pretrained base (training only)."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    extra = {} if dropout_key is None else {"dropout_key": dropout_key}
    hidden = model.apply({"params": params}, inputs, **extra)
    head = model.apply({"params": params}, method="head")
    b, t, d = hidden.shape
    nll = token_nll(
        hidden.reshape(b * t, d), head, targets.reshape(-1), softcap=model.softcap, chunk_tokens=chunk_tokens, mode=mode
    )
    return nll.reshape(b, t)


def make_train_step(model: GPT, tx: optax.GradientTransformation, cfg):
    """(state, tokens [A, B, T+1]) -> (state, metrics). Pure; jit it with `jit_train_step`."""
    m, t = cfg.base_model, cfg.training
    total = cfg.total_steps

    dropout = cfg.pretrained and cfg.lora.rank > 0 and cfg.lora.dropout > 0

    def train_step(state: TrainState, batch: jnp.ndarray):
        keys = jax.random.split(jax.random.fold_in(jax.random.key(t.seed), state.step), batch.shape[0])

        def loss_fn(params, tokens, key):  # gradients w.r.t. the trainable params only
            full = merge(params, state.frozen)
            nll = sequence_nll(
                model, full, tokens, chunk_tokens=m.loss_chunk_tokens, mode=m.loss_impl, dropout_key=key if dropout else None
            )
            return nll.mean()

        def micro(acc, xs):
            loss, grads = jax.value_and_grad(loss_fn)(state.params, *xs)
            return jax.tree.map(jnp.add, acc, grads), loss

        if batch.shape[0] == 1:  # no accumulation: no zero-filled buffers, no loop
            loss, grads = jax.value_and_grad(loss_fn)(state.params, batch[0], keys[0])
            losses = loss[None]
        else:
            zeros = jax.tree.map(jnp.zeros_like, state.params)
            grads, losses = jax.lax.scan(micro, zeros, (batch, keys))
            grads = jax.tree.map(lambda g: g / batch.shape[0], grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        metrics = {
            "train/loss": losses.mean(),
            "train/grad_norm": optax.tree.norm(grads),
            "train/lr_mult": lr_multiplier(state.step, total, t.warmup_ratio, t.warmdown_ratio, t.final_lr_frac),
        }
        metrics[FINITE] = finite_flag(metrics["train/loss"], metrics["train/grad_norm"], new.without_frozen())
        return new, metrics

    return train_step


def make_eval_step(model: GPT, cfg):
    """(params, tokens [B, T+1], token_bytes int [V]) -> sums for loss and bits per byte.

    Bits per byte counts only target tokens that stand for text (bytes > 0; not <|bos|>).
    """
    m = cfg.base_model

    def eval_step(params, tokens, token_bytes):
        nll = sequence_nll(model, params, tokens, chunk_tokens=m.loss_chunk_tokens, mode=m.loss_impl)
        nbytes = token_bytes[tokens[:, 1:]]
        return {
            "nll_sum": nll.sum(),
            "tokens": jnp.asarray(nll.size, jnp.float32),
            "text_nll_sum": jnp.where(nbytes > 0, nll, 0.0).sum(),
            "bytes": nbytes.sum().astype(jnp.float32),
        }

    return eval_step


def jit_train_step(train_step, shardings: TrainState, batch_sharding, mesh):
    """One jit with explicit in/out shardings and the state donated."""
    from mcjax.train.sharding import replicated

    return jax.jit(
        train_step,
        in_shardings=(shardings, batch_sharding),
        out_shardings=(shardings, replicated(mesh)),
        donate_argnums=0,
    )
