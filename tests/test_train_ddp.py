"""Distributed runs through the real launcher (`python -m torch.distributed.run`, gloo on CPU): two ranks give
the same model as one process with the same global batch, and two-rank preprocessing writes the same shards."""

import json
import os
import subprocess
import sys

import pytest
import torch
from test_data import REPO, make_speech, make_tiny_whisper, make_word_tokenizer, speech_shards, tiny_smdm_config

from whisfusion_cli.data import PreprocessOptions, preprocess
from whisfusion_cli.tokenizer import Tokenizer

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="this torch build has no gloo backend")


def _torchrun(script, tmp_path, nproc=2, returncode=0):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", "0",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0", str(script)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == returncode, r.stdout[-3000:] + r.stderr[-3000:]
    return r


# Installed in every rank before training: records each collective with the devices of its tensors and the
# rank's own device, to a JSON file per rank.
RECORDER = """
import json, os, torch, torch.distributed as dist
CALLS = []
def _wrap(name):
    inner = getattr(dist, name)
    def recorded(*args, **kwargs):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        CALLS.append({"op": name, "devices": [str(t.device) for t in tensors]})
        return inner(*args, **kwargs)
    setattr(dist, name, recorded)
for _name in ("all_reduce", "broadcast", "all_gather", "broadcast_object_list", "all_gather_object", "barrier"):
    _wrap(_name)
import atexit
atexit.register(lambda: open(f"collectives-{os.environ['RANK']}.json", "w").write(json.dumps(CALLS)))
"""


