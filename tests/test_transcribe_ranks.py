"""`whisfusion transcribe` under torchrun (2 gloo ranks on the CPU): the inputs are split by file, every rank
writes its own outputs atomically, the union equals a single-process run, a rerun resumes, and rank 0 alone
prints the summary."""

import os
import shutil
import sys
from pathlib import Path

from test_train_ddp import _torchrun
from tiny_model import make_model_dir
from typer.testing import CliRunner

from whisfusion_cli.cli import app

AUDIO = Path(__file__).parent / "data" / "audio"
CLIPS = ["cards_001.flac", "cards_002.flac", "cards_003.flac", "cards_004.flac", "cards_005.flac"]


def _outputs(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_two_ranks_split_the_files_and_match_one_process(tmp_path):
    model = make_model_dir(tmp_path / "tiny")
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in CLIPS:
        shutil.copy(AUDIO / name, inputs / name)
    missing = str(tmp_path / "nowhere.wav")
    args = ["transcribe", str(inputs), missing, "-m", str(model), "-f", "txt,json", "--seed", "0", "--device", "cpu"]
    single = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "one")])
    assert single.exit_code == 1  # the missing path
    script = tmp_path / "ranks.py"
    script.write_text("import sys, torch; torch.set_num_threads(1)\n"
                      "from whisfusion_cli.cli import main\n"
                      f"sys.argv = ['whisfusion', *{[*args, '-o', str(tmp_path / 'two')]!r}]\n"
                      "main()\n")
    run = _torchrun(script, tmp_path, returncode=1)  # every rank exits 1: a path failed on rank 0
    log = run.stdout + run.stderr
    assert _outputs(tmp_path / "two") == _outputs(tmp_path / "one") and len(_outputs(tmp_path / "one")) == 10
    assert log.count("nowhere.wav") == 1 and log.count("transcribed (") == 1
    assert "5 transcribed (0 silent), 1 failed" in log and "on 2 ranks" in log
    assert not [p for p in (tmp_path / "two").iterdir() if p.name.startswith(".")]  # no temporary files left
    # A rerun skips every finished file; a lost output is redone by the rank that owns it.
    os.remove(tmp_path / "two" / "cards_004.txt")
    (tmp_path / "two" / "cards_004.json").unlink()
    rerun = _torchrun(script, tmp_path, returncode=1)
    assert "1 transcribed (0 silent), 4 skipped" in rerun.stdout + rerun.stderr
    assert _outputs(tmp_path / "two") == _outputs(tmp_path / "one")


def test_ranks_need_an_output_folder(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = CliRunner().invoke(app, ["transcribe", str(AUDIO / CLIPS[0])])
    assert result.exit_code == 2 and "give --output-dir" in result.output
