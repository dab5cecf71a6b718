"""Checkpoint files: upstream layouts, overlays, our model directory's format, and every bad-file case."""

import json
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from whisfusion_cli.checkpoint import CheckpointError, load_decoder, save_model_dir
from whisfusion_cli.loading import load_model_dir
from whisfusion_cli.model import PRESETS, DiffusionDecoder, ModelConfig, count_parameters, is_adapter_key


@pytest.fixture(scope="module")
def parity_sd(parity_dir):
    return torch.load(parity_dir / "weights.pt", weights_only=True)


@pytest.fixture(scope="module")
def config(parity_dir):
    return json.loads((parity_dir / "config.json").read_text())


def _logits(dec, parity_dir):
    io = torch.load(parity_dir / "io.pt", weights_only=True)
    with torch.no_grad():
        return dec(io["idx"], condition=io["condition"].float())


def test_state_dict_wrapper_and_prefix(tmp_path, parity_sd, config, parity_dir):
    torch.save({"state_dict": {"module." + k: v for k, v in parity_sd.items()}}, tmp_path / "wrapped.pt")
    dec = load_decoder(tmp_path / "wrapped.pt", config=config)
    io = torch.load(parity_dir / "io.pt", weights_only=True)
    torch.testing.assert_close(_logits(dec, parity_dir), io["logits"], atol=1e-4, rtol=1e-4)


def test_base_plus_stage2_overlay_and_adapter_over_base(tmp_path, parity_sd, config, parity_dir):
    base = {k: v for k, v in parity_sd.items() if not is_adapter_key(k)}
    adapter = {k: v for k, v in parity_sd.items() if is_adapter_key(k)}
    assert len(adapter) == 2 * 4  # per block: norm_cross, q_proj, kv_proj, proj (72 for 18 blocks)
    save_file(base, tmp_path / "base.safetensors")
    torch.save(adapter, tmp_path / "stage1_adapter.pt")
    # A stage-2 file (all tensors) over a base with different values: stage 2 wins everywhere.
    noisy_base = {k: v + 1.0 for k, v in base.items()}
    save_file(noisy_base, tmp_path / "noisy_base.safetensors")
    torch.save(parity_sd, tmp_path / "stage2.pt")
    io = torch.load(parity_dir / "io.pt", weights_only=True)
    dec = load_decoder(tmp_path / "stage2.pt", config=config, base=tmp_path / "noisy_base.safetensors")
    torch.testing.assert_close(_logits(dec, parity_dir), io["logits"], atol=1e-4, rtol=1e-4)
    dec = load_decoder(tmp_path / "stage1_adapter.pt", config=config, base=tmp_path / "base.safetensors")
    torch.testing.assert_close(_logits(dec, parity_dir), io["logits"], atol=1e-4, rtol=1e-4)


def test_adapter_alone_is_reported(tmp_path, parity_sd, config):
    torch.save({k: v for k, v in parity_sd.items() if is_adapter_key(k)}, tmp_path / "adapter.pt")
    with pytest.raises(CheckpointError, match=r"adapter.pt.*not covered.*adapter-only"):
        load_decoder(tmp_path / "adapter.pt", config=config)


def test_base_alone_is_reported(tmp_path, parity_sd, config):
    save_file({k: v for k, v in parity_sd.items() if not is_adapter_key(k)}, tmp_path / "base.safetensors")
    with pytest.raises(CheckpointError, match=r"8 parameters not covered: transformer.h.0.cross_attn"):
        load_decoder(tmp_path / "base.safetensors", config=config)


def test_unexpected_keys(tmp_path, parity_sd, config):
    torch.save({**parity_sd, "transformer.h.7.attn.attn.weight": torch.zeros(3)}, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match=r"extra.pt: 1 unexpected keys.*h.7"):
        load_decoder(tmp_path / "extra.pt", config=config)


def test_wrong_shape_names_key(tmp_path, parity_sd, config):
    bad = dict(parity_sd)
    bad["transformer.h.1.mlp.swiglu.w1.weight"] = torch.zeros(100, 64)
    torch.save(bad, tmp_path / "shape.pt")
    with pytest.raises(CheckpointError, match=r"shape.pt: transformer.h.1.mlp.swiglu.w1.weight has shape \[100, 64\]"):
        load_decoder(tmp_path / "shape.pt", config=config)


