"""transcribe.py: the batch driver over real speech with a tiny random model — order, segments that tile
the audio, batching invariance, long audio in bounded memory, silence never decoded, per-file errors,
resume after an interrupt, device/dtype rules."""

import json
import os
import tracemalloc
import wave
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from tiny_model import make_model_dir
from whisfusion_cli import transcribe as tr
from whisfusion_cli.audio import load_audio
from whisfusion_cli.devices import resolve_device
from whisfusion_cli.display import Reporter
from whisfusion_cli.loading import Pipeline
from whisfusion_cli.transcribe import TranscribeOptions, transcribe
from whisfusion_cli.vad import VadOptions

AUDIO = Path(__file__).parent / "data" / "audio"
SR = 16000


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def model(model_dir):
    from whisfusion_cli.loading import load_model

    torch.set_num_threads(1)
    return load_model(str(model_dir))


def check_segments_tile(result, max_window=30.0, max_segment=tr.MAX_SEGMENT_SECONDS):
    """The windows tile the audio; the segments lie in order inside their windows, none longer than the
    longest segment, numbered from 0."""
    wins = result.windows
    assert wins and wins[0].start == 0.0 and abs(wins[-1].end - result.duration) < 1e-9
    for a, b in zip(wins, wins[1:]):
        assert a.end == b.start, f"{result.path}: gap or overlap at {a.end}/{b.start}"
    assert all(0 < w.end - w.start <= max_window for w in wins)
    segs = result.segments
    assert [s.id for s in segs] == list(range(len(segs)))
    for s in segs:
        w = wins[s.window]
        assert not w.silent and w.start - 1e-9 <= s.start <= s.end <= w.end + 1e-9 and s.text
        assert s.end - s.start <= max_segment + 1e-9 and s.seek == round(w.start * 100)
    assert all(a.end <= b.start + 1e-9 for a, b in zip(segs, segs[1:]))


def test_real_clips_in_input_order(model):
    results = list(transcribe([AUDIO], TranscribeOptions(decoding={"seed": 0}), model=model))
    names = sorted(p.name for p in AUDIO.iterdir() if p.suffix in (".wav", ".flac"))
    assert [Path(r.path).name for r in results] == names
    for r in results:
        assert r.status == "ok", r.error
        check_segments_tile(r)
        assert abs(r.duration - sf.info(r.path).duration) < 1e-3
        assert r.text and all(isinstance(s.score, float) and s.avg_logprob <= 0 for s in r.segments)
        assert r.model == model.name and r.decoding["seed"] == 0 and r.decoding["candidates"] == 2


def test_batch_composition_does_not_change_a_file(model):
    files = [AUDIO / "jfk.wav", AUDIO / "cards_005.flac", AUDIO / "librivox_0890.flac"]
    texts = {}
    for batch_size in (1, 2, 8):
        opts = TranscribeOptions(batch_size=batch_size, decoding={"seed": 3})
        texts[batch_size] = [[s.text for s in r.segments] for r in transcribe(files, opts, model=model)]
    assert texts[1] == texts[2] == texts[8]
    alone = [s.text for s in next(transcribe([files[1]], TranscribeOptions(decoding={"seed": 3}), model=model)).segments]
    assert alone == texts[8][1]


def test_windows_are_pooled_for_the_decoder_within_one_batch_of_encoder_states(model, tmp_path, monkeypatch):
    """Windows are gathered across files (up to POOL_BATCHES batches, at most one batch of 30 s windows'
    encoder states) so the decoder sorts them by length into batches of batch_size."""
    calls = []
    real_decode = Pipeline.decode

    def recording_decode(self, conditions, durations, seeds, batch_size, *args):
        calls.append((len(conditions), sum(c.size(0) for c in conditions), batch_size))
        return real_decode(self, conditions, durations, seeds, batch_size, *args)

    monkeypatch.setattr(Pipeline, "decode", recording_decode)
    files = [AUDIO / name for name in ("cards_001.flac", "cards_002.flac", "goforward.flac", "forever.flac",
                                       "cards_003.flac", "jfk.wav")]
    results = list(transcribe(files, TranscribeOptions(batch_size=2, decoding={"seed": 0}), model=model))
    assert [r.status for r in results] == ["ok"] * len(files)
    assert max(n for n, _, _ in calls) > 2 and {b for _, _, b in calls} == {2}
    assert all(n <= 2 * tr.POOL_BATCHES and frames <= 2 * 1500 for n, frames, _ in calls)
    # And the pool changes nothing in a file's transcript (padding changes only the float rounding).
    for path, r in zip(files, results):
        alone = next(transcribe([path], TranscribeOptions(batch_size=1, decoding={"seed": 0}), model=model))
        assert [s.text for s in alone.segments] == [s.text for s in r.segments]


