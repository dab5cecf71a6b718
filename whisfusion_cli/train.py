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

import contextlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

from .choices import TRAIN_PRECISIONS, TRAIN_STAGES
from .display import progress
from .fileio import atomic_path
from .whisper_source import TINY_EN_NAME

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
# --self-correct's draws are seeded this many steps after the masks' (draw_masks): within a run of fewer steps
# no step's fill reuses any step's mask draw.
SELF_CORRECT_STREAM = 7_919
LENGTH_GROUP = 32  # global batches per length-sorted chunk (bucketing of variable-length encoder states)
LAST_CHECKPOINT = "last.pt"
MODEL_SUBDIR = "model"
METRICS_FILE = "metrics.jsonl"

if TYPE_CHECKING:
    import torch

    from .data import ShardDataset
    from .distill import Teacher
    from .distributed import Group
    from .tokenizer import Tokenizer


class TrainError(RuntimeError):
    """A training run that cannot continue; the message says why in one line."""


def _fixed(default=None):
    """A TrainOptions field that must not change across --resume: it defines the run's exact trajectory."""
    return field(default=default, metadata={"resume": "fixed"})


@dataclass
class TrainOptions:
    """A run's options. Those made with `_fixed` (RESUME_FIXED) must not change across --resume; the others
    (where the run writes, how often it logs, evaluates and saves, when it stops) may."""

    data: str | list  # shard folder(s) written by `whisfusion preprocess`; several are concatenated
    output: str  # run folder: last.pt, metrics.jsonl, model/, upstream .pt files
    stage: str = _fixed("scratch")  # "1" | "2" | "scratch"
    base: str | None = _fixed()  # SMDM base weights (stages 1 and 2)
    init: str | None = _fixed()  # stage 2: stage-1 adapter (or full decoder); scratch: "random" or a Whisper model
    config: str | None = _fixed()  # scratch with random init: ModelConfig JSON file or preset name
    tokenizer: str | None = _fixed()  # tokenizer.json; the Whisper family takes the Whisper model's own by default
    val_data: str | None = None  # separate validation shards; else val_items are held out from data
    val_items: int = _fixed(200)
    wer_items: int = 32  # validation items decoded with Parallel Diffusion Decoding for the WER
    seq_len: int | None = _fixed()  # canvas; None: 256 for the SMDM family, longest target + margin for Whisper
    # "fixed": every canvas is seq_len long (upstream). "audio": each batch's canvas is sized to its audio the
    # way decoding sizes it (decoding.DecodingOptions.canvas_length), capped at seq_len: training matches
    # inference with a sized canvas, and short utterances stop paying for a long tail of pads.
    canvas: str = _fixed("fixed")
    batch_size: int = _fixed(16)  # per rank and accumulation step
    grad_accum: int = _fixed(1)
    lr: float | None = _fixed()  # None: the stage's upstream rule (scaled by global batch / 64)
    min_lr_ratio: float | None = _fixed()  # cosine floor as a fraction of lr (stage 1: 0.1, stage 2: 0.01)
    warmup: float = _fixed(0.1)  # fraction of the run if < 1, else steps
    max_steps: int | None = _fixed()  # length of the schedule; None: from epochs
    epochs: float = _fixed(10.0)
    stop_at: int | None = None  # stop (with a `last` checkpoint) after this step without changing the schedule
    time_limit: float | None = None  # minutes; stop cleanly (with a `last` checkpoint) when exceeded
    weight_decay: float | None = _fixed()
    betas: tuple[float, float] | None = _fixed()
    adam_eps: float = _fixed(1e-8)
    grad_clip: float | None = _fixed()
    mask_range: tuple[float, float] | None = _fixed()  # t ~ U(lo, hi)
    # Augmentation of the encoder states (training batches only; the shards hold them precomputed, so this is
    # where SpecAugment-style regularisation can act): up to STATE_MASK_SPANS spans per item, each up to this
    # fraction of its frames, replaced by the item's mean state; and Gaussian noise of this std relative to
    # the item's own std. 0 turns either off.
    state_time_mask: float = _fixed(0.0)
    state_noise: float = _fixed(0.0)
    mask_prefix: bool | None = _fixed()  # None: SMDM masks BOS like upstream; the Whisper family never masks its prefix
    ema_decay: float | None = _fixed()  # None: 0.995 in stage 2, off otherwise; 0 turns it off
    layer_decay: float | None = _fixed()  # e.g. 0.9 (stage 2 option)
    freeze_embeddings: bool | None = _fixed()  # Whisper family: keep the tied token table fixed (default True)
    # Parameters kept at their initial values: every one whose name contains one of these (e.g. "encoder_attn",
    # the cross-attention, so a Whisper-initialised decoder keeps reading the encoder as Whisper does).
    freeze: tuple[str, ...] = _fixed(())
    eval_every: int = 500
    save_every: int = 500
    log_every: int = 10
    patience: int | None = 5  # early stopping: evaluations without a better validation loss
    # Parallel Diffusion Decoding for the validation WER. None: upstream's (15 candidates, 4 steps, "remask")
    # for the SMDM family; 1 candidate, 8 steps, "confidence" for the Whisper family.
    decode_steps: int | None = None
    decode_candidates: int | None = None
    decode_strategy: str | None = None
    seed: int = _fixed(1234)
    device: str | None = None  # None: cuda:LOCAL_RANK where available, else cpu
    # "auto": fp32 on the CPU; on a GPU bf16 autocast where bf16 is native (Ampere on), else fp16 autocast with
    # loss scaling (T4, V100), fp32 products on TF32 tensor cores where there are some.
    precision: str = "auto"  # "auto" | "fp32" | "bf16" | "fp16"
    resume: bool = False
    progress: bool = True
    name: str = "whisfusion"  # prefix of the upstream-format files
    # Whisper family: weight of a KL term to a frozen, causal copy of a pre-trained Whisper decoder, teacher-forced
    # on each item's own encoder states (distill.py); 0 turns it off.
    distill: float = _fixed(0.0)
    distill_teacher: str = _fixed(TINY_EN_NAME)  # a Whisper name or directory (its decoder)
    # Weight of an unlikelihood term (Welleck et al., 2019) against predicting a neighbour's token at a masked
    # position: the default model's repeats ("press press for" for "press 1 for") are a short word replaced by
    # its neighbour, which the masked-token loss alone does not discourage enough. 0 turns it off.
    copy_loss: float = _fixed(0.0)
    # SMART (Ghazvininejad et al., 2020): this share of each item's masked positions holds the model's own
    # prediction (the argmax of a no-grad pass over the masked canvas) instead of the mask token, and the loss
    # still counts every masked position. Decoding commits its own tokens step by step and predicts the rest
    # from them, wrong ones included; training on true context only never shows it such a canvas. 0: off.
    self_correct: float = _fixed(0.0)

    def __post_init__(self):
        self.stage = str(self.stage)
        if self.stage not in TRAIN_STAGES:
            raise ValueError(f"stage {self.stage!r}: expected one of {', '.join(TRAIN_STAGES)}")
        if self.betas is not None:
            self.betas = tuple(float(b) for b in self.betas)
        if self.mask_range is not None:
            self.mask_range = tuple(float(b) for b in self.mask_range)
            lo, hi = self.mask_range
            if not 0.0 <= lo <= hi <= 1.0:
                raise ValueError(f"mask_range {self.mask_range}: need 0 <= lo <= hi <= 1")
        if self.copy_loss < 0.0:
            raise ValueError("copy_loss must be >= 0")
        if not 0.0 <= self.self_correct <= 1.0:
            raise ValueError(f"self_correct must lie in [0, 1], got {self.self_correct}")
        if not 0.0 <= self.state_time_mask < 0.5 or self.state_noise < 0.0:
            raise ValueError("state_time_mask must lie in [0, 0.5) and state_noise must be >= 0")
        if self.canvas not in ("fixed", "audio"):
            raise ValueError(f"canvas {self.canvas!r}: expected 'fixed' or 'audio'")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("batch_size and grad_accum must be >= 1")
        if self.precision not in TRAIN_PRECISIONS:
            raise ValueError(f"precision {self.precision!r}: expected one of {', '.join(TRAIN_PRECISIONS)}")

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


