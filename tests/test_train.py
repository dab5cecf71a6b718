"""Training end to end on espeak-ng speech with tiny models: SMDM stage 1 -> stage 2 -> model directory,
the Whisper-initialised family, exact resume, NaN handling and bad input."""

import json
import math
import shutil
from dataclasses import fields
from types import SimpleNamespace

import pytest
import torch
from test_data import (SENTENCES, TINY_DIM, TINY_EN_DIM, make_tiny_whisper, make_word_tokenizer, speech_shards,
                       tiny_smdm_config)

from whisfusion_cli import train as T
from whisfusion_cli.checkpoint import load_decoder, load_state_dict_file
from whisfusion_cli.loading import load_model_dir
from whisfusion_cli.data import ShardDataset
from whisfusion_cli.model import build_decoder, is_adapter_key

torch.set_num_threads(1)


def _losses(run_dir):
    rows = [json.loads(l) for l in (run_dir / T.METRICS_FILE).read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r], [r for r in rows if "val_loss" in r]


def _smdm_setup(tmp_path, tmp_path_factory):
    from whisfusion_cli.tokenizer import Tokenizer

    shards = speech_shards(tmp_path_factory, "tiny.en")
    tok = make_word_tokenizer(tmp_path / "tokenizer.json")
    cfg = tiny_smdm_config(tmp_path / "config.json", Tokenizer(tok).vocab_size, TINY_EN_DIM)
    base = tmp_path_factory.getbasetemp() / "smdm-base.safetensors"
    if not base.exists():
        # A stand-in for the pre-trained SMDM base: a short run from random init (the `scratch` path), saved
        # like upstream's file, without cross-attention keys.
        run = tmp_path_factory.getbasetemp() / "smdm-base-run"
        T.train(T.TrainOptions(data=str(shards), output=str(run), config=str(cfg), tokenizer=str(tok), batch_size=8,
                               seq_len=12, max_steps=200, lr=1e-2, warmup=3, val_items=0, progress=False))
        model, _ = load_model_dir(run / "model")
        from safetensors.torch import save_file

        save_file({k: v for k, v in model.state_dict().items() if not is_adapter_key(k)}, base)
    return shards, tok, cfg, base


