"""Verification of each window's diffusion draft by the Whisper decoder the model's encoder comes from.

The default model's decoder is Whisper tiny.en's made bidirectional and trained to fill masks; the original,
causal tiny.en decoder (installed with the encoder) still knows what English says next, but on the
audio-length encoder states the model runs on it cannot find the end of a window (it starts the window
over: EXPERIMENTS.md, "Whisper tiny.en's own decoder as a verifier"). Together each covers the other's
weakness, as in speculative decoding: the causal decoder reads the draft left to right, one forward of the
draft's next tokens (at most MAX_PROPOSAL) per round; the draft is accepted up to the first token where the causal decoder's
own greedy choice differs; that choice is taken, the draft realigned after it (a draft token dropped, added or
replaced), and the next round goes on from there. The draft says where the text ends: verification stops
where the draft is used up (having finished a word the draft was cut off inside). Where the causal decoder rewrote more than VERIFY_MAX_CHANGED of the draft it was
not checking but making text up (it does on isolated words, in noise), and the draft stands, unless what it
said is one stretch said over ("Rocket Rocket Rocket" for the draft's "Rock it."): then it read the window's
words and started over where it could not find the end, and the stretch is the text (`said_over`).

A short window (a word or two: DecodingOptions.verify_short) is also `read`: on the states of the window
padded with silence (as Whisper's own input is, to 30 s), the causal decoder knows where speech ends, and its
greedy text there (the draft only proposing tokens) replaces the checked draft where it is much the likelier of
the two on those states (`reread`): where the verifier is unsure of an isolated word the draft heard it better.

Runs on numpy (numpy_model.NumpyDecoder with a SelfAttentionCache), whatever engine decoded the draft.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import numpy as np

from .audio import CHUNK_LENGTH
from .numpy_model import NumpyDecoder, SelfAttentionCache, log_softmax

DECODER_PREFIX = "model.decoder."
# More of the draft than this rewritten (token edit share) and the draft is kept: chosen on the three tune
# sets, clips decoded whole (EXPERIMENTS.md, "Verification by tiny.en's own decoder"): 0.3 / 0.4 / 0.5 gave
# mean WER 27.5 / 26.4 / 26.7.
VERIFY_MAX_CHANGED = 0.4
# After a disagreement, the draft positions (behind, ahead of the one disagreed with) where the verifier's
# token is looked for, to realign the rest of the draft: a repeated or dropped word shifts it by one. Found
# nowhere there, it is looked for back to the last draft token the verifier said (a lacked word: _realigned).
REALIGN_BEHIND, REALIGN_AHEAD = 1, 3
# The verifier's way of failing on these states: it starts the window over. Its last RESTART_TOKENS tokens
# equal to its first ones end the text there (the copy dropped).
RESTART_TOKENS = 3
# A stretch the verifier said over stands for the window's text only where it holds at least this share of the
# draft's word tokens: a start over, not a word the verifier got stuck on in a longer window.
SAID_OVER_MIN_SHARE = 0.5
# Number words the verifier writes as digits ("Seven or nine" -> "7 or 9", "five zero zero" -> "500"): in the share
# of the draft it rewrote (VERIFY_MAX_CHANGED), a run of number words and the number's digits count as one and
# the same token, since writing a number as digits is no text made up (Asterisk train split's sentences, tune
# sets the same: EXPERIMENTS.md).
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
# Text at most this much longer than the draft (share of its tokens, at least LENGTH_SLACK_MIN tokens).
LENGTH_SLACK, LENGTH_SLACK_MIN = 0.25, 2
# Where the draft ends in punctuation and the verifier says a word instead, the word is taken only at this
# probability or more: a word the draft lost ("for your. -> country", 0.99) rather than the verifier talking
# on past the window ("Americans. -> and", 0.32; both the README's JFK clip).
CLOSING_WORD_PROBABILITY = 0.5
# Where the draft is used up because its last positions were read as words the verifier replaced (rather than
# matched), the verifier's further words are taken at this probability or more: the draft lacked a word or two
# ("... children are" + "exempt") rather than the window's text ending (tune sets: EXPERIMENTS.md).
EXTENSION_PROBABILITY = 0.5
# Positions projected onto the vocabulary at once while checking a round. The 50k x 384 projection is most of
# the verifier's time and is memory-bound: 4 rows cost what 8 do (the table is read either way), so a round's
# first block is as large as the rest (a first block of 4 made the verifier 5-10% slower on the tune sets).
LOGIT_ROWS = 8
# Draft tokens checked per round at most: a round's forward costs its tokens, and where the draft is poor
# most of a long proposal is thrown away at the first disagreement.
MAX_PROPOSAL = 12
# `read` (a short window on padded states): its text stops here at the latest, past any word a window of a
# few seconds holds (Whisper's decoder can loop on a word it is unsure of).
READ_MAX_TOKENS = 32
# `reread`: the verifier's read of a short window replaces the checked draft only where, on the padded states,
# it is at least this many nats (total log probability, end of text included) likelier than the checked draft.
# Chosen on the tune sets (EXPERIMENTS.md, "Short windows: the read where it is much the likelier"), padded to
# 10 s: 1.5-3 / 3.5-4.5 / 5 / 6 gave mean WER 17.9 / 17.5 / 18.1 / 19.2, the checked draft alone 21.9, the read
# alone 18.7 (padded to 30 s, 3.5 was best as well).
READ_MARGIN = 3.5
# `read`'s window is padded with silence to at least READ_CONTEXT_S and READ_SILENCE_S past its end (at most
# 30 s, Whisper's own input): the verifier needs silence after the speech to find its end, not 30 s of it, and
# the encoder's cost grows with the square of its frames. Tune sets, windows <= 2 s (EXPERIMENTS.md): padded to
# 5 / 10 / 30 s, mean WER 18.6 / 17.5 / 18.4, the encoder 38 / 74 / 364 ms a window.
READ_CONTEXT_S, READ_SILENCE_S = 10.0, 8.0


@dataclass
class Verified:
    """A window's text after verification: the verifier's where it checked the draft, else the draft's."""

    tokens: list[int]
    confidences: list[float]  # the verifier's probability of each token (the draft's where the draft stands)
    rounds: int  # forwards of the verifier (a greedy decoder would need len(tokens) + 1)
    changed: float  # share of the draft the verifier rewrote
    kept_draft: bool


