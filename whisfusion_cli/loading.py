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
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .audio import ENCODER_FRAMES_PER_SECOND, FRAMES_PER_SECOND, SAMPLE_RATE
from .timing import Segment, align_words, speech_runs, split_words, spread_words
from .vad import FRAME_SECONDS as VAD_FRAME_SECONDS, VadOptions, Window

if TYPE_CHECKING:
    import torch

    from .model import DecoderBase
    from .numpy_model import NumpyDecoder

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


def load_numpy_decoder(path, memo: dict | None = None, config: dict | None = None) -> "tuple[NumpyDecoder, dict]":
    """(numpy_model.NumpyDecoder, config dict) from one of our model directories, for the torch-free CPU
    engine: the weights and the borrowed token table read as float32 arrays. NumpyUnsupported where the
    engine cannot run the model (the torch engine can). config: the directory's, where the caller read it."""
    from .config import CheckpointError, WEIGHTS_FILE, read_model_config
    from .numpy_model import NumpyDecoder, NumpyUnsupported
    from .whisper_source import open_whisper

    path = Path(path)
    config = read_model_config(path) if config is None else config
    NumpyDecoder.check_config(config["decoder"])  # before the weights are read
    weights = _numpy_state_dict(path / WEIGHTS_FILE)
    memo = {} if memo is None else memo
    for key, ref in (config.get("external_weights") or {}).items():
        checkpoint = open_whisper(ref["source"], memo)
        if ref["key"] not in checkpoint:
            raise CheckpointError(f"external weight {ref['key']} not found in {ref['source']}")
        weights[key] = checkpoint.array(ref["key"])
    try:
        return NumpyDecoder(weights, config["decoder"]), config
    except NumpyUnsupported:
        raise
    except ValueError as e:
        raise CheckpointError(f"{path / WEIGHTS_FILE}: {e}") from None


SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
                      "U8": "u1", "BOOL": "?"}


def _numpy_state_dict(path: Path) -> dict:
    """A model.safetensors as numpy arrays: views of the memory-mapped file, float32 as stored (other floats
    widened), checked as safetensors.numpy.load_file checks them (tests/test_numpy_engine.py compares). Our
    reader because the library's copies the whole file first (0.19 s of a 0.4 s start, measured)."""
    import json
    import mmap

    from .config import CheckpointError
    from .numpy_model import NumpyUnsupported, as_float32

    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: not a readable safetensors file ({why})")

    try:
        with open(path, "rb") as f:
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as e:  # ValueError: an empty file cannot be mapped
        raise bad(getattr(e, "strerror", None) or str(e)) from None
    n = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    if not 0 < n <= len(data) - 8:
        raise bad("truncated or not safetensors")
    try:
        header = json.loads(bytes(data[8 : 8 + n]))
    except ValueError:
        raise bad("damaged header") from None
    header.pop("__metadata__", None)
    out, body = {}, 8 + n
    for name, spec in header.items():
        dtype = spec.get("dtype") if isinstance(spec, dict) else None
        if dtype not in SAFETENSORS_DTYPES:
            raise NumpyUnsupported(f"{path}: {name} is stored as {dtype}, which numpy cannot hold") if dtype == "BF16" \
                else bad(f"{name}: unknown dtype {dtype}")
        begin, end = spec["data_offsets"]
        shape = tuple(spec["shape"])
        kind = np.dtype(SAFETENSORS_DTYPES[dtype])
        if not 0 <= begin <= end <= len(data) - body or end - begin != int(np.prod(shape)) * kind.itemsize:
            raise bad(f"{name}: data out of place or truncated")
        array = np.frombuffer(data, dtype=kind, count=int(np.prod(shape)), offset=body + begin).reshape(shape)
        out[name] = as_float32(array) if kind.kind == "f" else array
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
    engine: str = "torch"  # "torch" (model.py) or "numpy" (numpy_model.py: CPU, float32, no torch)


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
               int8: bool | None = False, engine: str = "torch") -> LoadedModel:
    """The model `name_or_path` (None: the embedded default) on device. int8: dynamic int8 quantisation of the
    decoder's and the encoder's Linear layers (CPU, float32 only); None: the model's own choice
    (`runtime.int8_on_cpu` in its config) where it runs in float32 on the CPU, float elsewhere.
    engine "numpy": the torch-free CPU engine (float32; device, dtype and int8 must leave it there)."""
    if engine == "numpy":
        if str(device) != "cpu" or dtype not in (None, "float32") or int8:
            raise ValueError("the numpy engine runs on the CPU in float32, without int8; use --engine torch")
        return _load_numpy_model(name_or_path, encoder_options)
    import torch

    from .encoder import load_encoder

    if int8 and torch.device(device).type != "cpu":
        raise ValueError("int8 quantisation runs on the CPU only; use device cpu")
    path = resolve_model(name_or_path)
    whisper_memo: dict = {}  # the token table and the encoder of one Whisper come from one read of its file
    decoder, config = load_model_dir(path, device=device, dtype=dtype, memo=whisper_memo)
    decoding, tokenizer, enc_spec = _model_parts(path, config, encoder_options)
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
    return LoadedModel(_model_name(path, name_or_path), decoder, tokenizer, encoder, decoding, config, int8)


