"""`whisfusion bench`: metric conventions (exact values computed by hand), system specs, and one real run on
the test clips comparing a Whisfusion model with the offline Whisper tiny.en baselines."""

from __future__ import annotations

import csv
import json
import math
import shutil
import sys
from pathlib import Path

import pytest

from whisfusion_cli import bench
from whisfusion_cli.bench import (
    BenchError,
    accuracy,
    corpus_error_rates,
    mean_utterance_wer,
    normalise_paper,
    parse_system,
    verify_results,
)

CLIPS = ("goforward.flac", "cards_001.flac", "librivox_0880.flac")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------------------------------
# The two WER conventions


def test_conventions_differ_long_utterance_with_errors():
    # One 10-word utterance with 5 substitutions, four 2-word utterances all correct.
    refs = ["alpha bravo charlie delta echo foxtrot golf hotel india juliet"] + ["good morning"] * 4
    hyps = ["alpha bravo charlie delta echo kilo lima mike november oscar"] + ["good morning"] * 4
    # Corpus: 5 errors / (10 + 4 * 2) reference words = 5/18. Mean of utterances: (5/10 + 0 + 0 + 0 + 0) / 5.
    assert corpus_error_rates(refs, hyps)["wer"] == pytest.approx(5 / 18, abs=1e-12)
    assert mean_utterance_wer(refs, hyps) == pytest.approx(0.1, abs=1e-12)
    acc = accuracy(refs, hyps)
    assert acc["wer_corpus_whisper_norm"] > acc["wer_mean_utterance_paper_norm"]
    assert (acc["substitutions"], acc["deletions"], acc["insertions"], acc["ref_words"]) == (5, 0, 0, 18)


def test_conventions_differ_short_utterance_with_errors():
    # The other direction: one error in a 2-word utterance next to a correct 18-word one.
    long = ("the old grey horse walked slowly along the quiet river path while the farmer sang an old song").split()
    assert len(long) == 18
    refs = ["good morning", " ".join(long)]
    hyps = ["good evening", " ".join(long)]
    assert corpus_error_rates(refs, hyps)["wer"] == pytest.approx(1 / 20, abs=1e-12)
    assert mean_utterance_wer(refs, hyps) == pytest.approx((1 / 2 + 0) / 2, abs=1e-12)


def test_normalisers():
    # The paper's normaliser lower-cases and deletes punctuation, nothing else: "10" is not "ten".
    assert normalise_paper("Go forward, 10 meters!") == "go forward 10 meters"
    assert mean_utterance_wer(["ten of clubs"], ["10 of clubs."]) == pytest.approx(1 / 3, abs=1e-12)
    # The Whisper English normaliser also standardises numbers and spellings: no error left.
    assert corpus_error_rates(["ten of clubs"], ["10 of clubs."])["wer"] == 0.0
    assert corpus_error_rates(["Mr. Smith's colour"], ["mister smith's color"])["wer"] == 0.0
    # CER: one deleted character out of 13 ("king of clubs", spaces count).
    assert corpus_error_rates(["King of clubs."], ["king of club"])["cer"] == pytest.approx(1 / 13, abs=1e-12)
    # An utterance whose reference normalises to nothing has no WER of its own and is left out of the mean.
    assert mean_utterance_wer(["...", "a b"], ["x", "a c"]) == pytest.approx(0.5, abs=1e-12)


# ----------------------------------------------------------------------------------------------------------
# System specs


def test_parse_system_specs():
    s = parse_system("whisfusion:model=default,steps=8,candidates=4,selection=rover,seq_len=auto")
    assert (s.kind, s.model) == ("whisfusion", "default")
    assert s.params == {"steps": "8", "candidates": "4", "selection": "rover", "seq_len": "auto"}
    s = parse_system("whisper:tiny.en,beams=5")
    assert (s.kind, s.model, s.params, s.label) == ("whisper", "tiny.en", {"beams": "5"}, "whisper:tiny.en,beams=5")
    s = parse_system("faster-whisper:tiny.en,compute_type=int8,label=fw")
    assert (s.model, s.params["compute_type"], s.label) == ("tiny.en", "int8", "fw")
    assert parse_system("whisfusion:models/x,canvas=64").params == {"seq_len": "64"}
    assert parse_system("whisper").model == "tiny.en"
    assert parse_system("whisfusion:default,refine=0,shortlist=16").params == {"refine": "0", "shortlist": "16"}
    assert parse_system("whisfusion:default,encoder_backend=ctranslate2").params == {"encoder_backend": "ctranslate2"}
    for bad, words in [
        ("foo:bar", "unknown kind"),
        ("whisper:tiny.en,steps=4", "unknown option 'steps'"),
        ("whisfusion:default,steps=0", "positive integer"),
        ("whisfusion:default,seq_len=big", "'auto'"),
        ("whisfusion:default,shortlist=x", "shortlist='x' must be a non-negative integer"),
        ("whisfusion:default,pad_context=-2", "pad_context='-2' must be a non-negative integer or 'off'"),
        ("whisfusion:default,shortlist_int8=yes", "shortlist_int8='yes' must be 0 or 1"),
        ("whisfusion:default,int8=2", "int8='2' must be 0 or 1"),
        ("whisfusion:default,refine=-1", "refine='-1' must be a non-negative integer"),
        ("whisfusion:default,encoder_backend=onnx", "encoder_backend='onnx' must be one of torch, ctranslate2, auto"),
        ("whisper:tiny.en,small", "key=value"),
    ]:
        with pytest.raises(BenchError, match=words):
            parse_system(bad)


