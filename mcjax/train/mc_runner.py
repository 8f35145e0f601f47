"""Host side of MegaContext training: layouts for each batch, the jitted step, validation,
ΔNLL label tables, LOD dumps and the timing breakdown.

The training loop (`loop.py`) calls `train_step`, `eval_sums`/`val_metrics`, `dump` and
`profile`; everything here that touches the device goes through jitted programs.

Timing breakdown (`profile`, device-synchronised, on a cadence): the step is one XLA
program, so its parts cannot be timed inside it. `mc/step_ms` is one real training step
between two synchronisations; the controller parts are the same computations jitted alone
on the same batch, forward + backward (differentiated only with respect to what each part
trains), 4 calls back to back between two synchronisations, median of 3 such runs, times
the micro-steps per step:
  mc/build_ms         GistNet tree (LOD1, LOD2) over the token embeddings, differentiated
                      w.r.t. GistNet and the embeddings (their lookup and table gradient
                      are the GPT's, as in the plain step: they count in other_ms);
  mc/variant_pack_ms  assembly (gather) of the baseline and variant working contexts;
  mc/lens_ms          LensNet on every WC + its preference loss;
  mc/policy_ms        the on-policy choice (num_policy_variants > 0; forward only, no
                      gradient flows through it): LensNet on the policy start's WC and the
                      allocator's edits;
  mc/other_ms         step_ms − the parts above: the base model's forward and backward on
                      every WC (token embedding included), the other losses and the
                      optimizer update;
  mc/variant_ms       host time to sample the step's layouts (numpy, every step; it
                      overlaps the device work of the previous step).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mcjax.data.pipeline import row_tasks
from mcjax.data.variants import EVAL, VariantSpec, curriculum_target, sample_layouts, variant_capacity
from mcjax.megacontext import losses as L
from mcjax.megacontext.layout import entry_count, render
from mcjax.model.megacontext import MegaContextModel
from mcjax.telemetry.deltas import edit_table, label_table, write_labels
from mcjax.train.flops import config_flops_per_token
from mcjax.train.focus_eval import focus_metrics, make_focus_probe, row_sums
from mcjax.train.fit import Fitted
from mcjax.train.mc_step import MCForward, jit_mc_train_step, make_mc_eval_step, make_mc_probe, make_mc_train_step
from mcjax.train.sharding import batch_sharding, global_batch, replicated
from mcjax.train.state import TrainState


def timed_ms(fn, *args, reps: int = 3, warmup: int = 1, calls: int = 4) -> float:
    """Milliseconds per call of `fn(*args)`: `calls` calls dispatched back to back between two
    synchronisations (so the host's dispatch and sync latency is paid once, as in training),
    median over `reps` such runs, after `warmup` calls (compile included)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / calls)
    return statistics.median(times) * 1e3


@dataclasses.dataclass
class Batch:
    """One step's host arrays: tokens int32 [A, b, T+1], layouts int8 [A, b, M, N1] (b: this
    process's sequences per micro-step), the curriculum target and the variants' WC width."""

    tokens: np.ndarray
    layouts: np.ndarray
    target: int
    variant_capacity: int


