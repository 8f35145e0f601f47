"""The three nets MegaContext trains together, as one param tree.

`MegaContextModel` exists to create and name the params: `{"gpt": …, "gistnet": …,
"lensnet": …}`, each with its logical axes, so the train state, its shardings, the
optimizer's param groups and the checkpoints see one tree. The train step applies each
net on its own sub-tree (`gpt.apply({"params": params["gpt"]}, …)`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mcjax.megacontext.layout import assemble
from mcjax.model.base import build_base
from mcjax.model.gistnet import GistNet, build_gistnet
from mcjax.model.lensnet import LensNet, build_lensnet


class MegaContextModel(nn.Module):
    gpt: Any  # the base model: GPT or a pretrained Llama (model/base.py)
    gistnet: GistNet
    lensnet: LensNet
    block_size: int

    def __call__(self, tokens: jnp.ndarray) -> jnp.ndarray:
        """Touch every net once (for `init`). tokens int [B, T], T a multiple of block_size."""
        k = self.block_size
        emb = self.gpt.embed(tokens)
        hidden = self.gpt(tokens)
        b, t, d = emb.shape
        gists = self.gistnet(emb.reshape(b, t // k, k, d))
        lod = jnp.zeros((t // k,), jnp.int8)
        wc = assemble(lod, emb[0], gists[0], None, t)
        scores = self.lensnet(type(wc)(*(x[None] for x in wc)))
        return hidden.sum() + gists.sum() + scores.sum()


def build_megacontext(cfg) -> MegaContextModel:
    """The GPT, GistNet and LensNet that `cfg` describes, under one param tree."""
    return MegaContextModel(
        gpt=build_base(cfg), gistnet=build_gistnet(cfg), lensnet=build_lensnet(cfg), block_size=cfg.dataset.block_size
    )
