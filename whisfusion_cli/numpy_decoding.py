"""decoding.py's confidence strategy in numpy, on numpy_model.NumpyDecoder: the torch-free CPU engine's
decoding loop.

It is decoding.decode_windows with one candidate per window (the default of every released model on the
CPU): windows of any lengths share one forward per step (masks keep the padding out), and each step applies
the same rules in the same order: the commit schedule, repeat deferral, pad context, the vocabulary
shortlist and mask-predict refinement (see the policies in decoding.py for why each exists). The same
tokens as the torch engine (tests/test_numpy_engine.py decodes the same windows with both). What it does
not run, the torch engine does: several candidates, the upstream remask strategy, the int8 shortlist.

Arrays: W windows, canvases [W, L] (FILL past a window's own length), encoder states padded to [W, F, d].
"""

from __future__ import annotations

import numpy as np

from .decoding_options import DEFAULT_MAX_BATCH_WINDOWS, FILL, FILL_INPUT, DecodingOptions, DecodingResult, text_tokens
from .numpy_model import NumpyDecoder, log_softmax, softmax

TOP_BLOCK = 256  # logits per block in top_ids


def unsupported(options: DecodingOptions) -> str | None:
    """Why this loop cannot run `options` (the torch engine can), or None."""
    if options.strategy != "confidence":
        return f"the {options.strategy!r} strategy"
    if options.candidates != 1:
        return f"{options.candidates} candidates"
    if options.shortlist_int8:
        return "the int8 shortlist"
    return None


def decode_windows(decoder: NumpyDecoder, conditions: list[np.ndarray], options: DecodingOptions, prefix_ids,
                   pad_id: int, durations: list[float | None], alignment_heads=None,
                   max_batch_windows: int = DEFAULT_MAX_BATCH_WINDOWS, revise=None) -> list[DecodingResult]:
    """Windows' encoder states [F_i, d] -> their DecodingResults (one candidate each), in input order, as
    decoding.decode_windows gives: at most max_batch_windows windows per forward, sorted by length.
    revise(results, indices): may replace each result's text before its alignment is read (verification); indices
    are the windows' places in `conditions`."""
    reason = unsupported(options)
    if reason is not None:
        raise ValueError(f"the numpy engine does not run {reason}; use --engine torch")
    prefix = list(prefix_ids)
    lengths = [options.canvas_length(d, len(prefix)) for d in durations]
    n = len(conditions)
    order = sorted(range(n), key=lambda i: (-lengths[i], -len(conditions[i]), i))  # similar lengths together
    results: list[DecodingResult | None] = [None] * n
    for start in range(0, n, max_batch_windows):
        idx = order[start : start + max_batch_windows]
        batch = _Batch(decoder, [conditions[i] for i in idx], [lengths[i] for i in idx], prefix, pad_id)
        _unmask(batch, options)
        for r in range(options.refine):
            _refine_pass(batch, options.refine_fraction * (options.refine - r) / options.refine, options.pad_context,
                         options.refine_no_copy)
        out = [batch.result(w, options) for w in range(len(idx))]
        if revise is not None:
            revise(out, idx)
        if alignment_heads:
            _align(batch, out, alignment_heads)
        for i, result in zip(idx, out):
            results[i] = result
    return results  # type: ignore[return-value]


