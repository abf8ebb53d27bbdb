"""Token-restricted distillation: the loss counts only the completion tokens a mask rule matches.

SafeSteer (Li et al. 2026, "SafeSteer: Localized On-Policy Distillation for Efficient Safety Alignment",
arXiv 2606.02530) restricts the reverse-KL penalty to a sparse set of safety tokens so that the rest of
the model's behaviour is left alone. Three rules, any of which may be given; a token counts when at
least one rule that applies to its rollout matches it:

- token ids: a set of vocabulary ids (`loss_token_ids`), e.g. the safety tokens SafeSteer selects;
- regex: a Python regular expression searched in the decoded completion (`loss_regex`); a token matches
  when the characters it adds to the text overlap a (non-empty) match;
- spans: `"loss_spans": [[start, end], ...]` on a prompt-file line, half-open character ranges of the
  decoded completion (for fixed dataset completions, or "the first 200 characters" of a rollout).

A rollout no rule applies to (no global rule and no spans on its prompt) keeps all its tokens.
Decoding skips special tokens: EOS adds no characters, so only the id rule can select it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path


def parse_token_ids(spec: str) -> frozenset[int]:
    """ "12, 345 678" → {12, 345, 678}; a path to an existing file reads the ids from the file instead."""
    if not spec.strip():
        return frozenset()
    text = Path(spec).read_text() if Path(spec).is_file() else spec
    parts = [p for p in re.split(r"[\s,]+", text.strip()) if p]
    try:
        ids = frozenset(int(p) for p in parts)
    except ValueError:
        raise ValueError(
            f"loss_token_ids: expected integers separated by commas or spaces (or a file of them); got {spec!r}"
        ) from None
    if any(i < 0 for i in ids):
        raise ValueError(f"loss_token_ids: token ids must be >= 0; got {sorted(i for i in ids if i < 0)}")
    return ids


@dataclass(frozen=True)
class TokenMaskRule:
    token_ids: frozenset[int] = frozenset()
    regex: re.Pattern | None = None

    @classmethod
    def from_config(cls, loss_token_ids: str, loss_regex: str) -> TokenMaskRule:
        try:
            pattern = re.compile(loss_regex) if loss_regex else None
        except re.error as e:
            raise ValueError(f"loss_regex {loss_regex!r} is not a valid regular expression: {e}") from None
        return cls(parse_token_ids(loss_token_ids), pattern)

    @property
    def is_global(self) -> bool:
        """True when a rule applies to every rollout (ids or regex given)."""
        return bool(self.token_ids) or self.regex is not None

    def mask(
        self, completion_ids: list[int], tokenizer, spans: list[list[int]] | None = None
    ) -> list[bool] | None:
        """One bool per completion token (True: in the loss), or None when no rule applies here."""
        if not self.is_global and not spans:
            return None
        keep = [i in self.token_ids for i in completion_ids]
        if self.regex is None and not spans:
            return keep
        text, offsets = token_char_spans(completion_ids, tokenizer)
        ranges: list[tuple[int, int] | list[int]] = list(spans or [])
        if self.regex is not None:
            ranges += [(m.start(), m.end()) for m in self.regex.finditer(text) if m.end() > m.start()]
        for t, (a, b) in enumerate(offsets):
            if not keep[t] and b > a and any(a < end and start < b for start, end in ranges):
                keep[t] = True
        return keep


def token_char_spans(ids: list[int], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """The decoded text and, per token, the [start, end) characters it contributes to.

    Fast path: when decoding each token alone and concatenating gives the full text (byte-level BPE on
    most text), offsets are the running lengths. Otherwise (a character split over several byte tokens,
    tokenizers that clean up spaces) decode every prefix, O(T²): a prefix ending inside a character
    decodes to a trailing U+FFFD, and every token holding bytes of that character covers it.
    """
    text = tokenizer.decode(ids, skip_special_tokens=True)
    pieces = tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=True)
    offsets: list[tuple[int, int]] = []
    if "".join(pieces) == text:
        end = 0
        for piece in pieces:
            offsets.append((end, end + len(piece)))
            end += len(piece)
        return text, offsets
    complete = 0  # characters complete before the current token
    for t in range(len(ids)):
        prefix = tokenizer.decode(ids[: t + 1], skip_special_tokens=True)
        clean = prefix.rstrip("\ufffd")
        partial = len(clean) < len(prefix)  # this token ends inside a character
        end = min(len(text), max(complete, len(clean) + (1 if partial else 0)))
        offsets.append((min(complete, end), end))
        complete = max(complete, len(clean))
    return text, offsets