def test_smdm_stage1_then_stage2_end_to_end(tmp_path, tmp_path_factory):
    from whisfusion_cli.checkpoint import read_config
    from whisfusion_cli.decoding import DecodingOptions, decode_windows
    from whisfusion_cli.data import ShardDataset
    from whisfusion_cli.tokenizer import Tokenizer, TokenizerConfig

    shards, tok, cfg, base = _smdm_setup(tmp_path, tmp_path_factory)
    common = dict(data=str(shards), base=str(base), config=str(cfg), tokenizer=str(tok), batch_size=8, seq_len=12,
                  warmup=3, eval_every=100, val_items=6, wer_items=3, log_every=20, progress=False)

    s1 = tmp_path / "stage1"
    summary = T.train(T.TrainOptions(output=str(s1), stage="1", max_steps=300, lr=1e-2, **common))
    assert summary["reason"] == "finished" and summary["step"] == 300
    losses, evals = _losses(s1)
    # The loss falls clearly: the mean of the last five logged losses (steps 200-300) is at least 7% below that
    # of the first five (each entry is itself a 20-step mean; run to run and CPU to CPU they vary by ~2%).
    assert sum(losses[-5:]) < 0.93 * sum(losses[:5]), losses
    assert len(evals) == 3 and all(0.0 <= e["wer"] <= 5.0 for e in evals)  # WER of real PDD, each evaluation
    # Stage 1 output: upstream's flat dict of exactly the adapter tensors (here with our width projection).
    adapter = torch.load(s1 / "whisfusion_stage1_adapter.pt", weights_only=True)
    fresh = build_decoder(read_config(cfg)).state_dict()
    assert set(adapter) == {k for k in fresh if is_adapter_key(k)} and any(k.startswith("condition_proj") for k in adapter)
    # Only adapter tensors changed: everything else in the trained model is the base, bit for bit.
    trained, _ = load_model_dir(s1 / "model")
    base_sd = load_state_dict_file(base)
    for k, v in trained.state_dict().items():
        if is_adapter_key(k):
            assert torch.equal(v, adapter[k])
        else:
            assert torch.equal(v, base_sd[k]), k
    torch.manual_seed(1234)  # the run's seed: the adapter started from this default init, and it moved
    start = build_decoder(read_config(cfg)).state_dict()
    assert all(not torch.equal(adapter[k], start[k]) for k in adapter)

    s2 = tmp_path / "stage2"
    T.train(T.TrainOptions(output=str(s2), stage="2", init=str(s1 / "whisfusion_stage1_adapter.pt"), max_steps=200,
                           lr=3e-3, layer_decay=0.9, **common))
    losses2, evals2 = _losses(s2)
    assert sum(losses2[-3:]) < 0.85 * sum(losses2[:3]), losses2
    full = torch.load(s2 / "whisfusion_stage2_decoder.pt", weights_only=True)
    assert set(full) == set(fresh) and all(v.dtype == torch.float32 for v in full.values())
    # The files load the way upstream's are loaded, and the model directory is ready for transcription.
    decoder = load_decoder(s2 / "whisfusion_stage2_decoder.pt", config=cfg)
    model, config = load_model_dir(s2 / "model")
    assert config["encoder"] == {"source": "tiny.en", "mode": "short", "dim": TINY_EN_DIM}
    assert config["tokenizer"]["prefix_ids"] == [1] and config["tokenizer"]["pad_id"] == 2
    for k, v in decoder.state_dict().items():
        assert torch.equal(v, model.state_dict()[k])
    tokenizer = Tokenizer(s2 / "model" / "tokenizer.json", TokenizerConfig.from_dict(config["tokenizer"]))
    ds = ShardDataset(shards)
    options = DecodingOptions(candidates=3, steps=4, seq_len=12, seed=0)
    results = decode_windows(model, [ds.states(i).float() for i in range(3)], options, tokenizer.prefix_ids,
                             tokenizer.pad_id)
    words = set(" ".join(SENTENCES).split())
    assert all(w in words for r in results for w in tokenizer.decode(r.text_tokens).split())
    # ... and `transcribe --model DIR` runs on it: audio -> tiny.en encoder ("short", from config.json) -> text.
    from whisfusion_cli.transcribe import TranscribeOptions, transcribe_file

    speech = tmp_path_factory.getbasetemp() / "speech"
    result = transcribe_file(speech / "utt000.wav", TranscribeOptions(model=str(s2 / "model"), device="cpu",
                                                                      decoding={"seed": 0}))  # deterministic
    assert result.ok and result.duration > 1.0
    # Words of the training text only (e.g. "the the the on the mat"). Which words, after 500 steps of a tiny
    # model, depends on the CPU's float rounding along the run, so accuracy is not asserted here.
    assert result.text and all(w in words for w in result.text.split())


def test_whisper_family_from_pretrained_decoder(tmp_path, tmp_path_factory):
    shards = speech_shards(tmp_path_factory)
    whisper_dir = make_tiny_whisper(tmp_path_factory.getbasetemp() / "tiny-whisper")
    run = tmp_path / "run"
    # Two shard folders (here the same one twice) train as one dataset.
    summary = T.train(T.TrainOptions(data=[str(shards), str(shards)], output=str(run), init=str(whisper_dir),
                                     batch_size=8, max_steps=40, lr=1e-2, warmup=3, eval_every=20, val_items=6, wer_items=2,
                                     log_every=5, progress=False))
    losses, evals = _losses(run)
    assert losses[-1] < 0.75 * losses[0], losses
    first = json.loads((run / T.METRICS_FILE).read_text().splitlines()[0])
    assert first["train_items"] + first["val_items"] == 2 * len(ShardDataset(shards))
    model, config = load_model_dir(run / "model")
    assert config["decoder"]["family"] == "whisper" and config["tokenizer"]["prefix_ids"] == [50257, 50362]
    assert config["decoder"]["output_vocab_size"] == 50257 and config["decoding"]["strategy"] == "confidence"
    assert config["decoding"]["max_seq_len"] == summary_seq_len(run)
    # Pre-trained weights were loaded; the tied token table stayed frozen; everything else trained.
    from whisfusion_cli.whisper_source import load_whisper

    hf = {k[len("model.decoder."):]: v for k, v in load_whisper(whisper_dir).state_dict().items()
          if k.startswith("model.decoder.")}
    sd = model.state_dict()
    assert torch.equal(sd["embed_tokens.weight"], hf["embed_tokens.weight"])
    assert not torch.equal(sd["layers.0.encoder_attn.k_proj.weight"], hf["layers.0.encoder_attn.k_proj.weight"])
    start = T.whisper_decoder_from_pretrained(str(whisper_dir), TINY_DIM)
    torch.testing.assert_close(start.mask_embedding, hf["embed_tokens.weight"].mean(0))
    assert summary["best_val_loss"] == evals[-1]["val_loss"]