def test_whisfusion_specs_take_the_decoding_fields():
    """The decoding keys come from DecodingOptions itself; values become the field's type."""
    from whisfusion_cli.bench.options import decoding_overrides

    s = parse_system("whisfusion:default,temperature=0.5,max_seq_len=96,shortlist_int8=1,pad_context=off,canvas=auto")
    assert decoding_overrides(s) == {"seed": 0, "temperature": 0.5, "max_seq_len": 96, "shortlist_int8": True,
                                     "pad_context": None, "seq_len": None}
    assert decoding_overrides(parse_system("whisfusion:default,seed=3,selection=mbr")) == {"seed": 3, "selection": "mbr"}
    # The forms of `whisfusion transcribe` (DecodingOptions.parse): negative seeds, true/false, a canvas >= 2.
    assert decoding_overrides(parse_system("whisfusion:default,seed=-1,shortlist_int8=false,canvas=2")) == \
        {"seed": -1, "shortlist_int8": False, "seq_len": 2}
    with pytest.raises(BenchError, match="seq_len='1' must be an integer >= 2 or 'auto'"):
        parse_system("whisfusion:default,seq_len=1")
    with pytest.raises(BenchError, match="temperature='hot' must be a number"):
        parse_system("whisfusion:default,temperature=hot")
    with pytest.raises(BenchError, match="unknown option 'schedule'"):  # its commas would split the spec
        parse_system("whisfusion:default,schedule=1")


def test_bad_inputs_fail_with_one_line(tmp_path):
    with pytest.raises(BenchError, match="no such file"):
        bench.run_bench(bench.BenchOptions(dataset=str(tmp_path / "missing"), systems=["whisper:tiny.en"],
                                           output_dir=str(tmp_path / "out"), quiet=True))
    with pytest.raises(BenchError, match="--repeats"):
        bench.BenchOptions(repeats=0)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"audio": "nothing.wav", "text": "x"}) + "\n")
    with pytest.raises(BenchError, match="given twice"):
        bench.run_bench(bench.BenchOptions(dataset=str(manifest), systems=["whisper:tiny.en", "whisper:tiny.en"],
                                           output_dir=str(tmp_path / "out"), quiet=True))


# ----------------------------------------------------------------------------------------------------------
# A real run


def _whisfusion_model(tmp_path_factory) -> str:
    """The embedded default model when this checkout has it, else a small random Whisper-family model directory
    (tiny.en's tokenizer and encoder, a 1-layer decoder): its transcripts are noise, its timings are real."""
    if (Path(bench.__file__).parents[1] / "assets" / "default" / "config.json").is_file():
        return "default"
    import torch

    from whisfusion_cli.checkpoint import save_model_dir
    from whisfusion_cli.whisper_source import tiny_en_dir
    from whisfusion_cli.model import ModelConfig, build_decoder
    from whisfusion_cli.tokenizer import TokenizerConfig

    torch.manual_seed(0)
    config = ModelConfig(family="whisper", name="bench-test", n_layer=1, n_head=2, n_embd=64, intermediate_size=128,
                         vocab_size=51864, block_size=128, output_vocab_size=50257, condition_dim=384)
    out = tmp_path_factory.mktemp("model") / "m"
    save_model_dir(out, build_decoder(config), tiny_en_dir() / "tokenizer.json", TokenizerConfig.whisper().to_dict(),
                   {"source": "tiny.en", "mode": "short"}, {"candidates": 2, "steps": 2, "seq_len": None,
                                                            "max_seq_len": 64})
    return str(out)


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory, data_dir):
    pytest.importorskip("matplotlib", reason="plots need matplotlib (the 'test' extra installs it)")
    from typer.testing import CliRunner

    from whisfusion_cli.cli import app

    root = tmp_path_factory.mktemp("bench")
    transcripts = json.loads((data_dir / "audio" / "transcripts.json").read_text())
    manifest = root / "clips.jsonl"
    manifest.write_text("".join(json.dumps({"id": Path(c).stem, "audio": str(data_dir / "audio" / c), "text": transcripts[c]}) + "\n"
                                for c in CLIPS))
    model = _whisfusion_model(tmp_path_factory)
    systems = [f"whisfusion:model={model},steps=3,candidates=2,selection=rover,seq_len=auto,label=whisfusion",
               "whisper:tiny.en"]
    try:
        import faster_whisper  # noqa: F401

        systems.append("faster-whisper:tiny.en,compute_type=int8")
    except ImportError:
        pass
    out = root / "out"
    args = ["bench", str(manifest), "-o", str(out), "--threads", "1", "--warmup", "0", "--device", "cpu"]
    for s in systems:
        args += ["-s", s]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return out, result.output, systems


