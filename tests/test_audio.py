"""audio.py: decoding every supported container to 16 kHz mono, streaming equal to whole-file reading,
bounded memory, one-line errors, and input expansion."""

import os
import subprocess
import tracemalloc
import wave

import numpy as np
import pytest
import soundfile as sf

from whisfusion_cli import audio
from whisfusion_cli.audio import AudioError, expand_inputs, load_audio, stream_audio

AUDIO = os.path.join(os.path.dirname(__file__), "data", "audio")
JFK = os.path.join(AUDIO, "jfk.wav")


def test_constants_are_whispers_and_derived():
    assert audio.SAMPLE_RATE == 16000 and audio.N_FFT == 400 and audio.HOP_LENGTH == 160
    assert audio.N_SAMPLES == audio.CHUNK_LENGTH * audio.SAMPLE_RATE == 480000
    assert audio.N_FRAMES == 3000 and audio.FRAMES_PER_SECOND == 100 and audio.ENCODER_FRAMES_PER_SECOND == 50
    assert {".wav", ".flac", ".ogg", ".mp3"} <= audio.AUDIO_EXTENSIONS


def test_wav_and_flac_read_exactly():
    x = load_audio(JFK)
    ref, sr = sf.read(JFK, dtype="float32")
    assert sr == 16000 and x.dtype == np.float32 and x.ndim == 1
    np.testing.assert_array_equal(x, ref)
    y = load_audio(os.path.join(AUDIO, "goforward.flac"))
    assert abs(len(y) / 16000 - 2.786) < 0.01


@pytest.fixture(scope="module")
def stereo_44k(tmp_path_factory):
    """JFK at 44.1 kHz, stereo with different channels, float WAV."""
    import librosa

    x, _ = sf.read(JFK, dtype="float32")
    y = librosa.resample(x, orig_sr=16000, target_sr=44100)
    stereo = np.stack([y, 0.5 * y], axis=1)
    path = tmp_path_factory.mktemp("a") / "stereo44k.wav"
    sf.write(path, stereo, 44100, subtype="FLOAT")
    return path, stereo


def test_stereo_is_mixed_down_and_resampled_like_librosa(stereo_44k):
    import librosa

    path, stereo = stereo_44k
    x = load_audio(path)
    ref = librosa.resample(stereo.mean(axis=1), orig_sr=44100, target_sr=16000, res_type="soxr_hq")
    assert len(x) == len(ref) == 176000
    np.testing.assert_allclose(x, ref, atol=1e-5)


@pytest.mark.parametrize("block_seconds", [0.37, 1.0, 7.5])
def test_streaming_equals_whole_file(stereo_44k, block_seconds):
    path, _ = stereo_44k
    whole = load_audio(path)
    blocks = list(stream_audio(path, block_seconds))
    size = int(round(block_seconds * 16000))
    assert all(len(b) == size for b in blocks[:-1]) and 0 < len(blocks[-1]) <= size
    np.testing.assert_array_equal(np.concatenate(blocks), whole)


@pytest.mark.parametrize("fmt,subtype,ext", [("OGG", "VORBIS", "ogg"), ("OGG", "OPUS", "opus"), ("MP3", None, "mp3"),
                                             ("FLAC", "PCM_24", "flac")])
def test_compressed_formats(tmp_path, fmt, subtype, ext):
    x, _ = sf.read(JFK, dtype="float32")
    path = tmp_path / f"jfk.{ext}"
    sr = 48000 if ext == "opus" else 22050 if ext == "mp3" else 16000
    import librosa

    sf.write(path, librosa.resample(x, orig_sr=16000, target_sr=sr), sr, format=fmt, subtype=subtype)
    y = load_audio(path)
    # Codecs add delay/padding of a few ms and change the waveform; duration and loudness survive.
    assert abs(len(y) / 16000 - 11.0) < 0.1
    assert 0.8 < np.sqrt(np.mean(y**2)) / np.sqrt(np.mean(x**2)) < 1.25
    assert abs(audio.audio_duration(path) - 11.0) < 0.1


@pytest.mark.skipif(audio.ffmpeg_executable() is None, reason="no ffmpeg (the test extra installs imageio-ffmpeg)")
def test_m4a_through_ffmpeg_streams(tmp_path):
    m4a = tmp_path / "jfk.m4a"
    subprocess.run([audio.ffmpeg_executable(), "-nostdin", "-v", "error", "-i", JFK, str(m4a)], check=True)
    y = load_audio(m4a)
    assert abs(len(y) / 16000 - 11.0) < 0.1
    blocks = list(stream_audio(m4a, 2.0))
    np.testing.assert_array_equal(np.concatenate(blocks), y)
    assert abs(audio.audio_duration(m4a) - 11.0) < 0.1  # from ffprobe, or ffmpeg's header line without it


