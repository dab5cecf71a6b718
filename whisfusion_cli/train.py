"""Training: upstream's two stages for the SMDM decoder, and training a decoder from scratch or from a
pre-trained Whisper decoder. One visible loop: data, masking, forward, loss, backward, step, eval, checkpoint.

Stages (SPEC section 5):
* `1`: SMDM base + a fresh cross-attention adapter; only the adapter trains. p = (1-eps)t + eps, t ~ U(0, 1).
* `2`: base + stage-1 adapter; everything trains; p ~ U(0.7, 1) clamped to 1-eps; EMA used for validation;
  optional layer-wise LR decay.
* `scratch`: any config from random init, or (Whisper family) from a pre-trained Whisper decoder
  (`--init tiny.en`), with the mask embedding set to the mean token embedding and the tied token table
  optionally frozen.

Determinism, so that resume and DDP are exact: the order of the data is a function of (seed, epoch), and the
random numbers of the forward process are a function of (seed, step) drawn for the whole global batch on
every rank (each rank takes its rows). The loss is the mean over all masked positions of the global batch,
whichever way it is split over ranks and accumulation steps, because every rank knows the global number of
masked positions before the forward pass.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

STAGES = ("1", "2", "scratch")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
MASK_EPS = 1e-3
STAGE2_MASK_RANGE = (0.7, 1.0)
REFERENCE_BATCH = 64  # upstream scales its learning rates by global batch / 64
STAGE1_LR, STAGE1_LR_CAP = 1e-4, 3e-4
STAGE2_LR, STAGE2_LR_FACTOR = 1e-5, 0.5
SCRATCH_LR = 2e-4  # what trains a Whisper-initialised decoder well at batch 32 (notes/default-model-probe)
EMA_DECAY = 0.995
LAYER_DECAY = 0.9
MAX_AUTO_CANVAS = 448  # Whisper's decoder position table
STATE_MASK_SPANS = 2  # spans of encoder frames masked per item by --state-time-mask
LENGTH_GROUP = 32  # global batches per length-sorted chunk (bucketing of variable-length encoder states)
LAST_CHECKPOINT = "last.pt"
MODEL_SUBDIR = "model"
METRICS_FILE = "metrics.jsonl"
# Options that must not change across --resume (they define the run's exact trajectory).
RESUME_FIXED = (
    "stage", "base", "init", "config", "tokenizer", "seq_len", "batch_size", "grad_accum", "lr", "min_lr_ratio",
    "warmup", "max_steps", "epochs", "weight_decay", "betas", "adam_eps", "grad_clip", "mask_range", "ema_decay",
    "layer_decay", "freeze_embeddings", "seed", "val_items", "mask_prefix", "canvas", "state_time_mask", "state_noise",
)


class TrainError(RuntimeError):
    """A training run that cannot continue; the message says why in one line."""


@dataclass
class TrainOptions:
    data: str | list  # shard folder(s) written by `whisfusion preprocess`; several are concatenated
    output: str  # run folder: last.pt, metrics.jsonl, model/, upstream .pt files
    stage: str = "scratch"  # "1" | "2" | "scratch"
    base: str | None = None  # SMDM base weights (stages 1 and 2)
    init: str | None = None  # stage 2: stage-1 adapter (or full decoder); scratch: "random" or a Whisper model
    config: str | None = None  # scratch with random init: ModelConfig JSON file or preset name
    tokenizer: str | None = None  # tokenizer.json; the Whisper family takes the Whisper model's own by default
    val_data: str | None = None  # separate validation shards; else val_items are held out from data
    val_items: int = 200
    wer_items: int = 32  # validation items decoded with Parallel Diffusion Decoding for the WER
    seq_len: int | None = None  # canvas; None: 256 for the SMDM family, longest target + margin for Whisper
    # "fixed": every canvas is seq_len long (upstream). "audio": each batch's canvas is sized to its audio the
    # way decoding sizes it (decoding.DecodingOptions.canvas_length), capped at seq_len: training matches
    # inference with a sized canvas, and short utterances stop paying for a long tail of pads.
    canvas: str = "fixed"
    batch_size: int = 16  # per rank and accumulation step
    grad_accum: int = 1
    lr: float | None = None  # None: the stage's upstream rule (scaled by global batch / 64)
    min_lr_ratio: float | None = None  # cosine floor as a fraction of lr (stage 1: 0.1, stage 2: 0.01)
    warmup: float = 0.1  # fraction of the run if < 1, else steps
    max_steps: int | None = None  # length of the schedule; None: from epochs
    epochs: float = 10.0
    stop_at: int | None = None  # stop (with a `last` checkpoint) after this step without changing the schedule
    time_limit: float | None = None  # minutes; stop cleanly (with a `last` checkpoint) when exceeded
    weight_decay: float | None = None
    betas: tuple[float, float] | None = None
    adam_eps: float = 1e-8
    grad_clip: float | None = None
    mask_range: tuple[float, float] | None = None  # t ~ U(lo, hi)
    # Augmentation of the encoder states (training batches only; the shards hold them precomputed, so this is
    # where SpecAugment-style regularisation can act): up to STATE_MASK_SPANS spans per item, each up to this
    # fraction of its frames, replaced by the item's mean state; and Gaussian noise of this std relative to
    # the item's own std. 0 turns either off.
    state_time_mask: float = 0.0
    state_noise: float = 0.0
    mask_prefix: bool | None = None  # None: SMDM masks BOS like upstream; the Whisper family never masks its prefix
    ema_decay: float | None = None  # None: 0.995 in stage 2, off otherwise; 0 turns it off
    layer_decay: float | None = None  # e.g. 0.9 (stage 2 option)
    freeze_embeddings: bool | None = None  # Whisper family: keep the tied token table fixed (default True)
    eval_every: int = 500
    save_every: int = 500
    log_every: int = 10
    patience: int | None = 5  # early stopping: evaluations without a better validation loss
    # Parallel Diffusion Decoding for the validation WER. None: upstream's (15 candidates, 4 steps, "remask")
    # for the SMDM family; 1 candidate, 8 steps, "confidence" for the Whisper family.
    decode_steps: int | None = None
    decode_candidates: int | None = None
    decode_strategy: str | None = None
    seed: int = 1234
    device: str | None = None  # None: cuda:LOCAL_RANK where available, else cpu
    # "auto": fp32 on the CPU; on a GPU bf16 autocast where bf16 is native (Ampere on), else fp16 autocast with
    # loss scaling (T4, V100), fp32 products on TF32 tensor cores where there are some.
    precision: str = "auto"  # "auto" | "fp32" | "bf16" | "fp16"
    resume: bool = False
    progress: bool = True
    name: str = "whisfusion"  # prefix of the upstream-format files

    def __post_init__(self):
        self.stage = str(self.stage)
        if self.stage not in STAGES:
            raise ValueError(f"stage {self.stage!r}: expected one of {', '.join(STAGES)}")
        if self.betas is not None:
            self.betas = tuple(float(b) for b in self.betas)
        if self.mask_range is not None:
            self.mask_range = tuple(float(b) for b in self.mask_range)
            lo, hi = self.mask_range
            if not 0.0 <= lo <= hi <= 1.0:
                raise ValueError(f"mask_range {self.mask_range}: need 0 <= lo <= hi <= 1")
        if not 0.0 <= self.state_time_mask < 0.5 or self.state_noise < 0.0:
            raise ValueError("state_time_mask must lie in [0, 0.5) and state_noise must be >= 0")
        if self.canvas not in ("fixed", "audio"):
            raise ValueError(f"canvas {self.canvas!r}: expected 'fixed' or 'audio'")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("batch_size and grad_accum must be >= 1")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r}: expected one of {', '.join(PRECISIONS)}")

    def resolved(self, global_batch: int) -> "TrainOptions":
        """A copy with the stage's upstream defaults filled in."""
        o = TrainOptions(**{f.name: getattr(self, f.name) for f in fields(self)})
        scale = global_batch / REFERENCE_BATCH
        if o.stage == "1":
            o.lr = o.lr if o.lr is not None else min(STAGE1_LR * scale, STAGE1_LR_CAP)
            o.min_lr_ratio = 0.1 if o.min_lr_ratio is None else o.min_lr_ratio
            o.betas = o.betas or (0.9, 0.95)
            o.weight_decay = 0.01 if o.weight_decay is None else o.weight_decay
            o.grad_clip = 0.5 if o.grad_clip is None else o.grad_clip
            o.mask_range = o.mask_range or (0.0, 1.0)
        elif o.stage == "2":
            o.lr = o.lr if o.lr is not None else STAGE2_LR * scale * STAGE2_LR_FACTOR
            o.min_lr_ratio = 0.01 if o.min_lr_ratio is None else o.min_lr_ratio
            o.betas = o.betas or (0.9, 0.999)
            o.weight_decay = 0.005 if o.weight_decay is None else o.weight_decay
            o.grad_clip = 0.5 if o.grad_clip is None else o.grad_clip  # SPEC gives none for stage 2; as stage 1
            o.mask_range = o.mask_range or STAGE2_MASK_RANGE
            o.ema_decay = EMA_DECAY if o.ema_decay is None else o.ema_decay
        else:
            o.lr = o.lr if o.lr is not None else SCRATCH_LR
            o.min_lr_ratio = 0.1 if o.min_lr_ratio is None else o.min_lr_ratio
            o.betas = o.betas or (0.9, 0.98)
            o.weight_decay = 0.01 if o.weight_decay is None else o.weight_decay
            o.grad_clip = 1.0 if o.grad_clip is None else o.grad_clip
            o.mask_range = o.mask_range or (0.0, 1.0)
        o.ema_decay = o.ema_decay or None
        return o

    def decoding_options(self, family: str, seq_len: int | None, max_seq_len: int):
        from .decoding import UPSTREAM_CANDIDATES, UPSTREAM_STEPS, DecodingOptions

        smdm = family == "smdm"
        return DecodingOptions(
            candidates=self.decode_candidates or (UPSTREAM_CANDIDATES if smdm else 1),
            steps=self.decode_steps or (UPSTREAM_STEPS if smdm else 8),
            strategy=self.decode_strategy or ("remask" if smdm else "confidence"),
            seq_len=seq_len, max_seq_len=max_seq_len, seed=self.seed,
        )


