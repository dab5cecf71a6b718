"""A model can ask for shorter VAD windows than the encoder's 30 s (audio.max_window_s in its config)."""

import json
from pathlib import Path

import numpy as np
import pytest

from whisfusion_cli.transcribe import TranscribeOptions, transcribe
from whisfusion_cli.vad import VadOptions, iter_windows

from tiny_model import make_model_dir

AUDIO = Path(__file__).parent / "data" / "audio"


def test_min_cut_equal_to_max_window_does_not_crash():
    rng = np.random.default_rng(0)
    speech_like = (rng.standard_normal(16000 * 25) * 0.3).astype(np.float32)  # no pause anywhere
    opts = VadOptions(backend="energy", max_window_s=10.0, min_cut_s=10.0)
    windows = [w for w, _ in iter_windows([speech_like], opts)]
    assert windows[0].start == 0 and windows[-1].end_sample == len(speech_like)
    assert all(w.duration <= 10.0 + 1e-9 for w in windows)


def test_model_config_limits_the_window_length(tmp_path):
    import soundfile as sf

    model_dir = make_model_dir(tmp_path)
    config = json.loads((model_dir / "config.json").read_text())
    config["audio"] = {"max_window_s": 8.0}
    (model_dir / "config.json").write_text(json.dumps(config))
    clip, sr = sf.read(AUDIO / "jfk.wav", dtype="float32")
    long_clip = np.concatenate([clip, clip, clip])  # 33 s of continuous speech
    path = tmp_path / "jfk3.wav"
    sf.write(path, long_clip, sr)
    [result] = list(transcribe([path], TranscribeOptions(model=str(model_dir), decoding={"seed": 0})))
    assert result.status == "ok"
    spoken = [w for w in result.windows if not w.silent]
    assert len(spoken) >= 5 and all(w.end - w.start <= 8.0 + 1e-6 for w in result.windows)
    assert abs(result.windows[-1].end - len(long_clip) / sr) < 1e-3


def _two_utterances(tmp_path, pause_s: float) -> Path:
    import soundfile as sf

    clip, sr = sf.read(AUDIO / "goforward.flac", dtype="float32")
    path = tmp_path / f"pause_{pause_s}.wav"
    sf.write(path, np.concatenate([clip, np.zeros(int(pause_s * sr), np.float32), clip]), sr)
    return path


def test_model_config_splits_windows_at_shorter_pauses(tmp_path):
    """audio.split_silence_s: a pause that long ends a window (one utterance per window, as the model was
    trained), unless the user chose a splitting pause; without it two utterances 1.5 s apart share a window."""
    from whisfusion_cli.loading import Pipeline
    from whisfusion_cli.vad import vad_options

    model_dir = make_model_dir(tmp_path)
    path = _two_utterances(tmp_path, 0.4)  # 1.5 s without speech: the clip's own 1.1 s of silence and 0.4 s

    def spoken(options):
        [result] = list(transcribe([path], options))
        assert result.status == "ok"
        return [w for w in result.windows if not w.silent]

    assert len(spoken(TranscribeOptions(model=str(model_dir), decoding={"seed": 0}))) == 1
    config = json.loads((model_dir / "config.json").read_text())
    config["audio"] = {"split_silence_s": 0.6}
    (model_dir / "config.json").write_text(json.dumps(config))
    split = spoken(TranscribeOptions(model=str(model_dir), decoding={"seed": 0}))
    assert len(split) == 2 and split[0].end < split[1].start  # the pause between them is a silent window
    # The user's own splitting pause wins over the model's.
    chosen = TranscribeOptions(model=str(model_dir), decoding={"seed": 0}, vad=vad_options(split_silence_s=1.9))
    assert len(spoken(chosen)) == 1
    pipe = Pipeline.load(TranscribeOptions(model=str(model_dir)))
    assert pipe.vad_options(VadOptions()).split_silence_s == 0.6
    assert pipe.vad_options(vad_options(split_silence_s=1.9)).split_silence_s == 1.9


def test_vad_options_from_user_numbers():
    from whisfusion_cli.vad import vad_options

    o = vad_options(max_window_s=6.0, split_silence_s=0.3)
    assert (o.max_window_s, o.min_cut_s, o.split_silence_s, o.speech_pad_s) == (6.0, 3.0, 0.3, 0.15)
    assert vad_options() == VadOptions() and vad_options(False) == VadOptions(enabled=False)
    for bad in ({"max_window_s": 45.0}, {"max_window_s": 0.0}, {"split_silence_s": -1.0}):
        with pytest.raises(ValueError, match="must"):
            vad_options(**bad)