RESUME_FIXED = tuple(f.name for f in fields(TrainOptions) if f.metadata.get("resume") == "fixed")


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


def copy_unlikelihood(logits, target, mask):
    """Summed -log(1 - p(neighbour's token)) over the masked positions, for the left and the right neighbour
    in the target, wherever that token differs from the position's own (a true repeat is not penalised).
    logits: [n_masked, vocab] for target[mask], in the order of mask's True entries."""
    import torch

    logits = logits.float()
    log_z = torch.logsumexp(logits, dim=-1)
    own = target[mask]
    total = logits.new_zeros(())
    vocab = logits.size(1)
    for neighbour in (torch.cat([target[:, :1], target[:, :-1]], 1), torch.cat([target[:, 1:], target[:, -1:]], 1)):
        other = neighbour[mask]  # the edge positions are their own neighbour, so they drop out below
        # A prompt token beside the first word (<|notimestamps|>) lies outside the predicted vocabulary.
        counted = (other != own) & (other < vocab)
        p = (logits.gather(1, other.clamp(max=vocab - 1)[:, None]).squeeze(1) - log_z).exp()
        term = -torch.log1p(-p.clamp(max=1.0 - 1e-6))
        total = total + torch.where(counted, term, torch.zeros_like(term)).sum()
    return total


