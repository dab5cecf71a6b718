"""A runnable model: a model directory's decoder, tokenizer, encoder and decoding defaults, and the Pipeline
that runs them on windows of audio.

`load_model(name_or_path)` finds the model (`resolve_model`: the embedded default, a directory, or a name
the hub module assembled), reads its weights (checkpoint.py's formats) with the frozen tensors it borrows
from an installed Whisper (`external_tensors`: tiny.en's token table), and builds its encoder; `Pipeline`
binds a loaded model to the decoding options of a run: windows -> encoder states -> decoded candidates ->
text and timed segments.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .audio import ENCODER_FRAMES_PER_SECOND, FRAMES_PER_SECOND
from .timing import Segment, align_words, speech_runs, split_words, spread_words
from .vad import FRAME_SECONDS as VAD_FRAME_SECONDS, VadOptions, Window

if TYPE_CHECKING:
    import torch

    from .model import DecoderBase

DEFAULT_MODEL_DIR = Path(__file__).parent / "assets" / "default"
# Config key (section "runtime"): run this model int8-quantised by default on the CPU. A model sets it when
# int8 was measured as accurate as float32 for it (docs/MODEL_CARD.md for the embedded one).
INT8_ON_CPU = "int8_on_cpu"
DEFAULT_BATCH_SIZE = 8  # windows per encoder/decoder batch
DEFAULT_LANGUAGE = "en"  # every released model is English-only; a model config may say otherwise ("language")
MIN_LOG_PROB = math.log(1e-10)  # floor of a token's log confidence in avg_logprob
SHORTLIST_INT8_OFF = "the model's shortlist_int8 (an int8 output projection, CPU only) is off"


# ----------------------------------------------------------------------------------------------------------
# Model directories: the decoder and the tensors it borrows


def load_model_dir(path, device="cpu", dtype: "torch.dtype | None" = None, memo: dict | None = None
                   ) -> "tuple[DecoderBase, dict]":
    """(decoder in eval mode, config dict) from one of our model directories.

    The decoder is built without weights (meta device) and then holds the tensors read from the files, so
    no randomly initialised copy is made first. memo: Whisper checkpoints already open
    (whisper_source.open_whisper), shared with the encoder's loading so their file is indexed once."""
    import torch

    from .checkpoint import check_and_load, load_state_dict_file
    from .config import WEIGHTS_FILE, read_config, read_model_config
    from .model import build_decoder

    path = Path(path)
    config = read_model_config(path)
    cfg = read_config(config["decoder"])
    with torch.device("meta"):
        model = build_decoder(cfg)
    sd = load_state_dict_file(path / WEIGHTS_FILE)
    external = config.get("external_weights") or {}
    if external:
        sd.update(external_tensors(external, memo))
    check_and_load(model, {k: v.float() if v.is_floating_point() else v for k, v in sd.items()},
                   str(path / WEIGHTS_FILE), assign=True)
    return model.to(device=device, dtype=dtype or torch.float32).eval(), config


def external_tensors(external: dict, memo: dict | None = None) -> dict:
    """Frozen tensors a model directory takes from an installed Whisper (e.g. tiny.en's token table), read
    from that Whisper's file alone: no Whisper model is built."""
    from .config import CheckpointError
    from .whisper_source import open_whisper

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
    decoder: "DecoderBase"
    tokenizer: object
    encoder: object
    decoding: object
    config: dict = field(default_factory=dict)
    int8: bool = False  # decoder and encoder Linear layers dynamically quantised to int8