class Verifier:
    """Whisper's own causal decoder over the text tokens and end-of-text, checking drafts (`verify`)."""

    def __init__(self, decoder: NumpyDecoder, prefix_ids: list[int], eos_id: int, is_word=None, starts_word=None,
                 spoken=None, suppress: tuple[list[int], list[int]] = ((), ())):
        """is_word(token id): whether a token holds a letter or a digit (None: all do). The draft's closing
        punctuation is kept: where the window ends the verifier would go on talking ("Americans. and").
        starts_word(token id): whether a token begins a word (None: all do). spoken(token ids): their words,
        lower case, without punctuation (None: the ids themselves), so that a stretch said over that says the
        draft's words leaves the draft's case ("I." rather than "i."), and that "seven" and "7" are one number to
        the gate (NUMBER_WORDS). suppress: (tokens never said, tokens not
        said first), as Whisper's own decoding suppresses them (its config's suppress_ids and suppress_ids_begin:
        symbols, "[", end of text before any word), for `read`, where the verifier writes the text itself."""
        self.decoder, self.prefix, self.eos_id = decoder, list(prefix_ids), eos_id
        self.suppress, self.suppress_first = (np.array([i for i in ids if 0 <= i < decoder.n_logits], np.int64)
                                              for ids in suppress)  # special tokens past the text are never logits
        self.is_word = is_word or (lambda token: True)
        self.starts_word = starts_word or (lambda token: True)
        self.spoken, self.has_spoken = spoken or (lambda ids: " ".join(map(str, ids))), spoken is not None

    @classmethod
    def from_checkpoint(cls, checkpoint, prefix_ids: list[int], eos_id: int, shared: NumpyDecoder | None = None,
                        is_word=None, starts_word=None, spoken=None, suppress=None) -> "Verifier":
        """The decoder of a whisper_source.WhisperCheckpoint (tiny.en's model.bin: its pages are read here,
        float16 widened). shared: a decoder over the same Whisper's token table (the draft decoder on the numpy
        engine), whose table and output projection the verifier uses rather than copies of its own. suppress:
        None for the checkpoint's own (`WhisperCheckpoint.suppress`)."""
        table = None if shared is None else shared.table
        weights = {name[len(DECODER_PREFIX):]: (table if table is not None and name.endswith("embed_tokens.weight")
                                                else checkpoint.array(name))
                   for name in checkpoint.names(DECODER_PREFIX)}
        if "embed_tokens.weight" not in weights:
            raise ValueError(f"{checkpoint.origin}: no Whisper decoder to verify with")
        vocab, dim = weights["embed_tokens.weight"].shape
        weights["mask_embedding"] = np.zeros(dim, np.float32)  # never read: a causal decoder has no masks
        n_layer = 1 + max(int(n.split(".")[1]) for n in weights if n.startswith("layers."))
        config = {"family": "whisper", "n_layer": n_layer, "n_head": checkpoint.n_head, "n_embd": dim,
                  "vocab_size": vocab, "output_vocab_size": eos_id + 1,
                  "block_size": weights["embed_positions.weight"].shape[0]}
        head = shared.head if shared is not None and shared.n_logits == eos_id + 1 else None
        suppress = checkpoint.suppress if suppress is None else suppress
        return cls(NumpyDecoder(weights, config, head), prefix_ids, eos_id, is_word, starts_word, spoken, suppress)

    def verify(self, draft: list[int], states: np.ndarray, draft_confidences: list[float] | None = None) -> Verified:
        """The text of a window whose encoder states are `states` [F, d], checked against the draft's tokens."""
        draft = list(draft)
        out, confidences, rounds = self._check(draft, states)
        changed = edit_share(self._as_numbers(draft), self._as_numbers(out))
        kept = list(draft_confidences) if draft_confidences is not None else [1.0] * len(draft)
        stretch = self.said_over(out, draft)
        if stretch is not None:
            tokens, probs = self._closed(out[:stretch], confidences, draft, kept)
            if self.spoken(tokens) == self.spoken(draft):
                return Verified(draft, kept, rounds, changed, True)
            return Verified(tokens, probs, rounds, changed, False)
        if changed > VERIFY_MAX_CHANGED:
            return Verified(draft, kept, rounds, changed, True)
        return Verified(out, confidences, rounds, changed, False)

    def read(self, draft: list[int], states: np.ndarray, draft_confidences: list[float] | None = None) -> Verified:
        """The verifier's own greedy text of a short window, on `states` [F, d] of the window padded with silence
        (read_context: as Whisper's own input is, where it knows where speech ends), to its own end of text or
        READ_MAX_TOKENS: the draft only proposes tokens (the text is greedy decoding's, in fewer forwards). A text
        said over is cut to its stretch (`said_over`); a text with no word leaves the draft."""
        return self._read(list(draft), self.decoder.cross_kv(np.asarray(states, np.float32)[None]), draft_confidences)

    def reread(self, checked: Verified, draft: list[int], states: np.ndarray,
               draft_confidences: list[float] | None = None) -> Verified:
        """A short window's text: `checked` (its draft as `verify` left it, on the window's own states), unless the
        verifier's `read` on `states` (the window padded with silence: read_context) is READ_MARGIN nats likelier
        there."""
        read, gap = self.read_gap(checked, draft, states, draft_confidences)
        if read is None:
            return checked
        return read if read.tokens == checked.tokens or gap > READ_MARGIN else checked

    def read_gap(self, checked: Verified, draft: list[int], states: np.ndarray,
                 draft_confidences: list[float] | None = None) -> tuple[Verified | None, float]:
        """(`read` on `states`, how many nats likelier than `checked` it is there): None where the read said no
        word, 0 where it says the checked text. What `reread` decides on (scripts/sweep_reread.py: each margin)."""
        kv = self.decoder.cross_kv(np.asarray(states, np.float32)[None])
        read = self._read(list(draft), kv, draft_confidences)
        if read.kept_draft:
            return None, 0.0
        if read.tokens == checked.tokens:
            return read, 0.0
        return read, self.log_likelihood(read.tokens, kv) - self.log_likelihood(checked.tokens, kv)

    def log_likelihood(self, tokens: list[int], kv) -> float:
        """The verifier's log probability of `tokens` and then the end of text, teacher-forced on the encoder
        states whose cross-attention keys and values are `kv`, with the suppression `read` decodes under."""
        d = self.decoder
        ids = np.array([self.prefix + list(tokens)], np.int64)
        hidden = d.hidden_states(ids, kv, cache=SelfAttentionCache(d.n_layer))[0]
        logits = self._suppressed(d.project(hidden[len(self.prefix) - 1:]), first=True)  # each token's row, the end's
        target = list(tokens) + [self.eos_id]
        return float(log_softmax(logits)[np.arange(len(target)), target].astype(np.float64).sum())

    def _read(self, draft: list[int], kv, draft_confidences: list[float] | None) -> Verified:
        d, eos = self.decoder, self.eos_id
        cache = SelfAttentionCache(d.n_layer)
        pending, out, confidences = list(self.prefix), [], []
        at, rounds, anchor = 0, 0, 0
        while True:
            proposal = draft[at : at + MAX_PROPOSAL] + ([eos] if at + MAX_PROPOSAL >= len(draft) else [])
            hidden = d.hidden_states(np.array([pending + proposal], np.int64), kv, cache=cache)[0]
            rounds += 1
            accepted, choice, p_choice = self._accept(hidden, len(pending) - 1, proposal, READ_MAX_TOKENS - len(out),
                                                      suppressed=True, first=not out)
            out += proposal[:accepted]
            confidences += p_choice[:accepted]
            at += accepted
            anchor = at if accepted else anchor
            if choice is None or choice == eos or len(out) >= READ_MAX_TOKENS:
                break
            out.append(choice)
            confidences.append(p_choice[accepted])
            if len(out) >= READ_MAX_TOKENS:
                break
            cache.truncate(len(self.prefix) + len(out) - 1)
            pending = [choice]
            at, matched = _realigned(draft, at, choice, anchor)
            anchor = at if matched else anchor
        kept = list(draft_confidences) if draft_confidences is not None else [1.0] * len(draft)
        changed = edit_share(draft, out)
        if not any(map(self.is_word, out)):
            return Verified(draft, kept, rounds, changed, True)
        stretch = self.said_over(out, draft)
        if stretch is not None:
            out, confidences = self._closed(out[:stretch], confidences, draft, kept)
        return Verified(out, confidences, rounds, changed, False)

    def _as_numbers(self, tokens: list[int]) -> list:
        """tokens, each run of them that says a number (number words, digits) as the number's digits (one str:
        "five zero zero" and " 500" are "500"): what the VERIFY_MAX_CHANGED gate compares. Without `spoken` the
        tokens themselves."""
        if not self.has_spoken:
            return list(tokens)
        out: list = []
        for t in tokens:
            word = self.spoken([t])
            number = str(NUMBER_WORDS.index(word)) if word in NUMBER_WORDS else word if word.isdigit() else None
            if number is not None and out and isinstance(out[-1], str):
                out[-1] += number
            else:
                out.append(t if number is None else number)
        return out

    def said_over(self, text: list[int], draft: list[int]) -> int | None:
        """The length of the stretch `text` says over (its start, then a copy of it, the last copy perhaps cut
        short but holding the stretch's first word whole: "Oasis, Oasis"), or None. Only a stretch with words in
        it, at least SAID_OVER_MIN_SHARE of the draft's word tokens, in a text that is not the draft, for a
        draft that says no word twice running (a repeat the draft heard may have been spoken: "five, five")."""
        n = None if text == draft else self._period(text)
        if n is None:
            return None
        draft_words = self.spoken(draft).split()  # a decode: only for the rare text that is said over
        if any(a == b for a, b in zip(draft_words, draft_words[1:])):
            return None
        word_tokens = sum(map(self.is_word, text[:n]))
        return n if word_tokens and word_tokens >= SAID_OVER_MIN_SHARE * sum(map(self.is_word, draft)) else None

    def _period(self, text: list[int]) -> int | None:
        """The shortest n for which `text` is its first n tokens said over (said_over's copy rule), or None."""
        for n in range(1, len(text)):
            if all(text[i] == text[i - n] for i in range(n, len(text))):
                first = next((i for i in range(1, n) if self.starts_word(text[i])), n)  # its first word's tokens
                while first > 1 and not self.is_word(text[first - 1]):
                    first -= 1  # ... without the punctuation after it
                return n if len(text) - n >= first else None
        return None

    def _closed(self, stretch: list[int], confidences: list[float], draft: list[int],
                draft_confidences: list[float]) -> tuple[list[int], list[float]]:
        """A stretch of the verifier's text, the punctuation at its end replaced by the draft's closing mark:
        where the verifier said the stretch over it put a comma there ("Arch, Arch,")."""
        n = len(stretch)
        while n > 1 and not self.is_word(stretch[n - 1]):
            n -= 1
        tokens, probs = stretch[:n], confidences[:n]
        if draft and not self.is_word(draft[-1]):
            tokens = tokens + [draft[-1]]
            probs = probs + [draft_confidences[-1]]
        return tokens, probs

    def _check(self, draft: list[int], states: np.ndarray) -> tuple[list[int], list[float], int]:
        d, eos = self.decoder, self.eos_id
        kv = d.cross_kv(np.asarray(states, np.float32)[None])
        cache = SelfAttentionCache(d.n_layer)
        limit = min(len(draft) + max(LENGTH_SLACK_MIN, int(LENGTH_SLACK * len(draft))),
                    d.block_size - len(self.prefix) - 1)
        pending = list(self.prefix)  # tokens in the text whose keys and values the cache does not hold yet
        out: list[int] = []
        confidences: list[float] = []
        at, rounds = 0, 0  # the draft position the next round starts from
        anchor = 0  # the draft position after the last draft token the verifier said (accepted or found)
        overran = False
        while True:
            proposal = draft[at : at + MAX_PROPOSAL] + ([eos] if at + MAX_PROPOSAL >= len(draft) else [])
            hidden = d.hidden_states(np.array([pending + proposal], np.int64), kv, cache=cache)[0]
            rounds += 1
            first = len(pending) - 1  # the row that predicts proposal[0]
            accepted, choice, p_choice = self._accept(hidden, first, proposal, limit - len(out))
            out += proposal[:accepted]
            confidences += p_choice[:accepted]
            at += accepted
            anchor = at if accepted else anchor
            if _restarted(out):
                return _cut_restart(out, confidences) + (rounds,)
            if choice is None or choice == eos or len(out) >= limit:
                return out, confidences, rounds  # the end: accepted, the verifier's or the limit
            if at >= len(draft) and not (overran and p_choice[accepted] >= EXTENSION_PROBABILITY) \
                    and not self._goes_on_a_word(out, choice):
                return out, confidences, rounds  # the draft's end (where it ends no word halfway)
            if at == len(draft) - 1 and not self.is_word(draft[at]) and self.is_word(choice) \
                    and p_choice[accepted] < CLOSING_WORD_PROBABILITY:
                return out + [draft[at]], confidences + [p_choice[accepted]], rounds  # the draft's closing mark
            out.append(choice)
            confidences.append(p_choice[accepted])
            if _restarted(out):
                return _cut_restart(out, confidences) + (rounds,)
            # The keys and values of rejected proposal tokens go; the verifier's choice runs next round.
            cache.truncate(len(self.prefix) + len(out) - 1)
            pending = [choice]
            inside = at < len(draft)  # else the verifier went on past the draft's end (a word, or overran)
            at, matched = _realigned(draft, at, choice, anchor)
            anchor = at if matched else anchor
            # Past the draft's end by a guess (the verifier's word taken for a draft word it replaced, where it
            # was one the draft lacked), the verifier may still have the draft's last words to say.
            overran = overran or (inside and not matched and at >= len(draft))

    def _goes_on_a_word(self, text: list[int], choice: int) -> bool:
        """Whether `choice` goes on with the last word of `text` (a word token that starts no word, after a word
        token): a draft cut off inside a word ("your standard greet") is finished ("greetings")."""
        return bool(text) and self.is_word(text[-1]) and self.is_word(choice) and not self.starts_word(choice)

    def _accept(self, hidden: np.ndarray, row0: int, proposal: list[int], room: int, suppressed: bool = False,
                first: bool = False):
        """(proposal tokens accepted, the verifier's own next token after them or None where the text ends
        there, every checked row's probability of its choice). The end of text is accepted by stopping; a
        proposal accepted whole (cut at MAX_PROPOSAL, no end in it) gives the token after it. suppressed: the
        tokens Whisper's decoding suppresses are never chosen (and, with first, where row0 predicts the text's
        first token, those it does not begin with)."""
        probs: list[float] = []
        k = 0
        while True:
            logits = self.decoder.project(hidden[row0 + k : row0 + k + LOGIT_ROWS])
            if suppressed:
                self._suppressed(logits, first=first and k == 0)
            best = logits.argmax(-1).tolist()
            # The rows this round reads: up to the first that ends it (probabilities cost as much as the product).
            n = next((row + 1 for row, c in enumerate(best) if k + row >= room or k + row == len(proposal)
                      or c != proposal[k + row] or c == self.eos_id), len(best))
            probs += _probability_of_best(logits[:n]).tolist()
            for c in best[:n]:
                if k >= room:
                    return k, None, probs
                if k == len(proposal):
                    return k, c, probs
                if c != proposal[k] or c == self.eos_id:
                    return k, (None if c == proposal[k] else c), probs
                k += 1

    def _suppressed(self, logits: np.ndarray, first: bool) -> np.ndarray:
        """logits [n, V] with the tokens Whisper's decoding suppresses at -inf (in place), and where `first`, those
        it does not begin with in row 0 (the row predicting the text's first token)."""
        logits[:, self.suppress] = -np.inf
        if first:
            logits[0, self.suppress_first] = -np.inf
        return logits


