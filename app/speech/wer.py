"""Word error rate: word-level Levenshtein distance over the reference length.

Text is normalised first by default: lower case, punctuation removed (apostrophes inside words kept), split on
whitespace. With an empty reference the rate is the number of inserted words (0.0 when both are empty).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Final

_NOT_WORD: Final = re.compile(r"[^\w\s']+")
_STRAY_APOSTROPHE: Final = re.compile(r"(?<!\w)'|'(?!\w)")


def normalize_words(text: str) -> list[str]:
    """Lower-cased words without punctuation: ``"Okay, we're READY."`` -> ``["okay", "we're", "ready"]``."""
    without_punctuation = _STRAY_APOSTROPHE.sub(" ", _NOT_WORD.sub(" ", text.lower()))
    return without_punctuation.split()


def edit_distance(reference: Sequence[str], hypothesis: Sequence[str]) -> int:
    """Minimum substitutions + deletions + insertions turning ``reference`` into ``hypothesis``."""
    previous = list(range(len(hypothesis) + 1))
    for i, ref_word in enumerate(reference, start=1):
        current = [i]
        for j, hyp_word in enumerate(hypothesis, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref_word != hyp_word)))
        previous = current
    return previous[-1]


def word_error_rate(reference: str, hypothesis: str, *, normalize: bool = True) -> float:
    """Edit distance between the word sequences divided by the number of reference words."""
    ref_words = normalize_words(reference) if normalize else reference.split()
    hyp_words = normalize_words(hypothesis) if normalize else hypothesis.split()
    return edit_distance(ref_words, hyp_words) / max(1, len(ref_words))
