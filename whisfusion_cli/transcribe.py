"""Files -> windows -> batches -> transcripts.

`transcribe(paths, options)` expands files, folders and globs (numpy arrays of 16 kHz mono float samples and
open file objects are inputs too); its driver, `Transcriber`, streams each file (audio.stream_audio), cuts it
into windows at pauses (vad.iter_windows), batches windows from many files through the encoder and the
decoder (decoding.decode_windows), splits each window's text into segments at sentence ends and pauses (timing.py,
with word timestamps from the decoder's cross-attention when asked), and yields one `TranscriptionResult`
per input, in input order, as soon as it is complete. Memory is bounded by the batch: a file of hours is
never held whole.

Failures are per file: a missing path, an unreadable, corrupt, non-audio, empty or too-short file gives a
result with `status == "error"` and a one-line `error`; the other files go on. A silent file gives an empty
transcript (`status == "silent"`): silent windows never reach the decoder, so silence cannot invent words.
With an output directory, finished files are skipped on a re-run unless `overwrite` or unless their record
says other settings made them (another model, other decoding, VAD, segment or subtitle options: the file is
redone, with a note saying why), and every output file is written atomically, so an interrupted batch
resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np

from . import __version__
from .audio import SAMPLE_RATE, AudioError, InputFile, audio_info, expand_inputs
from .choices import ENCODER_BACKENDS, ENGINES, MAX_SEGMENT_SECONDS
from .devices import device_names
from .display import Reporter
from .distributed import in_halves_on_oom
from .encoder import MAX_ENCODER_FRAMES
from .loading import DEFAULT_BATCH_SIZE, DEFAULT_LANGUAGE, Pipeline
from .timing import Segment, Word
from .vad import VadOptions, Window, iter_windows, vad_options
from .writers import SubtitleOptions, get_writer, parse_formats, read_record, write_record

if TYPE_CHECKING:
    from .loading import LoadedModel

# Windows gathered (across files) before they are encoded and decoded: up to this many batches' worth, so
# the decoder can sort them by length into batches of similar windows (less padding), but no more encoder
# states than one batch of 30 s windows (memory stays that of one batch; an encoder that always returns 30 s
# of states pools nothing).
POOL_BATCHES = 4
MIN_AUDIO_SECONDS = 0.1  # shorter than the shortest spoken word
STREAM_BLOCK_SECONDS = 10.0  # audio decoded per read while streaming a file
STATUS_OK, STATUS_SILENT, STATUS_SKIPPED, STATUS_ERROR = "ok", "silent", "skipped", "error"
RECORD_FORMAT = "whisfusion-outputs"


@dataclass
class TranscribeOptions:
    model: str | None = None  # registered name, model directory, or None for the embedded default
    device: str = "auto"  # "auto" (cuda when available), "cpu", "cuda" or "cuda:N"
    dtype: str = "auto"  # "auto" (float32 on CPU, bfloat16/float16 on GPU), "float32", "bfloat16", "float16"
    batch_size: int = DEFAULT_BATCH_SIZE  # windows per encoder/decoder batch, across files
    threads: int | None = None  # CPU threads (torch's or numpy's BLAS); None leaves the library's default
    # "numpy": the torch-free CPU engine (no torch import: the fastest start); "torch": model.py, every device
    # and option; "auto": numpy wherever it runs what is asked (loading.choose_engine), torch elsewhere.
    engine: str = "auto"
    # int8 dynamic quantisation of the decoder's and the encoder's Linear layers (CPU only). None: the model's
    # choice (the embedded default model runs int8 on the CPU, float32 weights elsewhere).
    int8: bool | None = None
    encoder_backend: str | None = None  # "torch", "ctranslate2" or "auto"; None: the model's own setting
    decoding: dict = field(default_factory=dict)  # DecodingOptions fields overriding the model's defaults
    vad: VadOptions = field(default_factory=VadOptions)
    output_dir: Path | None = None  # None: nothing is written (the CLI prints to stdout)
    output_format: str = "txt"  # txt | vtt | srt | tsv | json | all (or a comma-separated list)
    overwrite: bool = False  # False: inputs whose outputs exist and were made with these settings are skipped
    min_duration_s: float = MIN_AUDIO_SECONDS
    word_timestamps: bool = False  # words timed from the decoder's cross-attention (one more forward per batch)
    max_segment_s: float = MAX_SEGMENT_SECONDS  # longest segment (a subtitle cue): about 7 s by convention
    subtitles: SubtitleOptions = field(default_factory=SubtitleOptions)
    # (rank, world): transcribe only the inputs i with i % world == rank, in input order (torchrun: the CLI sets
    # it, each rank takes its own files and writes their outputs). None: every input.
    shard: tuple[int, int] | None = None

    def __post_init__(self):
        if self.max_segment_s <= 0:
            raise ValueError(f"the longest segment must be positive, got {self.max_segment_s} s")
        if self.subtitles.highlight_words and not self.word_timestamps:
            raise ValueError("--highlight-words needs --word-timestamps")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {self.batch_size}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be at least 1, got {self.threads}")
        if self.engine not in ENGINES:
            raise ValueError(f"--engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.output_dir is not None:
            self.output_dir = Path(self.output_dir)
            parse_formats(self.output_format)  # fail early on a bad format
        if self.shard is not None:
            rank, world = self.shard
            if not 0 <= rank < world:
                raise ValueError(f"shard {self.shard}: need 0 <= rank < world")


@dataclass
class WindowResult:
    """One VAD window of the file; the windows tile the audio, silent ones included."""

    id: int
    start: float
    end: float
    silent: bool = False
    score: float | None = None  # mean confidence of the chosen candidate; None for silent windows
    candidate_scores: list[float] = field(default_factory=list)
    selected: int | None = None  # index of the chosen candidate

    def to_dict(self) -> dict:
        return {"id": self.id, "start": round(self.start, 3), "end": round(self.end, 3), "silent": self.silent,
                "score": None if self.score is None else round(self.score, 4),
                "candidate_scores": [round(x, 4) for x in self.candidate_scores], "selected": self.selected}


@dataclass
class TranscriptionResult:
    path: str
    output_name: str = ""
    status: str = STATUS_OK  # ok | silent | skipped | error
    error: str | None = None  # one line, starting with the path
    segments: list[Segment] = field(default_factory=list)  # spoken segments, in order
    windows: list[WindowResult] = field(default_factory=list)
    duration: float = 0.0  # seconds of audio
    model: str = ""
    language: str = DEFAULT_LANGUAGE
    decoding: dict = field(default_factory=dict)
    vad: dict = field(default_factory=dict)
    encoder: dict = field(default_factory=dict)
    int8: bool = False  # the decoder and the encoder ran int8-quantised
    engine: str = ""  # "numpy" or "torch" (loading.LoadedModel.engine)
    word_timestamps: bool = False
    outputs: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # one line each, e.g. why finished outputs were redone
    elapsed: float = 0.0  # seconds from the first window read to the result

    @property
    def text(self) -> str:
        return " ".join(s.text.strip() for s in self.segments if s.text.strip())

    @property
    def ok(self) -> bool:
        return self.status in (STATUS_OK, STATUS_SILENT, STATUS_SKIPPED)

    def to_dict(self) -> dict:
        """openai-whisper's result: text, segments, language; what is ours goes under "whisfusion"."""
        return {
            "text": self.text, "segments": [s.to_dict() for s in self.segments], "language": self.language,
            "whisfusion": {
                "version": __version__, "file": self.path, "duration": round(self.duration, 3), "model": self.model,
                "decoding": self.decoding, "vad": self.vad, "encoder": self.encoder, "int8": self.int8,
                "engine": self.engine, "word_timestamps": self.word_timestamps, "elapsed_s": round(self.elapsed, 3),
                "windows": [w.to_dict() for w in self.windows],
            },
        }


