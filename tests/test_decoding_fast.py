"""Fast decoding: batched windows, int8 decoders, sized canvases."""

import dataclasses

import pytest
import torch

from whisfusion_cli.checkpoint import load_decoder
from whisfusion_cli.decoding import DecodingOptions, decode_traced, decode_windows, parallel_diffusion_decode
from whisfusion_cli.model import ModelConfig, WhisperDiffusionDecoder, quantize_decoder
from whisfusion_cli.upstream import Trace

K = 3
# (frames, seconds) per window: two frame counts and two canvas lengths, so batches mix shapes.
WINDOWS = [(200, 4.0), (200, 4.0), (150, 4.0), (200, 4.0), (200, 9.0), (200, 4.0)]
WHISPER_PREFIX, WHISPER_EOT = [257, 258], 259


@pytest.fixture(scope="module")
def smdm(parity_dir):
    dec = load_decoder(parity_dir / "weights.safetensors", config=parity_dir / "config.json")
    cond = torch.load(parity_dir / "io.pt", weights_only=True)["condition"].float()
    # Windows cut from the three recorded conditions at different offsets: all different.
    conds = [cond[i % 3, 37 * i : 37 * i + f] for i, (f, _) in enumerate(WINDOWS)]
    return dec, conds, [1], 2


@pytest.fixture(scope="module")
def whisper():
    torch.manual_seed(0)
    dec = WhisperDiffusionDecoder(ModelConfig(family="whisper", n_layer=2, n_head=2, n_embd=32, intermediate_size=64,
                                              vocab_size=300, block_size=64, output_vocab_size=260)).eval()
    conds = [torch.randn(f, 32) for f, _ in WINDOWS]
    return dec, conds, WHISPER_PREFIX, WHISPER_EOT


def _options(strategy, **kw):
    extra = {"temperature": 0.7, "repeat_penalty": 0.3} if strategy == "confidence" else {}
    if strategy == "refine":  # the confidence strategy followed by mask-predict passes
        strategy, extra = "confidence", {"temperature": 0.7, "repeat_penalty": 0.3, "refine": 2}
    if strategy == "shortlist":  # the same, scoring only a vocabulary shortlist after step 0
        strategy, extra = "confidence", {"temperature": 0.7, "repeat_penalty": 0.3, "refine": 2, "shortlist": 4}
    if strategy == "pad_context":  # the same, on the transcript and 2 positions after its predicted end
        strategy, extra = "confidence", {"temperature": 0.7, "repeat_penalty": 0.3, "refine": 2, "shortlist": 4,
                                         "pad_context": 2}
    return DecodingOptions(candidates=K, steps=4, seq_len=None, max_seq_len=48, seed=11, strategy=strategy,
                           **{**extra, **kw})


def _count_batches(dec, monkeypatch):
    """Rows and padding of every trunk call: (rows, canvas lengths or None, frame counts or None)."""
    calls = []
    inner = dec.hidden_states

    def counting(idx, **kw):
        lengths, frames = kw.get("lengths"), kw.get("frames")
        calls.append((idx.size(0), None if lengths is None else lengths.tolist(),
                      None if frames is None else frames.tolist()))
        return inner(idx, **kw)

    monkeypatch.setattr(dec, "hidden_states", counting)
    return calls


def _same(a, b, atol=1e-6):
    assert torch.equal(a.tokens, b.tokens)
    torch.testing.assert_close(a.confidences, b.confidences, atol=atol, rtol=0)
    assert a.selected == b.selected and a.text_tokens == b.text_tokens


