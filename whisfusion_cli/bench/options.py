"""What a benchmark run is asked to do: `BenchOptions`, and the system specs it names, e.g.
`whisfusion:model=default,steps=8,candidates=4,selection=rover,seq_len=auto`, `whisper:tiny.en,beams=5`,
`faster-whisper:tiny.en,compute_type=int8`.

A whisfusion spec may set any DecodingOptions field whose value is one word (a number, a name, 0 or 1);
the names and the string forms come from the dataclass itself (DecodingOptions.parse, as on the command
line), inside the functions (decoding.py imports torch).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from ..choices import DTYPES, ENCODER_BACKENDS, ENGINES

DEFAULT_THREADS = 2
DEFAULT_WARMUP = 1
DEFAULT_REPEATS = 1
DEFAULT_SEED = 0  # Whisfusion draws random masks: a fixed seed makes runs and repeats reproducible
DEFAULT_OUTPUT_DIR = "bench-results"
SYSTEM_KINDS = ("whisfusion", "whisper", "faster-whisper")
DEFAULT_SYSTEMS = ("whisfusion:model=default", "whisper:tiny.en", "faster-whisper:tiny.en,compute_type=int8")
DEFAULT_WHISPER_MODEL = "tiny.en"
AUTO = "auto"
# Keys each kind of system spec accepts (the first bare value of a spec is its model); a whisfusion spec
# takes these and the DecodingOptions fields (`decoding_fields`). `canvas` is another name for seq_len.
SPEC_KEYS = {
    "whisfusion": {"model", "canvas", "int8", "engine", "encoder_mode", "encoder_backend", "label"},
    "whisper": {"model", "beams", "label"},
    "faster-whisper": {"model", "beams", "compute_type", "label"},
}
# The forms of the values of the keys that are no decoding field, as (pattern, what it says); a decoding
# field's value is read by DecodingOptions.parse.
SPEC_VALUE_FORMS = {
    "beams": (r"[1-9]\d*", "a positive integer"), "int8": (r"[01]", "0 or 1"),
    "encoder_backend": ("|".join(ENCODER_BACKENDS), f"one of {', '.join(ENCODER_BACKENDS)}"),
    "engine": ("|".join(ENGINES), f"one of {', '.join(ENGINES)}"),
}


class BenchError(Exception):
    """A benchmark that cannot run or whose results are inconsistent; the message is one line."""


@dataclass
class BenchOptions:
    dataset: str | None = None  # LibriSpeech tree, JSONL/CSV manifest, or folder of audio + .txt
    systems: list[str] = field(default_factory=list)  # specs; empty: DEFAULT_SYSTEMS (faster-whisper if installed)
    limit: int | None = None  # first N utterances (dataset order is deterministic)
    warmup: int | None = None  # unmeasured runs of the first utterance per system; None: 1 (0 with check)
    repeats: int = DEFAULT_REPEATS  # measured passes over the dataset; timings are medians
    threads: int = DEFAULT_THREADS  # torch intra-op threads and CTranslate2 cpu_threads
    device: str = AUTO  # auto (cuda when available), cpu, cuda, cuda:N
    dtype: str = AUTO  # auto: float32 on CPU, bfloat16 (or float16) on GPU; as `whisfusion transcribe`
    output_dir: str = DEFAULT_OUTPUT_DIR
    plots: bool = True
    resume: bool = True  # reuse finished systems of an interrupted run with the same settings
    check: bool = False  # CI mode: tiny dataset, then verify the written results (BenchError if inconsistent)
    quiet: bool = False

    def __post_init__(self) -> None:
        if self.warmup is None:
            self.warmup = 0 if self.check else DEFAULT_WARMUP
        if self.check:
            self.resume = False  # a check must exercise the pipeline, never reuse earlier results
        if self.limit is not None and self.limit < 1:
            raise BenchError(f"--limit must be at least 1, got {self.limit}")
        if self.warmup < 0:
            raise BenchError(f"--warmup must be >= 0, got {self.warmup}")
        if self.repeats < 1:
            raise BenchError(f"--repeats must be at least 1, got {self.repeats}")
        if self.threads < 1:
            raise BenchError(f"--threads must be at least 1, got {self.threads}")
        if self.dtype not in DTYPES:
            raise BenchError(f"--dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")


@dataclass(frozen=True)
class SystemSpec:
    kind: str
    model: str
    params: dict[str, str]
    text: str  # the spec as given (normalised)

    @property
    def label(self) -> str:
        if "label" in self.params:
            return self.params["label"]
        rest = ",".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.kind}:{self.model}" + (f",{rest}" if rest else "")


def decoding_fields() -> dict[str, object]:
    """The DecodingOptions fields a whisfusion spec may set, with their defaults: those of one-word values
    (a tuple such as the schedule is written with commas, which separate a spec's keys)."""
    from ..decoding import DecodingOptions

    return {f.name: f.default for f in dataclasses.fields(DecodingOptions)
            if f.default is None or isinstance(f.default, (bool, int, float, str))}


def parse_system(text: str) -> SystemSpec:
    """`kind:model,key=value,...` or `kind:model=NAME,key=value,...` -> SystemSpec (BenchError if invalid)."""
    kind, sep, rest = text.strip().partition(":")
    kind = kind.strip().lower()
    if kind not in SYSTEM_KINDS:
        raise BenchError(f"system {text!r}: unknown kind {kind!r} (expected one of {', '.join(SYSTEM_KINDS)})")
    decoding = decoding_fields() if kind == "whisfusion" else {}
    known = SPEC_KEYS[kind] | set(decoding)
    params: dict[str, str] = {}
    model = None
    for n, part in enumerate(p.strip() for p in rest.split(",") if p.strip()) if sep else ():
        key, eq, value = part.partition("=")
        key, value = key.strip().lower().replace("-", "_"), value.strip()
        if not eq:
            if n != 0:
                raise BenchError(f"system {text!r}: {part!r} is not key=value (only the model may be bare)")
            model = part
            continue
        if key not in known:
            raise BenchError(f"system {text!r}: unknown option {key!r} for {kind} (known: {', '.join(sorted(known))})")
        if key == "model":
            model = value
        else:
            params["seq_len" if key == "canvas" else key] = value
    for key, value in params.items():
        pattern, form = SPEC_VALUE_FORMS.get(key, (None, ""))
        if pattern and not re.fullmatch(pattern, value):
            raise BenchError(f"system {text!r}: {key}={value!r} must be {form}")
    if decoding:
        _parsed_decoding(text, params, decoding)  # a bad value fails here, before anything is loaded
    if model is None:
        model = "default" if kind == "whisfusion" else DEFAULT_WHISPER_MODEL
    normal = f"{kind}:{model}" + "".join(f",{k}={v}" for k, v in params.items())
    return SystemSpec(kind, model, params, normal)


def _parsed_decoding(text: str, params: dict[str, str], decoding: dict) -> dict:
    """The decoding fields among a spec's params, as values (DecodingOptions.parse); BenchError naming the
    spec for a bad one."""
    from ..decoding import DecodingOptions

    try:
        return {key: DecodingOptions.parse(key, value) for key, value in params.items() if key in decoding}
    except ValueError as e:
        raise BenchError(f"system {text!r}: {e}") from None


def decoding_overrides(spec: SystemSpec) -> dict:
    """The DecodingOptions fields a whisfusion spec sets, as values; the seed is DEFAULT_SEED unless given."""
    return {"seed": DEFAULT_SEED, **_parsed_decoding(spec.text, spec.params, decoding_fields())}


def default_systems() -> list[str]:
    import importlib.util

    have_fw = importlib.util.find_spec("faster_whisper") is not None
    return [s for s in DEFAULT_SYSTEMS if have_fw or not s.startswith("faster-whisper")]