def test_freeze_keeps_matching_parameters_at_their_initial_values(tmp_path, tmp_path_factory):
    """--freeze encoder_attn: the cross-attention stays tiny.en's own, bit for bit, while the rest trains."""
    shards = speech_shards(tmp_path_factory)
    whisper_dir = make_tiny_whisper(tmp_path_factory.getbasetemp() / "tiny-whisper")
    T.train(T.TrainOptions(data=str(shards), output=str(tmp_path / "run"), init=str(whisper_dir), batch_size=8,
                           max_steps=6, lr=1e-2, warmup=1, eval_every=100, val_items=4, wer_items=0,
                           freeze=("encoder_attn",), progress=False))
    start = T.whisper_decoder_from_pretrained(str(whisper_dir), TINY_DIM).state_dict()
    trained, _ = load_model_dir(tmp_path / "run" / "model")
    sd = trained.state_dict()
    frozen = [k for k in start if "encoder_attn" in k]
    assert frozen and all(torch.equal(sd[k], start[k]) for k in frozen)
    assert not torch.equal(sd["layers.0.self_attn.q_proj.weight"], start["layers.0.self_attn.q_proj.weight"])
    assert not torch.equal(sd["mask_embedding"], start["mask_embedding"])


def test_copy_unlikelihood_penalises_the_neighbours_token_and_not_true_repeats():
    """The term, computed position by position: -log(1 - p(left)) - log(1 - p(right)) at each masked position,
    a neighbour that equals the position's own token (a true repeat, the canvas edge) or lies outside the
    predicted vocabulary (a prompt token) left out."""
    g = torch.Generator().manual_seed(0)
    target = torch.tensor([[5, 7, 7, 2, 9, 9], [1, 3, 40, 6, 8, 0]])  # 40: outside the 12 predicted tokens
    mask = torch.tensor([[1, 1, 1, 0, 1, 1], [0, 1, 0, 1, 1, 1]], dtype=torch.bool)
    logits = torch.randn(int(mask.sum()), 12, generator=g, requires_grad=True)
    got = T.copy_unlikelihood(logits, target, mask)
    p, want, k = logits.detach().softmax(-1), 0.0, 0
    for b, i in mask.nonzero().tolist():
        for j in (i - 1, i + 1):
            if 0 <= j < target.size(1) and target[b, j] != target[b, i] and target[b, j] < 12:
                want = want - math.log(1 - float(p[k, target[b, j]]))
        k += 1
    assert math.isclose(float(got.detach()), want, rel_tol=1e-5)
    got.backward()  # lowering it lowers the neighbours' logits: their gradient is positive
    assert float(logits.grad[0, 7]) > 0 and float(logits.grad[1, 5]) > 0
    assert torch.isfinite(logits.grad).all()
    certain = torch.full((1, 12), -1e4)
    certain[0, 5] = 1e4  # the neighbour's token with probability 1: a large but finite penalty
    one = T.copy_unlikelihood(certain, target[:1, :2], torch.tensor([[False, True]]))
    assert math.isfinite(float(one)) and float(one) > 10


def test_copy_loss_trains_and_is_refused_when_negative(tmp_path, tmp_path_factory):
    """--copy-loss adds its term to the loss the run optimises and reports (same seed, same masks: larger). The
    untrained model gives its neighbours' tokens ~1e-5 in all, below float32's resolution of the summed loss
    at weight 1, hence a large weight here."""
    shards = speech_shards(tmp_path_factory)
    whisper_dir = make_tiny_whisper(tmp_path_factory.getbasetemp() / "tiny-whisper")
    losses = []
    for weight in (0.0, 1e4):
        summary = T.train(T.TrainOptions(data=str(shards), output=str(tmp_path / f"run{weight}"), init=str(whisper_dir),
                                         batch_size=8, max_steps=1, lr=1e-3, warmup=1, eval_every=100, val_items=4,
                                         wer_items=0, copy_loss=weight, progress=False))
        assert summary["step"] == 1 and math.isfinite(summary["last_loss"])
        losses.append(summary["last_loss"])
    assert losses[1] > losses[0]
    with pytest.raises(ValueError, match="copy_loss"):
        T.TrainOptions(data="d", output=str(tmp_path), copy_loss=-1.0)


