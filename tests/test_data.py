"""Datasets and encoder-state shards: reading every input layout, preprocess, resume, bad files, read-back.

The helpers at the top (speech made with espeak-ng, a tiny random Whisper, a word-level tokenizer, a tiny
SMDM config) are shared with test_train.py and test_train_ddp.py.
"""

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from whisfusion_cli import data
from whisfusion_cli.data import DatasetError, PreprocessOptions, ShardDataset, preprocess, read_dataset

SENTENCES = [
    "the cat sat on the mat", "open the door please", "we meet at noon", "turn left at the corner",
    "the weather is cold today", "she reads a book", "bring me some water", "the train leaves at seven",
    "my brother plays guitar", "please close the window", "the dog runs in the park", "he bought three apples",
    "it is raining again", "the children are singing", "call me when you arrive", "the sun rises in the east",
    "they walked along the river", "i like green tea", "the meeting was long", "put the box on the table",
    "a bird flew over the house", "the music is too loud", "we need more paper", "the car would not start",
    "look at the bright stars", "my phone is on the desk", "the river is very wide", "we play chess at night",
    "the baby is asleep", "he paints the fence red", "the shop opens at nine", "bread and butter please",
]
VOICES = ["en-us", "en", "en-us+f3", "en+m3"]
TINY_DIM = 48  # encoder width of the tiny random Whisper
TINY_EN_DIM = 384  # Whisper tiny.en's encoder; the tiny SMDM decoder is 64 wide (a projection)
REPO = Path(__file__).resolve().parent.parent


def need_espeak():
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng): no test speech")


def make_speech(root: Path, n: int = len(SENTENCES)) -> Path:
    """n short utterances (espeak-ng, 4 voices, several speeds) as wav + same-name txt under root."""
    need_espeak()
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        text = SENTENCES[i % len(SENTENCES)]
        wav = root / f"utt{i:03d}.wav"
        if not wav.exists():
            cmd = ["espeak-ng", "-v", VOICES[i % 4], "-s", str(160 + 10 * (i % 4)), "-w", str(wav), text]
            subprocess.run(cmd, check=True, capture_output=True)
        (root / f"utt{i:03d}.txt").write_text(text + "\n")
    return root


