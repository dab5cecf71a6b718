"""`whisfusion bench`: Whisfusion against Whisper baselines on one dataset, measured the same way for all.

Every system runs the same utterances in the same order; each utterance is timed from reading its audio
file to its final text (audio loading, features, encoder and decoder all included), warm-up runs are not
measured, and with `repeats` > 1 every timing is the median over the repeats. Accuracy is reported in two
labelled conventions (SPEC section 7):

* corpus WER and CER after the Whisper English normaliser (`whisper_normalizer`, the Open ASR Leaderboard
  convention): total word errors over total reference words;
* the paper's WER: the mean of per-utterance WERs after lower-casing and deleting non-word characters. It
  weights a 3-word utterance like a 40-word one, so it can differ a lot from the corpus number.

Speed: RTFx (audio seconds / wall seconds), latency per duration bucket, and decoder tokens per second both
as upstream defines it (canvas length / decoder time, whatever the number of candidates and steps) and as
emitted text tokens / decoder time. For the autoregressive baselines there is no canvas: both are generated
text tokens / decoder time. Memory: the peak resident set size while the system is loaded and run (the
kernel's high-water mark, reset before each system) and, on GPU, torch's peak allocation.

Systems are given as specs, e.g. `whisfusion:model=default,steps=8,candidates=4,selection=rover,seq_len=auto`,
`whisper:tiny.en,beams=5`, `faster-whisper:tiny.en,compute_type=int8`.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import gc
import hashlib
import io
import json
import math
import os
import platform
import re
import resource
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import first_line

from .audio import SAMPLE_RATE, AudioError, load_audio
from .data import DatasetError, Item, dataset_fingerprint, read_dataset
from .fileio import write_atomic

# Duration buckets (seconds, [low, high)) of the latency table: the paper's split around 20 s.
BUCKETS = ((0.0, 10.0, "0-10 s"), (10.0, 20.0, "10-20 s"), (20.0, 30.0, "20-30 s"), (30.0, math.inf, ">30 s"))
DEFAULT_THREADS = 2
DEFAULT_WARMUP = 1
DEFAULT_REPEATS = 1
DEFAULT_SEED = 0  # Whisfusion draws random masks: a fixed seed makes runs and repeats reproducible
DEFAULT_OUTPUT_DIR = "bench-results"
SYSTEM_KINDS = ("whisfusion", "whisper", "faster-whisper")
DEFAULT_SYSTEMS = ("whisfusion:model=default", "whisper:tiny.en", "faster-whisper:tiny.en,compute_type=int8")
# Keys each kind of system spec accepts (the first bare value of a spec is its model).
SPEC_KEYS = {
    "whisfusion": {"model", "steps", "candidates", "selection", "seq_len", "canvas", "strategy", "refine", "shortlist",
                   "shortlist_int8", "int8", "pad_context", "seed", "encoder_mode", "encoder_backend", "label"},
    "whisper": {"model", "beams", "label"},
    "faster-whisper": {"model", "beams", "compute_type", "label"},
}
DEFAULT_WHISPER_MODEL = "tiny.en"
ENCODER_BACKENDS = ("torch", "ctranslate2", "auto")  # encoder.BACKENDS (bench.py imports no torch at the top)
AUTO = "auto"
DTYPES = ("auto", "float32", "float16", "bfloat16")

RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
HYPOTHESES_CSV = "hypotheses.csv"
PLOT_WER_RTFX = "wer_vs_rtfx.png"
PLOT_LATENCY = "latency_vs_duration.png"
PARTIAL_DIR = ".partial"  # finished systems of an interrupted run, reused by the next run with the same key
RESULTS_FORMAT = "whisfusion-bench"
RESULTS_VERSION = 1

# --check: a few utterances, no warm-up, and the consistency checks of `verify_results`.
CHECK_LIMIT = 3
CHECK_TOLERANCE = 1e-9
# A Whisper baseline above this WER on clean test clips means a broken pipeline (wrong features, tokens).
CHECK_MAX_BASELINE_WER = 0.5
SYSTEM_COLUMN_WIDTH = 36
PIPE_WIDTH = 160  # console width when stdout is not a terminal (logs, CI)
EXAMPLES_DIR = Path(__file__).parent / "assets" / "examples"

_PAPER_NON_WORD = re.compile(r"[^\w\s]")


class BenchError(Exception):
    """A benchmark that cannot run or whose results are inconsistent; the message is one line."""


# ----------------------------------------------------------------------------------------------------------
# Options and system specs


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


def parse_system(text: str) -> SystemSpec:
    """`kind:model,key=value,...` or `kind:model=NAME,key=value,...` -> SystemSpec (BenchError if invalid)."""
    kind, sep, rest = text.strip().partition(":")
    kind = kind.strip().lower()
    if kind not in SYSTEM_KINDS:
        raise BenchError(f"system {text!r}: unknown kind {kind!r} (expected one of {', '.join(SYSTEM_KINDS)})")
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
        if key not in SPEC_KEYS[kind]:
            raise BenchError(f"system {text!r}: unknown option {key!r} for {kind} "
                             f"(known: {', '.join(sorted(SPEC_KEYS[kind]))})")
        if key == "model":
            model = value
        elif key == "canvas":
            params["seq_len"] = value
        else:
            params[key] = value
    if model is None:
        model = "default" if kind == "whisfusion" else DEFAULT_WHISPER_MODEL
    for key in ("steps", "candidates", "beams"):
        if key in params and not re.fullmatch(r"[1-9]\d*", params[key]):
            raise BenchError(f"system {text!r}: {key}={params[key]!r} must be a positive integer")
    for key in ("seed", "refine", "shortlist"):
        if key in params and not re.fullmatch(r"\d+", params[key]):
            raise BenchError(f"system {text!r}: {key}={params[key]!r} must be a non-negative integer")
    for key in ("shortlist_int8", "int8"):
        if key in params and params[key] not in ("0", "1"):
            raise BenchError(f"system {text!r}: {key}={params[key]!r} must be 0 or 1")
    if "encoder_backend" in params and params["encoder_backend"] not in ENCODER_BACKENDS:
        raise BenchError(f"system {text!r}: encoder_backend={params['encoder_backend']!r} must be one of "
                         f"{', '.join(ENCODER_BACKENDS)}")
    if "pad_context" in params and params["pad_context"] != "off" and not re.fullmatch(r"\d+", params["pad_context"]):
        raise BenchError(f"system {text!r}: pad_context={params['pad_context']!r} must be a non-negative integer or 'off'")
    if "seq_len" in params and params["seq_len"] != AUTO and not re.fullmatch(r"[1-9]\d*", params["seq_len"]):
        raise BenchError(f"system {text!r}: seq_len={params['seq_len']!r} must be a positive integer or 'auto'")
    normal = f"{kind}:{model}" + "".join(f",{k}={v}" for k, v in params.items())
    return SystemSpec(kind, model, params, normal)


def default_systems() -> list[str]:
    import importlib.util

    have_fw = importlib.util.find_spec("faster_whisper") is not None
    return [s for s in DEFAULT_SYSTEMS if have_fw or not s.startswith("faster-whisper")]


# ----------------------------------------------------------------------------------------------------------
# Metrics


def _whisper_normaliser():
    from whisper_normalizer.english import EnglishTextNormalizer

    global _WHISPER_NORMALISER
    if _WHISPER_NORMALISER is None:
        _WHISPER_NORMALISER = EnglishTextNormalizer()
    return _WHISPER_NORMALISER


_WHISPER_NORMALISER = None


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


# ----------------------------------------------------------------------------------------------------------
# Timing and memory


def _sync(device: str) -> None:
    from .distributed import synchronize

    synchronize(device)  # the GPU that runs the system, not the current one


def _proc_status_kb(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class MemoryMeter:
    """Peak RSS while one system is loaded and run: Linux's VmHWM, reset through /proc/self/clear_refs
    before the system starts. Where that reset is impossible the process-lifetime ru_maxrss is reported
    instead, and labelled so."""

    def __init__(self, device: str):
        self.device = device

    def start(self) -> None:
        gc.collect()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # "5": reset the peak RSS to the current RSS (Linux >= 4.0)
            self.method = "VmHWM reset per system"
        except OSError:
            self.method = "ru_maxrss (process lifetime)"
        self.baseline_kb = _proc_status_kb("VmRSS")
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)  # counters of the GPU that runs the system

    def stop(self) -> dict[str, Any]:
        peak_kb = _proc_status_kb("VmHWM") if self.method.startswith("VmHWM") else None
        if peak_kb is None:
            peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        out = {
            "peak_rss_mb": peak_kb / 1024,
            "baseline_rss_mb": (self.baseline_kb or 0) / 1024,
            "peak_rss_added_mb": (peak_kb - (self.baseline_kb or 0)) / 1024,
            "rss_method": self.method,
            "cuda_max_allocated_mb": None,
        }
        if self.device.startswith("cuda"):
            import torch

            out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        return out


@dataclass
class Hypothesis:
    """One system's output for one utterance, with the time spent in each stage (seconds)."""

    text: str
    encoder_s: float | None  # features + encoder (None where the engine cannot separate it)
    decoder_s: float | None
    canvas_tokens: int  # upstream's "tokens": canvas length (Whisfusion) or generated tokens (AR)
    emitted_tokens: int  # text tokens in the output
    positions: int = 0  # Whisfusion: candidates x canvas x steps positions the decoder filled


