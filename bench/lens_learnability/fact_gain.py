"""How loud is the label of the group that holds the fact, at T = 16,384? (CPU, the real base)

SmolLM2-135M (the packaged GGUF) frozen, fresh GistNet/LensNet, read gate −8, W_max 2,048: on
the recency layout of VAL task rows whose fact lies in a gist, the horizon NLL (the training
label's quantity: mean over the last 64 tokens) and the answer's NLL (its last answer_tokens
tokens) of three layouts — recency; recency with the fact's block + 7 random other gists
expanded (the group edit that holds the fact); recency with 8 random gists expanded, not the
fact's — each with the base's positions global and compact. The gain of an edit is the NLL
it removes, as `MCForward.edits` labels it.
usage (repo root, CPU): PYTHONPATH=. python bench/lens_learnability/fact_gain.py NROWS DATA_DIR
(DATA_DIR holds val.arrow of `mcjax prep` of configs/smollm2_135m_mc.yaml at its T = 16,384)"""
import dataclasses, sys, time
import numpy as np, jax, jax.numpy as jnp
from mcjax.config import load_config
from mcjax.train.setup import build_parts
from mcjax.train.mc_step import MCForward
from mcjax.data.pipeline import ArrowSequences, row_tasks
from mcjax.data.variants import VariantSpec, sample_layouts
from layout_nll import layout_nll

NROWS, DATA = int(sys.argv[1]), sys.argv[2]
G, K, W = 8, 32, 2048
cfg = load_config('configs/smollm2_135m_mc.yaml', [f'dataset.splits.val.output_path={DATA}/val.arrow',
                                                   f'dataset.splits.train.output_path={DATA}/train.arrow'])
parts = build_parts(cfg); params = parts.fresh().model_params()
modes = {}
for pos in ('global', 'compact'):
    c = dataclasses.replace(cfg, megacontext=dataclasses.replace(cfg.megacontext, positions=pos))
    modes[pos] = MCForward(parts.model, c)
spec = VariantSpec.from_config(cfg)
ref = sample_layouts(spec, W, seed=0, step=0, rows=np.array([0]))[0, 0]  # the recency baseline
gists = np.flatnonzero(ref == 1)
print('recency layout:', ''.join('.-='[v] for v in ref), f'({len(gists)} LOD1 gists)', flush=True)
cap = W + G * (K - 1)


fns = {k: layout_nll(v, cap) for k, v in modes.items()}
task, ans, needle = row_tasks(f'{DATA}/val.arrow')
src = ArrowSequences(f'{DATA}/val.arrow')
rows = [int(i) for i in np.flatnonzero(task > 0) if ref[needle[i] // K] == 1][:NROWS]
print(f'{(task > 0).sum()} val task rows, {len(rows)} used (fact in a LOD1 gist)', flush=True)
rng = np.random.default_rng(0)
res = {k: [] for k in fns}
t0 = time.time()
for j, i in enumerate(rows):
    fb = needle[i] // K
    others = rng.choice(gists[gists != fb], 2 * G - 1, replace=False)
    with_fact, without = ref.copy(), ref.copy()
    with_fact[np.r_[fb, others[:G - 1]]] = 0
    without[others[G - 1:]] = 0
    lays = jnp.asarray(np.stack([ref, with_fact, without]))
    tok = jnp.asarray(src[i][None])
    a = int(ans[i])
    for k, f in fns.items():
        hor, per = jax.device_get(f(params, tok, lays))
        res[k].append((hor, per[:, -a:].sum(-1), task[i], fb * K, i))
    print(f'row {j + 1}/{len(rows)} ({time.time() - t0:.0f}s) task {task[i]} fact at {fb * K:,} of 16,384:',
          '  '.join(f'{k}: gain fact {r[-1][0][0] - r[-1][0][1]:+.3f} other {r[-1][0][0] - r[-1][0][2]:+.3f}'
                    for k, r in res.items()), flush=True)

print('\nmean over rows (horizon = mean NLL of the last 64 tokens; answer = NLL summed over its tokens)')
for k, r in res.items():
    hor = np.array([x[0] for x in r]); an = np.array([x[1] for x in r])
    far = np.array([x[3] for x in r]) < 16384 - 8192
    gf, go = hor[:, 0] - hor[:, 1], hor[:, 0] - hor[:, 2]
    print(f'{k:8s} horizon: recency {hor[:, 0].mean():.3f}  gain fact group {gf.mean():+.3f} (median {np.median(gf):+.3f})'
          f'  gain other group {go.mean():+.3f};  fact group > other in {np.mean(gf > go):.2f} of rows'
          f' (fact > 8k back: {np.mean((gf > go)[far]):.2f} of {far.sum()}, nearer: {np.mean((gf > go)[~far]):.2f} of {(~far).sum()})')
    print(f'{"":8s} answer:  recency {an[:, 0].mean():.2f}  fact group {an[:, 1].mean():.2f}  other group {an[:, 2].mean():.2f}')
print(f'done {time.time() - t0:.0f}s')
