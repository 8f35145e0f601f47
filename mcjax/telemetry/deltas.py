"""ΔNLL label tables: `artifacts/deltas/<run>_<step>.parquet`, one row per compressed unit, and
the per-edit counterfactual utilities `artifacts/deltas/<run>_edits_<step>.parquet` (`edit_table`).

Each row is one gist of one training variant: which block it starts at and what it
covers, the action that made it (`collapse_lod1` / `collapse_lod2`, relative to raw
tokens), the variant's ΔNLL on the horizon (`delta_nll`, the label LensNet ranks), the
gist's own next-token NLL against the baseline's on the same target (`entry_delta`;
null where the baseline has no entry with that target) and LensNet's score of it.
Files are written atomically (temporary name, then rename).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ACTIONS = {1: "collapse_lod1", 2: "collapse_lod2"}


def label_table(probe: dict[str, np.ndarray], *, step: int, block_size: int, target_length: int) -> pa.Table:
    """Rows for every gist entry of the probed variants (see `mc_step.make_mc_probe`)."""
    delta = np.asarray(probe["delta"])  # [B, N]
    b, n = delta.shape
    lod, valid = np.asarray(probe["lod"]), np.asarray(probe["valid"])
    row, slot = np.nonzero(valid & (lod > 0))
    comparable = np.asarray(probe["comparable"])[row, slot]
    entry_delta = np.asarray(probe["entry_delta"], np.float64)[row, slot]
    return pa.table({
        "step": np.full(row.shape, step, np.int64),
        "seq": (row // n).astype(np.int32),
        "variant": (row % n + 1).astype(np.int32),
        "block_id": (np.asarray(probe["pos"])[row, slot] // block_size).astype(np.int32),
        "lod": lod[row, slot].astype(np.int8),
        "action": [ACTIONS[int(v)] for v in lod[row, slot]],
        "span": np.asarray(probe["span"])[row, slot].astype(np.int32),
        "delta_nll": delta.reshape(-1)[row].astype(np.float64),
        "entry_delta": pa.array(entry_delta, mask=~comparable),
        "nll": np.asarray(probe["nll"], np.float64)[row, slot],
        "score": np.asarray(probe["score"], np.float64)[row, slot],
        "variant_entries": valid.sum(-1)[row].astype(np.int32),
        "target_length": np.full(row.shape, target_length, np.int32),
    })


def edit_table(probe: dict[str, np.ndarray], *, step: int, num_blocks: int, block_size: int, timestamp: float) -> pa.Table:
    """The counterfactual utilities of the probed edits (`megacontext/edits.py`), one row per
    member unit of every valid candidate, in the telemetry spec's columns — block_id (a
    superblock's first block), action ("expand" / "collapse"), delta_nll (horizon NLL of the
    edited layout minus the on-policy layout's: the candidate's, shared by its members),
    timestamp (Unix seconds) — plus step, seq, candidate, group_size (its members), unit
    ("block" / "superblock"), value (the label: NLL gained by the finer level) and score
    (LensNet's prediction of the candidate's value)."""
    members = np.asarray(probe["edit_members"]) & np.asarray(probe["edit_valid"])[..., None]
    seq, cand, slot = np.nonzero(members)
    u = np.asarray(probe["edit_units"])[seq, cand, slot]
    e = np.asarray(probe["edit_expand"])[seq, cand]
    value = np.asarray(probe["edit_value"], np.float64)[seq, cand]
    first = np.where(u < num_blocks, u, (u - num_blocks) * block_size)  # unit ids: blocks, then superblocks
    return pa.table({
        "block_id": first.astype(np.int32),
        "action": ["expand" if x else "collapse" for x in e],
        "delta_nll": np.where(e, -value, value),
        "timestamp": np.full(u.shape, timestamp, np.float64),
        "step": np.full(u.shape, step, np.int64),
        "seq": seq.astype(np.int32),
        "candidate": cand.astype(np.int32),
        "group_size": members.sum(-1)[seq, cand].astype(np.int32),
        "unit": ["block" if x < num_blocks else "superblock" for x in u],
        "value": value,
        "score": np.asarray(probe["edit_pred"], np.float64)[seq, cand],
    })


def write_labels(table: pa.Table, out_dir: str | Path, run: str, step: int, kind: str = "") -> Path:
    """Write `<out_dir>/<run>_<kind>_<step:08d>.parquet` (no `_<kind>` when empty) atomically; returns its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{run}{'_' + kind if kind else ''}_{step:08d}.parquet"
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