class _Batch:
    """W windows being decoded together: canvases, confidences, cross-attention keys/values, shortlists."""

    def __init__(self, decoder: NumpyDecoder, states: list[np.ndarray], lengths: list[int], prefix: list[int],
                 pad_id: int):
        self.decoder, self.P, self.pad_id, self.mask_id = decoder, len(prefix), pad_id, decoder.mask_token_id
        W, L, F = len(states), max(lengths), max(len(s) for s in states)
        padded = np.zeros((W, F, states[0].shape[1]), dtype=np.float32)
        for row, s in zip(padded, states):
            row[: len(s)] = s
        self.kv = decoder.cross_kv(padded)
        self.frames = np.array([len(s) for s in states])
        self.lengths = np.array(lengths)
        self.canvas = np.where(np.arange(L) < self.lengths[:, None], self.mask_id, FILL).astype(np.int64)
        self.canvas[:, : self.P] = prefix
        self.confidences = np.zeros((W, L), dtype=np.float32)
        self.confidences[:, : self.P] = 1.0
        self.shortlists: list[tuple[np.ndarray, np.ndarray] | None] = [None] * W  # (token ids, output rows)

    def predict(self, x: np.ndarray, masked: np.ndarray, windows: np.ndarray, ends: np.ndarray, top: int):
        """(rows, columns, logits per window, token ids per window or None) at the masked positions of the
        windows `windows` of canvases x (the trunk on each window's first `ends` columns). A window without a
        shortlist is scored on the whole vocabulary (all such windows in one product) and, with `top` > 0,
        gets its shortlist from those logits (Shortlist)."""
        columns = int(ends[windows].max())
        every = len(windows) == len(self.canvas)  # the usual case: no copy of the keys and values
        kv = self.kv if every else [(k[windows], v[windows]) for k, v in self.kv]
        x = x[:, :columns] if every else x[windows, :columns]
        hidden = self.decoder.hidden_states(np.where(x == FILL, FILL_INPUT, x), kv, ends[windows], self.frames[windows])
        rows, cols = np.nonzero(masked[windows, :columns])
        logits, vocabularies = [None] * len(windows), [None] * len(windows)
        full = [j for j, w in enumerate(windows) if self.shortlists[w] is None]
        if full:
            take = np.isin(rows, full)
            projected = self.decoder.project(hidden[rows[take], cols[take]])
            bounds = np.searchsorted(rows[take], full + [len(windows)])
            for j, a, b in zip(full, bounds[:-1], bounds[1:]):
                logits[j] = projected[a:b]
        for j, w in enumerate(windows):
            sel = rows == j
            if self.shortlists[w] is not None:
                logits[j] = hidden[j, cols[sel]] @ self.shortlists[w][1].T
                vocabularies[j] = self.shortlists[w][0]
            elif top:
                ids = np.unique(np.append(top_ids(logits[j], top), self.pad_id))
                self.shortlists[w] = (ids, self.decoder.output_rows(ids))
        return windows[rows], cols, logits, vocabularies

    def result(self, w: int, options: DecodingOptions) -> DecodingResult:
        """Window w's result (decoding._result for one candidate)."""
        L, P = int(self.lengths[w]), self.P
        canvas, confidences = self.canvas[w, :L], self.confidences[w, :L]
        valid = canvas != self.pad_id
        score = np.float32(confidences[valid].sum(dtype=np.float32) / max(int(valid.sum()), 1))
        text = text_tokens(canvas.tolist(), P, self.pad_id)
        return DecodingResult(tokens=canvas[None].copy(), confidences=confidences[None].copy(), scores=np.array([score]),
                              selected=0, text_tokens=text, score=float(score), n_canvas_tokens=L * options.steps,
                              token_confidences=confidences[P : P + len(text)].tolist())


