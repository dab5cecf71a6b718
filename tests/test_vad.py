"""vad.py: Silero streaming parity, window invariants (contiguous, covering, <= 30 s), cuts inside pauses,
silence flagged, streaming == whole, the energy fallback and fixed windows."""

import json
import os

import numpy as np
import pytest

from whisfusion_cli import vad
from whisfusion_cli.audio import load_audio
from whisfusion_cli.vad import FRAME_SAMPLES, VadOptions, WindowPlanner, iter_windows, plan_windows

SR = 16000
AUDIO = os.path.join(os.path.dirname(__file__), "data", "audio")
CLIPS = ["librivox_0890.flac", "cards_005.flac", "librivox_0880.flac", "forever.flac", "jfk.wav",
         "librivox_0930.flac", "goforward.flac", "cards_002.flac", "cards_001.flac"]


def check_tiling(windows, n_samples, max_s=30.0):
    assert windows, "no windows"
    assert windows[0].start_sample == 0 and windows[-1].end_sample == n_samples
    for a, b in zip(windows, windows[1:]):
        assert a.end_sample == b.start_sample, f"gap/overlap at {a.end} / {b.start}"
    for w in windows:
        assert 0 < w.end_sample - w.start_sample <= max_s * SR, w


@pytest.fixture(scope="module")
def speech_with_pauses():
    """~70 s of real speech: clips joined by 0.6 s pauses of faint noise (no pause long enough to split on),
    so every window boundary must be chosen inside a pause. Returns (audio, [(gap_start, gap_end) samples])."""
    rng = np.random.default_rng(0)
    parts, gaps, pos = [], [], 0
    while pos < 70 * SR:
        for name in CLIPS:
            x = load_audio(os.path.join(AUDIO, name))
            parts.append(x)
            pos += len(x)
            gap = (0.001 * rng.standard_normal(int(0.6 * SR))).astype(np.float32)
            gaps.append((pos, pos + len(gap)))
            parts.append(gap)
            pos += len(gap)
    return np.concatenate(parts), gaps


def quiet_at(audio, sample, speech_rms, half_width=0.04):
    seg = audio[max(0, sample - int(half_width * SR)) : sample + int(half_width * SR)]
    return np.sqrt(np.mean(seg**2)) < 0.1 * speech_rms


def test_silero_streaming_matches_faster_whisper():
    fw_vad = pytest.importorskip("faster_whisper.vad", reason="faster-whisper (test extra) not installed")
    x = load_audio(os.path.join(AUDIO, "jfk.wav"))
    n = len(x) // FRAME_SAMPLES * FRAME_SAMPLES
    ref = fw_vad.get_vad_model()(x[:n]).reshape(-1)
    det = vad.SileroDetector()
    ours = np.concatenate([det.process(x[i : i + 7777]) for i in range(0, n, 7777)])
    np.testing.assert_allclose(ours[: len(ref)], ref, atol=1e-6)
    assert (ref > 0.5).mean() > 0.5  # the clip is mostly speech: the comparison is not vacuous


@pytest.mark.parametrize("backend", ["silero", "energy"])
def test_long_speech_is_cut_inside_pauses(speech_with_pauses, backend):
    audio, gaps = speech_with_pauses
    windows = plan_windows(audio, VadOptions(backend=backend))
    check_tiling(windows, len(audio))
    assert len(windows) >= 3 and not any(w.silent for w in windows)
    speech_rms = float(np.sqrt(np.mean(audio**2)))
    in_gap = 0
    for w in windows[:-1]:
        cut = w.end_sample
        assert quiet_at(audio, cut, speech_rms), f"{backend}: cut at {cut / SR:.2f} s is inside speech"
        in_gap += any(a - 0.05 * SR <= cut <= b + 0.05 * SR for a, b in gaps)
    # Most cuts land in the inserted 0.6 s pauses (the clips' own pauses are shorter).
    assert in_gap >= (len(windows) - 1) * 0.6


def test_long_silence_becomes_a_silent_window():
    x = load_audio(os.path.join(AUDIO, "librivox_0890.flac"))
    silence = np.zeros(8 * SR, dtype=np.float32)
    audio = np.concatenate([x, silence, x])
    windows = plan_windows(audio)
    check_tiling(windows, len(audio))
    silent = [w for w in windows if w.silent]
    assert len(silent) == 1 and [w.silent for w in windows] == [False, True, False]
    # the silent window covers the inserted silence minus the padding kept around the words
    assert silent[0].start <= len(x) / SR + 0.6 and silent[0].end >= (len(x) + len(silence)) / SR - 0.6
    assert silent[0].duration >= 6.5


def test_speech_window_starts_a_pad_before_the_onset():
    """After a long silence the speech window begins speech_pad_s before the detected onset: 0.3 s by default
    (0.2 s clipped soft onsets such as JFK's "Ask"), so 0.2 s earlier than with a 0.1 s pad."""
    x = load_audio(os.path.join(AUDIO, "librivox_0890.flac"))
    silence = np.zeros(3 * SR, dtype=np.float32)
    audio = np.concatenate([silence, x, silence])
    default = VadOptions().speech_pad_s
    assert default == 0.3
    starts = {}
    for pad in (0.1, default):
        windows = plan_windows(audio, VadOptions(speech_pad_s=pad))
        check_tiling(windows, len(audio))
        assert windows[0].silent and not windows[1].silent
        starts[pad] = windows[1].start
    assert abs((starts[0.1] - starts[default]) - 0.2) <= FRAME_SAMPLES / SR + 1e-9
    assert starts[default] >= 3.0 - default - FRAME_SAMPLES / SR  # the clip's own leading silence counts too


