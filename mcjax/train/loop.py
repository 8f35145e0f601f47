"""The host training loop: setup, loop, log — in that order.

Everything with side effects lives here (data, logging, evaluation and checkpoint
cadence); the device work is the one jitted step from `step.py`. Cadences are keyed
on tokens seen, so runs with different batch sizes stay comparable. A non-finite step
stops the run before anything saves it (`nan_guard.py`).
"""

from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mcjax.backend import backend_note
from mcjax.checkpoint import Checkpointer
from mcjax.config import Config
from mcjax.data.pipeline import TaskRefresh, TrainIterator, eval_batches
from mcjax.data.prep import check_base_vocab, is_prepared, prepare, tokenizer_path
from mcjax.data.tasks import split_stream
from mcjax.data.tokenizer import Tokenizer
from mcjax.errors import UserError
from mcjax.restore import TOKENIZER
from mcjax.telemetry import Telemetry
from mcjax.telemetry.plots import plot_run
from mcjax.telemetry.progress import Progress
from mcjax.train import distributed
from mcjax.train.flops import config_flops_per_token, mfu, peak_flops
from mcjax.train.memory import device_memory
from mcjax.train.sharding import batch_sharding, global_batch, make_mesh, replicated
from mcjax.train.mc_runner import MCRunner
from mcjax.train.nan_guard import NanGuard
from mcjax.train.setup import build_parts, param_count
from mcjax.train.step import FINITE, jit_train_step, make_eval_step, make_train_step


def out_of_time(started: float, limit_s: float) -> bool:
    """Has training run `limit_s` seconds since `started`? Every process takes process 0's
    answer, so all stop after the same step."""
    late = time.perf_counter() - started >= limit_s
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        late = bool(multihost_utils.broadcast_one_to_all(np.asarray(late)))
    return late


def crossed(before: int, after: int, every: int) -> bool:
    """Did the count pass a multiple of `every` in (before, after]? (0 = never)."""
    return every > 0 and after // every > before // every


def token_byte_lengths(tok: Tokenizer, vocab_size: int) -> np.ndarray:
    """UTF-8 bytes each token stands for (0 for special tokens and unused ids). int32 [V]."""
    out = np.zeros(vocab_size, np.int32)
    special = {tok.bos_id}
    for i in range(tok.vocab_size):
        if i not in special:
            out[i] = len(tok.decode([i]).encode("utf-8"))
    return out


def train(cfg: Config, *, resume: bool = False, log=print) -> dict[str, float]:
    """Train the GPT of `cfg` — with GistNet and LensNet when `megacontext.enabled` — and
    return the final report card (also written as summary.json). The run's mesh is the context
    mesh throughout, for the kernels that run per shard (model/attention.py)."""
    distributed.maybe_initialize()
    with jax.set_mesh(make_mesh(cfg)):
        return _train(cfg, resume, log)