def test_bench_writes_table_json_csv_plots(bench_run):
    out, output, systems = bench_run
    assert "WER %" in output and "RTFx" in output and "median latency" in output
    assert "Warning" not in output and "deprecat" not in output.lower()  # library warnings stay off the terminal
    for name in (bench.RESULTS_JSON, bench.RESULTS_CSV, bench.HYPOTHESES_CSV):
        assert (out / name).stat().st_size > 0
    for name in (bench.PLOT_WER_RTFX, bench.PLOT_LATENCY):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert not list(out.glob(".*.tmp")) and not list(out.glob(".*.png"))
    results = json.loads((out / bench.RESULTS_JSON).read_text())
    env = results["environment"]
    assert env["threads"] == 1 and env["device"] == "cpu" and env["versions"]["torch"] and env["cpu"]
    assert [s["label"] for s in results["systems"]] == [bench.parse_system(s).label for s in systems]
    assert results["dataset"]["n_utterances"] == len(CLIPS)
    for s in results["systems"]:
        assert [u["id"] for u in s["utterances"]] == [Path(c).stem for c in CLIPS]
        assert s["memory"]["peak_rss_mb"] > 0 and s["speed"]["rtfx"] > 0
        assert s["latency_buckets"]["0-10 s"]["n"] == len(CLIPS)


def test_bench_wer_recomputed_from_saved_hypotheses(bench_run):
    """Recompute both WERs from hypotheses.csv with jiwer + the Whisper normaliser directly."""
    import jiwer
    from whisper_normalizer.english import EnglishTextNormalizer

    out, _, _ = bench_run
    results = json.loads((out / bench.RESULTS_JSON).read_text())
    with open(out / bench.HYPOTHESES_CSV, newline="") as f:
        rows = list(csv.DictReader(f))
    with open(out / bench.RESULTS_CSV, newline="") as f:
        summary = {r["system"]: r for r in csv.DictReader(f)}
    norm = EnglishTextNormalizer()
    for s in results["systems"]:
        mine = [r for r in rows if r["system"] == s["label"]]
        assert len(mine) == len(CLIPS)
        refs = [norm(r["reference"]) for r in mine]
        hyps = [norm(r["hypothesis"]) for r in mine]
        corpus = jiwer.wer(refs, hyps)
        assert s["accuracy"]["wer_corpus_whisper_norm"] == pytest.approx(corpus, abs=1e-12)
        assert float(summary[s["label"]]["wer_corpus_whisper_norm"]) == pytest.approx(corpus, abs=1e-12)
        per = [jiwer.wer(normalise_paper(r["reference"]), normalise_paper(r["hypothesis"])) for r in mine]
        assert s["accuracy"]["wer_mean_utterance_paper_norm"] == pytest.approx(sum(per) / len(per), abs=1e-12)
        # Speed numbers are consistent with the per-utterance timings they come from.
        sp = s["speed"]
        lat = sum(float(r["latency_s"]) for r in mine)
        assert sp["wall_s"] == pytest.approx(lat, rel=1e-9)
        assert sp["rtfx"] == pytest.approx(sum(float(r["duration_s"]) for r in mine) / lat, rel=1e-9)
        emitted = sum(int(r["emitted_tokens"]) for r in mine)
        assert sp["tokens_per_s_emitted"] == pytest.approx(emitted / sp["decoder_s"], rel=1e-9)
        for r in mine:
            assert float(r["load_audio_s"]) + float(r["encoder_s"]) + float(r["decoder_s"]) <= float(r["latency_s"])
        if s["kind"] == "whisfusion":
            canvas = sum(u["canvas_tokens"] for u in s["utterances"])
            assert sp["tokens_per_s_upstream"] == pytest.approx(canvas / sp["decoder_s"], rel=1e-9)
            assert all(u["positions"] == 2 * 3 * u["canvas_tokens"] for u in s["utterances"])  # K x steps x L
        else:
            # The Whisper baselines transcribe these clean clips nearly perfectly.
            assert s["accuracy"]["wer_corpus_whisper_norm"] <= 0.25
    assert verify_results(out) == [s["label"] for s in results["systems"]]


