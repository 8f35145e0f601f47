"""Can LensNet learn where the fact is from group-edit labels alone? Step 1: the labels.

SmolLM2-135M (the packaged GGUF) frozen, fresh GistNet/LensNet, read gate −8, T = 2,048, W_max 512:
on the recency layout of TRAIN task rows (2 draws each), 8 expand candidates of G = 8 gists drawn
uniformly, each labelled by MCForward.edits (the horizon-NLL gain of the edited layout); plus the
WCs of VAL task rows. Rows whose fact lies in the raw tail are left out.
usage (repo root, CPU): PYTHONPATH=. python bench/lens_learnability/collect.py NTRAIN NVAL OUT.npz DATA_DIR
(DATA_DIR holds train.arrow and val.arrow of `mcjax prep` of the config at dataset.context_tokens=2048)"""
import sys, time, numpy as np, jax, jax.numpy as jnp
from mcjax.config import load_config
from mcjax.train.setup import build_parts
from mcjax.train.mc_step import MCForward
from mcjax.data.pipeline import ArrowSequences, row_tasks
from mcjax.data.variants import VariantSpec, sample_layouts
from mcjax.megacontext.allocator import unit_scores, eligible_units, free_blocks, never_changed, AllocatorParams
NTRAIN = int(sys.argv[1]); NVAL = int(sys.argv[2]); OUT = sys.argv[3]; DATA = sys.argv[4]; DRAWS = 2
over = ['dataset.context_tokens=2048', 'megacontext.wc_capacity=512', 'megacontext.train_wc_length=0.25',
        'megacontext.curriculum_start=0.25', 'megacontext.edit_group=8', 'megacontext.edit_candidates=8',
        'megacontext.edit_expand_share=1.0', 'megacontext.edit_explore=1.0',
        f'dataset.splits.train.output_path={DATA}/train.arrow',
        f'dataset.splits.val.output_path={DATA}/val.arrow']
cfg = load_config('configs/smollm2_135m_mc.yaml', over)
parts = build_parts(cfg); state = parts.fresh(); params = state.model_params()
fw = MCForward(parts.model, cfg)
spec = VariantSpec.from_config(cfg); target = 512; K = 32
lay0 = sample_layouts(spec, target, seed=0, step=0, rows=np.array([0]))
assert (lay0[0, -1] == lay0[0, 0]).all(), 'policy start != recency baseline'
ref_np = lay0[0, -1]; n1 = ref_np.shape[0]
print('layouts M', lay0.shape, 'recency layout:', ''.join('.-='[v] for v in ref_np), flush=True)
alloc = fw.explore
free = free_blocks(never_changed(n1), jnp.zeros((n1,), bool), 0, alloc)
expandable = np.asarray(eligible_units(jnp.asarray(ref_np), free, alloc)[0])
print('expandable units', expandable.sum(), 'of', expandable.size, flush=True)

@jax.jit
def labels(p, tok, key):
    tree = fw.tree(p, tok)
    ref = jnp.asarray(ref_np)[None]
    wc = fw.assemble(tree, ref[:, None], 512)
    s = fw.scores(p, wc)
    nll = fw.horizon_nll(p, wc, tok)
    rep = lambda x: jnp.repeat(x, DRAWS, 0)
    cand, pred, value = fw.edits(p, jax.tree.map(rep, tree), rep(tok), rep(ref), jax.tree.map(rep, wc), rep(s), rep(nll), 512,
                                 key)
    return wc, nll, cand, value

@jax.jit
def wc_only(p, tok):
    tree = fw.tree(p, tok)
    return fw.assemble(tree, jnp.asarray(ref_np)[None, None], 512)

def rows_of(path, n):
    task, ans, needle = row_tasks(path)
    r = [int(i) for i in np.flatnonzero(task > 0) if expandable[needle[i] // K]]  # needle block is a gist
    print(path, 'task rows', (task > 0).sum(), 'with needle in an expandable gist', len(r), flush=True)
    return r[:n], task, needle

out = {'expandable': expandable, 'ref': ref_np}
tr_rows, task, needle = rows_of(cfg.dataset.splits['train'].output_path, NTRAIN)
src = ArrowSequences(cfg.dataset.splits['train'].output_path)
acc = {k: [] for k in ['units', 'members', 'expand', 'valid', 'value', 'ref_nll']}
wcs = []; t0 = time.time()
for j, i in enumerate(tr_rows):
    tok = jnp.asarray(src[i][None])
    wc, nll, cand, value = jax.device_get(labels(params, tok, jax.random.key(1000 + i)))
    wcs.append(wc)
    for k_, v in (('units', cand.units), ('members', cand.members), ('expand', cand.expand), ('valid', cand.valid),
                  ('value', value)):
        acc[k_].append(v)
    acc['ref_nll'].append(np.repeat(nll, DRAWS))
    if j < 3 or j % 10 == 9:
        print(f'train row {j+1}/{len(tr_rows)} {time.time()-t0:.0f}s value range {value.min():.3f}..{value.max():.3f}', flush=True)
for k_, v in acc.items():
    out['tr_' + k_] = np.concatenate(v)
for f in wcs[0]._fields:
    out['tr_wc_' + f] = np.concatenate([getattr(w, f) for w in wcs])
out['tr_row'] = np.array(tr_rows); out['tr_task'] = task[tr_rows]; out['tr_needle_block'] = needle[tr_rows] // K
np.savez(OUT, **out)
print('saved train part', flush=True)
va_rows, vtask, vneedle = rows_of(cfg.dataset.splits['val'].output_path, NVAL)
vsrc = ArrowSequences(cfg.dataset.splits['val'].output_path)
vw = []
for j, i in enumerate(va_rows):
    vw.append(jax.device_get(wc_only(params, jnp.asarray(vsrc[i][None]))))
    if j % 20 == 19:
        print(f'val row {j+1} {time.time()-t0:.0f}s', flush=True)
for f in vw[0]._fields:
    out['va_wc_' + f] = np.concatenate([getattr(w, f) for w in vw])
out['va_row'] = np.array(va_rows); out['va_task'] = vtask[va_rows]; out['va_needle_block'] = vneedle[va_rows] // K
np.savez(OUT, **out)
print(f'done {time.time()-t0:.0f}s', flush=True)
