"""GistNet: exact numbers on tiny blocks, every kind × pooling × head, masks and gradients.

Compiles are the cost on a small CPU, so each combination is run through one jitted probe
and params are drawn from `jax.eval_shape(init)` (shapes only) unless the init itself is
under test.
"""

from __future__ import annotations

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mcjax.model.gistnet import GistNet, build_gistnet, masked_mean
from mcjax.model.gpt import rms_norm

D, K, HEADS = 16, 4, 2
COMBOS = [("mean", "mean", "linear"), ("mean", "mean", "mlp")] + [
    ("transformer", p, h) for p, h in itertools.product(("mean", "query", "cls"), ("linear", "mlp"))
]
GRAD_COMBOS = [("mean", "mean", "mlp", 1), ("transformer", "query", "linear", 2), ("transformer", "cls", "mlp", 1)]


def _net(kind, pooling, head, layers=1, **kw) -> GistNet:
    return GistNet(dim=D, kind=kind, layers=layers, pooling=pooling, head=head, num_heads=HEADS, **kw)


def _random_params(net, x, mask, seed=7, scale=0.3):
    """Params of the right shapes, every entry random (zero projections would hide wiring)."""
    shapes = nn.unbox(jax.eval_shape(net.init, jax.random.key(0), x, mask))
    rng = np.random.default_rng(seed)  # numpy: eager jax.random would compile once per shape
    return jax.tree.map(lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), s.dtype), shapes)


@pytest.fixture(scope="module")
def data():
    x = jax.random.normal(jax.random.key(0), (2, 3, K, D))
    mask = jnp.arange(K) < jnp.array([[4, 2, 1], [3, 4, 0]])[..., None]  # [2, 3, K]; one empty block
    return x, mask


@pytest.fixture(scope="module")
def probes(data):
    """Per combination, one forward over three copies of the batch: clean input, garbage and
    NaN in the padding (the outputs must agree)."""
    x, mask = data
    garbage = jnp.where(mask[..., None], x, 1e4 * jax.random.normal(jax.random.key(3), x.shape))
    nan_garbage = jnp.where(mask[..., None], x, jnp.nan)
    xs, masks = jnp.stack([x, garbage, nan_garbage]), jnp.stack([mask] * 3)
    nets = {combo: _net(*combo) for combo in COMBOS}
    params = {combo: _random_params(net, x, mask) for combo, net in nets.items()}

    @jax.jit  # one program for all combinations: one compile instead of eight
    def run(params):
        return [nets[c].apply(params[c], xs, masks) for c in COMBOS]

    return {c: dict(zip(("y", "garbage", "nan"), np.asarray(ys))) for c, ys in zip(COMBOS, run(params))}


def test_mean_linear_identity_is_normed_masked_mean():
    x = jnp.array([[[1.0, 2, 3, 4], [5, 6, 7, 8], [1e6, -3, 0, 2]]])  # [1, 3, 4]; last entry is padding
    mask = jnp.array([[True, True, False]])
    net = GistNet(dim=4, kind="mean", pooling="mean", head="linear")
    params = nn.unbox(net.init(jax.random.key(0), x, mask))
    np.testing.assert_array_equal(params["params"]["head"]["w"], np.eye(4))  # identity at init
    mean = np.array([3.0, 4, 5, 6])
    np.testing.assert_allclose(net.apply(params, x, mask)[0], mean / np.sqrt(np.mean(mean**2)), rtol=1e-6)
    everything = np.mean(np.asarray(x[0]), axis=0)  # mask None: every entry is real
    np.testing.assert_allclose(net.apply(params, x)[0], everything / np.sqrt(np.mean(everything**2)), rtol=1e-6)
    # a diagonal head scales channels before the final norm
    params["params"]["head"]["w"] = jnp.diag(jnp.array([1.0, 0, 0, 2]))
    want = np.array([3.0, 0, 0, 12]) / np.sqrt((9 + 144) / 4)
    np.testing.assert_allclose(net.apply(params, x, mask)[0], want, rtol=1e-6)


