"""The torch-free CPU engine (numpy_model, numpy_decoding, encoder.NumpyWhisperEncoder) against the torch
engine it mirrors: features, encoder states and decoder outputs within float rounding, the same tokens from
the decoding loop, the same transcripts through `transcribe`; and that its path never imports torch."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from whisfusion_cli.audio import load_audio  # noqa: E402
from whisfusion_cli.encoder import (  # noqa: E402
    EncoderOptions,
    NumpyWhisperEncoder,
    WhisperAudioEncoder,
    log_mel_spectrogram,
    log_mel_spectrogram_numpy,
    padded_clips,
    short_mel_frames,
)
from whisfusion_cli.numpy_model import SOFTMAX_CHUNK, NumpyAudioEncoder, NumpyDecoder, erf, gelu, softmax  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
AUDIO = Path(__file__).parent / "data" / "audio"
CLIPS = ("jfk.wav", "cards_001.flac", "librivox_0880.flac", "goforward.flac")
ASTERISK = sorted((Path(__file__).parent / "data" / "asterisk20").glob("*.flac"))


@pytest.fixture(scope="module")
def clips():
    return [load_audio(AUDIO / name) for name in CLIPS]


def test_erf_and_gelu_match_the_exact_functions():
    x = np.linspace(-7, 7, 20001, dtype=np.float32)
    exact = np.array([math.erf(float(v)) for v in x])
    assert np.abs(erf(x) - exact).max() < 1e-6
    assert np.abs(gelu(x) - torch.nn.functional.gelu(torch.from_numpy(x)).numpy()).max() < 2e-6


def test_softmax_in_place_is_the_same_numbers(clips):
    """Attention's softmax in place, in cache-sized blocks of rows, gives the out-of-place softmax's numbers to
    the bit, into the array it was given; rows longer than a block and arrays that are views work too."""
    rng = np.random.default_rng(0)
    for shape in [(6, 40, 40), (2, 6, 13, 260), (1, 3, 5, SOFTMAX_CHUNK + 7)]:
        x = (rng.normal(size=shape) * 8).astype(np.float32)
        expected = softmax(x)
        into = x.copy()
        assert softmax(into, in_place=True) is into and np.array_equal(into, expected)
        np.testing.assert_allclose(expected, torch.softmax(torch.from_numpy(x), -1).numpy(), atol=1e-6)
    view = (rng.normal(size=(6, 40, 80)) * 8).astype(np.float32)[:, :, ::2]  # not contiguous: a new array
    expected = softmax(view)
    assert np.array_equal(softmax(view, in_place=True), expected)


def test_numpy_features_match_torch(clips):
    for clip in clips[:2]:
        for frames in (short_mel_frames(len(clip)), 3000):
            padded = padded_clips([clip], frames)
            ref = log_mel_spectrogram(torch.from_numpy(padded), 80)[:, :, :frames].numpy()
            out = log_mel_spectrogram_numpy(padded, 80)[:, :, :frames]
            assert out.shape == ref.shape and out.dtype == np.float32
            assert np.abs(out - ref).max() < 1e-4


def _close(out: np.ndarray, ref: np.ndarray, rel: float = 1e-5) -> None:
    assert out.shape == ref.shape
    assert np.abs(out - ref).max() <= rel * max(1.0, np.abs(ref).max()), np.abs(out - ref).max()


@pytest.mark.parametrize("mode", ["short", "pad_trim"])
def test_tiny_en_encoder_states_match_torch(clips, mode):
    from whisfusion_cli.whisper_source import open_whisper

    checkpoint = open_whisper("tiny.en")
    ref = WhisperAudioEncoder(checkpoint, EncoderOptions(mode=mode)).encode(clips)
    out = NumpyWhisperEncoder(checkpoint, EncoderOptions(mode=mode)).encode(clips)
    for r, o in zip(ref, out):
        # Four float32 layers through two BLAS libraries (numpy's OpenBLAS, torch's own kernels) drift by a
        # few 1e-5 of the largest state on some CPUs (2.2e-5 measured on an AMD EPYC); a wrong layer is O(1).
        _close(o, r.numpy(), rel=1e-4)


def test_small_sized_random_encoder_matches_torch():
    """A random encoder of whisper-small's width and heads (768, 12), two layers, non-zero biases."""
    from whisfusion_cli.model import AudioEncoder, AudioEncoderDims

    torch.manual_seed(0)
    dims = AudioEncoderDims(n_mels=80, n_ctx=1500, n_state=768, n_head=12, n_layer=2, n_mlp=3072)
    encoder = AudioEncoder(dims).eval()
    with torch.no_grad():
        for p in encoder.parameters():
            p.normal_(0.0, 0.05)
    mel = torch.randn(1, 80, 400)
    with torch.no_grad():
        ref = encoder(mel)[0].numpy()
    out = NumpyAudioEncoder({k: v.numpy() for k, v in encoder.state_dict().items()}, dims.n_head)(mel[0].numpy())
    _close(out, ref)