# The VadOptions fields the command line sets (vad.vad_options derives the others from them); `vad` is
# TranscribeOptions.vad, on or off.
VAD_FLAGS = ("max_window_s", "split_silence_s")


def options_from_flags(**flags) -> TranscribeOptions:
    """TranscribeOptions from the command line's flags, each named as the field it sets: a field of
    TranscribeOptions, of DecodingOptions (None: the model's default), of VadOptions or of SubtitleOptions.
    A one-line ValueError for a bad value or combination, before anything is loaded."""
    from .decoding_options import DecodingOptions

    formats = parse_formats(flags["output_format"])
    if flags["output_dir"] is None and len(formats) > 1:
        raise ValueError(f"--output-format {flags['output_format']} writes several files: give --output-dir")
    if flags.get("encoder_backend") is not None and flags["encoder_backend"] not in ENCODER_BACKENDS:
        raise ValueError(f"--encoder-backend must be one of {', '.join(ENCODER_BACKENDS)}")
    decoding = {}
    for name in [f.name for f in dataclasses.fields(DecodingOptions) if f.name in flags]:
        value = flags.pop(name)
        if value is None:  # the model's default
            continue
        try:  # the string forms DecodingOptions reads; a flag typed as a number or a boolean arrives typed
            decoding[name] = DecodingOptions.parse(name, str(value))
        except ValueError as e:
            raise ValueError(f"--{name.replace('_', '-')}: {e}") from None
    dev, _ = device_names(flags["device"], flags["dtype"])  # bf16 on a CPU, a GPU that is not there: fail early
    if flags.get("int8") is True and dev != "cpu":
        raise ValueError("--int8 runs on the CPU only; use --device cpu or drop --int8")
    vad = vad_options(flags.pop("vad"), *(flags.pop(name) for name in VAD_FLAGS))
    subtitles = SubtitleOptions(**{f.name: flags.pop(f.name) for f in dataclasses.fields(SubtitleOptions)})
    return TranscribeOptions(**flags, decoding=decoding, vad=vad, subtitles=subtitles)