def draw_self_correct(seed: int, step: int, global_batch: int, seq_len: int, share: float):
    """bool [global_batch, seq_len]: the positions that take the model's own prediction where they are masked
    (TrainOptions.self_correct). A function of (seed, step) only, as draw_masks is, seeded SELF_CORRECT_STREAM
    steps away from it."""
    import torch

    g = torch.Generator().manual_seed(seed * 1_000_003 + step + SELF_CORRECT_STREAM)
    return torch.rand(global_batch, seq_len, generator=g) < share


def self_correct_inputs(decoder, idx, mask, fill, cond, frames):
    """The canvas idx with its masked positions that `fill` marks set to the decoder's own argmax there, from
    a no-grad forward of idx (the rest unchanged). The prediction is made with every masked position masked,
    as at a decoding step, so the tokens that replace masks are the ones decoding would have committed."""
    import torch

    fill = fill & mask
    if not bool(fill.any()):
        return idx
    with torch.no_grad():
        pred = idx.clone()
        pred[mask] = decoder(idx, cond, positions=mask, frames=frames).argmax(-1)
    return torch.where(fill, pred, idx)


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


class EpochOrder:
    """The global batch (training rows) of each step: `epoch_batches` of the step's epoch, drawn once an epoch."""

    def __init__(self, lengths: list[int], global_batch: int, seed: int):
        self.lengths, self.global_batch, self.seed = lengths, global_batch, seed
        self.steps_per_epoch = len(lengths) // global_batch
        self.epoch, self.batches = None, []

    def rows(self, step: int) -> list[int]:
        epoch, index = divmod(step, self.steps_per_epoch)
        if epoch != self.epoch:
            self.epoch, self.batches = epoch, epoch_batches(self.lengths, self.global_batch, self.seed, epoch)
        return self.batches[index]


# ----------------------------------------------------------------------------------------------------------
# Building the model


def _whisper_tokenizer_file(name: str) -> Path:
    from .whisper_source import tiny_en_dir

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

    from .whisper_source import load_whisper
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
                from .loading import load_model_dir

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
        if any(pattern in name for pattern in o.freeze):
            continue
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
    done = (step - warmup) / max(1, total - warmup)
    floor = o.lr * o.min_lr_ratio
    return floor + (o.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, done)))


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
# The run: what it is made of, where it stands


@dataclass
class Run:
    """What a run is made of, fixed once it starts: its options resolved, the ranks, data, model, optimizer."""

    o: TrainOptions
    group: Group
    out: Path  # the run folder
    data: ShardDataset  # the training shards (their encoder spec goes into the model directory)
    train_batches: Batches
    val_batches: Batches | None
    order: EpochOrder
    decoder: torch.nn.Module
    names: set[str]  # trainable parameters
    optimizer: torch.optim.Optimizer
    ema: EMA | None
    amp_dtype: torch.dtype | None  # autocast dtype; None: plain fp32
    scaler: torch.amp.GradScaler  # loss scaling for fp16, a pass-through otherwise
    tokenizer: Tokenizer
    tok_cfg: dict
    tok_file: Path
    seq_len: int
    n_fixed: int  # canvas positions never masked (the prefix, unless mask_prefix)
    global_batch: int
    total: int  # steps of the schedule
    model: torch.nn.Module | None = None  # the decoder, wrapped for DDP when there are several ranks
    teacher: Teacher | None = None  # distillation (o.distill > 0)

    @property
    def last_path(self) -> Path:
        return self.out / LAST_CHECKPOINT

    def eval_due(self, step: int) -> bool:
        """A validation after this step: every eval_every steps and at the end of the schedule."""
        return self.val_batches is not None and (step % self.o.eval_every == 0 or step == self.total)

    def gradient_sync(self, micro: int):
        """Context of micro-batch `micro`'s backward: DDP reduces the gradients over ranks in the last one only."""
        if self.group.world > 1 and micro != self.o.grad_accum - 1:
            return self.model.no_sync()
        return contextlib.nullcontext()

    def autocast(self):
        import torch

        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.group.device.type, dtype=self.amp_dtype)


