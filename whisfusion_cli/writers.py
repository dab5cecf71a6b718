"""Transcription results -> files: one `ResultWriter` subclass per format, looked up by `get_writer`.

Every file is written atomically (fileio.write_atomic: a temp file in the same directory, fsync, rename), so an
interrupted run never leaves a partial transcript that a re-run would mistake for a finished one. Beside an
input's outputs a record (`.NAME.whisfusion-run`, written last) holds the settings that made them, so a
rerun with other settings redoes the input instead of keeping stale files.
Results are duck-typed: anything with `.text`, `.segments` (each `.start`, `.end`, `.text`, and `.words`:
None or items with `.word`, `.start`, `.end`), and `.to_dict()` for JSON — `transcribe.TranscriptionResult`
is one.

Subtitles (SRT, VTT) have one cue per segment; with `max_line_width` a cue's text is wrapped into lines of at
most that many characters, with `max_line_count` a cue of more lines is split into cues of that many, timed
by its words (`highlight_words`: one cue per word, the word underlined, as openai-whisper does).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .choices import ALL_FORMATS as ALL, OUTPUT_FORMATS as FORMATS
from .fileio import write_atomic

RECORD_SUFFIX = ".whisfusion-run"


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
    """Segments with text: subtitle formats have no use for empty ones."""
    return [s for s in result.segments if s.text.strip()]


@dataclass(frozen=True)
class SubtitleOptions:
    max_line_width: int | None = None  # characters per line; None: a cue is one line
    max_line_count: int | None = None  # lines per cue; None: as many as the segment needs
    highlight_words: bool = False  # a cue per word, the word underlined (needs word timestamps)

    def __post_init__(self):
        for name in ("max_line_width", "max_line_count"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name.replace('_', '-')} must be at least 1, got {value}")
        if self.max_line_count is not None and self.max_line_width is None:
            raise ValueError("--max-line-count needs --max-line-width (lines are made by wrapping)")


def _cue_words(segment) -> list[tuple[str, float, float]]:
    """(word, start, end) of a segment: its timed words, else its text's words spread over its time."""
    if getattr(segment, "words", None):
        return [(w.word.strip(), w.start, w.end) for w in segment.words]
    words = segment.text.split()
    total = sum(len(w) for w in words) or 1
    out, t = [], segment.start
    for w in words:
        d = (segment.end - segment.start) * len(w) / total
        out.append((w, t, t + d))
        t += d
    return out


def _lines(words: list, width: int | None) -> list[list]:
    """Words wrapped greedily into lines of at most `width` characters (a longer word gets its own line)."""
    lines: list[list] = []
    length = 0
    for w in words:
        if lines and (width is None or length + 1 + len(w[0]) <= width):
            lines[-1].append(w)
            length += 1 + len(w[0])
        else:
            lines.append([w])
            length = len(w[0])
    return lines


def subtitle_cues(result, options: SubtitleOptions | None = None) -> list[tuple[float, float, str]]:
    """(start, end, text) of every cue, in order; a cue's lines are joined with newlines."""
    options = options or SubtitleOptions()
    cues = []
    for seg in _spoken(result):
        lines = _lines(_cue_words(seg), options.max_line_width)
        if not lines:
            continue
        per_cue = options.max_line_count or len(lines)
        groups = [lines[i : i + per_cue] for i in range(0, len(lines), per_cue)]
        for g, group in enumerate(groups):
            start = seg.start if g == 0 else group[0][0][1]
            end = seg.end if g == len(groups) - 1 else groups[g + 1][0][0][1]
            if options.highlight_words:
                cues += _highlighted(group, start, end)
            else:
                cues.append((start, end, "\n".join(" ".join(w[0] for w in line) for line in group)))
    return [(a, max(a, b), text.replace("-->", "->")) for a, b, text in cues]


