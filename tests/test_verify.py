"""Verification by Whisper's own causal decoder (verify.py): the numpy causal decoder against the torch one,
the cache against a whole forward, and what the speculative check does with right, shifted and wrong drafts."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from whisfusion_cli import train as T  # noqa: E402
from whisfusion_cli.audio import load_audio  # noqa: E402
from whisfusion_cli.distill import Teacher  # noqa: E402
from whisfusion_cli.encoder import EncoderOptions, WhisperAudioEncoder  # noqa: E402
from whisfusion_cli.loading import Pipeline, load_model  # noqa: E402
from whisfusion_cli.numpy_model import SelfAttentionCache, causal_mask, log_softmax  # noqa: E402
from whisfusion_cli.verify import (READ_MARGIN, READ_MAX_TOKENS, VERIFY_MAX_CHANGED, Verified, Verifier,  # noqa: E402
                                  _realigned, edit_share, read_context)
from whisfusion_cli.whisper_source import open_whisper  # noqa: E402

AUDIO = Path(__file__).parent / "data" / "audio"
EOS, PREFIX = 50256, [50257, 50362]


@pytest.fixture(scope="module")
def setup():
    model = load_model(None, engine="numpy")
    verifier = Verifier.from_checkpoint(open_whisper("tiny.en"), PREFIX, EOS)
    audio = load_audio(str(AUDIO / "jfk.wav"))[: 16000 * 5]  # "And so my fellow Americans, ask not"
    states = WhisperAudioEncoder("tiny.en", EncoderOptions(mode="short")).encode([audio])[0].numpy()
    return model, verifier, states


def test_causal_mask_lets_each_new_position_see_the_cached_ones_and_those_before_it():
    mask = causal_mask(2, 3)[0, 0]
    assert mask.shape == (3, 5)
    assert (np.isfinite(mask) == np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], bool)).all()


def test_numpy_causal_decoder_matches_the_torch_teacher_and_its_cache_a_whole_forward(setup):
    """The verifier's logits against distill.Teacher (tiny.en's decoder in torch, causal, teacher-forced); run in
    two parts through the cache, against one forward of the whole sequence."""
    _, verifier, states = setup
    d = verifier.decoder
    ids = PREFIX + [843, 523, 616, 6283, 3399]  # " And so my fellow Americans"
    kv = d.cross_kv(states[None])
    whole = d.hidden_states(np.array([ids]), kv, cache=SelfAttentionCache(d.n_layer))[0]
    cache = SelfAttentionCache(d.n_layer)
    first = d.hidden_states(np.array([ids[:3]]), kv, cache=cache)[0]
    rest = d.hidden_states(np.array([ids[3:]]), kv, cache=cache)[0]
    assert cache.length == len(ids)
    np.testing.assert_allclose(np.concatenate([first, rest]), whole, atol=2e-4)

    teacher = Teacher(T.whisper_decoder_from_pretrained("tiny.en", 384), EOS, len(PREFIX))
    target = torch.tensor([ids + [EOS]])
    positions = teacher.positions(target)
    ref = teacher.log_probs(target, torch.from_numpy(states)[None], torch.tensor([len(states)]), positions).numpy()
    ours = log_softmax(d.project(whole[len(PREFIX) - 1:]))  # the rows predicting each text token and the end
    np.testing.assert_allclose(ours, ref, atol=2e-3)


def _greedy(verifier, states, text_ids):
    """The verifier's own text for a draft (what it accepts and corrects)."""
    return verifier._check(text_ids, states)[0]


def test_a_draft_the_verifier_agrees_with_is_accepted_in_one_round(setup):
    model, verifier, states = setup
    checked = _greedy(verifier, states, model.tokenizer.encode(" And so my fellow Americans, ask not"))
    result = verifier.verify(checked, states)
    assert result.tokens == checked and result.rounds == 1 and result.changed == 0.0 and not result.kept_draft
    assert len(result.confidences) == len(checked) and all(0.0 < p <= 1.0 for p in result.confidences)


def test_a_repeated_or_dropped_word_is_corrected_and_the_rest_of_the_draft_realigned(setup):
    model, verifier, states = setup
    right = _greedy(verifier, states, model.tokenizer.encode(" And so my fellow Americans, ask not"))
    repeated = right[:3] + [right[2]] + right[3:]  # "so my my fellow"
    dropped = right[:2] + right[3:]  # "so fellow"
    for draft in (repeated, dropped):
        result = verifier.verify(draft, states)
        assert result.tokens == right, model.tokenizer.decode(result.tokens)
        # A repeat is seen at once (the verifier's word is the draft's next); a dropped word first reads as a
        # replaced one, and the round after realigns the draft.
        assert result.rounds == (2 if draft is repeated else 3)