def long_recording(path: Path, minutes: float) -> float:
    """Real clips with short pauses and, every ~minute, 5 s of silence; written block by block as FLAC."""
    clips = [load_audio(p) for p in sorted(AUDIO.iterdir()) if p.suffix in (".wav", ".flac")]
    rng = np.random.default_rng(0)
    n = 0
    with sf.SoundFile(path, "w", samplerate=SR, channels=1, format="FLAC") as f:
        while n < minutes * 60 * SR:
            for clip in clips:
                pause = (0.001 * rng.standard_normal(int(rng.uniform(0.4, 0.9) * SR))).astype(np.float32)
                f.write(clip)
                f.write(pause)
                n += len(clip) + len(pause)
            silence = np.zeros(5 * SR, dtype=np.float32)
            f.write(silence)
            n += len(silence)
    return n / SR


def test_long_audio_windows_tile_and_memory_is_bounded(model, tmp_path):
    short, long_ = tmp_path / "short.flac", tmp_path / "long.flac"
    long_recording(short, 3)
    d_long = long_recording(long_, 16)
    peaks, results = {}, {}
    for name, path in (("short", short), ("long", long_)):
        tracemalloc.start()
        results[name] = list(transcribe([path], TranscribeOptions(batch_size=4, decoding={"seed": 0}), model=model))
        peaks[name] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    r = results["long"][0]
    assert r.status == "ok" and abs(r.duration - d_long) < 1e-6
    check_segments_tile(r)
    assert len(r.segments) >= d_long / 30
    silent = [w for w in r.windows if w.silent]
    assert len(silent) >= 8 and all(w.score is None for w in silent)
    assert not {s.window for s in r.segments} & {w.id for w in silent}
    # Memory does not grow with the length of the file: 5x the audio, about the same peak (the batch's
    # windows and their features), and well under the decoded file (16 min of float32 at 16 kHz = 62 MB), which
    # loading the file whole would need at least once.
    assert peaks["long"] < 1.25 * peaks["short"] + 2e6, peaks
    assert peaks["long"] < 0.75 * d_long * SR * 4, peaks


def test_silence_yields_empty_transcript_without_the_decoder(model, tmp_path, monkeypatch):
    calls = []
    real_decode = Pipeline.decode

    def counting_decode(self, conditions, *args):
        calls.append(len(conditions))
        return real_decode(self, conditions, *args)

    monkeypatch.setattr(Pipeline, "decode", counting_decode)
    rng = np.random.default_rng(0)
    sf.write(tmp_path / "zeros.wav", np.zeros(40 * SR, np.float32), SR)
    sf.write(tmp_path / "hiss.wav", (2e-4 * rng.standard_normal(12 * SR)).astype(np.float32), SR)
    out = tmp_path / "out"
    results = list(transcribe([tmp_path / "zeros.wav", tmp_path / "hiss.wav"],
                              TranscribeOptions(output_dir=out, output_format="all"), model=model))
    assert [r.status for r in results] == ["silent", "silent"] and calls == []
    for r in results:
        assert r.text == "" and r.segments == [] and all(w.silent for w in r.windows)
        check_segments_tile(r)
    assert (out / "zeros.txt").read_text() == "" and (out / "zeros.json").is_file()


