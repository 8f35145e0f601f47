"""The runtime engine: stream long histories through a trained MegaContext (or the plain
GPT baseline), refocus, and generate text with a KV cache. See `engine.py`."""

from mcjax.runtime.engine import Engine
from mcjax.runtime.sampling import Sampling

__all__ = ["Engine", "Sampling"]
