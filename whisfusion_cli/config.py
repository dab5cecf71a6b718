"""A model directory's config, read without torch: the decoder's architecture (`ModelConfig`, upstream's field
names, and its presets) and the names and format of the directory's files (docs/LAYOUT.md shows the format).

Nothing here imports torch, so finding a model and reading its config costs no torch import (a CPU engine
without torch reads them too); building the networks is model.py's, their weight files checkpoint.py's.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from . import first_line

MODEL_FORMAT = "whisfusion-model"
MODEL_FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"

# Upstream config fields that we accept but whose only supported value is the one the released models use.
FIXED_UPSTREAM_FIELDS = {
    "bias": False,
    "parallel_residual": False,
    "shared_attention_norm": False,
    "_norm_class": ("FusedRMSNorm", "RMSNorm"),
    "_mlp_class": ("LLaMAMLP",),
    "condense_ratio": 1,
}
# Upstream fields that are derived, informational, or only relevant to training code.
IGNORED_UPSTREAM_FIELDS = {"name", "head_size", "rope_n_elem", "mask_token_id", "wte_rows", "config_name"}


@dataclass
class ModelConfig:
    """Decoder architecture, with upstream's (lit_gpt) field names."""

    family: str = "smdm"  # "smdm" (upstream Whisfusion) or "whisper" (bidirectional Whisper decoder)
    name: str = "Diff_LLaMA_170M"
    n_layer: int = 18
    n_head: int = 12
    n_embd: int = 768
    n_query_groups: int | None = None  # None -> n_head (multi-head attention)
    intermediate_size: int = 3072
    vocab_size: int = 32000
    padding_multiple: int = 64
    padded_vocab_size: int | None = None  # None -> vocab_size rounded up to padding_multiple
    block_size: int = 2048
    rotary_percentage: float = 1.0
    norm_eps: float = 1e-5
    # Width of the encoder states. None means n_embd: no projection, as in every official checkpoint.
    condition_dim: int | None = None
    # Whisper family only: number of leading vocabulary rows the decoder may predict (text tokens + EOT).
    output_vocab_size: int | None = None
    extra: dict = field(default_factory=dict, compare=False)  # unknown fields, kept so a config round-trips

    def __post_init__(self):
        if self.family not in ("smdm", "whisper"):
            raise ValueError(f"unknown decoder family {self.family!r} (expected 'smdm' or 'whisper')")
        if self.n_query_groups is None:
            self.n_query_groups = self.n_head
        if self.padded_vocab_size is None:
            m = self.padding_multiple
            self.padded_vocab_size = self.vocab_size if self.family == "whisper" else -(-self.vocab_size // m) * m
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if self.n_head % self.n_query_groups:
            raise ValueError(f"n_head {self.n_head} is not divisible by n_query_groups {self.n_query_groups}")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def rope_n_elem(self) -> int:
        return int(self.rotary_percentage * self.head_size)

    @property
    def mask_token_id(self) -> int:
        # SMDM: one embedding row past the lm_head outputs, so it is never predicted. Whisper family: one past
        # the tokenizer's vocabulary (the learned mask embedding).
        return self.padded_vocab_size if self.family == "smdm" else self.vocab_size

    @property
    def n_logits(self) -> int:
        if self.family == "smdm":
            return self.padded_vocab_size
        return self.output_vocab_size or self.vocab_size

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs, extra = {}, dict(d.get("extra", {}))
        for key, value in d.items():
            if key in known:
                kwargs[key] = value
            elif key in FIXED_UPSTREAM_FIELDS:
                allowed = FIXED_UPSTREAM_FIELDS[key]
                ok = value in allowed if isinstance(allowed, tuple) else value == allowed
                if not ok:
                    raise ValueError(f"config field {key}={value!r} is not supported (only {allowed!r})")
            elif key in IGNORED_UPSTREAM_FIELDS or key == "extra":
                continue
            else:
                extra[key] = value
        config = cls(**kwargs, extra=extra)
        if "head_size" in d and d["head_size"] != config.head_size:
            raise ValueError(f"config head_size {d['head_size']} != n_embd/n_head = {config.head_size}")
        return config

    def to_dict(self) -> dict:
        d = asdict(self)
        if not d["extra"]:
            d.pop("extra")
        return d


PRESETS = {
    # The released Whisfusion decoder (upstream name Diff_LLaMA_170M, 261.5M parameters with the adapter).
    "Diff_LLaMA_170M": ModelConfig(),
}


@dataclass(frozen=True)
class AudioEncoderDims:
    """The shape of a Whisper audio encoder (model.AudioEncoder, numpy_model.NumpyAudioEncoder)."""

    n_mels: int  # log-mel bins of the input (80; 128 for large-v3)
    n_ctx: int  # rows of the position table: encoder frames of a 30 s window (1500)
    n_state: int  # width (d_model)
    n_head: int
    n_layer: int
    n_mlp: int  # hidden width of each block's MLP (4 * n_state in every released Whisper)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line naming the file and the problem."""


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


def read_model_config(path) -> dict:
    """The config.json of model directory `path`, as a dict (its format checked, nothing else read)."""
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