@pytest.mark.parametrize("strategy", ["remask", "confidence", "refine", "shortlist", "pad_context"])
@pytest.mark.parametrize("family", ["smdm", "whisper"])
def test_batched_windows_decode_like_single_windows(family, strategy, request, monkeypatch):
    dec, conds, prefix, pad = request.getfixturevalue(family)
    options = _options(strategy)
    durations = [d for _, d in WINDOWS]
    calls = _count_batches(dec, monkeypatch)
    batched = decode_windows(dec, conds, options, prefix, pad, durations, max_batch_windows=2)
    # Longest first in batches of 2: (9 s, 200 frames) with a 4 s one (canvas padded), then two 4 s windows
    # of 200 frames (nothing padded), then 200 with 150 frames (encoder states padded).
    rows = [r for r, _, _ in calls]
    assert max(rows) == 2 * K and all(r in (2, 2 * K) for r in rows)  # 2: step 0 shared by the K rows
    long_canvas = options.canvas_length(9.0, len(prefix))
    short_canvas = options.canvas_length(4.0, len(prefix))
    lengths = {tuple(x) if x else None for _, x, _ in calls}
    assert None in lengths and (long_canvas, short_canvas) in lengths  # step 0: one row per window
    frames = {tuple(f) if f else None for _, _, f in calls}
    assert None in frames and (200, 150) in frames
    singles = [decode_windows(dec, [c], options, prefix, pad, [d], seeds=[options.seed + i])[0]
               for i, (c, d) in enumerate(zip(conds, durations))]
    for i, (a, b) in enumerate(zip(batched, singles)):
        assert a.tokens.shape == (K, options.canvas_length(durations[i], len(prefix)))
        _same(a, b, atol=1e-5)  # padded and bigger matrix products round differently
    # The windows really differ, so the check above cannot pass by decoding one window six times.
    # (confidences: the tiny parity model often fills a whole canvas with one token whatever the audio).
    assert len({tuple(r.confidences.flatten().tolist()) for r in batched}) == len(WINDOWS)
    # And one window alone through the single-window entry point, seeded the same way.
    lone = parallel_diffusion_decode(dec, conds[3], dataclasses.replace(options, seed=options.seed + 3), prefix, pad,
                                     duration=durations[3])
    _same(lone, batched[3], atol=1e-5)  # batched[3] came from a batch: its products round as the batch's do


@pytest.mark.parametrize("strategy", ["remask", "refine"])
@pytest.mark.parametrize("family", ["smdm", "whisper"])
def test_batched_reference_mode_matches_fast_mode(family, strategy, request):
    dec, conds, prefix, pad = request.getfixturevalue(family)
    options = _options(strategy)
    durations = [d for _, d in WINDOWS]
    fast = decode_windows(dec, conds, options, prefix, pad, durations)
    # upstream's own forward, a window at a time (each seeded as decode_windows seeds it)
    ref = [decode_traced(dec, c, dataclasses.replace(options, seed=options.seed + i), Trace(reference=True), prefix,
                         pad, d) for i, (c, d) in enumerate(zip(conds, durations))]
    for a, b in zip(fast, ref):
        assert torch.equal(a.tokens, b.tokens) and a.selected == b.selected
        torch.testing.assert_close(a.confidences, b.confidences, atol=1e-5, rtol=0)


def test_seeds_and_batch_limit_are_checked(whisper):
    dec, conds, prefix, pad = whisper
    options = _options("remask")
    with pytest.raises(ValueError, match="max_batch_windows"):
        decode_windows(dec, conds, options, prefix, pad, max_batch_windows=0)
    with pytest.raises(ValueError, match="seeds"):
        decode_windows(dec, conds, options, prefix, pad, seeds=[1])
    a = decode_windows(dec, conds[:2], options, prefix, pad, seeds=[5, 6])
    b = decode_windows(dec, conds[:2], options, prefix, pad, seeds=[5, 7])
    assert torch.equal(a[0].tokens, b[0].tokens) and not torch.equal(a[1].tokens, b[1].tokens)