def autocast_dtype(precision: str, device):
    """The autocast dtype of a run (None: plain fp32) for its precision option on this device."""
    import torch

    from .distributed import half_dtype

    if precision == "fp16" and device.type != "cuda":
        raise TrainError("--precision fp16 needs a GPU (loss scaling); use fp32 or bf16 on the CPU")
    if precision == "auto":
        return half_dtype(device) if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


# ----------------------------------------------------------------------------------------------------------
# The forward process


def mask_probabilities(t, mask_range, eps: float = MASK_EPS):
    """Per-sequence mask probability from t ~ U(lo, hi): upstream stage 1 uses p = (1-eps)t + eps over
    U(0, 1); stage 2 draws p ~ U(0.7, 1) and clamps it to 1-eps."""
    lo, hi = mask_range
    if lo == 0.0:
        return (1 - eps) * t + eps
    return t.clamp(max=1 - eps)


def draw_masks(seed: int, step: int, global_batch: int, seq_len: int, mask_range, n_prefix_fixed: int):
    """bool [global_batch, seq_len]: which positions are masked at this step. A function of (seed, step)
    only, so every rank, a resumed run and a single-process run draw the same masks."""
    import torch

    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    lo, hi = mask_range
    t = lo + (hi - lo) * torch.rand(global_batch, generator=g)
    p = mask_probabilities(t, mask_range)
    u = torch.rand(global_batch, seq_len, generator=g)
    mask = u < p[:, None]
    mask[:, :n_prefix_fixed] = False
    return mask