@pytest.mark.parametrize("combo", COMBOS, ids="-".join)
def test_shapes_scale_empty_blocks_and_padding(combo, data, probes):
    _, mask = data
    p = probes[combo]
    y = p["y"]
    assert y.shape == (2, 3, D) and y.dtype == np.float32
    assert np.isfinite(y).all()
    rms = np.sqrt(np.mean(np.square(y), axis=-1))
    np.testing.assert_allclose(rms[np.asarray(mask.any(-1))], 1.0, rtol=1e-3)  # unit RMS gists
    np.testing.assert_array_equal(y[1, 2], np.zeros(D))  # the all-masked block gives zeros
    np.testing.assert_allclose(p["garbage"], y, atol=1e-6)  # padding content changes nothing
    np.testing.assert_allclose(p["nan"], y, atol=1e-6)


def test_fresh_transformer_is_mean_pooling(data):
    """Zero output projections make a fresh mean-pooled GistNet rms_norm(masked mean of rms_norm(x))."""
    x, mask = data
    net = _net("transformer", "mean", "mlp", layers=2)

    @jax.jit
    def fresh(key):
        params = net.init(key, x, mask)
        return params, net.apply(params, x, mask)

    params, y = fresh(jax.random.key(1, impl="rbg"))  # rbg: a quicker compile than threefry
    want = rms_norm(masked_mean(rms_norm(x.reshape(6, K, D)), mask.reshape(6, K))).reshape(2, 3, D)
    want = jnp.where(mask.any(-1)[..., None], want, 0)
    np.testing.assert_allclose(y, want, atol=1e-5)
    p = nn.unbox(params)["params"]
    assert not p["encoder"]["wo"].any() and not p["encoder"]["w_proj"].any() and not p["head"]["w_proj"].any()
    assert p["encoder"]["wq"].std() > 0 and not np.allclose(p["encoder"]["wq"][0], p["encoder"]["wq"][1])


@pytest.mark.parametrize("combo", GRAD_COMBOS, ids=lambda c: "-".join(map(str, c)))
def test_gradient_reaches_every_param(combo, data):
    x, mask = data
    net = _net(*combo)
    params = _random_params(net, x, mask)
    target = jax.random.normal(jax.random.key(5), (2, 3, D))

    @jax.jit
    def grads(p, x):
        return jax.grad(lambda p, x: jnp.sum(net.apply(p, x, mask) * target), argnums=(0, 1))(p, x)

    gp, gx = grads(params, x)
    for path, g in jax.tree_util.tree_leaves_with_path(gp):
        assert np.isfinite(np.asarray(g)).all(), path
        assert np.abs(np.asarray(g)).max() > 0, f"no gradient reaches {jax.tree_util.keystr(path)}"
    assert np.isfinite(np.asarray(gx)).all()
    np.testing.assert_array_equal(np.asarray(gx)[~np.asarray(mask)], 0)  # nothing flows into padding


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_narrow_width(pooling, data):
    """gistnet.width G < D: the encoder (and cls entry) at G between down [D, G] and up [G, D];
    fresh, it is the mean-pooling baseline; with random params every one gets a gradient and
    padding still changes nothing; a width above D or one the heads cannot split is refused."""
    x, mask = data
    net = _net("transformer", pooling, "mlp", width=8)
    params = nn.unbox(jax.eval_shape(net.init, jax.random.key(0), x, mask))["params"]
    assert params["down"].shape == (D, 8) and params["up"].shape == (8, D)
    assert params["encoder"]["wq"].shape == (1, 8, 8) and params["head"]["w_fc"].shape == (D, 4 * D)
    assert pooling != "cls" or params["cls"].shape == (8,)
    fresh = nn.unbox(jax.jit(net.init)(jax.random.key(1, impl="rbg"), x, mask))
    want = rms_norm(masked_mean(rms_norm(x.reshape(6, K, D)), mask.reshape(6, K))).reshape(2, 3, D)
    np.testing.assert_allclose(net.apply(fresh, x, mask), jnp.where(mask.any(-1)[..., None], want, 0), atol=1e-5)

    rand = _random_params(net, x, mask)
    garbage = jnp.where(mask[..., None], x, 1e4)
    target = jax.random.normal(jax.random.key(5), (2, 3, D))

    @jax.jit
    def run(p):
        loss = lambda p: jnp.sum(net.apply(p, x, mask) * target)
        return net.apply(p, x, mask), net.apply(p, garbage, mask), jax.grad(loss)(p)

    y, y_garbage, grads = run(rand)
    np.testing.assert_allclose(y_garbage, y, atol=1e-6)
    assert not np.allclose(y, net.apply(fresh, x, mask), atol=1e-3)  # the narrow path is wired in
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert np.abs(np.asarray(g)).max() > 0, f"no gradient reaches {jax.tree_util.keystr(path)}"
    with pytest.raises(ValueError, match=r"width must lie in \[1, dim = 16\]"):
        jax.eval_shape(_net("transformer", pooling, "mlp", width=32).init, jax.random.key(0), x, mask)
    with pytest.raises(ValueError, match="width 6 must split into 2 heads"):
        jax.eval_shape(_net("transformer", pooling, "mlp", width=6).init, jax.random.key(0), x, mask)


