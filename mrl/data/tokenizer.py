"""Tokenizers: a built-in byte-level one (no files, no downloads) and Hugging Face tokenizers.

Both expose the same small interface (``Tokenizer``): ``encode`` returns plain token ids without
special tokens (mrl adds bos/eos itself), ``decode`` drops special tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Protocol, Sequence


class Tokenizer(Protocol):
    """What the data layer and the trainers need from a tokenizer."""

    vocab_size: int
    """Number of token ids (the model's true vocabulary size)."""
    bos_id: Optional[int]
    """Id prepended to every sequence, or None when the tokenizer has no beginning token."""
    eos_id: int
    """Id that ends a response (a prediction target)."""
    pad_id: int
    """Id written into padding positions (never a prediction target)."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens. Layout: ids 0..255 are the bytes, 256 bos, 257 eos, 258 pad.

    ``vocab_size`` is 259. Decoding skips the special ids and replaces invalid UTF-8 (a model may
    emit any byte sequence) with U+FFFD.
    """

    name = "byte"
    vocab_size = 259
    bos_id = 256
    eos_id = 257
    pad_id = 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        data = bytearray()
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the byte tokenizer's vocabulary [0, {self.vocab_size})")
            if i < 256:
                data.append(i)
        return data.decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer read from a local ``tokenizer.json``.

    Special tokens come from ``tokenizer_config.json`` or ``special_tokens_map.json`` next to it
    (keys bos_token / eos_token / pad_token). eos is required; a missing bos means none is
    prepended; a missing pad falls back to eos (padding is never a prediction target).
    """

    def __init__(self, path: str | Path) -> None:
        try:
            from tokenizers import Tokenizer as _HFTokenizer
        except ImportError as err:
            raise ImportError(
                f"loading the Hugging Face tokenizer at {path} needs the 'tokenizers' package: "
                "pip install 'mrl[hf]'"
            ) from err
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(
                f"tokenizer path {path} does not exist (data.tokenizer is 'byte' or a local directory)"
            )
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"{file} not found: a Hugging Face tokenizer directory must hold tokenizer.json")
        self.name = str(path)
        self._tok = _HFTokenizer.from_file(str(file))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        specials = _special_tokens(file.parent)
        self.bos_id = self._token_id(specials.get("bos_token"), "bos_token", file)
        eos_id = self._token_id(specials.get("eos_token"), "eos_token", file)
        if eos_id is None:
            raise ValueError(
                f"cannot tell the end-of-sequence token of {file}: neither tokenizer_config.json nor "
                "special_tokens_map.json next to it names an eos_token"
            )
        self.eos_id = eos_id
        pad_id = self._token_id(specials.get("pad_token"), "pad_token", file)
        self.pad_id = eos_id if pad_id is None else pad_id

    def _token_id(self, token: Optional[str], key: str, file: Path) -> Optional[int]:
        if token is None:
            return None
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{key} {token!r} of {file.parent} is not in the vocabulary of {file}")
        return token_id

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def _special_tokens(directory: Path) -> dict[str, str]:
    """bos/eos/pad token strings from tokenizer_config.json, then special_tokens_map.json."""
    found: dict[str, str] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # later files win
        file = directory / name
        if not file.is_file():
            continue
        try:
            config = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read {file}: {err}") from err
        for key in ("bos_token", "eos_token", "pad_token"):
            value = config.get(key)
            if isinstance(value, dict):  # {"content": "<s>", "lstrip": false, ...}
                value = value.get("content")
            if isinstance(value, str):
                found[key] = value
    return found


def build_tokenizer(spec: str) -> Tokenizer:
    """'byte' gives ``ByteTokenizer``; anything else is a local Hugging Face tokenizer path."""
    if spec == "byte":
        return ByteTokenizer()
    return HFTokenizer(spec)