@dataclass
class RunState:
    """Where a run stands: its step and the validation record that early stopping and the best model go by (both
    kept in last.pt), and whether an update is under way."""

    step: int = 0  # updates done
    best: float = float("inf")  # best validation loss so far
    bad_evals: int = 0  # evaluations since the best one
    updating: bool = False  # inside an update: an interrupt now would leave it half applied, so nothing is saved


@dataclass
class Meter:
    """What the log lines report: the mean loss since the last line, tokens per second and time since the start."""

    start: float = field(default_factory=time.time)
    tokens: int = 0  # seen by this rank
    loss_sum: float = 0.0
    n: int = 0
    last_loss: float | None = None
    elapsed: float = 0.0  # at the last step
    tok_s: float = 0.0  # all ranks, at the last step

    def add(self, loss: float, world: int):
        self.last_loss, self.loss_sum, self.n = loss, self.loss_sum + loss, self.n + 1
        self.elapsed = time.time() - self.start
        self.tok_s = self.tokens * world / max(self.elapsed, 1e-9)

    def minutes(self) -> float:
        return (time.time() - self.start) / 60

    def describe(self, step: int, total: int, lr: float) -> str:
        return f"step {step}/{total} loss {self.last_loss:.3f} lr {lr:.2e} {self.tok_s:,.0f} tok/s"

    def line(self, step: int, lr: float, grad_norm, steps_per_epoch: int) -> dict:
        """The metrics line of this step; the loss mean starts again after it."""
        record = {"step": step, "loss": self.loss_sum / self.n, "lr": lr, "grad_norm": float(grad_norm),
                  "tokens_per_s": self.tok_s, "elapsed_s": round(self.elapsed, 2), "epoch": step / steps_per_epoch}
        self.loss_sum, self.n = 0.0, 0
        return record


class Metrics:
    """RUN/metrics.jsonl, written by rank 0 (the other ranks write nothing): one JSON record a line, flushed."""

    def __init__(self, path: Path | None):
        self.file = open(path, "a", encoding="utf-8") if path is not None else None

    def write(self, record: dict):
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self):
        if self.file:
            self.file.close()
            self.file = None


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
    """The loop: data, masks, forward, loss, backward, update, log, evaluate, checkpoint (nanoGPT's train.py)."""
    import torch
    import torch.nn.functional as F

    from .distributed import enable_tf32

    run = build_run(options, group)  # data, validation split, model, optimizer
    state = start_or_resume(run)  # every rank stops here with rank 0's error, none is left waiting in DDP()
    run.model = group.data_parallel(run.decoder)
    if run.o.precision in ("auto", "fp32"):
        enable_tf32(group.device)  # float32 products on tensor cores where the GPU has them
    o, log = run.o, Metrics(run.out / METRICS_FILE if group.is_main else None)
    log.write(start_record(run, state))
    meter, reason = Meter(), "finished"
    stop_at = min(run.total, o.stop_at) if o.stop_at else run.total
    try:
        with progress(o.progress and group.is_main, console, counts=False) as bar:
            task = bar.add_task("training", total=stop_at, completed=state.step)
            while state.step < stop_at:
                rows = run.order.rows(state.step)  # this step's global batch, the same on every rank
                masks = step_masks(run, state.step, rows)
                lr = set_lr(run.optimizer, lr_at(state.step, o, run.total))
                n_masked = max(int(masks.sum()), 1)
                step_loss = torch.zeros((), dtype=torch.float64, device=group.device)  # summed on the GPU: no sync
                run.model.train()
                for micro in range(o.grad_accum):  # this rank's micro-batches of the global batch
                    idx, target, mask, cond, frames = micro_batch(run, rows, masks, state.step, micro)
                    with run.gradient_sync(micro):
                        with run.autocast():
                            logits = run.model(idx, cond, positions=mask, frames=frames)
                        loss_sum = F.cross_entropy(logits.float(), target[mask], reduction="sum")
                        if run.teacher is not None:  # the pre-trained decoder's view of the same masked tokens
                            loss_sum = loss_sum + o.distill * run.teacher.loss(logits, target, mask, cond, frames)
                        if o.copy_loss:
                            loss_sum = loss_sum + o.copy_loss * copy_unlikelihood(logits, target, mask)
                        # DDP averages gradients over ranks: scale by world so the result is sum / n_masked.
                        run.scaler.scale(loss_sum * (group.world / n_masked)).backward()
                    step_loss += loss_sum.detach().double()
                    meter.tokens += target.numel()
                loss = float(group.sum(step_loss)) / n_masked  # over the whole global batch, every rank
                if not math.isfinite(loss):
                    reason = "nan"
                    log_nan(run, state, loss, log)
                    break
                grad_norm = clip_gradients(run)
                state.updating = True
                optimizer_step(run)
                state.step += 1
                state.updating = False
                meter.add(loss, group.world)
                bar.update(task, completed=state.step, description=meter.describe(state.step, run.total, lr))
                if state.step % o.log_every == 0 or state.step == stop_at:
                    log.write(meter.line(state.step, lr, grad_norm, run.order.steps_per_epoch))
                why = evaluate_and_decide(run, state, log, bar.console) if run.eval_due(state.step) else None
                if o.time_limit and meter.minutes() > o.time_limit:
                    why = "time_limit"
                # Each rank reads its own clock: all stop when one does.
                stop = group.any(why is not None) if o.time_limit else why is not None
                if state.step % o.save_every == 0 or stop or state.step == stop_at:
                    save_checkpoint(run, state)
                if stop:
                    reason = why or reason
                    break
    except KeyboardInterrupt:
        on_interrupt(run, state, log)
        raise
    return finish(run, state, meter, reason, log)


