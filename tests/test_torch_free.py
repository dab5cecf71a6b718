"""The transcribe path up to the model's weights imports no torch (issue 17: torch's import alone costs more
than a whole faster-whisper run): finding the model, reading its config and decoding defaults, building the
Pipeline's options, settling `--device cpu` and recording a run's settings."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from whisfusion_cli import decoding, decoding_options, devices

ROOT = Path(__file__).resolve().parents[1]

# Run in a fresh interpreter: this test process has imported torch already.
TORCH_FREE_RUN = textwrap.dedent("""
    import json, sys, types
    import numpy as np
    from whisfusion_cli import config, decoding_options, devices, loading, transcribe
    from whisfusion_cli.tokenizer import Tokenizer, TokenizerConfig

    path = loading.resolve_model(None)
    model_config = config.read_model_config(path)
    decoder = config.read_config(model_config["decoder"])
    options = decoding_options.DecodingOptions.from_config(model_config["decoding"])
    names = devices.device_names("cpu")
    tok_cfg = TokenizerConfig.from_dict(model_config["tokenizer"])
    tokenizer = Tokenizer(path / tok_cfg.file, tok_cfg)
    fake_decoder = types.SimpleNamespace(device=types.SimpleNamespace(type="cpu"), config=decoder)
    model = loading.LoadedModel("default", fake_decoder, tokenizer, None, options, model_config)
    pipeline = loading.Pipeline(model, {"steps": 3})
    result = decoding_options.DecodingResult(np.zeros((2, 7), np.int64), np.zeros((2, 7)), np.zeros(2), 0)
    run = transcribe.options_from_flags(**{**FLAGS, "device": "cpu", "dtype": "auto"})
    settings = transcribe.run_settings(run)
    print(json.dumps({
        "torch": "torch" in sys.modules, "model": str(path), "n_logits": decoder.n_logits,
        "strategy": options.strategy, "device": list(names), "steps": pipeline.decoding.steps,
        "seq_len": result.seq_len, "settings_device": [settings["device"], settings["dtype"]],
        "settings_model": settings["model"]["name"],
    }))
""")


def _cli_flags() -> dict:
    """The flags `whisfusion transcribe` passes to options_from_flags, at their defaults (as test_cli has them)."""
    import typer

    from whisfusion_cli.cli import app

    command = typer.main.get_command(app).commands["transcribe"]
    return {p.name: p.default for p in command.params if p.name not in ("inputs", "quiet")}


def test_the_cpu_transcribe_path_imports_no_torch():
    code = f"FLAGS = {_cli_flags()!r}\n" + TORCH_FREE_RUN
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["torch"] is False, "torch was imported on the CPU transcribe path"
    assert Path(report["model"]).name == "default" and report["n_logits"] > 0
    assert report["strategy"] == "confidence" and report["steps"] == 3 and report["seq_len"] == 7
    assert report["device"] == ["cpu", "float32"] and report["settings_device"] == ["cpu", "float32"]
    assert report["settings_model"] == "default"


def test_device_names_on_the_cpu():
    assert devices.device_names("cpu") == ("cpu", "float32")
    assert devices.device_names("CPU", "fp32") == ("cpu", "float32")
    with pytest.raises(ValueError, match="unknown dtype"):
        devices.device_names("cpu", "int4")
    for half in ("fp16", "bfloat16"):
        with pytest.raises(ValueError, match="only supported on a GPU"):
            devices.device_names("cpu", half)


def test_auto_without_a_possible_gpu_is_the_cpu_without_asking_torch(monkeypatch):
    import whisfusion_cli.distributed as distributed

    def asked(*args, **kwargs):
        raise AssertionError("torch was asked for a device")

    monkeypatch.setattr(devices, "cuda_possible", lambda: False)
    monkeypatch.setattr(distributed, "rank_device", asked)
    assert devices.device_names("auto") == ("cpu", "float32")
    assert devices.device_names(None, None) == ("cpu", "float32")
    with pytest.raises(ValueError, match="only supported on a GPU"):
        devices.device_names("auto", "bf16")


def test_auto_with_a_possible_gpu_asks_torch(monkeypatch):
    import torch

    monkeypatch.setattr(devices, "cuda_possible", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a device node, but torch finds no GPU
    assert devices.device_names("auto") == ("cpu", "float32")
    assert devices.resolve_device("auto", "auto") == (torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="no CUDA GPU"):
        devices.device_names("cuda")


def test_decoding_reexports_the_torch_free_names():
    assert decoding.DecodingOptions is decoding_options.DecodingOptions
    assert decoding.DecodingResult is decoding_options.DecodingResult
    assert decoding.words_from_tokens is decoding_options.words_from_tokens
    assert decoding.RETIRED_FIELDS is decoding_options.RETIRED_FIELDS
    assert decoding_options.text_tokens([1, 5, 6, 2, 2], 1, 2) == [5, 6]


def test_config_names_are_the_ones_model_and_checkpoint_export():
    from whisfusion_cli import checkpoint, config, model

    assert model.ModelConfig is config.ModelConfig and model.PRESETS is config.PRESETS
    assert checkpoint.CheckpointError is config.CheckpointError
    assert checkpoint.read_model_config is config.read_model_config and checkpoint.CONFIG_FILE == config.CONFIG_FILE