def test_two_rank_ddp_equals_one_process(tmp_path, tmp_path_factory):
    shards = speech_shards(tmp_path_factory)
    tok = make_word_tokenizer(tmp_path / "tokenizer.json")
    cfg = tiny_smdm_config(tmp_path / "config.json", Tokenizer(tok).vocab_size)
    common = dict(data=str(shards), config=str(cfg), tokenizer=str(tok), batch_size=4, seq_len=12, max_steps=6,
                  lr=3e-3, warmup=2, eval_every=3, val_items=4, wer_items=2, log_every=1, progress=False)
    script = tmp_path / "run_ddp.py"
    script.write_text(
        RECORDER + "torch.set_num_threads(1)\n"
        "from whisfusion_cli.train import TrainOptions, train\n"
        f"train(TrainOptions(output={str(tmp_path / 'ddp')!r}, grad_accum=1, time_limit=60, **{common!r}))\n"
    )
    _torchrun(script, tmp_path)
    # Every collective of the training loop took its tensors on the rank's device (gloo: the CPU), one loss
    # reduction and one stop flag (time limit) per step; evaluations reached every rank from rank 0.
    for rank in range(2):
        calls = json.loads((tmp_path / f"collectives-{rank}.json").read_text())
        assert all(d == "cpu" for c in calls for d in c["devices"]), calls
        assert sum(c["op"] == "all_reduce" for c in calls) == 2 * 6
        assert sum(c["op"] == "broadcast_object_list" for c in calls) >= 2
    # One process, two accumulation steps of the same per-step size: the same global batch of 8.
    from whisfusion_cli.train import TrainOptions, train

    train(TrainOptions(output=str(tmp_path / "single"), grad_accum=2, **common))
    ddp = torch.load(tmp_path / "ddp" / "last.pt", weights_only=False)
    single = torch.load(tmp_path / "single" / "last.pt", weights_only=False)
    assert ddp["step"] == single["step"] == 6 and ddp["world_global_batch"] == single["world_global_batch"] == 8
    for k, v in single["model"].items():
        torch.testing.assert_close(ddp["model"][k], v, atol=1e-5, rtol=1e-4)
    rows = lambda run: [json.loads(l) for l in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    assert rows("ddp")[0]["world"] == 2 and rows("single")[0]["world"] == 1
    loss = lambda run: [r["loss"] for r in rows(run) if "loss" in r]
    assert loss("ddp") == pytest.approx(loss("single"), rel=1e-5)
    val = lambda run: [r["val_loss"] for r in rows(run) if "val_loss" in r]
    assert len(val("ddp")) == 2 and val("ddp") == pytest.approx(val("single"), rel=1e-5)


def test_two_rank_preprocess_splits_the_shards(tmp_path, tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    speech = make_speech(base / "speech")
    whisper = make_tiny_whisper(base / "tiny-whisper")
    spec = {"source": str(whisper), "mode": "short"}
    script = tmp_path / "run_pre.py"
    script.write_text(
        "import torch; torch.set_num_threads(1)\n"
        "from whisfusion_cli.data import PreprocessOptions, preprocess\n"
        f"preprocess(PreprocessOptions(input={str(speech)!r}, output={str(tmp_path / 'two')!r}, shard_size=6, "
        f"progress=False, encoder={spec!r}))\n"
    )
    _torchrun(script, tmp_path)
    preprocess(PreprocessOptions(input=str(speech), output=str(tmp_path / "one"), shard_size=6, progress=False,
                                 encoder=spec))
    one = json.loads((tmp_path / "one" / "index.json").read_text())
    two = json.loads((tmp_path / "two" / "index.json").read_text())
    assert one == two and len(one["shards"]) == 6
    for shard in one["shards"]:
        assert (tmp_path / "one" / shard["file"]).read_bytes() == (tmp_path / "two" / shard["file"]).read_bytes()


def test_an_error_on_one_rank_reaches_every_rank(tmp_path, tmp_path_factory):
    """Rank 0's work failing (or a check failing on rank 1) stops every rank with the same line, instead of
    leaving the others waiting in a collective; a run folder that holds a run already is refused on all."""
    shards = speech_shards(tmp_path_factory)
    tok = make_word_tokenizer(tmp_path / "tokenizer.json")
    cfg = tiny_smdm_config(tmp_path / "config.json", Tokenizer(tok).vocab_size)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "last.pt").write_bytes(b"a run of its own")
    options = dict(data=str(shards), output=str(taken), config=str(cfg), tokenizer=str(tok), batch_size=4, seq_len=12,
                   max_steps=2, val_items=0, progress=False)
    script = tmp_path / "run_errors.py"
    script.write_text(
        "import json, os, torch; torch.set_num_threads(1)\n"
        "from whisfusion_cli.distributed import Group\n"
        "from whisfusion_cli.train import TrainError, TrainOptions, train\n"
        "rank, out = int(os.environ['RANK']), {}\n"
        "group = Group.start('cpu')\n"
        "def failing(): raise OSError('disk full')\n"
        "for name, call in (('on_main', lambda: group.on_main(failing)),\n"
        "                   ('check', lambda: group.check('shard 3 unreadable' if rank == 1 else None)),\n"
        f"                   ('train', lambda: train(TrainOptions(**{options!r})))):\n"
        "    try:\n"
        "        call()\n"
        "    except Exception as e:\n"
        "        out[name] = [type(e).__name__, str(e)]\n"
        "json.dump(out, open(f'errors-{rank}.json', 'w'))\n"
        "group.barrier()\n"
        "group.close()\n"
    )
    _torchrun(script, tmp_path)
    errors = [json.loads((tmp_path / f"errors-{rank}.json").read_text()) for rank in range(2)]
    assert errors[0]["on_main"] == ["OSError", "disk full"]
    assert errors[1]["on_main"] == ["DistributedError", "rank 0: disk full"]
    assert errors[0]["check"] == ["DistributedError", "rank 1: shard 3 unreadable"]
    assert errors[1]["check"] == ["DistributedError", "shard 3 unreadable"]
    held = f"{taken}: holds a run already (last.pt); pass --resume to continue it or use a new folder"
    assert errors[0]["train"] == ["TrainError", held] and errors[1]["train"] == ["TrainError", f"rank 0: {held}"]
    assert (taken / "last.pt").read_bytes() == b"a run of its own"  # nothing lost