class MCRunner:
    def __init__(self, cfg, model: MegaContextModel, tx, shardings: TrainState, mesh, *, local_batch: int):
        self.cfg, self.mesh = cfg, mesh
        self.spec = VariantSpec.from_config(cfg)
        mc = cfg.megacontext
        # Validation: baseline, one random layout and (focus_eval) the policy start, per row.
        self.focus = mc.focus_eval
        self.eval_spec = dataclasses.replace(self.spec, num_variants=1, num_policy=int(self.focus))
        self.eval_target = int(round((mc.eval_wc_length or mc.train_wc_length) * cfg.dataset.context_tokens))
        self.local_batch = local_batch
        self.fw = MCForward(model, cfg)
        sh1, sh0 = batch_sharding(mesh, leading=1), batch_sharding(mesh, leading=0)
        self.sh1, self.sh0 = sh1, sh0
        self.step_fn = jit_mc_train_step(make_mc_train_step(model, tx, cfg), shardings, sh1, sh1, mesh)
        t = cfg.training
        self.fitted_step = Fitted(  # compiled per variant width, checked against free memory before it runs
            self.step_fn,
            lambda wv: f"the training step ({t.micro_batch_size or t.batch_size} sequences of {cfg.dataset.context_tokens:,} "
            f"tokens per micro-step, W_max {cfg.wc_capacity:,}, variants of {wv:,} entries)",
            "lower training.micro_batch_size, megacontext.wc_capacity, megacontext.edit_candidates or dataset.context_tokens",
        )
        rep = replicated(mesh)
        self.eval_fn = jax.jit(
            make_mc_eval_step(model, cfg), in_shardings=(shardings.model_params(), sh0, sh0, rep), out_shardings=rep, static_argnums=4
        )
        self.probe_fn = jax.jit(
            make_mc_probe(model, cfg), in_shardings=(shardings.model_params(), shardings.stats, sh0, sh0), out_shardings=rep, static_argnums=4
        )
        if self.focus:
            self.focus_fn = jax.jit(
                make_focus_probe(model, cfg), in_shardings=(shardings.model_params(), sh0, sh0, sh0, sh0), out_shardings=rep,
                static_argnums=5,
            )
        self._val_tasks: tuple[np.ndarray, ...] | None = None  # (task, answer_tokens, needle) per val row
        self._fpt = lambda seq: config_flops_per_token(cfg, seq)
        self.last: Batch | None = None

    # ------------------------------------------------------------------ training
    def sample(self, tokens: np.ndarray, step: int) -> tuple[Batch, float]:
        """Layouts for this process's rows at `step`. tokens [A, b, T+1] -> (Batch, host ms)."""
        t0 = time.perf_counter()
        a, b = tokens.shape[:2]
        rows = jax.process_index() * self.local_batch + np.arange(a * b)
        target = curriculum_target(step, self.cfg.total_steps, self.cfg)
        lay = sample_layouts(self.spec, target, seed=self.cfg.training.seed, step=step, rows=rows)
        batch = Batch(tokens, lay.reshape(a, b, *lay.shape[1:]), target, variant_capacity(target, self.spec))
        return batch, (time.perf_counter() - t0) * 1e3

    def train_step(self, state: TrainState, tokens: np.ndarray, step: int):
        """One optimizer step on this process's tokens [A, b, T+1]. -> (state, device metrics, host metrics)."""
        batch, ms = self.sample(tokens, step)
        state, metrics = self.fitted_step(
            state, global_batch(batch.tokens, self.sh1), global_batch(batch.layouts, self.sh1), batch.variant_capacity
        )
        self.last = batch
        host = {
            "mc/variant_ms": ms,
            "mc/target_length": float(batch.target),
            "mc/variant_capacity": float(batch.variant_capacity),
            "mc/variants_mean": float(self.spec.num_variants + self.spec.num_policy),
            "mc/policy_variants": float(self.spec.num_policy),
            "mc/grad_accum_steps": float(tokens.shape[0]),
            "train/horizon_length": float(self.cfg.dataset.horizon),
            "mc/flops_per_input_token": self.flops_per_input_token(batch),
        }
        return state, metrics, host

    def wc_work(self, batch: Batch) -> tuple[int, int, float]:
        """The base model's work on every WC of the batch: (baseline entries, variant entries,
        training FLOPs). Entries are real (unpadded) ones, counted from the layouts (an on-policy
        variant at its start's entries: the allocator's edit never exceeds them); the FLOPs
        are over those entries, with attention counted at each WC's own width (W_max for the
        baseline, W_v for the variants), never at T."""
        k = self.spec.block_size
        lay = batch.layouts.reshape(-1, *batch.layouts.shape[-2:])
        base = sum(entry_count(seq[0], k) for seq in lay)
        var = sum(entry_count(v, k) for seq in lay for v in seq[1:])
        return base, var, base * self._fpt(self.spec.capacity) + var * self._fpt(batch.variant_capacity)

    def flops_per_input_token(self, batch: Batch) -> float:
        """`wc_work`'s FLOPs per input token of the batch (B·T tokens)."""
        rows = batch.layouts[..., 0, 0].size
        return self.wc_work(batch)[2] / (rows * self.spec.tokens)

    # ------------------------------------------------------------------ validation
    def eval_sums(self, params, local: np.ndarray, index: int, token_bytes) -> dict[str, float]:
        """Sums of one validation batch: baseline + one random layout per row, and with
        focus_eval the focus probe's per-row results (`focus_eval.row_sums`)."""
        b, procs = local.shape[0], jax.process_count()
        rows = (index * procs + jax.process_index()) * b + np.arange(b)
        lay = sample_layouts(self.eval_spec, self.eval_target, seed=self.cfg.training.seed, step=0, rows=rows, stream=EVAL)
        cap = variant_capacity(self.eval_target, self.eval_spec)
        tok_g = global_batch(local, self.sh0)
        out = self.eval_fn(params, tok_g, global_batch(lay[:, :2], self.sh0), token_bytes, cap)
        sums = {k: float(v) for k, v in jax.device_get(out).items()}
        if self.focus:
            task, answer, needle = self.val_tasks()
            mine = answer[rows].astype(np.int32)
            block = np.where(needle[rows] >= 0, needle[rows] // self.spec.block_size, -1).astype(np.int32)
            per_row = jax.device_get(self.focus_fn(params, tok_g, global_batch(lay, self.sh0), global_batch(mine, self.sh0),
                                                   global_batch(block, self.sh0), cap))
            sums.update(row_sums(per_row, task[index * procs * b : (index + 1) * procs * b]))
        return sums

    def val_tasks(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(task id int8, answer tokens int16, fact start int32) of every val row (`data/tasks.py`), read once."""
        if self._val_tasks is None:
            self._val_tasks = row_tasks(self.cfg.dataset.splits["val"].output_path)
        return self._val_tasks

    @staticmethod
    def val_metrics(s: dict[str, float]) -> dict[str, float]:
        ln2 = float(np.log(2))
        out = {
            "val/loss": s["base/nll_sum"] / s["base/entries"],
            "val/bpb": s["base/text_nll_sum"] / (ln2 * max(s["base/bytes"], 1.0)),
            "val/horizon_loss": s["base/horizon_nll_sum"] / s["base/horizon_tokens"],
        }
        if "mc/nll_sum" in s:
            out.update({
                "val/mc_loss": s["mc/nll_sum"] / s["mc/entries"],
                "val/mc_bpb": s["mc/text_nll_sum"] / (ln2 * max(s["mc/bytes"], 1.0)),
                "val/mc_horizon_loss": s["mc/horizon_nll_sum"] / s["mc/horizon_tokens"],
            })
            out["val/delta_nll"] = out["val/mc_horizon_loss"] - out["val/horizon_loss"]
        out.update(focus_metrics(s))
        return out

    # ------------------------------------------------------------------ cadence work
    def dump(self, state: TrainState, step: int, out_dir: Path, run_dir: Path, is_main: bool) -> str | None:
        """ΔNLL label table of the last batch's first micro-step, and an ASCII LOD dump of its
        first sequence (on-policy variants as the probe chose them). Returns the dump text
        (None without variants)."""
        batch, spec = self.last, self.spec
        if batch is None or spec.num_variants + spec.num_policy == 0:
            return None
        tok = batch.tokens[0]
        probe = jax.device_get(self.probe_fn(
            state.model_params(), state.stats, global_batch(tok, self.sh0), global_batch(batch.layouts[0], self.sh0),
            batch.variant_capacity,
        ))
        if not is_main:
            return None
        table = label_table(probe, step=step, block_size=spec.block_size, target_length=batch.target)
        write_labels(table, Path(out_dir) / "deltas", self.cfg.run, step)
        if "edit_units" in probe:
            edits = edit_table(probe, step=step, num_blocks=spec.num_blocks, block_size=spec.block_size, timestamp=time.time())
            write_labels(edits, Path(out_dir) / "deltas", self.cfg.run, step, kind="edits")
        lay, k = probe["layouts"][0], spec.block_size
        lines = [f"step {step}: LOD layouts of sequence 0 ('.' LOD0, '─' LOD1, '═' LOD2; one char per block)"]
        lines.append(f"  baseline  {render(lay[0])}  {entry_count(lay[0], k):5d} entries")
        for v in range(1, len(lay)):
            name = f"variant {v}" if v <= spec.num_variants else f"policy {v - spec.num_variants} "
            lines.append(f"  {name} {render(lay[v])}  {entry_count(lay[v], k):5d} entries  ΔNLL {probe['delta'][0, v - 1]:+.3f}")
        text = "\n".join(lines)
        with open(Path(run_dir) / "lod_dumps.txt", "a") as f:
            f.write(text + "\n")
        return text

    def profile(self, state: TrainState, tokens: np.ndarray, step: int):
        """One real training step timed between synchronisations, plus the controller parts
        jitted alone (see the module doc). -> (state, device metrics, host metrics)."""
        jax.block_until_ready(state)
        t0 = time.perf_counter()
        state, metrics, host = self.train_step(state, tokens, step)
        jax.block_until_ready((state, metrics))
        step_ms = (time.perf_counter() - t0) * 1e3
        parts = self.part_times(state.model_params(), self.last)
        host.update({f"mc/{k}": v for k, v in parts.items()})
        host["mc/step_ms"] = step_ms
        host["mc/other_ms"] = step_ms - sum(parts.values())
        return state, metrics, host

    def part_programs(self, params, batch: Batch) -> dict[str, tuple]:
        """The controller parts of one micro-step jitted alone, forward + backward, each
        differentiated only with respect to what it trains (so no zero gradients are
        materialised for the rest), and the on-policy choice (forward only):
        {"build_ms" | "variant_pack_ms" | "lens_ms" [| "policy_ms"]: (fn, args)}."""
        fw = self.fw
        tok = global_batch(batch.tokens[0], self.sh0)
        lay = global_batch(batch.layouts[0], self.sh0)
        cap, wv = fw.capacity, batch.variant_capacity

        def sq(tree):
            return sum(jnp.vdot(x, x).real.astype(jnp.float32) for x in jax.tree.leaves(tree))

        # The token embedding (lookup and table gradient) is the GPT's own work, as in the plain
        # step: build_ms is GistNet over the embeddings, differentiated w.r.t. its params and them.
        emb = jax.jit(fw.embed)(params, tok)
        build = jax.jit(jax.grad(lambda gistnet, emb: sq(fw.gists(gistnet, emb)[1:]), argnums=(0, 1)))
        tree = jax.jit(fw.gists)(params["gistnet"], emb)

        def wcs(tree, lay):
            base = fw.assemble(tree, lay[:, :1], cap)
            var = fw.assemble(tree, lay[:, 1:], wv) if wv else None
            return base, var

        pack = jax.jit(jax.grad(lambda tree, lay: sq([w.emb for w in wcs(tree, lay) if w is not None])))
        base, var = jax.jit(wcs)(tree, lay)

        def lens_loss(lensnet, params, base, var, lay):
            p = {**params, "lensnet": lensnet}
            s_var = None if var is None else fw.scores(p, var)
            costs = fw.layout_costs(lay, base, fw.scores(p, base), var, s_var)
            return L.preference_loss(costs, jnp.zeros_like(costs), 0.0, 1.0, 1.0)

        lens = jax.jit(jax.grad(lens_loss))
        parts = {
            "build_ms": (build, (params["gistnet"], emb)),
            "variant_pack_ms": (pack, (tree, lay)),
            "lens_ms": (lens, (params["lensnet"], params, base, var, lay)),
        }
        if fw.num_policy:
            policy = jax.jit(lambda params, tree, start, key: fw.policy(params, tree, start, fw.num_policy, wv, key, fw.explore))
            parts["policy_ms"] = (policy, (params, tree, lay[:, -1], jax.random.key(0)))
        return parts

    def part_times(self, params, batch: Batch) -> dict[str, float]:
        """build_ms, variant_pack_ms, lens_ms (and policy_ms) of one step: each part alone × the micro-steps."""
        a = batch.tokens.shape[0]
        return {name: a * timed_ms(fn, *args) for name, (fn, args) in self.part_programs(params, batch).items()}