# ------------------------------------------------------------------------------------------- driver


@dataclass
class _Job:
    """One input in flight."""

    input: InputFile
    result: TranscriptionResult
    windows: list[WindowResult] = field(default_factory=list)
    segments: list[list[Segment] | None] = field(default_factory=list)  # per window; None until decoded
    pending: int = 0  # windows queued for the decoder
    reading: bool = True
    t0: float = 0.0

    @property
    def ready(self) -> bool:
        return self.result.status == STATUS_ERROR or (not self.reading and self.pending == 0)


@dataclass
class _Queued:
    """A window with speech, waiting in the pool for the encoder."""

    job: _Job
    index: int  # in its input's windows
    window: Window
    samples: np.ndarray


class Transcriber:
    """The driver: inputs -> VAD windows -> pooled batches through the encoder and the decoder -> one
    TranscriptionResult per input, in input order, each as soon as it and the inputs before it are done.

    Windows of many inputs share a batch. `transcribe()` runs it over files and folders; bench runs it over
    one in-memory clip at a time, so that it times what `whisfusion transcribe` runs. model: a loaded model
    or Pipeline; None loads `options.model` when the first input needs it."""

    def __init__(self, options: TranscribeOptions, model: "LoadedModel | Pipeline | None" = None,
                 reporter: Reporter | None = None):
        self.options = options
        self.reporter = reporter or Reporter()
        self.pipeline: Pipeline | None = model if isinstance(model, Pipeline) else None
        if model is not None and self.pipeline is None:
            self.pipeline = Pipeline(model, options.decoding)
        self.writer = None
        if options.output_dir is not None:
            self.writer = get_writer(options.output_format, options.output_dir, options.subtitles)
        self.settings = run_settings(options, model) if self.writer is not None else None
        self.jobs: deque[_Job] = deque()
        self.pool: list[_Queued] = []

    def run(self, inputs: Iterable[InputFile]) -> Iterator[TranscriptionResult]:
        """A result per input (`audio.InputFile`: a path, or a label and an in-memory source)."""
        for f in inputs:
            yield from self._read(f)
        self._flush()
        yield from self._finished()

    def _read(self, f: InputFile) -> Iterator[TranscriptionResult]:
        result = TranscriptionResult(str(f.path), f.output_name)
        if self.writer is not None and not self.options.overwrite and _resumed(result, self.writer, self.settings):
            self.jobs.append(_Job(f, result, reading=False))
            yield from self._finished()
            return
        job = _Job(f, result, t0=time.perf_counter())
        self.jobs.append(job)
        try:
            yield from self._windows(job)
        except AudioError as e:
            result.status, result.error = STATUS_ERROR, str(e)
            job.pending = 0
            self.pool = [q for q in self.pool if q.job is not job]
        job.reading = False
        yield from self._finished()

    def _windows(self, job: _Job) -> Iterator[TranscriptionResult]:
        """Cut one input into windows and queue them; a full pool is encoded and decoded on the way."""
        f, options = job.input, self.options
        if f.source is None:
            info = audio_info(f.path)
            if info.duration is not None:
                _check_duration(f.path, info.duration, options)
        pipeline = self._loaded()
        n_samples = 0
        for w, samples in iter_windows(f.blocks(STREAM_BLOCK_SECONDS), pipeline.vad_options(options.vad)):
            n_samples = w.end_sample
            if self._queue(job, w, samples):
                self._flush()
                yield from self._finished()
        _check_duration(f.path, n_samples / SAMPLE_RATE, options)
        job.result.duration = n_samples / SAMPLE_RATE
        job.result.__dict__.update(self._meta())

    def _loaded(self) -> Pipeline:
        if self.pipeline is None:
            self.pipeline = Pipeline.load(self.options)
            self.reporter.advance(0.0, 0)  # the clock for throughput starts now, after loading the model
        return self.pipeline

    def _queue(self, job: _Job, w: Window, samples: np.ndarray) -> bool:
        """Add a window to its input (a silent one is done at once) and to the pool; True when the pool is full."""
        index = len(job.windows)
        job.windows.append(WindowResult(index, w.start, w.end, w.silent))
        job.segments.append([] if w.silent else None)
        if w.silent:
            self.reporter.advance(w.duration, 0)
            return False
        job.pending += 1
        self.pool.append(_Queued(job, index, w, samples))
        batch_size = self.options.batch_size
        pooled_frames = sum(self.pipeline.model.encoder.output_frames(len(q.samples)) for q in self.pool)
        return (len(self.pool) >= batch_size * POOL_BATCHES
                or pooled_frames + MAX_ENCODER_FRAMES > batch_size * MAX_ENCODER_FRAMES)

    def _flush(self) -> None:
        """Encode and decode the pooled windows; each becomes its input's window result and segments."""
        live = [q for q in self.pool if q.job.result.status != STATUS_ERROR]
        self.pool = []
        if not live:
            return
        pipeline, options, reporter = self.pipeline, self.options, self.reporter
        with reporter.timed("encode"):  # halves a batch the device has no memory for, as decode_windows does
            conditions = in_halves_on_oom(pipeline.encode, [q.samples for q in live], "window")
        seeds = [None if pipeline.decoding.seed is None else pipeline.decoding.seed + q.index for q in live]
        with reporter.timed("decode"):
            results = pipeline.decode(conditions, [q.window.duration for q in live], seeds, options.batch_size,
                                      options.word_timestamps, [q.samples for q in live])
        reporter.decoded(results)
        for q, r in zip(live, results):
            w, job = q.window, q.job
            job.windows[q.index] = WindowResult(q.index, w.start, w.end, False, r.score, r.scores.tolist(), r.selected)
            job.segments[q.index] = pipeline.segments(w, q.index, r, options.word_timestamps, options.max_segment_s)
            job.pending -= 1
            reporter.advance(w.duration, len(r.text_tokens))

    def _finished(self) -> Iterator[TranscriptionResult]:
        while self.jobs and self.jobs[0].ready:
            result = _finish(self.jobs.popleft(), self.writer, self.settings)
            self.reporter.file_done(result)
            yield result

    def _meta(self) -> dict:
        """What a result records of the run: model, decoding, VAD, encoder."""
        pipeline = self.pipeline
        return {"model": pipeline.model.name, "decoding": pipeline.decoding.to_dict(),
                "vad": dataclasses.asdict(pipeline.vad_options(self.options.vad)),
                "encoder": pipeline.model.encoder.describe(), "int8": pipeline.model.int8,
                "engine": pipeline.model.engine,
                "language": pipeline.language, "word_timestamps": self.options.word_timestamps}


