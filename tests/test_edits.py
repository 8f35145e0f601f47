"""Per-block counterfactual utilities (megacontext/edits.py): candidate edits are legal and
distinct, an edit's label equals the difference of two direct forwards, the ranking loss on
a tiny case, and a training step that learns from them."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from mcjax.config import config_from_dict
from mcjax.megacontext import edits as E
from mcjax.megacontext.allocator import AllocatorParams, unit_scores
from mcjax.megacontext.layout import assemble, check_layout, entry_count
from mcjax.train.mc_step import MCForward, initial_stats, mc_loss
from mcjax.train.setup import build_parts

K, N1 = 4, 32
T = K * N1


def _scores(lod, seed):
    wc = assemble(jnp.asarray(lod), jnp.zeros((T, 1)), jnp.zeros((N1, 1)), jnp.zeros((N1 // K, 1)), T)
    s = jax.random.uniform(jax.random.key(seed), (T,), minval=-1, maxval=1)
    return unit_scores(wc, s, N1, K)


def test_candidates_are_distinct_legal_single_edits():
    """Whatever the layout: every valid candidate is an eligible unit (right level, outside
    the tail and the head), no unit twice, and applying it gives a valid layout one level away that
    differs only inside that unit, with K − 1 entries more (expand) or fewer (collapse)."""
    p = AllocatorParams(k=K, w_max=T, recent_tokens=2 * K, sink_tokens=K, max_lod=2)
    draw = jax.jit(lambda key, lod, us: E.candidates(key, lod, us, p, 5, 5, 0.5, 0.3))
    for seed in range(20):
        rng = np.random.default_rng(seed)
        lod = (rng.random(N1) < 0.6).astype(np.int8)
        for s in range(1, N1 // K - 1):
            if rng.random() < 0.3:
                lod[s * K : (s + 1) * K] = 2
        lod[-2:] = 0
        lod[0] = 0
        check_layout(lod, K, recent_tokens=2 * K, sink_tokens=K)
        cand = jax.device_get(draw(jax.random.key(seed), jnp.asarray(lod), _scores(lod, seed)))
        assert list(cand.expand) == [True] * 5 + [False] * 5 and cand.units.shape == (10, 1)
        assert (cand.valid == cand.members[:, 0]).all()
        ids = [(int(u[0]), bool(e)) for u, e, v in zip(cand.units, cand.expand, cand.valid) if v]
        assert len(ids) == len(set(ids))
        for u, e in ids:
            new = np.asarray(E.apply_edit(jnp.asarray(lod), u, True, e, K))
            check_layout(new, K, recent_tokens=2 * K, sink_tokens=K)
            blocks = [u] if u < N1 else list(range((u - N1) * K, (u - N1 + 1) * K))
            assert (np.flatnonzero(new != lod) == blocks).all()
            assert entry_count(new, K) - entry_count(lod, K) == (K - 1) * (1 if e else -1)
        # an empty member changes nothing
        assert (np.asarray(E.apply_edit(jnp.asarray(lod), 0, False, True, K)) == lod).all()
    # nothing eligible: every slot invalid
    raw = np.zeros(N1, np.int8)
    cand = draw(jax.random.key(0), jnp.asarray(raw), _scores(raw, 0))
    assert not np.asarray(cand.valid[:5]).any() and np.asarray(cand.valid[5:]).all()


def test_exploited_candidates_follow_the_scores():
    """At a tiny temperature the exploited half is LensNet's top-ranked units; the explored
    half is drawn among the rest."""
    lod = np.ones(N1, np.int8)
    lod[-2:] = 0
    us = _scores(lod, 3)
    p = AllocatorParams(k=K, w_max=T, recent_tokens=2 * K, max_lod=1)
    cand = jax.device_get(E.candidates(jax.random.key(1), jnp.asarray(lod), us, p, 6, 0, 0.5, 1e-4))
    order = np.argsort(-np.asarray(us.expand)[: N1 - 2])
    units = cand.units[:, 0]
    assert sorted(units[:3]) == sorted(order[:3]) and not set(units[3:]) & set(order[:3])


def test_group_candidates_move_distinct_units_together():
    """With groups of G units: C·G distinct units (exploited groups drawn by score, explored
    ones among the rest), one edit moves all of a group's members, and LensNet's prediction
    of a group is the soft maximum of its members' scores."""
    lod = np.ones(N1, np.int8)
    lod[-2:] = 0
    us = _scores(lod, 4)
    p = AllocatorParams(k=K, w_max=T, recent_tokens=2 * K, max_lod=1)
    cand = jax.device_get(E.candidates(jax.random.key(2), jnp.asarray(lod), us, p, 4, 2, 0.5, 1e-4, group=3))
    assert cand.units.shape == (6, 3) and cand.members[:4].all() and cand.valid[:4].all()
    drawn = cand.units[:4].reshape(-1)
    assert len(set(drawn.tolist())) == 12
    order = np.argsort(-np.asarray(us.expand)[: N1 - 2])
    assert sorted(cand.units[:2].reshape(-1)) == sorted(order[:6])  # the exploited groups: the top 6
    new = np.asarray(E.apply_edit(jnp.asarray(lod), cand.units[0], cand.members[0], True, K))
    assert sorted(np.flatnonzero(new != lod)) == sorted(cand.units[0]) and (new[cand.units[0]] == 0).all()
    assert entry_count(new, K) == entry_count(lod, K) + 3 * (K - 1)
    pred = np.asarray(E.predicted_value(us, cand))
    member = np.asarray(us.expand)[cand.units[0]]
    t = E.GROUP_TEMPERATURE
    assert np.isclose(pred[0], t * np.log(np.exp(member / t).sum()), atol=1e-5) and pred[0] >= member.max()
    # collapse groups: raw blocks (only the tail's two here, which never move): no member
    assert not cand.members[4:].any() and not cand.valid[4:].any() and np.isfinite(pred).all()