def _load_numpy_model(name_or_path, encoder_options: dict | None) -> LoadedModel:
    """The model on the numpy engine, its float32 arrays from the engine cache where they were made before."""
    from .config import read_model_config
    from .encoder import load_encoder
    from .numpy_model import OUTPUT_HEAD, NumpyDecoder

    path = resolve_model(name_or_path)
    config = read_model_config(path)
    NumpyDecoder.check_config(config["decoder"])
    decoding, tokenizer, enc_spec = _model_parts(path, config, encoder_options)
    memo: dict = {}  # the token table and the encoder of one Whisper come from one read of its file
    cache = engine_cache_path(path, config, enc_spec, memo)
    arrays = _read_engine_cache(cache)
    if arrays is not None:
        try:
            decoder = NumpyDecoder(arrays["decoder"], config["decoder"])
            encoder = load_encoder(enc_spec, memo=memo, engine="numpy", weights=arrays["encoder"])
        except (KeyError, ValueError):  # not what this version writes: made again below
            arrays = None
    if arrays is None:
        decoder, _ = load_numpy_decoder(path, memo=memo, config=config)
        encoder = load_encoder(enc_spec, memo=memo, engine="numpy")
        _write_engine_cache(cache, {"decoder": {**decoder.w, OUTPUT_HEAD: decoder.head}, "encoder": encoder.encoder.w})
    return LoadedModel(_model_name(path, name_or_path), decoder, tokenizer, encoder, decoding, config, False, "numpy")


# The numpy engine's cache: a model's float32 arrays (decoder, borrowed token table and its transposed copy,
# the output projection; encoder; self-attention projections fused) as one safetensors file, memory-mapped on
# later loads. Widening the float16 files (the shipped model, tiny.en's model.bin) took 0.3-0.6 s of every
# start (measured); a mapped file takes none, and the mapped projection is not a second 77 MB in memory.
ENGINE_CACHE_SUBDIR = "numpy-engine"
ENGINE_CACHE_VERSION = 2  # of what the file holds; part of its key (2: the output projection in it)


def engine_cache_path(path: Path, config: dict, enc_spec: dict, memo: dict) -> Path:
    """Where the numpy engine keeps the arrays of the model directory `path`: a file named by a digest of
    what they are made from (this format's version, the decoder config, and the path, size and modification
    time of every weights file read), so a changed or reinstalled file gets a new one. In the user's cache
    (whisper_source.cache_dir: $XDG_CACHE_HOME/whisfusion)."""
    import hashlib
    import json

    from .config import WEIGHTS_FILE
    from .whisper_source import cache_dir, open_whisper

    sources = [str(path / WEIGHTS_FILE)]
    for ref in [*(config.get("external_weights") or {}).values(), {"source": enc_spec["source"]}]:
        sources.append(open_whisper(ref["source"], memo).origin)
    files = []
    for source in sources:
        st = os.stat(source)
        files.append([os.path.realpath(source), st.st_size, st.st_mtime_ns])
    key = json.dumps([ENGINE_CACHE_VERSION, config["decoder"], config.get("external_weights"), files], sort_keys=True)
    return cache_dir() / ENGINE_CACHE_SUBDIR / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.safetensors"


