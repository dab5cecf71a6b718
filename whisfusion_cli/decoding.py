"""Parallel Diffusion Decoding (SPEC section 6) and candidate selection.

The upstream loop, by default and exactly: K candidates on a canvas of mask tokens with the prefix (BOS) at
position 0; at each step every candidate draws fresh uniforms, positions under the step's mask ratio are
reset to the mask token, one forward pass fills the masked positions with their argmax; after the last step
the confidence of every position is its max softmax probability and the candidate with the highest mean
confidence over non-pad positions wins.

What we do on top, without changing the result of the upstream loop:
* the cross-attention keys/values of a window are computed once and shared by all candidates and steps;
* when every candidate has the same input (step 0 masks everything) the forward runs once and is broadcast;
* before the last step only the masked positions go through the output projection;
* windows (decode_windows) share one forward per step, each with its own random stream; windows of
  different lengths are padded, with attention masks keeping the padding out of every real position, and
  the projections onto the whole vocabulary of a step run as one matrix product for the batch.

And what we add as options: a canvas sized to the audio, a `confidence` unmasking strategy (commit the most
confident predictions step by step, LLaDA-style) that fixes repeated words, mask-predict refinement passes
after it (`refine`: re-predict the least sure tokens with everything else known), a vocabulary shortlist
for the steps after the first (`shortlist`: approximate, for speed), and `mbr` / `rover` selection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .distributed import in_halves_on_oom

UPSTREAM_SCHEDULE = (1.0, 0.9, 0.85, 0.8)
UPSTREAM_FALLBACK_RATIO = 0.7  # ratio of the steps past the end of the schedule
UPSTREAM_CANVAS = 256
UPSTREAM_CANDIDATES = 15
UPSTREAM_STEPS = 4
SELECTIONS = ("confidence", "mbr", "rover")
STRATEGIES = ("remask", "confidence")
# ROVER: weight of the vote frequency against the mean confidence of a word (Fiscus 1997, alpha).
ROVER_ALPHA = 0.5
# Canvas sized to the audio: tokens per second of speech with a safety margin.
TOKENS_PER_SECOND = 5.0
CANVAS_MARGIN = 12
MIN_CANVAS = 16
# Mask-predict refinement (Ghazvininejad et al. 2019): the first pass re-masks this share of the transcript's
# least confident tokens (then linearly fewer), plus every token equal to its neighbour.
REFINE_FRACTION = 0.3
# Vocabulary shortlist ("confidence" strategy, `shortlist` > 0): a window's first prediction scores the whole
# vocabulary; later steps and refine passes score only the union of each position's top-`shortlist` tokens
# there, plus end-of-text. The output projection is most of a small decoder's step (every still-masked
# position onto 50k tokens), so this cuts it several-fold; approximate, since confidences are then
# normalised over the shortlist. 0 keeps the full vocabulary (exact).
SHORTLIST_OFF = 0
# With `shortlist_int8` the first prediction picks the shortlist through an int8 copy of the output projection
# (DecoderBase.coarse_project, CPU) and scores it in float like the later steps, so no step multiplies by
# the whole float token table.
# Positions after a transcript's end ("confidence" strategy, `pad_context` >= 0): the first step commits the
# predicted end (the trailing run of end-of-text predictions) but for its first pad_context positions; later
# steps run on the transcript and pad_context positions after its committed end, not the whole audio-sized
# canvas, whose tail is mostly padding. None keeps the whole canvas (exact).
PAD_CONTEXT_OFF = None
# decode_windows: windows decoded together, at most this many per forward pass.
DEFAULT_MAX_BATCH_WINDOWS = 8
# Canvas positions past a window's length in a batch of windows of different lengths: no token (every
# comparison with a real token or the mask id is false); the trunk sees FILL_INPUT there, behind the mask.
FILL = -1
FILL_INPUT = 0
# Hidden rows projected onto the whole vocabulary in one matrix product: the logits of 512 rows onto 50k tokens
# are 100 MB in float32 (K = 15 canvases of 256 positions would be 0.8 GB at once); more rows go in chunks.
# Peak memory per 30 s window of the 170M preset at K = 1 / 4 / 15 (scripts/bench_decoding.py --memory): 291 /
# 447 / 495 MB, against 301 / 589 / 1689 MB when a window's logits were made whole; the same speed.
MAX_PROJECTION_ROWS = 512
# On a GPU a product of 512 rows leaves most of it idle; 4096 rows onto 50k tokens are 0.4 GB of bf16 logits
# (scripts/gpu_acceptance.sh records the peak memory at K = 1, 4, 15).
GPU_PROJECTION_ROWS = 4096


def _projection_rows(device: torch.device) -> int:
    return MAX_PROJECTION_ROWS if device.type == "cpu" else GPU_PROJECTION_ROWS


@dataclass(frozen=True)
class DecodingOptions:
    candidates: int = UPSTREAM_CANDIDATES
    steps: int = UPSTREAM_STEPS
    schedule: tuple[float, ...] = UPSTREAM_SCHEDULE
    fallback_ratio: float = UPSTREAM_FALLBACK_RATIO
    seq_len: int | None = UPSTREAM_CANVAS  # None: sized to the audio (tokens_per_second x duration + margin)
    tokens_per_second: float = TOKENS_PER_SECOND
    canvas_margin: int = CANVAS_MARGIN
    max_seq_len: int = UPSTREAM_CANVAS  # cap for the sized canvas: the length the model was trained on
    strategy: str = "remask"  # "remask" (upstream) | "confidence" (commit by confidence)
    temperature: float = 0.0  # "confidence" strategy: Gumbel noise for candidates after the first
    repeat_penalty: float = 0.0  # "confidence" strategy: defer committing a token equal to a neighbour's
    blocks: int = 1  # "confidence" strategy: >1 fills the canvas in that many blocks, left to right
    refine: int = 0  # "confidence" strategy: mask-predict passes after the fill (re-predict the least sure)
    refine_fraction: float = REFINE_FRACTION  # share of the transcript re-masked in the first refine pass
    shortlist: int = SHORTLIST_OFF  # "confidence" strategy: after step 0, score only each position's top-N
    pad_context: int | None = PAD_CONTEXT_OFF  # "confidence" strategy: end-of-text positions kept after a transcript
    shortlist_int8: bool = False  # with shortlist: pick it through an int8 output projection (CPU only)
    selection: str = "confidence"
    seed: int | None = None
    cut_at_pad: bool = True  # False: upstream's text (every non-special token, pads not cut)
    fast: bool = True  # shared cross k/v, step-0 broadcast, masked-only projection (same tokens either way)

    def __post_init__(self):
        if self.candidates < 1 or self.steps < 1:
            raise ValueError("candidates and steps must be at least 1")
        if self.selection not in SELECTIONS:
            raise ValueError(f"unknown selection {self.selection!r}; choose from {', '.join(SELECTIONS)}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; choose from {', '.join(STRATEGIES)}")
        if self.refine < 0 or not 0.0 < self.refine_fraction <= 1.0:
            raise ValueError(f"refine must be >= 0 and refine_fraction in (0, 1]: {self.refine}, {self.refine_fraction}")
        if self.shortlist < 0:
            raise ValueError(f"shortlist must be >= 0 (0: the full vocabulary), got {self.shortlist}")
        if self.shortlist and (self.strategy != "confidence" or not self.fast):
            raise ValueError("shortlist needs the confidence strategy in fast mode")
        if self.shortlist_int8 and not self.shortlist:
            raise ValueError("shortlist_int8 needs a shortlist (shortlist > 0)")
        if self.pad_context is not None and (self.pad_context < 0 or self.strategy != "confidence" or not self.fast):
            raise ValueError(f"pad_context must be >= 0 (or None: the whole canvas) and needs the confidence strategy "
                             f"in fast mode, got {self.pad_context}")
        if any(not 0.0 <= r <= 1.0 for r in self.schedule):
            raise ValueError(f"mask ratios must lie in [0, 1]: {self.schedule}")

    def ratio(self, step: int) -> float:
        return self.schedule[step] if step < len(self.schedule) else self.fallback_ratio

    def canvas_length(self, duration: float | None, prefix_len: int) -> int:
        if self.seq_len is not None:
            return self.seq_len
        if duration is None:
            return self.max_seq_len
        n = prefix_len + math.ceil(duration * self.tokens_per_second) + self.canvas_margin
        return int(min(self.max_seq_len, max(MIN_CANVAS, n)))

    def to_dict(self) -> dict:
        from dataclasses import asdict

        d = asdict(self)
        d["schedule"] = list(self.schedule)
        return d


@dataclass
class DecodingResult:
    tokens: torch.Tensor  # [K, L] final canvases
    confidences: torch.Tensor  # [K, L]
    scores: torch.Tensor  # [K] mean confidence over non-pad positions
    selected: int  # index of the chosen candidate
    text_tokens: list[int] = field(default_factory=list)  # chosen text (prefix removed, cut at pad)
    score: float = 0.0
    n_canvas_tokens: int = 0  # K x L x steps positions the decoder filled (upstream's "tokens")
    step_inputs: list[torch.Tensor] = field(default_factory=list)  # only with record=True

    @property
    def seq_len(self) -> int:
        return self.tokens.size(1)


# ----------------------------------------------------------------------------------------------------------
# The loop
#
# The core decodes W windows of K candidates at once: rows w*K .. w*K+K-1 of the canvas belong to window w,
# and the cross-attention keys/values have one row per window (model.cross_attention folds the K candidates
# of a window into one query sequence). Windows of different lengths are padded to the longest canvas (with
# FILL) and the longest encoder states; `lengths` and `frames` give the trunk key masks, so no real position
# attends to padding. The trunk runs on all rows in one call. The projections onto the whole vocabulary of
# a step run as one product for the batch (up to MAX_PROJECTION_ROWS rows), shortlists window by window.
# Everything else is row-wise, so a window decodes to the same tokens alone or batched, up to float rounding
# of the padded and bigger matrix products (tests/test_decoding_fast.py). On 2 CPU cores, batches of 8
# windows decode 1.5-2.4x faster than windows one at a time (scripts/bench_batch.py).


def _generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()  # CPU: the same draws on every device
    if seed is None:
        g.seed()  # a fresh random seed, without touching torch's global generator
    else:
        g.manual_seed(seed)
    return g


@dataclass
class _Ragged:
    """Lengths of the windows of a batch padded to a common shape: canvas positions per window [W] and
    encoder frames per window [W] (either None when all are equal)."""

    lengths: torch.Tensor | None = None
    frames: torch.Tensor | None = None

    def subset(self, windows: list[int]) -> "_Ragged":
        pick = (lambda t: None if t is None else t[windows])
        return _Ragged(pick(self.lengths), pick(self.frames))

    def row_lengths(self, K: int, R: int, L: int, device) -> torch.Tensor:
        """Canvas length of each of the R = W*K rows."""
        if self.lengths is None:
            return torch.full((R,), L, dtype=torch.long, device=device)
        return self.lengths.to(device).repeat_interleave(K)


def _hidden(decoder, x, kv, K, ragged: _Ragged | None = None):
    """Trunk on x [W*K, L] -> (hidden, shared). shared: the K rows of every window are identical (step 0
    masks everything), so the trunk ran once per window and hidden is [W, L, d] (exact, K times cheaper)."""
    W = x.size(0) // K
    lengths, frames = (ragged.lengths, ragged.frames) if ragged is not None else (None, None)
    if lengths is not None:
        x = x.masked_fill(x == FILL, FILL_INPUT)
        lengths = lengths.to(x.device)
    frames = frames.to(x.device) if frames is not None else None
    xr = x.view(W, K, -1)
    if K > 1 and torch.equal(xr, xr[:, :1].expand_as(xr)):
        if kv is not None and kv[0][0].size(0) == W * K:  # keys/values given per candidate
            kv = [(k[::K], v[::K]) for k, v in kv]
        return decoder.hidden_states(xr[:, 0], cross_kv=kv, lengths=lengths, frames=frames), True
    if lengths is not None:
        lengths = lengths.repeat_interleave(K)
    if frames is not None and kv is not None and kv[0][0].size(0) == W * K:
        frames = frames.repeat_interleave(K)
    return decoder.hidden_states(x, cross_kv=kv, lengths=lengths, frames=frames), False


def _active_hidden(decoder, x, kv, K, ragged: _Ragged, active: list[int], W: int):
    """_hidden for the windows `active` only (those still being decoded): (hidden, shared, rows), where
    hidden is indexed by position in `active` and rows selects their rows of x (None: all windows)."""
    if len(active) == W:
        return (*_hidden(decoder, x, kv, K, ragged), None)
    rows = torch.tensor([w * K + k for w in active for k in range(K)], device=x.device)
    per_window = kv is not None and kv[0][0].size(0) == W
    index = torch.tensor(active, device=x.device) if per_window else rows
    kv = None if kv is None else [(k[index], v[index]) for k, v in kv]
    return (*_hidden(decoder, x[rows], kv, K, ragged.subset(active)), rows)


def _trimmed(canvas, ragged: _Ragged, K: int, keep: int | None, pad_id):
    """(columns, ragged, row lengths) the trunk runs on this step: with keep (options.pad_context), each
    window's canvas ends `keep` positions after the start of its rows' trailing run of committed end-of-text
    (every masked position lies before it); the batch runs on its longest such window."""
    R, L = canvas.shape
    W = R // K
    row_len = ragged.row_lengths(K, R, L, canvas.device)
    if keep is None:
        return L, ragged, row_len
    tail = (canvas == pad_id) | (canvas == FILL)
    end = L - tail.flip(1).long().cumprod(1).sum(1)  # first position of the trailing run, per row
    window = torch.minimum(row_len, end + keep).view(W, K).max(1).values
    L_cur = int(window.max())
    lengths = None if bool((window == L_cur).all()) else window
    return L_cur, _Ragged(lengths, ragged.frames), window.repeat_interleave(K)


def _window_hidden(hidden, shared, w, K, positions=None):
    """(hidden rows of window w, repeats): the rows to project for its positions (bool [K, L], row-major
    order; None: every position of its K rows, [K, L, d]); repeats > 1 when the K rows are shared and equal,
    so only one row's positions are given and its logits are to be repeated K times."""
    if shared:
        h = hidden[w]
        if positions is None:
            return h, 1
        if torch.equal(positions, positions[:1].expand_as(positions)):
            return h[positions[0]], K
        return h.expand(K, *h.shape)[positions], 1
    h = hidden[w * K : (w + 1) * K]
    return (h if positions is None else h[positions]), 1


