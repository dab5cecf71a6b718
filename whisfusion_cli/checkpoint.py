"""Reading and writing decoder weights: upstream files, SMDM base overlays, and our model directory.

Upstream loads its files non-strictly and silently ignores what does not fit. We apply the same overlay
(SMDM base, then a stage-2 or stage-1 file on top) but check the union: every parameter must be covered,
nothing may be left over, every shape must match. Pickles are only ever read with `weights_only=True`.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import first_line
from .model import PRESETS, DecoderBase, ModelConfig, build_decoder, is_adapter_key

MODEL_FORMAT = "whisfusion-model"
MODEL_FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
DEFAULT_MODEL_DIR = Path(__file__).parent / "assets" / "default"
# Config key (section "runtime"): run this model int8-quantised by default on the CPU. A model sets it when
# int8 was measured as accurate as float32 for it (docs/MODEL_CARD.md for the embedded one).
INT8_ON_CPU = "int8_on_cpu"
# Wrappers that training scripts put around a state dict (upstream unwraps "state_dict").
STATE_DICT_WRAPPERS = ("state_dict", "model", "model_state_dict")
STRIPPED_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile
MAX_KEYS_IN_MESSAGE = 4


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line naming the file and the problem."""


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


def read_config(config) -> ModelConfig:
    """A ModelConfig from a ModelConfig, a dict (upstream field names), a JSON file, or a preset name."""
    if config is None:
        return PRESETS["Diff_LLaMA_170M"]
    if isinstance(config, ModelConfig):
        return config
    if isinstance(config, (str, os.PathLike)):
        if str(config) in PRESETS:
            return PRESETS[str(config)]
        path = Path(config)
        try:
            config = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: cannot read model config ({first_line(e)})") from None
        if "config" in config and isinstance(config["config"], dict):  # e.g. spec/keys_*.json
            config = config["config"]
        if "decoder" in config and isinstance(config["decoder"], dict):  # our model directory
            config = config["decoder"]
    try:
        return ModelConfig.from_dict(dict(config))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"invalid model config: {first_line(e)}") from None


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
    adapter over an SMDM `base`, an SMDM base with a stage-2 overlay, or one of our model directories."""
    path = Path(path)
    if path.is_dir():
        return load_model_dir(path, device=device, dtype=dtype)[0]
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
    """Write config.json + model.safetensors + tokenizer.json atomically (each file via a temp + rename).

    external: {state-dict key: {"source": whisper name, "key": key in that model}} for frozen tensors that are
    read from another installed model at load time instead of being stored (keeps the shipped model small).
    """
    import shutil

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
    tok_config["file"] = "tokenizer.json"
    config = {
        "format": MODEL_FORMAT,
        "version": MODEL_FORMAT_VERSION,
        "decoder": decoder.config.to_dict(),
        "tokenizer": tok_config,
        "encoder": dict(encoder_spec),
        "decoding": dict(decoding_defaults or {}),
        "external_weights": external,
        **(extra or {}),
    }
    with tempfile.NamedTemporaryFile(dir=out, suffix=".tmp", delete=False) as f:
        tmp = f.name
    save_file(tensors, tmp, metadata={"format": "pt"})
    _publish(tmp, out / WEIGHTS_FILE)
    if Path(tokenizer_file).resolve() != (out / "tokenizer.json").resolve():
        tmp = out / "tokenizer.json.tmp"
        shutil.copyfile(tokenizer_file, tmp)
        _publish(tmp, out / "tokenizer.json")
    atomic_write_text(out / CONFIG_FILE, json.dumps(config, indent=1))
    return out


def atomic_write_text(path, text: str) -> None:
    path = Path(path)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
        f.write(text)
        tmp = f.name
    _publish(tmp, path)


def _publish(tmp, path) -> None:
    """Rename a finished temp file into place with ordinary permissions (temp files are created 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def read_model_config(path) -> dict:
    path = Path(path)
    cfg_path = path / CONFIG_FILE
    try:
        config = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not a model directory (no {CONFIG_FILE})") from None
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: unreadable model config ({first_line(e)})") from None
    if config.get("format") != MODEL_FORMAT:
        raise CheckpointError(f"{cfg_path}: not a whisfusion model config (format {config.get('format')!r})")
    return config


def load_model_dir(path, device="cpu", dtype: torch.dtype | None = None, memo: dict | None = None):
    """(decoder in eval mode, config dict) from one of our model directories.

    The decoder is built without weights (meta device) and then holds the tensors read from the files, so
    no randomly initialised copy is made first. memo: Whisper checkpoints already open
    (ct2_import.open_whisper), shared with the encoder's loading so their file is indexed once."""
    path = Path(path)
    config = read_model_config(path)
    cfg = read_config(config["decoder"])
    with torch.device("meta"):
        model = build_decoder(cfg)
    sd = load_state_dict_file(path / WEIGHTS_FILE)
    external = config.get("external_weights") or {}
    if external:
        sd.update(_external_tensors(external, memo))
    check_and_load(model, {k: v.float() if v.is_floating_point() else v for k, v in sd.items()},
                   str(path / WEIGHTS_FILE), assign=True)
    return model.to(device=device, dtype=dtype or torch.float32).eval(), config


def _external_tensors(external: dict, memo: dict | None = None) -> dict:
    """Frozen tensors a model directory takes from an installed Whisper (e.g. tiny.en's token table), read
    from that Whisper's file alone: no Whisper model is built."""
    from .ct2_import import open_whisper

    memo = {} if memo is None else memo
    out = {}
    for key, ref in external.items():
        checkpoint = open_whisper(ref["source"], memo)
        if ref["key"] not in checkpoint:
            raise CheckpointError(f"external weight {ref['key']} not found in {ref['source']}")
        out[key] = checkpoint.tensor(ref["key"])
    return out


# ----------------------------------------------------------------------------------------------------------
# Whole models: decoder + tokenizer + encoder + decoding defaults


@dataclass
class LoadedModel:
    name: str
    decoder: DecoderBase
    tokenizer: object
    encoder: object
    decoding: object
    config: dict = field(default_factory=dict)
    int8: bool = False  # decoder and encoder Linear layers dynamically quantised to int8


def resolve_model(name_or_path=None) -> Path:
    """A model directory for None (the embedded default), a path, or a registered name (from the HF cache)."""
    if name_or_path is None or str(name_or_path) == "default":
        if not (DEFAULT_MODEL_DIR / CONFIG_FILE).is_file():
            raise CheckpointError(f"{DEFAULT_MODEL_DIR}: the embedded default model is missing from this install")
        return DEFAULT_MODEL_DIR
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path}: --model expects a model directory or a registered name")
        return path
    from . import hub

    return Path(hub.cached_path(str(name_or_path)))