def _train(cfg: Config, resume: bool, log) -> dict[str, float]:
    is_main = jax.process_index() == 0
    log = log if is_main else (lambda *a, **k: None)

    # ---------------------------------------------------------------- data
    if not is_prepared(cfg):
        if is_main:
            log(f"preparing data for {cfg.dataset.dataset_name} (first run of this dataset config)")
            prepare(cfg, log=log)
        _barrier("prep")
    tok = Tokenizer.load(tokenizer_path(cfg))
    check_base_vocab(cfg, tok)  # data prepared for another base with the same vocabulary size
    token_bytes = jnp.asarray(token_byte_lengths(tok, cfg.dataset.vocab_size))

    # ---------------------------------------------------------------- model, optimizer, mesh
    t, T = cfg.training, cfg.dataset.context_tokens
    accum = t.grad_accum_steps
    procs = jax.process_count()
    if t.batch_size % (procs * accum):
        raise UserError(
            f"{cfg.source_file}: training.batch_size {t.batch_size} does not split into "
            f"{accum} micro-steps on each of {procs} processes"
        )
    parts = build_parts(cfg)
    mesh, model, tx, shardings = parts.mesh, parts.model, parts.tx, parts.shardings
    mc_on = cfg.megacontext.enabled
    train_sh = batch_sharding(mesh, leading=1)  # [A, B, T+1]
    eval_sh = batch_sharding(mesh, leading=0)  # [B, T+1]

    out = Path(cfg.telemetry.out_dir)
    run_dir, ckpt_dir = out / "runs" / cfg.run, out / "checkpoints" / cfg.run
    ckpt = Checkpointer(ckpt_dir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
    latest = ckpt.latest_step()
    if latest is not None and not resume:
        raise UserError(
            f"{ckpt_dir} already holds run '{cfg.run}' (step {latest}): pass --resume to continue "
            f"it, or run_name=<new name> to start another"
        )

    local_batch = t.batch_size // procs
    train_path = cfg.dataset.splits["train"].output_path
    refresh = None
    if cfg.dataset.tasks and cfg.dataset.task_refresh:
        refresh = TaskRefresh(train_path, tokenizer_path(cfg), seed=t.seed, stream=split_stream("train"))
    data = TrainIterator(
        train_path,
        batch_size=local_batch,
        seed=t.seed,
        process_index=jax.process_index(),
        process_count=procs,
        refresh=refresh,
    )
    if latest is not None:
        state, data_state, _ = parts.restore(ckpt, latest)
        data.set_state(data_state)
        log(f"resumed '{cfg.run}' from step {latest} ({ckpt_dir})")
    else:
        if resume:
            log(f"no checkpoint of '{cfg.run}' yet: starting from step 0")
        state = parts.fresh()
    start = int(state.step)

    if mc_on:
        runner = MCRunner(cfg, model, tx, shardings, mesh, local_batch=local_batch)
    else:
        step_fn = jit_train_step(make_train_step(model, tx, cfg), shardings, train_sh, mesh)
        eval_fn = jax.jit(
            make_eval_step(model, cfg),
            in_shardings=(shardings.model_params(), eval_sh, replicated(mesh)),
            out_shardings=replicated(mesh),
        )

    def evaluate(params) -> dict[str, float]:
        if "val" not in cfg.dataset.splits or t.eval_tokens == 0:
            return {}
        micro = t.micro_batch_size or t.batch_size
        sums: dict[str, float] = {}
        for index, local in enumerate(eval_batches(
            cfg.dataset.splits["val"].output_path,
            batch_size=micro // procs,
            max_rows=max(micro, t.eval_tokens // T),
            process_index=jax.process_index(),
            process_count=procs,
        )):
            if mc_on:
                res = runner.eval_sums(params, local, index, token_bytes)
            else:
                res = jax.device_get(eval_fn(params, global_batch(local, eval_sh), token_bytes))
            for k, v in res.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        if mc_on:
            return runner.val_metrics(sums)
        return {
            "val/loss": sums["nll_sum"] / sums["tokens"],
            "val/bpb": sums["text_nll_sum"] / (np.log(2) * max(sums["bytes"], 1.0)),
        }

    # ---------------------------------------------------------------- telemetry
    total = cfg.total_steps
    fpt = config_flops_per_token(cfg, T)
    peak = peak_flops()
    telemetry = Telemetry(cfg, run_dir, resume_step=start if latest is not None else None, is_main=is_main)
    if is_main:  # the run carries its tokenizer: generate and infer read it from here
        shutil.copyfile(tokenizer_path(cfg), run_dir / TOKENIZER)
    progress = Progress(total, initial=start, enabled=is_main and cfg.telemetry.progress)
    n_params = param_count(state.params)
    n_frozen = param_count(state.frozen)
    frozen_note = f" trainable + {n_frozen / 1e6:.2f}M frozen (the base)" if n_frozen else ""
    base = model.gpt if mc_on else model
    log(
        f"run '{cfg.run}': {n_params / 1e6:.2f}M params{frozen_note}, {jax.device_count()} device(s) "
        f"{dict(mesh.shape)}, {total} steps × {cfg.tokens_per_step} tokens, "
        f"{accum} micro-step(s), {fpt / 1e6:.1f} MFLOP/token; "
        f"for {backend_note()}: {jnp.dtype(base.dtype).name}, attention {base.attention}"
    )

    mc = cfg.megacontext

    def dump(step: int) -> None:
        text = runner.dump(state, step, out, run_dir, is_main)
        if text:
            telemetry.log_text(step, "mc/lod_dump", text)
            progress.write(text)

    # ---------------------------------------------------------------- loop
    tps = cfg.tokens_per_step
    guard = NanGuard(t.nan_check, ckpt.directory, latest)  # stops at the first non-finite step

    def save(step: int) -> None:
        guard.check()  # state `step` is known finite before it is saved (nan_guard.py)
        meta = {"step": step, "tokens": step * tps, "config": cfg.to_dict(), "base": parts.base_ref}
        ckpt.save(step, state.without_frozen(), data.get_state(), meta)
        guard.saved(step)

    rates: list[float] = []
    last = {"time": None, "tokens": start * tps}
    metrics_host: dict[str, float] = {}
    started = time.perf_counter()
    try:
        for step in range(start, total):
            local = next(data).reshape(accum, local_batch // accum, T + 1)
            done, tokens = step + 1, (step + 1) * tps
            profiled = mc_on and (step == start + 1 or crossed(tokens - tps, tokens, mc.profile_every_tokens))
            if profiled:  # timing breakdown: synchronised, so not counted in tok/s
                state, metrics, host = runner.profile(state, local, step)
            elif mc_on:
                state, metrics, host = runner.train_step(state, local, step)
            else:
                state, metrics = step_fn(state, global_batch(local, train_sh))
            guard.dispatched(done, metrics.pop(FINITE), metrics)  # checks step `done` - 1, one step late
            first = step == start
            # a profiled step is always logged: its timing breakdown exists only in this step's host metrics
            if first or profiled or crossed(tokens - tps, tokens, cfg.telemetry.log_every_tokens or tps) or done == total:
                metrics_host = {k: float(v) for k, v in jax.device_get(metrics).items()}
                now = time.perf_counter()
                row = dict(metrics_host)
                if mc_on:
                    row.update(host)
                row.update({
                    "train/tokens": float(tokens),
                    "train/tokens_per_step": float(tps),
                    "train/grad_accum_steps": float(accum),
                })
                if last["time"] is not None and not profiled:  # the first step's time is mostly compilation
                    rate = (tokens - last["tokens"]) / (now - last["time"])
                    rates.append(rate)
                    row["train/tok_per_sec"] = rate
                    if peak and mc_on:  # base-model FLOPs over every WC entry; and per input token
                        row["train/mfu"] = mfu(rate, host["mc/flops_per_input_token"], jax.device_count(), peak)
                        row["train/mfu_input"] = mfu(rate, fpt, jax.device_count(), peak)
                    elif peak:
                        row["train/mfu"] = mfu(rate, fpt, jax.device_count(), peak)
                row.update(device_memory())
                last.update(time=now, tokens=tokens)
                telemetry.log(done, row)
                progress.update(done, row["train/loss"], row.get("train/tok_per_sec", float("nan")))
                guard.check()  # after its row is logged: metrics.jsonl shows the non-finite step
            if profiled:
                last.update(time=time.perf_counter(), tokens=tokens)
            if mc_on and crossed(tokens - tps, tokens, mc.dump_every_tokens or t.eval_every_tokens) and done != total:
                guard.check()
                dump(done)
            if crossed(tokens - tps, tokens, t.eval_every_tokens) and done != total:
                guard.check()
                val = evaluate(state.model_params())
                telemetry.log(done, val)
                progress.write(f"step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in val.items()))
                last["time"] = time.perf_counter()  # keep evaluation out of tok/s
            saved = crossed(tokens - tps, tokens, cfg.checkpoint.every_tokens) and done != total
            if saved:
                save(done)
            if t.time_limit_s and done != total and out_of_time(started, t.time_limit_s):
                if not saved:
                    save(done)
                log(f"step {done}: training.time_limit_s ({t.time_limit_s:g} s) reached; resume with --resume")
                end = done
                break
        else:
            end = total
            if start < total or latest is None:
                save(total)
        if mc_on and start < end:
            dump(end)
        val = evaluate(state.model_params())
        telemetry.log(end, val)
    except BaseException:
        telemetry.close()  # flush the sinks before the error (e.g. NonFiniteError) leaves
        raise
    finally:
        progress.close()
        ckpt.close()
    if is_main and cfg.telemetry.jsonl and (run_dir / "metrics.jsonl").is_file():
        plots = plot_run(run_dir / "metrics.jsonl", run_dir / "plots")
        log(f"plots: {', '.join(str(p) for p in plots)}")

    card = {
        "steps": float(end),
        "tokens": float(end * tps),
        "train/loss": metrics_host.get("train/loss", float("nan")),
        **{k: metrics_host[k] for k in ("train/delta_nll_mean", "mc/lod_delta/1", "mc/lens_loss") if k in metrics_host},
        **val,
        "train/tok_per_sec_median": float(round(statistics.median(rates))) if rates else float("nan"),
        "wall_seconds": time.perf_counter() - started,
        **device_memory(),
    }
    if rates and peak:
        card["train/mfu_median"] = mfu(card["train/tok_per_sec_median"], fpt, jax.device_count(), peak)
    telemetry.summary(card)
    telemetry.close()
    log(report_card(cfg.run, card))
    return card


def report_card(run: str, card: dict[str, float]) -> str:
    """A short table of what the run achieved."""
    width = max(len(k) for k in card)
    lines = [f"── report card: {run} " + "─" * max(0, 40 - len(run))]
    for k, v in card.items():
        text = f"{v:,.0f}" if float(v).is_integer() and abs(v) >= 1 else f"{v:.4f}"
        lines.append(f"  {k:<{width}}  {text}")
    return "\n".join(lines)


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