@pytest.mark.parametrize("family", ["smdm", "whisper"])
def test_int8_decoder_runs_with_same_shapes(family, request):
    dec, conds, prefix, pad = request.getfixturevalue(family)
    q = quantize_decoder(dec)
    linears = [m for m in dec.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m.weight.dtype == torch.float32 for m in linears)  # the original is untouched
    qtypes = {type(m).__name__ for m in q.modules()}
    assert "Linear" in qtypes and not any(isinstance(m, torch.nn.Linear) and type(m) is torch.nn.Linear
                                          for m in q.modules())
    if family == "whisper":
        assert type(q.output_proj).__module__.startswith("torch.ao.nn.quantized")
        assert getattr(quantize_decoder(dec, head=False), "output_proj", None) is None
    idx = torch.tensor([prefix + [dec.config.mask_token_id] * 10])
    kv = dec.precompute_cross_kv(conds[0][None])
    with torch.no_grad():
        ref, out = dec(idx, cross_kv=kv), q(idx, cross_kv=q.precompute_cross_kv(conds[0][None]))
    assert out.shape == ref.shape and out.dtype == torch.float32
    # Close to the float decoder: int8 weights and activations, not garbage.
    assert torch.corrcoef(torch.stack([out.flatten(), ref.flatten()]))[0, 1] > 0.99
    options = _options("remask")
    results = decode_windows(q, conds[:3], options, prefix, pad, [4.0, 4.0, 4.0])
    assert [r.tokens.shape for r in results] == [(K, options.canvas_length(4.0, len(prefix)))] * 3


def test_int8_needs_float32_cpu(whisper):
    with pytest.raises(ValueError, match="float32"):
        quantize_decoder(whisper[0].to(torch.float64))
    whisper[0].float()


def test_sized_canvas_lengths():
    o = DecodingOptions(seq_len=None, tokens_per_second=5.0, canvas_margin=12, max_seq_len=200)
    assert o.canvas_length(2.0, 1) == 1 + 10 + 12
    assert o.canvas_length(10.0, 3) == 3 + 50 + 12
    assert o.canvas_length(0.2, 1) == 16  # never shorter than MIN_CANVAS
    assert o.canvas_length(60.0, 1) == 200  # capped at the trained length
    assert o.canvas_length(None, 1) == 200
    assert DecodingOptions(seq_len=64).canvas_length(30.0, 1) == 64  # exact mode: fixed canvas
    # Monotone in the duration: longer audio never gets a shorter canvas.
    lengths = [o.canvas_length(s / 2, 1) for s in range(0, 80)]
    assert lengths == sorted(lengths)


def test_the_entry_point_sizes_the_canvas_to_the_audio(whisper):
    """parallel_diffusion_decode honours options.seq_len = None (a canvas sized to the duration), which its
    old seq_len=256 parameter overrode."""
    dec, conds, prefix, pad = whisper
    options = DecodingOptions(candidates=2, steps=2, seq_len=None, tokens_per_second=4.0, canvas_margin=3,
                              max_seq_len=48, seed=0, strategy="confidence")
    sized = parallel_diffusion_decode(dec, conds[0], options, prefix, pad, duration=5.0)
    assert sized.seq_len == options.canvas_length(5.0, len(prefix)) == 2 + 20 + 3
    assert sized.tokens.shape == (2, 25) and (sized.tokens != dec.config.mask_token_id).all()
    _same(sized, decode_windows(dec, conds[:1], options, prefix, pad, [5.0])[0])
    assert parallel_diffusion_decode(dec, conds[0], options, prefix, pad).seq_len == 48  # no duration: the cap
    fixed = dataclasses.replace(options, seq_len=20)
    assert parallel_diffusion_decode(dec, conds[0], fixed, prefix, pad, duration=5.0).seq_len == 20


def test_int8_pipeline_quantises_decoder_and_encoder(tmp_path, data_dir):
    from tiny_model import make_model_dir

    from whisfusion_cli.loading import Pipeline
    from whisfusion_cli.transcribe import TranscribeOptions, transcribe

    model_dir = make_model_dir(tmp_path)
    pipe = Pipeline.load(TranscribeOptions(model=str(model_dir), device="cpu", int8=True))
    assert type(pipe.model.decoder.lm_head).__module__.startswith("torch.ao.nn.quantized")
    assert any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in pipe.model.encoder.encoder.modules())
    clip = data_dir / "audio" / "goforward.flac"
    (result,) = transcribe([clip], TranscribeOptions(decoding={"seed": 0}), model=pipe)
    float_pipe = Pipeline.load(TranscribeOptions(model=str(model_dir), device="cpu"))
    (reference,) = transcribe([clip], TranscribeOptions(decoding={"seed": 0}), model=float_pipe)
    assert result.status == "ok" and [(w.start, w.end) for w in result.windows] == [
        (w.start, w.end) for w in reference.windows]
    assert any(s.tokens for s in result.segments)