@pytest.fixture(scope="module")
def random_decoder():
    from whisfusion_cli.model import ModelConfig, WhisperDiffusionDecoder

    torch.manual_seed(1)
    config = ModelConfig(family="whisper", n_layer=2, n_head=4, n_embd=64, intermediate_size=128, vocab_size=300,
                         block_size=64, output_vocab_size=280)
    decoder = WhisperDiffusionDecoder(config).eval()
    with torch.no_grad():
        for p in decoder.parameters():
            p.normal_(0.0, 0.1)
    weights = {k: v.numpy() for k, v in decoder.state_dict().items()}
    weights["embed_tokens.weight"] = weights["embed_tokens.weight"].astype(np.float16)  # as tiny.en's table
    with torch.no_grad():
        decoder.embed_tokens.weight.copy_(torch.from_numpy(weights["embed_tokens.weight"].astype(np.float32)))
    return decoder, NumpyDecoder(weights, config.to_dict())


def test_decoder_hidden_states_logits_and_alignment_match_torch(random_decoder):
    decoder, ours = random_decoder
    states = torch.randn(1, 37, 64)
    idx = torch.tensor([[1, 5, 300, 300, 7, 300, 9, 2, 2]])  # 300: the mask id
    with torch.no_grad():
        kv = decoder.precompute_cross_kv(states)
        hidden = decoder.hidden_states(idx, cross_kv=kv)[0]
        logits = decoder.project(hidden).numpy()
        heads = [(0, 1), (1, 0), (1, 3)]
        weights = decoder.alignment_weights(idx, heads, cross_kv=kv)[0].numpy()
    our_kv = ours.cross_kv(states.numpy())
    our_hidden = ours.hidden_states(idx.numpy(), our_kv)[0]
    _close(our_hidden, hidden.numpy())
    _close(ours.project(our_hidden), logits)
    _close(ours.alignment_weights(idx.numpy(), heads, our_kv)[0], weights)
    ids = np.array([3, 17, 279])
    _close(our_hidden @ ours.output_rows(ids).T, logits[:, ids])


def test_numpy_decoder_refuses_what_it_cannot_run():
    with pytest.raises(ValueError, match="Whisper-family"):
        NumpyDecoder({}, {"family": "smdm"})


# ----------------------------------------------------------------------------------------------------------
# The decoding loop: the same tokens as decoding.decode_windows on the embedded default (float32)


@pytest.fixture(scope="module")
def default_models():
    from whisfusion_cli.loading import load_model

    return load_model(None, int8=False), load_model(None, engine="numpy")


VARIANTS = [{}, {"refine": 0}, {"shortlist": 0}, {"repeat_penalty": 0.0}, {"pad_context": 0}, {"refine_no_copy": True},
            {"refine_no_copy": True, "shortlist": 0},
            {"steps": 4, "refine": 2, "refine_fraction": 0.5}, {"seq_len": 40}]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()) or "default")
