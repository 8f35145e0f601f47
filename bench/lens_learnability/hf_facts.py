"""Can SmolLM2-135M itself tell the asked key–value fact from its look-alikes? (CPU, transformers)

Independent of mcjax's forward: transformers reads the packaged GGUF and greedily continues,
for val key–value rows of a run's data (4 facts of one form, one asked), two texts with no
gists at all: the head blocks + the asked fact's block and the next one + the row's last
TAIL tokens before the answer (the question, and whatever facts lie there); and the same with
every fact's pair of blocks. Prints each continuation against the answer.

usage (repo root): PYTHONPATH=. python bench/lens_learnability/hf_facts.py RUN ROWS [TAIL]
  e.g. … artifacts/runs_archive/smollm2_20min/runs/smollm2_135m_mc 7,20,21,22,45
"""
import sys

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from mcjax.data.pipeline import ArrowSequences, row_tasks
from mcjax.config import base_model_dir
from mcjax.restore import load_run

run = load_run(sys.argv[1], [])
rows = [int(x) for x in sys.argv[2].split(",")]
tail = int(sys.argv[3]) if len(sys.argv) > 3 else 1536
cfg, tok = run.cfg, run.tokenizer
k, head = cfg.dataset.block_size, cfg.megacontext.sink_tokens // cfg.dataset.block_size
gguf = base_model_dir(cfg)  # the run's base: the packaged GGUF
model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, torch_dtype=torch.float32).eval()
path = cfg.dataset.splits["val"].output_path
_, ans, needle = row_tasks(path)
src = ArrowSequences(path)
hits = {"asked pair": 0, "every fact's pair": 0}
for i in rows:
    row = np.asarray(src[i])
    a = len(row) - int(ans[i])  # the answer is the row's last answer_tokens tokens
    starts = [p for p in range(a - 8) if tok.decode(row[p:p + 6].tolist()).startswith("\nOne of the special")]
    facts, fb = sorted({p // k for p in starts}), int(needle[i]) // k
    truth = tok.decode(row[a:].tolist()).strip()
    for name, blocks in (("asked pair", [fb, fb + 1]), ("every fact's pair", [b + d for b in facts for d in (0, 1)])):
        keep = sorted(set(range(head)) | {b for b in blocks if b * k < a - tail})
        ids = np.concatenate([row[b * k:(b + 1) * k] for b in keep] + [row[a - tail:a]])
        out = model.generate(torch.tensor(ids[None]), max_new_tokens=len(row) - a + 1, do_sample=False)
        said = tok.decode(out[0, len(ids):].tolist()).strip()
        hits[name] += said.startswith(truth.rstrip("."))
        print(f"row {i:4d} {name:17s} {len(ids):5d} tokens: {said!r:14s} answer {truth!r}  (facts in blocks {facts}, "
              f"asked {fb})", flush=True)
print({n: f"{h} of {len(rows)}" for n, h in hits.items()})
