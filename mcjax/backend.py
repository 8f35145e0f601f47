"""The backend that backend-dependent choices are made for.

`backend()` is JAX's default backend ("cpu", "gpu", "tpu"), or the one the environment
variable MCJAX_BACKEND names, so a CPU run (a test in CI) can take the GPU or TPU branch of
every choice that depends on it:

- compute dtype: `dtype: auto` → bf16 on GPU and TPU, f32 on CPU (model/gpt.resolve);
- attention kernel: `attention: auto` → cuDNN flash attention on GPU in bf16, the Pallas TPU
  splash kernel on TPU for the base model's causal attention when its head width is a
  multiple of 128, XLA otherwise (model/gpt.resolve, model/attention.py);
- the loss: the Pallas (Triton) pass of the fused cross-entropy on GPU in bf16, XLA's
  elsewhere (model/xent.py);
- mesh axes left `auto`: fsdp over a TPU slice's chips and data over slices; data over every
  device on GPU and CPU (config.mesh_shape).

Forcing a backend changes only these choices: arrays still live on the devices present, and a
Pallas TPU kernel chosen on another backend runs in Pallas' interpreter.
"""

from __future__ import annotations

import os

import jax

from mcjax.errors import UserError

BACKENDS = ("cpu", "gpu", "tpu")
ENV = "MCJAX_BACKEND"


def backend() -> str:
    forced = os.environ.get(ENV, "")
    if not forced:
        return jax.default_backend()
    if forced not in BACKENDS:
        raise UserError(f"{ENV}={forced!r}: must be one of {', '.join(BACKENDS)}")
    return forced


def backend_note() -> str:
    """`backend()` for a log line: "tpu (MCJAX_BACKEND)" where the variable chose it."""
    return backend() + (f" ({ENV})" if os.environ.get(ENV) else "")


def on_tpu() -> bool:
    """True iff the devices present are TPUs (not merely the choices made for them)."""
    return jax.default_backend() == "tpu"