def test_decoding_loop_gives_the_same_tokens(default_models, variant):
    from whisfusion_cli.decoding import decode_windows
    from whisfusion_cli.numpy_decoding import decode_windows as decode_numpy

    torch_model, numpy_model = default_models
    tok = torch_model.tokenizer
    options = dataclasses.replace(torch_model.decoding, **variant)
    paths = [AUDIO / "jfk.wav", *ASTERISK[: 20 if not variant else 5]]
    for path in paths:
        audio = load_audio(path)[: 10 * 16000]
        duration = len(audio) / 16000
        states = torch_model.encoder.encode([audio])[0]
        ref = decode_windows(torch_model.decoder, [states], options, tok.prefix_ids, tok.pad_id, [duration])[0]
        out = decode_numpy(numpy_model.decoder, [states.numpy()], options, tok.prefix_ids, tok.pad_id, [duration])[0]
        assert out.text_tokens == ref.text_tokens, (path.name, tok.decode(out.text_tokens), tok.decode(ref.text_tokens))
        assert np.allclose(out.token_confidences, ref.token_confidences, atol=1e-3), path.name
        assert out.seq_len == ref.seq_len and out.n_canvas_tokens == ref.n_canvas_tokens


def test_decoding_loop_alignment_matches_torch(default_models):
    from whisfusion_cli.decoding import decode_windows
    from whisfusion_cli.numpy_decoding import decode_windows as decode_numpy

    torch_model, numpy_model = default_models
    tok, heads = torch_model.tokenizer, [(1, 0), (3, 2)]
    audio = load_audio(AUDIO / "jfk.wav")[: 10 * 16000]
    states = torch_model.encoder.encode([audio])[0]
    ref = decode_windows(torch_model.decoder, [states], torch_model.decoding, tok.prefix_ids, tok.pad_id, [10.0],
                         alignment_heads=heads)[0]
    out = decode_numpy(numpy_model.decoder, [states.numpy()], torch_model.decoding, tok.prefix_ids, tok.pad_id, [10.0],
                       alignment_heads=heads)[0]
    _close(out.alignment, ref.alignment.numpy(), rel=1e-4)


def test_decoding_loop_refuses_what_only_torch_runs(default_models):
    from whisfusion_cli.numpy_decoding import decode_windows as decode_numpy

    _, numpy_model = default_models
    states = np.zeros((60, 384), dtype=np.float32)
    for change, what in (({"candidates": 3}, "3 candidates"), ({"strategy": "remask", "shortlist": 0,
                         "pad_context": None}, "'remask' strategy"), ({"shortlist_int8": True}, "int8 shortlist")):
        options = dataclasses.replace(numpy_model.decoding, **change)
        with pytest.raises(ValueError, match=what):
            decode_numpy(numpy_model.decoder, [states], options, [50257, 50362], 50256, [2.0])


def test_a_batch_of_windows_decodes_as_each_alone_and_as_torch_batched(default_models):
    from whisfusion_cli.decoding import decode_windows
    from whisfusion_cli.numpy_decoding import decode_windows as decode_numpy

    torch_model, numpy_model = default_models
    tok = torch_model.tokenizer
    audio = [load_audio(p)[: 10 * 16000] for p in [AUDIO / "jfk.wav", *ASTERISK[:5]]]
    durations = [len(a) / 16000 for a in audio]
    states = torch_model.encoder.encode(audio)
    arrays = [s.numpy() for s in states]
    together = decode_numpy(numpy_model.decoder, arrays, torch_model.decoding, tok.prefix_ids, tok.pad_id, durations,
                            alignment_heads=[(3, 2)])
    alone = [decode_numpy(numpy_model.decoder, [a], torch_model.decoding, tok.prefix_ids, tok.pad_id, [d],
                          alignment_heads=[(3, 2)])[0] for a, d in zip(arrays, durations)]
    ref = decode_windows(torch_model.decoder, states, torch_model.decoding, tok.prefix_ids, tok.pad_id, durations)
    assert len({len(a) for a in arrays}) > 1  # windows of different lengths share the batch
    for t, a, r in zip(together, alone, ref):
        assert t.text_tokens == a.text_tokens == r.text_tokens
        _close(t.alignment, a.alignment, rel=1e-4)


# ----------------------------------------------------------------------------------------------------------
# Weights, engine choice, and the whole transcribe path


