"""A small byte-level BPE tokenizer: a thin wrapper over HF `tokenizers`.

`train_bpe(texts, vocab_size)` trains deterministically (same texts → byte-identical
tokenizer.json); `Tokenizer.load(path)` reads a local tokenizer.json, or the tokenizer a .gguf
file describes (`gguf_tokenizer.py`). Id 0 is `<|bos|>`, which prep puts before every document;
`<|pad|>` is reserved.

A pretrained model's tokenizer has its own document-start token: the `bos_token` of a
tokenizer_config.json beside it, else the token its post-processor puts first (a GGUF's BOS
when its `add_bos_token` is true), else the first of `BOS_FALLBACKS` it has (Llama 3's
`<|begin_of_text|>`, Llama 2's `<s>`, SmolLM's and Qwen's `<|endoftext|>`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from mcjax.errors import DataError
from mcjax.model.gguf_base import is_gguf

BOS = "<|bos|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = (BOS, PAD)
BOS_FALLBACKS = (BOS, "<|begin_of_text|>", "<s>", "<|endoftext|>")


def base_tokenizer_file(base: str | Path) -> Path:
    """The tokenizer a pretrained base brings: a .gguf file's own, or DIR/tokenizer.json."""
    return Path(base) if is_gguf(base) else Path(base) / "tokenizer.json"


def _template_bos(hf: tokenizers.Tokenizer) -> str | None:
    """The special token a TemplateProcessing post-processor puts before a single text."""
    post = json.loads(hf.to_str()).get("post_processor") or {}
    first = (post.get("single") or [{}])[0] if post.get("type") == "TemplateProcessing" else {}
    return first.get("SpecialToken", {}).get("id")


def _configured_bos(path: Path) -> str | None:
    """bos_token of tokenizer_config.json beside `path` (a string or {"content": ...})."""
    config = path.parent / "tokenizer_config.json"
    try:
        bos = json.loads(config.read_text()).get("bos_token")
    except (OSError, ValueError, AttributeError):
        return None
    return bos.get("content") if isinstance(bos, dict) else bos


class Tokenizer:
    """Encode text to token ids and back. Wraps a `tokenizers.Tokenizer`."""

    def __init__(self, hf: tokenizers.Tokenizer, bos: str = BOS):
        self.hf = hf
        self.bos = bos

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Read a tokenizer.json or a .gguf's tokenizer; DataError naming the path if it is
        missing or invalid."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: tokenizer file not found")
        configured = None
        if is_gguf(path):
            from mcjax.data import gguf_tokenizer

            hf = gguf_tokenizer.build(path)
        else:
            try:
                hf = tokenizers.Tokenizer.from_file(str(path))
            except Exception as e:  # tokenizers raises plain Exception on bad JSON
                first = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise DataError(f"{path}: not a valid tokenizer.json: {first}") from None
            configured = _configured_bos(path)
        candidates = [b for b in (configured, _template_bos(hf), *BOS_FALLBACKS) if b]
        bos = next((b for b in candidates if hf.token_to_id(b) is not None), None)
        if bos is None:
            raise DataError(f"{path}: tokenizer has no document-start token (none of {', '.join(dict.fromkeys(candidates))})")
        return cls(hf, bos)

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json (compact, deterministic)."""
        Path(path).write_text(self.to_json())

    def to_json(self) -> str:
        return self.hf.to_str(pretty=False)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        bos = self.hf.token_to_id(self.bos)
        assert bos is not None  # checked at load/train
        return bos

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode each text (no special tokens added) → one id list per text."""
        return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Ids → text; special tokens (bos) are kept so document boundaries stay visible."""
        return self.hf.decode(list(ids), skip_special_tokens=False)


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE with `vocab_size` tokens (256 bytes + specials + merges)."""
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer=trainer)
    tok = Tokenizer(hf)
    assert tok.bos_id == 0, tok.bos_id
    return tok