def _unmask(batch: _Batch, options: DecodingOptions) -> None:
    """decoding._confidence_unmask with one candidate: commit the most confident predictions step by step."""
    P, steps, keep = batch.P, options.steps, options.pad_context
    W, L = batch.canvas.shape
    positions = np.arange(L)
    for s in range(steps):
        canvas = batch.canvas
        masked = canvas == batch.mask_id
        ends = batch.lengths if keep is None else _window_ends(canvas, batch.lengths, batch.pad_id, keep)
        n_gen = ends - P  # PadContext.narrow
        target = n_gen if s == steps - 1 else (n_gen * (s + 1) + steps - 1) // steps  # CommitSchedule.plan
        todo = target - (n_gen - masked[:, P:].sum(1))
        if not masked.any():
            break
        active = np.flatnonzero(todo > 0)  # a window whose row reached this step's count commits nothing
        if not len(active):
            continue
        rows, cols, logits, vocabularies = batch.predict(canvas, masked, active, ends, options.shortlist)
        pred = np.full((W, L), batch.mask_id, dtype=np.int64)
        scores = np.full((W, L), -1.0, dtype=np.float32)
        for j, w in enumerate(active):
            logp = log_softmax(logits[j])
            picks = logp.argmax(-1)
            at = rows == w
            pred[w, cols[at]] = picks if vocabularies[j] is None else vocabularies[j][picks]
            scores[w, cols[at]] = np.exp(np.take_along_axis(logp, picks[:, None], 1)[:, 0])
        if options.repeat_penalty > 0:  # RepeatDeferral.rescore
            dup = masked & ((pred == _shift(canvas, 1, FILL)) | (pred == _shift(canvas, -1, FILL)))
            scores = np.where(dup, scores * np.float32(1.0 - options.repeat_penalty), scores)
        commit = masked & (_ranks(scores, descending=True) < np.maximum(todo, 0)[:, None])  # CommitSchedule.commit
        if options.repeat_penalty > 0 and s != steps - 1:  # RepeatDeferral.commit
            pair = commit[:, :-1] & commit[:, 1:] & (pred[:, :-1] == pred[:, 1:])
            drop_left = pair & (scores[:, :-1] < scores[:, 1:])
            drop_right = pair & ~drop_left
            commit[:, :-1] &= ~drop_left
            commit[:, 1:] &= ~drop_right
        if keep is not None and s == 0:  # PadContext.commit
            start = L - _trailing_run((pred == batch.pad_id) | (canvas == FILL))
            commit |= masked & (positions >= (start + keep)[:, None])
        batch.canvas = np.where(commit, pred, canvas)
        batch.confidences = np.where(commit, np.maximum(scores, 0), batch.confidences).astype(np.float32)


def _refine_pass(batch: _Batch, share: float, keep: int | None, no_copy: bool = False) -> None:
    """decoding._refine_pass with one candidate: re-mask the least confident `share` of each transcript and
    every parallel-duplicate signature, and predict them again with everything else known (no_copy: a token
    equal to its left neighbour is not predicted as that token again)."""
    canvas, P = batch.canvas, batch.P
    W, L = canvas.shape
    is_pad, real = canvas == batch.pad_id, canvas != FILL
    first_pad = np.where(is_pad[:, P:].any(1), is_pad[:, P:].argmax(1), real[:, P:].sum(1))
    # float32, as torch computes it: ceil(0.3 * 10) is 4 there, not 3
    n_row = np.maximum(1, np.ceil(first_pad.astype(np.float32) * np.float32(share)).astype(np.int64))
    c = np.where(real, batch.confidences, np.inf)
    c[:, :P] = np.inf
    m = (_ranks(c) < n_row[:, None]) | _duplicates(canvas, is_pad, P)
    ends = batch.lengths if keep is None else _window_ends(canvas, batch.lengths, batch.pad_id, keep)
    m &= np.arange(L) < ends[:, None]
    if not m.any():
        return
    x = np.where(m, batch.mask_id, canvas)
    rows, cols, logits, vocabularies = batch.predict(x, m, np.arange(W), ends, 0)
    canvas, confidences = canvas.copy(), batch.confidences.copy()
    copies = _copies(canvas, is_pad, P) if no_copy else None
    for w in range(W):
        at = rows == w
        if no_copy:  # decoding._ban_copies: -inf at each re-masked copy's left token
            ids = np.arange(logits[w].shape[-1]) if vocabularies[w] is None else vocabularies[w]
            col = cols[at]
            ban = (ids[None, :] == canvas[w, col - 1][:, None]) & copies[w, col][:, None]
            logits[w] = np.where(ban, -np.inf, logits[w])
        probs = softmax(logits[w])
        picks = probs.argmax(-1)
        canvas[w, cols[at]] = picks if vocabularies[w] is None else vocabularies[w][picks]
        confidences[w, cols[at]] = np.take_along_axis(probs, picks[:, None], 1)[:, 0]
    batch.canvas, batch.confidences = canvas, confidences