def transcribe(
    paths: Iterable | str | Path,
    options: TranscribeOptions | None = None,
    model: "LoadedModel | Pipeline | None" = None,
    reporter: Reporter | None = None,
) -> Iterator[TranscriptionResult]:
    """One TranscriptionResult per input (and per missing path or empty glob), in input order, each as soon as
    it and the inputs before it are done.

    paths: a path, a folder, a glob, a numpy array of 16 kHz mono float samples, an open binary audio file
    object, or a list of those (an in-memory input is labelled `<array N>` / `<stream N>`, or by its file
    name). model: a loaded model (or Pipeline) to reuse; None loads `options.model` on the first file that
    needs it.
    """
    options = options or TranscribeOptions()
    reporter = reporter or Reporter()
    if isinstance(paths, (str, Path, np.ndarray)) or hasattr(paths, "read"):
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
        yield from Transcriber(options, model, reporter).run(files)
    finally:
        reporter.stop()


def _total_seconds(files: list[InputFile]) -> float | None:
    total = 0.0
    for f in files:
        if f.source is not None:
            total += len(f.source) / SAMPLE_RATE if isinstance(f.source, np.ndarray) else 0.0
            continue
        try:
            d = audio_info(f.path).duration
        except AudioError:
            continue
        total += d or 0.0
    return total or None