def test_own_safetensors_reader_matches_the_library(tmp_path):
    from safetensors.numpy import load_file, save_file

    from whisfusion_cli.loading import DEFAULT_MODEL_DIR, _numpy_state_dict

    ours, ref = _numpy_state_dict(DEFAULT_MODEL_DIR / "model.safetensors"), load_file(DEFAULT_MODEL_DIR / "model.safetensors")
    assert ours.keys() == ref.keys()
    assert all(ours[k].dtype == np.float32 and np.array_equal(ours[k], ref[k].astype(np.float32)) for k in ref)
    mixed = {"a": np.arange(6, dtype=np.int64).reshape(2, 3), "b": np.ones(3, dtype=np.float16), "c": np.array([True])}
    save_file(mixed, str(tmp_path / "m.safetensors"), metadata={"format": "np"})
    back = _numpy_state_dict(tmp_path / "m.safetensors")
    assert back["a"].dtype == np.int64 and np.array_equal(back["a"], mixed["a"]) and back["b"].dtype == np.float32
    assert back["c"].dtype == bool and back["c"][0]


def test_damaged_weights_are_one_line_errors(tmp_path):
    from safetensors.numpy import save_file

    from whisfusion_cli.config import CheckpointError
    from whisfusion_cli.loading import _numpy_state_dict
    from whisfusion_cli.numpy_model import NumpyUnsupported

    save_file({"w": np.ones((4, 4), dtype=np.float32)}, str(tmp_path / "ok.safetensors"))
    data = (tmp_path / "ok.safetensors").read_bytes()
    cases = {"empty": b"", "truncated": data[:-8], "header": data[:8] + b"{not json" + data[17:], "garbage": b"x" * 100}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match="not a readable safetensors file") as e:
            _numpy_state_dict(tmp_path / name)
        assert "\n" not in str(e.value)
    header = b'{"w":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]}}'
    (tmp_path / "bf16").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
    with pytest.raises(NumpyUnsupported, match="BF16"):
        _numpy_state_dict(tmp_path / "bf16")


def test_engine_choice(tmp_path, monkeypatch):
    from tiny_model import make_model_dir

    from whisfusion_cli import devices
    from whisfusion_cli.loading import choose_engine
    from whisfusion_cli.transcribe import TranscribeOptions

    monkeypatch.setattr(devices, "cuda_possible", lambda: False)
    cpu = dict(device="cpu")
    assert choose_engine(TranscribeOptions(**cpu)) == "numpy"  # the embedded default on the CPU
    assert choose_engine(TranscribeOptions()) == "numpy"  # auto device, no GPU
    assert choose_engine(TranscribeOptions(**cpu, int8=False)) == "numpy"
    for torch_only in (dict(int8=True), dict(encoder_backend="ctranslate2"), dict(decoding={"candidates": 3}),
                       dict(decoding={"strategy": "remask", "shortlist": 0, "pad_context": None}),
                       dict(decoding={"shortlist_int8": True})):
        assert choose_engine(TranscribeOptions(**cpu, **torch_only)) == "torch", torch_only
        with pytest.raises(ValueError, match="the numpy engine does not run") as e:
            choose_engine(TranscribeOptions(**cpu, **torch_only, engine="numpy"))
        assert "--engine torch" in str(e.value) and "\n" not in str(e.value)
    smdm = make_model_dir(tmp_path / "smdm")  # an upstream-family decoder: torch only
    assert choose_engine(TranscribeOptions(**cpu, model=str(smdm))) == "torch"
    with pytest.raises(ValueError, match="smdm decoder family"):
        choose_engine(TranscribeOptions(**cpu, model=str(smdm), engine="numpy"))
    assert choose_engine(TranscribeOptions(**cpu, engine="torch")) == "torch"
    with pytest.raises(ValueError, match="--engine must be one of"):
        TranscribeOptions(engine="jax")