def _window_logits(decoder, hidden, shared, w, K, positions=None, rows=None):
    """Window w's logits: [K, L, V] ([L, V] when shared: the same for all K rows), or, for positions (bool
    [K, L]), [n, V] for those positions in row-major order. rows: output rows of a shortlist [V', d] to
    project onto instead of the whole vocabulary (logits [..., V'])."""
    h, repeats = _window_hidden(hidden, shared, w, K, positions)
    logits = decoder.project(h) if rows is None else h @ rows.T
    return logits.repeat(repeats, 1) if repeats > 1 else logits


def _masked_logits(decoder, hidden, shared, K, m, windows, shortlists, project=None):
    """{w: logits [n_w, V or V_w]} of the masked positions m [W*K, L] of each window in `windows`: onto its
    shortlist's rows where it has one, else onto the whole vocabulary (through `project`, default the
    decoder's), those in one product for the batch (a bigger matrix product reads the 77 MB token table of a
    Whisper decoder once, not once per window)."""
    project = project or decoder.project
    out, full = {}, []
    for w in windows:
        positions = m[w * K : (w + 1) * K]
        short = shortlists[w] if shortlists is not None else None
        if short is not None:
            out[w] = _window_logits(decoder, hidden, shared, w, K, positions, short[1])
        else:
            full.append((w, *_window_hidden(hidden, shared, w, K, positions)))
    start, limit = 0, _projection_rows(hidden.device)
    while start < len(full):  # chunks of at most `limit` rows (always at least one window)
        end, rows = start, 0
        while end < len(full) and (end == start or rows + full[end][1].size(0) <= limit):
            rows += full[end][1].size(0)
            end += 1
        chunk = full[start:end]
        logits = project(torch.cat([h for _, h, _ in chunk]) if len(chunk) > 1 else chunk[0][1])
        for (w, h, repeats), part in zip(chunk, logits.split([h.size(0) for _, h, _ in chunk])):
            out[w] = part.repeat(repeats, 1) if repeats > 1 else part
        start = end
    return out