def make_tiny_whisper(root: Path, d_model: int = TINY_DIM) -> Path:
    """A random transformers Whisper with tiny dims (real 80-bin front end, 1500 positions) and tiny.en's
    tokenizer beside it, saved as a model directory."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from whisfusion_cli.whisper_source import tiny_en_dir

    if (root / "config.json").exists():
        return root
    torch.manual_seed(0)
    config = WhisperConfig(
        vocab_size=51864, num_mel_bins=80, d_model=d_model, encoder_layers=1, decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=2 * d_model,
        decoder_ffn_dim=2 * d_model, max_source_positions=1500, max_target_positions=64,
    )
    model = WhisperForConditionalGeneration(config)
    with torch.no_grad():  # token rows of a trained model's size, so the tied output can reach large logits
        model.model.decoder.embed_tokens.weight.normal_(0.0, 0.5)
    model.save_pretrained(root)
    shutil.copy(tiny_en_dir() / "tokenizer.json", root / "tokenizer.json")
    return root


def make_word_tokenizer(path: Path, sentences=SENTENCES) -> Path:
    """A word-level tokenizers file with <unk>=0, <s>=1, </s>=2 (upstream's special ids)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted({w for s in sentences for w in s.split()})
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return path


def tiny_smdm_config(path: Path, vocab_size: int, condition_dim: int = TINY_DIM) -> Path:
    from whisfusion_cli.model import ModelConfig

    config = ModelConfig(name="tiny", n_layer=2, n_head=4, n_embd=64, intermediate_size=128, vocab_size=vocab_size,
                         padding_multiple=64, block_size=64, condition_dim=condition_dim)
    path.write_text(json.dumps(config.to_dict()))
    return path


def speech_shards(tmp_path_factory, source: str = "random") -> Path:
    """Shards of the espeak-ng utterances, made once per test session, encoded ("short" mode) by the tiny
    random Whisper (source "random", width 48) or by the real Whisper tiny.en encoder ("tiny.en", width 384:
    informative states, so that an adapter has something to learn from)."""
    base = tmp_path_factory.getbasetemp()
    out = base / f"shards-{source}"
    if not (out / "index.json").exists():
        speech = make_speech(base / "speech")
        whisper = str(make_tiny_whisper(base / "tiny-whisper")) if source == "random" else source
        preprocess(PreprocessOptions(input=str(speech), output=str(out), encoder={"source": whisper, "mode": "short"},
                                     shard_size=10, progress=False))
    return out


# ----------------------------------------------------------------------------------------------------------
# Reading datasets


def _tone(path: Path, seconds: float = 1.0):
    import soundfile as sf

    t = np.arange(int(16000 * seconds)) / 16000
    sf.write(path, (0.1 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000)


def test_read_librispeech_tree(tmp_path):
    chapter = tmp_path / "LibriSpeech" / "dev" / "84" / "121123"
    chapter.mkdir(parents=True)
    for utt in ("84-121123-0000", "84-121123-0001"):
        _tone(chapter / f"{utt}.flac")
    (chapter / "84-121123.trans.txt").write_text("84-121123-0000 GO DO YOU HEAR\n84-121123-0001 BUT IN LESS THAN FIVE MINUTES\n")
    items = read_dataset(tmp_path / "LibriSpeech")
    assert [i.id for i in items] == ["84-121123-0000", "84-121123-0001"]
    assert items[1].text == "BUT IN LESS THAN FIVE MINUTES"  # upstream trains on the raw upper-case text
    assert Path(items[0].audio) == (chapter / "84-121123-0000.flac").resolve()


def test_read_manifests_and_folder(tmp_path):
    (tmp_path / "audio").mkdir()
    _tone(tmp_path / "audio" / "a.wav", 3.0)
    _tone(tmp_path / "audio" / "b.wav")
    (tmp_path / "audio" / "b.txt").write_text("second  clip\n")
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text(
        json.dumps({"audio": "audio/a.wav", "text": "first half", "start": 0, "end": 1.5}) + "\n"
        + json.dumps({"audio_filepath": "audio/a.wav", "text": "second half", "start": 1.5, "id": "a2"}) + "\n"
    )
    items = read_dataset(jsonl)
    assert [(i.id, i.start, i.end) for i in items] == [("audio/a_0.00_1.5", 0.0, 1.5), ("a2", 1.5, None)]
    assert items[0].audio == str((tmp_path / "audio" / "a.wav").resolve())
    csv_path = tmp_path / "m.csv"
    csv_path.write_text("path,text\naudio/b.wav,hello there\n")
    assert read_dataset(csv_path)[0].text == "hello there"
    folder = read_dataset(tmp_path / "audio")  # a.wav has no .txt: not an item
    assert [(i.id, i.text) for i in folder] == [("b", "second clip")]


def test_read_dataset_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"audio": "x.wav", "text": "ok"}\n{not json}\n')
    with pytest.raises(DatasetError, match=r"bad.jsonl:2: not valid JSON"):
        read_dataset(bad)
    bad.write_text('{"audio": "x.wav"}\n')
    with pytest.raises(DatasetError, match=r"bad.jsonl:1: no transcript"):
        read_dataset(bad)
    bad.write_text('{"audio": "x.wav", "text": "t", "start": 2, "end": 1}\n')
    with pytest.raises(DatasetError, match="end 1.0 is not after start 2.0"):
        read_dataset(bad)
    with pytest.raises(DatasetError, match="no such file"):
        read_dataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no transcribed audio"):
        read_dataset(tmp_path / "empty")


# ----------------------------------------------------------------------------------------------------------
# Preprocess


def test_preprocess_short_mode_round_trip_and_bad_files(tmp_path, tmp_path_factory):
    from whisfusion_cli.audio import load_audio
    from whisfusion_cli.encoder import load_encoder

    base = tmp_path_factory.getbasetemp()
    speech = make_speech(base / "speech")
    whisper = make_tiny_whisper(base / "tiny-whisper")
    ds = tmp_path / "ds"
    shutil.copytree(speech, ds)
    (ds / "zz_broken.wav").write_bytes(b"RIFF\x00\x00not really a wav file")
    (ds / "zz_broken.txt").write_text("never read\n")
    spec = {"source": str(whisper), "mode": "short"}
    index = preprocess(PreprocessOptions(input=str(ds), output=str(tmp_path / "out"), encoder=spec, shard_size=8,
                                         dtype="bfloat16", progress=False))
    n = len(SENTENCES)
    assert index["num_items"] == n and len(index["shards"]) == -(-(n + 1) // 8)
    assert [s["audio"] for s in index["skipped"]] == [str((ds / "zz_broken.wav").resolve())]
    assert index["skipped"][0]["error"]  # a one-line reason
    assert index["encoder"] == {**spec, "dim": TINY_DIM} and index["frame_mode"] == "short"
    dataset = ShardDataset(tmp_path / "out")
    assert len(dataset) == n and dataset.dim == TINY_DIM
    # The stored states are the encoder's output for that clip (rounded to bf16), and cover only the audio.
    encoder = load_encoder(spec)
    states = dataset.states(5)
    audio = load_audio(ds / "utt005.wav")
    expected = encoder.encode([audio])[0]
    assert states.dtype == torch.bfloat16 and dataset.items[5].text == SENTENCES[5]
    assert states.shape == expected.shape == (encoder.output_frames(len(audio)), TINY_DIM)
    torch.testing.assert_close(states.float(), expected, atol=0.05, rtol=0.02)
    cond, mask = data.collate_states([dataset.states(0), dataset.states(1)])
    assert cond.shape[1] == max(dataset.items[0].frames, dataset.items[1].frames)
    assert mask.sum(1).tolist() == [dataset.items[0].frames, dataset.items[1].frames]


def test_preprocess_full_mode_keeps_all_1500_frames(tmp_path, tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    speech = make_speech(base / "speech")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"audio": str(speech / f"utt00{i}.wav"), "text": SENTENCES[i]}) + "\n"
                                for i in range(3)))
    index = preprocess(PreprocessOptions(input=str(manifest), output=str(tmp_path / "out"), progress=False,
                                         encoder={"source": str(make_tiny_whisper(base / "tiny-whisper")), "mode": "full"}))
    assert index["fixed_frames"] == 1500 and index["num_frames"] == 3 * 1500  # trainable as upstream
    assert ShardDataset(tmp_path / "out").states(2).shape == (1500, TINY_DIM)