# ------------------------------------------------------------------------------------------- resume


def run_settings(options: TranscribeOptions, model=None) -> dict:
    """What makes an input's outputs, as recorded beside them: the model (its name and a hash of its
    config), the decoding, VAD, segment and subtitle options, the device. The batch size and the threads
    are not in it: they do not change a file's transcript."""
    if isinstance(model, Pipeline):
        model_id, decoding = _model_identity(model.model.name, model.model.config), model.decoding.to_dict()
    elif model is not None:
        model_id, decoding = _model_identity(model.name, model.config), dict(options.decoding)
    else:
        model_id, decoding = _model_identity_from_options(options.model), dict(options.decoding)
    try:
        device, dtype = device_names(options.device, options.dtype)
    except ValueError:
        device, dtype = options.device, options.dtype
    return json.loads(json.dumps({
        "model": model_id, "decoding": decoding, "vad": dataclasses.asdict(options.vad), "int8": options.int8,
        "engine": options.engine, "encoder_backend": options.encoder_backend, "device": device, "dtype": dtype,
        "min_duration_s": options.min_duration_s, "word_timestamps": options.word_timestamps,
        "max_segment_s": options.max_segment_s, "subtitles": dataclasses.asdict(options.subtitles),
    }, sort_keys=True))  # tuples become lists, as they come back from the record


def _model_identity(name: str, config: dict) -> dict:
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    return {"name": name, "config_sha256": digest}


def _model_identity_from_options(model: str | None) -> dict:
    """The identity of the model `options.model` names, from its config file (the weights are not read)."""
    from .config import CheckpointError, read_model_config
    from .loading import DEFAULT_MODEL_DIR, resolve_model

    try:
        path = resolve_model(model)
        config = read_model_config(path)
    except (CheckpointError, OSError):
        return {"name": str(model), "config_sha256": None}  # loading it will say what is wrong
    return _model_identity("default" if path == DEFAULT_MODEL_DIR else str(model), config)