# ----------------------------------------------------------------------------------------------------------
# Setting up


def build_run(options: TrainOptions, group) -> Run:
    """A run's data, validation split, model, optimizer and precision; its options resolved for its global batch
    (every rank and accumulation step together)."""
    import torch

    out = Path(options.output)
    if group.is_main:
        out.mkdir(parents=True, exist_ok=True)
    global_batch = options.batch_size * options.grad_accum * group.world
    o = options.resolved(global_batch)
    data, val_data = load_shards(o)
    decoder, tokenizer, tok_cfg, tok_file = build_model(o, data.dim)
    seq_len = settle_family_defaults(o, decoder, data, tokenizer)
    val_set, val_idx, train_idx = split_validation(data, val_data, o)
    train_batches = Batches(data, train_idx, tokenizer, seq_len)
    val_batches = Batches(val_set, val_idx, tokenizer, seq_len) if val_idx else None
    if len(train_batches) < global_batch:
        raise TrainError(f"{', '.join(map(str, _as_list(o.data)))}: {len(train_batches)} training items, "
                         f"fewer than one global batch of {global_batch}")
    order = EpochOrder(train_batches.lengths, global_batch, o.seed)
    decoder.to(group.device)
    names = trainable_names(decoder, o)
    for n, p in decoder.named_parameters():
        p.requires_grad_(n in names)
    groups = param_groups(decoder, names, o)
    optimizer = torch.optim.AdamW(
        [{k: v for k, v in g.items() if k != "names"} for g in groups], lr=o.lr, betas=o.betas, eps=o.adam_eps
    )
    ema = EMA(decoder, names, o.ema_decay) if o.ema_decay else None
    amp_dtype = autocast_dtype(o.precision, group.device)
    scaler = torch.amp.GradScaler(group.device.type, enabled=amp_dtype == torch.float16)  # fp16 needs loss scaling
    return Run(o=o, group=group, out=out, data=data, train_batches=train_batches, val_batches=val_batches,
               order=order, decoder=decoder, names=names, optimizer=optimizer, ema=ema, amp_dtype=amp_dtype,
               scaler=scaler, tokenizer=tokenizer, tok_cfg=tok_cfg, tok_file=tok_file, seq_len=seq_len,
               n_fixed=0 if o.mask_prefix else len(tokenizer.prefix_ids), global_batch=global_batch,
               total=o.max_steps or max(1, math.ceil(o.epochs * order.steps_per_epoch)),
               teacher=build_teacher(o, decoder, data.dim, tokenizer, group.device))


def build_teacher(o: TrainOptions, decoder, condition_dim: int, tokenizer, device):
    """The distillation teacher (o.distill > 0, Whisper family only), on the rank's device."""
    if not o.distill:
        return None
    if decoder.config.family != "whisper":
        raise TrainError("--distill needs a Whisper-family decoder (its teacher is a Whisper decoder)")
    from .distill import Teacher

    teacher = whisper_decoder_from_pretrained(o.distill_teacher, condition_dim).to(device)
    return Teacher(teacher, tokenizer.eos_id, len(tokenizer.prefix_ids))


def load_shards(o: TrainOptions):
    """(training shards, validation shards or None), both of one encoder width."""
    from .data import DatasetError, ShardDataset

    try:
        data = ShardDataset(o.data)
        val_data = ShardDataset(o.val_data) if o.val_data else None
    except DatasetError as e:
        raise TrainError(str(e)) from None
    if val_data is not None and val_data.dim != data.dim:
        raise TrainError(f"{o.val_data}: encoder width {val_data.dim} differs from the training shards' {data.dim}")
    return data, val_data