def resolve_model(name_or_path=None) -> Path:
    """A model directory for None (the embedded default), a path, or a registered name (from the HF cache)."""
    from .config import CONFIG_FILE, CheckpointError

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
    import torch

    from .decoding_options import DecodingOptions
    from .encoder import load_encoder
    from .tokenizer import Tokenizer, TokenizerConfig

    if int8 and torch.device(device).type != "cpu":
        raise ValueError("int8 quantisation runs on the CPU only; use device cpu")
    path = resolve_model(name_or_path)
    whisper_memo: dict = {}  # the token table and the encoder of one Whisper come from one read of its file
    decoder, config = load_model_dir(path, device=device, dtype=dtype, memo=whisper_memo)
    try:
        decoding = DecodingOptions.from_config(config.get("decoding") or {})
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    tok_cfg = TokenizerConfig.from_dict(config.get("tokenizer", {}))
    tokenizer = Tokenizer(path / tok_cfg.file, tok_cfg)
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
    return LoadedModel(name, decoder, tokenizer, encoder, decoding, config, int8)


# ----------------------------------------------------------------------------------------------------------
# Running a model on windows


class Pipeline:
    """A loaded model (decoder, tokenizer, encoder, decoding defaults) and the options it runs with."""

    def __init__(self, model: "LoadedModel", decoding_overrides: dict | None = None):
        from .decoding_options import words_from_tokens

        self.model = model
        overrides = _clean_overrides(decoding_overrides or {})
        self.decoding = dataclasses.replace(model.decoding, **overrides)
        if self.decoding.shortlist_int8 and model.decoder.device.type != "cpu":
            if overrides.get("shortlist_int8"):
                raise ValueError("--shortlist-int8 runs on the CPU only; drop it on a GPU")
            # The model's CPU default does not apply on a GPU; the results record what ran.
            import warnings

            warnings.warn(f"{SHORTLIST_INT8_OFF} on {model.decoder.device.type}: the shortlist is picked in float",
                          stacklevel=2)
            self.decoding = dataclasses.replace(self.decoding, shortlist_int8=False)
        self.prefix_ids = list(model.tokenizer.prefix_ids)
        self.pad_id = model.tokenizer.pad_id
        self._words = words_from_tokens(model.tokenizer)
        self._to_words = self._words if self.decoding.selection != "confidence" else None
        self.language = model.config.get("language") or DEFAULT_LANGUAGE

    @classmethod
    def load(cls, options) -> "Pipeline":
        """The model a transcribe.TranscribeOptions names, on the device, with the threads, encoder batch and
        backend, int8 choice and decoding overrides it asks for."""
        import torch

        from .devices import resolve_device

        device, dtype = resolve_device(options.device, options.dtype)
        if options.threads:
            torch.set_num_threads(options.threads)
        encoder_options = {"batch_size": options.batch_size}  # windows per encoder call, as per decoder batch
        if options.encoder_backend is not None:
            encoder_options["backend"] = options.encoder_backend
        model = load_model(options.model, device=str(device), dtype=dtype, encoder_options=encoder_options,
                           int8=options.int8)
        return cls(model, options.decoding)

    def vad_options(self, base: VadOptions) -> VadOptions:
        """The VAD windows this model wants. A model trained on short utterances carries in its config a
        shorter maximum window (`audio.max_window_s`, a limit: a longer one asked for is cut to it), since it
        transcribes long windows worse, and a shorter pause that splits windows (`audio.split_silence_s`,
        used where `base` keeps VadOptions' default), so a window holds one utterance, as in training."""
        audio = self.model.config.get("audio") or {}
        limit, split = audio.get("max_window_s"), audio.get("split_silence_s")
        if limit and limit < base.max_window_s:
            base = base.with_max_window(limit)
        if split and base.split_silence_s == VadOptions.split_silence_s:
            base = base.with_split_silence(split)
        return base

    def encode(self, clips: list[np.ndarray]):
        return self.model.encoder.encode(clips)

    @property
    def alignment_heads(self) -> list[tuple[int, int]]:
        """The (layer, head) pairs whose cross-attention times words: the model config's `alignment_heads`,
        else (as openai-whisper does for models without a measured set) every head of the upper half."""
        heads = self.model.config.get("alignment_heads")
        if heads:
            return [(int(layer), int(head)) for layer, head in heads]
        c = self.model.decoder.config
        return [(layer, head) for layer in range(c.n_layer // 2, c.n_layer) for head in range(c.n_head)]

    def decode(self, conditions, durations: list[float], seeds: list[int | None], batch_size: int = DEFAULT_BATCH_SIZE,
               word_timestamps: bool = False):
        from .decoding import decode_windows

        # Up to batch_size windows share a forward per step, sorted by length; each has its own seed, so a
        # window decodes the same (up to float rounding) whatever else is in the batch.
        return decode_windows(self.model.decoder, conditions, self.decoding, self.prefix_ids, self.pad_id,
                              durations, to_words=self._to_words, seeds=seeds, max_batch_windows=batch_size,
                              alignment_heads=self.alignment_heads if word_timestamps else None)

    def text(self, result) -> str:
        return self.model.tokenizer.decode(result.text_tokens)

    def segments(self, window: Window, index: int, result, word_timestamps: bool, max_seconds: float) -> list[Segment]:
        """A decoded window's text as segments (ids to be numbered by the caller): words timed by the
        alignment heads' attention, or spread over the window without word timestamps."""
        groups = self._words(result.text_tokens)
        texts = [" " + self.model.tokenizer.decode_raw(g).strip() for g in groups]
        probs = result.token_confidences or [result.score] * len(result.text_tokens)
        starts = np.cumsum([0] + [len(g) for g in groups])  # each word's first token
        if word_timestamps and result.alignment is not None:
            words = align_words(np.asarray(result.alignment), groups, texts, probs, window.start, window.end,
                                lead=len(self.prefix_ids), speech=window.speech, frame_seconds=VAD_FRAME_SECONDS)
        else:
            means = [float(np.mean(probs[a:b])) for a, b in zip(starts[:-1], starts[1:])]
            runs = speech_runs(window.speech, window.start, VAD_FRAME_SECONDS) if window.speech else None
            words = spread_words(texts, means, window.start, window.end, runs)
        # Tokens that decode to nothing (a special token the text leaves out) are no words.
        spoken = [k for k, t in enumerate(texts) if t.strip()]
        probs = [p for k in spoken for p in probs[starts[k] : starts[k + 1]]]
        groups, words = [groups[k] for k in spoken], [words[k] for k in spoken]
        out, k, t0 = [], 0, 0  # words and tokens before the run
        for run in split_words(words, max_seconds):
            tokens = [t for g in groups[k : k + len(run)] for t in g]
            logp = [math.log(p) if p > 0 else MIN_LOG_PROB for p in probs[t0 : t0 + len(tokens)]]
            text = self.model.tokenizer.decode(self.prefix_ids + tokens)
            start, end = _at_least_a_frame(run[0].start, run[-1].end, window)
            out.append(Segment(0, start, end, text, result.score, tokens, index,
                               round(window.start * FRAMES_PER_SECOND), float(np.mean(np.maximum(logp, MIN_LOG_PROB))),
                               run if word_timestamps else None))
            k, t0 = k + len(run), t0 + len(tokens)
        return out


def _at_least_a_frame(start: float, end: float, window: Window) -> tuple[float, float]:
    """A segment's (start, end), at least one encoder frame long and inside its window (a subtitle cue that
    ends where it starts is shown by no player)."""
    frame = 1.0 / ENCODER_FRAMES_PER_SECOND
    if end - start >= frame:
        return start, end
    end = min(window.end, start + frame)
    return (start if end - start >= frame else max(window.start, end - frame)), end


def _clean_overrides(overrides: dict) -> dict:
    from .decoding_options import DecodingOptions

    known = {f.name for f in dataclasses.fields(DecodingOptions)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown decoding option(s) {', '.join(sorted(unknown))}")
    out = dict(overrides)
    if "schedule" in out and out["schedule"] is not None:
        out["schedule"] = tuple(float(x) for x in out["schedule"])
    return out