def _write_bad_files(d: Path):
    x = load_audio(AUDIO / "goforward.flac")
    bad = {}
    (d / "notes.wav").write_text("not audio\n" * 50)
    bad["notes.wav"] = "not an audio file"
    (d / "zero.wav").write_bytes(b"")
    bad["zero.wav"] = "empty file"
    with wave.open(str(d / "header_only.wav"), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(SR)
    bad["header_only.wav"] = "empty audio"
    sf.write(d / "blip.wav", x[: int(0.05 * SR)], SR)
    bad["blip.wav"] = "too short"
    raw = (AUDIO / "librivox_0880.flac").read_bytes()
    (d / "cut.flac").write_bytes(raw[:40])
    bad["cut.flac"] = "not an audio file"
    return bad


def test_bad_files_each_get_one_line_and_the_rest_finish(model, tmp_path):
    bad = _write_bad_files(tmp_path)
    for name in ("cards_001.flac", "goforward.flac"):
        (tmp_path / name).write_bytes((AUDIO / name).read_bytes())
    results = list(transcribe([tmp_path, tmp_path / "missing.wav"], TranscribeOptions(), model=model))
    by_name = {Path(r.path).name: r for r in results}
    assert by_name["missing.wav"].status == "error" and "no such file" in by_name["missing.wav"].error
    for name, reason in bad.items():
        r = by_name[name]
        assert r.status == "error" and reason in r.error and r.error.startswith(str(tmp_path / name)), r.error
        assert "\n" not in r.error
    assert by_name["cards_001.flac"].status == by_name["goforward.flac"].status == "ok"


class InterruptAfter(Reporter):
    def __init__(self, n):
        self.n = n
        self.done = 0

    def file_done(self, result):
        self.done += 1
        if self.done == self.n:
            raise KeyboardInterrupt


def test_interrupted_batch_resumes(model, tmp_path):
    files = [AUDIO / n for n in ("cards_001.flac", "cards_002.flac", "forever.flac")]
    out = tmp_path / "out"
    opts = TranscribeOptions(output_dir=out, output_format="srt,json", decoding={"seed": 0})
    with pytest.raises(KeyboardInterrupt):
        list(transcribe(files, opts, model=model, reporter=InterruptAfter(2)))
    names = sorted(os.listdir(out))
    assert names == [".cards_001.whisfusion-run", ".cards_002.whisfusion-run", "cards_001.json", "cards_001.srt",
                     "cards_002.json", "cards_002.srt"]  # complete, each with its record, no temps
    mtime = (out / "cards_001.json").stat().st_mtime_ns
    results = list(transcribe(files, opts, model=model))
    assert [r.status for r in results] == ["skipped", "skipped", "ok"]
    assert (out / "cards_001.json").stat().st_mtime_ns == mtime and (out / "forever.srt").is_file()
    results = list(transcribe(files[:1], TranscribeOptions(output_dir=out, output_format="srt,json", overwrite=True),
                              model=model))
    assert results[0].status == "ok" and (out / "cards_001.json").stat().st_mtime_ns != mtime


def test_no_vad_uses_fixed_windows(model, tmp_path):
    x = load_audio(AUDIO / "jfk.wav")
    sf.write(tmp_path / "jfk6.wav", np.tile(x, 6), SR)  # 66 s
    r = next(transcribe([tmp_path / "jfk6.wav"], TranscribeOptions(vad=VadOptions(enabled=False)), model=model))
    check_segments_tile(r)
    assert [round(w.end - w.start, 3) for w in r.windows] == [30.0, 30.0, 6.0]


def test_decoding_overrides_and_schedule(model):
    r = next(transcribe([AUDIO / "cards_001.flac"],
                        TranscribeOptions(decoding={"steps": 3, "candidates": 3, "schedule": [1, 0.5],
                                                    "seq_len": 20, "selection": "mbr", "seed": 1}), model=model))
    assert r.decoding["steps"] == 3 and r.decoding["candidates"] == 3 and r.decoding["schedule"] == [1.0, 0.5]
    assert r.decoding["seq_len"] == 20 and r.decoding["selection"] == "mbr"
    with pytest.raises(ValueError, match="unknown decoding option"):
        list(transcribe([AUDIO / "cards_001.flac"], TranscribeOptions(decoding={"beam": 5}), model=model))


def test_device_and_dtype_rules():
    dev, dtype = resolve_device("cpu", "auto")
    assert dev.type == "cpu" and dtype == torch.float32
    for bad in ("bfloat16", "fp16"):
        with pytest.raises(ValueError, match="only supported on a GPU"):
            resolve_device("cpu", bad)
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_device("cpu", "int4")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu", "auto")
    if torch.cuda.is_available():
        dev, dtype = resolve_device("auto", "auto")
        assert dev.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
    else:
        assert resolve_device("auto", "auto")[0].type == "cpu"
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_device("cuda", "auto")


def test_options_are_validated(tmp_path):
    with pytest.raises(ValueError):
        TranscribeOptions(batch_size=0)
    with pytest.raises(ValueError, match="unknown output format"):
        TranscribeOptions(output_dir=tmp_path, output_format="doc")


def test_arrays_and_file_objects_give_the_same_text_as_their_files(model):
    wav, flac = AUDIO / "jfk.wav", AUDIO / "cards_005.flac"
    opts = TranscribeOptions(decoding={"seed": 0})
    from_files = [r.text for r in transcribe([wav, flac], opts, model=model)]
    with open(flac, "rb") as f:
        results = list(transcribe([load_audio(wav), f, np.zeros((2, 100), np.float32), wav], opts, model=model))
    assert [r.path for r in results] == ["<array 0>", str(flac), "<array 2>", str(wav)]
    assert [r.text for r in results[:2]] == from_files and results[3].text == from_files[0]
    assert results[2].status == "error" and "mono float32 array" in results[2].error and "\n" not in results[2].error
    import io

    junk = next(transcribe(io.BytesIO(b"not audio" * 100), opts, model=model))
    assert junk.status == "error" and junk.path == "<stream 0>" and "soundfile can read" in junk.error
    assert "\n" not in junk.error
    one = next(transcribe(load_audio(wav).astype(np.float64), opts, model=model))  # a bare array, float64
    assert one.text == from_files[0] and abs(one.duration - sf.info(wav).duration) < 1e-3


def test_rerun_with_other_settings_redoes_the_file_and_says_why(model_dir, model, tmp_path):
    out = tmp_path / "out"
    files = [AUDIO / "cards_001.flac", AUDIO / "cards_002.flac"]

    def run(**decoding):
        opts = TranscribeOptions(model=str(model_dir), output_dir=out, output_format="txt,json",
                                 decoding={"seed": 0, **decoding})
        return list(transcribe(files, opts))

    assert [r.status for r in run(steps=2)] == ["ok", "ok"]
    again = run(steps=2)
    assert [r.status for r in again] == ["skipped", "skipped"] and not again[0].notes
    redone = run(steps=3)
    assert [r.status for r in redone] == ["ok", "ok"]
    assert "other settings (decoding.steps 2 -> 3)" in redone[0].notes[0] and "transcribing again" in redone[0].notes[0]
    doc = json.loads((out / "cards_001.json").read_text())
    assert doc["whisfusion"]["decoding"]["steps"] == 3
    (out / ".cards_002.whisfusion-run").unlink()  # outputs from an older version, or written by hand
    last = run(steps=3)
    assert [r.status for r in last] == ["skipped", "ok"] and "no record" in last[1].notes[0]


def test_records_made_before_the_retired_decoding_fields_went_still_match(model, tmp_path):
    """A record written while DecodingOptions had `fast`, `blocks` and `cut_at_pad` holds them with their one
    value, and lacks the fields added since: the same settings, so a rerun after the upgrade skips the input;
    another value is other settings."""
    from whisfusion_cli.decoding import RETIRED_FIELDS
    from whisfusion_cli.decoding_options import ADDED_FIELDS
    from whisfusion_cli.writers import read_record, write_record

    out, files = tmp_path / "out", [AUDIO / "cards_001.flac"]
    opts = TranscribeOptions(output_dir=out, output_format="txt", decoding={"seed": 0})
    pipeline = Pipeline(model, opts.decoding)  # its record holds every decoding field, as those records did
    assert [r.status for r in transcribe(files, opts, model=pipeline)] == ["ok"]
    record = read_record(out, "cards_001")
    assert "steps" in record["settings"]["decoding"] and not set(record["settings"]["decoding"]) & set(RETIRED_FIELDS)
    record["settings"]["decoding"].update(RETIRED_FIELDS)
    for name in ADDED_FIELDS:  # nor the fields added since
        del record["settings"]["decoding"][name]
    write_record(out, "cards_001", record)
    again = list(transcribe(files, opts, model=pipeline))
    assert [r.status for r in again] == ["skipped"] and not again[0].notes
    record["settings"]["decoding"]["blocks"] = 3  # a value nothing honours now
    write_record(out, "cards_001", record)
    redone = list(transcribe(files, opts, model=pipeline))
    assert [r.status for r in redone] == ["ok"] and "other settings (decoding.blocks 3 -> null)" in redone[0].notes[0]


def test_word_timestamps_lie_in_their_segments_in_order(model):
    opts = TranscribeOptions(decoding={"seed": 0}, word_timestamps=True, max_segment_s=3.0)
    for r in transcribe([AUDIO / "jfk.wav", AUDIO / "librivox_0890.flac"], opts, model=model):
        check_segments_tile(r, max_segment=3.0)
        words = [w for s in r.segments for w in s.words]
        assert words and all(w.word.startswith(" ") and 0 <= w.probability <= 1 for w in words)
        assert all(a.start <= b.start for a, b in zip(words, words[1:]))
        for s in r.segments:
            # A segment is its words' span, at least one encoder frame (20 ms) long.
            assert s.words[0].start == s.start and s.words[-1].end <= s.end <= max(s.words[-1].end, s.start + 0.02)
            assert all(s.start <= w.start <= w.end <= s.end for w in s.words)
        doc = r.to_dict()
        assert all(len(d["words"]) == len(s.words) for d, s in zip(doc["segments"], r.segments))
        assert doc["whisfusion"]["word_timestamps"] is True
    with pytest.raises(ValueError, match="needs --word-timestamps"):
        TranscribeOptions(subtitles=tr.SubtitleOptions(highlight_words=True))


def test_out_of_device_memory_in_a_batch_loses_nothing(model, tmp_path, monkeypatch):
    """An encoder or decoder batch too big for the GPU is retried in halves: the run finishes with every
    file's transcript, the same as with room to spare."""
    from whisfusion_cli import decoding

    files = [AUDIO / n for n in ("cards_001.flac", "cards_002.flac", "forever.flac")]
    opts = TranscribeOptions(output_dir=tmp_path / "roomy", output_format="txt", decoding={"seed": 0})
    roomy = [r.text for r in transcribe(files, opts, model=model)]
    encode, decode_batch = model.encoder.encode, decoding._decode_batch
    sizes = {"encode": [], "decode": []}

    def small_encoder(clips):
        sizes["encode"].append(len(clips))
        if len(clips) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return encode(clips)

    def small_decoder(decoder, forward, W, *args, **kwargs):
        sizes["decode"].append(W)
        if W > 1:
            raise RuntimeError("CUDA error: out of memory")
        return decode_batch(decoder, forward, W, *args, **kwargs)

    monkeypatch.setattr(model.encoder, "encode", small_encoder)
    monkeypatch.setattr(decoding, "_decode_batch", small_decoder)
    out = tmp_path / "tight"
    results = list(transcribe(files, TranscribeOptions(output_dir=out, output_format="txt", decoding={"seed": 0}),
                              model=model))
    assert [r.status for r in results] == ["ok"] * 3 and [r.text for r in results] == roomy
    assert max(sizes["encode"]) > 1 and max(sizes["decode"]) > 1  # the batches were too big at first
    assert sorted(n for n in os.listdir(out) if n[0] != ".") == ["cards_001.txt", "cards_002.txt", "forever.txt"]