def augment_states(cond, frames: list[int], time_mask: float, noise: float, seed: int, step: int, micro: int):
    """Encoder states [B, F, d] (item b's first frames[b] are real, the rest zero padding) with up to
    STATE_MASK_SPANS spans of at most time_mask * frames[b] frames set to the item's mean state, then
    Gaussian noise of noise x the item's std added to its real frames. Draws depend on (seed, step, micro)
    only, so a resumed run augments exactly as an uninterrupted one. Returns a new tensor."""
    import torch

    g = torch.Generator().manual_seed((seed * 1_000_003 + step) * 64 + micro)
    out = cond.clone()
    for b, n in enumerate(frames):
        real = out[b, :n]
        mean, std = real.mean(0), real.std()
        limit = int(time_mask * n)  # an item too short for one frame at this fraction is not masked
        if limit > 0:
            for _ in range(STATE_MASK_SPANS):
                width = int(torch.randint(0, limit + 1, (1,), generator=g))
                start = int(torch.randint(0, n - width + 1, (1,), generator=g))
                real[start : start + width] = mean
        if noise > 0:
            real += noise * std * torch.randn(real.shape, generator=g, dtype=real.dtype)
    return out


# ----------------------------------------------------------------------------------------------------------
# Data order


def epoch_batches(lengths: list[int], global_batch: int, seed: int, epoch: int) -> list[list[int]]:
    """The global batches of one epoch, deterministic in (seed, epoch). Items are shuffled, then cut into
    chunks of LENGTH_GROUP batches that are sorted by encoder length (bucketing: padding stays small), and
    the batches are shuffled again. An incomplete last batch is dropped."""
    import torch

    g = torch.Generator().manual_seed(seed * 7919 + epoch)
    perm = torch.randperm(len(lengths), generator=g).tolist()
    if len(set(lengths)) > 1:
        chunk = global_batch * LENGTH_GROUP
        perm = [i for c in range(0, len(perm), chunk) for i in sorted(perm[c : c + chunk], key=lambda i: lengths[i])]
    batches = [perm[b : b + global_batch] for b in range(0, len(perm) - global_batch + 1, global_batch)]
    order = torch.randperm(len(batches), generator=g).tolist()
    return [sorted(batches[i], key=lambda i: (lengths[i], i)) for i in order]


# ----------------------------------------------------------------------------------------------------------
# Building the model


def _whisper_tokenizer_file(name: str) -> Path:
    from .ct2_import import TINY_EN_NAME, tiny_en_dir

    path = tiny_en_dir() if name == TINY_EN_NAME else Path(name).expanduser()
    f = path / "tokenizer.json"
    if not f.is_file():
        raise TrainError(f"{path}: no tokenizer.json beside the Whisper model; pass --tokenizer")
    return f


def whisper_tokenizer_config(tokenizer_file: Path):
    """The Whisper canvas convention, with the special ids read from this tokenizer (multilingual ids differ)."""
    from tokenizers import Tokenizer as HFTokenizer

    from .tokenizer import TokenizerConfig

    tok = HFTokenizer.from_file(str(tokenizer_file))
    cfg = TokenizerConfig.whisper()
    ids = [tok.token_to_id(t) for t in ("<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>")]
    if None in ids:
        raise TrainError(f"{tokenizer_file}: not a Whisper tokenizer (special tokens missing)")
    eot, sot, notimestamps = ids
    cfg.file = str(tokenizer_file)
    cfg.prefix_ids, cfg.pad_id, cfg.eos_id, cfg.first_special_id = [sot, notimestamps], eot, eot, eot
    return cfg


def llama_tokenizer_config(tokenizer_file: Path):
    """Upstream's canvas convention (BOS prefix, pad = EOS), with the ids of `<s>`/`</s>` read from the file
    when it has them (any SentencePiece-style tokenizer; TinyLlama's are 1 and 2)."""
    from tokenizers import Tokenizer as HFTokenizer

    from .tokenizer import TokenizerConfig

    try:
        tok = HFTokenizer.from_file(str(tokenizer_file))
    except Exception as e:  # the library raises plain Exception on malformed files
        raise TrainError(f"{tokenizer_file}: not a valid tokenizers file ({str(e).splitlines()[0]})") from None
    cfg = TokenizerConfig.llama()
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    cfg.file = str(tokenizer_file)
    if bos is not None and eos is not None:
        cfg.prefix_ids, cfg.pad_id, cfg.eos_id = [bos], eos, eos
    return cfg


def whisper_decoder_from_pretrained(name: str, condition_dim: int):
    """A WhisperDiffusionDecoder holding a pre-trained Whisper decoder's weights (transformers names minus
    `model.decoder.`), its mask embedding set to the mean token embedding."""
    import torch

    from .ct2_import import load_whisper
    from .model import ModelConfig, build_decoder

    hf = load_whisper(name)
    c = hf.config
    config = ModelConfig(
        family="whisper",
        name=f"whisper-{Path(name).name}-diffusion",
        n_layer=c.decoder_layers,
        n_head=c.decoder_attention_heads,
        n_embd=c.d_model,
        intermediate_size=c.decoder_ffn_dim,
        vocab_size=c.vocab_size,
        block_size=c.max_target_positions,
        output_vocab_size=c.eos_token_id + 1,  # text tokens and end-of-text come first in Whisper's vocabulary
        condition_dim=condition_dim,
    )
    decoder = build_decoder(config)
    prefix = "model.decoder."
    sd = {k[len(prefix):]: v for k, v in hf.state_dict().items() if k.startswith(prefix)}
    missing, unexpected = decoder.load_state_dict(sd, strict=False)
    allowed = {"mask_embedding"} | {k for k in decoder.state_dict() if k.startswith("condition_proj")}
    if set(missing) - allowed or unexpected:
        raise TrainError(f"{name}: Whisper decoder weights do not fit (missing {missing}, unexpected {unexpected})")
    with torch.no_grad():
        decoder.mask_embedding.copy_(decoder.embed_tokens.weight.mean(0))
    return decoder


