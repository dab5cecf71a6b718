"""scripts/gpu_acceptance.py off the GPU: one line and exit 2 without one, and its sections' code (with a small
decoder in place of the 170M preset) on the CPU, so the script does not rot between GPU runs."""

import importlib.util
import sys
from pathlib import Path

import torch

from whisfusion_cli import model as M

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_acceptance.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_acceptance", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_without_a_gpu_it_says_so_in_one_line(monkeypatch, tmp_path, capsys):
    acceptance = _load()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert acceptance.main(["--out", str(tmp_path / "r.json")]) == acceptance.NO_GPU_EXIT == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and "no CUDA GPU" in captured.err
    assert not (tmp_path / "r.json").exists()


def test_sections_run_on_the_cpu(monkeypatch):
    acceptance = _load()
    small = M.ModelConfig(n_layer=2, n_head=2, n_embd=64, intermediate_size=128, vocab_size=512)
    monkeypatch.setitem(M.PRESETS, "Diff_LLaMA_170M", small)
    cpu = torch.device("cpu")
    parity = acceptance.parity(cpu)
    assert parity["ok"] and parity["float32"]["pdd_identical"] and parity["bfloat16"]["relative_err"] < 0.05
    loop = acceptance.upstream_loop(cpu, quick=True)
    assert loop["identical"] and loop["speedup"] > 0
    steps = acceptance.confidence_steps(acceptance._decoder_170m(cpu, torch.float32), cpu, (1, 2))
    assert set(steps) == {"1", "2"} and all(r["seconds_per_step"] > 0 for r in steps.values())
    attention = acceptance.attention(cpu, torch.float32, quick=True)
    from whisfusion_cli.attention import flash_varlen_kernel

    assert attention["ok"] and attention["flash_attn"] == (flash_varlen_kernel() is not None)
