"""Files -> windows -> batches -> transcripts.

`transcribe(paths, options)` expands files, folders and globs, streams each file (audio.stream_audio), cuts it
into windows at pauses (vad.iter_windows), batches windows from many files through the encoder and the
decoder (decoding.decode_windows), and yields one `TranscriptionResult` per input, in input order, as soon as
it is complete. Memory is bounded by the batch: a file of hours is never held whole.

Failures are per file: a missing path, an unreadable, corrupt, non-audio, empty or too-short file gives a
result with `status == "error"` and a one-line `error`; the other files go on. A silent file gives an empty
transcript (`status == "silent"`): silent windows never reach the decoder, so silence cannot invent words.
With an output directory, finished files are skipped on a re-run unless `overwrite`, and every output file
is written atomically, so an interrupted batch resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np

from .audio import SAMPLE_RATE, AudioError, InputFile, audio_info, expand_inputs, stream_audio
from .distributed import in_halves_on_oom
from .encoder import MAX_ENCODER_FRAMES
from .vad import VadOptions, Window, iter_windows
from .writers import get_writer, parse_formats

if TYPE_CHECKING:
    import torch

    from .checkpoint import LoadedModel

DEFAULT_BATCH_SIZE = 8
# Windows gathered (across files) before they are encoded and decoded: up to this many batches' worth, so
# the decoder can sort them by length into batches of similar windows (less padding), but no more encoder
# states than one batch of 30 s windows (memory stays that of one batch; an encoder that always returns 30 s
# of states pools nothing).
POOL_BATCHES = 4
MIN_AUDIO_SECONDS = 0.1  # shorter than the shortest spoken word
STREAM_BLOCK_SECONDS = 10.0  # audio decoded per read while streaming a file
DTYPES = ("auto", "float32", "bfloat16", "float16")
DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
STATUS_OK, STATUS_SILENT, STATUS_SKIPPED, STATUS_ERROR = "ok", "silent", "skipped", "error"


@dataclass
class TranscribeOptions:
    model: str | None = None  # registered name, model directory, or None for the embedded default
    device: str = "auto"  # "auto" (cuda when available), "cpu", "cuda" or "cuda:N"
    dtype: str = "auto"  # "auto" (float32 on CPU, bfloat16/float16 on GPU), "float32", "bfloat16", "float16"
    batch_size: int = DEFAULT_BATCH_SIZE  # windows per encoder/decoder batch, across files
    threads: int | None = None  # torch CPU threads; None leaves torch's default
    # int8 dynamic quantisation of the decoder's and the encoder's Linear layers (CPU only). None: the model's
    # choice (the embedded default model runs int8 on the CPU, float32 weights elsewhere).
    int8: bool | None = None
    encoder_backend: str | None = None  # "torch", "ctranslate2" or "auto"; None: the model's own setting
    decoding: dict = field(default_factory=dict)  # DecodingOptions fields overriding the model's defaults
    vad: VadOptions = field(default_factory=VadOptions)
    output_dir: Path | None = None  # None: nothing is written (the CLI prints to stdout)
    output_format: str = "txt"  # txt | vtt | srt | tsv | json | all (or a comma-separated list)
    overwrite: bool = False  # False: inputs whose outputs all exist are skipped (resume)
    min_duration_s: float = MIN_AUDIO_SECONDS
    # (rank, world): transcribe only the inputs i with i % world == rank, in input order (torchrun: the CLI sets
    # it, each rank takes its own files and writes their outputs). None: every input.
    shard: tuple[int, int] | None = None

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {self.batch_size}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be at least 1, got {self.threads}")
        if self.output_dir is not None:
            self.output_dir = Path(self.output_dir)
            parse_formats(self.output_format)  # fail early on a bad format
        if self.shard is not None:
            rank, world = self.shard
            if not 0 <= rank < world:
                raise ValueError(f"shard {self.shard}: need 0 <= rank < world")


@dataclass
class Segment:
    id: int
    start: float  # seconds from the start of the file
    end: float
    text: str
    score: float | None = None  # mean confidence of the chosen candidate; None for silent windows
    tokens: list[int] = field(default_factory=list)
    silent: bool = False

    def to_dict(self) -> dict:
        return {"id": self.id, "start": round(self.start, 3), "end": round(self.end, 3), "text": self.text,
                "score": None if self.score is None else round(self.score, 4), "silent": self.silent}


@dataclass
class TranscriptionResult:
    path: str
    output_name: str = ""
    status: str = STATUS_OK  # ok | silent | skipped | error
    error: str | None = None  # one line, starting with the path
    segments: list[Segment] = field(default_factory=list)
    duration: float = 0.0  # seconds of audio
    model: str = ""
    decoding: dict = field(default_factory=dict)
    vad: dict = field(default_factory=dict)
    encoder: dict = field(default_factory=dict)
    int8: bool = False  # the decoder and the encoder ran int8-quantised
    outputs: list[str] = field(default_factory=list)
    elapsed: float = 0.0  # seconds from the first window read to the result

    @property
    def text(self) -> str:
        return " ".join(s.text.strip() for s in self.segments if s.text.strip())

    @property
    def ok(self) -> bool:
        return self.status in (STATUS_OK, STATUS_SILENT, STATUS_SKIPPED)

    def to_dict(self) -> dict:
        return {
            "file": self.path, "text": self.text, "duration": round(self.duration, 3), "model": self.model,
            "language": "en", "segments": [s.to_dict() for s in self.segments], "decoding": self.decoding,
            "vad": self.vad, "encoder": self.encoder, "int8": self.int8,
        }


# ------------------------------------------------------------------------------------------ devices


def resolve_device(device: str = "auto", dtype: str = "auto") -> "tuple[torch.device, torch.dtype]":
    """(device, dtype) for the options; a one-line ValueError for a combination that cannot run."""
    import torch

    from .distributed import half_dtype, rank_device

    dtype = DTYPE_ALIASES.get((dtype or "auto").lower(), (dtype or "auto").lower())
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    dev = rank_device(device)  # "cuda" is cuda:LOCAL_RANK under torchrun
    if dtype == "auto":
        # The 16-bit float the chosen GPU runs natively (bf16 from Ampere on, fp16 on a T4 or V100, where bf16
        # is emulated and CTranslate2's encoder refuses it).
        dtype = "float32" if dev.type == "cpu" else str(half_dtype(dev)).replace("torch.", "")
    if dev.type == "cpu" and dtype != "float32":
        # No native bf16/fp16 matmul on common CPUs: orders of magnitude slower, and not what we test.
        raise ValueError(f"--dtype {dtype} is only supported on a GPU; use float32 on the CPU")
    return dev, getattr(torch, dtype)


# ------------------------------------------------------------------------------------------ pipeline


class Pipeline:
    """A loaded model (decoder, tokenizer, encoder, decoding defaults) and the options it runs with."""

    def __init__(self, model: "LoadedModel", decoding_overrides: dict | None = None):
        from .decoding import words_from_tokens

        self.model = model
        overrides = _clean_overrides(decoding_overrides or {})
        self.decoding = dataclasses.replace(model.decoding, **overrides)
        if self.decoding.shortlist_int8 and model.decoder.device.type != "cpu":
            if overrides.get("shortlist_int8"):
                raise ValueError("--shortlist-int8 runs on the CPU only; drop it on a GPU")
            # The model's CPU default does not apply on a GPU; the results record what ran.
            self.decoding = dataclasses.replace(self.decoding, shortlist_int8=False)
        self.prefix_ids = list(model.tokenizer.prefix_ids)
        self.pad_id = model.tokenizer.pad_id
        self._to_words = words_from_tokens(model.tokenizer) if self.decoding.selection != "confidence" else None

    @classmethod
    def load(cls, options: TranscribeOptions) -> "Pipeline":
        import torch

        from .checkpoint import load_model

        device, dtype = resolve_device(options.device, options.dtype)
        if options.threads:
            torch.set_num_threads(options.threads)
        encoder_options = {"batch_size": options.batch_size}  # windows per encoder call, as per decoder batch
        if options.encoder_backend is not None:
            encoder_options["backend"] = options.encoder_backend
        model = load_model(options.model, device=str(device), dtype=dtype, encoder_options=encoder_options,
                           int8=options.int8)
        return cls(model, options.decoding)

    def vad_options(self, base: VadOptions) -> VadOptions:
        """The VAD windows this model wants. A model trained on short utterances carries in its config a
        shorter maximum window (`audio.max_window_s`, a limit: a longer one asked for is cut to it), since it
        transcribes long windows worse, and a shorter pause that splits windows (`audio.split_silence_s`,
        used where `base` keeps VadOptions' default), so a window holds one utterance, as in training."""
        audio = self.model.config.get("audio") or {}
        limit, split = audio.get("max_window_s"), audio.get("split_silence_s")
        if limit and limit < base.max_window_s:
            base = base.with_max_window(limit)
        if split and base.split_silence_s == VadOptions.split_silence_s:
            base = base.with_split_silence(split)
        return base

    def encode(self, clips: list[np.ndarray]):
        return self.model.encoder.encode(clips)

    def decode(self, conditions, durations: list[float], seeds: list[int | None], batch_size: int = DEFAULT_BATCH_SIZE):
        from .decoding import decode_windows

        # Up to batch_size windows share a forward per step, sorted by length; each has its own seed, so a
        # window decodes the same (up to float rounding) whatever else is in the batch.
        return decode_windows(self.model.decoder, conditions, self.decoding, self.prefix_ids, self.pad_id,
                              durations, to_words=self._to_words, seeds=seeds, max_batch_windows=batch_size)

    def text(self, result) -> str:
        return self.model.tokenizer.decode(result.text_tokens)


def _clean_overrides(overrides: dict) -> dict:
    from .decoding import DecodingOptions

    known = {f.name for f in dataclasses.fields(DecodingOptions)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown decoding option(s) {', '.join(sorted(unknown))}")
    out = dict(overrides)
    if "schedule" in out and out["schedule"] is not None:
        out["schedule"] = tuple(float(x) for x in out["schedule"])
    return out


def parse_pad_context(text: str) -> int | None:
    """'off' -> None (the whole canvas), '5' -> 5: DecodingOptions.pad_context from the command line."""
    text = str(text)
    if text.lower() == "off":
        return None
    if not text.isdigit():
        raise ValueError(f"--pad-context expects a number of positions (>= 0) or 'off', got {text!r}")
    return int(text)


def parse_schedule(text: str) -> tuple[float, ...]:
    """'1.0,0.9,0.85,0.8' -> (1.0, 0.9, 0.85, 0.8), each in [0, 1]."""
    try:
        values = tuple(float(x) for x in str(text).replace(" ", "").split(",") if x)
    except ValueError:
        raise ValueError(f"--schedule expects comma-separated mask ratios like 1.0,0.9,0.85,0.8, got {text!r}") from None
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise ValueError(f"--schedule ratios must lie in [0, 1], got {text!r}")
    return values


# ----------------------------------------------------------------------------------------- progress


class Reporter:
    """What the driver tells the outside world; the default does nothing."""

    def start(self, n_files: int, total_seconds: float | None) -> None: ...

    def advance(self, audio_seconds: float, tokens: int) -> None: ...

    def file_done(self, result: TranscriptionResult) -> None: ...

    def stop(self) -> None: ...


class RichReporter(Reporter):
    """Files done, audio seconds processed, live audio-seconds per second and tokens per second, and an ETA."""

    def __init__(self, console=None):
        from rich.console import Console

        self.console = console or Console(stderr=True)
        self.progress = None

    def start(self, n_files, total_seconds):
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.t_first = None  # throughput counts from the first processed window, not from model loading
        self.audio = 0.0
        self.tokens = 0
        self.files_done = 0
        self.n_files = n_files
        self.total = total_seconds
        if not self.console.is_terminal:  # a log file or a pipe gets the summary, not frames of a live display
            return
        self.progress = Progress(
            SpinnerColumn(), TextColumn("[bold]transcribing"), BarColumn(),
            TextColumn("{task.fields[files]}"), TextColumn("{task.fields[audio]}"),
            TextColumn("{task.fields[speed]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=self.console, transient=False,
        )
        self.task = self.progress.add_task("transcribe", total=total_seconds or None, **self._fields())
        self.progress.start()

    def _fields(self) -> dict:
        elapsed = max(time.perf_counter() - (self.t_first or time.perf_counter()), 1e-6)
        total = f"/{_clock(self.total)}" if self.total else ""
        return {
            "files": f"{self.files_done}/{self.n_files} files",
            "audio": f"{_clock(self.audio)}{total} audio",
            "speed": f"{self.audio / elapsed:.1f} audio-s/s {self.tokens / elapsed:.0f} tok/s",
        }

    def advance(self, audio_seconds, tokens):
        if self.t_first is None:
            self.t_first = time.perf_counter()
        self.audio += audio_seconds
        self.tokens += tokens
        if self.progress:
            self.progress.update(self.task, advance=audio_seconds, **self._fields())

    def file_done(self, result):
        self.files_done += 1
        if self.progress:
            self.progress.update(self.task, **self._fields())

    def print(self, message: str) -> None:
        if self.progress:  # above the live display
            self.progress.console.print(message, markup=False, highlight=False, soft_wrap=True)
        else:
            print(message, file=sys.stderr, flush=True)

    def stop(self):
        if self.progress:
            self.progress.stop()
            self.progress = None


def _clock(seconds: float | None) -> str:
    s = int(round(seconds or 0))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


# ------------------------------------------------------------------------------------------- driver


@dataclass
class _Job:
    """One input file in flight."""

    input: InputFile
    result: TranscriptionResult
    segments: list[Segment | None] = field(default_factory=list)
    pending: int = 0  # windows queued for the decoder
    reading: bool = True
    t0: float = 0.0

    @property
    def ready(self) -> bool:
        return self.result.status == STATUS_ERROR or (not self.reading and self.pending == 0)


def transcribe(
    paths: Iterable | str | Path,
    options: TranscribeOptions | None = None,
    model: "LoadedModel | Pipeline | None" = None,
    reporter: Reporter | None = None,
) -> Iterator[TranscriptionResult]:
    """One TranscriptionResult per input (and per missing path or empty glob), in input order.

    model: a loaded model (or Pipeline) to reuse; None loads `options.model` on the first file that needs it.
    """
    options = options or TranscribeOptions()
    reporter = reporter or Reporter()
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files, problems = expand_inputs(paths)
    if options.shard is not None:  # by file, in input order: each rank knows its share without asking
        rank, world = options.shard
        files, problems = files[rank::world], problems if rank == 0 else []
    for p in problems:
        yield TranscriptionResult(p.path, status=STATUS_ERROR, error=str(p))
    # Durations from the headers, for the progress display's total and ETA (not needed without one).
    total = _total_seconds(files) if type(reporter) is not Reporter else None
    reporter.start(len(files), total)
    try:
        yield from _run(files, options, model, reporter)
    finally:
        reporter.stop()


def _total_seconds(files: list[InputFile]) -> float | None:
    total = 0.0
    for f in files:
        try:
            d = audio_info(f.path).duration
        except AudioError:
            continue
        total += d or 0.0
    return total or None


def _run(files, options: TranscribeOptions, model, reporter: Reporter) -> Iterator[TranscriptionResult]:
    writer = get_writer(options.output_format, options.output_dir) if options.output_dir is not None else None
    pipeline: Pipeline | None = model if isinstance(model, Pipeline) else None
    if model is not None and pipeline is None:
        pipeline = Pipeline(model, options.decoding)
    jobs: deque[_Job] = deque()
    batch: list[tuple[_Job, int, Window, np.ndarray]] = []

    def meta() -> dict:
        return {"model": pipeline.model.name, "decoding": pipeline.decoding.to_dict(),
                "vad": dataclasses.asdict(pipeline.vad_options(options.vad)),
                "encoder": pipeline.model.encoder.describe(), "int8": pipeline.model.int8}

    def flush_batch():
        nonlocal batch
        live = [b for b in batch if b[0].result.status != STATUS_ERROR]
        batch = []
        if not live:
            return
        conditions = in_halves_on_oom(pipeline.encode, [b[3] for b in live], "window")  # as decode_windows does
        seeds = [None if pipeline.decoding.seed is None else pipeline.decoding.seed + b[1] for b in live]
        results = pipeline.decode(conditions, [b[2].duration for b in live], seeds, options.batch_size)
        for (job, idx, w, _), r in zip(live, results):
            job.segments[idx] = Segment(idx, w.start, w.end, pipeline.text(r), r.score, list(r.text_tokens))
            job.pending -= 1
            reporter.advance(w.duration, len(r.text_tokens))

    def finished() -> Iterator[TranscriptionResult]:
        while jobs and jobs[0].ready:
            job = jobs.popleft()
            res = _finish(job, writer)
            reporter.file_done(res)
            yield res

    for f in files:
        result = TranscriptionResult(str(f.path), f.output_name)
        if writer is not None and not options.overwrite:
            targets = [w.output_path(f.output_name) for w in writer.writers]
            if all(t.is_file() for t in targets):
                result.status, result.outputs = STATUS_SKIPPED, [str(t) for t in targets]
                job = _Job(f, result, reading=False)
                jobs.append(job)
                yield from finished()
                continue
        job = _Job(f, result, t0=time.perf_counter())
        jobs.append(job)
        try:
            info = audio_info(f.path)
            if info.duration is not None:
                _check_duration(f.path, info.duration, options)
            if pipeline is None:
                pipeline = Pipeline.load(options)
                reporter.advance(0.0, 0)  # the clock for throughput starts now, after loading the model
            n_samples = 0
            for w, samples in iter_windows(stream_audio(f.path, STREAM_BLOCK_SECONDS),
                                           pipeline.vad_options(options.vad)):
                idx = len(job.segments)
                n_samples = w.end_sample
                if w.silent:
                    job.segments.append(Segment(idx, w.start, w.end, "", None, [], silent=True))
                    reporter.advance(w.duration, 0)
                    continue
                job.segments.append(None)
                job.pending += 1
                batch.append((job, idx, w, samples))
                pooled_frames = sum(pipeline.model.encoder.output_frames(len(b[3])) for b in batch)
                if (len(batch) >= options.batch_size * POOL_BATCHES
                        or pooled_frames + MAX_ENCODER_FRAMES > options.batch_size * MAX_ENCODER_FRAMES):
                    flush_batch()
                    yield from finished()
            _check_duration(f.path, n_samples / SAMPLE_RATE, options)
            result.duration = n_samples / SAMPLE_RATE
            result.__dict__.update(meta())
        except AudioError as e:
            result.status, result.error = STATUS_ERROR, str(e)
            job.pending = 0
            batch[:] = [b for b in batch if b[0] is not job]
        job.reading = False
        yield from finished()
    flush_batch()
    yield from finished()


def _check_duration(path, seconds: float, options: TranscribeOptions) -> None:
    if seconds <= 0:
        raise AudioError(path, "empty audio (no samples)")
    if seconds < options.min_duration_s:
        raise AudioError(path, f"too short to hold speech ({seconds:.3f} s < {options.min_duration_s:g} s)")


def _finish(job: _Job, writer) -> TranscriptionResult:
    result = job.result
    if result.status in (STATUS_ERROR, STATUS_SKIPPED):
        return result
    result.segments = [s for s in job.segments if s is not None]
    result.elapsed = time.perf_counter() - job.t0
    if all(s.silent for s in result.segments):  # no window had speech: nothing was decoded
        result.status = STATUS_SILENT
    if writer is not None:
        try:
            result.outputs = [str(p) for p in writer(result, job.input.output_name)]
        except OSError as e:
            result.status = STATUS_ERROR
            result.error = f"{result.path}: cannot write outputs ({e.strerror or e})"
    return result


def transcribe_file(path, options: TranscribeOptions | None = None, model=None) -> TranscriptionResult:
    """One file -> its result (raises AudioError if the file failed)."""
    results = [r for r in transcribe([path], options, model)]
    for r in results:
        if r.status == STATUS_ERROR:
            raise AudioError(r.path, r.error.split(": ", 1)[-1] if r.error else "failed")
    return results[-1]


__all__ = [
    "DEFAULT_BATCH_SIZE", "MIN_AUDIO_SECONDS", "Pipeline", "Reporter", "RichReporter", "Segment", "TranscribeOptions",
    "TranscriptionResult", "parse_pad_context", "parse_schedule", "resolve_device", "transcribe", "transcribe_file",
]