def _best_tokens(decoder, rows, confidence: bool = False):
    """(max softmax probability or None, argmax) over the whole vocabulary for hidden rows [n, d], projected
    MAX_PROJECTION_ROWS rows at a time (GPU_PROJECTION_ROWS on a GPU): the same values as one product
    (softmax and argmax are row-wise), but the logits of K x 256 positions onto 32-50k tokens (0.5-0.8 GB at
    K = 15) never exist at once."""
    confs, preds = [], []
    for chunk in rows.split(_projection_rows(rows.device)):
        logits = decoder.project(chunk)
        if confidence:
            c, p = torch.softmax(logits.float(), dim=-1).max(-1)
            confs.append(c)
        else:
            p = logits.argmax(-1)
        preds.append(p)
    return (torch.cat(confs) if confidence else None), torch.cat(preds)  # split gives one chunk even of no rows


def _shortlist(decoder, logits, top: int, pad_id):
    """(token ids, their output rows): the union of each row's `top` best tokens in logits [n, V], plus
    end-of-text (so a transcript can still end anywhere)."""
    ids = logits.topk(min(top, logits.size(-1)), dim=-1).indices.flatten()
    if pad_id is not None:
        ids = torch.cat([ids, torch.tensor([pad_id], device=ids.device)])
    ids = torch.unique(ids)
    return ids, decoder.output_rows(ids)