def build_model(o: TrainOptions, data_dim: int):
    """(decoder, tokenizer, tokenizer_config dict, tokenizer file) for the run's stage and init."""
    import torch

    from .checkpoint import CheckpointError, check_and_load, load_state_dict_file, read_config
    from .model import ModelConfig, build_decoder, init_weights
    from .tokenizer import Tokenizer

    torch.manual_seed(o.seed)  # fresh adapters / random init are part of the deterministic run
    init = o.init or "random"
    try:
        if o.stage in ("1", "2"):
            if o.base is None:
                raise TrainError(f"stage {o.stage} needs --base (the SMDM base weights)")
            base = load_state_dict_file(o.base)
            config = ModelConfig.from_dict(read_config(o.config).to_dict())  # a copy: presets are shared
            if config.family != "smdm":
                raise TrainError("stages 1 and 2 train the SMDM family; use --stage scratch for the Whisper family")
            config.condition_dim = data_dim
            decoder = build_decoder(config)
            fresh = decoder.state_dict()
            sd = {k: v for k, v in base.items() if k in fresh}
            if o.stage == "1" and o.init not in (None, "random"):
                sd.update(load_state_dict_file(o.init))
            if o.stage == "2":
                if o.init in (None, "random"):
                    raise TrainError("stage 2 needs --init: the stage-1 adapter (or a full decoder) to start from")
                sd.update(load_state_dict_file(o.init))
            # Adapter tensors absent from the files keep PyTorch's default init (upstream's stage 1), and so
            # does our projection from another encoder width.
            for k, v in fresh.items():
                if (o.stage == "1" and _is_adapter(k, "smdm")) or k.startswith("condition_proj"):
                    sd.setdefault(k, v)
            check_and_load(decoder, sd, " + ".join(str(p) for p in (o.base, o.init) if p and p != "random"))
        elif init == "random":
            config = ModelConfig.from_dict(read_config(o.config).to_dict())
            config.condition_dim = data_dim
            decoder = build_decoder(config)
            init_weights(decoder)
        else:
            path = Path(init)
            if path.is_dir() and (path / "config.json").is_file() and "whisfusion-model" in (path / "config.json").read_text():
                from .checkpoint import load_model_dir

                decoder, _ = load_model_dir(path)
                decoder.train()
            else:
                decoder = whisper_decoder_from_pretrained(init, data_dim)
    except CheckpointError as e:
        raise TrainError(str(e)) from None

    family = decoder.config.family
    if o.tokenizer:
        tok_file = Path(o.tokenizer)
        tok_cfg = whisper_tokenizer_config(tok_file) if family == "whisper" else llama_tokenizer_config(tok_file)
    elif family == "whisper":
        source = init if init != "random" else "tiny.en"
        if Path(source).is_dir() and (Path(source) / "tokenizer.json").is_file():
            tok_file = Path(source) / "tokenizer.json"
        else:
            tok_file = _whisper_tokenizer_file(source)
        tok_cfg = whisper_tokenizer_config(tok_file)
    else:
        raise TrainError("the SMDM family needs --tokenizer (the TinyLlama tokenizer.json)")
    try:
        tokenizer = Tokenizer(tok_file, tok_cfg)
    except (FileNotFoundError, ValueError) as e:
        raise TrainError(str(e)) from None
    rows = decoder.config.padded_vocab_size if family == "smdm" else decoder.config.vocab_size
    if tokenizer.vocab_size > rows:
        raise TrainError(f"{tok_file}: tokenizer has {tokenizer.vocab_size} tokens, the decoder only {rows} (wrong tokenizer?)")
    cd = decoder.config.condition_dim or decoder.config.n_embd
    if cd != data_dim:
        raise TrainError(f"encoder width {data_dim} of the shards does not match the decoder's condition width {cd}")
    return decoder, tokenizer, tok_cfg.to_dict(), tok_file


def _is_adapter(name: str, family: str) -> bool:
    from .model import is_adapter_key

    return is_adapter_key(name) or (family == "whisper" and "encoder_attn" in name)


def trainable_names(decoder, o: TrainOptions) -> set[str]:
    family = decoder.config.family
    names = set()
    for name, _ in decoder.named_parameters():
        if o.stage == "1":
            if _is_adapter(name, family):
                names.add(name)
        elif family == "whisper" and o.freeze_embeddings is not False and name == "embed_tokens.weight":
            continue  # tied output: keeps the pre-trained vocabulary geometry (and 19M parameters) fixed
        else:
            names.add(name)
    return names


def _layer_index(name: str) -> int | None:
    for marker in ("transformer.h.", "layers."):
        if name.startswith(marker):
            return int(name[len(marker):].split(".")[0])
    return None


