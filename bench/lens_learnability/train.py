"""Step 2: train a fresh LensNet (build_lensnet(cfg), its own init) on the labels of collect.py and
track the rank of the fact's block (its expand score) among the 50 expandable gists of the layout.
usage (repo root, CPU): PYTHONPATH=. python bench/lens_learnability/train.py LABELS.npz MODE STEPS [rank_temp] [seed]
MODE: group (E.ranking_loss on E.predicted_value, scale = global std of labels)
      direct (softmax CE over expandable gists' expand scores / 0.1, target = needle block)
      regress (MSE of E.predicted_value to value/max|value|, i.e. labels mapped into tanh range)
      chance (no training: fresh LensNet, all scores 0 -> ties -> average rank)"""
import sys, time, numpy as np, jax, jax.numpy as jnp, optax
from mcjax.config import load_config
from mcjax.model.lensnet import build_lensnet
from mcjax.megacontext import edits as E
from mcjax.megacontext.allocator import unit_scores
from mcjax.megacontext.layout import WorkingContext
LABELS = sys.argv[1]; MODE = sys.argv[2]; STEPS = int(sys.argv[3]); RT = float(sys.argv[4]) if len(sys.argv) > 4 else 0.5
SEED = int(sys.argv[5]) if len(sys.argv) > 5 else 0; BS = 16; K = 32
cfg = load_config('configs/smollm2_135m_mc.yaml', ['dataset.context_tokens=2048', 'megacontext.wc_capacity=512'])
assert cfg.megacontext.lens_temperature == 0.5
d = dict(np.load(LABELS))
def wcs(p):
    return WorkingContext(*[jnp.asarray(d[f'{p}_wc_{f}']) for f in WorkingContext._fields])
tr, va = wcs('tr'), wcs('va')
n1 = d['ref'].shape[0]; expandable = jnp.asarray(d['expandable'][:n1])
ntr, nva = tr.emb.shape[0], va.emb.shape[0]; nsamp = d['tr_value'].shape[0]; draws = nsamp // ntr
cand = E.Candidates(*(jnp.asarray(d[f'tr_{f}']) for f in ('units', 'members', 'expand', 'valid')))
value = jnp.asarray(d['tr_value']); valid = d['tr_valid']
scale = float(d['tr_value'][valid].std()); vmax = float(np.abs(d['tr_value'][valid]).max())
nb_tr, nb_va = jnp.asarray(d['tr_needle_block']), jnp.asarray(d['va_needle_block'])
print(f'{MODE}: train rows {ntr} x {draws} draws, val rows {nva}, expandable gists/row {int(expandable.sum())}, '
      f'label scale (global std) {scale:.4f}, max|v| {vmax:.3f}, rank temp {RT}, seed {SEED}', flush=True)
lens = build_lensnet(cfg)
params = lens.init(jax.random.key(SEED), jax.tree.map(lambda x: x[:1], tr))['params']
tx = optax.adam(1e-3); opt = tx.init(params)

def us_of(p, wc):
    s = lens.apply({'params': p}, wc._replace(emb=jax.lax.stop_gradient(wc.emb)))
    return jax.vmap(lambda w, s: unit_scores(w, s, n1, K))(wc, s)

def loss_fn(p, idx):
    if MODE == 'direct':
        rows = idx % ntr
        us = us_of(p, jax.tree.map(lambda x: x[rows], tr))
        logits = jnp.where(expandable[None], us.expand[:, :n1] / 0.1, -jnp.inf)
        return -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), nb_tr[rows][:, None], 1).mean()
    us = us_of(p, jax.tree.map(lambda x: x[idx // draws], tr))
    c = jax.tree.map(lambda x: x[idx], cand)
    pred = jax.vmap(E.predicted_value)(us, c)
    if MODE == 'regress':
        err = jnp.square(pred - value[idx] / vmax)
        return (err * c.valid).sum() / c.valid.sum()
    return E.ranking_loss(pred, value[idx], c.valid, scale, RT)

@jax.jit
def step(p, o, idx):
    l, g = jax.value_and_grad(loss_fn)(p, idx)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o, l

@jax.jit
def expand_scores(p, wc):
    return us_of(p, wc).expand[:, :n1]

def ranks(p, wc, nb):
    s = np.asarray(jnp.concatenate([expand_scores(p, jax.tree.map(lambda x: x[i:i + 16], wc))
                                    for i in range(0, wc.emb.shape[0], 16)]))
    ex = np.asarray(expandable); nb = np.asarray(nb)
    sn = s[np.arange(len(nb)), nb][:, None]
    gt = ((s > sn) & ex).sum(1); tie = ((s == sn) & ex).sum(1) - 1
    r = gt + 0.5 * tie  # 0 = top; ties averaged
    rec = lambda k: np.clip((k - gt) / (tie + 1), 0, 1).mean()  # expected recall, ties broken at random
    return f'med {np.median(r):5.1f} R@1 {rec(1):.2f} R@4 {rec(4):.2f} R@16 {rec(16):.2f}'

def report(i, l):
    print(f'step {i:4d} loss {l:.4f} | VAL {ranks(params, va, nb_va)} | TRAIN {ranks(params, tr, nb_tr)}', flush=True)

rng = np.random.default_rng(SEED); t0 = time.time(); losses = []
report(0, float('nan'))
n = ntr if MODE == 'direct' else nsamp
perm = []
for i in range(1, STEPS + 1 if MODE != 'chance' else 1):
    if len(perm) < BS:
        perm = list(rng.permutation(n)) + perm
    idx = jnp.asarray([perm.pop() for _ in range(BS)])
    params, opt, l = step(params, opt, idx); losses.append(float(l))
    if i % 50 == 0:
        report(i, np.mean(losses[-50:]))
print(f'{time.time()-t0:.0f}s', flush=True)