def test_realigning_after_a_word_of_several_tokens_the_draft_lacked_finds_the_draft_again():
    """The draft "re - did not match" where the verifier says "re - ent ered did not match": "ent" and "ered" each
    read as a replaced draft token move the position past "did"; the verifier's "did" is then looked for back to
    the last draft token it said, and the rest of the draft ("not match") is proposed, not lost."""
    re, dash, did, not_, match, ent, ered = range(7)
    draft = [re, dash, did, not_, match]
    assert _realigned(draft, 2, ent, anchor=2) == (3, False)  # as a replaced "did"
    assert _realigned(draft, 3, ered, anchor=2) == (4, False)  # as a replaced "not"
    assert _realigned(draft, 4, did, anchor=2) == (3, True)  # "did" found behind: "not match" next
    # Within the usual window nothing changes: one behind to three ahead, the nearest first.
    assert _realigned(draft, 2, not_, anchor=2) == (4, True)
    assert _realigned(draft, 3, did, anchor=0) == (3, True)
    # Never behind the last token the verifier said (a repeat of it aside), nor past the draft's end.
    assert _realigned(draft, 4, re, anchor=2) == (5, False)
    assert _realigned(draft, 5, ent, anchor=5) == (6, False)


def test_a_number_written_as_digits_is_no_rewrite_to_the_gate(setup):
    """"Seven or nine, two decrease" checked as "7 or 9 to decrease": the gate counts only "two" -> "to" as a
    change, not the numbers' digits; a Verifier without `spoken` compares the tokens themselves."""
    model, verifier, _ = setup
    tok = model.tokenizer
    spoken = lambda ids: " ".join("".join(c if c.isalnum() else " " for c in tok.decode(list(ids)).lower()).split())
    words = Verifier(verifier.decoder, PREFIX, EOS, spoken=spoken)
    draft, checked = tok.encode(" Seven or nine, two decrease"), tok.encode(" 7 or 9, to decrease")
    assert len(draft) == len(checked) == 6
    assert words._as_numbers(draft)[:4] == ["7", draft[1], "9", draft[3]]  # " or" and "," stay tokens
    assert edit_share(words._as_numbers(draft), words._as_numbers(checked)) == pytest.approx(1 / 6)
    assert edit_share(draft, checked) == pytest.approx(3 / 6)
    assert verifier._as_numbers(draft) == draft
    # A run of number words is the number its digits spell, however the digits are cut into tokens.
    assert words._as_numbers(tok.encode(" dial five zero zero now")) == words._as_numbers(tok.encode(" dial 500 now"))
    assert words._as_numbers(tok.encode(" one two three four")) == words._as_numbers(tok.encode(" 1234")) == ["1234"]
    assert words._as_numbers(tok.encode(" five zero")) != words._as_numbers(tok.encode(" 500"))


class ScriptedDecoder:
    """A causal decoder whose greedy next token after each text is `right`'s (end of text after it), certain of
    it: verify.py's control flow without a network. Hidden states are the next token's one-hot logits."""

    n_layer, block_size, n_logits = 1, 64, 16

    def __init__(self, prefix: list[int], right: list[int], eos: int):
        self.script = {tuple(prefix + right[:i]): t for i, t in enumerate(right + [eos])}
        self.eos, self.context = eos, []

    def cross_kv(self, states):
        return None

    def hidden_states(self, ids, kv, cache):
        new = list(ids[0])
        self.context = self.context[: cache.length] + new
        cache.extend(0, np.zeros((1, 1, len(new), 1)), np.zeros((1, 1, len(new), 1)))
        start = len(self.context) - len(new)
        nexts = [self.script.get(tuple(self.context[: start + i + 1]), self.eos) for i in range(len(new))]
        return (10.0 * np.eye(self.n_logits, dtype=np.float32)[nexts])[None]

    def project(self, hidden):
        return np.array(hidden, dtype=np.float32)


# Tokens of the scripted decoder: words (each starting one, but ENT/ERED and GREET/INGS: a word of two tokens)
THE, PASSWORD, RE, DASH, ENT, ERED, DID, NOT, MATCH, DOT, PLEASE, AGAIN, GREET, INGS, END, START = range(16)