def test_transcribe_on_both_engines_gives_the_same_transcripts(tmp_path):
    from whisfusion_cli.transcribe import TranscribeOptions, transcribe

    paths = [AUDIO / "jfk.wav", *ASTERISK[:4]]
    results = {}
    for engine in ("numpy", "torch"):
        options = TranscribeOptions(device="cpu", engine=engine, int8=False, output_dir=tmp_path / engine,
                                    output_format="json,srt", word_timestamps=True)
        results[engine] = list(transcribe([str(p) for p in paths], options))
    for a, b in zip(results["numpy"], results["torch"]):
        assert a.status == b.status == "ok" and a.text == b.text and a.text
        assert (a.engine, b.engine) == ("numpy", "torch")
        for sa, sb in zip(a.segments, b.segments):
            assert abs(sa.start - sb.start) <= 0.05 and abs(sa.end - sb.end) <= 0.05
        record = json.loads((tmp_path / "numpy" / f"{Path(a.path).stem}.json").read_text())
        assert record["whisfusion"]["engine"] == "numpy" and record["whisfusion"]["encoder"]["backend"] == "numpy"


def test_the_cli_on_the_cpu_never_imports_torch():
    """The README's main job in a fresh process: the JFK sentence, and neither torch nor transformers loaded."""
    code = ("import sys\nfrom whisfusion_cli.cli import main\n"
            "sys.argv = ['whisfusion', 'transcribe', sys.argv[1], '--device', 'cpu', '-q']\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print('LOADED', 'torch' in sys.modules, 'transformers' in sys.modules, 'librosa' in sys.modules)\n")
    jfk = ROOT / "whisfusion_cli" / "assets" / "examples" / "jfk.wav"
    out = subprocess.run([sys.executable, "-c", code, str(jfk)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "ask not what your country can do for you" in out.stdout.lower().replace(",", "").replace(".", "").replace("\n", " ")
    assert "LOADED False False False" in out.stdout


def test_engine_cache_is_written_once_reused_and_rebuilt_when_damaged(tmp_path, monkeypatch):
    """The float32 arrays are written to the user cache on the first load and mapped on the next (which does
    not make them again); a truncated file is made again; a cache that cannot be written still loads."""
    import whisfusion_cli.loading as loading

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    first = loading.load_model(None, engine="numpy")
    (cache,) = (tmp_path / "cache" / "whisfusion" / loading.ENGINE_CACHE_SUBDIR).glob("*.safetensors")
    audio = load_audio(AUDIO / "jfk.wav")[: 5 * 16000]
    reference = first.encoder.encode([audio])[0]

    def no_build(*args, **kwargs):
        raise AssertionError("the arrays were made again instead of read from the cache")

    with monkeypatch.context() as m:
        m.setattr(loading, "load_numpy_decoder", no_build)
        second = loading.load_model(None, engine="numpy")
    assert np.array_equal(second.encoder.encode([audio])[0], reference)
    assert not second.decoder.w["layers.0.fc1.weight"].flags.writeable  # a view of the mapped file
    # The transposed output projection too: mapped, not a second copy of the token table made at every start.
    assert not second.decoder.head.flags.writeable and second.decoder.head.flags.c_contiguous
    assert np.array_equal(second.decoder.head, first.decoder.head)
    assert np.array_equal(second.decoder.head.T, first.decoder.table[: first.decoder.n_logits])

    cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])  # a killed writer, a full disk
    third = loading.load_model(None, engine="numpy")
    assert np.array_equal(third.encoder.encode([audio])[0], reference)
    assert cache.stat().st_size > 100_000_000  # written whole again

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a-file"))
    (tmp_path / "a-file").write_text("not a directory")  # the cache cannot be created under it
    fourth = loading.load_model(None, engine="numpy")
    assert np.array_equal(fourth.encoder.encode([audio])[0], reference)


def test_engine_cache_key_follows_the_weights_files(tmp_path):
    import os
    import shutil

    from whisfusion_cli.config import read_model_config
    from whisfusion_cli.loading import DEFAULT_MODEL_DIR, engine_cache_path

    model = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL_DIR, model)
    config = read_model_config(model)
    key = engine_cache_path(model, config, config["encoder"], {})
    assert key == engine_cache_path(model, config, config["encoder"], {})
    weights = model / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1_000_000_000))
    assert engine_cache_path(model, config, config["encoder"], {}) != key  # a rewritten file: a new cache