def test_params_carry_logical_axes(data):
    from mcjax.train.sharding import RULES

    x, mask = data
    mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"))
    for combo in COMBOS:
        boxed = jax.eval_shape(_net(*combo).init, jax.random.key(1), x, mask)
        for path, leaf in jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda v: isinstance(v, nn.Partitioned)):
            assert isinstance(leaf, nn.Partitioned), jax.tree_util.keystr(path)
            assert len(leaf.names) == leaf.value.ndim
        nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, RULES)  # every name resolves


def test_bfloat16_compute(data):
    x, mask = data
    net = _net("transformer", "query", "mlp", dtype=jnp.bfloat16)
    params = _random_params(net, x, mask)
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(params))  # f32 params
    y = jax.jit(net.apply)(params, x, mask)
    assert y.dtype == jnp.bfloat16 and np.isfinite(np.asarray(y, np.float32)).all()


def test_invalid_fields_raise(data):
    x, mask = data
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="pooling"):
        jax.eval_shape(_net("transformer", "max", "mlp").init, key, x, mask)
    with pytest.raises(ValueError, match="heads"):
        jax.eval_shape(GistNet(dim=D, num_heads=3).init, key, x, mask)
    with pytest.raises(ValueError, match="width"):
        jax.eval_shape(GistNet(dim=8, kind="mean").init, key, x, mask)


def test_build_gistnet_from_config(tmp_path):
    from conftest import tiny_config

    from mcjax.config import config_from_dict

    gist = {"kind": "transformer", "pooling": "cls", "head": "linear", "layers": 1}
    net = build_gistnet(config_from_dict(tiny_config(tmp_path, gistnet=gist)))
    assert (net.dim, net.num_heads, net.kind, net.pooling, net.head, net.layers) == (64, 2, "transformer", "cls", "linear", 1)
    assert net.dtype == jnp.float32 and net.rope_base == 10000.0  # CPU resolves "auto" to f32
    x = jax.ShapeDtypeStruct((3, 32, 64), jnp.float32)
    params = jax.eval_shape(net.init, jax.random.key(0), x)
    assert jax.eval_shape(net.apply, params, x).shape == (3, 64)
    assert build_gistnet(config_from_dict(tiny_config(tmp_path, gistnet={"num_heads": 4}))).num_heads == 4
    narrow = build_gistnet(config_from_dict(tiny_config(tmp_path, gistnet={"width": 32})))
    assert (narrow.dim, narrow.inner_width, narrow.num_heads) == (64, 32, 1)  # heads of base_model.head_dim


def test_attention_choice(tmp_path, data):
    """"auto" resolves per backend (XLA on CPU); an explicit choice reaches GistNet and
    LensNet; cls pooling (its CLS key sits after the padding, so no key-length mask can
    express it) runs XLA attention even when cuDNN is asked for — identical outputs on CPU."""
    from conftest import tiny_config

    from mcjax.config import config_from_dict
    from mcjax.model.lensnet import build_lensnet

    cfg = config_from_dict(tiny_config(tmp_path))
    assert build_gistnet(cfg).attention == "xla" and build_lensnet(cfg).attention == "xla"
    cfg = config_from_dict(tiny_config(tmp_path, gistnet={"attention": "cudnn"}, lensnet={"attention": "cudnn"}))
    assert build_gistnet(cfg).attention == "cudnn" and build_lensnet(cfg).attention == "cudnn"
    x, mask = data
    xla, cudnn = _net("transformer", "cls", "mlp"), _net("transformer", "cls", "mlp", attention="cudnn")
    params = _random_params(xla, x, mask)
    np.testing.assert_array_equal(np.asarray(xla.apply(params, x, mask)), np.asarray(cudnn.apply(params, x, mask)))