def _read_engine_cache(cache: Path) -> "dict | None":
    """{"decoder": arrays, "encoder": arrays} mapped from the cache file; None where there is none or it is
    damaged (truncated, half-written by a killed process: it is made again)."""
    from .config import CheckpointError

    if not cache.is_file():
        return None
    try:
        arrays = _numpy_state_dict(cache)
    except CheckpointError:
        return None
    parts: dict = {"decoder": {}, "encoder": {}}
    for name, array in arrays.items():
        part, _, rest = name.partition("/")
        if part not in parts:
            return None
        parts[part][rest] = array
    return parts


def _write_engine_cache(cache: Path, parts: dict) -> None:
    """Write the cache file atomically; where the cache cannot be written (a read-only home, a full disk)
    every load makes the arrays again, as it did the first time."""
    from safetensors.numpy import save_file

    from .fileio import atomic_path

    arrays = {f"{part}/{name}": np.ascontiguousarray(a) for part, named in parts.items() for name, a in named.items()}
    try:
        with atomic_path(cache) as tmp:
            save_file(arrays, str(tmp), metadata={"format": "whisfusion-numpy-engine", "version": str(ENGINE_CACHE_VERSION)})
    except OSError:
        pass


def _model_parts(path: Path, config: dict, encoder_options: dict | None) -> tuple:
    """(decoding defaults, tokenizer, encoder spec) of a model directory, whatever engine runs it."""
    from .decoding_options import DecodingOptions
    from .tokenizer import Tokenizer, TokenizerConfig

    try:
        decoding = DecodingOptions.from_config(config.get("decoding") or {})
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    tok_cfg = TokenizerConfig.from_dict(config.get("tokenizer", {}))
    enc_spec = dict(config.get("encoder", {}))
    enc_spec.update(encoder_options or {})
    return decoding, Tokenizer(path / tok_cfg.file, tok_cfg), enc_spec


def _model_name(path: Path, name_or_path) -> str:
    return "default" if path == DEFAULT_MODEL_DIR else str(name_or_path)


def choose_engine(options, decoding: "dict | None" = None) -> str:
    """The engine a transcribe.TranscribeOptions runs on: its `engine` where it says "torch" or "numpy" (a
    one-line ValueError where numpy cannot run what it asks for), else ("auto") numpy wherever numpy can run
    it (the CPU in float32, no --int8, our own encoder, a Whisper-family decoder and decoding options that
    numpy_decoding runs), torch elsewhere. decoding: the decoding overrides (options.decoding)."""
    from .config import read_config, read_model_config
    from .decoding_options import DecodingOptions
    from .devices import device_names
    from .numpy_decoding import unsupported

    if options.engine == "torch":
        return "torch"
    reasons = []
    device, dtype = device_names(options.device, options.dtype)
    if device != "cpu" or dtype != "float32":
        reasons.append(f"{device} in {dtype} (it runs on the CPU in float32)")
    if options.int8:
        reasons.append("int8 (torch's dynamic quantisation)")
    if options.encoder_backend not in (None, "auto"):
        reasons.append(f"the {options.encoder_backend} encoder backend")
    config = read_model_config(resolve_model(options.model))
    family = read_config(config["decoder"]).family
    if family != "whisper":
        reasons.append(f"the {family} decoder family")
    else:
        overrides = _clean_overrides(options.decoding if decoding is None else decoding)
        try:
            merged = dataclasses.replace(DecodingOptions.from_config(config.get("decoding") or {}), **overrides)
        except (TypeError, ValueError):
            merged = None  # reported by the engine that runs it
        reason = unsupported(merged) if merged is not None else None
        if reason:
            reasons.append(reason)
    if not reasons:
        return "numpy"
    if options.engine == "numpy":
        raise ValueError(f"the numpy engine does not run {'; '.join(reasons)}: use --engine torch (or auto)")
    return "torch"