def _header_only_wav(path):
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
    return path


def test_errors_are_one_line_and_name_the_file(tmp_path):
    cases = {}
    cases["missing"] = tmp_path / "missing.wav"
    (tmp_path / "adir.wav").mkdir()
    cases["directory"] = tmp_path / "adir.wav"
    cases["zero bytes"] = tmp_path / "zero.wav"
    cases["zero bytes"].write_bytes(b"")
    cases["text"] = tmp_path / "notes.wav"
    cases["text"].write_text("this is not audio at all\n" * 20)
    cases["no samples"] = _header_only_wav(tmp_path / "header_only.wav")
    nan = tmp_path / "nan.wav"
    sf.write(nan, np.array([0.1, np.nan, 0.2] * 1000, dtype=np.float32), 16000, subtype="FLOAT")
    cases["nan"] = nan
    expected = {"missing": "no such file", "directory": "is a directory", "zero bytes": "empty file",
                "text": "not an audio file", "no samples": "empty audio", "nan": "NaN"}
    for key, path in cases.items():
        with pytest.raises(AudioError) as info:
            load_audio(path)
        message = str(info.value)
        assert message.startswith(str(path)), message
        assert "\n" not in message and expected[key] in message, message


def test_truncated_flac_is_reported_or_short(tmp_path):
    data = (tmp_path / "x").parent / "cut.flac"
    raw = open(os.path.join(AUDIO, "librivox_0890.flac"), "rb").read()
    data.write_bytes(raw[: len(raw) // 2])
    # libsndfile either stops at the damage (fewer samples) or fails with a one-line error; never garbage.
    try:
        y = load_audio(data)
    except AudioError as e:
        assert str(e).startswith(str(data)) and "\n" not in str(e)
    else:
        assert 0 < len(y) < 5.3 * 16000 and np.all(np.isfinite(y))


def test_stream_memory_is_bounded(tmp_path):
    """A 6-minute 44.1 kHz file is streamed with a peak far below its decoded size."""
    rng = np.random.default_rng(0)
    path = tmp_path / "long.flac"
    with sf.SoundFile(path, "w", samplerate=44100, channels=2, format="FLAC") as f:
        for _ in range(36):  # 36 x 10 s
            f.write((0.1 * rng.standard_normal((441000, 2))).astype(np.float32))
    decoded_bytes = 360 * 16000 * 4  # float32 mono 16 kHz: 23 MB
    tracemalloc.start()
    n = 0
    for block in stream_audio(path, 5.0):
        n += len(block)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert n == 360 * 16000
    assert peak < decoded_bytes / 4, f"peak {peak / 1e6:.1f} MB while streaming"


def test_expand_inputs(tmp_path):
    x, _ = sf.read(JFK, dtype="float32")
    (tmp_path / "a" / "sub").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    for rel in ["a/one.wav", "a/sub/two.flac", "b/one.wav", "b/dup.wav", "b/dup.flac"]:
        sf.write(tmp_path / rel, x[:1600], 16000)
    (tmp_path / "a" / "readme.txt").write_text("not audio")
    files, problems = expand_inputs([tmp_path / "a", tmp_path / "b", tmp_path / "a" / "one.wav",
                                     str(tmp_path / "b" / "*.wav"), tmp_path / "nope.wav", str(tmp_path / "zz*.mp3")])
    paths = [f.path.relative_to(tmp_path).as_posix() for f in files]
    # directory matches sorted, audio only, each file once (the explicit a/one.wav and the glob repeat)
    assert paths == ["a/one.wav", "a/sub/two.flac", "b/dup.flac", "b/dup.wav", "b/one.wav"]
    names = [f.output_name for f in files]
    # colliding names are qualified by their folder (a/one, b/one), then by extension (b/dup.flac, b/dup.wav)
    assert names == ["a/one", "sub/two", "b/dup.flac", "b/dup.wav", "b/one"]
    reasons = sorted(str(p) for p in problems)
    assert any("nope.wav: no such file" in r for r in reasons)
    assert any("zz*.mp3: no audio files match" in r for r in reasons)


def test_explicit_non_audio_file_is_kept_for_reporting(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("hello")
    files, problems = expand_inputs([p])
    assert [f.path for f in files] == [p] and not problems
    with pytest.raises(AudioError, match="not an audio file"):
        load_audio(p)
