"""Chunk arithmetic for black-box scoring: where the chunks go, the smoothed reward, speculative acceptance.

Pure functions over the student's completion given as one string per student token ("pieces"; their
concatenation is the completion text). Positions and lengths count student tokens, so the trainer can put
each chunk's reward on exactly the tokens it was computed for, whatever tokenizer the API teacher uses.
"""

from __future__ import annotations

from dataclasses import dataclass


def pick_chunks(
    num_tokens: int, num_chunks: int, chunk_tokens: int, entropies: list[float] | None = None
) -> list[tuple[int, int]]:
    """Up to `num_chunks` non-overlapping [start, end) spans of at most `chunk_tokens`, sorted by start.

    With entropies (one per token) a chunk starts at each of the highest-entropy positions in turn that
    does not overlap a chosen chunk: the tokens where the student hesitated most are the ones worth a
    teacher's verdict. A chunk is cut where the next chosen chunk or the completion begins/ends. Without
    entropies the completion is split into `num_chunks` equal segments and a chunk starts each one.
    """
    if num_tokens <= 0 or num_chunks <= 0 or chunk_tokens <= 0:
        return []
    if entropies is None:
        starts = sorted({(i * num_tokens) // num_chunks for i in range(num_chunks)})
    else:
        if len(entropies) != num_tokens:
            raise ValueError(f"{len(entropies)} entropies for {num_tokens} completion tokens")
        # Highest entropy first; ties go to the earlier position (a stable, deterministic order).
        order = sorted(range(num_tokens), key=lambda t: (-entropies[t], t))
        starts = []
        for t in order:
            if len(starts) == num_chunks:
                break
            # t may start a chunk unless it falls inside one already chosen (a chunk before t reaching t).
            if all(not (s <= t < s + chunk_tokens) for s in starts):
                starts.append(t)
        starts.sort()
    spans = []
    for i, start in enumerate(starts):
        limit = starts[i + 1] if i + 1 < len(starts) else num_tokens
        spans.append((start, min(start + chunk_tokens, limit, num_tokens)))
    return spans


def smoothed_reward(matches: int, num_samples: int, prior: float, alpha: float) -> float:
    """(k + α·prior) / (N + α): the share of teacher samples that match, shrunk towards `prior`.

    A Beta-prior estimate of "the teacher would say this too": with few samples (N = 4) one match more or
    less moves a raw share by 0.25; α pseudo-samples at `prior` keep a single draw from dominating.
    """
    if num_samples < 0 or alpha < 0 or num_samples + alpha <= 0:
        raise ValueError(f"need num_samples + alpha > 0; got N={num_samples}, alpha={alpha}")
    return (matches + alpha * prior) / (num_samples + alpha)


@dataclass(frozen=True)
class TeacherToken:
    """One token of the teacher's greedy answer as the API reports it."""

    text: str
    logprob: float | None
    alternatives: dict[str, float]  # top_logprobs: token text -> logprob (includes the chosen token)


@dataclass(frozen=True)
class Verification:
    accepted_tokens: int  # leading student tokens that the teacher's greedy continuation reproduces
    token_logprobs: list[float | None]  # per chunk token: the teacher's logprob of it, where known


def verify_chunk(
    pieces: list[str],
    greedy_text: str,
    greedy_tokens: list[TeacherToken] | None,
    stopped: bool,
    ends_completion: bool,
    skip_chars: int = 0,
) -> Verification:
    """Speculative verification of a student chunk against the teacher's greedy continuation.

    A student token is accepted when every character up to its end equals the greedy text (the teacher,
    decoding greedily, would have written it). A final empty piece (the student's end-of-sequence token)
    is accepted when the teacher stopped at that very point too. The teacher's logprob of student token i
    is known when a teacher token starts exactly where it starts (same boundary, on the greedy path) and
    lists i's text among its alternatives (top_logprobs): always true for accepted tokens of a teacher with
    the student's tokenizer, and for the first rejected token when it is in the teacher's top-k.
    `skip_chars`: characters at the start of the teacher's tokens that greedy_text leaves out (a repeat of
    the prefix that was cut).
    """
    common = _common_prefix_len("".join(pieces), greedy_text)
    accepted, offset = 0, 0
    for i, piece in enumerate(pieces):
        end = offset + len(piece)
        if piece == "" and ends_completion and i == len(pieces) - 1:
            ok = stopped and common == offset == len(greedy_text)
        else:
            ok = end <= common
        if not ok:
            break
        accepted, offset = accepted + 1, end
    logprobs: list[float | None] = [None] * len(pieces)
    if greedy_tokens:
        by_start: dict[int, TeacherToken] = {}
        position = -skip_chars
        for token in greedy_tokens:
            if position > common:
                break  # off the shared path: the teacher's later distributions follow other text
            by_start.setdefault(position, token)
            position += len(token.text)
        offset = 0
        for i, piece in enumerate(pieces[: accepted + 1]):
            starting = by_start.get(offset)  # the teacher's token that starts where this piece does
            if starting is not None and piece:
                logprobs[i] = starting.alternatives.get(piece)
            offset += len(piece)
    return Verification(accepted, logprobs)


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