def _is_quantised(module) -> bool:
    return any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in module.modules())


def test_int8_on_cpu_is_the_models_choice_unless_asked(tmp_path):
    """A model whose config says runtime.int8_on_cpu loads int8 on the CPU when nothing is asked (int8=None),
    float when --no-int8 (False) is asked; a model without the key loads float; the choice is recorded."""
    import json

    from tiny_model import make_model_dir

    from whisfusion_cli.checkpoint import CONFIG_FILE
    from whisfusion_cli.loading import INT8_ON_CPU, Pipeline, load_model
    from whisfusion_cli.transcribe import TranscribeOptions

    model_dir = make_model_dir(tmp_path)
    plain = Pipeline.load(TranscribeOptions(model=str(model_dir), device="cpu"))
    assert plain.model.int8 is False and not _is_quantised(plain.model.decoder)
    assert plain.model.encoder.describe()["int8"] is False
    config = json.loads((model_dir / CONFIG_FILE).read_text())
    (model_dir / CONFIG_FILE).write_text(json.dumps({**config, "runtime": {INT8_ON_CPU: True}}))
    auto = Pipeline.load(TranscribeOptions(model=str(model_dir), device="cpu"))
    assert auto.model.int8 is True and _is_quantised(auto.model.decoder) and _is_quantised(auto.model.encoder.encoder)
    assert auto.model.encoder.describe()["int8"] is True
    forced_off = Pipeline.load(TranscribeOptions(model=str(model_dir), device="cpu", int8=False))
    assert forced_off.model.int8 is False and not _is_quantised(forced_off.model.decoder)
    assert load_model(str(model_dir)).int8 is False  # the library loader quantises only when asked
    with pytest.raises(ValueError, match="CPU only"):  # refused before anything is loaded (no GPU needed)
        load_model(str(model_dir), device="cuda", int8=True)
    # The model's choice is for float32 on the CPU: a bfloat16 load stays bfloat16 rather than failing.
    import torch

    assert load_model(str(model_dir), dtype=torch.bfloat16, int8=None).int8 is False


def test_embedded_default_runs_int8_on_cpu():
    """The shipped model was measured as accurate int8 as float32 (docs/MODEL_CARD.md), so the CPU default is
    int8; the flag is in its config, not in code."""
    from whisfusion_cli.checkpoint import read_model_config
    from whisfusion_cli.loading import DEFAULT_MODEL_DIR, INT8_ON_CPU

    assert read_model_config(DEFAULT_MODEL_DIR)["runtime"][INT8_ON_CPU] is True


def test_window_with_nothing_to_commit_keeps_its_random_stream(whisper, monkeypatch):
    """A window that is ahead of the schedule (its rows committed more than this step asks) skips the step
    alone; batched with one that is not, it must neither be projected nor draw noise, and it leaves the
    forward pass of that step."""
    from whisfusion_cli.decoding import Batch, _confidence_unmask
    from whisfusion_cli.forward import SharedForward

    dec, conds, prefix, _ = whisper
    calls = _count_batches(dec, monkeypatch)
    options = DecodingOptions(candidates=K, steps=6, strategy="confidence", temperature=1.0)
    L, P = 20, len(prefix)
    behind = torch.full((K, L), dec.config.mask_token_id)
    behind[:, :P] = torch.tensor(prefix)
    ahead = behind.clone()
    ahead[:, P : P + 7] = 5  # 7 of 18 committed: nothing to do at steps 0 and 1 (targets 3 and 6)
    cond = torch.stack([conds[0], conds[1]])
    batch = Batch(dec, SharedForward(dec, dec.precompute_cross_kv(cond), K), K, P, None)
    batched, _ = _confidence_unmask(batch, torch.cat([ahead, behind]), options,
                                    [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)])
    # Steps 0 and 1: the window behind alone (its K rows equal: one shared row); later both windows.
    assert [rows for rows, _, _ in calls[:2]] == [1, 1] and max(rows for rows, _, _ in calls) == 2 * K
    for w, (canvas, seed) in enumerate(((ahead, 1), (behind, 2))):
        lone = Batch(dec, SharedForward(dec, dec.precompute_cross_kv(cond[w : w + 1]), K), K, P, None)
        alone, _ = _confidence_unmask(lone, canvas, options, [torch.Generator().manual_seed(seed)])
        assert torch.equal(batched[w * K : (w + 1) * K], alone), f"window {w}"