def test_config_mismatch(parity_dir):
    # The released 170M config against the small fixture weights.
    with pytest.raises(CheckpointError, match=r"weights.pt: .*(shape|not covered)"):
        load_decoder(parity_dir / "weights.pt", config="Diff_LLaMA_170M")


def test_invalid_config_values(parity_dir, config):
    with pytest.raises(CheckpointError, match="bias"):
        load_decoder(parity_dir / "weights.pt", config={**config, "bias": True})
    with pytest.raises(CheckpointError, match="divisible"):
        load_decoder(parity_dir / "weights.pt", config={**config, "n_query_groups": 3})


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_truncated_file(tmp_path, parity_dir, config, suffix):
    src = (parity_dir / f"weights{suffix}").read_bytes()
    path = tmp_path / f"truncated{suffix}"
    path.write_bytes(src[: len(src) // 2])
    with pytest.raises(CheckpointError, match=rf"truncated{suffix}: .*corrupt or truncated") as e:
        load_decoder(path, config=config)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_garbage_file(tmp_path, config, suffix):
    path = tmp_path / f"garbage{suffix}"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match=rf"garbage{suffix}"):
        load_decoder(path, config=config)


def test_missing_file(tmp_path, config):
    with pytest.raises(CheckpointError, match="not found"):
        load_decoder(tmp_path / "nope.pt", config=config)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# torch warns that the raw pickle below is not its own protocol before it refuses it: expected here.
@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_malicious_pickle_refused(tmp_path, config):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"lm_head.weight": torch.zeros(2), "payload": _Evil(marker)}, path)
    with pytest.raises(CheckpointError, match=r"evil.pt: refused: .*weights_only"):
        load_decoder(path, config=config)
    assert not marker.exists()
    # A plain pickle (not a torch zip) carrying code is refused too.
    raw = tmp_path / "evil_raw.pt"
    raw.write_bytes(pickle.dumps({"x": _Evil(marker)}))
    with pytest.raises(CheckpointError):
        load_decoder(raw, config=config)
    assert not marker.exists()


def test_170m_preset_loads_spec_state_dict_strictly(data_dir):
    spec = json.loads((data_dir / "keys_smdm_170m.json").read_text())
    config = ModelConfig.from_dict(spec["config"])
    assert config == PRESETS["Diff_LLaMA_170M"]
    assert config.mask_token_id == 32000
    with torch.device("meta"):
        model = DiffusionDecoder(config)
    assert count_parameters(model) == spec["param_counts"]["total"] == 261_531_648
    assert sum(p.numel() for n, p in model.named_parameters() if is_adapter_key(n)) == 42_481_152
    names = [e["name"] for e in spec["state_dict"]]
    assert names == list(model.state_dict().keys())  # same keys, same order
    sd = {e["name"]: torch.empty(e["shape"], device="meta") for e in spec["state_dict"]}
    assert len(sd) == 201
    result = model.load_state_dict(sd, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_model_dir_roundtrip(tmp_path, parity_dir, config):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tok.json"))
    dec = load_decoder(parity_dir / "weights.pt", config=config)
    training = {"stage": "2", "data": [str(tmp_path / "shards" / "train3"), "relative/train4"]}
    out = save_model_dir(tmp_path / "m", dec, tmp_path / "tok.json", {"kind": "custom"}, {"source": "tiny.en"},
                         {"candidates": 2}, extra={"training": training})
    dec2, cfg = load_model_dir(out)
    assert cfg["encoder"] == {"source": "tiny.en"} and cfg["decoding"] == {"candidates": 2}
    for (k, a), (_, b) in zip(dec.state_dict().items(), dec2.state_dict().items()):
        assert torch.equal(a, b), k
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    # The config says which shard folders trained it, not where they were on the training machine.
    assert cfg["training"] == {"stage": "2", "data": ["train3", "train4"]}
    with pytest.raises(CheckpointError, match="a model directory, not a weights file; .*load_model_dir"):
        load_decoder(out)


def test_the_shipped_model_config_holds_no_machine_path():
    from whisfusion_cli.loading import DEFAULT_MODEL_DIR

    def strings(value):
        if isinstance(value, dict):
            return [s for v in value.values() for s in strings(v)]
        if isinstance(value, list):
            return [s for v in value for s in strings(v)]
        return [value] if isinstance(value, str) else []

    for config in DEFAULT_MODEL_DIR.parent.rglob("config.json"):
        paths = [s for s in strings(json.loads(config.read_text())) if s.startswith(("/", "~")) or ":\\" in s]
        assert not paths, f"{config}: {paths}"