def settle_family_defaults(o: TrainOptions, decoder, data, tokenizer) -> int:
    """Fill in (in place) the options whose default depends on the decoder family; returns the canvas length."""
    family = decoder.config.family
    if o.mask_prefix is None:
        o.mask_prefix = family == "smdm"  # upstream masks BOS too; the Whisper prefix is a fixed prompt
    if o.freeze_embeddings is None:
        o.freeze_embeddings = family == "whisper"
    seq_len = o.seq_len or auto_seq_len(data, tokenizer, family)
    if seq_len > decoder.config.block_size:
        raise TrainError(f"seq_len {seq_len} exceeds the decoder's block_size {decoder.config.block_size}")
    o.seq_len = seq_len
    return seq_len


def split_validation(data, val_data, o: TrainOptions):
    """(validation dataset, its items, training items): a fixed random subset of data (by seed) held out, at
    most a fifth of it, unless separate validation shards are given."""
    import torch

    if val_data is None and o.val_items > 0:
        g = torch.Generator().manual_seed(o.seed + 17)
        perm = torch.randperm(len(data), generator=g).tolist()
        n_val = min(o.val_items, len(data) // 5)
        return data, sorted(perm[:n_val]), sorted(perm[n_val:])
    val_idx = list(range(min(len(val_data), o.val_items))) if val_data else []
    return val_data, val_idx, list(range(len(data)))


def start_record(run: Run, state: RunState) -> dict:
    o, decoder = run.o, run.decoder
    return {"event": "resume" if o.resume else "start", "step": state.step, "total": run.total,
            "world": run.group.world, "global_batch": run.global_batch, "seq_len": run.seq_len,
            "train_items": len(run.train_batches), "val_items": len(run.val_batches) if run.val_batches else 0,
            "trainable": sum(p.numel() for n, p in decoder.named_parameters() if n in run.names),
            "truncated_targets": run.train_batches.truncated, "lr": o.lr, "device": str(run.group.device)}


# ----------------------------------------------------------------------------------------------------------
# Resuming


def start_or_resume(run: Run) -> RunState:
    """Step 0 in a folder without a run, or (--resume) where its last.pt stopped. A folder that holds a run
    already is refused on every rank, so none is left waiting in a collective."""
    state, error = RunState(), None
    if run.o.resume:
        state = load_resume(run)
    elif run.group.is_main and run.last_path.exists():
        error = f"{run.out}: holds a run already (last.pt); pass --resume to continue it or use a new folder"
    run.group.check(error, TrainError)
    return state


def load_resume(run: Run) -> RunState:
    """last.pt, checked against this run's options, loaded into its model, optimizer, EMA, loss scaler and
    random generators: the run goes on exactly as if it had not stopped."""
    import torch

    path = run.last_path
    if not path.exists():
        raise TrainError(f"{path}: no checkpoint to resume from")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    record = _options_record(run.o)
    changed = [k for k in RESUME_FIXED if _norm(ckpt["options"].get(k)) != _norm(record.get(k))]
    if changed or ckpt["world_global_batch"] != run.global_batch:
        what = ", ".join(changed) or f"global batch {ckpt['world_global_batch']} -> {run.global_batch}"
        raise TrainError(f"{path}: cannot resume exactly, options changed ({what})")
    params = dict(run.decoder.named_parameters())
    with torch.no_grad():
        for k, v in ckpt["model"].items():
            params[k].copy_(v)
    run.optimizer.load_state_dict(ckpt["optimizer"])
    if run.ema is not None:
        run.ema.load_state_dict(ckpt["ema"])
    if ckpt.get("scaler"):
        run.scaler.load_state_dict(ckpt["scaler"])
    _set_rng_state(ckpt["rng"])
    return RunState(step=ckpt["step"], best=ckpt["best_val"], bad_evals=ckpt["bad_evals"])


def _norm(v):
    return list(v) if isinstance(v, tuple) else v


def _options_record(o: TrainOptions) -> dict:
    d = asdict(o)
    for k in ("betas", "mask_range"):
        if d[k] is not None:
            d[k] = list(d[k])
    return d


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


# ----------------------------------------------------------------------------------------------------------
# One step


def step_masks(run: Run, step: int, rows: list[int]):
    """The masks of this step's global batch; with --canvas audio cut to the batch's canvas (one length per
    global batch, so DDP ranks agree)."""
    o = run.o
    masks = draw_masks(o.seed, step, run.global_batch, run.seq_len, o.mask_range, run.n_fixed)
    if o.canvas == "audio":
        masks = masks[:, : run.train_batches.canvas_length(rows)]
    return masks


def set_lr(optimizer, lr: float) -> float:
    """The step's learning rate in every parameter group (times the group's layer-decay scale); returns lr."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g["lr_scale"]
    return lr


def micro_batch(run: Run, rows: list[int], masks, step: int, micro: int):
    """(canvas, target, mask, condition, frames) of this rank's micro-batch `micro` of the global batch (rows,
    masks), on the rank's device, the encoder states augmented and, with self_correct, some masks replaced by
    the model's own predictions."""
    import torch

    o, batches, device = run.o, run.train_batches, run.group.device
    m = run.group.rank * o.grad_accum + micro  # micro-batch index within the (length-sorted) global batch
    sl = slice(m * o.batch_size, (m + 1) * o.batch_size)
    rows = rows[sl]
    target = batches.targets[rows].to(device, torch.long)
    mask = masks[sl].to(device)
    target = target[:, : mask.size(1)]
    cond, frames = batches.conditions(rows, torch.float32)
    if o.state_time_mask or o.state_noise:
        cond = augment_states(cond, [batches.lengths[r] for r in rows], o.state_time_mask, o.state_noise, o.seed,
                              step, m)
    cond, frames = cond.to(device), frames.to(device)
    idx = torch.where(mask, torch.full_like(target, run.decoder.config.mask_token_id), target)
    if o.self_correct:
        fill = draw_self_correct(o.seed, step, run.global_batch, run.seq_len, o.self_correct)
        with run.autocast():
            idx = self_correct_inputs(run.decoder, idx, mask, fill[sl, : mask.size(1)].to(device), cond, frames)
    return idx, target, mask, cond, frames


