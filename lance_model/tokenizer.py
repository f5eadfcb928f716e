"""Tokenizers with the Qwen2 chat special tokens.

Real checkpoints use the Qwen2 tokenizer read from the checkpoint directory (never downloaded).
The `tiny`/`nano` presets use `ByteTokenizer`: UTF-8 bytes plus the same special tokens, so the
sequence builder renders exactly the same template for both.

`tokenizer_record` names a tokenizer and fingerprints its vocabulary; curated shards store it next to
the token ids they hold, so a reader can tell whether those ids mean what its own tokenizer means.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Protocol

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
ENDOFTEXT = "<|endoftext|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)


class Tokenizer(Protocol):
    """What the sequence builder and the samplers need from a tokenizer."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def special_id(self, token: str) -> int: ...

    def vocab(self) -> dict[str, int]: ...

    def __len__(self) -> int: ...


class ByteTokenizer:
    """UTF-8 bytes (ids 0..255) followed by the Qwen2 chat special tokens (ids 256..)."""

    name = "byte"

    def __init__(self) -> None:
        self._special = {tok: 256 + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self._special_by_id = {i: tok for tok, i in self._special.items()}
        self._split = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in self._split.split(text):
            if not piece:
                continue
            if piece in self._special:
                ids.append(self._special[piece])
            else:
                ids.extend(piece.encode("utf-8"))
        return ids

    def decode(self, ids: list[int]) -> str:
        out: list[str] = []
        buf = bytearray()
        for i in ids:
            if i < 256:
                buf.append(i)
                continue
            if buf:
                out.append(buf.decode("utf-8", errors="replace"))
                buf = bytearray()
            out.append(self._special_by_id.get(i, ""))
        if buf:
            out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def special_id(self, token: str) -> int:
        return self._special[token]

    def __len__(self) -> int:
        return 256 + len(SPECIAL_TOKENS)

    def vocab(self) -> dict[str, int]:
        return {**{f"<0x{b:02X}>": b for b in range(256)}, **self._special}


class HFTokenizer:
    """A Qwen2 tokenizer from a local checkpoint directory (tokenizer.json / vocab.json + merges.txt)."""

    def __init__(self, directory: str | Path) -> None:
        from transformers import AutoTokenizer

        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"tokenizer directory not found: {directory}")
        self.name = directory.resolve().name
        self._tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        missing = [t for t in SPECIAL_TOKENS[:5] if self._tok.convert_tokens_to_ids(t) is None
                   or self._tok.convert_tokens_to_ids(t) == self._tok.unk_token_id]
        if missing:
            raise ValueError(f"tokenizer in {directory} lacks the special tokens {missing}")

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def special_id(self, token: str) -> int:
        return int(self._tok.convert_tokens_to_ids(token))

    def __len__(self) -> int:
        return len(self._tok)

    def vocab(self) -> dict[str, int]:
        return dict(self._tok.get_vocab())

    def merges(self) -> list:
        """The BPE merge rules (they decide the ids as much as the vocabulary does); [] if none."""
        backend = getattr(self._tok, "backend_tokenizer", None)
        if backend is None:
            return []
        return json.loads(backend.to_str()).get("model", {}).get("merges") or []


def load_tokenizer(spec: str) -> Tokenizer:
    """`"byte"` -> ByteTokenizer; anything else is a local directory with a Qwen2 tokenizer."""
    if spec == "byte":
        return ByteTokenizer()
    return HFTokenizer(spec)


def tokenizer_record(tokenizer: Tokenizer) -> dict[str, str | int]:
    """`{"name", "vocab_size", "fingerprint"}` of a tokenizer: the fingerprint is a SHA-256 over its
    (token, id) pairs, BPE merges and special-token ids, so two tokenizers with the same fingerprint
    turn every text into the same ids. The name (not part of the fingerprint) is for messages."""
    merges = tokenizer.merges() if hasattr(tokenizer, "merges") else []
    identity = {"vocab": sorted(tokenizer.vocab().items()), "merges": merges,
                "special": {t: tokenizer.special_id(t) for t in SPECIAL_TOKENS[:5]}}
    digest = hashlib.sha256(json.dumps(identity, ensure_ascii=False).encode()).hexdigest()
    return {"name": str(getattr(tokenizer, "name", type(tokenizer).__name__)), "vocab_size": len(tokenizer),
            "fingerprint": digest[:16]}