def read_context(seconds: float) -> float:
    """The seconds a window that long is padded to for `read` (READ_CONTEXT_S, READ_SILENCE_S)."""
    return min(float(CHUNK_LENGTH), max(READ_CONTEXT_S, seconds + READ_SILENCE_S))


def _realigned(draft: list[int], at: int, choice: int, anchor: int) -> tuple[int, bool]:
    """(the draft position after the verifier's `choice`, where it disagreed with draft[at]; whether the choice
    was found near there): a draft token dropped, repeated or replaced shifts the rest of the draft. Looked for
    from REALIGN_BEHIND before `at` to REALIGN_AHEAD after it, then back to REALIGN_BEHIND before `anchor` (the
    draft position after the last draft token the verifier said): a word the draft lacked, of several tokens,
    moved `at` on by one for each of them, as if each replaced a draft token ("re- did" -> "re-entered did"
    left `at` past "did", and the rest of the draft was lost)."""
    window = range(max(at - REALIGN_BEHIND, 0), min(at + REALIGN_AHEAD, len(draft)))
    hit = next((i for i in window if draft[i] == choice), None)
    if hit is None:
        behind = range(max(anchor - REALIGN_BEHIND, 0), min(at - REALIGN_BEHIND, len(draft)))
        hit = next((i for i in behind if draft[i] == choice), None)
    return (hit + 1, True) if hit is not None else (at + 1, False)


