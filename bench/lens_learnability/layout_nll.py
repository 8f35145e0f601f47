"""The horizon NLL of several layouts of one sequence in one jitted forward (fact_gain.py, sink_gain.py,
narrow_gain.py)."""
import jax
import jax.numpy as jnp


def layout_nll(fw, cap: int):
    """fn(params, tokens [1, T+1], layouts int8 [L, N1]) -> (mean NLL of the horizon [L], per-token NLL
    of the horizon [L, H]), each layout assembled at `cap` entries and read by `fw`'s base
    (`MCForward.horizon_token_nll`)."""
    @jax.jit
    def f(p, tok, lays):
        wc = fw.assemble(fw.tree(p, tok), lays[None], cap)
        per = fw.horizon_token_nll(p, wc, jnp.repeat(tok, lays.shape[0], 0))
        return per.mean(-1), per
    return f