@pytest.mark.parametrize("family", ["smdm", "whisper"])
def test_shortlist_projects_the_whole_vocabulary_once_per_window(family, request, monkeypatch):
    dec, conds, prefix, pad = request.getfixturevalue(family)
    options = _options("shortlist")
    full_projections = []
    inner = dec.project
    monkeypatch.setattr(dec, "project", lambda h: full_projections.append(h.shape) or inner(h))
    durations = [d for _, d in WINDOWS]
    results = decode_windows(dec, conds, options, prefix, pad, durations)
    # Step 0 only (later steps and both refine passes score the shortlist), shared by the K rows, and the
    # step-0 rows of the whole batch in one product.
    step0_rows = sum(options.canvas_length(d, len(prefix)) - len(prefix) for d in durations)
    assert full_projections == [(step0_rows, dec.config.n_embd)]
    monkeypatch.setattr("whisfusion_cli.forward.MAX_PROJECTION_ROWS", 40)  # then in chunks of whole windows
    full_projections.clear()
    chunked = decode_windows(dec, conds, options, prefix, pad, durations)
    assert len(full_projections) > 1 and sum(n for n, _ in full_projections) == step0_rows
    for a, b in zip(results, chunked):
        assert torch.equal(a.tokens, b.tokens)
    vocab = set(range(dec.config.n_logits))
    assert all(set(r.tokens[:, len(prefix):].flatten().tolist()) <= vocab for r in results)


def test_shortlist_as_large_as_the_vocabulary_is_exact(whisper):
    dec, conds, prefix, pad = whisper
    options = _options("refine")
    durations = [d for _, d in WINDOWS]
    exact = decode_windows(dec, conds, options, prefix, pad, durations)
    whole = decode_windows(dec, conds, dataclasses.replace(options, shortlist=dec.config.n_logits), prefix, pad,
                           durations)
    for a, b in zip(exact, whole):
        assert torch.equal(a.tokens, b.tokens) and a.selected == b.selected
        torch.testing.assert_close(a.confidences, b.confidences, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["smdm", "whisper"])
def test_output_rows_are_the_projection_rows(family, request):
    dec = request.getfixturevalue(family)[0]
    ids = torch.tensor([0, 3, dec.config.n_logits - 1])
    h = torch.randn(5, dec.config.n_embd)
    torch.testing.assert_close(h @ dec.output_rows(ids).T, dec.project(h)[:, ids])
    q = quantize_decoder(dec)  # an int8 head still gives its float rows (dequantised for SMDM's Linear)
    assert q.output_rows(ids).dtype == torch.float32
    torch.testing.assert_close(q.output_rows(ids), dec.output_rows(ids), atol=0.05, rtol=0.05)


def test_shortlist_keeps_the_decoder_dtype(whisper):
    """The shortlist's rows are in the decoder's dtype, so a bf16 decoder (the GPU default) decodes with it."""
    import copy

    dec, conds, prefix, pad = whisper
    half = copy.deepcopy(dec).to(torch.bfloat16)
    options = dataclasses.replace(_options("shortlist"), candidates=1)
    (result,) = decode_windows(half, [conds[0].to(torch.bfloat16)], options, prefix, pad, [4.0])
    assert (result.tokens != half.config.mask_token_id).all()
    assert half.output_rows(torch.tensor([1, 2])).dtype == torch.bfloat16