def _scripted(right):
    return Verifier(ScriptedDecoder([START], right, END), [START], END, is_word=lambda t: t not in (DOT, DASH),
                    starts_word=lambda t: t not in (ENT, ERED, INGS))


def test_a_word_of_several_tokens_the_draft_lacked_leaves_the_rest_of_the_draft():
    """"re- did not match. Please again." checked by a verifier that says "re-entered did ...": each of the two
    inserted tokens first reads as a replaced draft token, and the realignment finds the draft again behind."""
    right = [THE, PASSWORD, RE, DASH, ENT, ERED, DID, NOT, MATCH, DOT, PLEASE, AGAIN, DOT]
    draft = [THE, PASSWORD, RE, DASH, DID, NOT, MATCH, DOT, PLEASE, AGAIN, DOT]
    result = _scripted(right).verify(draft, np.zeros((4, 2), np.float32))
    assert result.tokens == right and not result.kept_draft


def test_a_draft_cut_off_inside_a_word_is_finished():
    """The draft "... password greet" (its window's last word cut): the verifier's "ings" goes on the word, and
    the text ends there, at the draft's end, not at the verifier's further words."""
    right = [THE, PASSWORD, GREET, INGS, DOT, PLEASE]
    result = _scripted(right).verify([THE, PASSWORD, GREET], np.zeros((4, 2), np.float32))
    assert result.tokens == [THE, PASSWORD, GREET, INGS]
    result = _scripted(right).verify([THE, PASSWORD], np.zeros((4, 2), np.float32))
    assert result.tokens == [THE, PASSWORD]  # a draft that ends a word ends there


def test_the_draft_stands_where_the_verifier_rewrote_most_of_it(setup):
    model, verifier, states = setup
    draft = model.tokenizer.encode(" Bananas are rich in potassium and fibre")
    result = verifier.verify(draft, states, [0.5] * len(draft))
    assert result.changed > VERIFY_MAX_CHANGED and result.kept_draft
    assert result.tokens == draft and result.confidences == [0.5] * len(draft)


def test_the_text_ends_where_the_draft_ends_and_keeps_its_closing_mark(setup):
    """On audio-length states the causal decoder would go on past the window ("Americans. and"): the end is the
    draft's, its closing punctuation too."""
    model, verifier, states = setup
    tok = model.tokenizer
    words = Verifier(verifier.decoder, PREFIX, EOS, is_word=lambda t: any(c.isalnum() for c in tok.decode_raw([t])))
    encoder = WhisperAudioEncoder("tiny.en", EncoderOptions(mode="short"))
    first = encoder.encode([load_audio(str(AUDIO / "jfk.wav"))[: int(2.4 * 16000)]])[0].numpy()  # the first window
    draft = tok.encode(" And so my fellow Americans.")
    result = words.verify(draft, first)
    assert tok.decode(result.tokens).strip() == "And so my fellow Americans."
    assert not result.kept_draft
    # A word the draft lost before its closing mark, which the verifier is sure of, is taken.
    audio = load_audio(str(AUDIO / "jfk.wav"))[int(7.2 * 16000) : 11 * 16000]
    end = encoder.encode([audio])[0].numpy()
    result = words.verify(tok.encode(" Ask what you can do for your."), end)
    assert tok.decode(result.tokens).strip().lower() == "ask what you can do for your country."


