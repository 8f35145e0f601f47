"""Does the base read a long working context better when its first entry is the sequence's first
raw block (an attention sink) instead of a gist? (CPU, the real base, compact positions)

SmolLM2-135M (the packaged GGUF) frozen, fresh GistNet/LensNet, read gate −8, W_max 2,048,
T = 16,384: on VAL task rows whose fact lies in a gist of the recency layout, the horizon NLL
(mean over the last 64 tokens, the training label's quantity) and the answer's NLL (summed over
its tokens) of four layouts — recency; recency with block 0 raw (its superblock, if at LOD2, at
LOD1); recency with the fact's block raw; both.
usage (repo root, CPU): PYTHONPATH=. python bench/lens_learnability/sink_gain.py NROWS DATA_DIR"""
import sys, time
import numpy as np, jax, jax.numpy as jnp
from mcjax.config import load_config
from mcjax.train.setup import build_parts
from mcjax.train.mc_step import MCForward
from mcjax.data.pipeline import ArrowSequences, row_tasks
from mcjax.data.variants import VariantSpec, sample_layouts
from layout_nll import layout_nll

NROWS, DATA = int(sys.argv[1]), sys.argv[2]
K, W = 32, 2048
cfg = load_config('configs/smollm2_135m_mc.yaml', [f'dataset.splits.val.output_path={DATA}/val.arrow',
                                                   f'dataset.splits.train.output_path={DATA}/train.arrow'])
parts = build_parts(cfg); params = parts.fresh().model_params()
fw = MCForward(parts.model, cfg)
spec = VariantSpec.from_config(cfg)
ref = sample_layouts(spec, W, seed=0, step=0, rows=np.array([0]))[0, 0]  # the recency baseline
print('recency layout:', ''.join('.-='[v] for v in ref), flush=True)
cap = W + 3 * (K - 1)


def raw(lay, b):
    """`lay` with block b at LOD0 (its superblock, if at LOD2, at LOD1)."""
    lay = lay.copy()
    if lay[b] == 2:
        s = b // K * K
        lay[s:s + K] = 1
    lay[b] = 0
    return lay


nll = layout_nll(fw, cap)


task, ans, needle = row_tasks(f'{DATA}/val.arrow')
src = ArrowSequences(f'{DATA}/val.arrow')
rows = [int(i) for i in np.flatnonzero(task > 0) if ref[needle[i] // K] >= 1 and needle[i] // K > 0][:NROWS]
names = ['recency', '+ block 0 raw', '+ fact raw', '+ fact raw + block 0 raw']
out = []
t0 = time.time()
for j, i in enumerate(rows):
    fb = needle[i] // K
    fact = raw(ref, fb)
    lays = jnp.asarray(np.stack([ref, raw(ref, 0), fact, raw(fact, 0)]))
    tok = src[i]
    hor, per = jax.device_get(nll(params, jnp.asarray(tok[None]), lays))
    a = int(ans[i])
    out.append((hor, per[:, -a:].sum(-1)))
    print(f'row {j + 1}/{len(rows)} ({time.time() - t0:.0f}s) task {task[i]} fact at {fb * K:,}, first token {tok[0]}: horizon '
          + ' / '.join(f'{x:.3f}' for x in hor) + '  answer ' + ' / '.join(f'{x:.2f}' for x in out[-1][1]), flush=True)
hor = np.array([x[0] for x in out]); an = np.array([x[1] for x in out])
print('\nmean over rows (horizon: mean NLL of the last 64 tokens; answer: NLL summed over its tokens)')
for n, h, a, k in zip(names, hor.T, an.T, range(4)):
    print(f'{n:26s} horizon {h.mean():.3f} (median {np.median(h):.3f})  answer {a.mean():.2f} (median {np.median(a):.2f})'
          + (f'  better than without block 0 in {np.mean(h < hor[:, k - 1]):.2f} of rows (horizon), {np.mean(a < an[:, k - 1]):.2f} (answer)' if k % 2 else ''))
print(f'done {time.time() - t0:.0f}s')