def test_ranking_loss_on_a_tiny_case():
    pred = jnp.array([[0.5, -0.5, 0.1]])
    value = jnp.array([[1.0, 0.0, 3.0]])
    valid = jnp.array([[True, True, False]])  # one valid pair: (0, 1)
    got = float(E.ranking_loss(pred, value, valid, 2.0, 0.5))
    label, logit = 1 / (1 + math.exp(-0.5)), 2.0
    assert math.isclose(got, math.log1p(math.exp(logit)) - label * logit, rel_tol=1e-6)
    assert float(E.ranking_loss(pred, value, jnp.zeros((1, 3), bool), 2.0, 0.5)) == 0.0
    # the gradient pushes the better-valued candidate up
    g = jax.grad(lambda x: E.ranking_loss(x, jnp.array([[0.0, 1.0]]), jnp.ones((1, 2), bool), 1.0, 0.5))(jnp.zeros((1, 2)))
    assert g[0, 1] < 0 < g[0, 0]


def _mc(tmp_path, **mc):
    raw = tiny_config(tmp_path, dataset={"block_size": 8, "horizon": 8}, gistnet={"kind": "mean"},
                      lensnet={"layers": 1, "dim": 32},
                      megacontext={"enabled": True, "recent_tokens": 16, "train_wc_length": 0.5, "curriculum_start": 0.5,
                                   "num_random_variants": 1, "num_policy_variants": 1, "lod2_probability": 0.0, **mc})
    cfg = config_from_dict(raw)
    parts = build_parts(cfg)
    params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(3), x.shape), parts.fresh().params)
    return cfg, MCForward(parts.model, cfg), params


def _edits_of(fw, params, tokens, ref, key, extra: int):
    """MCForward.edits of on-policy layouts ref [B, N1] (W_v 64), their horizon NLLs, and the
    horizon NLL of a direct forward of one edited layout of sequence b (`extra` entries more)."""
    tree = fw.tree(params, tokens)
    wc = fw.assemble(tree, ref[:, None], 64)
    scores = fw.scores(params, wc)
    ref_nll = fw.horizon_nll(params, wc, tokens)
    out = jax.device_get(fw.edits(params, tree, tokens, ref, wc, scores, ref_nll, 64, key))

    @jax.jit
    def direct_nll(b, lod):  # one edited layout of sequence b, assembled and read on its own
        one = fw.assemble(jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, b, 1), tree), lod[None, None], 64 + extra)
        return fw.horizon_nll(params, one, jax.lax.dynamic_slice_in_dim(tokens, b, 1))[0]

    return out, ref_nll, (wc, scores), lambda b, lod: float(direct_nll(b, lod))


def test_an_edit_label_is_the_difference_of_two_forwards(tmp_path):
    """Each candidate's label — here groups of two units — equals the horizon NLL of a direct
    forward of the on-policy layout minus that of the edited layout (expand), or the reverse
    (collapse)."""
    cfg, fw, params = _mc(tmp_path, edit_candidates=4, edit_group=2)
    tokens = jax.random.randint(jax.random.key(0), (2, 65), 0, 300)
    ref = jnp.asarray(np.array([[1, 1, 0, 1, 0, 1, 0, 0], [0, 1, 1, 0, 1, 1, 0, 0]], np.int8))
    (cand, pred, value), ref_nll, (wc, scores), direct_nll = _edits_of(fw, params, tokens, ref, jax.random.key(5), 14)
    assert cand.units.shape == (2, 4, 2)  # edit_group 2: the raw blocks outside the tail fill one collapse group
    assert cand.valid[:, :3].all() and cand.members[:, :3].all() and not cand.valid[:, 3].any()
    for b in range(2):
        for c in range(3):
            edited = E.apply_edit(ref[b], cand.units[b, c], cand.members[b, c], cand.expand[b, c], 8)
            direct = direct_nll(b, edited)
            want = float(ref_nll[b]) - direct if cand.expand[b, c] else direct - float(ref_nll[b])
            assert abs(value[b, c] - want) < 1e-5, (b, c, value[b, c], want)
    us = unit_scores(jax.tree.map(lambda x: x[0], wc), scores[0], 8, 8)
    first = jax.tree.map(lambda x: x[0], cand)
    np.testing.assert_allclose(pred[0], E.predicted_value(us, first), atol=1e-6)