class _CountingDecoder(torch.nn.Module):
    """A stand-in decoder whose argmax at position i is token 100 + i, whatever its input."""

    def forward(self, idx, cond, positions=None, frames=None):
        B, L = idx.shape
        logits = torch.nn.functional.one_hot(100 + torch.arange(L), 200).float().expand(B, L, 200)
        return logits[positions]


def test_self_correct_fills_only_masked_positions_with_the_models_own_prediction():
    """The SMART inputs: where `fill` marks a masked position it holds the decoder's argmax there; every other
    position (masked or not) is as it was; the draws depend on (seed, step) only and follow the share."""
    idx = torch.tensor([[1, 99, 99, 7, 99], [1, 5, 99, 99, 99]])
    mask = idx == 99
    fill = torch.tensor([[1, 1, 0, 1, 1], [0, 1, 1, 0, 1]], dtype=torch.bool)
    got = T.self_correct_inputs(_CountingDecoder(), idx, mask, fill, None, None)
    want = torch.tensor([[1, 101, 99, 7, 104], [1, 5, 102, 99, 104]])
    assert torch.equal(got, want)
    assert torch.equal(T.self_correct_inputs(_CountingDecoder(), idx, mask, torch.zeros_like(fill), None, None), idx)
    a, b = T.draw_self_correct(3, 10, 64, 40, 0.5), T.draw_self_correct(3, 10, 64, 40, 0.5)
    assert torch.equal(a, b) and not torch.equal(a, T.draw_self_correct(3, 11, 64, 40, 0.5))
    assert abs(float(a.float().mean()) - 0.5) < 0.05
    assert not T.draw_self_correct(3, 10, 8, 40, 0.0).any() and T.draw_self_correct(3, 10, 8, 40, 1.0).all()


def test_self_correct_trains_resumes_exactly_and_is_refused_out_of_range(tmp_path, tmp_path_factory):
    """--self-correct changes what the run optimises (same seed, same masks: another loss), a resumed run
    continues it exactly, and a share outside [0, 1] is refused."""
    shards = speech_shards(tmp_path_factory)
    whisper_dir = make_tiny_whisper(tmp_path_factory.getbasetemp() / "tiny-whisper")
    opts = dict(data=str(shards), init=str(whisper_dir), batch_size=8, max_steps=4, lr=1e-3, warmup=1,
                eval_every=100, val_items=4, wer_items=0, log_every=1, progress=False)
    plain = T.train(T.TrainOptions(output=str(tmp_path / "plain"), **opts))
    smart = T.train(T.TrainOptions(output=str(tmp_path / "smart"), self_correct=0.5, **opts))
    assert math.isfinite(smart["last_loss"]) and smart["last_loss"] != plain["last_loss"]
    T.train(T.TrainOptions(output=str(tmp_path / "halves"), self_correct=0.5, stop_at=2, **opts))
    T.train(T.TrainOptions(output=str(tmp_path / "halves"), self_correct=0.5, resume=True, **opts))
    assert _losses(tmp_path / "halves")[0] == _losses(tmp_path / "smart")[0]
    for share in (-0.1, 1.5):
        with pytest.raises(ValueError, match="self_correct"):
            T.TrainOptions(data="d", output=str(tmp_path), self_correct=share)


def summary_seq_len(run):
    first = json.loads((run / T.METRICS_FILE).read_text().splitlines()[0])
    return first["seq_len"]


