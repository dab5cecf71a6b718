"""Decoder weight files: upstream files, SMDM base overlays, and our model directory's weights (its file names
and config.json are config.py's, read without torch).

Upstream loads its files non-strictly and silently ignores what does not fit. We apply the same overlay
(SMDM base, then a stage-2 or stage-1 file on top) but check the union: every parameter must be covered,
nothing may be left over, every shape must match. Pickles are only ever read with `weights_only=True`.
"""

from __future__ import annotations

import json
import pickle
import shutil
import zipfile
from pathlib import Path

import torch

from . import first_line
# The model directory's names and config reading are torch-free (config.py); re-exported here.
from .config import (CONFIG_FILE, MODEL_FORMAT, MODEL_FORMAT_VERSION, TOKENIZER_FILE, WEIGHTS_FILE,  # noqa: F401
                     CheckpointError, read_config, read_model_config)
from .fileio import atomic_path, write_atomic
from .model import DecoderBase, build_decoder, is_adapter_key

# Wrappers that training scripts put around a state dict (upstream unwraps "state_dict").
STATE_DICT_WRAPPERS = ("state_dict", "model", "model_state_dict")
STRIPPED_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile
MAX_KEYS_IN_MESSAGE = 4


def _short(keys) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - MAX_KEYS_IN_MESSAGE} more)" if len(keys) > MAX_KEYS_IN_MESSAGE else ""
    return ", ".join(keys[:MAX_KEYS_IN_MESSAGE]) + more


def load_state_dict_file(path) -> dict[str, torch.Tensor]:
    """A flat {key: tensor} from .safetensors or a torch pickle (weights_only), wrappers and prefixes removed."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file, corrupt or truncated ({first_line(e)})") from None
    else:
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(
                f"{path}: refused: the pickle holds objects other than tensors (possibly code), and checkpoints "
                f"are only loaded with weights_only=True ({first_line(e)})"
            ) from None
        except (EOFError, RuntimeError, zipfile.BadZipFile, OSError, ValueError, IndexError, KeyError,
                TypeError, AttributeError) as e:  # what torch.load raises on garbled bytes varies by damage
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint, corrupt or truncated ({first_line(e)})") from None
    if isinstance(sd, dict):
        for wrapper in STATE_DICT_WRAPPERS:
            if isinstance(sd.get(wrapper), dict):
                sd = sd[wrapper]
                break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: not a state dict (expected a flat mapping of names to tensors)")
    out = {}
    for key, value in sd.items():
        for prefix in STRIPPED_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def check_and_load(model: DecoderBase, sd: dict, source: str, assign: bool = False) -> None:
    """Load strictly, with one-line errors: missing keys, unexpected keys, wrong shapes. assign: the model
    takes the tensors of `sd` as its parameters (for a model built on the meta device)."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = expected.keys() - sd.keys()
    unexpected = sd.keys() - expected.keys()
    if unexpected:
        raise CheckpointError(f"{source}: {len(unexpected)} unexpected keys for this config: {_short(unexpected)}")
    if missing:
        adapter_only = all(is_adapter_key(k) for k in sd) and sd
        hint = " (an adapter-only stage-1 file: pass the SMDM base with base=/--base)" if adapter_only else ""
        raise CheckpointError(f"{source}: {len(missing)} parameters not covered: {_short(missing)}{hint}")
    for key, shape in expected.items():
        if tuple(sd[key].shape) != tuple(shape):
            raise CheckpointError(
                f"{source}: {key} has shape {list(sd[key].shape)}, config expects {list(shape)} (config does not match)"
            )
    model.load_state_dict(sd, strict=True, assign=assign)


def load_decoder(path, config=None, dtype: torch.dtype = torch.float32, device="cpu", base=None) -> DecoderBase:
    """A decoder in eval mode from an upstream file (.pt flat dict, {"state_dict": ...}, .safetensors), a stage-1
    adapter over an SMDM `base`, or an SMDM base with a stage-2 overlay. (One of our model directories, which
    may borrow tensors from a Whisper, is loading.load_model_dir's.)"""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: a model directory, not a weights file; load it with loading.load_model_dir")
    cfg = read_config(config if config is not None else _sibling_config(path))
    model = build_decoder(cfg)
    sd = {}
    sources = []
    if base is not None:
        sd.update(load_state_dict_file(base))
        sources.append(str(base))
    sd.update(load_state_dict_file(path))
    sources.append(str(path))
    check_and_load(model, sd, " + ".join(sources))
    return model.to(device=device, dtype=dtype).eval()


def _sibling_config(path: Path):
    cand = path.with_name(CONFIG_FILE)
    return cand if cand.is_file() else None


# ----------------------------------------------------------------------------------------------------------
# Our model directory


def save_model_dir(
    out_dir,
    decoder: DecoderBase,
    tokenizer_file,
    tokenizer_config: dict,
    encoder_spec: dict,
    decoding_defaults: dict | None = None,
    external: dict | None = None,
    storage_dtype: torch.dtype = torch.float32,
    extra: dict | None = None,
) -> Path:
    """Write config.json + model.safetensors + tokenizer.json, each file atomically.

    external: {state-dict key: {"source": whisper name, "key": key in that model}} for frozen tensors that are
    read from another installed model at load time instead of being stored (keeps the shipped model small).
    extra: more config sections; the shard folders of a "training" section are recorded by their names only,
    so a shipped config holds no path of the machine that trained it.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    external = external or {}
    tensors = {
        k: v.detach().to("cpu", storage_dtype if v.is_floating_point() else v.dtype).contiguous()
        for k, v in decoder.state_dict().items()
        if k not in external
    }
    tok_config = dict(tokenizer_config)
    tok_config["file"] = TOKENIZER_FILE
    config = {
        "format": MODEL_FORMAT,
        "version": MODEL_FORMAT_VERSION,
        "decoder": decoder.config.to_dict(),
        "tokenizer": tok_config,
        "encoder": dict(encoder_spec),
        "decoding": dict(decoding_defaults or {}),
        "external_weights": external,
        **_portable(extra or {}),
    }
    with atomic_path(out / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    if Path(tokenizer_file).resolve() != (out / TOKENIZER_FILE).resolve():
        with atomic_path(out / TOKENIZER_FILE) as tmp:
            shutil.copyfile(tokenizer_file, tmp)
    write_atomic(out / CONFIG_FILE, json.dumps(config, indent=1))
    return out


def _portable(extra: dict) -> dict:
    """`extra` with the training data folders as folder names (`/data/shards/train3` -> `train3`)."""
    training = extra.get("training")
    if not isinstance(training, dict) or not training.get("data"):
        return extra
    data = training["data"]
    names = [Path(str(p)).name for p in data] if isinstance(data, (list, tuple)) else Path(str(data)).name
    return {**extra, "training": {**training, "data": names}}
