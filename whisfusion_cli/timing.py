"""Decoded windows -> words with times -> segments, the way Whisper aligns words.

Word timestamps come from the decoder's cross-attention over a window's final canvas (one forward, in
decoding.decode_windows): the weights of the model's alignment heads (`alignment_heads` in its config, pairs
of [layer, head]) are standardised over the tokens, median-filtered over time, averaged over the heads, and
a dynamic-time-warping path through them assigns every text token (and the end of text) to an encoder frame
(50 per second). A word starts at its first token's frame and ends where the next word starts. Unlike
Whisper's causal decoder, where a position's query predicts the next token, a position of the masked-
diffusion canvas holds its own token, so the rows are the text positions themselves.

Without word timestamps a window's words are spread over its speech (the VAD's) in proportion to their
length: the best that can be said without looking, and only used to place segment boundaries (such words
are not reported).

Segments end at sentence ends, at pauses, and before they would exceed a longest duration (the subtitle
convention, about 7 s).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np

from .audio import ENCODER_FRAMES_PER_SECOND
from .choices import MAX_SEGMENT_SECONDS

MEDIAN_FILTER_WIDTH = 7  # frames (Whisper's medfilt_width)
SENTENCE_ENDS = (".", "?", "!", "…")
CLAUSE_ENDS = (",", ";", ":")
PAUSE_SECONDS = 0.6  # a gap between words this long ends a segment
# A word longer than this many times the median word is cut to that (DTW gives the tail of a word before a
# pause all of the pause, as in Whisper, which cuts at twice the median too).
MAX_WORD_MEDIAN_RATIO = 2.0
MAX_WORD_SECONDS_FLOOR = 0.7  # never cut a word shorter than this
MIN_WORD_SECONDS = 0.1
# The alignment heads of the default model look at a word about this long after it begins (median signed
# start error +0.19 to +0.22 s on the dev half of scripts/bench_word_timing.py, a narrow spread): every
# boundary the DTW path gives is moved this much earlier.
ATTENTION_LAG_SECONDS = 0.2


@dataclass
class Word:
    word: str  # with its leading space, as Whisper writes words
    start: float  # seconds from the start of the file
    end: float
    probability: float  # mean confidence of its tokens

    def to_dict(self) -> dict:
        return {"word": self.word, "start": round(self.start, 3), "end": round(self.end, 3),
                "probability": round(self.probability, 4)}


# ------------------------------------------------------------------------------------------- alignment


def dtw(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Monotonic alignment path through cost [N, M] from (0, 0) to (N-1, M-1), each step one row, one column
    or both: (row indices, column indices). Anti-diagonals are computed at once (no Python loop per cell)."""
    N, M = cost.shape
    acc = np.full((N + 1, M + 1), np.inf)
    acc[0, 0] = 0.0
    trace = np.zeros((N + 1, M + 1), dtype=np.int8)  # 0: diagonal, 1: from the row above, 2: from the left
    for d in range(2, N + M + 1):
        i = np.arange(max(1, d - M), min(N, d - 1) + 1)
        j = d - i
        options = np.stack([acc[i - 1, j - 1], acc[i - 1, j], acc[i, j - 1]])
        step = options.argmin(0)
        acc[i, j] = cost[i - 1, j - 1] + options[step, np.arange(len(i))]
        trace[i, j] = step
    trace[0, :], trace[:, 0] = 2, 1
    rows, cols = [], []
    i, j = N, M
    while i > 0 and j > 0:
        rows.append(i - 1)
        cols.append(j - 1)
        step = trace[i, j]
        i, j = (i - 1, j - 1) if step == 0 else (i - 1, j) if step == 1 else (i, j - 1)
    return np.array(rows[::-1]), np.array(cols[::-1])


def _median_filter(x: np.ndarray, width: int) -> np.ndarray:
    """Median over a sliding window of the last axis, edges reflected (as Whisper's median_filter)."""
    if width <= 1 or x.shape[-1] <= width // 2:
        return x
    pad = width // 2
    padded = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(pad, pad)], mode="reflect")
    return np.median(np.lib.stride_tricks.sliding_window_view(padded, width, axis=-1), axis=-1)