def log_nan(run: Run, state: RunState, loss: float, log: Metrics):
    """The metrics line of a step whose loss is not finite: where the last good weights are."""
    if run.group.is_main:
        last = run.last_path if run.last_path.exists() else "not written yet"
        msg = (f"loss is {loss} at step {state.step + 1}: stopping; the last good checkpoint is {last} "
               f"(try a lower --lr)")
        log.write({"step": state.step + 1, "event": "nan", "message": msg})


def clip_gradients(run: Run):
    """The gradient norm before clipping (clipped to grad_clip, if any); fp16 gradients unscaled first."""
    import torch

    run.scaler.unscale_(run.optimizer)  # clip the true gradients (a no-op without fp16)
    params = [p for p in run.decoder.parameters() if p.requires_grad]
    return torch.nn.utils.clip_grad_norm_(params, run.o.grad_clip if run.o.grad_clip else float("inf"))


def optimizer_step(run: Run):
    run.scaler.step(run.optimizer)  # skipped by the scaler when fp16 gradients overflowed
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.update(run.decoder)


# ----------------------------------------------------------------------------------------------------------
# Evaluating


def evaluate_and_decide(run: Run, state: RunState, log: Metrics, console) -> str | None:
    """Rank 0 evaluates (with the EMA weights), saves the model when it is the best so far and decides on early
    stopping; its decision (or its error) reaches every rank. Returns "early_stopping" or None."""
    state.best, state.bad_evals, stop = run.group.on_main(lambda: _evaluate_on_main(run, state, log, console))
    return "early_stopping" if stop else None


def _evaluate_on_main(run: Run, state: RunState, log: Metrics, console) -> tuple[float, int, bool]:
    """(best validation loss, evaluations since the best, stop early) after this evaluation."""
    o = run.o
    with _swapped(run.decoder, run.ema):
        result = evaluate(run.decoder, run.val_batches, run.tokenizer, o, run.group.device, run.autocast, run.n_fixed)
    improved = result["val_loss"] < state.best
    best, bad_evals = (result["val_loss"], 0) if improved else (state.best, state.bad_evals + 1)
    log.write({"step": state.step, **result, "best_val_loss": best, "improved": improved})
    console.print(f"step {state.step}: val loss {result['val_loss']:.4f}, WER {result['wer'] * 100:.1f}% "
                  f"({result['wer_items']} items)" + (" (best)" if improved else ""))
    if improved:
        save_model(run, state, log, "best")
    return best, bad_evals, bool(o.patience and bad_evals >= o.patience)


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


# ----------------------------------------------------------------------------------------------------------
# Saving


