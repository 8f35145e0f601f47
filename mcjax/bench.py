"""`mcjax bench`: the plain GPT step and the MegaContext step of one config, side by side.

Both run in this process on random tokens (speed does not depend on the text), at the
same batch of B sequences of T tokens, after warm-up; steps are timed in runs of 4
dispatched back to back between two synchronisations (as training runs them), median
over the runs:

  baseline  the GPT on B × T raw tokens (`train/step.py`);
  mc        the MegaContext step (`train/mc_step.py`): GistNet tree, the recency baseline
            and N variants per sequence at the variant length `--wc-length` × T, the GPT
            on every working context, LensNet and its loss, one update of all three nets;
  mc_no_edits  with megacontext.edit_candidates > 0, the same step without the per-block
            counterfactual edits (their cost: mc's throughput over this one's).

A mode whose compiled program needs more memory than the device has is not run (the
table says how much it needs): an out-of-memory error that can be foreseen is reported,
not raised.

Reported per mode: step ms, input tokens/s (B·T per step), two MFUs, the MC controller
breakdown (see `mc_runner.py`), the real WC entries per step (counted from the step's
layouts: baseline + variants), and memory: the XLA memory analysis of the compiled step
(arguments + temporaries + outputs not aliased to inputs) and, where the backend reports
it, the device's peak so far. MFU(real) is over the base-model FLOPs actually computed:
every real WC entry, attention at that WC's own width (W_max, W_v), as `train/mfu`
(`MCRunner.wc_work`). MFU(input) counts the plain GPT's FLOPs per input token at T, as
`train/mfu_input`: the rate of useful work beside the baseline row, not a utilisation
(at T ≫ W_max it can pass 1).
"""

from __future__ import annotations

import dataclasses
import json
import time

import jax
import numpy as np

from mcjax.config import Config
from mcjax.data.variants import VariantSpec, sample_layouts, variant_capacity
from mcjax.train.flops import config_flops_per_token, mfu, peak_flops
from mcjax.train.mc_runner import Batch, MCRunner, timed_ms
from mcjax.train.memory import device_limit_gb, device_memory, program_bytes
from mcjax.train.sharding import batch_sharding, global_batch, make_mesh
from mcjax.train.setup import build_parts
from mcjax.train.state import TrainState
from mcjax.train.step import jit_train_step, make_train_step


def _program_gb(jitted, *args) -> float:
    """GB the compiled program needs: arguments + temporaries + outputs not aliased to inputs."""
    total = program_bytes(jitted.lower(*args).compile().memory_analysis(), arguments=True)
    return float("nan") if total is None else total / 1e9


def bench_inputs(cfg: Config, batch: int) -> tuple[Config, np.ndarray]:
    """`cfg` at `batch` sequences in one micro-step, and a random batch: tokens int32 [1, batch, T+1]."""
    cfg = dataclasses.replace(
        cfg, training=dataclasses.replace(cfg.training, batch_size=batch, micro_batch_size=batch)
    )
    t, v = cfg.dataset.context_tokens, cfg.dataset.vocab_size
    return cfg, np.random.default_rng(0).integers(0, v, (1, batch, t + 1)).astype(np.int32)


def mc_setup(cfg: Config, tokens: np.ndarray, wc_length: float) -> tuple[MCRunner, TrainState, Batch]:
    """The MegaContext step of `cfg` ready to time on `tokens` [1, B, T+1]: its runner, a fresh
    state (a pretrained base loaded beside it), and the batch with layouts sampled at variant
    length `wc_length` × T."""
    t, b = cfg.dataset.context_tokens, tokens.shape[1]
    parts = build_parts(dataclasses.replace(cfg, megacontext=dataclasses.replace(cfg.megacontext, enabled=True)))
    runner = MCRunner(parts.cfg, parts.model, parts.tx, parts.shardings, parts.mesh, local_batch=b)
    spec = VariantSpec.from_config(cfg)
    target = int(round(wc_length * t))
    lay = sample_layouts(spec, target, seed=0, step=0, rows=np.arange(b))[None]
    return runner, parts.fresh(), Batch(tokens, lay, target, variant_capacity(target, spec))