@pytest.mark.parametrize("backend", ["silero", "energy"])
def test_quiet_noise_and_zeros_are_silent(backend):
    rng = np.random.default_rng(1)
    for audio in (np.zeros(75 * SR, np.float32), (3e-4 * rng.standard_normal(75 * SR)).astype(np.float32)):
        windows = plan_windows(audio, VadOptions(backend=backend))
        check_tiling(windows, len(audio))
        assert all(w.silent for w in windows)


def test_streaming_equals_whole(speech_with_pauses):
    audio, _ = speech_with_pauses
    whole = plan_windows(audio)
    for block in (4000, 16000 * 3 + 17, 16000 * 45):
        pairs = list(iter_windows((audio[i : i + block] for i in range(0, len(audio), block)), VadOptions()))
        assert [w for w, _ in pairs] == whole
        for w, samples in pairs:
            np.testing.assert_array_equal(samples, audio[w.start_sample : w.end_sample])


def planner_windows(probs, total_samples=None, **kw):
    p = WindowPlanner(VadOptions(**kw))
    ws = p.feed(probs)
    return ws + p.finish(total_samples if total_samples is not None else len(probs) * FRAME_SAMPLES)


def frames(seconds):
    return int(round(seconds / vad.FRAME_SECONDS))


def test_planner_prefers_latest_clear_pause_then_longest_then_lowest():
    n = frames(100)
    # continuous speech with clear pauses at 12 s and 25 s: the cut for length takes the later one
    probs = np.full(n, 0.9)
    for t in (12.0, 25.0):
        probs[frames(t) : frames(t + 0.4)] = 0.05
    ws = planner_windows(probs)
    assert 25.0 <= ws[0].end <= 25.4
    # only short pauses (0.1 s): the longest wins
    probs = np.full(n, 0.9)
    probs[frames(14) : frames(14.2)] = 0.05
    probs[frames(22) : frames(22.1)] = 0.05
    ws = planner_windows(probs)
    assert 14.0 <= ws[0].end <= 14.2
    # no pause at all: the least speech-like frame (a dip that stays above the threshold)
    probs = np.full(n, 0.95)
    probs[frames(17.5)] = 0.6
    ws = planner_windows(probs)
    assert abs(ws[0].end - 17.5) < 0.1
    for ws in (planner_windows(np.full(n, 0.95)),):
        check_tiling(ws, n * FRAME_SAMPLES)


def test_planner_invariants_on_random_probabilities():
    rng = np.random.default_rng(3)
    for trial in range(60):
        n_frames = int(rng.integers(1, frames(140)))
        probs = []
        while len(probs) < n_frames:
            length = int(rng.geometric(1 / rng.choice([5, 30, 150])))
            probs += [float(rng.choice([0.02, 0.4, 0.7, 0.97]))] * length
        probs = np.array(probs[:n_frames])
        total = n_frames * FRAME_SAMPLES - int(rng.integers(0, FRAME_SAMPLES))
        max_window = float(rng.choice([30.0, 12.0]))
        ws = planner_windows(probs, total, max_window_s=max_window, min_cut_s=min(10.0, max_window))
        check_tiling(ws, total, max_s=max_window)


def test_empty_and_tiny_inputs():
    assert plan_windows(np.zeros(0, np.float32)) == []
    one = plan_windows(np.ones(1, np.float32) * 0.1)
    check_tiling(one, 1)
    exact = plan_windows(np.zeros(30 * SR, np.float32))
    check_tiling(exact, 30 * SR)


def test_energy_fallback_when_onnxruntime_is_missing(monkeypatch, speech_with_pauses):
    monkeypatch.setattr(vad, "silero_available", lambda path=vad.SILERO_MODEL: False)
    assert isinstance(vad.make_detector(VadOptions()), vad.EnergyDetector)
    with pytest.raises(RuntimeError, match="onnxruntime"):
        vad.make_detector(VadOptions(backend="silero"))
    audio, _ = speech_with_pauses
    check_tiling(plan_windows(audio), len(audio))


def test_fixed_windows_without_vad():
    x = load_audio(os.path.join(AUDIO, "jfk.wav"))
    audio = np.concatenate([np.tile(x, 7), np.zeros(31 * SR, np.float32)])
    pairs = list(iter_windows([audio], VadOptions(enabled=False)))
    ws = [w for w, _ in pairs]
    check_tiling(ws, len(audio))
    assert all(w.duration == 30.0 for w in ws[:-1])
    assert ws[-1].silent and not ws[0].silent  # only digital silence is skipped without a VAD


def test_speech_timestamps_find_the_words():
    x = load_audio(os.path.join(AUDIO, "librivox_0880.flac"))
    audio = np.concatenate([np.zeros(2 * SR, np.float32), x, np.zeros(2 * SR, np.float32)])
    ts = vad.speech_timestamps(audio)
    assert ts and ts[0][0] >= 1.8 and ts[-1][1] <= 2 + len(x) / SR + 0.3


def test_options_are_validated():
    with pytest.raises(ValueError, match="backend"):
        VadOptions(backend="webrtc")
    with pytest.raises(ValueError, match="max_window_s"):
        VadOptions(max_window_s=45)
    with pytest.raises(ValueError, match="threshold"):
        VadOptions(threshold=1.5)


def test_transcripts_file_lists_the_clips():
    refs = json.loads(open(os.path.join(AUDIO, "transcripts.json")).read())
    assert set(CLIPS) <= set(refs)
