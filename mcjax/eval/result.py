"""What a suite hands back: its tables (written as Parquet), a JSON summary for the report
and the W&B/TensorBoard scalars, and the settings it could not measure and why."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pyarrow as pa


@dataclasses.dataclass
class SuiteResult:
    suite: str
    tables: dict[str, pa.Table]  # file stem -> table
    summary: dict[str, Any]  # JSON-able; the report reads it back
    scalars: dict[str, float]  # logged as eval/<suite>/<name>
    skipped: list[str] = dataclasses.field(default_factory=list)


def table(records: list[dict[str, Any]], columns: dict[str, pa.DataType]) -> pa.Table:
    """A table of `records` with exactly `columns` (an empty table keeps its schema)."""
    schema = pa.schema(list(columns.items()))
    return pa.table({name: pa.array([r.get(name) for r in records], type=t) for name, t in columns.items()}, schema=schema)


def stats(values) -> dict[str, float]:
    """mean, std, p95 and count of a sample (NaN-free)."""
    x = np.asarray(values, np.float64)
    if x.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "p95": float("nan"), "n": 0}
    return {"mean": float(x.mean()), "std": float(x.std()), "p95": float(np.percentile(x, 95)), "n": int(x.size)}
