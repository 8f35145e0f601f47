"""The horizon NLL of several layouts of one sequence in one jitted forward (fact_gain.py, sink_gain.py)."""
import jax
import jax.numpy as jnp


def layout_nll(fw, cap: int):
    """fn(params, tokens [1, T+1], layouts int8 [L, N1]) -> (mean NLL of the horizon [L], per-token NLL
    of the horizon [L, H]), each layout assembled at `cap` entries and read by `fw`'s base."""
    @jax.jit
    def f(p, tok, lays):
        tree = fw.tree(p, tok)
        wc = fw.assemble(tree, lays[None], cap)
        idx = wc.valid.sum(-1)[:, None] - fw.horizon + jnp.arange(fw.horizon)
        h = jnp.take_along_axis(fw.hidden(p, wc), idx[..., None], axis=1)
        toks = jnp.repeat(tok, lays.shape[0], 0)
        targets = jnp.take_along_axis(toks, jnp.take_along_axis(wc.target, idx, axis=1), axis=1)
        per = fw._nll(p, h, targets)
        return per.mean(-1), per
    return f