def _device_dtype(options: BenchOptions):
    """(torch.device, torch.dtype) the same way `whisfusion transcribe` resolves them."""
    from .devices import resolve_device

    try:
        return resolve_device(options.device, options.dtype)
    except ValueError as e:
        raise BenchError(str(e)) from None


# ----------------------------------------------------------------------------------------------------------
# Systems


class WhisfusionSystem:
    """Whisfusion exactly as `whisfusion transcribe` runs it (transcribe.Pipeline): VAD windows of at most
    30 s, silent windows skipped, the frozen Whisper encoder, Parallel Diffusion Decoding with the model's
    defaults overridden by the spec, window i of a file seeded with seed + i."""

    def __init__(self, spec: SystemSpec, options: BenchOptions):
        from .loading import Pipeline, load_model
        from .transcribe import parse_pad_context

        device, dtype = _device_dtype(options)
        enc_opts = {key: spec.params["encoder_" + key] for key in ("mode", "backend") if "encoder_" + key in spec.params}
        int8 = {"1": True, "0": False}.get(spec.params.get("int8"))  # absent: the model's choice, as transcribe
        try:
            model = load_model(None if spec.model == "default" else spec.model, device=str(device), dtype=dtype,
                               encoder_options=enc_opts, int8=int8)
        except ValueError as e:
            raise BenchError(f"system {spec.text!r}: {e}") from None
        p = spec.params
        overrides: dict[str, Any] = {"seed": int(p.get("seed", DEFAULT_SEED))}
        for key in ("steps", "candidates", "refine", "shortlist"):
            if key in p:
                overrides[key] = int(p[key])
        for key in ("selection", "strategy"):
            if key in p:
                overrides[key] = p[key]
        if "pad_context" in p:
            overrides["pad_context"] = parse_pad_context(p["pad_context"])
        if "shortlist_int8" in p:
            overrides["shortlist_int8"] = p["shortlist_int8"] == "1"
        if "seq_len" in p:
            overrides["seq_len"] = None if p["seq_len"] == AUTO else int(p["seq_len"])
        try:
            self.pipeline = Pipeline(model, overrides)
        except ValueError as e:
            raise BenchError(f"system {spec.text!r}: {e}") from None
        self.device = str(device)
        self.info = {"decoding": self.pipeline.decoding.to_dict(), "model_name": model.name,
                     "encoder": model.encoder.describe(), "int8": model.int8}

    def transcribe(self, audio: np.ndarray) -> Hypothesis:
        from .vad import VadOptions, iter_windows

        vad = self.pipeline.vad_options(VadOptions())
        windows = [(i, w, clip) for i, (w, clip) in enumerate(iter_windows([audio], vad)) if not w.silent]
        if not windows:
            return Hypothesis("", 0.0, 0.0, 0, 0)
        seed = self.pipeline.decoding.seed
        t0 = time.perf_counter()
        states = self.pipeline.encode([clip for _, _, clip in windows])
        _sync(self.device)
        t1 = time.perf_counter()
        results = self.pipeline.decode(states, [w.duration for _, w, _ in windows],
                                       [None if seed is None else seed + i for i, _, _ in windows])
        _sync(self.device)
        t2 = time.perf_counter()
        text = " ".join(t.strip() for t in (self.pipeline.text(r) for r in results) if t.strip())
        return Hypothesis(text, t1 - t0, t2 - t1, canvas_tokens=sum(r.seq_len for r in results),
                          emitted_tokens=sum(len(r.text_tokens) for r in results),
                          positions=sum(r.n_canvas_tokens for r in results))