def test_a_stretch_the_verifier_says_over_is_the_text(setup):
    """On an isolated word the verifier often reads it right, then starts over ("Rocket Rocket Rocket"); the
    draft ("Rock it.") is then replaced by the word, with the draft's closing mark."""
    model, verifier, _ = setup
    tok = model.tokenizer
    from whisfusion_cli.loading import _spoken_words, _word_test
    from whisfusion_cli.decoding_options import word_start_test

    words = Verifier(verifier.decoder, PREFIX, EOS, _word_test(tok), word_start_test(tok), _spoken_words(tok))
    enc = tok.encode

    def stretch(text, draft):
        n = words.said_over(enc(text), enc(draft))
        if n is None:
            return None
        return tok.decode(words._closed(enc(text)[:n], [0.9] * n, enc(draft), [1.0] * len(enc(draft)))[0]).strip()

    assert stretch(" Rocket Rocket Rocket", " Rock it.") == "Rocket."
    assert stretch(" Oasis, Oasis", " A racist.") == "Oasis."  # the copy cut short, its first word whole
    assert stretch(" Arch, Arch,", " Uh") == "Arch"  # no closing mark in the draft: none added
    assert stretch(" or 8 to exit, or 8", " Or eight two exit.") == "or 8 to exit."
    # Not a stretch said over: a copy without its first word whole, a text with no words, one far shorter
    # than the draft, the draft itself, a repeat the draft also heard, and a spoken repeat (the first word
    # capitalised, so no stretch from the start).
    assert stretch(" that's that", " That is it.") is None
    assert stretch(' " " " "', " Man.") is None
    assert stretch(" the the the the", " Press one for sales, two for service and three for the rest.") is None
    assert stretch(" Bacon Bacon", " Bacon Bacon") is None
    assert stretch(" Bacon Bacon Bacon", " Bacon Bacon") is None
    assert stretch(" Bye bye bye bye", " Bye bye.") is None
    assert stretch(" 5 5 5", " Five, five.") is None  # the draft heard the word twice: it may have been said so


def test_a_stretch_said_over_that_says_the_draft_s_words_leaves_the_draft(setup):
    """The verifier's "i i i i" for the draft's "I." agrees on the word: the draft stands, in its own case."""
    model, verifier, states = setup
    tok = model.tokenizer
    from whisfusion_cli.loading import _spoken_words, _word_test
    from whisfusion_cli.decoding_options import word_start_test

    words = Verifier(verifier.decoder, PREFIX, EOS, _word_test(tok), word_start_test(tok), _spoken_words(tok))
    assert _spoken_words(tok)(tok.encode(" Falling, star.")) == "falling star"
    draft = tok.encode(" I.")
    words._check = lambda d, s: (tok.encode(" i i i i"), [0.9] * 4, 1)  # what the verifier says on that word
    result = words.verify(draft, states, [0.7, 0.6])
    assert result.tokens == draft and result.kept_draft and result.confidences == [0.7, 0.6]
    words._check = lambda d, s: (tok.encode(" Rocket Rocket Rocket"), [0.9] * 3, 1)
    result = words.verify(tok.encode(" Rock it."), states, [0.7, 0.6, 0.5])
    assert tok.decode(result.tokens).strip() == "Rocket." and not result.kept_draft
    assert result.confidences == [0.9, 0.5]  # the verifier's for its word, the draft's for its closing mark


def test_edit_share():
    assert edit_share([], []) == 0.0
    assert edit_share([1, 2, 3, 4], [1, 2, 3, 4]) == 0.0
    assert edit_share([1, 2, 3, 4], [1, 2, 9, 4]) == pytest.approx(0.25)
    assert edit_share([1, 2], [5, 6, 7, 8]) == 1.0


def test_the_default_model_verifies_and_the_option_turns_it_off(setup):
    model, _, _ = setup
    assert model.decoding.verify is True  # the embedded default's decoding (MODEL_CARD.md)
    assert Pipeline(model).verifier is not None
    assert Pipeline(model, {"verify": False}).verifier is None
    assert Pipeline(model, {"verify": False}).decoding.to_dict()["verify"] is False


def test_verified_and_draft_transcripts_of_the_readme_clip(setup):
    """Both engines run the same verifier; word timestamps are read for the verified text. The torch engine
    in float32, as the numpy engine runs: its CPU default, int8, is other arithmetic, whose draft of this clip
    differs by CPU ("S, not" on an AMD EPYC)."""
    from whisfusion_cli.transcribe import TranscribeOptions, transcribe_file

    texts = {}
    for engine in ("numpy", "torch"):
        for verify in (True, False):
            options = TranscribeOptions(engine=engine, decoding={"verify": verify}, word_timestamps=True, int8=False)
            result = transcribe_file(AUDIO / "jfk.wav", options)
            assert result.ok and result.decoding["verify"] is verify
            assert result.segments and all(s.words for s in result.segments)
            words = [w.word.strip() for s in result.segments for w in s.words]
            assert words == [t for s in result.segments for t in s.text.split()]
            texts[engine, verify] = result.text
    assert texts["numpy", True] == texts["torch", True]
    assert "ask not what your country can do for you" in texts["numpy", True].lower().replace(",", "").replace(".", "")
    assert "ask what you can do for your country" in texts["numpy", True].lower()