def _decode_batch(decoder, kv, cond_k, W, L, prefix, options: DecodingOptions, generators, masks=None, record=None,
                  pad_id=None, ragged: _Ragged | None = None):
    """W windows x K candidates on canvases of length L -> (canvas, confidences), both [W*K, L].

    kv: cross-attention keys/values with one row per window (fast mode); cond_k: encoder states with one row
    per candidate (reference mode: keys/values recomputed at every step, as upstream does). generators: one
    per window, each drawing that window's [K, L_w] uniforms per step exactly as a lone window would.
    ragged: the windows' own canvas lengths L_w <= L and frame counts (fast mode only); positions past L_w
    hold FILL.
    """
    K, P = options.candidates, len(prefix)
    mask_id = decoder.config.mask_token_id
    device = decoder.device
    ragged = ragged or _Ragged()
    row_len = ragged.row_lengths(K, W * K, L, device)
    valid = torch.arange(L, device=device) < row_len[:, None]
    canvas = torch.full((W * K, L), mask_id, dtype=torch.long, device=device).masked_fill(~valid, FILL)
    canvas[:, :P] = torch.tensor(prefix, dtype=torch.long, device=device)

    def full_logits(x):  # reference mode: every position of every row, condition expanded per candidate
        return decoder(x, condition=cond_k) if cond_k is not None else decoder(x, cross_kv=kv)

    if options.strategy == "confidence":
        return _confidence_unmask(decoder, canvas, P, kv, options, generators, full_logits, pad_id, ragged)

    win_len = row_len[::K].tolist()
    confidences = torch.zeros(W * K, L, device=device)
    for s in range(options.steps):
        if masks is not None:
            m = torch.as_tensor(masks[s], dtype=torch.bool, device=device).clone()
        else:
            u = [torch.nn.functional.pad(torch.rand(K, n, generator=g), (0, L - n), value=1.0)
                 for g, n in zip(generators, win_len)]
            m = (torch.cat(u) < options.ratio(s)).to(device)
        m[:, :P] = False
        m &= valid
        x = torch.where(m, torch.full_like(canvas, mask_id), canvas)
        if record is not None:
            record.append(x.clone())
        last = s == options.steps - 1
        if not options.fast:
            logits = full_logits(x)
            if last:
                confidences, pred = torch.softmax(logits.float(), dim=-1).max(-1)
            else:
                pred = logits.argmax(-1)
        elif last:  # confidence of every position (upstream scores whole canvases)
            hidden, shared = _hidden(decoder, x, kv, K, ragged)
            rows = hidden.reshape(-1, hidden.size(-1))  # [W*L, d] when shared, else [W*K*L, d]
            c, p = _best_tokens(decoder, rows, confidence=True)
            shape = (W, 1, L) if shared else (W, K, L)
            confidences = c.view(shape).expand(W, K, L).reshape(W * K, L)
            pred = p.view(shape).expand(W, K, L).reshape(W * K, L)
        else:  # only the masked positions are projected
            hidden, shared = _hidden(decoder, x, kv, K, ragged)
            parts = [_window_hidden(hidden, shared, w, K, m[w * K : (w + 1) * K]) for w in range(W)]
            _, p = _best_tokens(decoder, torch.cat([h for h, _ in parts]))
            sizes = [h.size(0) for h, _ in parts]
            picks = [q.repeat(repeats) if repeats > 1 else q for q, (_, repeats) in zip(p.split(sizes), parts)]
            pred = torch.zeros_like(canvas)
            pred[m] = torch.cat(picks)
        canvas = torch.where(m, pred, x)
    return canvas, confidences


@torch.no_grad()
def parallel_diffusion_decode(
    decoder,
    condition: torch.Tensor | None,
    candidates: int = UPSTREAM_CANDIDATES,
    steps: int = UPSTREAM_STEPS,
    schedule=UPSTREAM_SCHEDULE,
    seq_len: int = UPSTREAM_CANVAS,
    bos_id: int = 1,
    pad_id: int = 2,
    masks=None,
    selection: str = "confidence",
    seed: int | None = None,
    *,
    prefix_ids: list[int] | None = None,
    options: DecodingOptions | None = None,
    generator: torch.Generator | None = None,
    cross_kv=None,
    to_words=None,
    record: bool = False,
) -> DecodingResult:
    """Decode one audio window. condition: encoder states [F, d] or [1, F, d] (or None for no condition).

    masks: optional precomputed per-step masks (bool [K, L] each) replacing the random draws — the way to
    reproduce an upstream run exactly. seed: a CPU generator seeded with it draws the masks.
    """
    if options is None:
        options = DecodingOptions(
            candidates=candidates, steps=steps, schedule=tuple(schedule), seq_len=seq_len,
            selection=selection, seed=seed,
        )
    K, L = options.candidates, seq_len if seq_len is not None else options.seq_len
    prefix = list(prefix_ids) if prefix_ids is not None else [bos_id]
    if generator is None:
        generator = _generator(options.seed)
    kv, cond_k = cross_kv, None
    if kv is None and condition is not None:
        cond = (condition if condition.dim() == 3 else condition.unsqueeze(0)).to(decoder.device)
        if options.fast:
            kv = decoder.precompute_cross_kv(cond)
        else:  # upstream: the condition expanded to K rows, keys/values recomputed per step
            cond_k = cond.expand(K, *cond.shape[1:])
    record_inputs = [] if record else None
    canvas, confidences = _decode_batch(decoder, kv, cond_k, 1, L, prefix, options, [generator], masks, record_inputs,
                                        pad_id=pad_id)
    return _result(canvas, confidences, prefix, pad_id, options, to_words, record_inputs or [])