class WhisperSystem:
    """A Whisper checkpoint through transformers `generate` (greedy, or beam search with beams=N); audio over
    30 s goes through transformers' sequential long-form decoding. Encoder time is taken with hooks on the
    encoder module, so it is separated from decoding in both cases."""

    def __init__(self, spec: SystemSpec, options: BenchOptions):
        from transformers import WhisperFeatureExtractor

        from .whisper_source import WhisperLoadError, load_whisper, load_whisper_tokenizer

        device, self.dtype = _device_dtype(options)
        self.device = str(device)
        try:
            self.model = load_whisper(spec.model, device=device, dtype=self.dtype)
            self.tokenizer = load_whisper_tokenizer(spec.model)
        except (WhisperLoadError, OSError, ValueError) as e:
            raise BenchError(f"system {spec.text!r}: {str(e).splitlines()[0]}") from None
        self.beams = int(spec.params.get("beams", 1))
        self.features = WhisperFeatureExtractor(feature_size=self.model.config.num_mel_bins)
        self.eot = int(self.model.generation_config.eos_token_id)
        self.gen_kwargs: dict[str, Any] = {"num_beams": self.beams, "do_sample": False}
        if getattr(self.model.generation_config, "is_multilingual", False):
            self.gen_kwargs.update(language="en", task="transcribe")
        self._encoder_s = 0.0
        encoder = self.model.get_encoder()
        encoder.register_forward_pre_hook(self._encoder_start)
        encoder.register_forward_hook(self._encoder_end)
        self.info = {"beams": self.beams, "engine": "transformers"}

    def _encoder_start(self, module, args):
        _sync(self.device)
        self._t_enc = time.perf_counter()

    def _encoder_end(self, module, args, output):
        _sync(self.device)
        self._encoder_s += time.perf_counter() - self._t_enc

    def transcribe(self, audio: np.ndarray) -> Hypothesis:
        import torch

        self._encoder_s = 0.0
        t0 = time.perf_counter()
        long_form = len(audio) > 30 * SAMPLE_RATE
        if long_form:
            feats = self.features(audio, sampling_rate=SAMPLE_RATE, return_tensors="pt", truncation=False,
                                  padding="longest", return_attention_mask=True)
            extra = {"attention_mask": feats.attention_mask.to(self.device), "return_timestamps": True}
        else:
            feats = self.features(audio, sampling_rate=SAMPLE_RATE, return_tensors="pt")
            extra = {}
        features = feats.input_features.to(self.device, self.dtype)
        t_feat = time.perf_counter() - t0
        with torch.inference_mode():
            t1 = time.perf_counter()
            out = self.model.generate(features, **self.gen_kwargs, **extra)
            _sync(self.device)
            t2 = time.perf_counter()
        ids = (out.sequences if hasattr(out, "sequences") else out)[0].tolist()
        text_ids = [t for t in ids if t < self.eot]
        text = self.tokenizer.decode(text_ids, skip_special_tokens=True).strip()
        encoder_s = t_feat + self._encoder_s
        return Hypothesis(text, encoder_s, (t2 - t1) - self._encoder_s, canvas_tokens=len(text_ids),
                          emitted_tokens=len(text_ids))