def _one_token_a_forward(verifier, states, limit):
    """The verifier's greedy text without speculation: one forward per token, to its end of text."""
    d = verifier.decoder
    kv, cache = d.cross_kv(states[None]), SelfAttentionCache(d.n_layer)
    pending, out = list(PREFIX), []
    while len(out) < limit:
        choice = int(d.project(d.hidden_states(np.array([pending]), kv, cache=cache)[0][-1:]).argmax())
        if choice == EOS:
            break
        out, pending = out + [choice], [choice]
    return out


def test_a_short_window_is_read_on_padded_states_whatever_the_draft(setup):
    """Verifier.read is greedy decoding on the 30 s-padded states: the draft changes how many forwards it
    takes (one where it is right), not the text; where the verifier's text has no word the draft stands."""
    model, verifier, _ = setup
    tok = model.tokenizer
    audio = load_audio(str(AUDIO / "goforward.flac"))  # "go forward ten meters", 2.8 s
    padded = WhisperAudioEncoder("tiny.en", EncoderOptions(mode="full")).encode([audio])[0].numpy()
    assert padded.shape == (1500, 384)
    greedy = _one_token_a_forward(verifier, padded, READ_MAX_TOKENS)
    assert tok.decode(greedy).strip() == "Go forward 10 meters."
    assert verifier.read(greedy, padded).rounds == 1
    for draft in ([], tok.encode(" Go backward."), tok.encode(" A B C D E F G H I J K L M N O P")):
        read = verifier.read(draft, padded)
        assert read.tokens == greedy and not read.kept_draft and read.rounds <= len(greedy) + 1



def test_reread_keeps_the_checked_text_unless_the_read_is_much_the_likelier(setup):
    """Verifier.reread: the read replaces the checked draft only where the verifier finds it READ_MARGIN nats
    likelier on the padded states; log_likelihood is the teacher-forced log probability of the text and its end."""
    model, verifier, _ = setup
    tok = model.tokenizer
    audio = load_audio(str(AUDIO / "goforward.flac"))  # "go forward ten meters", 2.8 s
    padded = WhisperAudioEncoder("tiny.en", EncoderOptions(mode="short")).encode_padded([audio], read_context(2.8))[0]
    padded = padded.numpy()
    assert padded.shape == (50 * read_context(2.8), 384) == (540, 384)
    kv = verifier.decoder.cross_kv(padded[None])
    greedy = verifier.read([], padded).tokens
    assert tok.decode(greedy).strip() == "Go forward 10 meters."

    d = verifier.decoder  # log_likelihood against the log-softmax of one forward, rows summed by hand
    ids = PREFIX + greedy + [EOS]
    logits = d.project(d.hidden_states(np.array([ids[:-1]]), kv, cache=SelfAttentionCache(d.n_layer))[0])
    logits = logits[len(PREFIX) - 1:]  # the rows predicting each token and the end
    logits[:, verifier.suppress] = -np.inf  # as `read` decodes: suppressed tokens get no probability
    logits[0, verifier.suppress_first] = -np.inf
    by_hand = sum(log_softmax(logits)[i, t] for i, t in enumerate(greedy + [EOS]))
    assert verifier.log_likelihood(greedy, kv) == pytest.approx(float(by_hand), abs=1e-3)

    def checked(text):
        tokens = tok.encode(text)
        return Verified(tokens, [1.0] * len(tokens), 1, 0.0, False)

    gaps = {}
    for text in (" Go forward ten meters.", " Go forward 10 metres.", " Go backward.", " Go forward 10 meters."):
        gaps[text] = verifier.log_likelihood(greedy, kv) - verifier.log_likelihood(tok.encode(text), kv)
        out = verifier.reread(checked(text), tok.encode(" Go backward."), padded)
        assert out.tokens == (tok.encode(text) if gaps[text] <= READ_MARGIN else greedy), (text, gaps[text])
    assert gaps[" Go forward 10 meters."] == 0 and gaps[" Go backward."] > READ_MARGIN
    assert any(0 < gap <= READ_MARGIN for gap in gaps.values())  # a checked text that stands, though not greedy's


