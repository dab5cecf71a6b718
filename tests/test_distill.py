"""The distillation teacher: Whisper's own decoder, causal, over the student's vocabulary."""

import dataclasses
import json

import pytest
import torch

from test_data import make_tiny_whisper, speech_shards
from tiny_model import random_whisper
from whisfusion_cli import train as T
from whisfusion_cli.distill import Teacher, distillation_loss

CONFIG = dict(vocab_size=64, num_mel_bins=80, d_model=16, encoder_layers=1, decoder_layers=2,
              encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
              max_source_positions=64, max_target_positions=32, pad_token_id=40, bos_token_id=41,
              eos_token_id=40, decoder_start_token_id=41)
EOS, PREFIX = 40, [41, 42]


@pytest.fixture(scope="module")
def whisper(tmp_path_factory):
    path = tmp_path_factory.mktemp("whisper")
    model = random_whisper(3, **CONFIG)
    model.save_pretrained(path)
    return model, path


def test_teacher_is_whisper_decoder_teacher_forced(whisper):
    """Padded batch (two canvases, two encoder lengths) against transformers' decoder on each item alone."""
    model, path = whisper
    teacher = Teacher(T.whisper_decoder_from_pretrained(str(path), 16), EOS, len(PREFIX))
    torch.manual_seed(0)
    texts = [[5, 9, 12, 7], [3, 30]]
    target = torch.tensor([PREFIX + t + [EOS] * (8 - len(t)) for t in texts])
    frames = torch.tensor([20, 11])
    states = torch.randn(2, 20, 16)
    positions = teacher.positions(target)
    assert positions.tolist() == [[False, False, True, True, True, True, True, False, False, False],
                                  [False, False, True, True, True, False, False, False, False, False]]
    got = teacher.log_probs(target, states, frames, positions)
    rows = []
    with torch.no_grad():
        for b in range(2):
            hidden = model.model.decoder(input_ids=target[b:b + 1], encoder_hidden_states=states[b:b + 1, :frames[b]])
            logits = hidden.last_hidden_state[0] @ model.model.decoder.embed_tokens.weight[:EOS + 1].T
            rows.append(torch.log_softmax(logits, -1)[:-1][positions[b, 1:]])  # output at p - 1 predicts p
    torch.testing.assert_close(got, torch.cat(rows), rtol=1e-5, atol=1e-5)


def test_distillation_loss_is_kl():
    torch.manual_seed(1)
    student, teacher = torch.randn(5, 7), torch.log_softmax(torch.randn(5, 7), -1)
    p = teacher.exp()
    expected = (p * (teacher - torch.log_softmax(student, -1))).sum()
    torch.testing.assert_close(distillation_loss(student, teacher), expected)
    assert float(distillation_loss(teacher, teacher)) == pytest.approx(0.0, abs=1e-6)


def test_training_with_distillation(tmp_path, tmp_path_factory):
    """--distill adds the KL term (the same run's loss is higher with it: KL >= 0, and > 0 for a student that
    is not its teacher) and trains to the end; a resume refuses a changed weight."""
    shards = speech_shards(tmp_path_factory)
    whisper_dir = make_tiny_whisper(tmp_path_factory.getbasetemp() / "tiny-whisper")
    losses = {}
    for weight in (0.0, 1.0):
        run = tmp_path / f"run{weight}"
        options = T.TrainOptions(data=str(shards), output=str(run), init=str(whisper_dir), batch_size=8, max_steps=10,
                                 lr=1e-3, warmup=2, eval_every=10, val_items=4, wer_items=2, log_every=5,
                                 progress=False, distill=weight, distill_teacher=str(whisper_dir))
        summary = T.train(options)
        assert summary["step"] == 10 and summary["reason"] == "finished"
        losses[weight] = [json.loads(l)["loss"] for l in (run / T.METRICS_FILE).read_text().splitlines()
                          if '"loss"' in l and "val_loss" not in l]
    assert losses[1.0][0] > losses[0.0][0]
    with pytest.raises(T.TrainError, match="distill"):
        T.train(dataclasses.replace(options, distill=2.0, resume=True, max_steps=12))


def test_distillation_needs_a_whisper_decoder():
    from types import SimpleNamespace

    smdm = SimpleNamespace(config=SimpleNamespace(family="smdm"))
    assert T.build_teacher(T.TrainOptions(data="x", output="y"), smdm, 16, None, "cpu") is None  # off: nothing built
    with pytest.raises(T.TrainError, match="Whisper-family"):
        T.build_teacher(T.TrainOptions(data="x", output="y", distill=1.0), smdm, 16, None, "cpu")