class Crash(Exception):
    """Stands for the process dying after its first shard (a kill: no index is written)."""


def _preprocess(ds, out, whisper):
    return preprocess(PreprocessOptions(input=str(ds), output=str(out), shard_size=5, progress=False,
                                        encoder={"source": str(whisper), "mode": "short"}))


def test_preprocess_resume_after_a_crash_gives_identical_shards(tmp_path, tmp_path_factory, monkeypatch):
    base = tmp_path_factory.getbasetemp()
    speech = make_speech(base / "speech")
    whisper = make_tiny_whisper(base / "tiny-whisper")
    ds = tmp_path / "ds"
    ds.mkdir()
    for i in range(12):
        for ext in (".wav", ".txt"):
            shutil.copy(speech / f"utt{i:03d}{ext}", ds)
    crashed = tmp_path / "crashed"
    write_shard = data.ShardWriter.write

    def write_then_die(self, index, *args, **kwargs):
        write_shard(self, index, *args, **kwargs)
        raise Crash(f"died after shard {index}")

    monkeypatch.setattr(data.ShardWriter, "write", write_then_die)
    with pytest.raises(Crash):
        _preprocess(ds, crashed, whisper)
    monkeypatch.undo()
    assert sorted(p.name for p in crashed.glob("shard-*")) == ["shard-00000.safetensors"]
    assert not (crashed / "index.json").exists()
    (crashed / ".shard-00001.safetensors.x7k2q9.tmp").write_bytes(b"half a shard")  # a write cut short by a kill
    first = (crashed / "shard-00000.safetensors").stat().st_mtime_ns
    _preprocess(ds, crashed, whisper)
    assert (crashed / "shard-00000.safetensors").stat().st_mtime_ns == first  # finished shards are skipped
    assert not list(crashed.glob(".shard-*"))
    clean = tmp_path / "clean"
    _preprocess(ds, clean, whisper)
    names = sorted(p.name for p in clean.glob("shard-*"))
    assert names == sorted(p.name for p in crashed.glob("shard-*")) and len(names) == 3
    for name in names:
        assert (clean / name).read_bytes() == (crashed / name).read_bytes(), name
    assert json.loads((clean / "index.json").read_text())["shards"] == json.loads((crashed / "index.json").read_text())["shards"]
    # A different run into the same folder is refused rather than mixed in.
    with pytest.raises(DatasetError, match="different run .*shard_size"):
        preprocess(PreprocessOptions(input=str(ds), output=str(clean), shard_size=4, progress=False,
                                     encoder={"source": str(whisper), "mode": "short"}))


def test_shard_dataset_errors(tmp_path, tmp_path_factory):
    shards = speech_shards(tmp_path_factory)
    with pytest.raises(DatasetError, match="missing shard index"):
        ShardDataset(tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    (copy / "shard-00001.safetensors").unlink()
    with pytest.raises(DatasetError, match=r"shard-00001.safetensors: missing shard"):
        ShardDataset(copy)


def test_shard_dataset_concatenates_several_folders(tmp_path, tmp_path_factory):
    shards = speech_shards(tmp_path_factory)
    one = ShardDataset(shards)
    both = ShardDataset([shards, shards])
    n = len(one)
    assert len(both) == 2 * n and both.dim == one.dim
    assert [it.text for it in both.items] == [it.text for it in one.items] * 2
    for i in (0, n - 1):
        assert torch.equal(both.states(i), one.states(i)) and torch.equal(both.states(n + i), one.states(i))
    # A folder from an encoder of another width is refused, naming it.
    other = tmp_path / "other"
    shutil.copytree(shards, other)
    index = json.loads((other / "index.json").read_text())
    (other / "index.json").write_text(json.dumps({**index, "dim": index["dim"] + 1}))
    with pytest.raises(DatasetError, match=rf"{other.name}: encoder states of width"):
        ShardDataset([shards, other])
    with pytest.raises(DatasetError, match="no shard folder"):
        ShardDataset([])
