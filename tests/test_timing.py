"""timing.py and the alignment forward: DTW against a brute-force recurrence, the alignment heads' weights
against the attention the decoder computes, segment splitting, and word times on real speech with known
word extents (the embedded default model)."""

import numpy as np
import pytest
import soundfile as sf
import torch

from whisfusion_cli import model as model_module
from whisfusion_cli.timing import Word, dtw, speech_runs, split_words
from whisfusion_cli.loading import Pipeline
from whisfusion_cli.transcribe import TranscribeOptions, transcribe

from conftest import DATA

WORDS = [("digits__day-2.16k.wav", "Tuesday"), ("digits__mon-10.16k.wav", "November"), ("extension.16k.wav", "Extension")]
SR = 16000


def brute_force_dtw_cost(cost):
    N, M = cost.shape
    acc = np.full((N + 1, M + 1), np.inf)
    acc[0, 0] = 0
    for i in range(1, N + 1):
        for j in range(1, M + 1):
            acc[i, j] = cost[i - 1, j - 1] + min(acc[i - 1, j - 1], acc[i - 1, j], acc[i, j - 1])
    return acc[N, M]


def test_dtw_path_is_monotonic_and_optimal():
    rng = np.random.default_rng(0)
    for shape in ((1, 1), (3, 9), (7, 7), (12, 40)):
        cost = rng.random(shape)
        rows, cols = dtw(cost)
        assert rows[0] == 0 and cols[0] == 0 and rows[-1] == shape[0] - 1 and cols[-1] == shape[1] - 1
        steps = np.stack([np.diff(rows), np.diff(cols)], 1)
        assert all(tuple(s) in {(1, 1), (1, 0), (0, 1)} for s in steps)
        assert cost[rows, cols].sum() == pytest.approx(brute_force_dtw_cost(cost))
    band = np.ones((4, 20))
    for i in range(4):
        band[i, 5 * i : 5 * i + 5] = 0  # row i belongs to frames 5i..5i+4
    rows, cols = dtw(band)
    assert [int(cols[rows == i].min()) for i in range(4)] == [0, 5, 10, 15]


@pytest.mark.parametrize("family", ["smdm", "whisper"])
def test_alignment_weights_are_the_attention_the_decoder_uses(family, monkeypatch):
    from whisfusion_cli.model import ModelConfig, build_decoder, init_weights

    torch.manual_seed(0)
    config = ModelConfig(family=family, n_layer=2, n_head=2, n_embd=16, intermediate_size=32, vocab_size=40,
                         padding_multiple=8, block_size=32)
    decoder = build_decoder(config).eval()
    init_weights(decoder, std=0.3)
    kv = decoder.precompute_cross_kv(torch.randn(2, 11, 16))
    idx = torch.randint(0, 30, (2, 9))
    frames = torch.tensor([11, 7])  # the second window's encoder states are padded after 7 frames
    outputs = []
    real = model_module.cross_attention
    monkeypatch.setattr(model_module, "cross_attention", lambda q, k, v, mask=None: outputs.append(
        (v, real(q, k, v, mask))) or outputs[-1][1])
    heads = [(1, 1), (0, 0), (1, 0)]
    weights = decoder.alignment_weights(idx, heads, cross_kv=kv, frames=frames)
    assert weights.shape == (2, 3, 9, 11)
    assert torch.allclose(weights.sum(-1), torch.ones(2, 3, 9), atol=1e-5)
    assert weights[1, :, :, 7:].abs().max() == 0  # no weight on padding
    for n, (layer, head) in enumerate(heads):
        v, y = outputs[layer]  # y [B, T, H*hs]: per head, the attention-weighted values
        hs = 16 // 2
        mixed = weights[:, n] @ v[:, head]  # [B, T, hs]
        assert torch.allclose(mixed, y[:, :, head * hs : (head + 1) * hs], atol=1e-5)


def test_segments_end_at_sentences_pauses_and_the_longest_duration():
    def words(spec):
        return [Word(f" {w}", a, b, 1.0) for w, a, b in spec]

    runs = split_words(words([("Hi.", 0, 0.4), ("So", 0.5, 0.7), ("then", 0.7, 1.0), ("we", 2.0, 2.2)]))
    assert [[w.word for w in r] for r in runs] == [[" Hi."], [" So", " then"], [" we"]]  # sentence end, pause
    long = words([(f"w{i}," if i == 5 else f"w{i}", i * 0.5, i * 0.5 + 0.4) for i in range(30)])
    runs = split_words(long, max_seconds=7.0)
    assert all(r[-1].end - r[0].start <= 7.0 for r in runs) and sum(map(len, runs)) == 30
    assert runs[0][-1].word == " w5,"  # cut at the clause end, not mid-clause
    assert speech_runs((False, True, True, False, True), 10.0, 0.5) == [(10.5, 11.5), (12.0, 12.5)]


def speech_span(x, db=35.0):
    frames = len(x) // 160
    rms = np.sqrt(np.mean(x[: frames * 160].reshape(frames, 160).astype(np.float64) ** 2, 1) + 1e-12)
    loud = np.nonzero(20 * np.log10(rms) >= 20 * np.log10(rms.max()) - db)[0]
    return loud[0] * 0.01, (loud[-1] + 1) * 0.01


def test_default_model_times_real_words_inside_their_recordings():
    """Three recorded words joined with pauses of 0.7-1.1 s: each word is found inside its own recording,
    its start and end within 0.2 s of the recording's speech."""
    rng = np.random.default_rng(0)
    parts, spans, t = [np.zeros(int(0.3 * SR), np.float32)], [], 0.3
    for (name, _), pause in zip(WORDS, (0.7, 1.1, 0.4)):
        x, sr = sf.read(DATA / "words" / name, dtype="float32")
        a, b = speech_span(x)
        spans.append((t + a, t + b))
        parts += [x, (1e-4 * rng.standard_normal(int(pause * SR))).astype(np.float32)]
        t += len(x) / SR + pause
    audio = np.concatenate(parts)
    torch.set_num_threads(1)
    result = next(transcribe(audio, TranscribeOptions(word_timestamps=True)))
    words = [w for s in result.segments for w in s.words]
    assert [w.word.strip(" .") for w in words] == [text for _, text in WORDS]
    for w, (a, b) in zip(words, spans):
        assert a - 0.2 <= w.start <= a + 0.2 and b - 0.2 <= w.end <= b + 0.2, (w, a, b)
    assert len(result.segments) == 3  # one sentence each, and pauses between them
    plain = next(transcribe(audio, TranscribeOptions()))
    assert plain.text == result.text  # word timestamps never change the transcript
    assert all(s.words is None for s in plain.segments)


def test_without_word_timestamps_words_are_spread_over_the_speech_only():
    from whisfusion_cli.timing import spread_words

    words = spread_words([" ab", " cd", " efgh"], [1.0] * 3, 0.0, 10.0, runs=[(1.0, 3.0), (6.0, 8.0)])
    assert [(w.start, w.end) for w in words] == [(1.0, 2.0), (2.0, 3.0), (6.0, 8.0)]
    assert [(w.start, w.end) for w in spread_words([" a", " b"], [1.0] * 2, 0.0, 4.0)] == [(0.0, 2.0), (2.0, 4.0)]