def test_verify_results_catches_tampering(bench_run, tmp_path):
    out, _, _ = bench_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    results = json.loads((copy / bench.RESULTS_JSON).read_text())
    results["systems"][0]["utterances"][0]["hypothesis"] += " extra words"
    (copy / bench.RESULTS_JSON).write_text(json.dumps(results))
    with pytest.raises(BenchError, match="recomputed from the hypotheses"):
        verify_results(copy)
    results["systems"][0]["utterances"][0]["hypothesis"] = results["systems"][0]["utterances"][0]["hypothesis"][:-12]
    results["systems"][-1]["speed"]["rtfx"] *= 2
    (copy / bench.RESULTS_JSON).write_text(json.dumps(results))
    with pytest.raises(BenchError, match="rtfx"):
        verify_results(copy)


def test_rerun_reuses_finished_systems(bench_run):
    """A restarted run with the same settings reads the finished systems instead of running them again."""
    out, _, systems = bench_run
    before = json.loads((out / bench.RESULTS_JSON).read_text())
    manifest = Path(before["dataset"]["path"])
    options = bench.BenchOptions(dataset=str(manifest), systems=systems, output_dir=str(out), threads=1, warmup=0,
                                 device="cpu", quiet=True)
    after = bench.run_bench(options)
    for a, b in zip(before["systems"], after["systems"]):
        assert a["speed"]["wall_s"] == b["speed"]["wall_s"]
        assert [u["hypothesis"] for u in a["utterances"]] == [u["hypothesis"] for u in b["utterances"]]
    assert math.isfinite(after["systems"][0]["speed"]["rtfx"])


def test_check_mode_cli(bench_run, tmp_path):
    """--check runs the pipeline afresh on a few utterances and verifies what it wrote; exit code 0."""
    from typer.testing import CliRunner

    from whisfusion_cli.cli import app

    out, _, systems = bench_run
    manifest = json.loads((out / bench.RESULTS_JSON).read_text())["dataset"]["path"]
    args = ["bench", manifest, "--check", "--limit", "2", "-o", str(tmp_path / "check"), "--threads", "1",
            "--device", "cpu", "-s", systems[0], "-s", systems[-1]]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "check passed: 2 systems consistent" in result.output
    results = json.loads((tmp_path / "check" / bench.RESULTS_JSON).read_text())
    assert results["dataset"]["n_utterances"] == 2 and results["options"]["warmup"] == 0
    assert results["options"]["resume"] is False  # a check never reuses earlier results


def test_missing_matplotlib_skips_the_plots_before_any_system_runs(bench_run, tmp_path, monkeypatch):
    """Without matplotlib: one line saying so before the systems run, then the table, exit 0 (the finished
    systems of the first run are reused, so this costs no system run)."""
    from typer.testing import CliRunner

    from whisfusion_cli.cli import app

    out, _, systems = bench_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    for plot in (bench.PLOT_WER_RTFX, bench.PLOT_LATENCY):
        (copy / plot).unlink()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    manifest = json.loads((out / bench.RESULTS_JSON).read_text())["dataset"]["path"]
    args = ["bench", manifest, "-o", str(copy), "--threads", "1", "--warmup", "0", "--device", "cpu"]
    for s in systems:
        args += ["-s", s]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    note = [i for i, line in enumerate(lines) if "no plots: matplotlib is not installed" in line]
    reused = [i for i, line in enumerate(lines) if "reusing finished results" in line]
    assert len(note) == 1 and len(reused) == len(systems) and note[0] < reused[0]
    assert "WER %" in result.output and "plots need matplotlib" not in result.output
    assert not (copy / bench.PLOT_WER_RTFX).exists() and bench.PLOT_WER_RTFX not in lines[-1]
    assert json.loads((copy / bench.RESULTS_JSON).read_text())["options"]["plots"] is False
