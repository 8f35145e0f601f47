"""Telemetry: one metrics interface (`Telemetry`) over JSONL, TensorBoard and W&B sinks.

The training loop talks only to `Telemetry`; `Progress` draws the terminal progress bar.
"""

from mcjax.telemetry.telemetry import Telemetry

__all__ = ["Telemetry"]
