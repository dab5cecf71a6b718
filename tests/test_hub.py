"""hub.py and `whisfusion download`, against a local stand-in for the Hugging Face Hub on 127.0.0.1
(huggingface_hub's real download path, HF_ENDPOINT pointed at it), plus the offline errors."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from hub_standin import COMMIT, HubStandIn, refused_endpoint
from tiny_model import TINY_DECODING, make_decoder, make_tokenizer, make_whisper
from whisfusion_cli import hub
from whisfusion_cli.cli import app

JFK = Path(__file__).parent / "data" / "audio" / "jfk.wav"
TINY_REPO = "test-org/tiny-whisfusion"
WHISPER_REPO = "test-org/tiny-whisper"


@pytest.fixture(scope="module")
def tiny_release(tmp_path_factory):
    """Files of a tiny 'release' in upstream's shapes: a flat .pt state dict, a transformers Whisper, a
    tokenizer; and the registry entries that describe them."""
    root = tmp_path_factory.mktemp("release")
    decoder = make_decoder(seed=1)
    torch.save(decoder.state_dict(), root / "tiny_stage2_decoder.pt")  # upstream: plain flat dict, fp32
    make_whisper(root / "whisper")
    make_tokenizer(root / "tokenizer.json")
    files = {
        (TINY_REPO, "tiny_stage2_decoder.pt"): (root / "tiny_stage2_decoder.pt").read_bytes(),
        (TINY_REPO, "tokenizer.json"): (root / "tokenizer.json").read_bytes(),
        (WHISPER_REPO, "config.json"): (root / "whisper" / "config.json").read_bytes(),
        (WHISPER_REPO, "model.safetensors"): (root / "whisper" / "model.safetensors").read_bytes(),
    }
    artefacts = {
        "tiny-stage2": hub.Artefact("tiny-stage2", TINY_REPO, ("tiny_stage2_decoder.pt",), "decoder", "tiny", "1 MB"),
        "tiny-whisper": hub.Artefact("tiny-whisper", WHISPER_REPO, ("config.json", "model.safetensors"), "encoder",
                                     "tiny whisper", "1 MB"),
        "tiny-tokenizer": hub.Artefact("tiny-tokenizer", TINY_REPO, ("tokenizer.json",), "tokenizer", "tok", "1 kB"),
    }
    spec = hub.ModelSpec("tiny-whisfusion", "tiny test model", decoder="tiny-stage2", encoder="tiny-whisper",
                         tokenizer="tiny-tokenizer", decoder_config=decoder.config.to_dict(),
                         encoder_mode="pad_trim", decoding=TINY_DECODING)
    return {"files": files, "artefacts": artefacts, "spec": spec, "state_dict": decoder.state_dict()}


@pytest.fixture
def registry(monkeypatch, tiny_release):
    for name, a in tiny_release["artefacts"].items():
        monkeypatch.setitem(hub.KNOWN_ARTEFACTS, name, a)
    monkeypatch.setitem(hub.KNOWN_MODELS, "tiny-whisfusion", tiny_release["spec"])
    return tiny_release


@pytest.fixture
def hf_env(monkeypatch, tmp_path):
    """A private HF_HOME, no offline mode, quiet progress bars."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    return tmp_path / "hf"