# ----------------------------------------------------------------------------------------------------------
# Running a model on windows


def _as_array(states) -> np.ndarray:
    """Encoder states [F, d] as a float32 numpy array (a torch tensor's copy on the CPU)."""
    if isinstance(states, np.ndarray):
        return states
    states = states.squeeze(0) if states.dim() == 3 else states
    return states.float().cpu().numpy()


class Pipeline:
    """A loaded model (decoder, tokenizer, encoder, decoding defaults) and the options it runs with."""

    def __init__(self, model: "LoadedModel", decoding_overrides: dict | None = None):
        from .decoding_options import words_from_tokens

        self.model = model
        overrides = _clean_overrides(decoding_overrides or {})
        self.decoding = dataclasses.replace(model.decoding, **overrides)
        if self.decoding.shortlist_int8 and model.engine == "torch" and model.decoder.device.type != "cpu":
            if overrides.get("shortlist_int8"):
                raise ValueError("--shortlist-int8 runs on the CPU only; drop it on a GPU")
            # The model's CPU default does not apply on a GPU; the results record what ran.
            import warnings

            warnings.warn(f"{SHORTLIST_INT8_OFF} on {model.decoder.device.type}: the shortlist is picked in float",
                          stacklevel=2)
            self.decoding = dataclasses.replace(self.decoding, shortlist_int8=False)
        if overrides.get("verify_short") and not self.decoding.verify:
            raise ValueError("--verify-short reads short windows with the verifier: it needs --verify")
        self.prefix_ids = list(model.tokenizer.prefix_ids)
        self.pad_id = model.tokenizer.pad_id
        self._words = words_from_tokens(model.tokenizer)
        self._to_words = self._words if self.decoding.selection != "confidence" else None
        self.language = model.config.get("language") or DEFAULT_LANGUAGE
        self.verifier = self._verifier() if self.decoding.verify else None

    @classmethod
    def load(cls, options, encoder_options: dict | None = None) -> "Pipeline":
        """The model a transcribe.TranscribeOptions names, on the engine and device, with the threads, encoder
        batch and backend, int8 choice and decoding overrides it asks for; encoder_options: more EncoderOptions
        fields (bench's encoder mode)."""
        encoder_options = {"batch_size": options.batch_size, **(encoder_options or {})}  # windows per encoder call
        if options.encoder_backend is not None:
            encoder_options["backend"] = options.encoder_backend
        if choose_engine(options) == "numpy":
            if options.threads:
                from threadpoolctl import threadpool_limits

                threadpool_limits(options.threads, user_api="blas")  # numpy's BLAS, for the rest of the process
            encoder_options.pop("backend", None)
            return cls(load_model(options.model, encoder_options=encoder_options, engine="numpy"), options.decoding)
        import torch

        from .devices import resolve_device

        device, dtype = resolve_device(options.device, options.dtype)
        if options.threads:
            torch.set_num_threads(options.threads)
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
        decoder = self.model.decoder
        c = decoder.config if self.model.engine == "torch" else decoder  # a ModelConfig; NumpyDecoder has both
        n_layer, n_head = c.n_layer, c.n_head
        return [(layer, head) for layer in range(n_layer // 2, n_layer) for head in range(n_head)]

    def decode(self, conditions, durations: list[float], seeds: list[int | None], batch_size: int = DEFAULT_BATCH_SIZE,
               word_timestamps: bool = False, clips: list[np.ndarray] | None = None):
        """Windows' encoder states -> DecodingResults. clips: the windows' audio, for verification's second
        encoding of short windows (decoding.verify_short; without clips every window is verified as a long one)."""
        heads = self.alignment_heads if word_timestamps else None
        revise = None
        if self.verifier is not None:
            def revise(results, indices):
                self._verify(results, [conditions[i] for i in indices],
                             [None if clips is None else clips[i] for i in indices], [durations[i] for i in indices])
        if self.model.engine == "numpy":
            from .numpy_decoding import decode_windows as decode_numpy

            # One candidate per window draws no random numbers: seeds play no part.
            return decode_numpy(self.model.decoder, conditions, self.decoding, self.prefix_ids, self.pad_id,
                                durations, heads, max_batch_windows=batch_size, revise=revise)
        from .decoding import decode_windows

        # Up to batch_size windows share a forward per step, sorted by length; each has its own seed, so a
        # window decodes the same (up to float rounding) whatever else is in the batch.
        return decode_windows(self.model.decoder, conditions, self.decoding, self.prefix_ids, self.pad_id,
                              durations, to_words=self._to_words, seeds=seeds, max_batch_windows=batch_size,
                              alignment_heads=heads, revise=revise)

    def _verifier(self):
        """verify.Verifier: the causal decoder of the Whisper whose encoder the model runs on (its tokens are
        the model's: a Whisper-family tokenizer)."""
        from .decoding_options import word_start_test
        from .verify import Verifier
        from .whisper_source import open_whisper

        tok = self.model.tokenizer
        source = (self.model.config.get("encoder") or {}).get("source")
        if tok.config.kind != "whisper" or not source:
            raise ValueError("--verify needs a model with a Whisper encoder and Whisper's tokenizer")
        # On the numpy engine the draft decoder's token table is the same Whisper's (external_weights): shared.
        table_source = ((self.model.config.get("external_weights") or {}).get("embed_tokens.weight") or {}).get("source")
        shared = self.model.decoder if self.model.engine == "numpy" and table_source == source else None
        try:
            return Verifier.from_checkpoint(open_whisper(source), self.prefix_ids, tok.eos_id, shared, _word_test(tok),
                                            word_start_test(tok), _spoken_words(tok))
        except (KeyError, ValueError) as e:
            raise ValueError(f"--verify: {source} has no Whisper decoder to verify with ({e})") from None

    def _verify(self, results, states, clips, durations) -> None:
        """Each window's text replaced by its verified text (revise hook of the decode loops); a window of at
        most decoding.verify_short seconds, whose audio is in clips, is also read on its encoding padded with
        silence, and the read replaces the verified text where it is much the likelier there (Verifier.reread)."""
        short = self.decoding.verify_short
        for r, s, clip, duration in zip(results, states, clips, durations):
            verified = self.verifier.verify(r.text_tokens, _as_array(s), r.token_confidences or None)
            if clip is not None and duration is not None and duration <= short:
                verified = self.verifier.reread(verified, r.text_tokens, self._padded_states(clip),
                                                r.token_confidences or None)
            r.text_tokens, r.token_confidences = verified.tokens, verified.confidences

    def _padded_states(self, clip: np.ndarray) -> np.ndarray:
        """Encoder states of a short window padded with silence, as `read` wants it (verify.read_context), by
        the model's encoder (the same weights; only how the clip is padded differs)."""
        from .verify import read_context

        return _as_array(self.model.encoder.encode_padded([clip], read_context(len(clip) / SAMPLE_RATE))[0])

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


def _word_test(tokenizer):
    """is_word(token id): whether the token's text holds a letter or a digit (memoised)."""
    memo: dict[int, bool] = {}

    def is_word(token: int) -> bool:
        if token not in memo:
            memo[token] = any(ch.isalnum() for ch in tokenizer.decode_raw([token]))
        return memo[token]

    return is_word


def _spoken_words(tokenizer):
    """spoken(token ids): the words they say, lower case, punctuation dropped ("Falling star." -> "falling star")."""

    def spoken(ids) -> str:
        return " ".join("".join(ch if ch.isalnum() else " " for ch in tokenizer.decode(list(ids)).lower()).split())

    return spoken


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
