"""The tokenizer a GGUF file describes, as an HF `tokenizers` byte-level BPE.

A GGUF carries no tokenizer.json: llama.cpp keeps the vocabulary as metadata —
`tokenizer.ggml.model` ("gpt2": byte-level BPE, the only kind built here), `.tokens` (id → token,
spelled in the byte-level alphabet), `.merges` ("a b", best first), `.token_type` (1 normal,
3 control, 4 user-defined, ...), `.pre` (which pre-tokenizer the merges were learned with),
`.bos_token_id` and `.add_bos_token`. `build(path)` rebuilds the tokenizer from them:

- the BPE model over tokens and merges (with llama.cpp's `ignore_merges` for Llama 3: a piece
  that is itself a token is not split), a ByteLevel decoder;
- control tokens as special added tokens and user-defined ones as added tokens, so
  `<|im_start|>` and its kin are matched whole in text, never cut into pieces;
- the pre-tokenizer llama.cpp uses for `.pre` (PRE_TOKENIZERS; a missing key is llama.cpp's
  "default"): the GPT-2 regex; digits split one by one, then the GPT-2 regex (StarCoder's
  family, SmolLM's: the Sequence[Digits(individual_digits), ByteLevel] of SmolLM2's own
  tokenizer.json); Llama 3's split regex; Qwen2's (with the NFC normalizer of its
  tokenizer.json). Any other `.pre` is one DataError line: ids from the wrong pre-tokenizer
  would differ from the model's silently;
- when `.add_bos_token` is true, a post-processor that prepends the BOS token: the same place an
  HF tokenizer.json records it, so `Tokenizer.load` takes it as the document-start token here
  and in the tokenizer.json that prep writes beside the data.

(transformers' own GGUF conversion has no entry for "smollm" and falls back to the plain GPT-2
regex; that gives other ids than SmolLM2's tokenizer where two or more whitespace characters
precede a digit — "x  12" is x|ĠĠ|1|2 in SmolLM2, x|Ġ|Ġ|1|2 there — tests/test_gguf.py.)
"""

from __future__ import annotations

from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

from mcjax.errors import DataError, UserError
from mcjax.model.gguf_base import metadata

CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gpt2():
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2():
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2()])


def _split(regex: str):
    return lambda: pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(regex), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )


# tokenizer.ggml.pre -> (pre-tokenizer, normalizer or None, ignore_merges), as llama.cpp groups them
PRE_TOKENIZERS = {
    **{name: (_gpt2, None, False) for name in ("default", "gpt2", "gpt-2", "mpt", "olmo")},
    **{name: (_digits_then_gpt2, None, False) for name in ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone")},
    **{name: (_split(_LLAMA3_SPLIT), None, True) for name in ("llama3", "llama-v3", "llama-bpe")},
    **{name: (_split(_QWEN2_SPLIT), normalizers.NFC, False) for name in ("qwen2", "deepseek-r1-qwen")},
}


def build(path: str | Path) -> tokenizers.Tokenizer:
    """The HF tokenizer of the GGUF at `path` (module doc). DataError (one line naming the file
    and key) for a vocabulary that is not byte-level BPE, or an unknown pre-tokenizer."""
    path = Path(path).expanduser()
    try:
        meta = metadata(path)
        kind = meta.get("tokenizer.ggml.model", str)
        pre = meta.get("tokenizer.ggml.pre", str, "default")
        tokens = meta.get("tokenizer.ggml.tokens")
        merges = meta.get("tokenizer.ggml.merges", None, [])
        types = meta.get("tokenizer.ggml.token_type", None, [1] * len(tokens))
        add_bos = meta.get("tokenizer.ggml.add_bos_token", bool, False)
        bos_id = meta.get("tokenizer.ggml.bos_token_id", int, -1)
    except UserError as e:
        raise DataError(str(e)) from None
    if kind != "gpt2":
        raise DataError(f"{path}: tokenizer.ggml.model {kind!r} is not supported (supported: 'gpt2', byte-level BPE)")
    if pre not in PRE_TOKENIZERS:
        raise DataError(f"{path}: tokenizer.ggml.pre {pre!r} is not supported (supported: {', '.join(sorted(PRE_TOKENIZERS))})")
    pre_tokenizer, normalizer, ignore_merges = PRE_TOKENIZERS[pre]

    vocab = {token: i for i, token in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    hf = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=ignore_merges))
    hf.pre_tokenizer = pre_tokenizer()
    if normalizer is not None:
        hf.normalizer = normalizer()
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == CONTROL])
    hf.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED])
    if add_bos:
        if not 0 <= bos_id < len(tokens):
            raise DataError(f"{path}: tokenizer.ggml.add_bos_token is true but bos_token_id {bos_id} is not a token id")
        bos = tokens[bos_id]
        hf.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, bos_id)])
    return hf
