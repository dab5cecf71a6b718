"""writers.py: every format's structure, timestamps, silent segments, atomic writes."""

import json
import os
import re

import pytest

from whisfusion_cli import writers
from whisfusion_cli.transcribe import Segment, TranscriptionResult
from whisfusion_cli.writers import format_timestamp, get_writer, parse_formats, write_atomic

SRT_TIME = re.compile(r"^(\d\d):(\d\d):(\d\d),(\d\d\d) --> (\d\d):(\d\d):(\d\d),(\d\d\d)$")
VTT_TIME = re.compile(r"^(\d\d):(\d\d):(\d\d)\.(\d\d\d) --> (\d\d):(\d\d):(\d\d)\.(\d\d\d)$")


def seconds(h, m, s, ms):
    return int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000


def parse_cues(text, pattern):
    """[(start, end, text)] from SRT or VTT text; raises on any malformed cue."""
    cues = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = pattern.match(line)
        if m:
            g = m.groups()
            cues.append((seconds(*g[:4]), seconds(*g[4:]), lines[i + 1]))
        elif "-->" in line:
            raise AssertionError(f"malformed timing line {line!r}")
    return cues


@pytest.fixture
def result():
    segs = [
        Segment(0, 0.0, 12.5, "ask not what your country can do for you", 0.91, [5, 6]),
        Segment(1, 12.5, 20.0, "", None, [], silent=True),
        Segment(2, 20.0, 3725.25, "ask what you can do\tfor your country", 0.87, [7]),
    ]
    return TranscriptionResult("talk.wav", "talk", segments=segs, duration=3725.25, model="tiny",
                               decoding={"steps": 4, "candidates": 15}, vad={"enabled": True})


def test_format_timestamp():
    assert format_timestamp(0) == "00:00:00.000"
    assert format_timestamp(3725.2506) == "01:02:05.251"
    assert format_timestamp(59.9996) == "00:01:00.000"  # rounding carries into the minutes
    assert format_timestamp(1.5, decimal_marker=",") == "00:00:01,500"
    assert format_timestamp(61.0, always_include_hours=False) == "01:01.000"
    with pytest.raises(ValueError):
        format_timestamp(-1)


def test_srt(result):
    text = writers.WriteSRT(".").render(result)
    cues = parse_cues(text, SRT_TIME)
    assert [c[2] for c in cues] == [result.segments[0].text, result.segments[2].text]  # silent one left out
    assert cues[1][:2] == (20.0, 3725.25)
    assert text.splitlines()[0] == "1" and "\n2\n" in text


def test_vtt(result):
    text = writers.WriteVTT(".").render(result)
    assert text.startswith("WEBVTT\n\n")
    cues = parse_cues(text, VTT_TIME)
    assert len(cues) == 2 and all(a < b for a, b, _ in cues)


def test_tsv_and_txt(result):
    rows = writers.WriteTSV(".").render(result).splitlines()
    assert rows[0] == "start\tend\ttext"
    assert rows[1].split("\t")[:2] == ["0", "12500"] and rows[2].split("\t")[:2] == ["20000", "3725250"]
    assert all(len(r.split("\t")) == 3 for r in rows)  # a tab inside the text does not add a column
    assert writers.WriteTXT(".").render(result).splitlines() == [result.segments[0].text, result.segments[2].text]


def test_json_holds_everything(result):
    d = json.loads(writers.WriteJSON(".").render(result))
    assert d["text"] == result.text and d["model"] == "tiny" and d["duration"] == 3725.25
    assert d["decoding"] == {"steps": 4, "candidates": 15}
    assert [s["silent"] for s in d["segments"]] == [False, True, False]  # silent windows kept: segments tile
    assert set(d["segments"][0]) >= {"start", "end", "text", "score"}
    assert d["segments"][1]["score"] is None


def test_get_writer_all_writes_every_format_atomically(tmp_path, result):
    write = get_writer("all", tmp_path)
    paths = write(result, "sub/talk")
    assert sorted(p.name for p in paths) == sorted(f"talk.{e}" for e in writers.FORMATS)
    assert all(p.parent == tmp_path / "sub" for p in paths)
    assert not [n for n in os.listdir(tmp_path / "sub") if n.endswith(".tmp")]


def test_parse_formats():
    assert parse_formats("all") == list(writers.FORMATS)
    assert parse_formats("json,SRT") == ["srt", "json"]
    with pytest.raises(ValueError, match="unknown output format 'docx'"):
        parse_formats("txt,docx")
    with pytest.raises(ValueError):
        parse_formats(",")


def test_write_atomic_never_leaves_a_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "out.txt"
    write_atomic(target, "old complete transcript\n")

    def crash(src, dst):
        raise KeyboardInterrupt  # Ctrl-C between writing the temp file and renaming it

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, "new transcript that never lands\n" * 1000)
    monkeypatch.undo()
    assert target.read_text() == "old complete transcript\n"
    assert os.listdir(tmp_path) == ["out.txt"]