class FasterWhisperSystem:
    """faster-whisper (CTranslate2) `transcribe`, greedy unless beams=N, temperature 0 (no fallback), no
    conditioning on previous text, no VAD. Timestamps stay on (the engine's default) because its long-form
    seek relies on them: without, audio over 30 s is cut blindly and the words at the cut are repeated.
    Its feature extractor and `encode` are wrapped with timers to separate encoder time."""

    def __init__(self, spec: SystemSpec, options: BenchOptions):
        try:
            from faster_whisper import WhisperModel
        except ImportError:
            raise BenchError(f"system {spec.text!r}: faster-whisper is not installed "
                             f"(pip install 'whisfusion[baselines]')") from None
        from .whisper_source import TINY_EN_NAME, WhisperLoadError, tiny_en_dir

        try:
            path = str(tiny_en_dir()) if spec.model == TINY_EN_NAME else spec.model
        except WhisperLoadError as e:
            raise BenchError(f"system {spec.text!r}: {e}") from None
        device, _ = _device_dtype(options)
        cuda = device.type == "cuda"
        compute_type = spec.params.get("compute_type", "float16" if cuda else "int8")
        device_index = device.index or 0
        try:
            self.model = WhisperModel(path, device="cuda" if cuda else "cpu", device_index=device_index,
                                      compute_type=compute_type, cpu_threads=options.threads)
        except (ValueError, RuntimeError, OSError) as e:
            raise BenchError(f"system {spec.text!r}: faster-whisper cannot load {path} "
                             f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        self.beams = int(spec.params.get("beams", 1))
        self.eot = int(self.model.hf_tokenizer.token_to_id("<|endoftext|>") or 50256)
        self._encoder_s = 0.0
        encode, extract = self.model.encode, self.model.feature_extractor

        def timed_encode(*a, **k):
            t = time.perf_counter()
            try:
                return encode(*a, **k)
            finally:
                self._encoder_s += time.perf_counter() - t

        self.model.encode = timed_encode
        self.model.feature_extractor = _TimedCallable(extract, self)
        self.info = {"beams": self.beams, "engine": "faster-whisper", "compute_type": compute_type,
                     "cpu_threads": options.threads}

    def transcribe(self, audio: np.ndarray) -> Hypothesis:
        self._encoder_s = 0.0
        t0 = time.perf_counter()
        segments, _ = self.model.transcribe(
            audio, beam_size=self.beams, temperature=0.0, condition_on_previous_text=False,
            without_timestamps=False, vad_filter=False, language="en",
        )
        segments = list(segments)  # the generator does the work
        total = time.perf_counter() - t0
        tokens = [t for s in segments for t in s.tokens if t < self.eot]
        text = " ".join(s.text.strip() for s in segments if s.text.strip())
        return Hypothesis(text, self._encoder_s, total - self._encoder_s, canvas_tokens=len(tokens),
                          emitted_tokens=len(tokens))


class _TimedCallable:
    """Wraps faster-whisper's feature extractor: calls add to the owner's encoder time, attributes
    (sampling_rate, hop_length, ...) pass through."""

    def __init__(self, inner, owner):
        self._inner, self._owner = inner, owner

    def __call__(self, *a, **k):
        t = time.perf_counter()
        try:
            return self._inner(*a, **k)
        finally:
            self._owner._encoder_s += time.perf_counter() - t

    def __getattr__(self, name):
        return getattr(self._inner, name)


SYSTEM_CLASSES = {"whisfusion": WhisfusionSystem, "whisper": WhisperSystem, "faster-whisper": FasterWhisperSystem}


# ----------------------------------------------------------------------------------------------------------
# Running


def load_items(options: BenchOptions) -> list[Item]:
    path = options.dataset
    if path is None:
        if not options.check:
            raise BenchError("no dataset given (a LibriSpeech tree, a JSONL/CSV manifest, or a folder of audio "
                             "with .txt transcripts)")
        path = EXAMPLES_DIR
        if not path.is_dir():
            raise BenchError(f"--check without a DATASET uses the bundled example clips, but {path} is missing "
                             f"from this install; pass a dataset")
    try:
        items = read_dataset(path)
    except DatasetError as e:
        raise BenchError(str(e)) from None
    limit = options.limit if options.limit is not None else (CHECK_LIMIT if options.check else None)
    return items[:limit] if limit else items


def read_item_audio(item: Item) -> np.ndarray:
    try:
        audio = load_audio(item.audio)
    except AudioError as e:
        raise BenchError(str(e)) from None
    if item.start is not None or item.end is not None:
        a = int(round((item.start or 0.0) * SAMPLE_RATE))
        b = len(audio) if item.end is None else int(round(item.end * SAMPLE_RATE))
        audio = audio[a:b]
        if len(audio) == 0:
            raise BenchError(f"{item.audio}: item {item.id} selects no audio ({item.start}-{item.end} s)")
    return audio


def _median(values):
    values = [v for v in values if v is not None]
    return float(statistics.median(values)) if values else None


def run_system(spec: SystemSpec, items: list[Item], options: BenchOptions, progress=None) -> dict[str, Any]:
    """Load one system, warm it up, run every item `repeats` times; hypotheses, medians and aggregates."""
    meter = MemoryMeter(options.device)
    meter.start()
    t0 = time.perf_counter()
    try:
        system = SYSTEM_CLASSES[spec.kind](spec, options)
    except BenchError:
        raise
    except (ValueError, OSError, RuntimeError, ImportError) as e:  # CheckpointError, HubError, WhisperLoadError...
        raise BenchError(f"system {spec.text!r}: {first_line(e)}") from None
    load_s = time.perf_counter() - t0
    import torch

    # A model directory's encoder spec may carry its own thread count: every system runs with --threads.
    torch.set_num_threads(options.threads)
    try:
        for _ in range(options.warmup if items else 0):
            system.transcribe(read_item_audio(items[0]))
        runs: list[list[tuple[float, float, float, Hypothesis]]] = []  # (duration, load s, latency s, output)
        task = progress.add_task(spec.label, total=len(items) * options.repeats) if progress else None
        for _ in range(options.repeats):
            run = []
            for item in items:
                t_start = time.perf_counter()
                audio = read_item_audio(item)
                t_loaded = time.perf_counter()
                hyp = system.transcribe(audio)
                t_end = time.perf_counter()
                run.append((len(audio) / SAMPLE_RATE, t_loaded - t_start, t_end - t_start, hyp))
                if progress:
                    progress.advance(task)
            runs.append(run)
        memory = meter.stop()
        info = dict(system.info, torch_threads=torch.get_num_threads())
    finally:
        del system
        gc.collect()
    return summarise(spec, items, runs, load_s, memory, info)


def summarise(spec: SystemSpec, items: list[Item], runs, load_s: float, memory: dict, info: dict) -> dict[str, Any]:
    utts = []
    for i, item in enumerate(items):
        per = [run[i] for run in runs]
        duration, _, _, hyp = per[0]
        texts = {p[3].text for p in per}
        utts.append({
            "id": item.id,
            "audio": item.audio,
            "start": item.start,
            "end": item.end,
            "duration_s": duration,
            "bucket": bucket_of(duration),
            "reference": item.text,
            "hypothesis": hyp.text,
            "stable_across_repeats": len(texts) == 1,
            "latency_s": _median(p[2] for p in per),
            "load_audio_s": _median(p[1] for p in per),
            "encoder_s": _median(p[3].encoder_s for p in per),
            "decoder_s": _median(p[3].decoder_s for p in per),
            "canvas_tokens": hyp.canvas_tokens,
            "emitted_tokens": hyp.emitted_tokens,
            "positions": hyp.positions,
            "wer_paper_norm": utterance_wer_paper(item.text, hyp.text),
        })
    audio_s = sum(u["duration_s"] for u in utts)
    wall_per_repeat = [sum(r[2] for r in run) for run in runs]
    wall_s = float(statistics.median(wall_per_repeat))
    dec = [u for u in utts if u["decoder_s"] is not None]
    decoder_s = sum(u["decoder_s"] for u in dec)
    speed = {
        "audio_s": audio_s,
        "wall_s": wall_s,
        "wall_s_per_repeat": wall_per_repeat,
        "rtfx": audio_s / wall_s if wall_s > 0 else math.nan,
        "rtfx_per_repeat": [audio_s / w if w > 0 else math.nan for w in wall_per_repeat],
        "load_audio_s": sum(u["load_audio_s"] for u in utts),
        "encoder_s": sum(u["encoder_s"] or 0.0 for u in utts),
        "decoder_s": decoder_s,
        "tokens_per_s_upstream": sum(u["canvas_tokens"] for u in dec) / decoder_s if decoder_s > 0 else math.nan,
        "tokens_per_s_emitted": sum(u["emitted_tokens"] for u in dec) / decoder_s if decoder_s > 0 else math.nan,
        "positions_per_s": sum(u["positions"] for u in dec) / decoder_s if decoder_s > 0 else math.nan,
        "model_load_s": load_s,
    }
    buckets = {}
    for _, _, name in BUCKETS:
        lat = [u["latency_s"] for u in utts if u["bucket"] == name]
        dur = [u["duration_s"] for u in utts if u["bucket"] == name]
        buckets[name] = {
            "n": len(lat),
            "median_latency_s": _median(lat),
            "mean_latency_s": float(sum(lat) / len(lat)) if lat else None,
            "median_duration_s": _median(dur),
        }
    return {
        "label": spec.label,
        "spec": spec.text,
        "kind": spec.kind,
        "model": spec.model,
        "settings": info,
        "accuracy": accuracy([u["reference"] for u in utts], [u["hypothesis"] for u in utts]),
        "speed": speed,
        "latency_buckets": buckets,
        "memory": memory,
        "utterances": utts,
    }


def environment(options: BenchOptions) -> dict[str, Any]:
    from importlib import metadata

    import torch

    from . import __version__

    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = None
    if options.device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(options.device))
        gpu = {"name": props.name, "memory_gb": props.total_memory / 2**30, "cuda": torch.version.cuda}
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "threads": options.threads,
        "torch_threads": torch.get_num_threads(),
        "device": options.device,
        "dtype": options.dtype,
        "gpu": gpu,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {name: version(name) for name in ("whisfusion", "torch", "transformers", "ctranslate2",
                                                     "faster-whisper", "jiwer", "whisper-normalizer", "numpy")},
        "whisfusion_version": __version__,
    }


