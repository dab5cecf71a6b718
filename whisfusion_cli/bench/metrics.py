"""Accuracy in the two labelled conventions (SPEC section 7), and the duration buckets of the latency table.

* corpus WER and CER after the Whisper English normaliser (`whisper_normalizer`, the Open ASR Leaderboard
  convention): total word errors over total reference words;
* the paper's WER: the mean of per-utterance WERs after lower-casing and deleting non-word characters. It
  weights a 3-word utterance like a 40-word one, so it can differ a lot from the corpus number.
"""

from __future__ import annotations

import math
import re
from typing import Any

# Duration buckets (seconds, [low, high)) of the latency table: the paper's split around 20 s.
BUCKETS = ((0.0, 10.0, "0-10 s"), (10.0, 20.0, "10-20 s"), (20.0, 30.0, "20-30 s"), (30.0, math.inf, ">30 s"))

_PAPER_NON_WORD = re.compile(r"[^\w\s]")
_WHISPER_NORMALISER = None


def _whisper_normaliser():
    from whisper_normalizer.english import EnglishTextNormalizer

    global _WHISPER_NORMALISER
    if _WHISPER_NORMALISER is None:
        _WHISPER_NORMALISER = EnglishTextNormalizer()
    return _WHISPER_NORMALISER


def normalise_whisper(text: str) -> str:
    """The Whisper English normaliser (Open ASR Leaderboard convention), whitespace collapsed."""
    return " ".join(_whisper_normaliser()(text).split())


def normalise_paper(text: str) -> str:
    """The paper's simple normaliser: lower case, non-word characters deleted, whitespace collapsed."""
    return " ".join(_PAPER_NON_WORD.sub("", text.lower()).split())


def corpus_error_rates(refs: list[str], hyps: list[str]) -> dict[str, Any]:
    """Corpus WER and CER after the Whisper normaliser: total edits over total reference words/characters."""
    import jiwer

    r = [normalise_whisper(t) for t in refs]
    h = [normalise_whisper(t) for t in hyps]
    ref_words = sum(len(t.split()) for t in r)
    ref_chars = sum(len(t) for t in r)
    if not r or ref_words == 0:
        return {"wer": math.nan, "cer": math.nan, "ref_words": 0, "ref_chars": 0,
                "substitutions": 0, "deletions": 0, "insertions": 0}
    words = jiwer.process_words(r, h)
    cer = jiwer.cer(r, h) if ref_chars else math.nan
    return {"wer": float(words.wer), "cer": float(cer), "ref_words": ref_words, "ref_chars": ref_chars,
            "substitutions": words.substitutions, "deletions": words.deletions, "insertions": words.insertions}


def utterance_wer_paper(ref: str, hyp: str) -> float | None:
    """One utterance's WER with the paper's normaliser; None when the reference has no words."""
    import jiwer

    r, h = normalise_paper(ref), normalise_paper(hyp)
    if not r:
        return None
    return float(jiwer.wer(r, h))


def mean_utterance_wer(refs: list[str], hyps: list[str]) -> float:
    """The paper's WER: the mean over utterances of each utterance's WER (empty references left out)."""
    values = [w for w in (utterance_wer_paper(r, h) for r, h in zip(refs, hyps)) if w is not None]
    return float(sum(values) / len(values)) if values else math.nan


def accuracy(refs: list[str], hyps: list[str]) -> dict[str, Any]:
    corpus = corpus_error_rates(refs, hyps)
    return {
        "wer_corpus_whisper_norm": corpus["wer"],
        "cer_corpus_whisper_norm": corpus["cer"],
        "wer_mean_utterance_paper_norm": mean_utterance_wer(refs, hyps),
        **{k: v for k, v in corpus.items() if k not in ("wer", "cer")},
    }


def bucket_of(duration: float) -> str:
    for low, high, name in BUCKETS:
        if low <= duration < high:
            return name
    return BUCKETS[-1][2]
