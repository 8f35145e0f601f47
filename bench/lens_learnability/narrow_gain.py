"""Does narrowing (megacontext.edit_halvings) find the fact's block with the real base's labels?
(CPU, T = 16,384, compact positions)

SmolLM2-135M (the packaged GGUF) frozen, fresh GistNet/LensNet, read gate −8, W_max 2,048: on
VAL task rows whose fact lies in a LOD1 gist of the recency layout, three expand groups of G = 32
gists — one holding the fact, two not — labelled as the training labels them (horizon NLL of the
last 64 tokens against recency's), then the fact's group halved log2 G = 5 times with the
training's own rule (edits.halve / edits.narrow), each half labelled by a forward.
With ANSWER_WEIGHT w > 0 (third argument) each row is narrowed twice from the same three groups:
with the horizon label and with horizon + w × the answer's mean NLL change (the answer is the
row's last answer_tokens tokens, inside the horizon): would labels on the answer find the fact's
block more often?
FIRST (fourth argument, default 1) skips the rows before it, drawing their groups all the same, so
an interrupted run continues with the groups it would have drawn.
usage (repo root, CPU): PYTHONPATH=.:bench/lens_learnability python bench/lens_learnability/narrow_gain.py NROWS DATA_DIR [ANSWER_WEIGHT [FIRST]]"""
import sys, time
import numpy as np, jax.numpy as jnp, jax
from mcjax.config import load_config
from mcjax.train.setup import build_parts
from mcjax.train.mc_step import MCForward
from mcjax.data.pipeline import ArrowSequences, row_tasks
from mcjax.data.variants import VariantSpec, sample_layouts
from mcjax.megacontext import edits as E
from layout_nll import layout_nll

NROWS, DATA = int(sys.argv[1]), sys.argv[2]
WEIGHTS = (0.0,) + ((float(sys.argv[3]),) if len(sys.argv) > 3 and float(sys.argv[3]) > 0 else ())
FIRST = int(sys.argv[4]) if len(sys.argv) > 4 else 1
G, K, W = 32, 32, 2048
ROUNDS = (G - 1).bit_length()
cfg = load_config('configs/smollm2_135m_mc.yaml', [f'dataset.splits.val.output_path={DATA}/val.arrow',
                                                   f'dataset.splits.train.output_path={DATA}/train.arrow'])
parts = build_parts(cfg); params = parts.fresh().model_params()
fw = MCForward(parts.model, cfg)
ref = sample_layouts(VariantSpec.from_config(cfg), W, seed=0, step=0, rows=np.array([0]))[0, 0]  # recency
gists = np.flatnonzero(ref == 1)
nll = layout_nll(fw, W + G * (K - 1))
task, ans, needle = row_tasks(f'{DATA}/val.arrow')
src = ArrowSequences(f'{DATA}/val.arrow')
rows = [int(i) for i in np.flatnonzero(task > 0) if ref[needle[i] // K] == 1][:NROWS]
print(f'recency: {len(gists)} LOD1 gists; {len(rows)} val task rows', flush=True)
rng = np.random.default_rng(0)


def expanded(blocks):
    lay = ref.copy()
    lay[blocks] = 0
    return lay


def label(hor, per, a, w):
    """Labels of layouts 1.. against layout 0: horizon gain + w × the answer's mean gain."""
    gain = hor[0] - hor[1:]
    return gain + w * (per[0, -a:].mean() - per[1:, -a:].mean(-1)) if w else gain


best_is_fact, found, t0 = {w: [] for w in WEIGHTS}, {w: [] for w in WEIGHTS}, time.time()
for j, i in enumerate(rows):
    fb, a = needle[i] // K, int(ans[i])
    others = rng.choice(gists[gists != fb], 3 * G - 1, replace=False)
    if j + 1 < FIRST:
        continue
    group = np.r_[others[:G // 2], fb, others[G // 2:G - 1]]  # the fact in the middle of its group
    groups = [group, others[G - 1:2 * G - 1], others[2 * G - 1:]]
    tok = jnp.asarray(src[i][None])
    hor, per = jax.device_get(nll(params, tok, jnp.asarray(np.stack([ref] + [expanded(g) for g in groups]))))
    line = []
    for w in WEIGHTS:
        value = label(hor, per, a, w)
        best_is_fact[w].append(value[0] > value[1:].max())
        current, parent, trail = jnp.ones(G, bool), value[0], []
        for r in range(ROUNDS):
            tested = E.halve(current)
            h, p = jax.device_get(nll(params, tok, jnp.asarray(expanded(group[np.asarray(tested)])[None])))
            v = float(label(np.r_[hor[:1], h], np.concatenate([per[:1], p]), a, w)[0])
            holds = bool(np.asarray(tested)[G // 2])
            current, parent = E.narrow(current, tested, parent, v)
            trail.append(f'{v:+.3f}{"*" if holds else ""}')
        end = group[np.asarray(current)]
        found[w].append(list(end) == [fb])
        line.append(f'w={w:g}: groups ' + ' / '.join(f'{x:+.3f}' for x in value)
                    + f'; halves {" ".join(trail)} -> {list(end)}' + (' FOUND' if found[w][-1] else ''))
    print(f'row {j + 1}/{len(rows)} ({time.time() - t0:.0f}s) task {task[i]} fact block {fb} answer {a} tokens (* holds the fact)\n  '
          + '\n  '.join(line), flush=True)
print()
done = rows[FIRST - 1:]  # the rows this run labelled
for w in WEIGHTS:
    print(f'w={w:g}: the fact\'s group of {G} is the best of 3 in {sum(best_is_fact[w])} of {len(done)} rows; '
          f'{ROUNDS} halvings end on the fact\'s block in {sum(found[w])} of {len(done)} '
          f'(by task: ' + ', '.join(f'{t}: {sum(f for f, r in zip(found[w], done) if task[r] == t)}/{sum(task[r] == t for r in done)}'
                                    for t in sorted(set(task[done]))) + ')')
print(f'done {time.time() - t0:.0f}s')