def _probability_of_best(logits: np.ndarray) -> np.ndarray:
    """Each row's softmax probability of its largest logit, 1 / sum(exp(logits - max)); logits [n, V] are
    overwritten (in place: a fresh 50k-wide array per row costs more than the exponentials)."""
    np.subtract(logits, logits.max(-1, keepdims=True), out=logits)
    np.exp(logits, out=logits)
    return 1.0 / logits.sum(-1, dtype=np.float64)


def edit_share(draft: list[int], text: list[int]) -> float:
    """Share of the longer of two token sequences not in their longest matching blocks (0: the same)."""
    if not draft and not text:
        return 0.0
    matcher = difflib.SequenceMatcher(None, draft, text, autojunk=False)
    return 1.0 - sum(block.size for block in matcher.get_matching_blocks()) / max(len(draft), len(text))


def _restarted(out: list[int]) -> bool:
    return len(out) >= 2 * RESTART_TOKENS and out[-RESTART_TOKENS:] == out[:RESTART_TOKENS]


def _cut_restart(out: list[int], confidences: list[float]) -> tuple[list[int], list[float]]:
    return out[:-RESTART_TOKENS], confidences[:-RESTART_TOKENS]


__all__ = ["Verified", "Verifier", "VERIFY_MAX_CHANGED", "READ_MAX_TOKENS", "READ_MARGIN", "edit_share",
           "read_context"]
