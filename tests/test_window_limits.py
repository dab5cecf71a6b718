"""A model can ask for shorter VAD windows than the encoder's 30 s (audio.max_window_s in its config)."""

import json
from pathlib import Path

import numpy as np

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
    spoken = [s for s in result.segments if not s.silent]
    assert len(spoken) >= 5 and all(s.end - s.start <= 8.0 + 1e-6 for s in result.segments)
    assert abs(result.segments[-1].end - len(long_clip) / sr) < 1e-3