def test_a_training_loss_with_edits_trains_lensnet_from_them(tmp_path):
    """With edit candidates on, the loss holds the ranking term, its labels come back for the
    running scale, and LensNet gets a gradient from the edits alone (layout-level loss off)."""
    cfg, fw, params = _mc(tmp_path, edit_candidates=4, lens_loss_weight=0.0, gist_delta_weight=0.0)
    tokens = jax.random.randint(jax.random.key(0), (2, 65), 0, 300)
    layouts = jnp.asarray(np.array([[[0] * 8, [1, 1, 0, 1, 0, 1, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0]]] * 2, np.int8))

    def loss(p):
        return mc_loss(fw, p, tokens, layouts, initial_stats(), 64, jax.random.key(0))

    (total, (metrics, labels)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    assert labels["edit"].shape == (2, 4) and labels["edit_valid"].all()
    assert np.isfinite(float(metrics["mc/edit_loss"])) and float(metrics["mc/edit_loss"]) > 0
    assert np.abs(np.asarray(grads["lensnet"]["w_out"])).max() > 0
    # with halving rounds their labels join the set and the last half's value is logged
    _, fwh, _ = _mc(tmp_path, edit_candidates=4, edit_group=2, edit_halvings=1, lens_loss_weight=0.0, gist_delta_weight=0.0)
    _, (mh, lh) = jax.jit(lambda p: mc_loss(fwh, p, tokens, layouts, initial_stats(), 64, jax.random.key(0)))(params)
    assert lh["edit"].shape == (2, 5) and bool(lh["edit_valid"][:, 4].all())
    assert float(mh["mc/edit_narrowed_members"]) == 1.0 and np.isfinite(float(mh["mc/edit_value_narrowed"]))
    _, fw0, _ = _mc(tmp_path, lens_loss_weight=0.0, gist_delta_weight=0.0)
    g0 = jax.jit(jax.grad(lambda p: mc_loss(fw0, p, tokens, layouts, initial_stats(), 64, jax.random.key(0))[0]))(params)
    assert np.abs(np.asarray(g0["lensnet"]["w_out"])).max() == 0  # without edits nothing trains LensNet here


def test_the_edit_table_has_the_spec_columns(tmp_path):
    """artifacts/deltas/<run>_edits_<step>.parquet: block_id, action, delta_nll, timestamp (the
    telemetry spec's) and the label, prediction and unit of every valid candidate."""
    import pyarrow.parquet as pq

    from mcjax.telemetry.deltas import edit_table, write_labels

    cfg, fw, params = _mc(tmp_path, edit_candidates=4)
    tokens = jax.random.randint(jax.random.key(0), (2, 65), 0, 300)
    layouts = jnp.asarray(np.array([[[0] * 8, [1, 1, 0, 1, 0, 1, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0]]] * 2, np.int8))
    _, (metrics, labels) = jax.jit(lambda p: mc_loss(fw, p, tokens, layouts, initial_stats(), 64, jax.random.key(0),
                                                     details=True))(params)
    details = jax.device_get(metrics["details"])
    table = edit_table(details, step=7, num_blocks=8, block_size=8, timestamp=123.5)
    assert table.column_names[:4] == ["block_id", "action", "delta_nll", "timestamp"]
    assert table.num_rows == int(np.asarray(labels["edit_valid"]).sum()) == 8  # groups of one
    assert set(table.column("group_size").to_pylist()) == {1}
    rows = table.to_pylist()
    for r in rows:
        assert r["action"] in ("expand", "collapse") and r["unit"] == "block" and 0 <= r["block_id"] < 6  # never the tail
        assert r["delta_nll"] == pytest.approx(-r["value"] if r["action"] == "expand" else r["value"])
        assert r["timestamp"] == 123.5 and r["step"] == 7
    path = write_labels(table, tmp_path / "deltas", "run", 7, kind="edits")
    assert path.name == "run_edits_00000007.parquet" and pq.read_table(path).num_rows == 8


def test_halve_takes_the_first_half_of_the_current_members():
    cur = jnp.array([[True, False, True, True, True], [False, True, False, False, False], [False] * 5])
    got = np.asarray(E.halve(cur))
    assert got.tolist() == [[True, False, True, False, False], [False, True, False, False, False], [False] * 5]
    members, value = E.narrow(cur, jnp.asarray(got), jnp.array([1.0, 1.0, 0.0]), jnp.array([0.6, 0.2, 0.0]))
    assert np.asarray(members).tolist()[:2] == [[True, False, True, False, False], [False] * 5]
    np.testing.assert_allclose(np.asarray(value), [0.6, 0.8, 0.0])


@pytest.mark.parametrize("group", [2, 5, 8, 32])
def test_narrowing_ends_on_the_one_block_that_matters(group):
    """⌈log2 G⌉ rounds from a group whose value one planted member carries (every other member
    worth a little noise) end on that member, wherever it sits; each round tests at most
    ⌈G / 2^r⌉ members."""
    rounds = (group - 1).bit_length()
    rng = np.random.default_rng(group)
    for planted in range(group):
        noise = rng.normal(0, 0.02, group)
        worth = lambda m: float(np.where(m, noise, 0).sum() + (0.5 if m[planted] else 0.0))  # noqa: E731
        current = jnp.ones(group, bool)
        parent = worth(np.ones(group, bool))
        for r in range(rounds):
            tested = E.halve(current)
            assert int(tested.sum()) <= -(-group // 2 ** (r + 1))
            current, parent = E.narrow(current, tested, parent, worth(np.asarray(tested)))
        assert np.flatnonzero(np.asarray(current)).tolist() == [planted]


def test_halving_rounds_label_halves_of_the_best_expand_group(tmp_path):
    """With edit_halvings, the h extra candidates are halves of each sequence's best expand
    group, each a subset of the one before as `narrow` decides, labelled like any edit (a
    direct forward of the edited layout)."""
    cfg, fw, params = _mc(tmp_path, edit_candidates=4, edit_group=4, edit_expand_share=0.5, edit_halvings=2)
    tokens = jax.random.randint(jax.random.key(1), (2, 65), 0, 300)
    ref = jnp.asarray(np.array([[1, 1, 0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]], np.int8))
    (cand, pred, value), ref_nll, _, direct_nll = _edits_of(fw, params, tokens, ref, jax.random.key(2), 28)
    assert cand.units.shape == (2, 6, 4) and value.shape == pred.shape == (2, 6)
    assert cand.expand[:, 4:].all() and cand.valid[:, 4:].all()

    for b in range(2):
        ok = cand.valid[b, :4] & cand.expand[b, :4]
        best = int(np.argmax(np.where(ok, value[b, :4], -np.inf)))
        assert (cand.units[b, 4:] == cand.units[b, best]).all()
        current, parent = cand.members[b, best], value[b, best]
        for r in (4, 5):
            tested = cand.members[b, r]
            assert (tested == np.asarray(E.halve(jnp.asarray(current)))).all() and tested.sum() == -(-current.sum() // 2)
            edited = E.apply_edit(ref[b], cand.units[b, r], tested, True, 8)
            assert abs(value[b, r] - (float(ref_nll[b]) - direct_nll(b, edited))) < 1e-5
            current, parent = E.narrow(jnp.asarray(current), jnp.asarray(tested), parent, value[b, r])
            current = np.asarray(current)
        assert current.sum() == 1


def test_edit_halvings_is_checked_against_the_group(tmp_path):
    from conftest import write_config

    from mcjax.config import load_config
    from mcjax.errors import ConfigError

    mc = {"enabled": True, "recent_tokens": 16, "train_wc_length": 0.5, "curriculum_start": 0.5, "num_policy_variants": 1,
          "edit_candidates": 4, "edit_group": 5}
    path = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, dataset={"block_size": 8, "horizon": 8}, megacontext=mc))
    assert load_config(path, ["megacontext.edit_halvings=3"]).megacontext.edit_halvings == 3
    with pytest.raises(ConfigError, match=r"megacontext.edit_halvings: must be in \[0, 3\] \(⌈log2 edit_group⌉ for edit_group 5\), got 4"):
        load_config(path, ["megacontext.edit_halvings=4"])
    with pytest.raises(ConfigError, match="at least one candidate expands"):
        load_config(path, ["megacontext.edit_halvings=1", "megacontext.edit_expand_share=0"])
    # edits off: the halvings wait unused
    assert load_config(path, ["megacontext.edit_halvings=1", "megacontext.edit_candidates=0"]).megacontext.edit_candidates == 0