def token_frames(weights: np.ndarray) -> np.ndarray:
    """Alignment-head attention [heads, T, F] over T rows (text tokens then the end of text) -> the first
    encoder frame of each row along the DTW path, [T]."""
    w = weights.astype(np.float64)
    mean, std = w.mean(axis=1, keepdims=True), w.std(axis=1, keepdims=True)
    w = (w - mean) / np.maximum(std, 1e-9)
    matrix = _median_filter(w, MEDIAN_FILTER_WIDTH).mean(axis=0)
    rows, cols = dtw(-matrix)
    first = np.full(matrix.shape[0], -1)
    for r, c in zip(rows, cols):
        if first[r] < 0:
            first[r] = c
    return first


def align_words(weights: np.ndarray, word_tokens: list[tuple[int, ...]], word_texts: list[str],
                token_probs: list[float], offset: float, end: float, lead: int = 0,
                speech: tuple[bool, ...] | None = None, frame_seconds: float = 0.0,
                lag: float = ATTENTION_LAG_SECONDS) -> list[Word]:
    """Words of one window with times: weights [heads, lead + n_tokens + 1, F] (the first `lead` rows: the
    canvas prefix, which takes up the silence before the first word; the last: end of text, which takes up
    the silence after the last); offset: the window's start in the file; end: the window's end; speech: the
    VAD's speech flags over the window (frames of frame_seconds), to which word edges are moved; lag: how
    late the heads look at a word (subtracted from every boundary)."""
    frames = token_frames(weights)[lead:]
    starts = np.cumsum([0] + [len(t) for t in word_tokens])  # first token of each word, then the end of text
    # The encoder's states run a few frames past the audio (a margin): no word starts or ends after it.
    times = np.clip(offset + frames[starts] / ENCODER_FRAMES_PER_SECOND - lag, offset, end)
    words = []
    for k, (text, tokens) in enumerate(zip(word_texts, word_tokens)):
        probs = token_probs[starts[k] : starts[k + 1]] or [0.0]
        words.append(Word(text, float(times[k]), float(times[k + 1]), float(np.mean(probs))))
    if speech:
        _snap_to_speech(words, [(a, min(b, end)) for a, b in speech_runs(speech, offset, frame_seconds) if a < end])
    _cut_long_words(words)
    return words


def speech_runs(flags: tuple[bool, ...], offset: float, frame_seconds: float) -> list[tuple[float, float]]:
    """(start, end) seconds of each run of speech frames."""
    runs, begin = [], None
    for i, f in enumerate(list(flags) + [False]):
        if f and begin is None:
            begin = i
        elif not f and begin is not None:
            runs.append((offset + begin * frame_seconds, offset + i * frame_seconds))
            begin = None
    return runs


def _snap_to_speech(words: list[Word], runs: list[tuple[float, float]]) -> None:
    """A word that begins in a pause begins where the speech it overlaps begins; one that ends in a pause
    ends where that speech ends (DTW gives the pause between two words to one of them). A word that overlaps
    no speech keeps its times."""
    for w in words:
        inside = [(a, b) for a, b in runs if a < w.end and b > w.start]
        if inside:
            w.start, w.end = max(w.start, inside[0][0]), min(w.end, inside[-1][1])
    # The last word's end is where the end of text's row begins, which DTW places poorly (nothing follows
    # it to compete for the frames): it ends with the speech it is in.
    if words:
        last = words[-1]
        after = [b for a, b in runs if b > last.start and a < max(last.end, last.start + MIN_WORD_SECONDS)]
        if after:
            last.end = max(last.end, after[0])


def _cut_long_words(words: list[Word]) -> None:
    """A word whose end DTW stretched over the pause after it (its duration far above the median) ends
    earlier; the next word's start stays where its own tokens are."""
    durations = [w.end - w.start for w in words if w.end > w.start]
    if not durations:
        return
    longest = max(MAX_WORD_SECONDS_FLOOR, MAX_WORD_MEDIAN_RATIO * float(np.median(durations)))
    for w in words:
        if w.end - w.start > longest:
            w.end = w.start + longest