def _align(batch: _Batch, results: list[DecodingResult], chosen) -> None:
    """decoding._align: the alignment heads' cross-attention over each window's final canvas (prefix, chosen
    text, end of text and the padding after it), [heads, P + len(text) + 1, frames], one forward."""
    P = batch.P
    canvases = [list(batch.canvas[w, :P]) + r.text_tokens + [batch.pad_id] * max(1, r.seq_len - P - len(r.text_tokens))
                for w, r in enumerate(results)]
    T = max(len(c) for c in canvases)
    idx = np.array([c + [FILL_INPUT] * (T - len(c)) for c in canvases], dtype=np.int64)
    weights = batch.decoder.alignment_weights(idx, chosen, batch.kv, np.array([len(c) for c in canvases]), batch.frames)
    for w, r in enumerate(results):
        r.alignment = weights[w, :, : P + len(r.text_tokens) + 1, : batch.frames[w]]


# ----------------------------------------------------------------------------------------------------------
# Helpers (decoding.py's, row by row)


def top_ids(logits: np.ndarray, top: int) -> np.ndarray:
    """The ids of each row's `top` largest logits [n, V], row after row (torch.topk's set; ties aside).

    np.argpartition over 50k logits per row is slow on real logits (0.38 s for 67 rows, measured), so the
    rows are cut into blocks first: the `top`-th largest block maximum is at most the `top`-th largest
    logit, so only the few logits at or above it can be among the top; they are sorted."""
    n, V = logits.shape
    blocks = -(-V // TOP_BLOCK)
    if top >= blocks:
        return np.argsort(-logits, axis=1, kind="stable")[:, :top].ravel()
    padded = np.full((n, blocks * TOP_BLOCK), -np.inf, dtype=logits.dtype)
    padded[:, :V] = logits
    block_max = padded.reshape(n, blocks, TOP_BLOCK).max(-1)
    threshold = np.partition(block_max, blocks - top, axis=1)[:, blocks - top]
    rows, cols = np.nonzero(logits >= threshold[:, None])
    order = np.lexsort((-logits[rows, cols], rows))  # by row, then by logit, largest first
    rows, cols = rows[order], cols[order]
    rank = np.arange(len(rows)) - np.searchsorted(rows, rows)  # position within its row
    return cols[rank < top]


def _shift(x: np.ndarray, by: int, fill) -> np.ndarray:
    """x [R, L] moved `by` places right along its rows (left when negative), `fill` where nothing moved in."""
    out = np.full_like(x, fill)
    if by > 0:
        out[:, by:] = x[:, :-by]
    else:
        out[:, :by] = x[:, -by:]
    return out


def _ranks(values: np.ndarray, descending: bool = False) -> np.ndarray:
    """Rank of every entry of values [R, L] within its row (0: the first in sort order; ties by position)."""
    order = np.argsort(-values if descending else values, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(values.shape[1])[None, :].repeat(len(values), 0), axis=1)
    return ranks


def _trailing_run(flags: np.ndarray) -> np.ndarray:
    """Length of the run of True at the end of each row of flags [R, L]."""
    return np.cumprod(flags[:, ::-1], axis=1).sum(1)


def _window_ends(canvas: np.ndarray, lengths: np.ndarray, pad_id: int, keep: int) -> np.ndarray:
    """The columns each window's trunk runs on with pad_context `keep` (decoding._window_ends): `keep` after
    the start of its trailing run of committed end-of-text, within its own length."""
    L = canvas.shape[1]
    return np.minimum(lengths, L - _trailing_run((canvas == pad_id) | (canvas == FILL)) + keep)


def _copies(canvas: np.ndarray, is_pad: np.ndarray, P: int) -> np.ndarray:
    """Every token equal to its left neighbour (never end-of-text, never the prefix)."""
    copy = (canvas == _shift(canvas, 1, FILL)) & ~is_pad
    copy[:, :P] = False
    return copy


def _duplicates(canvas: np.ndarray, is_pad: np.ndarray, P: int) -> np.ndarray:
    """Every token equal to its left neighbour, and both tokens of a pair equal to the pair before it."""
    pair_end = (canvas == _shift(canvas, 2, FILL)) & (_shift(canvas, 1, FILL) == _shift(canvas, 3, FILL)) & ~is_pad
    pairs = pair_end | _shift(pair_end, -1, False)
    pairs[:, :P] = False
    return _copies(canvas, is_pad, P) | pairs