def _resumed(result: TranscriptionResult, writer, settings: dict) -> bool:
    """True (the result marked skipped) when every output exists and its record holds these settings; a
    note says why an input whose outputs exist is redone."""
    targets = [w.output_path(result.output_name) for w in writer.writers]
    if not all(t.is_file() for t in targets):
        return False
    record = read_record(writer.writers[0].output_dir, result.output_name)
    if record is None or record.get("format") != RECORD_FORMAT:
        result.notes.append(f"{result.path}: its outputs have no record of the settings that made them; "
                            "transcribing again")
        return False
    recorded = _as_written_now(record.get("settings"))
    if recorded != settings:
        changed = _changed(recorded if isinstance(recorded, dict) else {}, settings)
        result.notes.append(f"{result.path}: its outputs were made with other settings ({changed}); "
                            "transcribing again")
        return False
    result.status, result.outputs = STATUS_SKIPPED, [str(t) for t in targets]
    return True


def _as_written_now(settings):
    """A recorded settings dict as this version writes it: the retired decoding fields
    (decoding_options.RETIRED_FIELDS) that records made before they went hold with their one value left out, and
    the fields added since (ADDED_FIELDS) that records made before them lack with the value that ran then, so a
    rerun after an upgrade skips finished inputs as before (a retired field with another value stays, and
    the input is redone)."""
    from .decoding_options import ADDED_FIELDS, RETIRED_FIELDS, DecodingOptions

    if not isinstance(settings, dict) or not isinstance(settings.get("decoding"), dict):
        return settings
    decoding = {k: v for k, v in settings["decoding"].items() if not (k in RETIRED_FIELDS and v == RETIRED_FIELDS[k])}
    whole = {f.name for f in dataclasses.fields(DecodingOptions)} - set(ADDED_FIELDS) <= set(decoding)
    return {**settings, "decoding": {**ADDED_FIELDS, **decoding} if whole else decoding}  # (else: overrides only)


def _changed(old: dict, new: dict, prefix: str = "") -> str:
    """'decoding.steps 4 -> 8, model.name a -> b': what differs between two settings records (the first few)."""
    parts = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = _changed(a, b, f"{prefix}{key}.")
            parts += [inner] if inner else []
        elif a != b:
            parts.append(f"{prefix}{key} {json.dumps(a)} -> {json.dumps(b)}")
    return ", ".join(parts[:4]) + (", ..." if len(parts) > 4 else "")


def _check_duration(path, seconds: float, options: TranscribeOptions) -> None:
    if seconds <= 0:
        raise AudioError(path, "empty audio (no samples)")
    if seconds < options.min_duration_s:
        raise AudioError(path, f"too short to hold speech ({seconds:.3f} s < {options.min_duration_s:g} s)")


def _finish(job: _Job, writer, settings: dict | None) -> TranscriptionResult:
    result = job.result
    if result.status in (STATUS_ERROR, STATUS_SKIPPED):
        return result
    result.windows = job.windows
    result.segments = [s for segments in job.segments if segments for s in segments]
    for i, s in enumerate(result.segments):
        s.id = i
    result.elapsed = time.perf_counter() - job.t0
    if all(w.silent for w in result.windows):  # no window had speech: nothing was decoded
        result.status = STATUS_SILENT
    if writer is not None:
        try:
            result.outputs = [str(p) for p in writer(result, job.input.output_name)]
            # Written last: outputs without a record (an interrupted write) are redone on the next run.
            write_record(writer.writers[0].output_dir, job.input.output_name,
                         {"format": RECORD_FORMAT, "version": __version__, "input": result.path,
                          "outputs": [p.name for p in map(Path, result.outputs)], "settings": settings})
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
    "DEFAULT_BATCH_SIZE", "MIN_AUDIO_SECONDS", "Pipeline", "Segment", "SubtitleOptions", "TranscribeOptions",
    "Transcriber", "TranscriptionResult", "WindowResult", "Word", "options_from_flags", "run_settings", "transcribe",
    "transcribe_file",
]