def test_shortlist_options_are_checked(whisper):
    with pytest.raises(ValueError, match="shortlist"):
        DecodingOptions(shortlist=-1)
    with pytest.raises(ValueError, match="confidence strategy"):
        DecodingOptions(shortlist=8, strategy="remask")
    dec, conds, prefix, pad = whisper
    for extra in ({"shortlist": 8}, {"pad_context": 2}):
        with pytest.raises(ValueError, match="shared forward"):  # upstream's forward scores everything
            decode_traced(dec, conds[0], _options("confidence", **extra), Trace(reference=True), prefix, pad, 4.0)


@pytest.mark.parametrize("family", ["smdm", "whisper"])
def test_padded_rows_with_key_masks_match_the_unpadded_rows(family, request):
    """The trunk on a batch of windows of different lengths: canvases padded to the longest, encoder states
    padded to the most frames, and the key masks keep every real position's hidden state what it is alone."""
    dec, conds, prefix, _ = request.getfixturevalue(family)
    mask_id = dec.config.mask_token_id
    short = torch.tensor([prefix + [5, mask_id, 7, mask_id, 9]])
    long = torch.tensor([prefix + [mask_id, 11, 12, mask_id, 13, 14, 15, mask_id, 16]])
    cond_short, cond_long = conds[2][:150], conds[0][:200]
    with torch.no_grad():
        alone = [dec.hidden_states(x, cross_kv=dec.precompute_cross_kv(c[None]))[0]
                 for x, c in ((short, cond_short), (long, cond_long))]
        idx = torch.cat([torch.nn.functional.pad(short, (0, long.size(1) - short.size(1)), value=0), long])
        cond = torch.stack([torch.nn.functional.pad(cond_short, (0, 0, 0, 50)), cond_long])
        padded = dec.hidden_states(idx, cross_kv=dec.precompute_cross_kv(cond), lengths=torch.tensor([short.size(1),
                                   long.size(1)]), frames=torch.tensor([150, 200]))
        unmasked = dec.hidden_states(idx, cross_kv=dec.precompute_cross_kv(cond))
    torch.testing.assert_close(padded[0, : short.size(1)], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded[1], alone[1], atol=1e-5, rtol=1e-5)
    # Without the masks the padding leaks into the short window (so the check above is not vacuous).
    assert not torch.allclose(unmasked[0, : short.size(1)], alone[0], atol=1e-3)


def _ends_early(dec, pad, widths):
    """A copy of a Whisper-family decoder that predicts end-of-text (confidently) from canvas position 8 on,
    so a transcript's end is predicted at step 0, as a trained model's is; widths records the columns of
    every trunk call."""
    import copy

    dec = copy.deepcopy(dec)
    with torch.no_grad():  # only the end-of-text row reads hidden dimension 0
        dec.embed_tokens.weight[:, 0] = 0.0
        dec.embed_tokens.weight[pad] = 0.0
        dec.embed_tokens.weight[pad, 0] = 10.0
    inner = dec.hidden_states

    def hidden_states(idx, **kw):
        widths.append(idx.size(1))
        h = inner(idx, **kw).clone()
        h[:, 8:] = 0.0
        h[:, 8:, 0] = 10.0
        return h

    dec.hidden_states = hidden_states
    return dec


def test_pad_context_runs_on_the_transcript_and_what_follows_its_end(whisper):
    dec, conds, prefix, pad = whisper
    options = dataclasses.replace(_options("refine"), candidates=1, temperature=0.0, max_seq_len=48)
    durations = [9.0, 9.0, 4.0]
    exact = decode_windows(dec, conds[:3], options, prefix, pad, durations)
    # pad_context as long as the canvas: nothing is cut, the decoding is the exact one.
    whole = decode_windows(dec, conds[:3], dataclasses.replace(options, pad_context=48), prefix, pad, durations)
    for a, b in zip(exact, whole):
        assert torch.equal(a.tokens, b.tokens)
    # A transcript whose end is predicted at step 0 (position 8): the end-of-text predictions from 8 + 2 on are
    # committed, and the steps after run on 2 positions past the committed end: 12 columns, then 10 once
    # positions 8 and 9 are committed end-of-text too.
    widths = []
    early = _ends_early(dec, pad, widths)
    cut = decode_windows(early, conds[:3], dataclasses.replace(options, pad_context=2), prefix, pad, durations)
    canvas = options.canvas_length(9.0, len(prefix))
    assert widths[0] == canvas and set(widths[1:]) <= {12, 10} and widths[-1] == 10, widths
    for r, d in zip(cut, durations):
        assert r.tokens.shape == (1, options.canvas_length(d, len(prefix)))
        assert (r.tokens[0, 8:] == pad).all() and (r.tokens != early.config.mask_token_id).all()
    # Without pad_context the same decoder runs every step on the whole canvas.
    widths.clear()
    decode_windows(early, conds[:3], options, prefix, pad, durations)
    assert set(widths) == {canvas}