def test_download_into_cache_then_transcribe_offline(registry, hf_env, monkeypatch):
    with HubStandIn(registry["files"]) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        model_dir = hub.download("tiny-whisfusion")
        fetched = {p for m, p in server.requests if m == "GET" and "/resolve/" in p}
    assert len(fetched) == 4  # every file went over HTTP through huggingface_hub
    # the Hugging Face cache layout, under HF_HOME
    snap = hf_env / "hub" / "models--test-org--tiny-whisfusion" / "snapshots" / COMMIT
    assert (snap / "tiny_stage2_decoder.pt").is_file() and (snap / "tokenizer.json").is_file()
    assert model_dir == hf_env / "whisfusion" / "tiny-whisfusion" and (model_dir / "config.json").is_file()

    # Offline from here: no server, connections refused, HF_HUB_OFFLINE=1.
    monkeypatch.setenv("HF_ENDPOINT", refused_endpoint())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    mtime = (model_dir / "model.safetensors").stat().st_mtime_ns
    assert hub.cached_path("tiny-whisfusion") == model_dir
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == mtime  # reused, not rebuilt

    from whisfusion_cli.loading import load_model

    loaded = load_model("tiny-whisfusion")
    for key, value in registry["state_dict"].items():
        assert torch.equal(loaded.decoder.state_dict()[key], value), key

    result = CliRunner().invoke(app, ["transcribe", str(JFK), "--model", "tiny-whisfusion", "--quiet", "--seed", "0"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip()  # random weights: some text, whatever it says

    rows = {r.name: r for r in hub.list_artefacts()}
    assert rows["tiny-whisfusion"].status == "present" and rows["tiny-stage2"].size_bytes > 0
    assert rows["whisfusion"].status == "missing"


def test_download_to_local_dir(registry, hf_env, monkeypatch, tmp_path):
    local = tmp_path / "models" / "tiny"
    with HubStandIn(registry["files"]) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        result = CliRunner().invoke(app, ["download", "tiny-whisfusion", "--local-dir", str(local)])
    assert result.exit_code == 0, result.output
    assert (local / "tiny-stage2" / "tiny_stage2_decoder.pt").is_file()
    assert (local / "config.json").is_file() and (local / "model.safetensors").is_file()
    assert not (hf_env / "hub").exists()  # nothing went to the cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = CliRunner().invoke(app, ["transcribe", str(JFK), "--model", str(local), "--quiet"])
    assert result.exit_code == 0, result.output
    rows = {r.name: r.status for r in hub.list_artefacts(local_dir=local)}
    assert rows["tiny-whisfusion"] == "present" and rows["smdm-base"] == "missing"


def test_refused_and_offline_errors_are_one_line_and_fast(registry, hf_env, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", refused_endpoint())
    t0 = time.perf_counter()
    with pytest.raises(hub.HubError) as info:
        hub.download("tiny-whisfusion")
    assert time.perf_counter() - t0 < 10  # no half-minute of retries
    message = str(info.value)
    assert "\n" not in message and "unreachable" in message and TINY_REPO in message
    assert "--model DIR" in message and "whisfusion download tiny-whisfusion" in message

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(hub.HubError, match="HF_HUB_OFFLINE=1") as info:
        hub.download("tiny-whisfusion")
    assert "\n" not in str(info.value)
    with pytest.raises(hub.HubError, match="not downloaded"):
        hub.cached_path("tiny-whisfusion")
    with pytest.raises(hub.HubError, match="unknown model 'nope'"):
        hub.cached_path("nope")


def test_missing_file_and_unusable_decoder(registry, hf_env, monkeypatch):
    files = dict(registry["files"])
    del files[(WHISPER_REPO, "model.safetensors")]
    with HubStandIn(files) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        with pytest.raises(hub.HubError, match="no such file in the repository"):
            hub.download("tiny-whisper")
    files = dict(registry["files"])
    files[(TINY_REPO, "tiny_stage2_decoder.pt")] = b"this is not a checkpoint"
    with HubStandIn(files, commit="f" * 40) as server:  # a new revision that has the file
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        with pytest.raises(hub.HubError, match="decoder cannot be used") as info:
            hub.download("tiny-whisfusion")
    assert "\n" not in str(info.value)


def run_cli(args, env):
    return subprocess.run([sys.executable, "-m", "whisfusion_cli.cli", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_cli_download_of_a_released_name_in_a_subprocess(hf_env, tmp_path):
    """The real registry entry for the tokenizer, served by the stand-in, fetched by a fresh process that
    reads HF_HOME/HF_ENDPOINT from its environment; then the offline error for a model not in the cache."""
    a = hub.KNOWN_ARTEFACTS["tinyllama-tokenizer"]
    make_tokenizer(tmp_path / "tok.json")
    files = {(a.repo_id, f): (tmp_path / "tok.json").read_bytes() if f == "tokenizer.json" else b"{}" for f in a.files}
    env = {**os.environ, "HF_HOME": str(hf_env), "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    with HubStandIn(files) as server:
        env["HF_ENDPOINT"] = server.url
        proc = run_cli(["download", "tinyllama-tokenizer"], env)
    assert proc.returncode == 0, proc.stderr
    assert "tinyllama-tokenizer: files ready at" in proc.stdout
    proc = run_cli(["download", "--list"], {**env, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0
    line = next(l for l in proc.stdout.splitlines() if "tinyllama-tokenizer" in l)
    assert "present" in line
    assert "offline mode" in proc.stdout

    proc = run_cli(["download", "whisfusion"], {**env, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 1
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot fetch") and "HF_HUB_OFFLINE" in err[0]
    proc = run_cli(["download", "whisfusion"], {**env, "HF_ENDPOINT": refused_endpoint()})
    assert proc.returncode == 1 and "unreachable" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_registry_covers_the_released_artefacts():
    """SPEC section 1: every released file is downloadable by name and `whisfusion` bundles stage 2,
    whisper-small and the TinyLlama tokenizer."""
    repos = {(a.repo_id, f) for a in hub.KNOWN_ARTEFACTS.values() for f in a.files}
    assert ("nieshen/SMDM", "mdm_safetensors/mdm-170M-100e18-rsl-0.01.safetensors") in repos
    assert ("taeyoun811/whisfusion", "whisfusion_stage2_decoder.pt") in repos
    assert ("taeyoun811/whisfusion", "whisfusion_stage1_adapter.pt") in repos
    assert ("openai/whisper-small", "model.safetensors") in repos
    assert ("TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T", "tokenizer.json") in repos
    assert hub.KNOWN_MODELS["whisfusion"].artefacts == ("whisfusion-stage2", "whisper-small", "tinyllama-tokenizer")
    assert hub.KNOWN_MODELS["whisfusion-stage1"].base == "smdm-base"