def _highlighted(lines: list[list], start: float, end: float) -> list[tuple[float, float, str]]:
    """One cue per word of a cue's lines, the word underlined; the gaps between words show the plain text."""
    flat = [(i, j) for i, line in enumerate(lines) for j in range(len(line))]
    plain = "\n".join(" ".join(w[0] for w in line) for line in lines)
    cues, last = [], start
    for n, (i, j) in enumerate(flat):
        word_start = max(lines[i][j][1], last)
        word_end = end if n == len(flat) - 1 else max(word_start, min(lines[i][j][2], end))
        if word_start > last:
            cues.append((last, word_start, plain))
        text = "\n".join(" ".join(f"<u>{w[0]}</u>" if (a, b) == (i, j) else w[0] for b, w in enumerate(line))
                         for a, line in enumerate(lines))
        cues.append((word_start, word_end, text))
        last = word_end
    return cues


class ResultWriter:
    extension: str = ""

    def __init__(self, output_dir, subtitles: SubtitleOptions | None = None):
        self.output_dir = Path(output_dir)
        self.subtitles = subtitles or SubtitleOptions()

    def output_path(self, output_name: str) -> Path:
        return self.output_dir / f"{output_name}.{self.extension}"

    def __call__(self, result, output_name: str) -> Path:
        return write_atomic(self.output_path(output_name), self.render(result))

    def render(self, result) -> str:
        raise NotImplementedError


class WriteTXT(ResultWriter):
    extension = "txt"

    def render(self, result) -> str:
        return "".join(f"{s.text.strip()}\n" for s in _spoken(result))


class WriteVTT(ResultWriter):
    extension = "vtt"

    def render(self, result) -> str:
        lines = ["WEBVTT", ""]
        for start, end, text in subtitle_cues(result, self.subtitles):
            lines += [f"{format_timestamp(start)} --> {format_timestamp(end)}", text, ""]
        return "\n".join(lines)


class WriteSRT(ResultWriter):
    extension = "srt"

    def render(self, result) -> str:
        lines = []
        for i, (start, end, text) in enumerate(subtitle_cues(result, self.subtitles), start=1):
            start_mark = format_timestamp(start, decimal_marker=",")
            lines += [str(i), f"{start_mark} --> {format_timestamp(end, decimal_marker=',')}", text, ""]
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
    """openai-whisper's schema (text, segments, language), with our own fields under "whisfusion"."""

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


def get_writer(output_format: str, output_dir, subtitles: SubtitleOptions | None = None
               ) -> Callable[[object, str], list[Path]]:
    """A callable (result, output_name) -> written paths, for one format or 'all' (or 'txt,srt')."""
    writers = [WRITERS[f](output_dir, subtitles) for f in parse_formats(output_format)]

    def write(result, output_name: str) -> list[Path]:
        return [w(result, output_name) for w in writers]

    write.writers = writers  # type: ignore[attr-defined]
    return write


# --------------------------------------------------------------------------------------- run records


def record_path(output_dir, output_name: str) -> Path:
    """Where the record of an input's outputs lives: `.NAME.whisfusion-run` beside them."""
    name = Path(output_name)
    return Path(output_dir) / name.parent / f".{name.name}{RECORD_SUFFIX}"


def read_record(output_dir, output_name: str) -> dict | None:
    """The record of the settings that made an input's outputs; None if there is none or it is unreadable."""
    try:
        record = json.loads(record_path(output_dir, output_name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def write_record(output_dir, output_name: str, record: dict) -> Path:
    return write_atomic(record_path(output_dir, output_name), json.dumps(record, ensure_ascii=False, indent=1) + "\n")


__all__ = [
    "ALL", "FORMATS", "ResultWriter", "SubtitleOptions", "WRITERS", "WriteJSON", "WriteSRT", "WriteTSV", "WriteTXT", "WriteVTT",
    "format_timestamp", "get_writer", "parse_formats", "read_record", "record_path", "subtitle_cues", "write_record",
]
