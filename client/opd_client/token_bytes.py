"""Each token's UTF-8 bytes, and the byte span each token of a sequence covers in its text.

Cross-tokenizer distillation (docs/methods.md) compares a student and a teacher that cut the same text
into different tokens; it needs, on both sides, where every token sits in that text. Character offsets
are not enough: byte-level BPE (SmolLM2, Llama 3, Qwen) splits a multi-byte character over several
tokens, which then share one character span. Bytes are exact: each token owns the bytes it adds, the
spans of a sequence tile its text, and a character's pieces sit side by side.

A token's bytes come from its vocabulary string, by the tokenizer's decoder:
- ByteLevel (GPT-2 style): every character of the string stands for one byte (the bytes_to_unicode table);
- SentencePiece style (Gemma, Llama 2, Mistral v0.1): "▁" is a space, "<0xNN>" a byte-fallback byte,
  anything else its UTF-8;
- special tokens (BOS, EOS, chat markers) add no text: b"".

TRL's GOLD trainer (trl/experimental/utils.py, encode_with_byte_offsets) derives byte offsets the same
way for ByteLevel tokenizers only and refuses the others; here the SentencePiece style works too.
Where a tokenizer's pieces do not add up to the text it was given (a normaliser that rewrites text),
`text_byte_spans` falls back to its character offsets, made monotone, so spans still tile the text.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
# Memo of each tokenizer's vocabulary bytes (a pure function of the tokenizer; built once, ~0.5 s at 262k).
_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _byte_level_table() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: the character that stands for each byte → the byte."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


_BYTE_LEVEL = _byte_level_table()


def is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and (
        "ByteLevel" in repr(backend.decoder) or "ByteLevel" in repr(backend.pre_tokenizer)
    )


def piece_bytes(piece: str, byte_level: bool) -> bytes:
    """The bytes one vocabulary string stands for."""
    if byte_level:
        if all(ch in _BYTE_LEVEL for ch in piece):
            return bytes(_BYTE_LEVEL[ch] for ch in piece)
        return piece.encode()  # an added (non-byte-level) token such as "<think>"
    fallback = _BYTE_FALLBACK.match(piece)
    if fallback:
        return bytes([int(fallback.group(1), 16)])
    return piece.replace("▁", " ").encode()


@dataclass(frozen=True)
class VocabBytes:
    """bytes_V[i]: token i's bytes (b"" for special tokens); text_V[i]: the same as a string (special
    tokens by their name, pieces of a character with U+FFFD: such strings are never matched across
    tokenizers)."""

    bytes_V: list[bytes]
    text_V: list[str]
    special_ids: frozenset[int]

    def text_of(self, ids: list[int]) -> list[str]:
        return [self.text_V[i] if 0 <= i < len(self.text_V) else "" for i in ids]


def vocab_bytes(tokenizer) -> VocabBytes:
    """The tokenizer's VocabBytes, built on first use and kept while the tokenizer lives."""
    table = _TABLES.get(tokenizer)
    if table is None:
        table = _build(tokenizer)
        _TABLES[tokenizer] = table
    return table


def _build(tokenizer) -> VocabBytes:
    size = max(len(tokenizer), max(tokenizer.get_vocab().values(), default=-1) + 1)
    pieces = tokenizer.convert_ids_to_tokens(list(range(size)))
    special = frozenset(int(i) for i in tokenizer.all_special_ids)
    special |= {i for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items() if tok.special}
    byte_level = is_byte_level(tokenizer)
    bytes_V, text_V = [], []
    for i, piece in enumerate(pieces):
        if piece is None:
            bytes_V.append(b"")
            text_V.append("")
        elif i in special:
            bytes_V.append(b"")
            text_V.append(piece)
        else:
            raw = piece_bytes(piece, byte_level)
            bytes_V.append(raw)
            text_V.append(raw.decode("utf-8", errors="replace"))
    return VocabBytes(bytes_V, text_V, frozenset(special))


def ids_text(ids: list[int], vocab: VocabBytes) -> tuple[str, list[tuple[int, int]]]:
    """The text a token sequence spells (special tokens add nothing) and each token's [start, end) byte
    span in that text's UTF-8. The spans tile the text: each byte belongs to exactly one token.

    Bytes that are not valid UTF-8 (a completion cut inside a character, or a stray byte token) become
    U+FFFD in the text (3 bytes), and the spans follow the text, so they still tile it."""
    pieces = [vocab.bytes_V[i] if 0 <= i < len(vocab.bytes_V) else b"" for i in ids]
    raw = b"".join(pieces)
    text, where = _decode_tracking(raw)
    spans, start = [], 0
    for piece in pieces:
        end = start + len(piece)
        spans.append((where[start], where[end]))
        start = end
    return text, spans


def _decode_tracking(raw: bytes) -> tuple[str, list[int]]:
    """(text, where): raw decoded as UTF-8 with invalid bytes as U+FFFD, and where[b] = the byte offset in
    text.encode() of raw's offset b (b = 0 .. len(raw)); a byte inside a replaced run maps to its end."""
    try:
        return raw.decode("utf-8"), list(range(len(raw) + 1))
    except UnicodeDecodeError:
        pass
    chars: list[str] = []
    where = [0] * (len(raw) + 1)
    out = b = 0
    while b < len(raw):
        n = _utf8_len(raw, b)
        if n:
            ch = raw[b : b + n].decode("utf-8")
            width = n
        else:
            ch, n, width = "\ufffd", 1, 3
        for k in range(1, n):
            where[b + k] = out + width  # inside a character: at its end
        chars.append(ch)
        where[b] = out
        out += width
        b += n
        where[b] = out
    return "".join(chars), where


def _utf8_len(raw: bytes, b: int) -> int:
    """Length of the valid UTF-8 character starting at raw[b], 0 if none starts there."""
    lead = raw[b]
    if lead < 0x80:
        return 1
    n = 2 if 0xC2 <= lead < 0xE0 else 3 if 0xE0 <= lead < 0xF0 else 4 if 0xF0 <= lead < 0xF5 else 0
    if n == 0 or b + n > len(raw):
        return 0
    try:
        raw[b : b + n].decode("utf-8")
    except UnicodeDecodeError:
        return 0
    return n


def text_byte_spans(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """The tokenizer's own tokens for `text` (no special tokens added) and each one's [start, end) byte
    span in text's UTF-8; the spans tile the text."""
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(encoding["input_ids"])
    raw = text.encode()
    vocab = vocab_bytes(tokenizer)
    pieces = [vocab.bytes_V[i] for i in ids]
    if b"".join(pieces) == raw:  # the usual case: the pieces spell the text exactly
        spans, start = [], 0
        for piece in pieces:
            spans.append((start, start + len(piece)))
            start += len(piece)
        return ids, spans
    return ids, _monotone_spans(text, encoding["offset_mapping"], len(raw))


def _monotone_spans(text: str, offsets: list[tuple[int, int]], num_bytes: int) -> list[tuple[int, int]]:
    """Character offsets → byte spans that tile [0, num_bytes): each token runs from where the previous one
    ended to its own end (never backwards); the last one ends at the text's end."""
    char_to_byte = [0]
    for ch in text:
        char_to_byte.append(char_to_byte[-1] + len(ch.encode()))
    spans, cursor = [], 0
    for _, end_char in offsets:
        end = max(cursor, char_to_byte[min(end_char, len(text))])
        spans.append((cursor, end))
        cursor = end
    if spans:
        spans[-1] = (spans[-1][0], num_bytes)
    return spans