def save_checkpoint(run: Run, state: RunState):
    """RUN/last.pt (rank 0 writes it, every rank waits): everything --resume needs to go on exactly."""
    run.group.on_main(lambda: _save_pt(checkpoint_state(run, state), run.last_path))


def checkpoint_state(run: Run, state: RunState) -> dict:
    o, step, steps_per_epoch = run.o, state.step, run.order.steps_per_epoch
    return {
        "model": {k: v.detach().cpu() for k, v in run.decoder.named_parameters() if k in run.names},
        "optimizer": run.optimizer.state_dict(),
        "schedule": {"total": run.total, "warmup": o.warmup, "lr": o.lr, "min_lr_ratio": o.min_lr_ratio},
        "ema": run.ema.state_dict() if run.ema else None,
        "step": step,
        "data": {"epoch": step // steps_per_epoch, "batch_in_epoch": step % steps_per_epoch,
                 "seed": o.seed, "global_batch": run.global_batch},
        "best_val": state.best,
        "bad_evals": state.bad_evals,
        "rng": _rng_state(),
        "options": _options_record(o),
        "world_global_batch": run.global_batch,
        "config": run.decoder.config.to_dict(),
        "scaler": run.scaler.state_dict(),
    }


def save_model(run: Run, state: RunState, log: Metrics, tag: str):
    """The model directory and upstream's files, with the EMA weights where there are some."""
    with _swapped(run.decoder, run.ema):
        write_outputs(run.decoder, run.o, run.out, run.tokenizer, run.tok_cfg, run.tok_file, run.data.encoder,
                      run.seq_len)
    log.write({"step": state.step, "saved": tag})


def write_outputs(decoder, o: TrainOptions, out: Path, tokenizer, tok_cfg: dict, tok_file, encoder_spec: dict,
                  seq_len: int) -> None:
    """Our model directory, plus upstream's flat .pt dicts for the SMDM family (stage 1: adapter only)."""
    from .checkpoint import save_model_dir
    from .decoding import DecodingOptions

    if decoder.config.family == "smdm":
        sd = {k: v.detach().cpu().float().clone() for k, v in decoder.state_dict().items()}
        if o.stage == "1":
            _save_pt({k: v for k, v in sd.items() if _is_adapter(k, "smdm")}, out / f"{o.name}_stage1_adapter.pt")
        else:
            _save_pt(sd, out / f"{o.name}_stage2_decoder.pt")
    defaults = DecodingOptions(seq_len=None, max_seq_len=seq_len).to_dict()
    if decoder.config.family == "whisper":
        chosen = o.decoding_options("whisper", None, seq_len)
        defaults.update(strategy=chosen.strategy, steps=chosen.steps, candidates=chosen.candidates)
    save_model_dir(out / MODEL_SUBDIR, decoder, tok_file, tok_cfg, encoder_spec, defaults,
                   extra={"training": {"stage": o.stage, "seq_len": seq_len, "data": _as_list(o.data)}})


def _save_pt(obj, path: Path):
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


# ----------------------------------------------------------------------------------------------------------
# Stopping


def on_interrupt(run: Run, state: RunState, log: Metrics):
    """Ctrl-C between updates: keep the progress of every finished step (one process only: other ranks may be
    anywhere), then let the caller report it."""
    if not state.updating and run.group.world == 1:
        save_checkpoint(run, state)
    log.write({"event": "interrupted", "step": state.step})
    log.close()


def finish(run: Run, state: RunState, meter: Meter, reason: str, log: Metrics) -> dict:
    """The final model (unless a validation kept the best one), last.pt, the end of the metrics; the summary.
    A NaN loss keeps the weights before the failing step and raises."""
    if reason == "finished" and state.step < run.total:
        reason = "stop_at"
    if reason != "nan" and (run.val_batches is None or not (run.out / MODEL_SUBDIR).exists()):
        run.group.on_main(lambda: save_model(run, state, log, "final"))
    if reason == "nan":
        save_checkpoint(run, state)  # the state before the failing step: good weights
    log.write({"event": "end", "step": state.step, "reason": reason, "best_val_loss": state.best})
    log.close()
    run.group.barrier()
    if reason == "nan":
        raise TrainError(f"loss became NaN at step {state.step + 1}; stopped, last good checkpoint kept in "
                         f"{run.last_path}")
    return {"step": state.step, "total": run.total, "reason": reason, "last_loss": meter.last_loss,
            "best_val_loss": None if state.best == float("inf") else state.best, "output": str(run.out)}


def train_main(**kwargs) -> dict:
    """CLI entry: keyword arguments are TrainOptions fields."""
    return train(TrainOptions(**kwargs))
