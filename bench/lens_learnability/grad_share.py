"""Which of LensNet's two losses moves its weights? The gradient of the edit ranking loss
(`edit_loss_weight` × edits.ranking_loss) against that of the layout-level preference loss
(`lens_loss_weight` × losses.preference_loss) with respect to LensNet's params, both from one
`mc_loss` of the training code on the same batch, layouts and key.
SmolLM2-135M (the packaged GGUF, frozen), fresh GistNet/LensNet, T = 4,096 (the last 4,097 tokens of
the prepped 16k rows: their question and answer stay), W_max 512, batch 2, edits as the config says.
usage (repo root, CPU): PYTHONPATH=. python bench/lens_learnability/grad_share.py BATCHES [overrides...]"""
import sys, time, numpy as np, jax, jax.numpy as jnp
from mcjax.config import load_config
from mcjax.train.setup import build_parts
from mcjax.train.mc_step import MCForward, mc_loss
from mcjax.data.pipeline import ArrowSequences
from mcjax.data.variants import VariantSpec, sample_layouts, variant_capacity

BATCHES = int(sys.argv[1]); T = 4096; B = 2
over = [f'dataset.context_tokens={T}', 'megacontext.wc_capacity=512', *sys.argv[2:]]
cfg = load_config('configs/smollm2_135m_mc.yaml', over)
parts = build_parts(cfg); state = parts.fresh(); params = state.model_params()
spec = VariantSpec.from_config(cfg)
target = int(round(cfg.megacontext.train_wc_length * T)); cap = variant_capacity(target, spec)
src = ArrowSequences(cfg.dataset.splits['train'].output_path)
mc = cfg.megacontext
print(f'T {T}, W_max {cfg.wc_capacity}, variants {cap} wide, edits {mc.edit_candidates} x G {mc.edit_group}, '
      f'weights: edit {mc.edit_loss_weight}, layout {mc.lens_loss_weight}', flush=True)


def loss_of(which):
    fw = MCForward(parts.model, load_config('configs/smollm2_135m_mc.yaml', over + (
        ['megacontext.lens_loss_weight=0'] if which == 'edit' else ['megacontext.edit_loss_weight=0'])), train=True)

    def f(lens, tok, lay, key):
        p = {**params, 'lensnet': lens}
        return mc_loss(fw, p, tok, lay, state.stats, cap, key)[0]
    return jax.jit(jax.grad(f))


g_edit, g_layout = loss_of('edit'), loss_of('layout')
flat = lambda g: np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)]).astype(np.float64)  # noqa: E731
t0 = time.time()
for i in range(BATCHES):
    rows = np.arange(i * B, (i + 1) * B) * 7 % len(src)
    tok = jnp.asarray(np.stack([src[int(r)][-(T + 1):] for r in rows]))
    lay = jnp.asarray(sample_layouts(spec, target, seed=0, step=i, rows=rows))
    key = jax.random.key(i)
    e, l = flat(g_edit(params['lensnet'], tok, lay, key)), flat(g_layout(params['lensnet'], tok, lay, key))
    ratio = np.abs(l) / np.maximum(np.abs(e), 1e-30)
    print(f'batch {i + 1}: |g_edit| {np.linalg.norm(e):.3e}  |g_layout| {np.linalg.norm(l):.3e}  '
          f'norm ratio layout/edit {np.linalg.norm(l) / np.linalg.norm(e):.2f}  cosine {e @ l / np.linalg.norm(e) / np.linalg.norm(l):+.3f}  '
          f'per-weight |layout|>|edit| {np.mean(ratio > 1):.2f} (median ratio {np.median(ratio):.2f})  {time.time() - t0:.0f}s', flush=True)
