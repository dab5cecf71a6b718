"""Decoding settings against WER, with the encoder run once: a model directory, a manifest of real speech
and (optionally) preprocessed shards of a held-out synthetic set. Each row of the table is one
DecodingOptions variant; WER is corpus WER after the Whisper English normaliser (bench.corpus_error_rates).
A variant may also name the decoder: `int8=1` (model.quantize_decoder: Linear layers and the output
projection int8) or `int8=trunk` (the output projection left float); the encoder states stay float.

    python scripts/sweep_decoding.py RUN/model --real tests/data/audio/realspeech.jsonl --shards SHARDS \\
        --variant steps=8 --variant steps=16,repeat_penalty=0.5 --variant candidates=4,temperature=0.5,selection=rover
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from whisfusion_cli.bench import corpus_error_rates
from whisfusion_cli.loading import load_model
from whisfusion_cli.data import ShardDataset, read_dataset
from whisfusion_cli.decoding import decode_windows, words_from_tokens
from whisfusion_cli.model import quantize_decoder

INT8_DECODERS = {0: None, 1: {"head": True}, "trunk": {"head": False}}


def parse_variant(text: str) -> dict:
    out = {}
    for part in filter(None, text.split(",")):
        key, value = part.split("=")
        if key == "schedule":
            out[key] = tuple(float(v) for v in value.split("/"))
        elif value in ("none", "None", "auto"):
            out[key] = None
        else:
            try:
                out[key] = int(value)
            except ValueError:
                try:
                    out[key] = float(value)
                except ValueError:
                    out[key] = value
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--real", help="manifest of real speech (JSONL)")
    ap.add_argument("--shards", help="preprocessed held-out shards (same encoder as the model)")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--variant", action="append", default=[])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = load_model(args.model)
    tok = model.tokenizer
    sets = {}
    if args.real:
        from whisfusion_cli.audio import load_audio

        items = read_dataset(args.real)[: args.limit]
        audio = [load_audio(it.audio) for it in items]
        sets["real"] = (model.encoder.encode(audio), [len(a) / 16000 for a in audio], [it.text for it in items])
    if args.shards:
        ds = ShardDataset(args.shards)
        n = min(len(ds.items), args.limit or len(ds.items))
        sets["synth"] = ([ds.states(i).float() for i in range(n)], [ds.items[i].duration for i in range(n)],
                         [ds.items[i].text for i in range(n)])
    to_words = words_from_tokens(tok)
    rows = []
    for variant in args.variant or [""]:
        fields = parse_variant(variant)
        int8 = INT8_DECODERS[fields.pop("int8", 0)]
        decoder = model.decoder if int8 is None else quantize_decoder(model.decoder, **int8)
        options = dataclasses.replace(model.decoding, **fields)
        row = {"variant": variant or "model defaults"}
        for name, (conds, durs, refs) in sets.items():
            t0 = time.perf_counter()
            results = decode_windows(decoder, conds, options, tok.prefix_ids, tok.pad_id, durs,
                                     to_words=to_words if options.selection != "confidence" else None)
            row[f"{name}_decode_s"] = time.perf_counter() - t0
            hyps = [tok.decode(r.text_tokens) for r in results]
            row[f"{name}_wer"] = corpus_error_rates(refs, hyps)["wer"]
            row[f"{name}_example"] = hyps[0]
            row[f"{name}_hypotheses"] = hyps
        rows.append(row)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                          if not k.endswith("_hypotheses")}), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
