"""The MegaContext train and eval steps: base model, GistNet and LensNet in one jitted program.

A batch is `tokens int [A, B, T+1]` (A accumulation micro-steps of B sequences, one
lookahead token each) and `layouts int8 [A, B, M, N1]` (M = 1 + N + P: the recency
baseline, N random variants, and P copies of the *policy start* — the recency layout at
the variants' target — all sampled on the host by `data/variants.py`). Per micro-step, on
the device:

1. embed the T tokens; GistNet builds LOD1/LOD2 in one batched call per level;
2. on-policy variants (P > 0): LensNet scores the policy start's WC and the focus
   allocator edits it P times (`MCForward.policy`: Gumbel top-k, thresholds off, so
   every variant is LensNet's own sampled choice of swaps at the start's budget); the
   edited layouts replace the P start copies. No gradient flows through the choice;
3. assemble the baseline WCs `[B, W_max]` and the variant WCs `[B·(N+P), W_v]` (W_v: a
   static width from the host, see `variants.variant_capacity`);
4. the GPT runs on every WC (positions and spans from the WC: Gaussian RoPE); every entry
   predicts the token right after its span (targets up to index T: the lookahead), so
   no entry is ever trained on a token it contains;
5. losses: the mean over WCs of each WC's mean entry NLL (GPT and GistNet learn through
   it); gist-delta penalty `gist_delta_weight · relu(ΔNLL)`; optional KL of the variants'
   horizon distributions to the baseline's (`gist_kl_weight`); LensNet's Bradley–Terry
   preference loss (`losses.py`, `lens_loss_weight`); with `edit_candidates`, LensNet's
   ranking of per-block counterfactual edits of the first on-policy layout, each measured
   by a forward of the base (`megacontext/edits.py`, `edit_loss_weight`). LensNet reads the
   WCs with their embeddings under stop-gradient: its losses train LensNet only. With
   gistnet.read_gate the base reads gist entries through its learned attention bias.
6. one optax update of all three nets; the running ΔNLL statistics that normalise
   LensNet's labels fold in this step's ΔNLLs.

Metrics come back as one pytree of scalars (names as in the telemetry spec), with
`train/finite` as in the plain step (`step.finite_flag`); ΔNLL statistics are also split
by kind (`mc/adv_delta_random_*`, `mc/adv_delta_policy_*`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from mcjax.megacontext import edits as E
from mcjax.megacontext import losses as L
from mcjax.megacontext.allocator import AllocatorParams, entries, never_changed, refocus, unit_scores
from mcjax.megacontext.attention_rival import rival_scores, tail_attention
from mcjax.megacontext.layout import WorkingContext, assemble, rope_positions
from mcjax.megacontext.tree import build_tree
from mcjax.model.gistnet import read_bias
from mcjax.model.megacontext import MegaContextModel
from mcjax.model.xent import softcap_logits, token_nll
from mcjax.train.frozen import merge
from mcjax.train.optim import lr_multiplier
from mcjax.train.state import TrainState
from mcjax.train.step import FINITE, finite_flag


def initial_stats() -> dict:
    """TrainState.stats of a MegaContext run: the running moments (losses.ema_update) of the
    variants' ΔNLL and of the edits' counterfactual values."""
    return {"delta_ema": L.empty_ema(), "edit_ema": L.empty_ema()}


def _flat(wc: WorkingContext) -> WorkingContext:
    """[B, N, W, ...] -> [B·N, W, ...]."""
    return jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), wc)


def policy_params(cfg, *, explore: bool) -> AllocatorParams:
    """The allocator that makes on-policy layouts: the engine's (`AllocatorParams.from_config`:
    its spans, fill and replacements) with thresholds off (LensNet's best-ranked swaps are always
    taken), `megacontext.policy_rounds` rounds of collapses then expands and no cooldown.
    explore: Gumbel top-k at policy_temperature (training labels); else greedy (validation).
    Its budget (w_max) is set per layout by `MCForward.policy`."""
    mc = cfg.megacontext
    return dataclasses.replace(
        AllocatorParams.from_config(cfg),
        expand_threshold=-jnp.inf,
        collapse_threshold=-jnp.inf,
        cooldown_steps=0,
        iterations=mc.policy_rounds,
        policy="stochastic" if explore else "greedy",
        temperature=mc.policy_temperature,
    )


class MCForward:
    """The device-side pieces of a MegaContext step for one config (pure functions of params)."""

    def __init__(self, model: MegaContextModel, cfg, *, train: bool = False):
        self.gpt, self.gist, self.lens = model.gpt, model.gistnet, model.lensnet
        # LoRA dropout of a pretrained base, in the train step only
        self.dropout = train and cfg.pretrained and cfg.lora.rank > 0 and cfg.lora.dropout > 0
        self.cfg = cfg
        self.k = cfg.dataset.block_size
        self.horizon = cfg.dataset.horizon
        self.capacity = cfg.wc_capacity
        t = cfg.dataset.context_tokens
        self.max_lod = cfg.megacontext.max_lod if t >= self.k * self.k else 1  # LOD2 needs a whole superblock
        self.tail_blocks = cfg.megacontext.recent_tokens // self.k  # never compressed: no gists built
        self.head_blocks = cfg.megacontext.sink_tokens // self.k  # the protected head: never compressed either
        self.gaussian = cfg.megacontext.rope == "gaussian"
        self.num_policy = cfg.megacontext.num_policy_variants  # the last P layouts: the policy start
        self.explore = policy_params(cfg, explore=True)

    def embed(self, params, tokens):
        """tokens int [B, T+1] -> the GPT's embeddings of the first T tokens [B, T, D]."""
        return self.gpt.apply({"params": params["gpt"]}, tokens[:, :-1], method="embed")

    def tree(self, params, tokens):
        """tokens int [B, T+1] -> the LOD tree of the first T tokens."""
        return self.gists(params["gistnet"], self.embed(params, tokens))

    def gists(self, gistnet_params, emb):
        """GistNet over token embeddings [B, T, D] -> the LOD tree (tail gists left out)."""
        gist = lambda x, mask=None: self.gist.apply({"params": gistnet_params}, x, mask)  # noqa: E731
        return build_tree(gist, emb, self.k, self.max_lod, self.tail_blocks)

    def assemble(self, tree, layouts, capacity: int) -> WorkingContext:
        """layouts int8 [B, M, N1] -> WCs [B·M, capacity] (sequence-major)."""
        one = lambda lod, l0, l1, l2: assemble(lod, l0, l1, l2, capacity)  # noqa: E731
        per_seq = jax.vmap(one, in_axes=(0, None, None, None))
        return _flat(jax.vmap(per_seq)(layouts, tree.lod0, tree.lod1, tree.lod2))

    def hidden(self, params, wc: WorkingContext, key=None):
        """The base model's final hidden states on WCs [R, W] -> [R, W, D]; key: LoRA dropout
        (with `self.dropout`)."""
        extra = {"dropout_key": key} if self.dropout and key is not None else {}
        return self.gpt.apply(
            {"params": params["gpt"]},
            embeddings=wc.emb,
            positions=rope_positions(wc, self.cfg.megacontext.positions),
            spans=wc.span if self.gaussian else None,
            gist_gate=self.gist_gate(params, wc),
            **extra,
        )

    def _nll(self, params, hidden, targets):
        """hidden [R, W, D], targets int [R, W] -> NLL f32 [R, W] (head + cross-entropy)."""
        m = self.cfg.base_model
        head = self.gpt.apply({"params": params["gpt"]}, method="head")
        r, w, d = hidden.shape
        return token_nll(
            hidden.reshape(r * w, d), head, targets.reshape(-1),
            softcap=self.gpt.softcap, chunk_tokens=m.loss_chunk_tokens, mode=m.loss_impl,
        ).reshape(r, w)

    def entry_nll(self, params, wc: WorkingContext, tokens, key=None):
        """GPT on WCs [R, W]; tokens int [R, T+1]; key: LoRA dropout (with `self.dropout`).
        -> (nll f32 [R, W] (0 on padding), hidden [R, W, D])."""
        hidden = self.hidden(params, wc, key)
        nll = self._nll(params, hidden, jnp.take_along_axis(tokens, wc.target, axis=1))
        return jnp.where(wc.valid, nll, 0.0), hidden

    def horizon_token_nll(self, params, wc: WorkingContext, tokens):
        """NLL of each horizon token — the last H entries, raw in every layout — of WCs [R, W];
        tokens int [R, T+1]. Only those entries go through the head. -> f32 [R, H]."""
        idx = wc.valid.sum(-1)[:, None] - self.horizon + jnp.arange(self.horizon)  # [R, H]
        h = jnp.take_along_axis(self.hidden(params, wc), idx[..., None], axis=1)
        targets = jnp.take_along_axis(tokens, jnp.take_along_axis(wc.target, idx, axis=1), axis=1)
        return self._nll(params, h, targets)

    def horizon_nll(self, params, wc: WorkingContext, tokens):
        """Mean NLL of the horizon of WCs [R, W] (`horizon_token_nll`). -> f32 [R]."""
        return self.horizon_token_nll(params, wc, tokens).mean(-1)

    def edits(self, params, tree, tokens, ref, wc: WorkingContext, scores, ref_nll, capacity: int, key):
        """Counterfactual utilities of edits (of megacontext.edit_group units each) of each
        sequence's on-policy layout (`megacontext/edits.py`), then megacontext.edit_halvings
        rounds narrowing its best expand group. ref int8 [B, N1] and its WCs [B, W_v] with LensNet's scores
        (differentiable) and horizon NLL ref_nll [B]; capacity: the variants' width W_v.
        -> (candidates [B, C + h], predicted values f32 [B, C + h], labels f32 [B, C + h])."""
        mc, (b, n1) = self.cfg.megacontext, ref.shape
        us = jax.vmap(lambda w, s: unit_scores(w, s, n1, self.k))(wc, scores)
        expands = int(round(mc.edit_candidates * mc.edit_expand_share))
        g = mc.edit_group
        draw = lambda key, lod, u: E.candidates(key, lod, u, self.explore, expands, mc.edit_candidates - expands,  # noqa: E731
                                                mc.edit_explore, mc.policy_temperature, g)
        cand = jax.vmap(draw)(jax.random.split(key, b), ref, us)
        frozen = jax.lax.stop_gradient((params, tree))  # labels: forward only
        one = jax.vmap(E.apply_edit, in_axes=(None, 0, 0, 0, None))
        base_nll = jax.lax.stop_gradient(ref_nll)

        def label(units, members, expand, most: int):  # [B, C', G] … -> values [B, C'] (most: members moved at most)
            edited = jax.vmap(one, in_axes=(0, 0, 0, 0, None))(ref, units, members, expand, self.k)
            ewc = self.assemble(frozen[1], edited, capacity + most * (self.k - 1))  # [B·C', …]: an expand adds K − 1 per unit
            c = units.shape[1]
            nll = self.horizon_nll(frozen[0], ewc, jnp.repeat(tokens, c, axis=0)).reshape(b, c)
            return E.raw_value(nll, base_nll, expand)

        value = label(cand.units, cand.members, cand.expand, g)
        if mc.edit_halvings:  # narrow each sequence's best expand group down (edits.py)
            units, current, parent = jax.vmap(E.best_expand)(cand, value)
            halves, values = [], []
            for r in range(mc.edit_halvings):
                tested = E.halve(current)
                yes = jnp.ones((b, 1), bool)
                v = label(units[:, None], tested[:, None], yes, -(-g // 2 ** (r + 1)))[:, 0]
                halves.append(tested)
                values.append(v)
                current, parent = E.narrow(current, tested, parent, v)
            h = len(halves)
            members = jnp.stack(halves, axis=1)
            cand = E.Candidates(
                jnp.concatenate([cand.units, jnp.repeat(units[:, None], h, axis=1)], axis=1),
                jnp.concatenate([cand.members, members], axis=1),
                jnp.concatenate([cand.expand, jnp.ones((b, h), bool)], axis=1),
                jnp.concatenate([cand.valid, members.any(-1)], axis=1),
            )
            value = jnp.concatenate([value, jnp.stack(values, axis=1)], axis=1)
        return cand, jax.vmap(E.predicted_value)(us, cand), value

    def gate_bias(self, params):
        """The base's attention-logit bias toward gists f32 [L, N] (gistnet.read_gate), or None."""
        g = self.cfg.gistnet
        return read_bias(params["gistnet"], g.read_gate_init, g.read_gate_scale)

    def gist_gate(self, params, wc: WorkingContext):
        """The base's read gate on the WCs' gist entries (gistnet.read_gate), or None."""
        bias = self.gate_bias(params)
        return None if bias is None else (bias, wc.lod > 0)

    def scores(self, params, wc: WorkingContext):
        """LensNet on WCs [R, W] with their embeddings under stop-gradient. -> f32 [R, W]."""
        wc = wc._replace(emb=jax.lax.stop_gradient(wc.emb))
        return self.lens.apply({"params": params["lensnet"]}, wc)

    def rival_scores(self, params, wc: WorkingContext):
        """The training-free rival's entry scores on WCs [R, W] (`attention_rival.py`): the base's
        attention mass from the protected tail, over megacontext.rival_layers. -> f32 [R, W]."""
        tail = self.cfg.megacontext.recent_tokens
        mass = tail_attention(self.gpt, params["gpt"], wc, tail, gaussian=self.gaussian, gate=self.gist_gate(params, wc),
                              positions=self.cfg.megacontext.positions)
        return rival_scores(mass, wc, tail, tuple(self.cfg.megacontext.rival_layers))

    def policy(self, params, tree, start, count: int, capacity: int, key, alloc: AllocatorParams, scorer=None):
        """On-policy layouts: `count` allocator edits of each start layout, at its own budget.

        start int8 [B, N1]: the layouts to edit (≤ capacity entries); key: PRNG key; scorer:
        (params, WCs [B, W]) -> entry scores [B, W] in place of LensNet's (`self.scores`).
        -> (layouts int8 [B, count, N1] (no gradient), stats of `allocator.refocus` [B, count]).
        """
        wc = self.assemble(tree, start[:, None], capacity)  # [B, W]
        scores = jax.lax.stop_gradient((scorer or self.scores)(params, wc))
        b, n1 = start.shape
        keys = jax.random.split(key, (b, count))

        def one(lod, wc, s, key):
            p = dataclasses.replace(alloc, w_max=entries(lod, self.k))
            new, _, stats = refocus(lod, wc, s, never_changed(n1), 0, key, p)
            return new, stats

        per_row = jax.vmap(one, in_axes=(None, None, None, 0))
        return jax.vmap(per_row)(start, wc, scores, keys)

    def layout_costs(self, layouts, base, s_base, var=None, s_var=None):
        """LensNet's cost c_l of each layout (losses.py). layouts int8 [B, M, N1]; base WCs
        [B, W] and their scores; variant WCs [B·N, W_v] and scores (None without variants).
        -> f32 [B, M]."""
        b, m, n1 = layouts.shape
        per_wc = jax.vmap(L.block_scores, in_axes=(0, 0, 0, None))
        u = [per_wc(base, s_base, layouts[:, 0], self.k)[:, None]]
        if var is not None:
            u.append(per_wc(var, s_var, layouts[:, 1:].reshape(-1, n1), self.k).reshape(b, m - 1, n1))
        return jax.vmap(L.layout_costs)(jnp.concatenate(u, axis=1), layouts)

    def horizon_logprobs(self, params, hidden, wc: WorkingContext):
        """Log-probabilities of the H horizon entries, f32 [R, H, V] (they are the last H valid entries)."""
        n = wc.valid.sum(-1)
        idx = n[:, None] - self.horizon + jnp.arange(self.horizon)
        h = jnp.take_along_axis(hidden, idx[..., None], axis=1)
        head = self.gpt.apply({"params": params["gpt"]}, method="head")
        return jax.nn.log_softmax(softcap_logits(h, head, self.gpt.softcap), axis=-1)


def _per_wc_mean(nll, valid):
    return nll.sum(-1) / jnp.maximum(valid.sum(-1), 1)


def mc_loss(fw: MCForward, params, tokens, layouts, stats, variant_capacity: int, key, details: bool = False):
    """Loss and metrics of one micro-batch. tokens int [B, T+1]; layouts int8 [B, M, N1]
    (the last P = megacontext.num_policy_variants: the policy start); stats: the running
    label moments (`initial_stats`); key: PRNG key of the on-policy choices and edits.

    Returns (loss, (metrics dict of f32 scalars, labels)) with labels {"delta": variant
    ΔNLLs f32 [B, N+P], "edit": edit values f32 [B, C], "edit_valid": bool [B, C]}; with
    `details`, the metrics also hold the variants' per-entry arrays [B·(N+P), W_v] (lod, pos,
    span, valid, nll, entry_delta, score), the layouts the step used and the edits, for
    label tables and LOD dumps.
    """
    mc = fw.cfg.megacontext
    moments = L.ema_moments(stats["delta_ema"], mc.advantage_ema)
    b, t1 = tokens.shape
    t, m = t1 - 1, layouts.shape[1]
    n, p = m - 1, fw.num_policy
    tree = fw.tree(params, tokens)
    metrics = {}
    if p:
        start = layouts[:, -1]
        chosen, moved = fw.policy(params, tree, start, p, variant_capacity, key, fw.explore)
        layouts = jnp.concatenate([layouts[:, : m - p], chosen.astype(layouts.dtype)], axis=1)
        metrics["mc/policy_swaps"] = (moved["num_expands"] + moved["num_collapses"]).mean(dtype=jnp.float32)
        metrics["mc/policy_changed"] = (chosen != start[:, None]).any(-1).mean(dtype=jnp.float32)

    base = fw.assemble(tree, layouts[:, :1], fw.capacity)  # [B, W]
    nll_b, hid_b = fw.entry_nll(params, base, tokens, jax.random.fold_in(key, 1))
    hor_b = (nll_b * L.horizon_mask(base, t, fw.horizon)).sum(-1) / fw.horizon  # [B]
    wc_means = [_per_wc_mean(nll_b, base.valid)]
    s_b = fw.scores(params, base)
    var = s_v = None
    lod_sums = [(nll_b, base.lod, base.valid)]
    score_sets = [(s_b, base.valid)]
    util = [base.valid.sum(-1) / fw.capacity]
    loss_extra = jnp.zeros((), jnp.float32)
    edit = {"edit": jnp.zeros((b, 0), jnp.float32), "edit_valid": jnp.zeros((b, 0), bool)}
    edit_details = {}

    if n:
        var = fw.assemble(tree, layouts[:, 1:], variant_capacity)  # [B·N, W_v]
        tok_v = jnp.repeat(tokens, n, axis=0)
        nll_v, hid_v = fw.entry_nll(params, var, tok_v, jax.random.fold_in(key, 2))
        hor_v = ((nll_v * L.horizon_mask(var, t, fw.horizon)).sum(-1) / fw.horizon).reshape(b, n)
        delta = hor_v - jax.lax.stop_gradient(hor_b)[:, None]  # ΔNLL [B, N]
        wc_means.append(_per_wc_mean(nll_v, var.valid))
        lod_sums.append((nll_v, var.lod, var.valid))
        util.append(var.valid.sum(-1) / fw.capacity)
        if mc.gist_delta_weight:
            loss_extra += mc.gist_delta_weight * jax.nn.relu(delta).mean()
        if mc.gist_kl_weight:
            teacher = jax.lax.stop_gradient(fw.horizon_logprobs(params, hid_b, base))  # [B, H, V]
            student = fw.horizon_logprobs(params, hid_v, var).reshape((b, n) + teacher.shape[1:])
            kl = (jnp.exp(teacher)[:, None] * (teacher[:, None] - student)).sum(-1).mean()
            loss_extra += mc.gist_kl_weight * kl
            metrics["mc/gist_kl"] = kl
        s_v = fw.scores(params, var)
        score_sets.append((s_v, var.valid))

        # Per-entry ΔNLL: a variant entry against the baseline entry with the same target token.
        rows = jnp.arange(b)[:, None]
        by_target = jnp.zeros((b, t1), jnp.float32).at[rows, base.target].add(jnp.where(base.valid, nll_b, 0.0))
        has = jnp.zeros((b, t1), bool).at[rows, base.target].max(base.valid)
        seq = jnp.repeat(jnp.arange(b), n)[:, None]
        entry_delta = jax.lax.stop_gradient(nll_v - by_target[seq, var.target])
        comparable = var.valid & has[seq, var.target]
        for level in range(1, fw.max_lod + 1):
            metrics[f"mc/lod_delta/{level}"] = L.masked_mean(entry_delta, comparable & (var.lod == level))
        gists = comparable & (var.lod > 0)
        metrics["mc/pref_span_corr"] = L.pearson(s_v.reshape(-1), entry_delta.reshape(-1), gists.reshape(-1))

        d = jax.lax.stop_gradient(delta)
        for name in ("train/delta_nll", "mc/adv_delta"):
            metrics[f"{name}_mean"] = d.mean()
            metrics[f"{name}_p95"] = jnp.percentile(d, 95)
        metrics["mc/adv_delta_std"] = d.std()
        if p:  # by kind: the random variants, then the on-policy ones
            for kind, part in (("random", d[:, : n - p]), ("policy", d[:, n - p :])):
                if part.size:
                    metrics[f"mc/adv_delta_{kind}_mean"] = part.mean()
                    metrics[f"mc/adv_delta_{kind}_p95"] = jnp.percentile(part, 95)
        metrics["mc/horizon_loss_variants"] = jax.lax.stop_gradient(hor_v).mean()
        metrics["mc/variant_entries_mean"] = var.valid.sum(-1).mean().astype(jnp.float32)
        if mc.edit_candidates:  # counterfactual utilities of edits of the first on-policy layout
            rows = jnp.arange(b) * n + (n - p)
            ref_wc = jax.tree.map(lambda x: x[rows], var)
            cand, pred, value = fw.edits(params, tree, tokens, layouts[:, m - p], ref_wc, s_v[rows], hor_v[:, n - p],
                                         variant_capacity, jax.random.fold_in(key, 3))
            _, scale = L.ema_moments(stats["edit_ema"], mc.advantage_ema)
            edit_loss = E.ranking_loss(pred, value, cand.valid, scale, mc.lens_temperature)
            loss_extra += mc.edit_loss_weight * edit_loss
            edit = {"edit": value, "edit_valid": cand.valid}
            metrics.update(E.metrics(jax.lax.stop_gradient(pred), value, cand, edit_loss, mc.edit_halvings))
            if details:
                edit_details = {"edit_units": cand.units, "edit_members": cand.members, "edit_expand": cand.expand,
                                "edit_valid": cand.valid, "edit_value": value, "edit_pred": jax.lax.stop_gradient(pred)}
        if details:
            metrics["details"] = {
                "lod": var.lod, "pos": var.pos, "span": var.span, "valid": var.valid,
                "nll": jax.lax.stop_gradient(nll_v), "entry_delta": entry_delta,
                "comparable": comparable, "score": jax.lax.stop_gradient(s_v), "layouts": layouts, **edit_details,
            }
    else:
        delta = jnp.zeros((b, 0), jnp.float32)

    costs = fw.layout_costs(layouts, base, s_b, var, s_v)  # [B, M]
    deltas = jnp.concatenate([jnp.zeros((b, 1)), jax.lax.stop_gradient(delta)], axis=1)
    lens_loss = L.preference_loss(costs, deltas, *moments, mc.lens_temperature)
    lm_loss = jnp.concatenate(wc_means).mean()
    loss = lm_loss + loss_extra + mc.lens_loss_weight * lens_loss

    def lod_loss(level):
        total = sum((jnp.where(lod == level, x, 0.0)).sum() for x, lod, _ in lod_sums)
        count = sum(((lod == level) & v).sum() for _, lod, v in lod_sums)
        return jnp.where(count > 0, total / jnp.maximum(count, 1), jnp.nan)

    if m > 1:
        corr = L.pearson(jax.lax.stop_gradient(costs), deltas, jnp.ones_like(deltas, bool))
        metrics["mc/preference_corr_mean"] = jnp.nanmean(corr)
        metrics["mc/preference_corr_max"] = jnp.nanmax(corr)
    abs_sum = sum(jnp.where(v, jnp.abs(s), 0.0).sum() for s, v in score_sets)
    metrics.update({
        "train/loss": jax.lax.stop_gradient(lm_loss),
        "mc/total_loss": jax.lax.stop_gradient(loss),
        "mc/lens_loss": jax.lax.stop_gradient(lens_loss),
        "mc/horizon_loss_baseline": jax.lax.stop_gradient(hor_b).mean(),
        "mc/policy_score_abs_mean": abs_sum / sum(v.sum() for _, v in score_sets),
        "mc/policy_score_std_mean": jnp.concatenate([
            jnp.sqrt(L.masked_mean(jnp.square(s - L.masked_mean(s, v, -1)[:, None]), v, -1)) for s, v in score_sets
        ]).mean(),
        "runtime/token_budget_utilization": jnp.concatenate(util).mean(),
        **{f"mc/lod_loss/{level}": jax.lax.stop_gradient(lod_loss(level)) for level in range(fw.max_lod + 1)},
    })
    return loss, (metrics, {"delta": jax.lax.stop_gradient(delta), **edit})


def make_mc_train_step(model: MegaContextModel, tx: optax.GradientTransformation, cfg):
    """(state, tokens [A, B, T+1], layouts [A, B, M, N1], variant_capacity) -> (state, metrics).

    Pure; `jit_mc_train_step` jits it with variant_capacity static.
    """
    fw = MCForward(model, cfg, train=True)
    t, mc = cfg.training, cfg.megacontext
    total = cfg.total_steps

    def train_step(state: TrainState, tokens, layouts, variant_capacity: int):
        grad_fn = jax.value_and_grad(  # w.r.t. the trainable params; a pretrained base's own weights are frozen
            lambda p, tok, lay, key: mc_loss(fw, merge(p, state.frozen), tok, lay, state.stats, variant_capacity, key),
            has_aux=True,
        )
        keys = jax.random.split(jax.random.fold_in(jax.random.key(t.seed), state.step), tokens.shape[0])

        def micro(acc, xs):
            (_, (metrics, labels)), grads = grad_fn(state.params, *xs)
            return jax.tree.map(jnp.add, acc, grads), (metrics, labels)

        if tokens.shape[0] == 1:
            (_, (metrics, labels)), grads = grad_fn(state.params, tokens[0], layouts[0], keys[0])
        else:
            zeros = jax.tree.map(jnp.zeros_like, state.params)
            grads, (metrics, labels) = jax.lax.scan(micro, zeros, (tokens, layouts, keys))
            grads = jax.tree.map(lambda g: g / tokens.shape[0], grads)
            metrics = jax.tree.map(jnp.nanmean, metrics)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        stats = dict(state.stats)
        if labels["delta"].size:
            stats["delta_ema"] = L.ema_update(state.stats["delta_ema"], labels["delta"].reshape(-1), mc.advantage_ema)
        if labels["edit"].size:
            stats["edit_ema"] = L.ema_update(state.stats["edit_ema"], labels["edit"].reshape(-1), mc.advantage_ema,
                                             labels["edit_valid"].reshape(-1))
        grad_norms = {f"mc/grad_norm/{k}": optax.tree.norm(g) for k, g in grads.items()}
        gate = fw.gate_bias(params) if "gistnet" in params else None
        gate = {} if gate is None else {"mc/read_gate_mean": gate.mean(), "mc/read_gate_max": gate.max()}  # opening?
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, stats=stats)
        metrics = {
            **metrics,
            **grad_norms,
            **gate,
            "train/grad_norm": optax.tree.norm(grads),
            "train/lr_mult": lr_multiplier(state.step, total, t.warmup_ratio, t.warmdown_ratio, t.final_lr_frac),
        }
        metrics[FINITE] = finite_flag(metrics["train/loss"], metrics["train/grad_norm"], new.without_frozen())
        return new, metrics

    return train_step


def jit_mc_train_step(train_step, shardings: TrainState, token_sharding, layout_sharding, mesh):
    """One jit with explicit in/out shardings, the state donated and the variant width static."""
    from mcjax.train.sharding import replicated

    return jax.jit(
        train_step,
        in_shardings=(shardings, token_sharding, layout_sharding),
        out_shardings=(shardings, replicated(mesh)),
        static_argnums=3,
        donate_argnums=0,
    )


def make_mc_eval_step(model: MegaContextModel, cfg):
    """(params, tokens [B, T+1], layouts [B, M, N1], token_bytes int [V], variant_capacity)
    -> sums for the baseline ("base/…") and the variants ("mc/…"): NLL, entries, text NLL,
    bytes of the targets, and horizon NLL (for ΔNLL)."""
    fw = MCForward(model, cfg)

    def eval_step(params, tokens, layouts, token_bytes, variant_capacity: int):
        b, t1 = tokens.shape
        n = layouts.shape[1] - 1
        tree = fw.tree(params, tokens)
        out = {}
        parts = [("base", layouts[:, :1], fw.capacity, tokens)]
        if n:
            parts.append(("mc", layouts[:, 1:], variant_capacity, jnp.repeat(tokens, n, axis=0)))
        for name, lay, cap, tok in parts:
            wc = fw.assemble(tree, lay, cap)
            nll, _ = fw.entry_nll(params, wc, tok)
            nbytes = jnp.where(wc.valid, token_bytes[jnp.take_along_axis(tok, wc.target, axis=1)], 0)
            out.update({
                f"{name}/nll_sum": nll.sum(),
                f"{name}/entries": wc.valid.sum().astype(jnp.float32),
                f"{name}/text_nll_sum": jnp.where(nbytes > 0, nll, 0.0).sum(),
                f"{name}/bytes": nbytes.sum().astype(jnp.float32),
                f"{name}/horizon_nll_sum": (nll * L.horizon_mask(wc, t1 - 1, fw.horizon)).sum(),
                f"{name}/horizon_tokens": jnp.asarray(nll.shape[0] * fw.horizon, jnp.float32),
            })
        return out

    return eval_step


def make_mc_probe(model: MegaContextModel, cfg):
    """(params, stats, tokens [B, T+1], layouts [B, M, N1], variant_capacity) -> per-variant
    ΔNLL [B, N+P], the variants' per-entry arrays [B·(N+P), W_v] and the layouts used
    (on-policy ones chosen with a fixed key) — forward only; for the ΔNLL label tables and
    LOD dumps written on a cadence."""
    fw = MCForward(model, cfg)
    key = jax.random.key(cfg.training.seed)

    def probe(params, stats, tokens, layouts, variant_capacity: int):
        _, (metrics, labels) = mc_loss(fw, params, tokens, layouts, stats, variant_capacity, key, details=True)
        return {"delta": labels["delta"], **metrics["details"]}

    return probe