def param_groups(decoder, names: set[str], o: TrainOptions) -> list[dict]:
    """AdamW groups: no weight decay on names containing "norm" or "bias" (upstream); with layer decay each
    block gets lr * decay^(n_layer-1-i) and the embeddings/head/final norm lr * decay^n_layer."""
    n_layer = decoder.config.n_layer
    groups: dict = {}
    for name, p in decoder.named_parameters():
        if name not in names:
            continue
        no_decay = "norm" in name or "bias" in name
        scale = 1.0
        if o.layer_decay:
            i = _layer_index(name)
            scale = o.layer_decay ** (n_layer - 1 - i) if i is not None else o.layer_decay**n_layer
        key = (no_decay, scale)
        g = groups.setdefault(key, {"params": [], "names": [], "weight_decay": 0.0 if no_decay else o.weight_decay,
                                     "lr_scale": scale})
        g["params"].append(p)
        g["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def lr_at(step: int, o: TrainOptions, total: int) -> float:
    """Linear warm-up, then cosine from lr to lr * min_lr_ratio at the last step."""
    warmup = int(o.warmup * total) if o.warmup < 1 else int(o.warmup)
    if warmup and step < warmup:
        return o.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    floor = o.lr * o.min_lr_ratio
    return floor + (o.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class EMA:
    """Exponential moving average of the trainable weights, decay min(decay, (1+n)/(10+n)) (upstream)."""

    def __init__(self, decoder, names: set[str], decay: float):
        self.decay, self.n = decay, 0
        self.shadow = {k: v.detach().float().clone() for k, v in decoder.named_parameters() if k in names}

    def update(self, decoder):
        import torch

        d = min(self.decay, (1 + self.n) / (10 + self.n))
        with torch.no_grad():
            for k, p in decoder.named_parameters():
                if k in self.shadow:
                    self.shadow[k].mul_(d).add_(p.detach().float(), alpha=1 - d)
        self.n += 1

    def state_dict(self):
        return {"decay": self.decay, "n": self.n, "shadow": self.shadow}

    def load_state_dict(self, state):
        self.decay, self.n = state["decay"], state["n"]
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)


class _swapped:
    """Context: the decoder holds the EMA weights inside, its own weights again after."""

    def __init__(self, decoder, ema: EMA | None):
        self.decoder, self.ema, self.saved = decoder, ema, None

    def __enter__(self):
        import torch

        if self.ema is not None:
            params = dict(self.decoder.named_parameters())
            self.saved = {k: params[k].detach().clone() for k in self.ema.shadow}
            with torch.no_grad():
                for k, v in self.ema.shadow.items():
                    params[k].copy_(v)
        return self.decoder

    def __exit__(self, *exc):
        import torch

        if self.saved is not None:
            params = dict(self.decoder.named_parameters())
            with torch.no_grad():
                for k, v in self.saved.items():
                    params[k].copy_(v)


# ----------------------------------------------------------------------------------------------------------
# Data


class Batches:
    """Token targets for every item (built once) and the encoder states, read per batch from the shards."""

    def __init__(self, dataset, indices: list[int], tokenizer, seq_len: int):
        import torch

        self.dataset, self.indices = dataset, indices
        # Tokenised once; int32 keeps 280k LibriSpeech targets of 256 tokens at ~290 MB.
        ids = [tokenizer.prefix_ids + tokenizer.encode(dataset.items[i].text) for i in indices]
        targets = [t[:seq_len] + [tokenizer.pad_id] * (seq_len - len(t)) for t in ids]  # = Tokenizer.build_target
        self.targets = torch.tensor(targets, dtype=torch.int32)
        self.lengths = [dataset.items[i].frames for i in indices]
        n_text = [len(t) for t in ids]
        self.truncated = sum(n > seq_len for n in n_text)
        # Audio-sized canvas per item: what decoding would use for this duration, never shorter than the text
        # plus one end-of-text token.
        from .decoding import DecodingOptions

        sizing = DecodingOptions(seq_len=None, max_seq_len=seq_len)
        n_prefix = len(tokenizer.prefix_ids)
        self.canvas = [min(seq_len, max(sizing.canvas_length(dataset.items[i].duration, n_prefix), n + 1))
                       for i, n in zip(indices, n_text)]

    def canvas_length(self, rows: list[int]) -> int:
        return max(self.canvas[r] for r in rows)

    def __len__(self):
        return len(self.indices)

    def conditions(self, rows: list[int], dtype):
        """Encoder states of rows, zero-padded to the longest -> (condition [B, F, d], frames [B]): the decoder
        masks the padding out of cross-attention with frames, as inference does."""
        import torch

        from .data import collate_states

        cond, frame_mask = collate_states([self.dataset.states(self.indices[r]) for r in rows], dtype=dtype)
        return cond, frame_mask.sum(dim=1).to(torch.long)


def _as_list(paths) -> list:
    return [str(p) for p in paths] if isinstance(paths, (list, tuple)) else [str(paths)]


def auto_seq_len(dataset, tokenizer, family: str) -> int:
    if family == "smdm":
        from .decoding import UPSTREAM_CANVAS

        return UPSTREAM_CANVAS
    longest = max(len(tokenizer.prefix_ids) + len(tokenizer.encode(it.text)) for it in dataset.items)
    return int(min(MAX_AUTO_CANVAS, -(-(longest + 4) // 8) * 8))


# ----------------------------------------------------------------------------------------------------------
# The run


def _save_atomic(obj, path: Path):
    import torch

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _rng_state():
    import numpy as np
    import torch

    # No CUDA state: nothing draws from CUDA generators (every random number of a run comes from seeded CPU
    # generators), and saving every visible GPU's state would start a context on each of them from each rank.
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def _set_rng_state(state):
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])  # a "cuda" entry of an older checkpoint is not needed: ignored


def _options_record(o: TrainOptions) -> dict:
    d = asdict(o)
    for k in ("betas", "mask_range"):
        if d[k] is not None:
            d[k] = list(d[k])
    return d


def train(options: TrainOptions, console=None) -> dict:
    """Run (or resume) a training run; returns a summary dict (steps, losses, best validation, outputs).
    Under torchrun every rank calls it; each trains on its share of every global batch (DDP)."""
    from .distributed import Group

    try:
        group = Group.start(options.device)
    except ValueError as e:
        raise TrainError(str(e)) from None
    try:
        return _train(options, group, console)
    finally:
        group.close()  # also after an error, so no rank exits with the group's threads alive


def _train(options: TrainOptions, group, console=None) -> dict:
    import torch
    import torch.nn.functional as F

    from .data import DatasetError, ShardDataset
    from .distributed import enable_tf32

    rank, world, device, is_main = group.rank, group.world, group.device, group.is_main
    out = Path(options.output)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
    global_batch = options.batch_size * options.grad_accum * world
    o = options.resolved(global_batch)

    try:
        data = ShardDataset(o.data)
        val_data = ShardDataset(o.val_data) if o.val_data else None
    except DatasetError as e:
        raise TrainError(str(e)) from None
    if val_data is not None and val_data.dim != data.dim:
        raise TrainError(f"{o.val_data}: encoder width {val_data.dim} differs from the training shards' {data.dim}")

    decoder, tokenizer, tok_cfg, tok_file = build_model(o, data.dim)
    family = decoder.config.family
    if o.mask_prefix is None:
        o.mask_prefix = family == "smdm"  # upstream masks BOS too; the Whisper prefix is a fixed prompt
    if o.freeze_embeddings is None:
        o.freeze_embeddings = family == "whisper"
    seq_len = o.seq_len or auto_seq_len(data, tokenizer, family)
    if seq_len > decoder.config.block_size:
        raise TrainError(f"seq_len {seq_len} exceeds the decoder's block_size {decoder.config.block_size}")
    o.seq_len = seq_len

    # Held-out validation split: a fixed random subset (by seed) unless separate shards are given.
    all_idx = list(range(len(data)))
    if val_data is None and o.val_items > 0:
        g = torch.Generator().manual_seed(o.seed + 17)
        perm = torch.randperm(len(data), generator=g).tolist()
        n_val = min(o.val_items, len(data) // 5)
        val_set, val_idx = data, sorted(perm[:n_val])
        train_idx = sorted(perm[n_val:])
    else:
        val_set, val_idx = val_data, list(range(min(len(val_data), o.val_items))) if val_data else []
        train_idx = all_idx
    train_batches = Batches(data, train_idx, tokenizer, seq_len)
    val_batches = Batches(val_set, val_idx, tokenizer, seq_len) if val_idx else None
    if len(train_batches) < global_batch:
        raise TrainError(f"{', '.join(map(str, _as_list(o.data)))}: {len(train_batches)} training items, fewer than one global batch of {global_batch}")
    steps_per_epoch = len(train_batches) // global_batch
    total = o.max_steps or max(1, math.ceil(o.epochs * steps_per_epoch))

    decoder.to(device)
    names = trainable_names(decoder, o)
    for n, p in decoder.named_parameters():
        p.requires_grad_(n in names)
    groups = param_groups(decoder, names, o)
    optimizer = torch.optim.AdamW(
        [{k: v for k, v in g.items() if k != "names"} for g in groups], lr=o.lr, betas=o.betas, eps=o.adam_eps
    )
    ema = EMA(decoder, names, o.ema_decay) if o.ema_decay else None
    n_fixed = 0 if o.mask_prefix else len(tokenizer.prefix_ids)

    step, best, bad_evals = 0, float("inf"), 0
    last_path = out / LAST_CHECKPOINT
    amp_dtype = autocast_dtype(o.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)  # fp16 needs loss scaling
    error = None
    if o.resume:
        if not last_path.exists():
            raise TrainError(f"{last_path}: no checkpoint to resume from")
        ckpt = torch.load(last_path, map_location="cpu", weights_only=False)
        saved = ckpt["options"]
        changed = [k for k in RESUME_FIXED if _norm(saved.get(k)) != _norm(_options_record(o).get(k))]
        if changed or ckpt["world_global_batch"] != global_batch:
            what = ", ".join(changed) or f"global batch {ckpt['world_global_batch']} -> {global_batch}"
            raise TrainError(f"{last_path}: cannot resume exactly, options changed ({what})")
        params = dict(decoder.named_parameters())
        with torch.no_grad():
            for k, v in ckpt["model"].items():
                params[k].copy_(v)
        optimizer.load_state_dict(ckpt["optimizer"])
        if ema is not None:
            ema.load_state_dict(ckpt["ema"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        step, best, bad_evals = ckpt["step"], ckpt["best_val"], ckpt["bad_evals"]
        _set_rng_state(ckpt["rng"])
    elif is_main and last_path.exists():
        error = f"{out}: holds a run already (last.pt); pass --resume to continue it or use a new folder"
    group.check(error, TrainError)  # every rank stops with rank 0's error, none is left waiting in DDP()

    model = decoder
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(decoder, device_ids=[device.index] if device.type == "cuda" else None)
    if o.precision in ("auto", "fp32"):
        enable_tf32(device)  # float32 products on tensor cores where the GPU has them
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype is not None else _null

    metrics = open(out / METRICS_FILE, "a", encoding="utf-8") if is_main else None

    def log(record):
        if metrics:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()

    def save_last(step_done: int):
        group.on_main(lambda: _save_atomic(last_state(step_done), last_path))

    def last_state(step_done: int) -> dict:
        return {
            "model": {k: v.detach().cpu() for k, v in decoder.named_parameters() if k in names},
            "optimizer": optimizer.state_dict(),
            "schedule": {"total": total, "warmup": o.warmup, "lr": o.lr, "min_lr_ratio": o.min_lr_ratio},
            "ema": ema.state_dict() if ema else None,
            "step": step_done,
            "data": {"epoch": step_done // steps_per_epoch, "batch_in_epoch": step_done % steps_per_epoch,
                     "seed": o.seed, "global_batch": global_batch},
            "best_val": best,
            "bad_evals": bad_evals,
            "rng": _rng_state(),
            "options": _options_record(o),
            "world_global_batch": global_batch,
            "config": decoder.config.to_dict(),
            "scaler": scaler.state_dict(),
        }

    def save_outputs(tag: str):
        with _swapped(decoder, ema):
            write_outputs(decoder, o, out, tokenizer, tok_cfg, tok_file, data.encoder, seq_len)
        log({"step": step, "saved": tag})

    def evaluate_and_save():
        nonlocal best, bad_evals
        with _swapped(decoder, ema):
            result = evaluate(decoder, val_batches, tokenizer, o, device, autocast, n_fixed)
        improved = result["val_loss"] < best
        if improved:
            best, bad_evals = result["val_loss"], 0
        else:
            bad_evals += 1
        log({"step": step, **result, "best_val_loss": best, "improved": improved})
        progress.console.print(
            f"step {step}: val loss {result['val_loss']:.4f}, WER {result['wer'] * 100:.1f}% "
            f"({result['wer_items']} items)" + (" (best)" if improved else ""))
        if improved:
            save_outputs("best")
        return best, bad_evals, bool(o.patience and bad_evals >= o.patience)

    log({"event": "resume" if o.resume else "start", "step": step, "total": total, "world": world,
         "global_batch": global_batch, "seq_len": seq_len, "train_items": len(train_batches),
         "val_items": len(val_idx), "trainable": sum(p.numel() for n, p in decoder.named_parameters() if n in names),
         "truncated_targets": train_batches.truncated, "lr": o.lr, "device": str(device)})

    t_start = time.time()
    tokens_done, loss_acc, n_acc = 0, 0.0, 0
    last_loss, stopped = None, "finished"
    stop_at = min(total, o.stop_at) if o.stop_at else total
    epoch_cache: dict = {}
    updating = [False]
    try:
        with _progress(o.progress and is_main, console) as progress:
            task = progress.add_task("training", total=stop_at, completed=step)
            while step < stop_at:
                epoch, b_in_epoch = divmod(step, steps_per_epoch)
                if epoch not in epoch_cache:
                    epoch_cache = {epoch: epoch_batches(train_batches.lengths, global_batch, o.seed, epoch)}
                batch_rows = epoch_cache[epoch][b_in_epoch]
                masks = draw_masks(o.seed, step, global_batch, seq_len, o.mask_range, n_fixed)
                if o.canvas == "audio":  # one length per global batch, so DDP ranks agree
                    masks = masks[:, : train_batches.canvas_length(batch_rows)]
                n_masked = int(masks.sum())
                lr = lr_at(step, o, total)
                for g in optimizer.param_groups:
                    g["lr"] = lr * g["lr_scale"]
                model.train()
                step_loss = torch.zeros((), dtype=torch.float64, device=device)  # summed on the GPU: no sync
                for a in range(o.grad_accum):
                    m = rank * o.grad_accum + a  # micro-batch index within the (length-sorted) global batch
                    sl = slice(m * o.batch_size, (m + 1) * o.batch_size)
                    rows = batch_rows[sl]
                    target = train_batches.targets[rows].to(device, torch.long)
                    mask = masks[sl].to(device)
                    target = target[:, : mask.size(1)]
                    cond, frames = train_batches.conditions(rows, torch.float32)
                    if o.state_time_mask or o.state_noise:
                        cond = augment_states(cond, [train_batches.lengths[r] for r in rows], o.state_time_mask,
                                              o.state_noise, o.seed, step, m)
                    cond, frames = cond.to(device), frames.to(device)
                    idx = torch.where(mask, torch.full_like(target, decoder.config.mask_token_id), target)
                    sync = a == o.grad_accum - 1
                    ctx = model.no_sync() if (world > 1 and not sync) else _null()
                    with ctx:
                        with autocast():
                            logits = model(idx, cond, positions=mask, frames=frames)
                        loss_sum = F.cross_entropy(logits.float(), target[mask], reduction="sum")
                        # DDP averages gradients over ranks: scale by world so the result is sum / n_masked.
                        scaler.scale(loss_sum * (world / max(n_masked, 1))).backward()
                    step_loss += loss_sum.detach().double()
                    tokens_done += target.numel()
                loss = float(group.sum(step_loss)) / max(n_masked, 1)
                if not math.isfinite(loss):
                    stopped = "nan"
                    if is_main:
                        msg = (f"loss is {loss} at step {step + 1}: stopping; the last good checkpoint is "
                               f"{last_path if last_path.exists() else 'not written yet'} (try a lower --lr)")
                        log({"step": step + 1, "event": "nan", "message": msg})
                    break
                scaler.unscale_(optimizer)  # clip the true gradients (a no-op without fp16)
                grad_norm = torch.nn.utils.clip_grad_norm_([p for p in decoder.parameters() if p.requires_grad],
                                                           o.grad_clip if o.grad_clip else float("inf"))
                updating[0] = True  # an interrupt now would leave a half-applied update: not saved
                scaler.step(optimizer)  # skipped by the scaler when fp16 gradients overflowed
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.update(decoder)
                step += 1
                updating[0] = False
                last_loss = loss
                loss_acc += loss
                n_acc += 1
                elapsed = time.time() - t_start
                tok_s = tokens_done * world / max(elapsed, 1e-9)
                progress.update(task, completed=step,
                                description=f"step {step}/{total} loss {loss:.3f} lr {lr:.2e} {tok_s:,.0f} tok/s")
                if step % o.log_every == 0 or step == stop_at:
                    log({"step": step, "loss": loss_acc / n_acc, "lr": lr, "grad_norm": float(grad_norm),
                         "tokens_per_s": tok_s, "elapsed_s": round(elapsed, 2), "epoch": step / steps_per_epoch})
                    loss_acc, n_acc = 0.0, 0
                stop = False
                if val_batches is not None and (step % o.eval_every == 0 or step == total):
                    # Rank 0 evaluates and saves; its decision (or its error) reaches every rank.
                    best, bad_evals, stop = group.on_main(evaluate_and_save)
                    if stop:
                        stopped = "early_stopping"
                if o.time_limit and (time.time() - t_start) / 60 > o.time_limit:
                    stop, stopped = True, "time_limit"
                if o.time_limit:  # each rank reads its own clock: all stop when one does
                    stop = group.any(stop)
                if step % o.save_every == 0 or stop or step == stop_at:
                    save_last(step)
                if stop:
                    break
    except KeyboardInterrupt:
        # Ctrl-C between updates: keep the progress of every finished step, then let the caller report it.
        if not updating[0] and world == 1:
            save_last(step)
        if metrics:
            log({"event": "interrupted", "step": step})
            metrics.close()
        raise
    if stopped == "finished" and step < total:
        stopped = "stop_at"
    if stopped != "nan" and (val_batches is None or not (out / MODEL_SUBDIR).exists()):
        group.on_main(lambda: save_outputs("final"))
    if stopped == "nan":
        save_last(step)  # the state before the failing step: good weights
    if metrics:
        log({"event": "end", "step": step, "reason": stopped, "best_val_loss": best})
        metrics.close()
    group.barrier()
    summary = {"step": step, "total": total, "reason": stopped, "last_loss": last_loss,
               "best_val_loss": None if best == float("inf") else best, "output": str(out)}
    if stopped == "nan":
        raise TrainError(f"loss became NaN at step {step + 1}; stopped, last good checkpoint kept in {last_path}")
    return summary


def _norm(v):
    return list(v) if isinstance(v, tuple) else v


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def evaluate(decoder, val: Batches, tokenizer, o: TrainOptions, device, autocast, n_fixed: int,
             batch_size: int = 16) -> dict:
    """Validation loss (fixed masks, so evaluations compare) and the WER of Parallel Diffusion Decoding."""
    import torch
    import torch.nn.functional as F

    from .decoding import decode_windows

    decoder.eval()
    total, n = 0.0, 0
    lengths = val.lengths
    order = sorted(range(len(val)), key=lambda i: (lengths[i], i))
    masks = draw_masks(o.seed + 99991, 0, len(val), val.targets.size(1), o.mask_range, n_fixed)
    with torch.no_grad():
        for b in range(0, len(order), batch_size):
            rows = order[b : b + batch_size]
            target = val.targets[rows].to(device, torch.long)
            mask = masks[rows].to(device)
            if not mask.any():
                continue
            cond, frames = val.conditions(rows, torch.float32)
            idx = torch.where(mask, torch.full_like(target, decoder.config.mask_token_id), target)
            with autocast():
                logits = decoder(idx, cond.to(device), positions=mask, frames=frames.to(device))
            total += float(F.cross_entropy(logits.float(), target[mask], reduction="sum"))
            n += int(mask.sum())
    result = {"val_loss": total / max(n, 1)}
    k = min(o.wer_items, len(val))
    if k:
        sized = o.canvas == "audio"
        L = val.targets.size(1)
        options = o.decoding_options(decoder.config.family, None if sized else L, L)
        conds = [val.dataset.states(val.indices[r]).float().to(device) for r in range(k)]
        durations = [val.dataset.items[val.indices[r]].duration for r in range(k)]
        with torch.no_grad(), autocast():
            results = decode_windows(decoder, conds, options, tokenizer.prefix_ids, tokenizer.pad_id, durations)
        hyps = [tokenizer.decode(r.text_tokens) for r in results]
        refs = [val.dataset.items[val.indices[r]].text for r in range(k)]
        result.update(wer=word_error_rate(refs, hyps), wer_items=k, example=hyps[0][:200])
    else:
        result.update(wer=float("nan"), wer_items=0)
    decoder.train()
    return result


def word_error_rate(refs: list[str], hyps: list[str]) -> float:
    """Corpus WER after the Whisper English normaliser (the Open ASR Leaderboard convention)."""
    import jiwer
    from whisper_normalizer.english import EnglishTextNormalizer

    norm = EnglishTextNormalizer()
    pairs = [(norm(r), norm(h)) for r, h in zip(refs, hyps)]
    pairs = [(r, h) for r, h in pairs if r.strip()]
    if not pairs:
        return float("nan")
    return float(jiwer.wer([r for r, _ in pairs], [h for _, h in pairs]))


def write_outputs(decoder, o: TrainOptions, out: Path, tokenizer, tok_cfg: dict, tok_file, encoder_spec: dict,
                  seq_len: int) -> None:
    """Our model directory, plus upstream's flat .pt dicts for the SMDM family (stage 1: adapter only)."""
    from .checkpoint import save_model_dir
    from .decoding import DecodingOptions

    if decoder.config.family == "smdm":
        sd = {k: v.detach().cpu().float().clone() for k, v in decoder.state_dict().items()}
        if o.stage == "1":
            _save_atomic({k: v for k, v in sd.items() if _is_adapter(k, "smdm")}, out / f"{o.name}_stage1_adapter.pt")
        else:
            _save_atomic(sd, out / f"{o.name}_stage2_decoder.pt")
    defaults = DecodingOptions(seq_len=None, max_seq_len=seq_len).to_dict()
    if decoder.config.family == "whisper":
        chosen = o.decoding_options("whisper", None, seq_len)
        defaults.update(strategy=chosen.strategy, steps=chosen.steps, candidates=chosen.candidates)
    save_model_dir(out / MODEL_SUBDIR, decoder, tok_file, tok_cfg, encoder_spec, defaults,
                   extra={"training": {"stage": o.stage, "seq_len": seq_len, "data": _as_list(o.data)}})


def _progress(enabled: bool, console=None):
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                    disable=not enabled, console=console)


def train_main(**kwargs) -> dict:
    """CLI entry: keyword arguments are TrainOptions fields."""
    return train(TrainOptions(**kwargs))
