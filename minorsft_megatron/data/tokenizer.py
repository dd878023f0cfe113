"""Tokenizers through megatron-core's tokenizer library: SentencePiece, Hugging Face and tiktoken.

`load_tokenizer(path)` picks the library from what `path` is and wraps megatron-core's tokenizer in the few
calls SFT preprocessing needs: `encode` (never adds BOS/EOS; special-token strings in the text become their
ids, as each library does natively), `decode` (exact inverse, special tokens kept), the BOS/EOS ids, whether
the tokenizer adds a BOS by default, its special-token strings, and an identity (library + SHA-256 of its
files) that goes into the dataset fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

from minorsft_megatron.errors import UserError

# Files of a Hugging Face tokenizer directory that determine how it tokenizes (model weights are not hashed).
HF_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
)
TIKTOKEN_NUM_SPECIAL_TOKENS = 1000  # megatron-core's default: ids below this are special tokens


class TokenizerError(UserError):
    """A tokenizer path that cannot be loaded or lacks something a setting needs."""


def update_from_file(digest, path: str) -> None:
    """Feed a file's bytes to `digest`, 1 MiB at a time."""
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)


def sha256_of_files(paths: list[str]) -> str:
    """SHA-256 over each file's name and bytes, in order."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(os.path.basename(path).encode() + b"\0")
        update_from_file(digest, path)
    return digest.hexdigest()


def detect_library(path: str) -> str:
    """'sentencepiece' for a .model file, 'huggingface' for a tokenizer directory, 'tiktoken' for a vocab .json."""
    if os.path.isdir(path):
        if any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
            return "huggingface"
    elif os.path.isfile(path):
        if path.endswith(".model"):
            return "sentencepiece"
        if path.endswith((".json", ".tiktoken")):
            return "tiktoken"
    elif not os.path.exists(path):
        raise TokenizerError(f"{path}: no such file or directory")
    raise TokenizerError(
        f"{path}: not a SentencePiece .model file, a Hugging Face tokenizer directory "
        "(with tokenizer.json or tokenizer_config.json) or a tiktoken vocabulary .json"
    )


@dataclass
class SFTTokenizer:
    """megatron-core's tokenizer plus what SFT preprocessing needs to know about it."""

    library: str
    """'sentencepiece', 'huggingface' or 'tiktoken'."""
    path: str
    """Where it was loaded from."""
    megatron: object
    """The megatron-core tokenizer (`MegatronTokenizer.from_pretrained`)."""
    sha256: str
    """SHA-256 over the tokenizer's files."""
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    bos_token: str | None
    """BOS as text, for chat templates that write `{{ bos_token }}`."""
    eos_token: str | None
    adds_bos: bool
    """True when the library's default encoding starts with BOS (a Llama Hugging Face tokenizer, say)."""
    chat_template: str | None
    """The Jinja chat template in a Hugging Face tokenizer's config, if any."""
    special_tokens: frozenset[str] = field(default_factory=frozenset)
    """Strings that `encode` turns into special-token ids (chat markers; for tiktoken also <s>, </s>...).
    SentencePiece never parses its control pieces (<s>, </s>) from text, so they are not listed for it."""

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no BOS or EOS added."""
        return list(self.megatron.tokenize(text))

    def decode(self, ids) -> str:
        """Text of `ids`, special tokens included: decode(encode(t)) == t for lossless tokenizers."""
        ids = [int(i) for i in ids]
        inner = self.megatron._tokenizer
        if self.library == "sentencepiece":
            return inner.tokenizer.decode_ids(ids)
        if self.library == "huggingface":
            return inner.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return _tiktoken_decode(inner, ids)

    @property
    def identity(self) -> dict:
        return {"library": self.library, "path": os.path.abspath(self.path), "sha256": self.sha256,
                "vocab_size": self.vocab_size, "bos_id": self.bos_id, "eos_id": self.eos_id,
                "pad_id": self.pad_id, "adds_bos": self.adds_bos}


def _tiktoken_decode(inner, ids: list[int]) -> str:
    """Byte-exact tiktoken decode (megatron-core's decodes token by token, which splits UTF-8 characters)."""
    out = bytearray()
    for i in ids:
        if i < inner.num_special_tokens:
            out += inner.special_tokens[i].encode()
        else:
            out += inner.tokenizer.decode_single_token_bytes(i)
    return out.decode("utf-8", errors="replace")


def _none_if_negative(value):
    return None if value is None or value < 0 else int(value)


def _load_sentencepiece(path):
    from megatron.core.tokenizers import MegatronTokenizer

    try:
        tok = MegatronTokenizer.from_pretrained(path, metadata_path={"library": "sentencepiece"})
    except (RuntimeError, OSError, ValueError) as err:  # sentencepiece's error for a damaged .model
        raise TokenizerError(f"{path}: cannot load the SentencePiece model: {(str(err).splitlines() or [''])[0]}")
    sp = tok._tokenizer.tokenizer
    specials = {sp.id_to_piece(i) for i in range(sp.get_piece_size()) if _is_user_defined(sp, i)}
    return tok, dict(
        sha256=sha256_of_files([path]), vocab_size=sp.get_piece_size(), bos_id=_none_if_negative(sp.bos_id()),
        eos_id=_none_if_negative(sp.eos_id()), pad_id=_none_if_negative(sp.pad_id()), adds_bos=False,
        bos_token=sp.id_to_piece(sp.bos_id()) if sp.bos_id() >= 0 else None,
        eos_token=sp.id_to_piece(sp.eos_id()) if sp.eos_id() >= 0 else None,
        chat_template=None, special_tokens=frozenset(specials),
    )


def _is_user_defined(sp, i: int) -> bool:
    """A user-defined piece (a chat marker, say): encoded whole from text, so it round-trips to its own id."""
    piece = sp.id_to_piece(i)
    return not (sp.is_control(i) or sp.is_byte(i) or sp.is_unknown(i)) and len(piece) > 1 and \
        piece.startswith("<") and piece.endswith(">") and sp.encode(piece) == [i]


def _load_huggingface(path):
    from megatron.core.tokenizers import MegatronTokenizer

    try:
        # include_special_tokens: encode text only (megatron-core's default became True in 0.17: BOS added)
        tok = MegatronTokenizer.from_pretrained(path, metadata_path={"library": "huggingface"}, use_fast=True,
                                                include_special_tokens=False)
    except (ValueError, OSError, ImportError) as err:
        raise TokenizerError(f"{path}: cannot load the Hugging Face tokenizer: {str(err).splitlines()[0]}")
    hf = tok._tokenizer.tokenizer
    specials = set(hf.all_special_tokens) | {t.content for t in hf.added_tokens_decoder.values() if t.special}
    with_specials = hf.encode("", add_special_tokens=True)
    files = [os.path.join(path, f) for f in HF_TOKENIZER_FILES if os.path.isfile(os.path.join(path, f))]
    return tok, dict(
        sha256=sha256_of_files(files), vocab_size=len(hf), bos_id=hf.bos_token_id, eos_id=hf.eos_token_id,
        pad_id=hf.pad_token_id, bos_token=hf.bos_token, eos_token=hf.eos_token,
        adds_bos=hf.bos_token_id is not None and with_specials[:1] == [hf.bos_token_id],
        chat_template=hf.chat_template if isinstance(hf.chat_template, str) else None,
        special_tokens=frozenset(specials),
    )


def _load_tiktoken(path):
    from megatron.core.tokenizers import MegatronTokenizer

    try:
        with open(path, encoding="utf-8") as f:
            num_ranks = len(json.load(f))
    except (ValueError, UnicodeDecodeError, TypeError) as err:
        raise TokenizerError(f"{path}: not a tiktoken vocabulary JSON list: {err}")
    vocab_size = TIKTOKEN_NUM_SPECIAL_TOKENS + num_ranks
    tok = MegatronTokenizer.from_pretrained(
        path, metadata_path={"library": "tiktoken"}, vocab_size=vocab_size,
        num_special_tokens=TIKTOKEN_NUM_SPECIAL_TOKENS,
    )
    inner = tok._tokenizer
    return tok, dict(
        sha256=sha256_of_files([path]), vocab_size=vocab_size, bos_id=inner.bos_id, eos_id=inner.eos_id,
        pad_id=inner.pad_id, bos_token="<s>", eos_token="</s>", adds_bos=False, chat_template=None,
        special_tokens=frozenset(inner.special_tokens),
    )


LOADERS = {"sentencepiece": _load_sentencepiece, "huggingface": _load_huggingface, "tiktoken": _load_tiktoken}


def load_tokenizer(path: str) -> SFTTokenizer:
    """Load the tokenizer at `path` through megatron-core; raises TokenizerError with a one-line reason."""
    library = detect_library(path)
    megatron_tokenizer, facts = LOADERS[library](path)
    return SFTTokenizer(library=library, path=path, megatron=megatron_tokenizer, **facts)
