"""Cutting long audio into encoder windows of at most 30 s, at pauses.

A voice-activity detector gives a speech probability for every 32 ms frame: the Silero VAD v6 ONNX model
(shipped in `assets/`, run on onnxruntime, the export faster-whisper bundles) or, when onnxruntime or the
model is missing, an energy detector against a tracked noise floor. `WindowPlanner` turns those
probabilities into windows online, so audio of any length is processed with a bounded buffer:

* windows are contiguous and cover the whole audio (no gap, no overlap), each at most `max_window_s`;
* a window that has to be cut for length is cut inside a pause (the latest clear pause, else the longest
  one, else the least speech-like frame), never inside a word when a pause exists;
* silence longer than `split_silence_s` becomes a window of its own (padded speech stays with its words),
  flagged `silent`: it yields an empty transcript without running the encoder or the decoder.

Times are in samples at 16 kHz internally (`Window.start_sample`/`end_sample`) and seconds for callers.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .audio import CHUNK_LENGTH, SAMPLE_RATE

FRAME_SAMPLES = 512  # Silero's frame at 16 kHz
FRAME_SECONDS = FRAME_SAMPLES / SAMPLE_RATE  # 0.032 s
SILERO_CONTEXT = 64  # samples of the previous frame the model sees with each frame
SILERO_STATE_SHAPE = (1, 1, 128)
SILERO_BATCH_FRAMES = 2048  # frames per onnxruntime call (the state is carried between calls)
SILERO_MODEL = Path(__file__).parent / "assets" / "silero_vad_v6.onnx"
BACKENDS = ("auto", "silero", "energy")
# Energy detector: speech is energy this far above the floor (lowest frame energy of the last few seconds),
# and above an absolute level below which nothing counts as speech.
ENERGY_MARGIN_DB = 12.0
ENERGY_ABSOLUTE_DB = -55.0
ENERGY_FLOOR_SECONDS = 5.0
ENERGY_SLOPE_DB = 2.0  # width of the soft transition from "silence" to "speech" probability
# Peak below which a window is digital silence whatever the detector says (1/2 of a 16-bit step).
DIGITAL_SILENCE = 1.0 / 65536


@dataclass(frozen=True)
class VadOptions:
    enabled: bool = True  # False: fixed windows of max_window_s, no pause detection
    backend: str = "auto"  # "auto" (silero if onnxruntime is installed, else energy), "silero", "energy"
    threshold: float = 0.5  # probability at or above which a frame starts speech
    neg_threshold: float | None = None  # below this speech ends (hysteresis); None: threshold - 0.15
    max_window_s: float = float(CHUNK_LENGTH)  # the encoder's window
    min_cut_s: float = 10.0  # a window cut for length is at least this long (unless the audio ends)
    split_silence_s: float = 2.0  # silence at least this long becomes its own (silent) window
    # Audio kept around speech when cutting into silence. 0.3 s rather than 0.2: windows that began 0.2 s
    # before the detected onset clipped soft onsets ("Ask not" came out as "S, not"); the default model's
    # training clips carry 0.05-0.6 s of silence, faster-whisper keeps 0.4 s (docs/MODEL_CARD.md, VAD pad).
    speech_pad_s: float = 0.3
    good_pause_s: float = 0.3  # a pause this long is a safe cut; the latest one is taken
    min_speech_s: float = 0.25  # a window with less detected speech is silent

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown VAD backend {self.backend!r}; choose from {', '.join(BACKENDS)}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"VAD threshold must lie in (0, 1), got {self.threshold}")
        if not FRAME_SECONDS * 2 <= self.max_window_s <= CHUNK_LENGTH:
            raise ValueError(f"max_window_s must lie in [{FRAME_SECONDS * 2}, {CHUNK_LENGTH}], got {self.max_window_s}")
        if not 0.0 <= self.min_cut_s <= self.max_window_s:
            raise ValueError(f"min_cut_s must lie in [0, max_window_s], got {self.min_cut_s}")
        if self.split_silence_s < 2 * self.speech_pad_s:
            raise ValueError("split_silence_s must be at least twice speech_pad_s")

    @property
    def negative_threshold(self) -> float:
        return self.neg_threshold if self.neg_threshold is not None else max(self.threshold - 0.15, 0.01)

    def with_max_window(self, seconds: float) -> "VadOptions":
        """These options with windows of at most `seconds`; a window cut for length stays at least half that."""
        return replace(self, max_window_s=float(seconds), min_cut_s=min(self.min_cut_s, seconds / 2))

    def with_split_silence(self, seconds: float) -> "VadOptions":
        """These options with windows ended by pauses of `seconds`; the audio kept around speech stays at most
        half that."""
        return replace(self, split_silence_s=float(seconds), speech_pad_s=min(self.speech_pad_s, seconds / 2))


def vad_options(enabled: bool = True, max_window_s: float | None = None, split_silence_s: float | None = None) -> VadOptions:
    """VadOptions from the two numbers a user sets (the CLI's --max-window and --split-silence); the values
    that depend on them follow: a window cut for length is at least half the longest, and the audio kept
    around speech is at most half the splitting pause. A one-line ValueError for values out of range."""
    options = VadOptions(enabled=enabled)
    if max_window_s is not None:
        if not FRAME_SECONDS * 2 <= max_window_s <= CHUNK_LENGTH:
            raise ValueError(f"max window {max_window_s:g} s: must lie in [{FRAME_SECONDS * 2:g}, {CHUNK_LENGTH}] s")
        options = options.with_max_window(max_window_s)
    if split_silence_s is not None:
        if not 0 < split_silence_s <= 3600:
            raise ValueError(f"split silence {split_silence_s:g} s: must be a positive number of seconds")
        options = options.with_split_silence(split_silence_s)
    return options


@dataclass(frozen=True)
class Window:
    """A stretch of audio [start_sample, end_sample) at 16 kHz; `silent` windows are never decoded."""

    start_sample: int
    end_sample: int
    silent: bool = False
    speech_seconds: float = 0.0
    # Speech or not per VAD frame (FRAME_SECONDS each, from start_sample); None without VAD. Word timestamps
    # end a word where its speech ends, not where the next word starts after a pause.
    speech: tuple[bool, ...] | None = field(default=None, compare=False, repr=False)

    @property
    def start(self) -> float:
        return self.start_sample / SAMPLE_RATE

    @property
    def end(self) -> float:
        return self.end_sample / SAMPLE_RATE

    @property
    def duration(self) -> float:
        return (self.end_sample - self.start_sample) / SAMPLE_RATE


# ------------------------------------------------------------------------------------------- detectors


@lru_cache(maxsize=1)
def _silero_session(path: str):
    import onnxruntime

    opts = onnxruntime.SessionOptions()
    # The model is tiny and sequential; one thread leaves the cores to the encoder and decoder.
    opts.inter_op_num_threads = 1
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 4
    return onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"], sess_options=opts)


def silero_available(path: Path = SILERO_MODEL) -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None and Path(path).is_file()


class _FrameDetector:
    """Streaming: `process(samples)` returns one probability per complete 512-sample frame so far;
    `flush()` zero-pads and scores the last partial frame."""

    def __init__(self):
        self._pending = np.zeros(0, dtype=np.float32)

    def process(self, samples: np.ndarray) -> np.ndarray:
        data = np.concatenate([self._pending, np.asarray(samples, dtype=np.float32)])
        n = len(data) // FRAME_SAMPLES
        self._pending = data[n * FRAME_SAMPLES :]
        if n == 0:
            return np.zeros(0, dtype=np.float32)
        return self._frames(data[: n * FRAME_SAMPLES].reshape(n, FRAME_SAMPLES))

    def flush(self) -> np.ndarray:
        if len(self._pending) == 0:
            return np.zeros(0, dtype=np.float32)
        frame = np.zeros((1, FRAME_SAMPLES), dtype=np.float32)
        frame[0, : len(self._pending)] = self._pending
        self._pending = np.zeros(0, dtype=np.float32)
        return self._frames(frame)

    def _frames(self, frames: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class SileroDetector(_FrameDetector):
    """Silero VAD v6 over onnxruntime; the LSTM state and the 64-sample context carry across calls, so
    streaming a file in blocks gives the probabilities of the whole file at once (as faster-whisper runs it)."""

    name = "silero"

    def __init__(self, model_path: Path = SILERO_MODEL):
        super().__init__()
        self.session = _silero_session(str(model_path))
        self.h = np.zeros(SILERO_STATE_SHAPE, dtype=np.float32)
        self.c = np.zeros(SILERO_STATE_SHAPE, dtype=np.float32)
        self.context = np.zeros(SILERO_CONTEXT, dtype=np.float32)

    def _frames(self, frames: np.ndarray) -> np.ndarray:
        ctx = np.concatenate([self.context[None, :], frames[:-1, -SILERO_CONTEXT:]], axis=0)
        self.context = frames[-1, -SILERO_CONTEXT:].copy()
        batch = np.concatenate([ctx, frames], axis=1)
        out = []
        for i in range(0, len(batch), SILERO_BATCH_FRAMES):
            probs, self.h, self.c = self.session.run(
                None, {"input": batch[i : i + SILERO_BATCH_FRAMES], "h": self.h, "c": self.c}
            )
            out.append(np.asarray(probs, dtype=np.float32).reshape(-1))
        return np.concatenate(out)


class EnergyDetector(_FrameDetector):
    """Fallback: frame energy against the lowest energy of the last few seconds (the noise floor), mapped to
    a probability by a soft step. Good on clean recordings; Silero is much better in noise."""

    name = "energy"

    def __init__(self):
        super().__init__()
        self._window = int(round(ENERGY_FLOOR_SECONDS / FRAME_SECONDS))
        self._minima: deque[tuple[int, float]] = deque()  # (frame index, dB), increasing dB: sliding minimum
        self._index = 0

    def _frames(self, frames: np.ndarray) -> np.ndarray:
        db = 10.0 * np.log10(np.mean(frames.astype(np.float64) ** 2, axis=1) + 1e-12)
        out = np.empty(len(db), dtype=np.float32)
        for j, e in enumerate(db):
            while self._minima and self._minima[-1][1] >= e:
                self._minima.pop()
            self._minima.append((self._index, float(e)))
            while self._minima[0][0] <= self._index - self._window:
                self._minima.popleft()
            level = max(self._minima[0][1] + ENERGY_MARGIN_DB, ENERGY_ABSOLUTE_DB)
            out[j] = 1.0 / (1.0 + math.exp(-(e - level) / ENERGY_SLOPE_DB))
            self._index += 1
        return out


def make_detector(options: VadOptions) -> _FrameDetector:
    if options.backend == "energy":
        return EnergyDetector()
    if options.backend == "silero" or silero_available():
        if not silero_available():
            raise RuntimeError(f"Silero VAD needs onnxruntime and {SILERO_MODEL}; use the energy backend")
        return SileroDetector()
    return EnergyDetector()


def speech_probabilities(audio: np.ndarray, options: VadOptions | None = None) -> np.ndarray:
    """One speech probability per 512-sample frame (the last frame zero-padded)."""
    det = make_detector(options or VadOptions())
    return np.concatenate([det.process(audio), det.flush()])


# ----------------------------------------------------------------------------------------------- planning


def _frames(seconds: float) -> int:
    return int(round(seconds / FRAME_SECONDS))


class WindowPlanner:
    """Online window planning over frame probabilities: `feed(probs)` returns the windows decided so far,
    `finish(total_samples)` the rest. Holds at most one window's worth of frames."""

    def __init__(self, options: VadOptions | None = None):
        o = self.options = options or VadOptions()
        self.max_f = int(o.max_window_s / FRAME_SECONDS + 1e-9)  # floor: a window never exceeds max_window_s
        self.min_cut_f = min(self.max_f, _frames(o.min_cut_s))
        self.split_f = max(1, _frames(o.split_silence_s))
        self.pad_f = _frames(o.speech_pad_s)
        self.good_f = max(1, _frames(o.good_pause_s))
        self.min_speech_f = _frames(o.min_speech_s)
        self.thr, self.neg = o.threshold, o.negative_threshold
        self.start = 0  # absolute frame of the current window's start
        self.probs: list[float] = []  # frames of the current window
        self.flags: list[bool] = []  # speech or not (hysteresis), same frames
        self.n_speech = 0  # speech frames in the current window
        self.triggered = False

    def _last_speech(self) -> int:
        for j in range(len(self.flags) - 1, -1, -1):
            if self.flags[j]:
                return j
        return -1

    def feed(self, probs: Iterable[float]) -> list[Window]:
        out: list[Window] = []
        for p in probs:
            p = float(p)
            if p >= self.thr:
                self.triggered = True
            elif p < self.neg:
                self.triggered = False
            self.probs.append(p)
            self.flags.append(self.triggered)
            self.n_speech += self.triggered
            self._decide(out)
        return out

    def _decide(self, out: list[Window]) -> None:
        n, speech = len(self.flags), self.n_speech
        if self.flags[-1] and speech == 1 and n - 1 >= self.split_f:
            # Speech begins after a long silence: the silence (minus the pad before the speech) is a window.
            self._cut(n - 1 - self.pad_f, out)
            return
        if not self.flags[-1] and speech > 0:
            last = self._last_speech()
            if n - 1 - last >= self.split_f:
                # Speech followed by a long silence: close the speech window a pad after the last word.
                self._cut(last + 1 + self.pad_f, out)
                return
        if n >= self.max_f:
            self._cut(self._best_cut() if speech else self.max_f, out)

    def _best_cut(self) -> int:
        """Cut point (frames from the window start) inside a pause in [min_cut, max]."""
        lo, hi = self.min_cut_f, self.max_f
        runs = []  # (start, end) of non-speech runs intersecting [lo, hi]
        j = 0
        n = len(self.flags)
        while j < n:
            if self.flags[j]:
                j += 1
                continue
            k = j
            while k < n and not self.flags[k]:
                k += 1
            if j <= hi and k >= lo:  # a cut anywhere in [j, k] leaves the words on either side whole
                runs.append((j, k))
            j = k
        if runs:
            good = [r for r in runs if r[1] - r[0] >= self.good_f]
            a, b = max(good, key=lambda r: r[0]) if good else max(runs, key=lambda r: (r[1] - r[0], r[0]))
            return int(min(min(b, hi), max(max(a, lo), (a + b) // 2)))
        if hi <= lo:  # min_cut_s == max_window_s: nothing to choose
            return hi
        # No frame below the speech threshold: the least speech-like frame (3-frame average) in range.
        p = np.pad(np.asarray(self.probs[:hi], dtype=np.float64), 1, mode="edge")
        smooth = np.convolve(p, np.ones(3) / 3, mode="valid")  # edge-padded, so the ends are not favoured
        return int(lo + np.argmin(smooth[lo:hi]))

    def _cut(self, c: int, out: list[Window]) -> None:
        c = max(1, min(c, len(self.flags)))
        speech = sum(self.flags[:c])
        out.append(self._window(self.start, self.start + c, speech, flags=self.flags[:c]))
        self.start += c
        self.probs = self.probs[c:]
        self.flags = self.flags[c:]
        self.n_speech = sum(self.flags)

    def _window(self, f0: int, f1: int, speech_frames: int, end_sample: int | None = None, flags=()) -> Window:
        end = f1 * FRAME_SAMPLES if end_sample is None else end_sample
        return Window(
            f0 * FRAME_SAMPLES, end, silent=speech_frames < max(1, self.min_speech_f),
            speech_seconds=speech_frames * FRAME_SECONDS, speech=tuple(flags),
        )

    def finish(self, total_samples: int) -> list[Window]:
        """The last window, ending exactly at `total_samples`."""
        if total_samples <= self.start * FRAME_SAMPLES:
            return []
        w = self._window(self.start, self.start + len(self.flags), sum(self.flags), end_sample=total_samples,
                         flags=self.flags)
        self.probs, self.flags = [], []
        return [w]


def iter_windows(blocks: Iterable[np.ndarray], options: VadOptions | None = None) -> Iterator[tuple[Window, np.ndarray]]:
    """(window, its samples) from a stream of 16 kHz blocks, in order, holding at most about one window
    plus one block of audio. The windows cover the stream exactly."""
    options = options or VadOptions()
    if not options.enabled:
        yield from _fixed_windows(blocks, options)
        return
    detector = make_detector(options)
    planner = WindowPlanner(options)
    buf = _SampleBuffer()
    for block in blocks:
        buf.append(block)
        for w in planner.feed(detector.process(block)):
            yield _with_audio(w, buf)
    tail = planner.feed(detector.flush())
    for w in tail + planner.finish(buf.end):
        yield _with_audio(w, buf)


def _with_audio(w: Window, buf: "_SampleBuffer") -> tuple[Window, np.ndarray]:
    samples = buf.take(w.start_sample, w.end_sample)
    if not w.silent and (len(samples) == 0 or float(np.max(np.abs(samples))) < DIGITAL_SILENCE):
        w = Window(w.start_sample, w.end_sample, silent=True, speech_seconds=0.0)
    return w, samples


def _fixed_windows(blocks, options: VadOptions) -> Iterator[tuple[Window, np.ndarray]]:
    size = int(options.max_window_s * SAMPLE_RATE)
    buf = _SampleBuffer()
    start = 0
    for block in blocks:
        buf.append(block)
        while buf.end - start >= size:
            yield _fixed(start, start + size, buf)
            start += size
    if buf.end > start:
        yield _fixed(start, buf.end, buf)


def _fixed(a: int, b: int, buf: "_SampleBuffer") -> tuple[Window, np.ndarray]:
    samples = buf.take(a, b)
    silent = len(samples) == 0 or float(np.max(np.abs(samples))) < DIGITAL_SILENCE
    return Window(a, b, silent=silent, speech_seconds=0.0 if silent else (b - a) / SAMPLE_RATE), samples


class _SampleBuffer:
    """Samples from a moving start to the end of what has been appended; `take` drops what precedes it."""

    def __init__(self):
        self.blocks: list[np.ndarray] = []
        self.start = 0  # absolute sample index of blocks[0][0]
        self.end = 0

    def append(self, block: np.ndarray) -> None:
        if len(block):
            self.blocks.append(np.asarray(block, dtype=np.float32))
            self.end += len(block)

    def take(self, a: int, b: int) -> np.ndarray:
        if a < self.start or b > self.end:
            raise ValueError(f"samples [{a}, {b}) are not buffered (have [{self.start}, {self.end}))")
        data = np.concatenate(self.blocks) if len(self.blocks) != 1 else self.blocks[0]
        out = data[a - self.start : b - self.start].copy()
        rest = data[b - self.start :]
        self.blocks = [rest] if len(rest) else []
        self.start = b
        return out

    def __len__(self) -> int:
        return self.end - self.start


# ---------------------------------------------------------------------------------------- whole arrays


def plan_windows(audio: np.ndarray, options: VadOptions | None = None) -> list[Window]:
    """Windows for a whole 16 kHz array (the same as streaming it)."""
    return [w for w, _ in iter_windows([np.asarray(audio, dtype=np.float32)], options)]


def speech_timestamps(audio: np.ndarray, options: VadOptions | None = None) -> list[tuple[float, float]]:
    """(start, end) seconds of detected speech regions (hysteresis on the frame probabilities)."""
    options = options or VadOptions()
    probs = speech_probabilities(audio, options)
    out, triggered, begin = [], False, 0
    for i, p in enumerate(probs):
        if p >= options.threshold and not triggered:
            triggered, begin = True, i
        elif p < options.negative_threshold and triggered:
            triggered = False
            out.append((begin * FRAME_SECONDS, i * FRAME_SECONDS))
    if triggered:
        out.append((begin * FRAME_SECONDS, len(audio) / SAMPLE_RATE))
    return out


__all__ = [
    "EnergyDetector", "FRAME_SAMPLES", "FRAME_SECONDS", "SileroDetector", "VadOptions", "Window", "WindowPlanner",
    "iter_windows", "make_detector", "plan_windows", "silero_available", "speech_probabilities", "speech_timestamps",
    "vad_options",
]
