"""Parallel Diffusion Decoding (SPEC section 6) and candidate selection.

By default upstream's loop, exactly (upstream.remask: K candidates re-masked at random and re-predicted for a
few steps), run through forward.SharedForward, which gives the same tokens faster; the candidate with the
highest mean confidence over non-pad positions wins. What we add as options: a canvas sized to the audio,
the `confidence` unmasking strategy (commit the most confident predictions step by step, LLaDA-style), which
fixes repeated words, built from small policies in the style of openai/whisper's `LogitFilter`s (a commit
schedule, repeat deferral, pad context, a vocabulary shortlist, mask-predict refinement), and `mbr` / `rover`
selection. Windows (decode_windows) share one forward per step, each with its own random stream.

Reading order: the policies, the loop and its entry points, selection, helpers (the options, the result and
their string forms are decoding_options.py's).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# The options, the result and the text helpers are torch-free (decoding_options.py); re-exported here.
from .decoding_options import (  # noqa: F401
    CANVAS_MARGIN, DEFAULT_MAX_BATCH_WINDOWS, FALSE_WORDS, FILL, FILL_INPUT, MIN_CANVAS, MIN_SEQ_LEN, NONE_WORDS,
    PAD_CONTEXT_OFF, REFINE_FRACTION, RETIRED_FIELDS, SHORTLIST_OFF, TOKENS_PER_SECOND, TRUE_WORDS,
    UPSTREAM_CANDIDATES, UPSTREAM_CANVAS, UPSTREAM_FALLBACK_RATIO, UPSTREAM_PAD, UPSTREAM_PREFIX, UPSTREAM_SCHEDULE,
    UPSTREAM_STEPS, WORD_START_MARKERS, DecodingOptions, DecodingResult, text_tokens, words_from_tokens,
)
from .distributed import in_halves_on_oom
from .forward import Ragged, SharedForward, to_device
from .upstream import ReferenceForward, Trace, remask

# ROVER: weight of the vote frequency against the mean confidence of a word (Fiscus 1997, alpha).
ROVER_ALPHA = 0.5


# ----------------------------------------------------------------------------------------------------------
# Policies of the confidence strategy
#
# The loop (_confidence_unmask) starts all-masked and, at each step, predicts every still-masked position and
# commits some. What it commits is decided by policies, each a small rule behind one interface (`Policy`),
# called phase by phase in list order: narrow (the columns the trunk runs on), plan (how many positions each
# row commits), the forward with its vocabulary (prepare, vocabulary, observe), rescore (before the commits
# are ranked by confidence), commit (after), finish (after the last step).


@dataclass
class Batch:
    """What the loop and its policies share about a batch: W windows x K candidates decoded by `forward`."""

    decoder: object
    forward: object  # forward.SharedForward or upstream.ReferenceForward
    K: int
    P: int  # prefix length
    pad_id: int | None
    ragged: Ragged = field(default_factory=Ragged)

    @property
    def mask_id(self) -> int:
        return self.decoder.config.mask_token_id


@dataclass
class Step:
    """One step of the loop as its policies see it: rows R = W*K, canvas length L."""

    index: int
    steps: int
    P: int
    canvas: torch.Tensor  # [R, L] before the step
    masked: torch.Tensor  # bool [R, L], still masked
    n_gen: torch.Tensor  # [R] positions to fill per row (prefix excluded), on the columns the trunk runs on
    columns: int  # the trunk runs on canvas[:, :columns]
    ragged: Ragged  # and on these lengths
    ends: torch.Tensor | None = None  # [W] the columns of each window (PadContext), read into columns and ragged
    todo: torch.Tensor | None = None  # [R] positions each row is to commit (<= 0: none)
    pred: torch.Tensor | None = None  # [R, L] predictions at the masked positions (the mask id elsewhere)
    scores: torch.Tensor | None = None  # [R, L] what ranks the commits: prediction probabilities (-1: none)
    commit: torch.Tensor | None = None  # bool [R, L], the positions committed this step


class Policy:
    """A rule of the confidence strategy. Every hook does nothing unless a policy overrides it."""

    def narrow(self, batch: Batch, step: Step) -> None:
        """Before the forward: step.ends (then step.columns and step.ragged) and step.n_gen."""

    def plan(self, step: Step) -> None:
        """Before the forward: step.todo."""

    def prepare(self, batch: Batch, run, masked, windows: list[int]) -> None:
        """Before the projection of `run` (the trunk's pass over `windows`; masked: their rows)."""

    def vocabulary(self, w: int):
        """(token ids, output rows) window w is scored on, or None: the whole vocabulary."""
        return None

    def observe(self, batch: Batch, w: int, logits) -> None:
        """After window w's logits [n, V or V_w] of a step."""

    def rescore(self, step: Step) -> None:
        """Change step.scores, which rank the commits."""

    def commit(self, step: Step) -> None:
        """Set or change step.commit."""

    def finish(self, batch: Batch, canvas, confidences, policies: list) -> tuple:
        """After the last step: (canvas, confidences)."""
        return canvas, confidences


class CommitSchedule(Policy):
    """How many positions each row commits at step s: ceil(n_gen x (s + 1) / steps) in all, every position
    after the last step, each step the most confident predictions. Trailing end-of-text tokens are usually
    the most confident, so the transcript length is fixed first."""

    def plan(self, step: Step) -> None:
        n, s, steps = step.n_gen, step.index, step.steps
        target = n if s == steps - 1 else (n * (s + 1) + steps - 1) // steps  # the ceiling, in integers
        step.todo = target - (n - step.masked[:, step.P :].sum(1))

    def commit(self, step: Step) -> None:
        step.commit = step.masked & (_ranks(step.scores, descending=True) < step.todo.clamp(min=0)[:, None])


class RepeatDeferral(Policy):
    """A token equal to a neighbour's is often a parallel-decoding duplicate ("country country"): its
    confidence is lowered by `penalty` (so it is decided with more context), and of two neighbours committed
    in one step with the same token the less confident one waits for the next step."""

    def __init__(self, penalty: float):
        self.penalty = penalty

    def rescore(self, step: Step) -> None:
        canvas, pred = step.canvas, step.pred
        left = torch.nn.functional.pad(canvas[:, :-1], (1, 0), value=FILL)
        right = torch.nn.functional.pad(canvas[:, 1:], (0, 1), value=FILL)
        dup = step.masked & ((pred == left) | (pred == right))
        step.scores = torch.where(dup, step.scores * (1.0 - self.penalty), step.scores)

    def commit(self, step: Step) -> None:
        if step.index == step.steps - 1:
            return
        commit, pred, c = step.commit, step.pred, step.scores
        pair = commit[:, :-1] & commit[:, 1:] & (pred[:, :-1] == pred[:, 1:])
        drop_left = pair & (c[:, :-1] < c[:, 1:])
        drop_right = pair & ~drop_left
        commit[:, :-1] &= ~drop_left
        commit[:, 1:] &= ~drop_right


class PadContext(Policy):
    """Positions after a transcript's end: step 0 commits the predicted end (the trailing run of end-of-text
    predictions) but for its first `keep` positions (still free to become text, should the end be predicted
    too early); every step runs on the transcript and `keep` positions after its committed end."""

    def __init__(self, keep: int, pad_id: int):
        self.keep, self.pad_id = keep, pad_id

    def narrow(self, batch: Batch, step: Step) -> None:
        step.ends, row_len = _window_ends(batch, step.canvas, self.keep)
        step.n_gen = row_len - batch.P

    def commit(self, step: Step) -> None:
        if step.index != 0:
            return
        L = step.canvas.size(1)
        end = (step.pred == self.pad_id) | (step.canvas == FILL)
        tail = end.flip(1).long().cumprod(1).flip(1).bool()
        start = L - tail.sum(1)  # first position of the predicted tail, per row
        positions = torch.arange(L, device=end.device)
        step.commit |= step.masked & tail & (positions >= (start + self.keep)[:, None])


class Shortlist(Policy):
    """A window's first prediction scores the whole vocabulary (or, with int8, an int8 copy of the output
    projection on the CPU picks the shortlist); later steps and refine passes score only the union of each
    position's `top` tokens there, plus end-of-text."""

    def __init__(self, top: int, pad_id: int | None, int8: bool = False):
        self.top, self.pad_id, self.int8 = top, pad_id, int8
        self.lists: dict[int, tuple] = {}  # window -> (token ids, output rows)

    def prepare(self, batch: Batch, run, masked, windows: list[int]) -> None:
        new = [j for j, w in enumerate(windows) if w not in self.lists]
        if self.int8 and new and batch.decoder.device.type == "cpu":
            coarse = run.logits(masked, new, None, batch.decoder.coarse_project)
            for j in new:
                self.lists[windows[j]] = _shortlist(batch.decoder, coarse[j], self.top, self.pad_id)

    def vocabulary(self, w: int):
        return self.lists.get(w)

    def observe(self, batch: Batch, w: int, logits) -> None:
        if w not in self.lists:
            self.lists[w] = _shortlist(batch.decoder, logits, self.top, self.pad_id)


class Refine(Policy):
    """Mask-predict passes after the fill (Ghazvininejad et al. 2019): each re-masks the least confident
    tokens of every row, `fraction` of the transcript in the first pass and linearly fewer after, and every
    parallel-duplicate signature, then predicts them again with everything else known."""

    def __init__(self, passes: int, fraction: float, keep: int | None, no_copy: bool = False):
        self.passes, self.fraction, self.keep, self.no_copy = passes, fraction, keep, no_copy

    def share(self, r: int) -> float:
        """The share of the transcript pass r re-masks."""
        return self.fraction * (self.passes - r) / self.passes

    def finish(self, batch: Batch, canvas, confidences, policies: list) -> tuple:
        for r in range(self.passes):
            canvas, confidences = _refine_pass(batch, canvas, confidences, self.share(r), self.keep, policies,
                                               self.no_copy)
        return canvas, confidences


def confidence_policies(options: DecodingOptions, pad_id: int | None, extra=()) -> list[Policy]:
    """The policies `options` ask for, in the order they act; `extra` (upstream.Trace.policies) after the
    commit schedule."""
    policies: list[Policy] = [CommitSchedule(), *extra]
    if options.repeat_penalty > 0:
        policies.append(RepeatDeferral(options.repeat_penalty))
    if options.pad_context is not None:
        policies.append(PadContext(options.pad_context, pad_id))
    if options.shortlist:
        policies.append(Shortlist(options.shortlist, pad_id, options.shortlist_int8))
    if options.refine:
        policies.append(Refine(options.refine, options.refine_fraction, options.pad_context, options.refine_no_copy))
    return policies


# ----------------------------------------------------------------------------------------------------------
# The loop and its entry points


def _confidence_unmask(batch: Batch, canvas, options: DecodingOptions, generators, policies=None):
    """Commit the most confident predictions step by step (LLaDA low-confidence remasking) -> (canvas,
    confidences), both [W*K, L]. Candidates after the first add Gumbel noise (options.temperature) to their
    choice of token for diversity, drawn from their window's generator. canvas: [W*K, L], W windows (of their
    own lengths when batch.ragged says so; FILL past the end)."""
    policies = confidence_policies(options, batch.pad_id) if policies is None else policies
    R, L = canvas.shape
    confidences = torch.zeros(R, L, device=canvas.device)
    confidences[:, : batch.P] = 1.0
    n_gen = batch.ragged.row_lengths(batch.K, R, L, canvas.device) - batch.P
    for s in range(options.steps):
        step = Step(s, options.steps, batch.P, canvas, canvas == batch.mask_id, n_gen, L, batch.ragged)
        _each(policies, "narrow", batch, step)
        _each(policies, "plan", step)
        host = _read_step(batch, step.canvas, step.masked, step.ends, step.todo)
        if host.ends is not None:
            step.columns, step.ragged = host.columns, host.ragged
        if not host.masked:
            break
        # A window whose rows all reached this step's count (a row may lag after a dropped duplicate) commits
        # nothing: alone it would skip the step, so in a batch it is not projected and draws no noise, and
        # its random stream stays where it would be alone.
        if all(host.done):
            continue
        step.pred, step.scores = _predict(batch, step, policies, host, generators, options.temperature)
        _each(policies, "rescore", step)
        _each(policies, "commit", step)
        canvas = torch.where(step.commit, step.pred, canvas)
        confidences = torch.where(step.commit, step.scores.clamp(min=0), confidences)
    for policy in policies:
        canvas, confidences = policy.finish(batch, canvas, confidences, policies)
    return canvas, confidences


@dataclass
class _HostStep:
    """What the host needs to know of a step or refine pass (from _read_step)."""

    masked: bool  # a position is still masked
    done: list[bool]  # per window: it commits nothing this step
    counts: list[int]  # per window: its masked positions
    same: list[bool]  # per window: its K rows are equal (the trunk then runs once for them)
    ends: list[int] | None = None  # per window: the columns it runs on (with pad_context)
    columns: int = 0  # the columns the trunk runs on
    ragged: Ragged | None = None  # and their lengths


def _read_step(batch: Batch, x, masked, ends=None, todo=None) -> _HostStep:
    """The data-dependent sizes and choices of a step on canvases x with masked positions `masked`, in one
    read of the device, the loop's one host sync per step (the positions the output projection gets and the
    columns the trunk runs on are shapes). ends: each window's columns (_window_ends) or None (all of x);
    todo: the commit schedule's count per row (a window whose rows are all <= 0 is done)."""
    K, (R, L) = batch.K, x.shape
    W = R // K
    done = torch.zeros(W, dtype=torch.bool, device=x.device) if todo is None else (todo <= 0).view(W, K).all(1)
    parts = [masked.any().view(1), done, masked.view(W, K * L).sum(1)]
    columns = torch.full((), L, device=x.device) if ends is None else ends.max()
    if ends is not None:
        parts.append(ends)
    if K > 1:  # rows equal on the columns the trunk sees (as forward._hidden would compare them), masks too
        rows, masks = x.view(W, K, L), masked.view(W, K, L)
        outside = torch.arange(L, device=rows.device) >= columns
        same = ((rows == rows[:, :1]) | outside) & (masks == masks[:, :1])
        parts.append(same.flatten(1).all(1))
    values = torch.cat([p.long() for p in parts]).tolist()
    host = _HostStep(bool(values[0]), [bool(v) for v in values[1 : 1 + W]], values[1 + W : 1 + 2 * W], [False] * W,
                     columns=L, ragged=batch.ragged)
    rest = values[1 + 2 * W :]
    if ends is not None:
        host.ends, rest = rest[:W], rest[W:]
        host.columns = max(host.ends)
        equal = all(e == host.columns for e in host.ends)
        host.ragged = Ragged(None if equal else ends, batch.ragged.frames, None if equal else host.ends,
                             batch.ragged.known_frames)
    if K > 1:
        host.same = [bool(v) for v in rest]
    return host


def _gather(run, masked, counts: list[int], windows: list[int], K: int, columns: int):
    """(positions for run.gathered_logits, each window's masked positions flat over its [K, L] block in
    row-major order, all of them flat over the canvas [R*L]) of the windows `windows` (the pass's), sized by
    `counts` (_read_step): index tensors of known sizes, so no host sync. A shared pass gets one row's
    positions, which stand for the K rows; else (row, column) in the trunk's [K, columns]."""
    L = masked.size(1)
    order = masked.view(-1, K * L).to(torch.int8).sort(dim=1, descending=True, stable=True).indices
    flat = [order[w, : counts[w]] for w in windows]
    positions = {j: (f[: f.numel() // K], K) if run.shared else (f // L * columns + f % L, 1) for j, f in enumerate(flat)}
    return positions, flat, torch.cat([f + w * K * L for f, w in zip(flat, windows)])


def _predict(batch: Batch, step: Step, policies, host: _HostStep, generators, temperature: float):
    """(pred, scores) of the step: the chosen token and its probability at every masked position of the
    windows not done (the mask id and -1 elsewhere). No host sync: the masked positions are gathered by
    index, counted by _read_step."""
    K, (R, L) = batch.K, step.canvas.shape
    active = [w for w in range(len(host.done)) if not host.done[w]]
    shared = K > 1 and all(host.same[w] for w in active)  # the rows of a window equal: so are their masks
    run = batch.forward.run(step.canvas[:, : step.columns], active, step.ragged, shared)
    masked = run.select(step.masked)[:, : step.columns]
    _each(policies, "prepare", batch, run, masked, active)
    positions, flat, index = _gather(run, step.masked, host.counts, active, K, step.columns)
    logits = run.gathered_logits(positions, [_vocabulary(policies, w) for w in active])
    picks, confs = [], []
    for j, w in enumerate(active):
        short = _vocabulary(policies, w)
        _each(policies, "observe", batch, w, logits[j])
        pick, conf = _sample(logits[j], flat[j] // L, generators[w], temperature if K > 1 else 0.0)
        confs.append(conf)
        picks.append(pick if short is None else short[0][pick])
    pred = torch.full_like(step.canvas, batch.mask_id).view(-1).index_copy_(0, index, torch.cat(picks))
    scores = torch.full((R * L,), -1.0, device=step.canvas.device).index_copy_(0, index, torch.cat(confs))
    return pred.view(R, L), scores.view(R, L)


def _sample(logits, rows, generator, temperature: float):
    """(token, its probability) per row of logits [n, V] (masked positions of a window, in candidates `rows`
    [n]): the argmax, with Gumbel noise for the candidates after the first when temperature > 0, from the
    window's CPU generator (the same draws on every device; copied without a host sync)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    if temperature > 0:
        u = to_device(torch.rand(logp.shape, generator=generator), logp.device).clamp_(1e-10, 1 - 1e-10)
        gumbel = -torch.log(-torch.log(u)) * temperature
        gumbel.masked_fill_((rows == 0)[:, None], 0.0)  # candidate 0 stays greedy
        pick = (logp + gumbel).argmax(-1)
    else:
        pick = logp.argmax(-1)
    return pick, logp.gather(-1, pick[:, None]).squeeze(-1).exp()


def _refine_pass(batch: Batch, canvas, confidences, share: float, keep: int | None, policies=(),
                 no_copy: bool = False):
    """One mask-predict pass over committed canvases: re-mask the least confident `share` of each row's
    transcript (and any token equal to a neighbour or pair equal to the pair before it, the parallel-duplicate
    signatures) and predict them again with everything else known. The end-of-text boundary is included, so
    a transcript can grow or shrink by a token. keep: options.pad_context (the columns the trunk runs on).
    no_copy: a token re-masked for equalling its left neighbour is not predicted as that token again."""
    R, L = canvas.shape
    W, P = R // batch.K, batch.P
    is_pad = canvas == batch.pad_id
    real = canvas != FILL
    # Transcript length per row: positions before the first end-of-text (all generated ones if none).
    n_gen = real[:, P:].sum(1)
    first_pad = torch.where(is_pad[:, P:].any(1), is_pad[:, P:].float().argmax(1), n_gen)
    n_row = (first_pad.float() * share).ceil().long().clamp(min=1)
    c = confidences.masked_fill(~real, float("inf"))
    c[:, :P] = float("inf")
    m = (_ranks(c) < n_row[:, None]) | _duplicates(canvas, is_pad, P)
    if keep is None:
        ends, row_len = None, batch.ragged.row_lengths(batch.K, R, L, canvas.device)
    else:
        ends, row_len = _window_ends(batch, canvas, keep)
    m &= torch.arange(L, device=m.device) < row_len[:, None]  # nothing past the positions the trunk sees
    x = torch.where(m, torch.full_like(canvas, batch.mask_id), canvas)
    host = _read_step(batch, x, m, ends)  # one host sync per pass
    windows = list(range(W))
    run = batch.forward.run(x[:, : host.columns], windows, host.ragged, batch.K > 1 and all(host.same))
    positions, _, index = _gather(run, m, host.counts, windows, batch.K, host.columns)
    logits = run.gathered_logits(positions, [_vocabulary(policies, w) for w in windows])
    if no_copy:  # each window's re-masked positions (flat over the canvas), their left tokens, which are copies
        flat, copies = canvas.flatten(), _copies(canvas, is_pad, P).flatten()
        for w, at in zip(windows, index.split([host.counts[w] for w in windows])):
            logits[w] = _ban_copies(logits[w], flat[at - 1], copies[at], _vocabulary(policies, w))
    confs, picks = [], []
    for w in windows:
        short = _vocabulary(policies, w)
        conf, pick = torch.softmax(logits[w].float(), dim=-1).max(-1)
        confs.append(conf)
        picks.append(pick if short is None else short[0][pick])
    canvas = canvas.flatten().index_copy(0, index, torch.cat(picks)).view(R, L)
    return canvas, confidences.flatten().index_copy(0, index, torch.cat(confs)).view(R, L)


def _decode_batch(decoder, forward, W: int, L: int, prefix, options: DecodingOptions, generators, pad_id,
                  ragged: Ragged | None = None, trace: Trace | None = None):
    """W windows x K candidates on canvases of length L -> (canvas, confidences), both [W*K, L].

    forward: the decoder over the batch (forward.SharedForward, or upstream.ReferenceForward for the parity
    tests). generators: one per window, each drawing that window's uniforms per step exactly as a lone window
    would. ragged: the windows' own canvas lengths L_w <= L and frame counts; positions past L_w hold FILL.
    """
    K, P = options.candidates, len(prefix)
    ragged = ragged or Ragged()
    device = decoder.device
    valid = torch.arange(L, device=device) < ragged.row_lengths(K, W * K, L, device)[:, None]
    canvas = torch.full((W * K, L), decoder.config.mask_token_id, dtype=torch.long, device=device)
    canvas = canvas.masked_fill(~valid, FILL)
    canvas[:, :P] = torch.tensor(prefix, dtype=torch.long, device=device)
    if options.strategy == "confidence":
        policies = confidence_policies(options, pad_id, trace.policies if trace is not None else ())
        return _confidence_unmask(Batch(decoder, forward, K, P, pad_id, ragged), canvas, options, generators, policies)
    ratios = [options.ratio(s) for s in range(options.steps)]
    return remask(forward, canvas, valid, P, ratios, generators, decoder.config.mask_token_id, trace)


@torch.no_grad()
def parallel_diffusion_decode(decoder, condition: torch.Tensor, options: DecodingOptions = DecodingOptions(),
                              prefix_ids=UPSTREAM_PREFIX, pad_id: int = UPSTREAM_PAD, duration: float | None = None,
                              *, to_words=None) -> DecodingResult:
    """Decode one audio window: condition, its encoder states [F, d] or [1, F, d]; duration, its length in
    seconds (what sizes the canvas when options.seq_len is None; None: options.max_seq_len). Seeded with
    options.seed. decode_windows for one window."""
    return decode_windows(decoder, [condition], options, prefix_ids, pad_id, [duration], to_words)[0]


@torch.no_grad()
def decode_traced(decoder, condition: torch.Tensor, options: DecodingOptions, trace: Trace,
                  prefix_ids=UPSTREAM_PREFIX, pad_id: int = UPSTREAM_PAD, duration: float | None = None,
                  *, to_words=None) -> DecodingResult:
    """parallel_diffusion_decode with the hooks of the reference/test path (upstream.Trace): fixed masks,
    the step inputs recorded, upstream's own forward, extra policies. For the parity tests and scripts."""
    prefix = list(prefix_ids)
    cond = (condition if condition.dim() == 3 else condition.unsqueeze(0)).to(decoder.device)
    K = options.candidates
    if trace.reference and (options.shortlist or options.pad_context is not None):
        raise ValueError("shortlist and pad_context need the shared forward, not the reference one "
                         "(Trace(reference=True) scores every position onto the whole vocabulary)")
    if trace.reference:
        forward = ReferenceForward(decoder, cond.expand(K, *cond.shape[1:]), K)
    else:
        forward = SharedForward(decoder, decoder.precompute_cross_kv(cond), K)
    canvas, confidences = _decode_batch(decoder, forward, 1, options.canvas_length(duration, len(prefix)), prefix,
                                        options, [_generator(options.seed)], pad_id, trace=trace)
    return _result(canvas, confidences, prefix, pad_id, options, to_words)


def _result(canvas, confidences, prefix, pad_id, options: DecodingOptions, to_words) -> DecodingResult:
    """One window's candidates [K, L] -> scores, the selected candidate and its text."""
    K, L = canvas.shape
    valid = canvas != pad_id
    scores = (confidences * valid).sum(1) / valid.sum(1).clamp(min=1)
    result = DecodingResult(
        tokens=canvas.cpu(), confidences=confidences.float().cpu(), scores=scores.float().cpu(), selected=0,
        n_canvas_tokens=K * L * options.steps,
    )
    sequences = [text_tokens(row, len(prefix), pad_id) for row in result.tokens.tolist()]
    _select(result, sequences, options.selection, prefix, to_words)
    return result


@torch.no_grad()
def decode_windows(decoder, conditions, options: DecodingOptions, prefix_ids, pad_id, durations=None, to_words=None,
                   *, seeds=None, max_batch_windows: int = DEFAULT_MAX_BATCH_WINDOWS,
                   alignment_heads=None, revise=None) -> list[DecodingResult]:
    """Decode many windows; results in input order.

    Windows go through one forward per step together, at most `max_batch_windows` at a time (memory: the
    hidden states of max_batch_windows x K canvases), of any lengths (sorted by length, so little is padded;
    masks keep the padding out). Each window draws from its own generator, seeded with seeds[i] (default
    options.seed + i; a fresh random seed when that is None), so it decodes to the same tokens alone or in any
    batch (up to the float rounding of different matrix shapes; max_batch_windows=1 decodes each alone). A
    batch the device has no memory for is decoded in halves. alignment_heads: (layer, head) pairs; each
    result then carries their cross-attention over its chosen text (`alignment`), from one more forward per
    batch on the final canvases. revise(results, indices): may replace each result's text before its
    alignment is read (verification, verify.py); indices are the windows' places in `conditions`.
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
    order = sorted(range(n), key=lambda i: (-lengths[i], -states[i].size(0), i))  # similar lengths together
    device = decoder.device

    def decode_batch(idx: list[int]) -> list[DecodingResult]:
        L = max(lengths[i] for i in idx)
        frames = [states[i].size(0) for i in idx]
        F_max = max(frames)
        cond = torch.stack([torch.nn.functional.pad(states[i], (0, 0, 0, F_max - states[i].size(0))) for i in idx])
        kv = decoder.precompute_cross_kv(cond.to(device, non_blocking=True))
        ragged = Ragged.of([lengths[i] for i in idx] if any(lengths[i] != L for i in idx) else None,
                           frames if any(f != F_max for f in frames) else None, device)
        canvas, confidences = _decode_batch(decoder, SharedForward(decoder, kv, K, ragged), len(idx), L, prefix,
                                            options, [_generator(seeds[i]) for i in idx], pad_id, ragged)
        batch = [_result(canvas[w * K : (w + 1) * K, : lengths[i]], confidences[w * K : (w + 1) * K, : lengths[i]],
                         prefix, pad_id, options, to_words) for w, i in enumerate(idx)]
        if revise is not None:
            revise(batch, idx)
        if alignment_heads:
            _align(decoder, batch, kv, frames, prefix, pad_id, alignment_heads)
        return batch

    results: list[DecodingResult | None] = [None] * n
    for start in range(0, n, max_batch_windows):
        idx = order[start : start + max_batch_windows]
        # A batch the device has no memory for is decoded in halves: each window draws from its own
        # generator, so it decodes to the same tokens in any batch (up to float rounding), and nothing is lost.
        for i, r in zip(idx, in_halves_on_oom(decode_batch, idx, "window")):
            results[i] = r
    return results  # type: ignore[return-value]


def _align(decoder, results: list[DecodingResult], kv, frames: list[int], prefix, pad_id, heads) -> None:
    """Cross-attention of the alignment heads over each window's final canvas: the prefix, the chosen text,
    the end of text and the padding after it (what the decoder saw last), one forward for the batch."""
    P = len(prefix)
    canvases = [prefix + r.text_tokens + [pad_id] * (r.seq_len - P - len(r.text_tokens)) for r in results]
    canvases = [c if len(c) > P + len(r.text_tokens) else c + [pad_id] for c, r in zip(canvases, results)]
    L = max(len(c) for c in canvases)
    idx = torch.tensor([c + [FILL_INPUT] * (L - len(c)) for c in canvases], device=decoder.device)
    lengths = torch.tensor([len(c) for c in canvases], device=decoder.device)
    F_max = kv[0][0].size(2)
    frame_counts = torch.tensor(frames, device=decoder.device) if any(f != F_max for f in frames) else None
    weights = decoder.alignment_weights(idx, heads, cross_kv=kv, lengths=lengths, frames=frame_counts).cpu()
    for w, r in enumerate(results):
        r.alignment = weights[w, :, : P + len(r.text_tokens) + 1, : frames[w]]



# ----------------------------------------------------------------------------------------------------------
# Candidate selection


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


def _select(result: DecodingResult, sequences, selection, prefix, to_words):
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
    if selection == "rover" and len(sequences) > 1:
        result.token_confidences = [result.score] * len(result.text_tokens)
    else:
        P = len(prefix)
        result.token_confidences = result.confidences[result.selected, P : P + len(result.text_tokens)].tolist()


def _group_confidences(words, token_confidences) -> list[float]:
    """Mean token confidence per word (words are tuples of token ids covering the sequence in order)."""
    out, j = [], 0
    for word in words:
        n = len(word)
        chunk = token_confidences[j : j + n] or [0.0]
        out.append(sum(chunk) / len(chunk))
        j += n
    return out


# ----------------------------------------------------------------------------------------------------------
# Helpers


def _each(policies, hook: str, *args) -> None:
    for policy in policies:
        getattr(policy, hook)(*args)


def _vocabulary(policies, w: int):
    """Window w's shortlist (token ids, output rows) from the first policy that holds one, else None."""
    return next((v for v in (p.vocabulary(w) for p in policies) if v is not None), None)


def _generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()  # CPU: the same draws on every device
    if seed is None:
        g.seed()  # a fresh random seed, without touching torch's global generator
    else:
        g.manual_seed(seed)
    return g


def _ranks(values, descending=False):
    """Rank of every entry of values [R, L] within its row (0: the first in sort order; ties by position)."""
    R, L = values.shape
    ranks = torch.empty(R, L, dtype=torch.long, device=values.device)
    order = values.argsort(dim=1, descending=descending, stable=True)
    return ranks.scatter_(1, order, torch.arange(L, device=values.device).expand(R, L))


def _copies(canvas, is_pad, P: int):
    """bool [R, L]: every token equal to its left neighbour (never end-of-text, never the prefix)."""
    left = torch.nn.functional.pad(canvas[:, :-1], (1, 0), value=FILL)
    copy = (canvas == left) & ~is_pad
    copy[:, :P] = False
    return copy


def _ban_copies(logits, left, is_copy, short):
    """logits [n, V'] of re-masked positions with -inf at each copy's left-neighbour token (left, is_copy:
    [n]); short: the window's shortlist (ids, rows) or None (the whole vocabulary)."""
    ids = torch.arange(logits.size(-1), device=logits.device) if short is None else short[0]
    ban = (ids[None, :] == left[:, None]) & is_copy[:, None]
    return logits.masked_fill(ban, float("-inf"))


def _duplicates(canvas, is_pad, P: int):
    """bool [R, L]: every token equal to its left neighbour, and both tokens of a pair equal to the pair
    before it ("can do can do", the two-token form of the same parallel duplicate); never end-of-text."""
    left = torch.nn.functional.pad(canvas[:, :-1], (1, 0), value=FILL)
    left2 = torch.nn.functional.pad(canvas[:, :-2], (2, 0), value=FILL)
    left3 = torch.nn.functional.pad(canvas[:, :-3], (3, 0), value=FILL)
    pair_end = (canvas == left2) & (left == left3) & ~is_pad
    pairs = pair_end | torch.nn.functional.pad(pair_end[:, 1:], (0, 1), value=False)
    pairs[:, :P] = False
    return _copies(canvas, is_pad, P) | pairs


def _window_ends(batch: Batch, canvas, keep: int):
    """(columns of each window [W], of each row [R]) the trunk runs on with keep (options.pad_context): each
    window's canvas ends `keep` positions after the start of its rows' trailing run of committed end-of-text
    (every masked position lies before it)."""
    R, L = canvas.shape
    W, K = R // batch.K, batch.K
    row_len = batch.ragged.row_lengths(K, R, L, canvas.device)
    tail = (canvas == batch.pad_id) | (canvas == FILL)
    end = L - tail.flip(1).long().cumprod(1).sum(1)  # first position of the trailing run, per row
    window = torch.minimum(row_len, end + keep).view(W, K).max(1).values
    return window, window.repeat_interleave(K)


def _shortlist(decoder, logits, top: int, pad_id):
    """(token ids, their output rows): the union of each row's `top` best tokens in logits [n, V], plus
    end-of-text (so a transcript can still end anywhere)."""
    ids = logits.topk(min(top, logits.size(-1)), dim=-1).indices.flatten()
    if pad_id is not None:
        ids = torch.cat([ids, torch.tensor([pad_id], device=ids.device)])
    ids = torch.unique(ids)
    return ids, decoder.output_rows(ids)
