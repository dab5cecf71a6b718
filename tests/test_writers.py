"""writers.py: every format's structure, timestamps, openai-whisper's JSON schema read back by whisper's own
writers, subtitles a subtitle library parses, line and cue options, atomic writes, run records."""

import json
import os
import re

import pytest

from whisfusion_cli import writers
from whisfusion_cli.timing import Segment, Word
from whisfusion_cli.transcribe import TranscriptionResult, WindowResult
from whisfusion_cli.writers import (SubtitleOptions, format_timestamp, get_writer, parse_formats, read_record,
                                    subtitle_cues, write_record)

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
        Segment(0, 0.0, 12.5, "ask not what your country can do for you", 0.91, [5, 6], avg_logprob=-0.2),
        Segment(1, 20.0, 3725.25, "ask what you can do\tfor your country", 0.87, [7], window=2, seek=2000),
    ]
    windows = [WindowResult(0, 0.0, 12.5, False, 0.91, [0.91], 0), WindowResult(1, 12.5, 20.0, True),
               WindowResult(2, 20.0, 3725.25, False, 0.87, [0.87], 0)]
    return TranscriptionResult("talk.wav", "talk", segments=segs, windows=windows, duration=3725.25, model="tiny",
                               decoding={"steps": 4, "candidates": 15}, vad={"enabled": True})


@pytest.fixture
def timed():
    """A result with word timestamps: two sentences of a talk, the second long enough to wrap."""
    first = [Word(" Ask", 0.5, 0.8, 0.9), Word(" not.", 0.8, 1.2, 0.8)]
    second = [Word(f" word{i}", 2.0 + 0.4 * i, 2.3 + 0.4 * i, 0.7) for i in range(12)]
    segs = [Segment(0, 0.5, 1.2, "Ask not.", 0.9, [1, 2], words=first),
            Segment(1, 2.0, 6.7, " ".join(w.word.strip() for w in second), 0.7, list(range(12)), words=second)]
    return TranscriptionResult("talk.wav", "talk", segments=segs, windows=[WindowResult(0, 0.0, 7.0, False, 0.8)],
                               duration=7.0, model="tiny", word_timestamps=True)


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
    assert [c[2] for c in cues] == [" ".join(s.text.split()) for s in result.segments]  # words, one space apart
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
    assert writers.WriteTXT(".").render(result).splitlines() == [result.segments[0].text, result.segments[1].text]


def test_json_is_whisper_schema_with_ours_under_one_key(result):
    d = json.loads(writers.WriteJSON(".").render(result))
    assert set(d) == {"text", "segments", "language", "whisfusion"} and d["language"] == "en"
    assert d["text"] == result.text
    whisper_keys = {"id", "seek", "start", "end", "text", "tokens", "temperature", "avg_logprob",
                    "compression_ratio", "no_speech_prob"}
    assert all(set(s) == whisper_keys for s in d["segments"])  # no "words" without word timestamps
    assert d["segments"][1]["seek"] == 2000 and d["segments"][0]["tokens"] == [5, 6]
    assert d["segments"][0]["avg_logprob"] == -0.2 and d["segments"][0]["compression_ratio"] > 0
    ours = d["whisfusion"]
    assert ours["model"] == "tiny" and ours["duration"] == 3725.25 and ours["file"] == "talk.wav"
    assert ours["decoding"] == {"steps": 4, "candidates": 15}
    assert [w["silent"] for w in ours["windows"]] == [False, True, False]  # the windows tile the audio