def spread_words(word_texts: list[str], token_probs_per_word: list[float], start: float, end: float,
                 runs: list[tuple[float, float]] | None = None) -> list[Word]:
    """Words over [start, end] in proportion to their characters, over the speech `runs` only (the VAD's,
    when known): where a window's words would be if spoken at an even pace (no word timestamps)."""
    runs = [(max(a, start), min(b, end)) for a, b in runs or [] if min(b, end) > max(a, start)] or [(start, end)]
    total = sum(b - a for a, b in runs)

    def at(x: float, starting: bool) -> float:  # seconds of speech from the first run's start -> in the file
        for a, b in runs:
            if x < b - a or (x == b - a and not starting):  # a word that starts at a run's end starts in the next
                return a + x
            x -= b - a
        return runs[-1][1]

    lengths = np.array([max(1, len(t.strip())) for t in word_texts], dtype=np.float64)
    edges = total * np.concatenate([[0.0], np.cumsum(lengths)]) / max(lengths.sum(), 1.0)
    return [Word(t, float(at(a, True)), float(at(b, False)), p)
            for t, a, b, p in zip(word_texts, edges[:-1], edges[1:], token_probs_per_word)]


# -------------------------------------------------------------------------------------------- segments


def split_words(words: list[Word], max_seconds: float = MAX_SEGMENT_SECONDS,
                pause_seconds: float = PAUSE_SECONDS) -> list[list[Word]]:
    """Runs of words that end at sentence ends or pauses; a run that would last longer than max_seconds is
    cut before the word that would overrun it, at its last clause end (a comma) when it has one."""
    runs: list[list[Word]] = []
    run: list[Word] = []
    for w in words:
        if run and (w.start - run[-1].end >= pause_seconds or run[-1].word.rstrip().endswith(SENTENCE_ENDS)):
            runs.append(run)
            run = []
        while run and w.end - run[0].start > max_seconds:  # a single word longer than that stays whole
            cut = max((k + 1 for k, x in enumerate(run[:-1]) if x.word.rstrip().endswith(CLAUSE_ENDS)), default=len(run))
            runs.append(run[:cut])
            run = run[cut:]
        run.append(w)
    if run:
        runs.append(run)
    return runs


@dataclass
class Segment:
    """A stretch of speech: a sentence, or the words up to a pause or up to the longest segment."""

    id: int
    start: float  # seconds from the start of the file
    end: float
    text: str
    score: float | None = None  # mean confidence of the window's chosen candidate
    tokens: list[int] = field(default_factory=list)
    window: int = 0  # index of the window it came from (TranscriptionResult.windows)
    seek: int = 0  # start of that window in mel frames (100 per second), as Whisper's "seek"
    avg_logprob: float = 0.0  # mean log confidence of its tokens
    words: list[Word] | None = None  # with word timestamps

    @property
    def compression_ratio(self) -> float:
        """Whisper's: UTF-8 length of the text over its zlib-compressed length (repetitions compress well)."""
        data = self.text.encode("utf-8")
        return len(data) / len(zlib.compress(data)) if data else 0.0

    def to_dict(self) -> dict:
        """openai-whisper's segment. `temperature` 0.0: the chosen candidate is an argmax decode;
        `no_speech_prob` 0.0: segments come only from windows the VAD found speech in (docs/OUTPUTS.md)."""
        d = {"id": self.id, "seek": self.seek, "start": round(self.start, 3), "end": round(self.end, 3),
             "text": self.text, "tokens": list(self.tokens), "temperature": 0.0,
             "avg_logprob": round(self.avg_logprob, 4), "compression_ratio": round(self.compression_ratio, 4),
             "no_speech_prob": 0.0}
        if self.words is not None:
            d["words"] = [w.to_dict() for w in self.words]
        return d


__all__ = ["PAUSE_SECONDS", "Segment", "Word", "align_words", "dtw", "speech_runs", "split_words", "spread_words",
           "token_frames"]