def test_pad_context_is_checked():
    with pytest.raises(ValueError, match="pad_context"):
        DecodingOptions(strategy="confidence", pad_context=-1)
    with pytest.raises(ValueError, match="pad_context"):
        DecodingOptions(strategy="remask", pad_context=2)


@pytest.mark.parametrize("family", ["smdm", "whisper"])
def test_int8_shortlist_never_multiplies_by_the_whole_float_table(family, request, monkeypatch):
    dec, conds, prefix, pad = request.getfixturevalue(family)
    h = torch.randn(7, dec.config.n_embd)
    coarse = dec.coarse_project(h)
    assert coarse.shape == dec.project(h).shape
    assert torch.corrcoef(torch.stack([coarse.flatten(), dec.project(h).flatten()]))[0, 1] > 0.99
    assert not any("coarse" in k for k in dec.state_dict())  # a cache, not part of the model
    options = dataclasses.replace(_options("shortlist"), shortlist_int8=True)
    full, coarse_rows = [], []
    inner_full, inner_coarse = dec.project, dec.coarse_project
    monkeypatch.setattr(dec, "project", lambda x: full.append(x.shape) or inner_full(x))
    monkeypatch.setattr(dec, "coarse_project", lambda x: coarse_rows.append(x.size(0)) or inner_coarse(x))
    durations = [d for _, d in WINDOWS]
    results = decode_windows(dec, conds, options, prefix, pad, durations)
    assert not full and coarse_rows == [sum(options.canvas_length(d, len(prefix)) - len(prefix) for d in durations)]
    vocab = set(range(dec.config.n_logits))
    assert all(set(r.tokens[:, len(prefix):].flatten().tolist()) <= vocab for r in results)
    with pytest.raises(ValueError, match="shortlist_int8"):
        DecodingOptions(strategy="confidence", shortlist_int8=True)


def test_int8_shortlist_follows_new_weights(whisper):
    import copy

    dec = copy.deepcopy(whisper[0])
    h = torch.randn(3, dec.config.n_embd)
    before = dec.coarse_project(h)
    with torch.no_grad():
        dec.embed_tokens.weight.mul_(2.0)
    torch.testing.assert_close(dec.coarse_project(h), 2 * before, atol=0.05 * before.abs().max().item(), rtol=0.05)


@pytest.mark.parametrize("family", ["smdm", "whisper"])
def test_exact_mode_projects_in_bounded_chunks_with_the_same_result(family, request, monkeypatch):
    # The upstream loop's last step scores every position of every candidate; the logits of K x 256 positions
    # onto the vocabulary must never exist at once (0.5-0.8 GB at K = 15), and chunking changes no value.
    dec, conds, prefix, pad = request.getfixturevalue(family)
    options = dataclasses.replace(_options("remask"), seq_len=40)
    whole = parallel_diffusion_decode(dec, conds[0], options, prefix, pad)
    rows_per_call = []
    inner = dec.project
    monkeypatch.setattr(dec, "project", lambda h: rows_per_call.append(h.size(0)) or inner(h))
    monkeypatch.setattr("whisfusion_cli.forward.MAX_PROJECTION_ROWS", 16)
    chunked = parallel_diffusion_decode(dec, conds[0], options, prefix, pad)
    assert max(rows_per_call) == 16 and sum(rows_per_call) > K * 40  # the last step alone projects K x 40 rows
    _same(whole, chunked, atol=1e-6)
    ref = decode_traced(dec, conds[0], options, Trace(reference=True), prefix, pad)
    _same(chunked, ref, atol=1e-5)