def test_openai_whisper_writers_read_our_json(tmp_path, result, timed):
    """openai-whisper's own writers turn our JSON into SRT/VTT/TSV: one cue per segment, our times."""
    from whisper.utils import get_writer as whisper_writer

    for res in (result, timed):
        doc = json.loads(writers.WriteJSON(".").render(res))
        out = tmp_path / res.output_name / ("words" if res.word_timestamps else "plain")
        out.mkdir(parents=True)
        options = {"max_line_width": None, "max_line_count": None, "highlight_words": False}
        for fmt in ("srt", "vtt", "tsv"):
            whisper_writer(fmt, str(out))(doc, "talk.wav", options)
        srt = parse_cues((out / "talk.srt").read_text(), SRT_TIME)
        assert [(round(a, 3), round(b, 3)) for a, b, _ in srt] == [(s.start, s.end) for s in res.segments]
        assert [t.strip() for _, _, t in srt] == [s.text.strip() if not s.words else
                                                 "".join(w.word for w in s.words).strip() for s in res.segments]
        vtt = (out / "talk.vtt").read_text()
        assert vtt.startswith("WEBVTT") and vtt.count(" --> ") == len(res.segments)  # (whisper's VTT drops 00: hours)
        tsv = (out / "talk.tsv").read_text().splitlines()
        assert len(tsv) == 1 + len(res.segments) and tsv[1].split("\t")[0] == str(round(res.segments[0].start * 1000))


def test_our_subtitles_parse_with_pysubs2(result, timed):
    import pysubs2

    for res in (result, timed):
        for fmt, writer in (("srt", writers.WriteSRT), ("vtt", writers.WriteVTT)):
            subs = pysubs2.SSAFile.from_string(writer(".").render(res), format_=fmt)
            assert [(e.start, e.end) for e in subs] == [(round(s.start * 1000), round(s.end * 1000))
                                                        for s in res.segments]
            assert [e.plaintext.strip() for e in subs] == [" ".join(s.text.split()) for s in res.segments]


def test_line_width_and_count_split_cues_by_word_times(timed):
    cues = subtitle_cues(timed, SubtitleOptions(max_line_width=20, max_line_count=1))
    assert all(len(line) <= 20 for _, _, text in cues for line in text.split("\n"))
    assert all("\n" not in text for _, _, text in cues)
    assert cues[0] == (0.5, 1.2, "Ask not.")  # a short segment stays one cue
    long = cues[1:]
    assert len(long) == 4 and " ".join(t for _, _, t in long) == timed.segments[1].text
    assert long[0][0] == 2.0 and long[-1][1] == 6.7
    assert all(a[1] == b[0] for a, b in zip(long, long[1:]))  # a cue ends where the next one's first word starts
    assert long[1][0] == timed.segments[1].words[3].start
    two = subtitle_cues(timed, SubtitleOptions(max_line_width=20, max_line_count=2))
    assert len(two) == 3 and two[1][2].count("\n") == 1


def test_highlight_words_underlines_one_word_per_cue(timed):
    cues = subtitle_cues(timed, SubtitleOptions(highlight_words=True))
    assert sum(t.count("<u>") for _, _, t in cues) == 14 and all(t.count("<u>") <= 1 for _, _, t in cues)
    assert cues[0] == (0.5, 0.8, "<u>Ask</u> not.")
    assert all(a <= b for a, b, _ in cues) and all(x[1] <= y[0] for x, y in zip(cues, cues[1:]))
    with pytest.raises(ValueError, match="needs --max-line-width"):
        SubtitleOptions(max_line_count=2)


def test_run_record_round_trip(tmp_path):
    assert read_record(tmp_path, "sub/talk") is None
    path = write_record(tmp_path, "sub/talk", {"settings": {"steps": 4}})
    assert path == tmp_path / "sub" / ".talk.whisfusion-run"
    assert read_record(tmp_path, "sub/talk") == {"settings": {"steps": 4}}
    path.write_text("{broken")
    assert read_record(tmp_path, "sub/talk") is None


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


def _result(text: str) -> TranscriptionResult:
    return TranscriptionResult("talk.wav", "talk", segments=[Segment(0, 0.0, 2.0, text)])


def test_an_interrupted_write_never_leaves_a_partial_transcript(tmp_path, monkeypatch):
    write = get_writer("txt", tmp_path)
    old = _result("old complete transcript")
    (target,) = write(old, "out")

    def crash(src, dst):
        raise KeyboardInterrupt  # Ctrl-C between writing the temp file and renaming it

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        write(_result("new transcript that never lands " * 1000), "out")
    monkeypatch.undo()
    assert target.read_text() == "old complete transcript\n"
    assert os.listdir(tmp_path) == ["out.txt"]