def _result(canvas, confidences, prefix, pad_id, options: DecodingOptions, to_words, step_inputs) -> DecodingResult:
    """One window's candidates [K, L] -> scores, the selected candidate and its text."""
    K, L = canvas.shape
    valid = canvas != pad_id
    scores = (confidences * valid).sum(1) / valid.sum(1).clamp(min=1)
    result = DecodingResult(
        tokens=canvas.cpu(), confidences=confidences.float().cpu(), scores=scores.float().cpu(), selected=0,
        n_canvas_tokens=K * L * options.steps, step_inputs=[x.cpu() for x in step_inputs],
    )
    sequences = [text_ids(row, prefix, pad_id, options.cut_at_pad) for row in result.tokens.tolist()]
    _select(result, sequences, options.selection, prefix, pad_id, options.cut_at_pad, to_words)
    return result


def _confidence_unmask(decoder, canvas, P, kv, options: DecodingOptions, generators, full_logits, pad_id=None,
                       ragged: _Ragged | None = None):
    """Commit the most confident predictions step by step (LLaDA low-confidence remasking).

    Start all-masked; at step s, predict every still-masked position and commit as many of the most
    confident ones as the linear schedule allows, so all are committed after the last step. Trailing
    end-of-text tokens are usually the most confident, so the transcript length is fixed first. Candidates
    after the first add Gumbel noise (options.temperature) to their choice of token for diversity, drawn
    from their window's generator. canvas: [W*K, L], W windows (of their own lengths when ragged; FILL past
    the end).
    """
    R, L = canvas.shape
    K = options.candidates
    W = R // K
    mask_id = decoder.config.mask_token_id
    ragged = ragged or _Ragged()
    n_gen = ragged.row_lengths(K, R, L, canvas.device) - P  # positions to fill, per row
    positions = torch.arange(L, device=canvas.device).expand(R, L)
    confidences = torch.zeros(R, L, device=canvas.device)
    confidences[:, :P] = 1.0
    shortlists = [None] * W  # per window, with options.shortlist: made from its first prediction
    trim = options.pad_context is not None and options.fast
    cols, ragged_step = L, ragged
    for s in range(options.steps):
        m = canvas == mask_id
        if not m.any():
            break
        if trim:  # the schedule spreads over the transcript and the end-of-text positions kept after it
            cols, ragged_step, active_len = _trimmed(canvas, ragged, K, options.pad_context, pad_id)
            n_gen = active_len - P
        # ceil(n_gen * (s + 1) / steps) in integers; everything after the last step.
        target = n_gen if s == options.steps - 1 else (n_gen * (s + 1) + options.steps - 1) // options.steps
        committed = n_gen - m[:, P:].sum(1)
        # A window whose rows all reached this step's count (a row may lag after a dropped duplicate) commits
        # nothing: alone it would skip the step, so in a batch it is not projected and draws no noise, and
        # its random stream stays where it would be alone.
        done = (committed >= target).view(W, K).all(1)
        if bool(done.all()):
            continue
        if options.fast:  # the trunk runs on the windows with something to commit only
            active = [w for w in range(W) if not done[w]]
            hidden, shared, rows = _active_hidden(decoder, canvas[:, :cols], kv, K, ragged_step, active, W)
            m_active = (m if rows is None else m[rows])[:, :cols]
            new = [j for j, w in enumerate(active) if shortlists[w] is None]
            if options.shortlist_int8 and new and decoder.device.type == "cpu":
                coarse = _masked_logits(decoder, hidden, shared, K, m_active, new, None, decoder.coarse_project)
                for j in new:
                    shortlists[active[j]] = _shortlist(decoder, coarse[j], options.shortlist, pad_id)
            logits_active = _masked_logits(decoder, hidden, shared, K, m_active, range(len(active)),
                                           [shortlists[w] for w in active])
            window_logits = {w: logits_active[j] for j, w in enumerate(active)}
        else:
            logits = full_logits(canvas)
        picks, confs = [], []
        for w in range(W):
            mw = m[w * K : (w + 1) * K]
            if done[w]:
                n = int(mw.sum())
                picks.append(torch.full((n,), mask_id, dtype=torch.long, device=canvas.device))
                confs.append(torch.full((n,), -1.0, device=canvas.device))
                continue
            short = shortlists[w]
            flat = window_logits[w] if options.fast else logits[w * K : (w + 1) * K][mw]
            if options.shortlist and short is None:
                shortlists[w] = _shortlist(decoder, flat, options.shortlist, pad_id)
            logp = torch.log_softmax(flat.float(), dim=-1)
            if options.temperature > 0 and K > 1:
                rows = mw.nonzero()[:, 0]
                u = torch.rand(logp.shape, generator=generators[w]).to(logp.device).clamp_(1e-10, 1 - 1e-10)
                gumbel = -torch.log(-torch.log(u)) * options.temperature
                gumbel[rows == 0] = 0.0  # candidate 0 stays greedy
                pick = (logp + gumbel).argmax(-1)
            else:
                pick = logp.argmax(-1)
            confs.append(logp.gather(-1, pick[:, None]).squeeze(-1).exp())
            picks.append(pick if short is None else short[0][pick])
        pred = torch.full_like(canvas, mask_id)
        pred[m] = torch.cat(picks)
        c = torch.full((R, L), -1.0, device=canvas.device)
        c[m] = torch.cat(confs)
        if options.repeat_penalty > 0:
            # A token equal to an already committed neighbour is often a parallel-decoding duplicate
            # ("country country"): defer it so it is decided with more context.
            left = torch.nn.functional.pad(canvas[:, :-1], (1, 0), value=FILL)
            right = torch.nn.functional.pad(canvas[:, 1:], (0, 1), value=FILL)
            dup = m & ((pred == left) | (pred == right))
            c = torch.where(dup, c * (1.0 - options.repeat_penalty), c)
        # Per row: commit the most confident masked positions up to the schedule's count for this step.
        n_row = (target - committed).clamp(min=0)
        commit = m & (_ranks(c, descending=True) < n_row[:, None])
        n_blocks = min(options.blocks, options.steps)  # at least one step per block
        if n_blocks > 1:
            # Semi-autoregressive: the canvas is filled block by block, left to right; within a block, by
            # confidence. Later blocks stay masked (and are still predicted, as context) until their turn.
            block = min(n_blocks - 1, s * n_blocks // options.steps)
            end = P + (n_gen * (block + 1) + n_blocks - 1) // n_blocks
            later = positions >= end[:, None]
            c = c.masked_fill(later, -2.0)
            commit = m & (_ranks(c, descending=True) < n_row[:, None]) & ~later
        if options.repeat_penalty > 0 and s < options.steps - 1:
            # Two neighbours committed in the same step with the same token are the typical parallel
            # duplicate: keep the more confident one, re-predict the other next step with its neighbour known.
            pair = commit[:, :-1] & commit[:, 1:] & (pred[:, :-1] == pred[:, 1:])
            drop_left = pair & (c[:, :-1] < c[:, 1:])
            drop_right = pair & ~drop_left
            commit[:, :-1] &= ~drop_left
            commit[:, 1:] &= ~drop_right
        if trim and s == 0:
            # The predicted end of each transcript (the trailing run of end-of-text predictions) is committed
            # at once, but for its first pad_context positions (still free to become text, should the end
            # be predicted too early), so the next steps run on the transcript and those positions.
            end = (pred == pad_id) | (canvas == FILL)
            tail = end.flip(1).long().cumprod(1).flip(1).bool()
            start = L - tail.sum(1)  # first position of the predicted tail, per row
            commit |= m & tail & (positions >= (start + options.pad_context)[:, None])
        canvas = torch.where(commit, pred, canvas)
        confidences = torch.where(commit, c.clamp(min=0), confidences)
    for r in range(options.refine):
        canvas, confidences = _refine_pass(decoder, canvas, confidences, P, kv, options, full_logits, pad_id, r,
                                           shortlists, ragged)
    return canvas, confidences


def _ranks(values, descending=False):
    """Rank of every entry of values [R, L] within its row (0: the first in sort order; ties by position)."""
    R, L = values.shape
    ranks = torch.empty(R, L, dtype=torch.long, device=values.device)
    order = values.argsort(dim=1, descending=descending, stable=True)
    return ranks.scatter_(1, order, torch.arange(L, device=values.device).expand(R, L))


def _refine_pass(decoder, canvas, confidences, P, kv, options: DecodingOptions, full_logits, pad_id, r: int,
                 shortlists=None, ragged: _Ragged | None = None):
    """One mask-predict pass over committed canvases: re-mask the least confident tokens of each row (and any
    token equal to a neighbour or pair equal to the pair before it, the parallel-duplicate signatures) and
    predict them again with everything else known. The end-of-text boundary is included, so a transcript can
    grow or shrink by a token."""
    R, L = canvas.shape
    K = options.candidates
    W = R // K
    mask_id = decoder.config.mask_token_id
    is_pad = canvas == pad_id
    real = canvas != FILL
    # Transcript length per row: positions before the first end-of-text (all generated ones if none).
    n_gen = real[:, P:].sum(1)
    first_pad = torch.where(is_pad[:, P:].any(1), is_pad[:, P:].float().argmax(1), n_gen)
    share = options.refine_fraction * (options.refine - r) / options.refine
    n_row = (first_pad.float() * share).ceil().long().clamp(min=1)
    c = confidences.masked_fill(~real, float("inf"))
    c[:, :P] = float("inf")
    m = _ranks(c) < n_row[:, None]
    left = torch.nn.functional.pad(canvas[:, :-1], (1, 0), value=FILL)
    dup = (canvas == left) & ~is_pad
    # The two-token form of the same duplicate ("can do can do"): a pair equal to the pair before it; its
    # second copy is re-masked.
    left2 = torch.nn.functional.pad(canvas[:, :-2], (2, 0), value=FILL)
    left3 = torch.nn.functional.pad(canvas[:, :-3], (3, 0), value=FILL)
    pair_end = (canvas == left2) & (left == left3) & ~is_pad
    dup |= pair_end | torch.nn.functional.pad(pair_end[:, 1:], (0, 1), value=False)
    dup[:, :P] = False
    m |= dup
    cols, ragged_step, row_len = _trimmed(canvas, ragged or _Ragged(), K, options.pad_context if options.fast else None,
                                          pad_id)
    m &= torch.arange(L, device=m.device) < row_len[:, None]  # nothing past the positions the trunk sees
    x = torch.where(m, torch.full_like(canvas, mask_id), canvas)
    if options.fast:
        hidden, shared = _hidden(decoder, x[:, :cols], kv, K, ragged_step)
        shortlists = shortlists if shortlists is not None else [None] * W
        window_logits = _masked_logits(decoder, hidden, shared, K, m[:, :cols], range(W), shortlists)
        confs, picks = [], []
        for w in range(W):
            short = shortlists[w]
            c, p = torch.softmax(window_logits[w].float(), dim=-1).max(-1)
            confs.append(c)
            picks.append(p if short is None else short[0][p])
        conf, pick = torch.cat(confs), torch.cat(picks)
    else:
        conf, pick = torch.softmax(full_logits(x)[m].float(), dim=-1).max(-1)
    canvas, confidences = canvas.clone(), confidences.clone()
    canvas[m], confidences[m] = pick, conf
    return canvas, confidences


@torch.no_grad()
def decode_windows(decoder, conditions, options: DecodingOptions, prefix_ids, pad_id, durations=None, to_words=None,
                   *, seeds=None, max_batch_windows: int = DEFAULT_MAX_BATCH_WINDOWS) -> list[DecodingResult]:
    """Decode many windows; results in input order.

    Windows go through one forward per step together, at most `max_batch_windows` at a time (memory: the
    hidden states of max_batch_windows x K canvases). In fast mode windows of any lengths share a batch
    (sorted by length, so little is padded; masks keep the padding out); the reference mode batches only
    windows of one shape. Each window draws from its own generator, seeded with seeds[i] (default
    options.seed + i; a fresh random seed when that is None), so it decodes to the same tokens alone or in any
    batch (up to the float rounding of different matrix shapes; max_batch_windows=1 decodes each alone). A
    batch the device has no memory for is decoded in halves.
    """
    if max_batch_windows < 1:
        raise ValueError(f"max_batch_windows must be at least 1, got {max_batch_windows}")
    n = len(conditions)
    if seeds is None:
        seeds = [None if options.seed is None else options.seed + i for i in range(n)]
    if len(seeds) != n or (durations is not None and len(durations) != n):
        raise ValueError(f"{n} conditions but {len(seeds)} seeds and {len(durations or [])} durations")
    prefix = list(prefix_ids)
    K = options.candidates
    states = [c.squeeze(0) if c.dim() == 3 else c for c in conditions]
    lengths = [options.canvas_length(durations[i] if durations is not None else None, len(prefix)) for i in range(n)]
    if options.fast:  # longest first, so the windows of a batch are of similar lengths
        order = sorted(range(n), key=lambda i: (-lengths[i], -states[i].size(0), i))
        batches = [order[s : s + max_batch_windows] for s in range(0, n, max_batch_windows)]
    else:
        groups: dict[tuple[int, int], list[int]] = {}
        for i in range(n):
            groups.setdefault((states[i].size(0), lengths[i]), []).append(i)
        batches = [idx[s : s + max_batch_windows] for idx in groups.values() for s in range(0, len(idx), max_batch_windows)]
    device = decoder.device

    def decode_batch(idx: list[int]) -> list[DecodingResult]:
        L = max(lengths[i] for i in idx)
        frames = [states[i].size(0) for i in idx]
        F_max = max(frames)
        cond = torch.stack([torch.nn.functional.pad(states[i], (0, 0, 0, F_max - states[i].size(0))) for i in idx])
        cond = cond.to(device, non_blocking=True)
        ragged = _Ragged(
            lengths=torch.tensor([lengths[i] for i in idx]) if any(lengths[i] != L for i in idx) else None,
            frames=torch.tensor(frames) if any(f != F_max for f in frames) else None,
        )
        kv, cond_k = (decoder.precompute_cross_kv(cond), None) if options.fast else (None, cond.repeat_interleave(K, 0))
        canvas, confidences = _decode_batch(decoder, kv, cond_k, len(idx), L, prefix, options,
                                            [_generator(seeds[i]) for i in idx], pad_id=pad_id, ragged=ragged)
        return [_result(canvas[w * K : (w + 1) * K, : lengths[i]], confidences[w * K : (w + 1) * K, : lengths[i]],
                        prefix, pad_id, options, to_words, []) for w, i in enumerate(idx)]

    results: list[DecodingResult | None] = [None] * n
    for idx in batches:
        # A batch the device has no memory for is decoded in halves: each window draws from its own
        # generator, so it decodes to the same tokens in any batch (up to float rounding), and nothing is lost.
        for i, r in zip(idx, in_halves_on_oom(decode_batch, idx, "window")):
            results[i] = r
    return results  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------------------
# Candidate selection


def text_ids(row, prefix, pad_id, cut_at_pad=True) -> list[int]:
    row = list(row)[len(prefix):]
    if cut_at_pad and pad_id in row:
        row = row[: row.index(pad_id)]
    elif not cut_at_pad:
        row = [t for t in row if t != pad_id]
    return row


def select_by_confidence(scores: torch.Tensor) -> int:
    """Upstream: the first candidate with the highest mean confidence."""
    return int(torch.argmax(scores))  # torch.argmax returns the first maximum


def _word_error(hyp, ref) -> float:
    from rapidfuzz.distance import Levenshtein

    if not ref:
        return float(len(hyp) > 0) if hyp else 0.0
    return Levenshtein.distance(hyp, ref) / len(ref)


def mbr_select(sequences, weights=None) -> int:
    """Minimum Bayes risk: the candidate with the least expected word error against the others (weighted by
    their scores). Ties go to the lower index."""
    n = len(sequences)
    w = [1.0] * n if weights is None else [float(x) for x in weights]
    risks = [sum(w[j] * _word_error(sequences[i], sequences[j]) for j in range(n) if j != i) for i in range(n)]
    return min(range(n), key=lambda i: (risks[i], i))


NULL = None


def rover_combine(sequences, confidences=None, weights=None, alpha: float = ROVER_ALPHA):
    """Word-level ROVER: align all candidates into one word transition network and vote in every slot.

    sequences: list of word lists; confidences: per-word confidences (same shapes) or None; weights: a weight
    per candidate (e.g. its score) that also orders the alignment (best first). A slot's winner maximises
    alpha * (vote weight / total weight) + (1 - alpha) * mean confidence; an empty (NULL) winner drops the slot.
    """
    n = len(sequences)
    if n == 0:
        return []
    w = [1.0] * n if weights is None else [float(x) for x in weights]
    conf = confidences or [[1.0] * len(s) for s in sequences]
    order = sorted(range(n), key=lambda i: (-w[i], i))
    # Each slot: dict word -> list of (candidate weight, confidence); NULL for a candidate's gap.
    slots: list[dict] = [{word: [(w[order[0]], c)]} for word, c in zip(sequences[order[0]], conf[order[0]])]
    # A candidate's gap (NULL) votes with that candidate's mean word confidence.
    gap_conf = [sum(c) / len(c) if c else 1.0 for c in conf]
    seen = [order[0]]
    for i in order[1:]:
        seq, cs = sequences[i], conf[i]
        S, T = len(slots), len(seq)
        # DP alignment of seq against the slots: match cost 0 if the word is in the slot, else 1.
        D = [[0.0] * (T + 1) for _ in range(S + 1)]
        for a in range(1, S + 1):
            D[a][0] = D[a - 1][0] + (0.0 if NULL in slots[a - 1] else 1.0)
        for b in range(1, T + 1):
            D[0][b] = D[0][b - 1] + 1.0
        for a in range(1, S + 1):
            for b in range(1, T + 1):
                sub = D[a - 1][b - 1] + (0.0 if seq[b - 1] in slots[a - 1] else 1.0)
                dele = D[a - 1][b] + (0.0 if NULL in slots[a - 1] else 1.0)
                ins = D[a][b - 1] + 1.0
                D[a][b] = min(sub, dele, ins)
        a, b, new_slots = S, T, []
        while a > 0 or b > 0:
            if a > 0 and b > 0 and D[a][b] == D[a - 1][b - 1] + (0.0 if seq[b - 1] in slots[a - 1] else 1.0):
                slots[a - 1].setdefault(seq[b - 1], []).append((w[i], cs[b - 1]))
                new_slots.append(slots[a - 1])
                a, b = a - 1, b - 1
            elif a > 0 and D[a][b] == D[a - 1][b] + (0.0 if NULL in slots[a - 1] else 1.0):
                slots[a - 1].setdefault(NULL, []).append((w[i], gap_conf[i]))
                new_slots.append(slots[a - 1])
                a -= 1
            else:  # insertion: a new slot where every earlier candidate has a gap
                slot = {seq[b - 1]: [(w[i], cs[b - 1])], NULL: [(w[j], gap_conf[j]) for j in seen]}
                new_slots.append(slot)
                b -= 1
        slots = new_slots[::-1]
        seen.append(i)
    total = sum(w)
    out = []
    for slot in slots:
        def vote(item):
            word, votes = item
            freq = sum(v for v, _ in votes) / total
            mean_conf = sum(c for _, c in votes) / len(votes)
            return alpha * freq + (1 - alpha) * mean_conf
        word = max(slot.items(), key=vote)[0]
        if word is not NULL:
            out.append(word)
    return out


def _select(result: DecodingResult, sequences, selection, prefix, pad_id, cut_at_pad, to_words):
    scores = result.scores
    if selection == "confidence" or len(sequences) == 1:
        result.selected = select_by_confidence(scores)
        result.text_tokens = sequences[result.selected]
    else:
        words = [to_words(s) for s in sequences] if to_words else [[(t,) for t in s] for s in sequences]
        if selection == "mbr":
            result.selected = mbr_select(words, weights=scores.tolist())
            result.text_tokens = sequences[result.selected]
        else:  # rover: a new sequence voted from all candidates
            P = len(prefix)
            confs = []
            for k, s in enumerate(sequences):
                c = result.confidences[k, P : P + len(s)].tolist()
                confs.append(_group_confidences(words[k], c))
            combined = rover_combine(words, confs, weights=scores.tolist())
            result.text_tokens = [t for word in combined for t in word]
            # The reported candidate is the one closest to the voted text.
            result.selected = min(range(len(words)), key=lambda k: (_word_error(words[k], combined), k))
    result.score = float(scores[result.selected])


def _group_confidences(words, token_confidences) -> list[float]:
    """Mean token confidence per word (words are tuples of token ids covering the sequence in order)."""
    out, j = [], 0
    for word in words:
        n = len(word)
        chunk = token_confidences[j : j + n] or [0.0]
        out.append(sum(chunk) / len(chunk))
        j += n
    return out


def words_from_tokens(tokenizer):
    """A to_words function: groups token ids into words at tokens that start with a space (Whisper BPE, and
    SentencePiece's '▁'), so MBR and ROVER vote on words, not sub-word pieces."""
    cache: dict[int, bool] = {}

    def starts_word(t: int) -> bool:
        if t not in cache:
            piece = tokenizer._tok.id_to_token(t) or ""
            cache[t] = piece.startswith(("Ġ", "▁", " "))
        return cache[t]

    def to_words(seq):
        words, cur = [], []
        for t in seq:
            if cur and starts_word(t):
                words.append(tuple(cur))
                cur = []
            cur.append(t)
        if cur:
            words.append(tuple(cur))
        return words

    return to_words