def test_resume_is_exact(tmp_path, tmp_path_factory):
    shards, tok, cfg, _ = _smdm_setup(tmp_path, tmp_path_factory)
    opts = dict(data=str(shards), config=str(cfg), tokenizer=str(tok), batch_size=4, grad_accum=2, seq_len=32, canvas="audio",
                state_time_mask=0.1, state_noise=0.05,  # augmentation draws must resume exactly too
                max_steps=12, lr=3e-3, warmup=3, ema_decay=0.99, layer_decay=0.9, eval_every=4, val_items=6, log_every=1,
                wer_items=0, progress=False)
    T.train(T.TrainOptions(output=str(tmp_path / "a"), stop_at=6, **opts))
    first_half = torch.load(tmp_path / "a" / "last.pt", weights_only=False)
    assert first_half["step"] == 6
    with pytest.raises(T.TrainError, match="holds a run already"):
        T.train(T.TrainOptions(output=str(tmp_path / "a"), **opts))
    with pytest.raises(T.TrainError, match=r"options changed \(lr\)"):
        T.train(T.TrainOptions(output=str(tmp_path / "a"), resume=True, **{**opts, "lr": 1e-3}))
    T.train(T.TrainOptions(output=str(tmp_path / "a"), resume=True, **opts))
    T.train(T.TrainOptions(output=str(tmp_path / "b"), **opts))
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=False)
    assert a["step"] == b["step"] == 12 and a["best_val"] == b["best_val"]
    for k in b["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
        assert torch.equal(a["ema"]["shadow"][k], b["ema"]["shadow"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    la, _ = _losses(tmp_path / "a")
    lb, _ = _losses(tmp_path / "b")
    assert la == lb


def test_resume_fixed_options_are_marked_on_their_fields():
    """RESUME_FIXED is read from the marks on the TrainOptions fields: what defines the run's trajectory, not
    where it writes, how often it reports, evaluates or saves, or when it stops."""
    fixed = {f.name for f in fields(T.TrainOptions) if f.metadata.get("resume") == "fixed"}
    assert set(T.RESUME_FIXED) == fixed == {
        "stage", "base", "init", "config", "tokenizer", "seq_len", "batch_size", "grad_accum", "lr", "min_lr_ratio",
        "warmup", "max_steps", "epochs", "weight_decay", "betas", "adam_eps", "grad_clip", "mask_range", "ema_decay",
        "layer_decay", "freeze_embeddings", "seed", "val_items", "mask_prefix", "canvas", "state_time_mask",
        "state_noise", "distill", "distill_teacher", "freeze", "copy_loss", "self_correct"}


def test_a_resume_that_would_change_the_trajectory_is_refused(tmp_path):
    o = T.TrainOptions(data="d", output=str(tmp_path), stage="1").resolved(8)
    last = tmp_path / T.LAST_CHECKPOINT
    run = SimpleNamespace(o=o, last_path=last, global_batch=8)
    free = {"eval_every": 7, "patience": 1, "stop_at": 3, "output": "elsewhere", "progress": False}
    torch.save({"options": {**T._options_record(o), **free, "lr": 1.0, "val_items": 3}, "world_global_batch": 8}, last)
    with pytest.raises(T.TrainError, match=r"cannot resume exactly, options changed \(val_items, lr\)$"):
        T.load_resume(run)  # the fixed options in the order of their fields; the free ones not named
    torch.save({"options": {**T._options_record(o), **free}, "world_global_batch": 16}, last)
    with pytest.raises(T.TrainError, match=r"options changed \(global batch 16 -> 8\)$"):
        T.load_resume(run)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tmp_path_factory):
    from safetensors import safe_open
    from safetensors.torch import save_file

    shards, tok, cfg, _ = _smdm_setup(tmp_path, tmp_path_factory)
    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    shard = bad / "shard-00002.safetensors"
    with safe_open(str(shard), framework="pt") as f:
        meta, states, offsets = f.metadata(), f.get_tensor("states"), f.get_tensor("offsets")
    states[offsets[3] : offsets[4]] = float("nan")  # one utterance with broken encoder states
    save_file({"states": states, "offsets": offsets}, shard, metadata=meta)
    run = tmp_path / "run"
    with pytest.raises(T.TrainError, match="NaN at step"):
        T.train(T.TrainOptions(data=str(bad), output=str(run), config=str(cfg), tokenizer=str(tok), batch_size=8,
                               seq_len=12, max_steps=20, val_items=0, save_every=1, progress=False))
    last = torch.load(run / "last.pt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in last["model"].values())
    events = [json.loads(l) for l in (run / T.METRICS_FILE).read_text().splitlines()]
    nan = next(e for e in events if e.get("event") == "nan")
    assert nan["step"] == last["step"] + 1 and "last good checkpoint" in nan["message"]


def test_bad_input_is_reported(tmp_path, tmp_path_factory):
    from whisfusion_cli.whisper_source import tiny_en_dir

    shards, tok, cfg, base = _smdm_setup(tmp_path, tmp_path_factory)
    with pytest.raises(T.TrainError, match="missing shard index"):
        T.train(T.TrainOptions(data=str(tmp_path / "nowhere"), output=str(tmp_path / "r0"), progress=False))
    with pytest.raises(T.TrainError, match="stage 2 needs --init"):
        T.train(T.TrainOptions(data=str(shards), output=str(tmp_path / "r1"), stage="2", base=str(base),
                               config=str(cfg), tokenizer=str(tok), progress=False))
    with pytest.raises(T.TrainError, match="tokenizer has 5\\d{4} tokens"):
        T.train(T.TrainOptions(data=str(shards), output=str(tmp_path / "r2"), config=str(cfg),
                               tokenizer=str(tiny_en_dir() / "tokenizer.json"), progress=False))
    o = T.TrainOptions(data=str(shards), output=str(tmp_path / "r3"), config=str(cfg), tokenizer=str(tok))
    with pytest.raises(T.TrainError, match="encoder width 64 of the shards does not match the decoder's condition width 384"):
        _width_mismatch(tmp_path, o)


def _width_mismatch(tmp_path, o):
    # A model directory trained on 384-wide states, continued on 64-wide ones.
    decoder, tokenizer, tok_cfg, tok_file = T.build_model(o.resolved(8), TINY_EN_DIM)
    from whisfusion_cli.checkpoint import save_model_dir

    save_model_dir(tmp_path / "m", decoder, tok_file, tok_cfg, {"source": "tiny.en", "mode": "short", "dim": TINY_EN_DIM})
    o2 = T.TrainOptions(data=o.data, output=o.output, init=str(tmp_path / "m"), tokenizer=o.tokenizer)
    T.build_model(o2.resolved(8), data_dim=64)


def test_schedule_and_groups_follow_upstream():
    o = T.TrainOptions(data="x", output="y", stage="1").resolved(global_batch=48)
    assert o.lr == pytest.approx(1e-4 * 48 / 64) and o.betas == (0.9, 0.95) and o.grad_clip == 0.5
    assert T.TrainOptions(data="x", output="y", stage="1").resolved(global_batch=512).lr == 3e-4  # capped
    o2 = T.TrainOptions(data="x", output="y", stage="2").resolved(global_batch=64)
    assert o2.lr == pytest.approx(0.5e-5) and o2.ema_decay == 0.995 and o2.mask_range == (0.7, 1.0)
    total = 100
    assert T.lr_at(0, o2, total) == pytest.approx(o2.lr / 10)  # 10% linear warm-up
    assert T.lr_at(total, o2, total) == pytest.approx(o2.lr / 100)  # cosine to LR/100
    # Stage 2 mask ratios lie in [0.7, 1 - 1e-3]; stage 1's are (1 - eps) t + eps.
    t = torch.tensor([0.0, 0.5, 1.0])
    assert T.mask_probabilities(t, (0.0, 1.0)).tolist() == pytest.approx([1e-3, 0.5005, 1.0])
    assert T.mask_probabilities(torch.tensor([0.7, 1.0]), (0.7, 1.0)).tolist() == pytest.approx([0.7, 0.999])
    m = T.draw_masks(0, 3, 64, 20, (0.7, 1.0), n_prefix_fixed=2)
    assert not m[:, :2].any() and 0.7 < m[:, 2:].float().mean() < 0.95
    assert torch.equal(m, T.draw_masks(0, 3, 64, 20, (0.7, 1.0), 2))  # a function of (seed, step)
    # Layer-wise decay: last block at LR, block i at LR 0.9^(n-1-i), the rest at LR 0.9^n; no decay on norms.
    from whisfusion_cli.model import ModelConfig

    dec = build_decoder(ModelConfig(n_layer=3, n_head=2, n_embd=16, intermediate_size=32, vocab_size=64))
    groups = T.param_groups(dec, {n for n, _ in dec.named_parameters()},
                            T.TrainOptions(data="x", output="y", stage="2", layer_decay=0.9).resolved(64))
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    decay = {n: g["weight_decay"] for g in groups for n in g["names"]}
    assert scale["transformer.h.2.attn.attn.weight"] == 1.0
    assert scale["transformer.h.0.attn.attn.weight"] == pytest.approx(0.81)
    assert scale["lm_head.weight"] == scale["transformer.ln_f.weight"] == pytest.approx(0.729)
    assert decay["transformer.h.0.norm_1.weight"] == 0.0 and decay["lm_head.weight"] == 0.005


def test_state_augmentation_masks_spans_adds_noise_and_leaves_padding():
    torch.manual_seed(0)
    cond = torch.randn(3, 50, 8)
    cond[1, 30:] = 0.0  # item 1 has 30 real frames, then padding
    frames = [50, 30, 50]
    masked = T.augment_states(cond, frames, time_mask=0.2, noise=0.0, seed=7, step=3, micro=0)
    assert not torch.equal(masked, cond) and torch.equal(cond[1, 30:], torch.zeros(20, 8))  # input untouched
    for b, n in enumerate(frames):
        changed = (masked[b, :n] != cond[b, :n]).any(-1)
        # Changed frames hold the item's mean state; at most 2 spans of 20% of the frames each.
        assert torch.allclose(masked[b, :n][changed], cond[b, :n].mean(0).expand(int(changed.sum()), 8))
        assert int(changed.sum()) <= 2 * int(0.2 * n)
    assert torch.equal(masked[1, 30:], cond[1, 30:])  # padding stays zero
    noisy = T.augment_states(cond, frames, time_mask=0.0, noise=0.1, seed=7, step=3, micro=0)
    assert torch.equal(noisy[1, 30:], cond[1, 30:])
    rel = (noisy[0] - cond[0]).std() / cond[0].std()
    assert 0.07 < float(rel) < 0.13
    # The draws are a function of (seed, step, micro-batch): reproducible, and different across steps.
    assert torch.equal(noisy, T.augment_states(cond, frames, 0.0, 0.1, seed=7, step=3, micro=0))
    assert not torch.equal(noisy, T.augment_states(cond, frames, 0.0, 0.1, seed=7, step=4, micro=0))
    with pytest.raises(ValueError, match="state_time_mask"):
        T.TrainOptions(data="d", output="o", state_time_mask=0.6)
    with pytest.raises(ValueError, match="state_noise"):
        T.TrainOptions(data="d", output="o", state_noise=-1.0)


def test_length_grouped_batches_cover_the_epoch_once():
    lengths = [50 + (i * 37) % 400 for i in range(100)]
    batches = T.epoch_batches(lengths, 8, seed=1, epoch=0)
    flat = [i for b in batches for i in b]
    assert len(batches) == 12 and len(set(flat)) == 96  # incomplete last batch dropped, no repeats
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 40  # similar lengths share a batch, so zero padding stays small
    assert batches == T.epoch_batches(lengths, 8, seed=1, epoch=0) != T.epoch_batches(lengths, 8, seed=1, epoch=1)
    # The training loop's order: step s takes batch s mod 12 of epoch s // 12.
    order = T.EpochOrder(lengths, 8, seed=1)
    assert order.steps_per_epoch == 12 and order.rows(3) == batches[3]
    assert order.rows(12 + 5) == T.epoch_batches(lengths, 8, seed=1, epoch=1)[5] and order.rows(11) == batches[11]


@pytest.mark.parametrize("family", ["smdm", "whisper"])
def test_training_sees_the_cross_attention_inference_sees(family):
    # Training batches zero-pad encoder states to the longest item; inference masks the padding
    # (hidden_states(frames=)). The training forward must give an item the same logits as inference does
    # on that item alone: padded frames out of cross-attention (the whisper family's v_proj bias would
    # otherwise turn every zero frame into signal).
    from types import SimpleNamespace

    from whisfusion_cli.model import ModelConfig

    torch.manual_seed(0)
    config = ModelConfig(family=family, name="pad-test", n_layer=2, n_head=2, n_embd=32, intermediate_size=64,
                         vocab_size=300, padding_multiple=8, block_size=64, condition_dim=24)
    decoder = build_decoder(config).eval()
    for p in decoder.parameters():  # default inits leave some biases at zero: make them all count
        torch.nn.init.normal_(p, std=0.2)
    states = [torch.randn(7, 24), torch.randn(12, 24)]
    batches = T.Batches.__new__(T.Batches)
    batches.dataset, batches.indices = SimpleNamespace(states=lambda i: states[i]), [0, 1]
    cond, frames = batches.conditions([0, 1], torch.float32)
    assert cond.shape == (2, 12, 24) and frames.tolist() == [7, 12]
    idx = torch.randint(0, 250, (2, 10))
    idx[:, 3:8] = config.mask_token_id
    with torch.no_grad():
        trained = decoder(idx, cond, frames=frames)
        alone = decoder(idx[:1], states[0][None])
        kv = decoder.precompute_cross_kv(cond)
        inferred = decoder.project(decoder.hidden_states(idx, cross_kv=kv, frames=frames))
        unmasked = decoder(idx, cond)
    torch.testing.assert_close(trained[0], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(trained, inferred, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(trained[1], unmasked[1], rtol=1e-5, atol=1e-5)  # the longest item: no padding
    assert (trained[0] - unmasked[0]).abs().max() > 1e-3  # what training did before the fix


def test_fp16_loss_scaling_trains_and_resumes_exactly(tmp_path, tmp_path_factory, monkeypatch):
    """The fp16 path of a T4 or V100 (autocast + loss scaling), run on the CPU: the scaler's unscale/step/update
    wrap every update, its state is in last.pt, and a resumed run equals an uninterrupted one."""
    from whisfusion_cli.tokenizer import Tokenizer

    monkeypatch.setattr(T, "autocast_dtype", lambda precision, device: torch.float16)
    shards = speech_shards(tmp_path_factory, "tiny.en")
    tok = make_word_tokenizer(tmp_path / "tokenizer.json")
    cfg = tiny_smdm_config(tmp_path / "config.json", Tokenizer(tok).vocab_size, TINY_EN_DIM)
    opts = dict(data=str(shards), config=str(cfg), tokenizer=str(tok), batch_size=4, seq_len=12, max_steps=6,
                lr=3e-3, warmup=2, val_items=0, log_every=1, progress=False)
    T.train(T.TrainOptions(output=str(tmp_path / "a"), stop_at=3, **opts))
    T.train(T.TrainOptions(output=str(tmp_path / "a"), resume=True, **opts))
    T.train(T.TrainOptions(output=str(tmp_path / "b"), **opts))
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=False)
    assert a["step"] == b["step"] == 6 and a["scaler"]["scale"] == b["scaler"]["scale"] > 1
    for k in b["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    la, _ = _losses(tmp_path / "a")
    assert la == _losses(tmp_path / "b")[0] and all(math.isfinite(x) for x in la)


def test_ctrl_c_keeps_the_finished_steps_never_a_half_applied_update(tmp_path, tmp_path_factory, monkeypatch):
    """An interrupt between updates saves last.pt at the last finished step, and --resume then goes on as if
    nothing had happened; an interrupt inside an update saves nothing (the weights may be half updated)."""
    from whisfusion_cli.tokenizer import Tokenizer

    shards = speech_shards(tmp_path_factory)
    tok = make_word_tokenizer(tmp_path / "tokenizer.json")
    cfg = tiny_smdm_config(tmp_path / "config.json", Tokenizer(tok).vocab_size)
    opts = dict(data=str(shards), config=str(cfg), tokenizer=str(tok), batch_size=4, seq_len=12, max_steps=6,
                lr=3e-3, warmup=2, val_items=0, save_every=100, log_every=1, progress=False)

    def interrupt(name, at_call):
        real, calls = getattr(T, name), []

        def fn(*args):
            calls.append(None)
            if len(calls) == at_call:
                raise KeyboardInterrupt
            return real(*args)

        monkeypatch.setattr(T, name, fn)

    def events(run):
        return [json.loads(line) for line in (run / T.METRICS_FILE).read_text().splitlines()]

    interrupt("clip_gradients", 4)  # after the backward of step 4, before its update
    with pytest.raises(KeyboardInterrupt):
        T.train(T.TrainOptions(output=str(tmp_path / "a"), **opts))
    assert torch.load(tmp_path / "a" / "last.pt", weights_only=False)["step"] == 3
    assert events(tmp_path / "a")[-1] == {"event": "interrupted", "step": 3}
    interrupt("optimizer_step", 2)  # inside the update of step 2
    with pytest.raises(KeyboardInterrupt):
        T.train(T.TrainOptions(output=str(tmp_path / "b"), **opts))
    assert not (tmp_path / "b" / "last.pt").exists()
    assert events(tmp_path / "b")[-1] == {"event": "interrupted", "step": 1}
    monkeypatch.undo()
    T.train(T.TrainOptions(output=str(tmp_path / "a"), resume=True, **opts))
    T.train(T.TrainOptions(output=str(tmp_path / "c"), **opts))
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=False)
    c = torch.load(tmp_path / "c" / "last.pt", weights_only=False)
    assert a["step"] == c["step"] == 6 and all(torch.equal(a["model"][k], c["model"][k]) for k in c["model"])
    loss = lambda run: [e["loss"] for e in events(run) if "loss" in e]
    assert loss(tmp_path / "a") == loss(tmp_path / "c")
