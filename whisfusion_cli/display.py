"""What long jobs show while they run (preprocess, train, transcribe): one look, made in one place.

Rich is imported inside the functions, so the CLI can import this module for `--help`.
"""

from __future__ import annotations

import contextlib
import sys
import time


def progress(enabled: bool, console=None, *, counts: bool = True):
    """A Rich progress bar: description, bar, done/total (`counts`) or elapsed time, time remaining.

    Disabled (prints nothing) when `enabled` is false, e.g. under --quiet or when stderr is not a terminal.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    middle = MofNCompleteColumn() if counts else TimeElapsedColumn()
    return Progress(TextColumn("{task.description}"), BarColumn(), middle, TimeRemainingColumn(),
                    disable=not enabled, console=console)


class Reporter:
    """What the transcription driver (transcribe.Transcriber) tells the outside world; the default does
    nothing. A display shows progress from it; bench times the driver's stages through `timed`."""

    def start(self, n_files: int, total_seconds: float | None) -> None: ...

    def advance(self, audio_seconds: float, tokens: int) -> None: ...

    def timed(self, stage: str):
        """A context around each batch's "encode" and "decode"."""
        return contextlib.nullcontext()

    def decoded(self, results: list) -> None:
        """A batch's decoding.DecodingResult, one per window."""

    def file_done(self, result) -> None:
        """An input's transcribe.TranscriptionResult, in input order."""

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