def test_a_batch_out_of_device_memory_is_decoded_in_halves(whisper, monkeypatch):
    """A batch the GPU cannot hold is retried in halves: every window is decoded, to the tokens it gets in
    batches of the size that fits, and a window alone that does not fit is a one-line error."""
    from whisfusion_cli import decoding
    from whisfusion_cli.distributed import DeviceMemoryError

    dec, conds, prefix, pad = whisper
    options = _options("confidence")
    durations = [s for _, s in WINDOWS]
    fits = decode_windows(dec, conds, options, prefix, pad, durations, max_batch_windows=2)
    inner, tried = decoding._decode_batch, []

    def small_gpu(decoder, forward, W, *args, **kwargs):
        tried.append(W)
        if W > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.50 GiB")
        return inner(decoder, forward, W, *args, **kwargs)

    monkeypatch.setattr(decoding, "_decode_batch", small_gpu)
    halved = decode_windows(dec, conds, options, prefix, pad, durations, max_batch_windows=6)
    assert tried == [6, 3, 2, 1, 3, 2, 1]
    assert len(halved) == len(conds)
    for a, b in zip(fits, halved):
        _same(a, b)
    monkeypatch.setattr(decoding, "_decode_batch", lambda *a, **k: small_gpu(dec, None, 9))
    with pytest.raises(DeviceMemoryError, match="single window"):
        decode_windows(dec, conds[:2], options, prefix, pad, durations[:2], max_batch_windows=2)


def test_encoder_batch_is_the_decoder_batch(tmp_path, monkeypatch):
    """--batch-size sets the windows per encoder call too (Pipeline.load passes it to the encoder)."""
    import numpy as np
    from tiny_model import make_model_dir

    from whisfusion_cli.loading import Pipeline
    from whisfusion_cli.transcribe import TranscribeOptions

    pipe = Pipeline.load(TranscribeOptions(model=str(make_model_dir(tmp_path)), device="cpu", batch_size=3))
    encoder = pipe.model.encoder
    assert encoder.options.batch_size == 3
    sizes = []
    real = type(encoder.encoder).forward
    monkeypatch.setattr(type(encoder.encoder), "forward", lambda self, x, *a, **k: (sizes.append(x.size(0)),
                                                                                    real(self, x, *a, **k))[1])
    clips = [np.zeros(16000 * s, dtype=np.float32) for s in (1, 2, 1, 3, 2, 1, 1)]
    assert len(pipe.encode(clips)) == len(clips)
    assert sum(sizes) == len(clips) and max(sizes) == 3


def test_shortlist_int8_on_a_gpu_is_refused_or_recorded_off(tmp_path, monkeypatch):
    """The int8 shortlist head runs on the CPU only: asked for on a GPU, it is refused; a model's default of
    it is turned off there, with a one-line notice, and the run records it off (CUDA mocked)."""
    import dataclasses
    import re

    from tiny_model import make_model_dir

    from whisfusion_cli.loading import SHORTLIST_INT8_OFF, Pipeline, load_model

    model = load_model(str(make_model_dir(tmp_path)))
    monkeypatch.setattr(type(model.decoder), "device", property(lambda self: torch.device("cuda")))
    with pytest.raises(ValueError, match="CPU only"):
        Pipeline(model, {"strategy": "confidence", "shortlist": 8, "shortlist_int8": True})
    model.decoding = dataclasses.replace(model.decoding, strategy="confidence", shortlist=8, shortlist_int8=True)
    with pytest.warns(UserWarning, match=re.escape(SHORTLIST_INT8_OFF)) as notices:
        pipe = Pipeline(model)
    assert len(notices) == 1 and "\n" not in str(notices[0].message)
    assert pipe.decoding.shortlist_int8 is False and pipe.decoding.to_dict()["shortlist_int8"] is False
    monkeypatch.undo()
    assert Pipeline(model).decoding.shortlist_int8 is True  # on the CPU the model's choice holds
