"""Transcription results -> files: one `ResultWriter` subclass per format, looked up by `get_writer`.

Every file is written atomically (a temp file in the same directory, fsync, `os.replace`), so an
interrupted run never leaves a partial transcript that a re-run would mistake for a finished one.
Results are duck-typed: anything with `.text`, `.segments` (each `.start`, `.end`, `.text`, `.score`),
and `.to_dict()` for JSON — `transcribe.TranscriptionResult` is one.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable, TextIO

FORMATS = ("txt", "vtt", "srt", "tsv", "json")
ALL = "all"


def write_atomic(path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` so that readers see the old file or the complete new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # including KeyboardInterrupt: never leave the temp file behind
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def format_timestamp(seconds: float, always_include_hours: bool = True, decimal_marker: str = ".") -> str:
    """HH:MM:SS.mmm (SRT uses a comma as decimal marker)."""
    if seconds < 0:
        raise ValueError(f"negative timestamp {seconds}")
    ms = int(round(seconds * 1000.0))
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    hours_marker = f"{hours:02d}:" if always_include_hours or hours > 0 else ""
    return f"{hours_marker}{minutes:02d}:{secs:02d}{decimal_marker}{ms:03d}"


def _spoken(result) -> list:
    """Segments with text: subtitle formats have no use for the empty (silent) windows."""
    return [s for s in result.segments if s.text.strip()]


class ResultWriter:
    extension: str = ""

    def __init__(self, output_dir):
        self.output_dir = Path(output_dir)

    def output_path(self, output_name: str) -> Path:
        return self.output_dir / f"{output_name}.{self.extension}"

    def __call__(self, result, output_name: str) -> Path:
        return write_atomic(self.output_path(output_name), self.render(result))

    def render(self, result) -> str:
        raise NotImplementedError

    def write_result(self, result, file: TextIO) -> None:
        file.write(self.render(result))


class WriteTXT(ResultWriter):
    extension = "txt"

    def render(self, result) -> str:
        return "".join(f"{s.text.strip()}\n" for s in _spoken(result))


class WriteVTT(ResultWriter):
    extension = "vtt"

    def render(self, result) -> str:
        lines = ["WEBVTT", ""]
        for s in _spoken(result):
            lines += [f"{format_timestamp(s.start)} --> {format_timestamp(s.end)}", s.text.strip(), ""]
        return "\n".join(lines)


class WriteSRT(ResultWriter):
    extension = "srt"

    def render(self, result) -> str:
        lines = []
        for i, s in enumerate(_spoken(result), start=1):
            start = format_timestamp(s.start, decimal_marker=",")
            end = format_timestamp(s.end, decimal_marker=",")
            lines += [str(i), f"{start} --> {end}", s.text.strip(), ""]
        return "\n".join(lines)


class WriteTSV(ResultWriter):
    """start<TAB>end<TAB>text with integer milliseconds (openai-whisper's TSV), one segment per line."""

    extension = "tsv"

    def render(self, result) -> str:
        rows = ["start\tend\ttext"]
        for s in _spoken(result):
            text = s.text.strip().replace("\t", " ")
            rows.append(f"{int(round(s.start * 1000))}\t{int(round(s.end * 1000))}\t{text}")
        return "\n".join(rows) + "\n"


class WriteJSON(ResultWriter):
    """Everything: text, every segment (silent windows included, so the segments tile the audio), the
    decoding settings, the model and the duration."""

    extension = "json"

    def render(self, result) -> str:
        return json.dumps(result.to_dict(), ensure_ascii=False, indent=2) + "\n"


WRITERS: dict[str, type[ResultWriter]] = {
    "txt": WriteTXT, "vtt": WriteVTT, "srt": WriteSRT, "tsv": WriteTSV, "json": WriteJSON,
}


def parse_formats(output_format: str) -> list[str]:
    """'all' | one format | a comma-separated list -> formats in canonical order."""
    names = [f.strip().lower() for f in str(output_format).split(",") if f.strip()]
    if not names:
        raise ValueError("no output format given")
    if ALL in names:
        return list(FORMATS)
    unknown = [n for n in names if n not in WRITERS]
    if unknown:
        raise ValueError(f"unknown output format {unknown[0]!r}; choose from {', '.join(FORMATS)}, {ALL}")
    return [f for f in FORMATS if f in names]


def get_writer(output_format: str, output_dir) -> Callable[[object, str], list[Path]]:
    """A callable (result, output_name) -> written paths, for one format or 'all' (or 'txt,srt')."""
    writers = [WRITERS[f](output_dir) for f in parse_formats(output_format)]

    def write(result, output_name: str) -> list[Path]:
        return [w(result, output_name) for w in writers]

    write.writers = writers  # type: ignore[attr-defined]
    return write


__all__ = [
    "ALL", "FORMATS", "ResultWriter", "WRITERS", "WriteJSON", "WriteSRT", "WriteTSV", "WriteTXT", "WriteVTT",
    "format_timestamp", "get_writer", "parse_formats", "write_atomic",
]
