"""What a decoding run is asked for and what it returns, without torch: `DecodingOptions` (and its string forms:
`parse`, `with_strings`, `from_config`), `DecodingResult`, and the text helpers both the torch decoder
(decoding.py) and an engine without torch use (`words_from_tokens`, `text_tokens`).

Reading a model's decoding defaults, checking the command line's decoding flags and recording a run's
settings import nothing heavy; decoding.py runs the options and re-exports these names.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .choices import SELECTIONS, STRATEGIES

if TYPE_CHECKING:
    import numpy as np
    import torch

UPSTREAM_SCHEDULE = (1.0, 0.9, 0.85, 0.8)
UPSTREAM_FALLBACK_RATIO = 0.7  # ratio of the steps past the end of the schedule
UPSTREAM_CANVAS = 256
UPSTREAM_CANDIDATES = 15
UPSTREAM_STEPS = 4
UPSTREAM_PREFIX = (1,)  # BOS
UPSTREAM_PAD = 2
# Canvas sized to the audio: tokens per second of speech with a safety margin.
TOKENS_PER_SECOND = 5.0
CANVAS_MARGIN = 12
MIN_CANVAS = 16
# Mask-predict refinement (Ghazvininejad et al. 2019): the first pass re-masks this share of the transcript's
# least confident tokens (then linearly fewer), plus every token equal to its neighbour.
REFINE_FRACTION = 0.3
# Vocabulary shortlist ("confidence" strategy, `shortlist` > 0): a window's first prediction scores the whole
# vocabulary; later steps and refine passes score only the union of each position's top-`shortlist` tokens
# there, plus end-of-text. The output projection is most of a small decoder's step (every still-masked
# position onto 50k tokens), so this cuts it several-fold; approximate, since confidences are then
# normalised over the shortlist. 0 keeps the full vocabulary (exact).
SHORTLIST_OFF = 0
# With `shortlist_int8` the first prediction picks the shortlist through an int8 copy of the output projection
# (DecoderBase.coarse_project, CPU) and scores it in float like the later steps, so no step multiplies by
# the whole float token table.
# Positions after a transcript's end ("confidence" strategy, `pad_context` >= 0): the first step commits the
# predicted end (the trailing run of end-of-text predictions) but for its first pad_context positions; later
# steps run on the transcript and pad_context positions after its committed end, not the whole audio-sized
# canvas, whose tail is mostly padding. None keeps the whole canvas (exact).
PAD_CONTEXT_OFF = None
WORD_START_MARKERS = ("Ġ", "▁", " ")  # how a token that starts a word begins (Whisper BPE, SentencePiece)
# Fields of older DecodingOptions, found in model configs and run records written before they went (test-only
# knobs, now upstream.Trace and tests/test_unmasking.py), with the one value each ever had outside tests.
RETIRED_FIELDS = {"blocks": 1, "cut_at_pad": True, "fast": True}
# Fields added since run records were first written, with the value a record made before them means (what ran
# then), so a rerun after an upgrade skips finished inputs.
ADDED_FIELDS = {"verify_short": 0.0}
# String forms (DecodingOptions.parse): words for "no value" and for the booleans.
NONE_WORDS = {"seq_len": ("auto", "audio", "none"), "pad_context": ("off", "none"), "seed": ("none",)}
TRUE_WORDS, FALSE_WORDS = ("true", "1", "on"), ("false", "0", "off")
MIN_SEQ_LEN = 2  # a canvas holds at least the prefix and one token
# Canvas positions past a window's length in a batch of windows of different lengths: no token (every
# comparison with a real token or the mask id is false); the trunk sees FILL_INPUT there, behind the mask.
FILL = -1
FILL_INPUT = 0
# decode_windows (both engines): windows decoded together, at most this many per forward pass.
DEFAULT_MAX_BATCH_WINDOWS = 8


# ----------------------------------------------------------------------------------------------------------
# Options and result


@dataclass(frozen=True)
class DecodingOptions:
    candidates: int = UPSTREAM_CANDIDATES
    steps: int = UPSTREAM_STEPS
    schedule: tuple[float, ...] = UPSTREAM_SCHEDULE
    fallback_ratio: float = UPSTREAM_FALLBACK_RATIO
    seq_len: int | None = UPSTREAM_CANVAS  # None: sized to the audio (tokens_per_second x duration + margin)
    tokens_per_second: float = TOKENS_PER_SECOND
    canvas_margin: int = CANVAS_MARGIN
    max_seq_len: int = UPSTREAM_CANVAS  # cap for the sized canvas: the length the model was trained on
    strategy: str = "remask"  # "remask" (upstream) | "confidence" (commit by confidence)
    temperature: float = 0.0  # "confidence" strategy: Gumbel noise for candidates after the first
    repeat_penalty: float = 0.0  # "confidence" strategy: defer committing a token equal to a neighbour's
    refine: int = 0  # "confidence" strategy: mask-predict passes after the fill (re-predict the least sure)
    refine_fraction: float = REFINE_FRACTION  # share of the transcript re-masked in the first refine pass
    # Refine passes: a token re-masked because it equals its left neighbour may not be predicted as that
    # token again (the model tends to re-predict the copy with everything else known: a short word read as
    # its neighbour, "press press for"); an end of text, another word or a real repeat by a different token.
    refine_no_copy: bool = False
    shortlist: int = SHORTLIST_OFF  # "confidence" strategy: after step 0, score only each position's top-N
    pad_context: int | None = PAD_CONTEXT_OFF  # "confidence" strategy: end-of-text positions kept after a transcript
    shortlist_int8: bool = False  # with shortlist: pick it through an int8 output projection (CPU only)
    selection: str = "confidence"
    seed: int | None = None
    # After decoding, the causal decoder of the Whisper the encoder comes from checks each window's text left to
    # right and corrects it where it disagrees (verify.py); the text's end stays the draft's.
    verify: bool = False
    # With verify: a window at most this many seconds long is also read by that decoder alone, on the encoder
    # states of the window padded with silence (as Whisper's own input is: on audio-length states it cannot tell
    # where an isolated word ends), its greedy text to its own end, which replaces the checked draft where it is
    # much the likelier there (verify.Verifier.reread; one more encoder pass per such window). 0: off.
    verify_short: float = 0.0

    def __post_init__(self):
        if self.candidates < 1 or self.steps < 1:
            raise ValueError("candidates and steps must be at least 1")
        if self.selection not in SELECTIONS:
            raise ValueError(f"unknown selection {self.selection!r}; choose from {', '.join(SELECTIONS)}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; choose from {', '.join(STRATEGIES)}")
        if self.refine < 0 or not 0.0 < self.refine_fraction <= 1.0:
            raise ValueError(f"refine must be >= 0 and refine_fraction in (0, 1]: {self.refine}, {self.refine_fraction}")
        if self.shortlist < 0:
            raise ValueError(f"shortlist must be >= 0 (0: the full vocabulary), got {self.shortlist}")
        if self.shortlist and self.strategy != "confidence":
            raise ValueError("shortlist needs the confidence strategy")
        if self.shortlist_int8 and not self.shortlist:
            raise ValueError("shortlist_int8 needs a shortlist (shortlist > 0)")
        if self.pad_context is not None and (self.pad_context < 0 or self.strategy != "confidence"):
            raise ValueError(f"pad_context must be >= 0 (or None: the whole canvas) and needs the confidence strategy, "
                             f"got {self.pad_context}")
        if self.verify_short < 0:
            raise ValueError(f"verify_short must be >= 0 seconds (0: off), got {self.verify_short}")
        if any(not 0.0 <= r <= 1.0 for r in self.schedule):
            raise ValueError(f"mask ratios must lie in [0, 1]: {self.schedule}")

    def ratio(self, step: int) -> float:
        return self.schedule[step] if step < len(self.schedule) else self.fallback_ratio

    def canvas_length(self, duration: float | None, prefix_len: int) -> int:
        if self.seq_len is not None:
            return self.seq_len
        if duration is None:
            return self.max_seq_len
        n = prefix_len + math.ceil(duration * self.tokens_per_second) + self.canvas_margin
        return int(min(self.max_seq_len, max(MIN_CANVAS, n)))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["schedule"] = list(self.schedule)
        return d

    @classmethod
    def from_config(cls, decoding: dict) -> "DecodingOptions":
        """The options a model config's "decoding" section holds. Keys that are no field are ignored (as model
        configs always were), retired fields too where they hold the value they always had (RETIRED_FIELDS);
        another value of a retired field, which nothing can honour now, is a ValueError."""
        for name, value in decoding.items():
            if name in RETIRED_FIELDS and value != RETIRED_FIELDS[name]:
                raise ValueError(f"decoding option {name}={value!r} is no longer supported "
                                 f"(only {RETIRED_FIELDS[name]!r})")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: (tuple(v) if k == "schedule" else v) for k, v in decoding.items() if k in known})

    @classmethod
    def parse(cls, name: str, text: str):
        """Field `name`'s value from its string form (command line, bench spec): integers, numbers, booleans
        (true/false, 1/0, on/off), a choice, `schedule` "1.0,0.9,0.85", `pad_context` N or "off"/"none",
        `seed` N or "none", `seq_len` N or "auto"/"audio"/"none" (a canvas sized to the audio). ValueError,
        naming the field, on an unknown field or a value of the wrong form; the range checks of a whole
        DecodingOptions come with `with_strings`."""
        kinds = {f.name: f.type for f in dataclasses.fields(cls)}
        if name not in kinds:
            raise ValueError(f"unknown decoding option {name!r}")
        text = str(text).strip()
        if text.lower() in NONE_WORDS.get(name, ()):
            return None
        parse = _FIELD_PARSERS.get(name) or _TYPE_PARSERS[kinds[name]]
        value, expected = parse(text)
        if value is None:
            raise ValueError(f"{name}={text!r} must be {expected}"
                             + "".join(f" or {w!r}" for w in NONE_WORDS.get(name, ())[:1]))
        return value

    def with_strings(self, **fields: str) -> "DecodingOptions":
        """These options with some fields given in their string forms (`parse`), validated as a whole."""
        return dataclasses.replace(self, **{name: self.parse(name, text) for name, text in fields.items()})


# The string-form parsers of DecodingOptions.parse: text -> (value or None when malformed, what was expected).


def _integer(least: int | None):
    """Integers >= least (None: any)."""
    words = {None: "an integer", 0: "a non-negative integer", 1: "a positive integer"}
    expected = words.get(least, f"an integer >= {least}")

    def parse(text: str):
        ok = re.fullmatch(r"-?\d+", text) is not None and (least is None or int(text) >= least)
        return (int(text) if ok else None), expected

    return parse


def _number(text: str):
    try:
        return float(text), "a number"
    except ValueError:
        return None, "a number"


def _boolean(text: str):
    value = True if text.lower() in TRUE_WORDS else False if text.lower() in FALSE_WORDS else None
    return value, "0 or 1 (or true/false, on/off)"


def _schedule(text: str):
    try:
        values = tuple(float(x) for x in text.replace(" ", "").split(",") if x)
    except ValueError:
        values = ()
    ok = values and all(0.0 <= v <= 1.0 for v in values)
    return (values if ok else None), "comma-separated mask ratios in [0, 1] like 1.0,0.9,0.85,0.8"


def _choice(names):
    return lambda text: ((text if text in names else None), "one of " + ", ".join(names))


_TYPE_PARSERS = {"int": _integer(1), "float": _number, "bool": _boolean}  # by the field's annotation
_FIELD_PARSERS = {  # the fields whose form is not their annotation's
    "seq_len": _integer(MIN_SEQ_LEN), "canvas_margin": _integer(0), "refine": _integer(0), "shortlist": _integer(0),
    "pad_context": _integer(0), "seed": _integer(None), "schedule": _schedule, "strategy": _choice(STRATEGIES),
    "selection": _choice(SELECTIONS),
}


@dataclass
class DecodingResult:
    """One window's decoded candidates and the text chosen from them. The arrays are torch tensors (decoding.py)
    or numpy arrays (an engine without torch): only their shape and values are read here."""

    tokens: "torch.Tensor | np.ndarray"  # [K, L] final canvases
    confidences: "torch.Tensor | np.ndarray"  # [K, L]
    scores: "torch.Tensor | np.ndarray"  # [K] mean confidence over non-pad positions
    selected: int  # index of the chosen candidate
    text_tokens: list[int] = field(default_factory=list)  # chosen text (prefix removed, cut at pad)
    score: float = 0.0
    n_canvas_tokens: int = 0  # K x L x steps positions the decoder filled (upstream's "tokens")
    # Confidence of each text token (its softmax probability when committed); a ROVER-voted text, which no
    # candidate holds whole, gets the selected candidate's score for every token.
    token_confidences: list[float] = field(default_factory=list)
    # With alignment heads: their cross-attention over the window's frames for the prefix, the text tokens
    # and the end of text, [heads, len(prefix) + len(text_tokens) + 1, frames] (word timestamps).
    alignment: "torch.Tensor | np.ndarray | None" = None

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]


# ----------------------------------------------------------------------------------------------------------
# Text of a decoded canvas


def word_start_test(tokenizer):
    """starts_word(token id): whether the token starts a word, i.e. starts with a space (Whisper BPE, and
    SentencePiece's '▁'); memoised."""
    cache: dict[int, bool] = {}
    # A word-level vocabulary (no piece carries a word-start marker): every token is a word.
    marked = any(piece.startswith(WORD_START_MARKERS) for piece in tokenizer.pieces())

    def starts_word(t: int) -> bool:
        if t not in cache:
            piece = tokenizer.piece(t)
            cache[t] = piece.startswith(WORD_START_MARKERS) or not marked
        return cache[t]

    return starts_word


def words_from_tokens(tokenizer):
    """A to_words function: groups token ids into words at tokens that start one (word_start_test), so MBR and
    ROVER vote on words, not sub-word pieces."""
    starts_word = word_start_test(tokenizer)

    def to_words(seq):
        words, cur = [], []
        for t in seq:
            if cur and starts_word(t):
                words.append(tuple(cur))
                cur = []
            cur.append(t)
        if cur:
            words.append(tuple(cur))
        return words

    return to_words


def text_tokens(row, P: int, pad_id) -> list[int]:
    """A canvas row's text: the prefix removed, cut at the first end-of-text."""
    row = list(row)[P:]
    return row[: row.index(pad_id)] if pad_id in row else row