def test_padding_a_clip_to_30_s_is_whisper_s_own_input_and_both_engines_pad_alike():
    """encode_padded: to 30 s the "full" mode's states; to 10 s the same on the numpy and torch encoders; a clip
    longer than its padding is an error."""
    from whisfusion_cli.encoder import NumpyWhisperEncoder

    audio = load_audio(str(AUDIO / "cards_001.flac"))
    torch_encoder = WhisperAudioEncoder("tiny.en", EncoderOptions(mode="short"))
    full = WhisperAudioEncoder("tiny.en", EncoderOptions(mode="full")).encode([audio])[0]
    torch.testing.assert_close(torch_encoder.encode_padded([audio], 30.0)[0], full)
    numpy_encoder = NumpyWhisperEncoder(open_whisper("tiny.en"), EncoderOptions(mode="short"))
    ten = numpy_encoder.encode_padded([audio], 10.0)[0]
    assert ten.shape == (500, 384)
    np.testing.assert_allclose(ten, torch_encoder.encode_padded([audio], 10.0)[0].numpy(), atol=2e-3)
    with pytest.raises(ValueError, match="does not fit 0.5 s"):
        numpy_encoder.encode_padded([audio], 0.5)
    with pytest.raises(ValueError, match="at most 30 s"):
        numpy_encoder.encode_padded([audio], 31.0)
    assert read_context(1.0) == 10.0 and read_context(5.0) == 13.0 and read_context(25.0) == 30.0


def test_a_read_never_says_what_whisper_s_decoding_suppresses(setup):
    """On noise tiny.en's greedy text is "[BLANK_AUDIO]"; with the checkpoint's suppress_ids (symbols, brackets)
    and suppress_ids_begin (a blank or the end of text first) it is words, as Whisper's own decoding gives."""
    model, _, _ = setup
    checkpoint = open_whisper("tiny.en")
    assert len(checkpoint.suppress[0]) > 50 and checkpoint.suppress[1] == [220, EOS]
    plain = Verifier.from_checkpoint(checkpoint, PREFIX, EOS, suppress=((), ()))
    whisper_like = Verifier.from_checkpoint(checkpoint, PREFIX, EOS)  # the checkpoint's own suppression
    noise = np.random.default_rng(0).normal(0, 0.01, 16000).astype(np.float32)
    states = WhisperAudioEncoder("tiny.en", EncoderOptions(mode="full")).encode([noise])[0].numpy()
    tok = model.tokenizer
    assert tok.decode(_one_token_a_forward(plain, states, READ_MAX_TOKENS)).strip() == "[BLANK_AUDIO]"
    read = whisper_like.read(tok.encode(" Yes."), states)
    assert read.tokens and not set(read.tokens) & set(checkpoint.suppress[0]) and read.tokens[0] not in (220, EOS)
    assert "[" not in tok.decode(read.tokens)


def test_verify_short_reads_only_windows_that_short(setup, monkeypatch):
    """decoding.verify_short: a window of at most that many seconds is read on its padded encoding (and its
    text is what the read gave), a longer one verified as before; 0 (the default's) reads none."""
    from whisfusion_cli.transcribe import TranscribeOptions, transcribe_file

    calls = []
    reread = Verifier.reread

    def spy(self, checked, draft, states, confidences=None):
        calls.append(states.shape)
        out = reread(self, checked, draft, states, confidences)
        calls.append(out.tokens)
        return out

    monkeypatch.setattr(Verifier, "reread", spy)
    clip = AUDIO / "cards_001.flac"  # "ten of clubs", 1.1 s: one window
    assert transcribe_file(clip, TranscribeOptions(decoding={"verify_short": 0.0})).ok and not calls
    assert transcribe_file(clip, TranscribeOptions(decoding={"verify_short": 0.5})).ok and not calls
    result = transcribe_file(clip, TranscribeOptions())  # the default model's own: 2 s
    assert result.ok and result.decoding["verify_short"] == 2.0
    assert calls[0] == (50 * read_context(1.1), 384) == (500, 384) and len(calls) == 2
    assert result.text.strip() == setup[0].tokenizer.decode(calls[1]).strip()
    with pytest.raises(ValueError, match="verify_short"):
        Pipeline(setup[0], {"verify_short": -1.0})
    with pytest.raises(ValueError, match="needs --verify"):
        Pipeline(setup[0], {"verify_short": 2.0, "verify": False})


def test_verify_needs_a_whisper_tokenizer(setup):
    model, _, _ = setup
    llama_like = dataclasses.replace(model, config={**model.config, "encoder": {}})
    with pytest.raises(ValueError, match="--verify needs"):
        Pipeline(llama_like, {"verify": True})