def _partial_key(spec: SystemSpec, fingerprint: str, options: BenchOptions, env: dict) -> str:
    stable_env = {k: env[k] for k in ("cpu", "threads", "device", "dtype", "gpu", "versions")}
    # A model directory retrained in place must not be mistaken for the one measured before.
    model_files = []
    path = Path(spec.model).expanduser()
    if spec.kind == "whisfusion" and spec.model == "default":
        from .loading import DEFAULT_MODEL_DIR

        path = DEFAULT_MODEL_DIR
    if path.is_dir():
        model_files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in path.iterdir() if f.is_file())
    blob = json.dumps([spec.text, fingerprint, options.warmup, options.repeats, stable_env, model_files],
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_bench(options: BenchOptions, console=None) -> dict[str, Any]:
    """Run every system over the dataset; write results.json/.csv, hypotheses.csv and plots to output_dir."""
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = console or Console(stderr=True, quiet=options.quiet)
    if options.plots and not _have_matplotlib():  # said before any system runs, not after minutes of them
        console.print("note: no plots: matplotlib is not installed (pip install 'whisfusion[plots]')",
                      markup=False, highlight=False)
        options = dataclasses.replace(options, plots=False)
    specs = [parse_system(s) for s in (options.systems or default_systems())]
    labels = [s.label for s in specs]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise BenchError(f"systems {', '.join(dupes)} are given twice; add label=NAME to tell them apart")
    items = load_items(options)
    torch.set_num_threads(options.threads)
    device, dtype = _device_dtype(options)
    # Resolved once, so every system and the recorded environment see the same concrete device and dtype.
    options = dataclasses.replace(options, device=str(device), dtype=str(dtype).replace("torch.", ""))
    out = Path(options.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BenchError(f"{out}: cannot create the output directory ({e.strerror})") from None
    env = environment(options)
    fingerprint = dataset_fingerprint(items)
    partial = out / PARTIAL_DIR
    systems = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, disable=options.quiet) as progress:
        for spec in specs:
            key = _partial_key(spec, fingerprint, options, env)
            cached = partial / f"{key}.json"
            if options.resume and cached.is_file():
                try:
                    systems.append(json.loads(cached.read_text()))
                    console.print(f"{spec.label}: reusing finished results from {cached}")
                    continue
                except (OSError, json.JSONDecodeError):
                    pass  # a damaged partial file is simply recomputed
            with _quiet_libraries():
                result = run_system(spec, items, options, progress)
            partial.mkdir(exist_ok=True)
            _write_text(cached, json.dumps(_json_safe(result)))
            systems.append(result)
    results = {
        "format": RESULTS_FORMAT,
        "version": RESULTS_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "environment": env,
        "dataset": {"path": str(options.dataset or EXAMPLES_DIR), "n_utterances": len(items),
                    "audio_s": systems[0]["speed"]["audio_s"] if systems else 0.0, "fingerprint": fingerprint},
        "options": {k: v for k, v in asdict(options).items() if k not in ("quiet",)},
        "conventions": CONVENTIONS,
        "systems": systems,
    }
    write_results(results, out, plots=options.plots)
    if options.check:
        verify_results(out, plots=options.plots)
    return results


def _have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def _quiet_libraries():
    """Library warnings (transformers' deprecations, torch's notes) stay off the user's terminal while the
    systems run: they say nothing about the measurement, and the table is what the user asked for."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        hf_logging = None
    level = hf_logging.get_verbosity() if hf_logging else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if hf_logging:
            hf_logging.set_verbosity_error()
        try:
            yield
        finally:
            if hf_logging:
                hf_logging.set_verbosity(level)


CONVENTIONS = {
    "wer_corpus_whisper_norm": "corpus WER (total errors / total reference words) after the Whisper English "
                               "normaliser (whisper_normalizer.english.EnglishTextNormalizer); Open ASR Leaderboard",
    "cer_corpus_whisper_norm": "corpus CER after the same normaliser",
    "wer_mean_utterance_paper_norm": "mean of per-utterance WERs after lower-casing and deleting non-word "
                                     "characters (the Whisfusion paper's number)",
    "rtfx": "audio seconds / wall seconds; wall includes reading the audio, features, encoder and decoder",
    "latency_s": "per utterance, from reading the audio file to the final text (median over repeats)",
    "tokens_per_s_upstream": "upstream's definition: canvas length / decoder seconds (256 per window upstream, "
                             "whatever the candidates and steps); autoregressive systems: generated text tokens",
    "tokens_per_s_emitted": "text tokens in the output / decoder seconds",
    "positions_per_s": "Whisfusion: candidates x canvas x steps positions filled / decoder seconds",
    "peak_rss_mb": "peak resident set size while the system was loaded and run (includes the Python process)",
}


# ----------------------------------------------------------------------------------------------------------
# Writing


def _json_safe(obj):
    """NaN/inf -> None so the JSON is standard (other tools refuse NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


SUMMARY_FIELDS = (
    ("accuracy", "wer_corpus_whisper_norm"), ("accuracy", "cer_corpus_whisper_norm"),
    ("accuracy", "wer_mean_utterance_paper_norm"), ("accuracy", "ref_words"), ("accuracy", "substitutions"),
    ("accuracy", "deletions"), ("accuracy", "insertions"),
    ("speed", "audio_s"), ("speed", "wall_s"), ("speed", "rtfx"), ("speed", "load_audio_s"), ("speed", "encoder_s"),
    ("speed", "decoder_s"), ("speed", "tokens_per_s_upstream"), ("speed", "tokens_per_s_emitted"),
    ("speed", "positions_per_s"), ("speed", "model_load_s"),
    ("memory", "peak_rss_mb"), ("memory", "peak_rss_added_mb"), ("memory", "cuda_max_allocated_mb"),
)
ENV_FIELDS = ("cpu", "cpu_count", "threads", "device", "dtype")
HYPOTHESIS_FIELDS = ("id", "audio", "duration_s", "bucket", "reference", "hypothesis", "latency_s", "load_audio_s",
                     "encoder_s", "decoder_s", "canvas_tokens", "emitted_tokens", "positions", "wer_paper_norm",
                     "stable_across_repeats")


def _file_mode() -> int:
    """rw for everyone the umask allows: temp files are created 0600, results are meant to be shared."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _write_text(path: Path, text: str) -> None:
    write_atomic(path, text)
    os.chmod(path, _file_mode())


def _csv_text(header, rows) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def _cell(v):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    return v


def write_results(results: dict, out: Path, plots: bool = True) -> None:
    env = results["environment"]
    header = ["system", "spec", "n_utterances"] + [f for _, f in SUMMARY_FIELDS]
    header += [f"latency_median_s[{name}]" for _, _, name in BUCKETS] + [f"env_{f}" for f in ENV_FIELDS]
    header += ["env_gpu", "env_torch", "env_transformers", "env_ctranslate2"]
    rows = []
    for s in results["systems"]:
        row = [s["label"], s["spec"], len(s["utterances"])] + [_cell(s[g][f]) for g, f in SUMMARY_FIELDS]
        row += [_cell(s["latency_buckets"][name]["median_latency_s"]) for _, _, name in BUCKETS]
        row += [_cell(env[f]) for f in ENV_FIELDS]
        row += [(env["gpu"] or {}).get("name", ""), env["versions"]["torch"], env["versions"]["transformers"],
                _cell(env["versions"]["ctranslate2"])]
        rows.append(row)
    hyp_rows = [[s["label"]] + [_cell(u[f]) for f in HYPOTHESIS_FIELDS] for s in results["systems"]
                for u in s["utterances"]]
    _write_text(out / RESULTS_JSON, json.dumps(_json_safe(results), indent=1))
    _write_text(out / RESULTS_CSV, _csv_text(header, rows))
    _write_text(out / HYPOTHESES_CSV, _csv_text(("system",) + HYPOTHESIS_FIELDS, hyp_rows))
    if plots:
        write_plots(results, out)


def _save_figure_atomic(fig, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _legend_below(ax) -> None:
    """Below the axes, so long system labels never hide a point."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=1, frameon=False)


def write_plots(results: dict, out: Path) -> None:
    """WER vs RTFx (one point per system, both WER conventions) and latency vs audio duration."""
    try:
        import matplotlib
    except ImportError:
        raise BenchError("plots need matplotlib (pip install 'whisfusion[plots]'), or pass --no-plots") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    systems = results["systems"]
    colours = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, s in enumerate(systems):
        x = s["speed"]["rtfx"]
        corpus = s["accuracy"]["wer_corpus_whisper_norm"]
        paper = s["accuracy"]["wer_mean_utterance_paper_norm"]
        if x is None or not math.isfinite(x):
            continue
        c = colours(i % 10)
        if corpus is not None and math.isfinite(corpus):
            ax.scatter([x], [100 * corpus], color=c, marker="o", s=60, label=s["label"])
        if paper is not None and math.isfinite(paper):
            ax.scatter([x], [100 * paper], facecolors="none", edgecolors=[c], marker="s", s=60)
    ax.set_xscale("log")
    ax.set_xlabel("RTFx (audio s / wall s, audio loading and encoder included; higher is faster)")
    ax.set_ylabel("WER %")
    ax.set_title("Accuracy vs speed  (filled: corpus WER, Whisper norm.; hollow: mean-utterance WER, paper)",
                 fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    _legend_below(ax)
    _save_figure_atomic(fig, out / PLOT_WER_RTFX)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, s in enumerate(systems):
        c = colours(i % 10)
        pts = [(u["duration_s"], u["latency_s"]) for u in s["utterances"]]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=12, alpha=0.5, color=c)
        # The line joins the bucket medians: flat means latency independent of duration.
        med = [(b["median_duration_s"], b["median_latency_s"]) for b in s["latency_buckets"].values() if b["n"]]
        ax.plot([p[0] for p in med], [p[1] for p in med], marker="D", ms=6, lw=1.5, color=c, label=s["label"])
    for low, _, _ in BUCKETS[1:]:
        ax.axvline(low, color="grey", lw=0.5, ls=":")
    ax.set_xlabel("audio duration (s)")
    ax.set_ylabel("latency (s, median over repeats)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"Latency vs audio duration ({results['environment']['device']}, "
                 f"{results['environment']['threads']} threads)", fontsize=9)
    ax.grid(True, alpha=0.3)
    _legend_below(ax)
    _save_figure_atomic(fig, out / PLOT_LATENCY)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------
# Checking


def verify_results(out: Path, plots: bool = True) -> list[str]:
    """Re-read the written results and check them against themselves; BenchError on the first problem.

    Accuracy is recomputed from the saved references and hypotheses, speed aggregates from the saved
    per-utterance timings, the CSV files against the JSON, and the plots must be PNG files."""
    out = Path(out)
    try:
        results = json.loads((out / RESULTS_JSON).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BenchError(f"{out / RESULTS_JSON}: unreadable ({e})") from None
    checked = []

    def fail(msg):
        raise BenchError(f"{out / RESULTS_JSON}: check failed: {msg}")

    def close(a, b, tol=CHECK_TOLERANCE):
        if a is None or b is None:
            return a is None and b is None
        return abs(a - b) <= tol * max(1.0, abs(a), abs(b))

    n = results["dataset"]["n_utterances"]
    if n < 1 or not results["systems"]:
        fail("no utterances or no systems")
    with open(out / RESULTS_CSV, newline="") as f:
        summary = {row["system"]: row for row in csv.DictReader(f)}
    with open(out / HYPOTHESES_CSV, newline="") as f:
        hyp_rows = list(csv.DictReader(f))
    if len(hyp_rows) != n * len(results["systems"]):
        fail(f"{HYPOTHESES_CSV} has {len(hyp_rows)} rows, expected {n * len(results['systems'])}")
    for s in results["systems"]:
        name = s["label"]
        utts = s["utterances"]
        if len(utts) != n:
            fail(f"{name}: {len(utts)} utterances, dataset has {n}")
        refs, hyps = [u["reference"] for u in utts], [u["hypothesis"] for u in utts]
        again = _json_safe(accuracy(refs, hyps))
        for key in ("wer_corpus_whisper_norm", "cer_corpus_whisper_norm", "wer_mean_utterance_paper_norm"):
            if not close(again[key], s["accuracy"][key]):
                fail(f"{name}: {key} {s['accuracy'][key]} but {again[key]} recomputed from the hypotheses")
        sp = s["speed"]
        for u in utts:
            if not (u["latency_s"] and u["latency_s"] > 0 and u["duration_s"] > 0):
                fail(f"{name}/{u['id']}: non-positive latency or duration")
            parts = u["load_audio_s"] + (u["encoder_s"] or 0.0) + (u["decoder_s"] or 0.0)
            # With several repeats each stage is its own median, and their sum may exceed the median total.
            if len(sp["wall_s_per_repeat"]) == 1 and parts > u["latency_s"] * (1 + 1e-6):
                fail(f"{name}/{u['id']}: stage times {parts:.4f} s exceed the latency {u['latency_s']:.4f} s")
            if u["bucket"] != bucket_of(u["duration_s"]):
                fail(f"{name}/{u['id']}: bucket {u['bucket']} does not hold {u['duration_s']} s")
        if not close(sum(u["duration_s"] for u in utts), sp["audio_s"], 1e-6):
            fail(f"{name}: audio_s does not equal the sum of the utterance durations")
        if not close(sp["rtfx"], sp["audio_s"] / sp["wall_s"], 1e-9):
            fail(f"{name}: rtfx is not audio_s / wall_s")
        if len(sp["wall_s_per_repeat"]) == 1 and not close(sp["wall_s"], sum(u["latency_s"] for u in utts), 1e-6):
            fail(f"{name}: wall_s is not the sum of the utterance latencies")
        if sum(b["n"] for b in s["latency_buckets"].values()) != n:
            fail(f"{name}: latency buckets do not add up to {n} utterances")
        if sp["decoder_s"] and sp["decoder_s"] > 0:
            emitted = sum(u["emitted_tokens"] for u in utts if u["decoder_s"] is not None)
            if not close(sp["tokens_per_s_emitted"], emitted / sp["decoder_s"], 1e-6):
                fail(f"{name}: tokens_per_s_emitted is not emitted tokens / decoder time")
        row = summary.get(name)
        if row is None:
            fail(f"{name}: missing from {RESULTS_CSV}")
        for key in ("wer_corpus_whisper_norm", "rtfx"):
            v = s["accuracy"].get(key, s["speed"].get(key))
            if (row[key] == "") != (v is None) or (v is not None and not close(float(row[key]), v, 1e-9)):
                fail(f"{name}: {RESULTS_CSV} {key}={row[key]!r} differs from the JSON ({v})")
        mine = [r for r in hyp_rows if r["system"] == name]
        if [r["hypothesis"] for r in mine] != hyps:
            fail(f"{name}: {HYPOTHESES_CSV} hypotheses differ from the JSON")
        if s["kind"] != "whisfusion":
            wer = s["accuracy"]["wer_corpus_whisper_norm"]
            if wer is None or wer > CHECK_MAX_BASELINE_WER:
                fail(f"{name}: Whisper baseline WER {wer} above {CHECK_MAX_BASELINE_WER}: its pipeline is broken")
        if s["memory"]["peak_rss_mb"] <= 0:
            fail(f"{name}: no peak memory measured")
        checked.append(name)
    if plots:
        for plot in (PLOT_WER_RTFX, PLOT_LATENCY):
            p = out / plot
            if not p.is_file() or p.read_bytes()[:8] != b"\x89PNG\r\n\x1a\n":
                fail(f"{plot} is missing or not a PNG file")
    return checked


# ----------------------------------------------------------------------------------------------------------
# Table and CLI entry


def _fmt(v, spec=".1f", scale=1.0):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v * scale, spec)


def results_tables(results: dict):
    """Two Rich tables: accuracy and speed per system, and median latency per duration bucket."""
    from rich.table import Table

    env = results["environment"]
    title = (f"whisfusion bench: {results['dataset']['n_utterances']} utterances, "
             f"{results['dataset']['audio_s']:.1f} s of audio; {env['device']} {env['dtype']}, "
             f"{env['threads']} threads")
    main = Table(title=title, caption_justify="left", caption="WER/CER corpus: Whisper English normaliser (Open ASR Leaderboard). "
                 "WER mean-utt: mean of per-utterance WERs, lower-case + non-word characters deleted (paper). "
                 "RTFx: audio s / wall s, audio loading and encoder included. tok/s upstream: canvas tokens / "
                 "decoder s (AR: generated tokens); emitted: text tokens / decoder s.")
    main.add_column("system", overflow="fold", max_width=SYSTEM_COLUMN_WIDTH)
    for name in ("WER %\ncorpus", "CER %\ncorpus", "WER %\nmean-utt", "RTFx", "tok/s\nupstream", "tok/s\nemitted",
                 "peak\nMB"):
        main.add_column(name, justify="right", no_wrap=True)
    latency = Table(title="median latency (s) by audio duration (utterances)")
    latency.add_column("system", overflow="fold", max_width=SYSTEM_COLUMN_WIDTH)
    for _, _, name in BUCKETS:
        latency.add_column(name, justify="right", no_wrap=True)
    for s in results["systems"]:
        a, sp, mem = s["accuracy"], s["speed"], s["memory"]
        gpu = mem.get("cuda_max_allocated_mb")
        peak = _fmt(mem["peak_rss_mb"], ".0f") + (f" / {gpu:.0f} GPU" if gpu is not None else "")
        main.add_row(
            s["label"], _fmt(a["wer_corpus_whisper_norm"], ".2f", 100), _fmt(a["cer_corpus_whisper_norm"], ".2f", 100),
            _fmt(a["wer_mean_utterance_paper_norm"], ".2f", 100), _fmt(sp["rtfx"], ".2f"),
            _fmt(sp["tokens_per_s_upstream"], ".0f"), _fmt(sp["tokens_per_s_emitted"], ".0f"), peak,
        )
        cells = []
        for _, _, name in BUCKETS:
            b = s["latency_buckets"][name]
            cells.append(f"{_fmt(b['median_latency_s'], '.2f')} ({b['n']})" if b["n"] else "-")
        latency.add_row(s["label"], *cells)
    return main, latency


def bench_main(**kwargs) -> dict:
    """CLI entry: keyword arguments are BenchOptions fields (None means the default). Prints the table and
    where the files went; BenchError (one line) for bad input or a failed check."""
    from rich.console import Console

    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if "systems" in kwargs:
        kwargs["systems"] = list(kwargs["systems"])
    options = BenchOptions(**kwargs)
    results = run_bench(options)
    console = Console(width=None if sys.stdout.isatty() else PIPE_WIDTH)
    if not options.quiet:
        for table in results_tables(results):
            console.print(table)
        out = Path(options.output_dir)
        plotted = results["options"]["plots"]  # False where matplotlib is missing
        files = [RESULTS_JSON, RESULTS_CSV, HYPOTHESES_CSV] + ([PLOT_WER_RTFX, PLOT_LATENCY] if plotted else [])
        console.print(f"results in {out}/: {', '.join(files)}")
        if options.check:
            console.print(f"check passed: {len(results['systems'])} systems consistent")
    return results


__all__ = [
    "BenchError",
    "BenchOptions",
    "SystemSpec",
    "accuracy",
    "bench_main",
    "corpus_error_rates",
    "mean_utterance_wer",
    "normalise_paper",
    "normalise_whisper",
    "parse_system",
    "run_bench",
    "verify_results",
]