def bench(cfg: Config, *, batch: int, wc_length: float, steps: int = 12, warmup: int = 3) -> dict:
    """Time both steps of `cfg` at `batch` sequences; returns the results table as a dict.
    The mesh is the context mesh, as in training (model/attention.py)."""
    cfg, tokens = bench_inputs(cfg, batch)
    mesh = make_mesh(cfg)
    with jax.set_mesh(mesh):
        return _bench(cfg, tokens, mesh, batch=batch, wc_length=wc_length, steps=steps, warmup=warmup)


def _bench(cfg: Config, tokens: np.ndarray, mesh, *, batch: int, wc_length: float, steps: int, warmup: int) -> dict:
    t = cfg.dataset.context_tokens
    sh = batch_sharding(mesh, leading=1)
    peak = peak_flops()
    fpt = config_flops_per_token(cfg, t)
    out: dict = {
        "device": jax.devices()[0].device_kind, "devices": jax.device_count(), "jax": jax.__version__,
        "config": cfg.name, "batch": batch, "seq": t, "variants": cfg.megacontext.num_random_variants,
        "policy_variants": cfg.megacontext.num_policy_variants,
        "wc_length": wc_length, "edit_candidates": cfg.megacontext.edit_candidates,
    }

    limit = device_limit_gb()

    def fits(mode: str) -> bool:
        need = out[f"{mode}_program_gb"]
        if limit is not None and need > limit:
            out[f"{mode}_skipped"] = f"needs {need:.1f} GB, the device has {limit:.1f}"
            return False
        return True

    # ---- baseline: the plain step of the base model (a pretrained one frozen, its LoRA training)
    plain = build_parts(dataclasses.replace(cfg, megacontext=dataclasses.replace(cfg.megacontext, enabled=False)))
    step = jit_train_step(make_train_step(plain.model, plain.tx, plain.cfg), plain.shardings, sh, plain.mesh)
    box = {"state": plain.fresh()}
    tok = global_batch(tokens, sh)
    out["baseline_program_gb"] = _program_gb(step, box["state"], tok)

    def run_base():
        box["state"], m = step(box["state"], tok)
        return m

    if fits("baseline"):
        ms = timed_ms(run_base, reps=max(1, steps // 4), warmup=warmup)
        out.update(baseline_step_ms=ms, baseline_tok_per_sec=batch * t / ms * 1e3)
        out["baseline_mfu"] = mfu(out["baseline_tok_per_sec"], fpt, jax.device_count(), peak)
        out["baseline_device_peak_gb"] = device_memory().get("runtime/gpu_memory_peak_gb", float("nan"))
    del box["state"], plain  # free the plain state before building the MegaContext one

    if cfg.megacontext.edit_candidates:  # ---- the MegaContext step without its counterfactual edits
        plain_mc = dataclasses.replace(cfg, megacontext=dataclasses.replace(cfg.megacontext, edit_candidates=0))
        runner, box["state"], mc_batch = mc_setup(plain_mc, tokens, wc_length)
        tok_g, lay_g = global_batch(tokens, sh), global_batch(mc_batch.layouts, sh)
        wv = mc_batch.variant_capacity
        out["mc_no_edits_program_gb"] = _program_gb(runner.step_fn, box["state"], tok_g, lay_g, wv)
        if fits("mc_no_edits"):
            def run_plain_mc():
                box["state"], m = runner.step_fn(box["state"], tok_g, lay_g, wv)
                return m

            ms = timed_ms(run_plain_mc, reps=max(1, steps // 4), warmup=warmup)
            out.update(mc_no_edits_step_ms=ms, mc_no_edits_tok_per_sec=batch * t / ms * 1e3)
        del box["state"], runner

    # ---- MegaContext step
    runner, box["state"], mc_batch = mc_setup(cfg, tokens, wc_length)
    wv = mc_batch.variant_capacity
    tok_g, lay_g = global_batch(tokens, sh), global_batch(mc_batch.layouts, sh)
    out["mc_program_gb"] = _program_gb(runner.step_fn, box["state"], tok_g, lay_g, wv)

    def run_mc():
        box["state"], m = runner.step_fn(box["state"], tok_g, lay_g, wv)
        return m

    if not fits("mc"):
        return {k: (round(x, 4) if isinstance(x, float) else x) for k, x in out.items()}
    ms = timed_ms(run_mc, reps=max(1, steps // 4), warmup=warmup)
    base_entries, var_entries, _ = runner.wc_work(mc_batch)
    fpit = runner.flops_per_input_token(mc_batch)
    t0 = time.perf_counter()
    runner.sample(tokens, 0)
    variant_ms = (time.perf_counter() - t0) * 1e3
    parts = runner.part_times(box["state"].model_params(), mc_batch)
    rate = batch * t / ms * 1e3
    out.update(
        mc_step_ms=ms,
        mc_tok_per_sec=rate,
        mc_mfu=mfu(rate, fpit, jax.device_count(), peak),
        mc_mfu_input=mfu(rate, fpt, jax.device_count(), peak),
        mc_wc_entries=base_entries + var_entries,
        mc_baseline_entries=base_entries,
        mc_variant_entries=var_entries,
        mc_variant_capacity=wv,
        **{f"mc_{k}": val for k, val in parts.items()},
        mc_variant_ms=variant_ms,
    )
    out["mc_other_ms"] = ms - sum(parts.values())
    out["mc_controller_share"] = sum(parts.values()) / ms
    if "mc_no_edits_step_ms" in out:
        out["mc_edit_throughput_share"] = out["mc_no_edits_step_ms"] / ms
    out["mc_device_peak_gb"] = device_memory().get("runtime/gpu_memory_peak_gb", float("nan"))
    return {k: (round(x, 4) if isinstance(x, float) else x) for k, x in out.items()}


def table(r: dict) -> str:
    """The results as the seed review's table: one row per mode (a mode that does not fit says so)."""
    width = f" (WC width {r['mc_variant_capacity']})" if "mc_variant_capacity" in r else ""
    lines = [
        f"{r['config']} on {r['devices']}× {r['device']} (jax {r['jax']}): batch {r['batch']} × {r['seq']} tokens, "
        f"{r['variants']} random + {r['policy_variants']} on-policy variants at {r['wc_length']:.0%} of the sequence{width}",
        f"{'mode':<11} {'step ms':>9} {'input tok/s':>12} {'MFU(real)':>10} {'MFU(input)':>11} {'program GB':>11}",
    ]
    for mode, real, inp in (("baseline", "baseline_mfu", "baseline_mfu"), ("mc_no_edits", None, None), ("mc", "mc_mfu", "mc_mfu_input")):
        if f"{mode}_program_gb" not in r:
            continue
        if f"{mode}_skipped" in r:
            lines.append(f"{mode:<11} not run: its program {r[f'{mode}_skipped']}")
            continue
        mfus = f"{r[real]:>10.3f} {r[inp]:>11.3f}" if real else f"{'':>10} {'':>11}"
        lines.append(f"{mode:<11} {r[f'{mode}_step_ms']:>9.1f} {r[f'{mode}_tok_per_sec']:>12,.0f} {mfus} "
                     f"{r[f'{mode}_program_gb']:>11.2f}")
    if "mc_step_ms" in r:
        policy = f", policy_ms {r['mc_policy_ms']:.2f}" if "mc_policy_ms" in r else ""
        lines += [
            f"mc controller: build_ms {r['mc_build_ms']:.2f}, variant_pack_ms {r['mc_variant_pack_ms']:.2f}, "
            f"lens_ms {r['mc_lens_ms']:.2f}{policy} ({r['mc_controller_share']:.1%} of the step), variant_ms (host) "
            f"{r['mc_variant_ms']:.2f}, other_ms {r['mc_other_ms']:.1f}",
            f"mc: {r['mc_wc_entries']:,} real WC entries per step ({r['mc_baseline_entries']:,} baseline + "
            f"{r['mc_variant_entries']:,} in variants)",
        ]
    if "mc_edit_throughput_share" in r:
        lines.append(f"mc with its {r['edit_candidates']} counterfactual edits per sequence: "
                     f"{r['mc_edit_throughput_share']:.0%} of the throughput without them")
    return "\n".join(lines)


def main(cfg: Config, *, batch: int, wc_length: float, steps: int, json_path: str = "") -> dict:
    r = bench(cfg, batch=batch, wc_length=wc_length, steps=steps)
    print(table(r))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(r, f, indent=1)
    return r