def load_model(name_or_path=None, device="cpu", dtype=None, encoder_options: dict | None = None,
               int8: bool | None = False) -> LoadedModel:
    """The model `name_or_path` (None: the embedded default) on device. int8: dynamic int8 quantisation of the
    decoder's and the encoder's Linear layers (CPU, float32 only); None: the model's own choice
    (`runtime.int8_on_cpu` in its config) where it runs in float32 on the CPU, float elsewhere."""
    from dataclasses import fields as dc_fields

    from .decoding import DecodingOptions
    from .encoder import load_encoder
    from .tokenizer import Tokenizer, TokenizerConfig

    if int8 and torch.device(device).type != "cpu":
        raise ValueError("int8 quantisation runs on the CPU only; use device cpu")
    path = resolve_model(name_or_path)
    whisper_memo: dict = {}  # the token table and the encoder of one Whisper come from one read of its file
    decoder, config = load_model_dir(path, device=device, dtype=dtype, memo=whisper_memo)
    tok_cfg = TokenizerConfig.from_dict(config.get("tokenizer", {}))
    tokenizer = Tokenizer(path / tok_cfg.file, tok_cfg)
    known = {f.name for f in dc_fields(DecodingOptions)}
    dec_cfg = {k: (tuple(v) if k == "schedule" else v) for k, v in config.get("decoding", {}).items() if k in known}
    enc_spec = dict(config.get("encoder", {}))
    enc_spec.update(encoder_options or {})
    if int8 is None:
        int8 = bool((config.get("runtime") or {}).get(INT8_ON_CPU)) and decoder.device.type == "cpu" \
            and decoder.dtype == torch.float32
    if int8:
        from .model import quantize_decoder

        enc_spec["int8"] = True
        # In place: the float Linear weights are dropped as their int8 copies are made. Raises ValueError
        # off the CPU or for a non-float32 decoder.
        decoder = quantize_decoder(decoder, inplace=True)
    encoder = load_encoder(enc_spec, device=device, dtype=dtype or torch.float32, memo=whisper_memo)
    name = "default" if path == DEFAULT_MODEL_DIR else str(name_or_path)
    return LoadedModel(name, decoder, tokenizer, encoder, DecodingOptions(**dec_cfg), config, int8)
