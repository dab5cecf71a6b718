"""How short windows should be reread (verify.Verifier.reread): WER of each margin and padded length, on tune sets.

Each window of at most --short seconds is decoded and checked once; its read is made once per padded length
(--context, seconds; 0: verify.read_context, the default's), and both texts are scored by the verifier there.
Every margin (--margins, nats: the read replaces the checked text where it is that much likelier) is then
applied to the recorded windows, so the sweep costs one transcription per padded length. Also printed: the
checked text alone ("checked") and the read alone ("read"). Use tune sets only: what this chooses must not be
reported on the sets it was chosen on.

    python scripts/sweep_reread.py work_data/asterisk/tune.jsonl work_data/other_voices/tune.jsonl \\
        work_data/corpus/tune_synth/manifest.jsonl work_data/other_voices/tuxpaint.jsonl --context 5 10 30
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

DEFAULT_MARGINS = [0.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 6.0, 8.0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("manifests", nargs="+", type=Path, help="JSONL manifests (id, audio, text)")
    parser.add_argument("--context", nargs="+", type=float, default=[0.0], help="padded lengths, s (0: the default's)")
    parser.add_argument("--margins", nargs="+", type=float, default=DEFAULT_MARGINS)
    parser.add_argument("--short", type=float, default=2.0, help="windows at most this long are reread")
    parser.add_argument("--mean-of", type=int, default=3, help="the mean is over the first N manifests")
    parser.add_argument("-o", "--output", type=Path, help="write the table as JSON here")
    args = parser.parse_args()

    from whisfusion_cli.audio import SAMPLE_RATE
    from whisfusion_cli.bench.metrics import corpus_error_rates
    from whisfusion_cli.loading import Pipeline, _as_array
    from whisfusion_cli.transcribe import TranscribeOptions, transcribe
    from whisfusion_cli.verify import read_context

    options = TranscribeOptions(decoding={"verify_short": 0.0})  # windows are reread here, not by the pipeline
    pipeline = Pipeline.load(options)
    verifier, encoder, tokenizer = pipeline.verifier, pipeline.model.encoder, pipeline.model.tokenizer
    sets = {m: [json.loads(line) for line in m.read_text().splitlines() if line.strip()] for m in args.manifests}
    table = {}
    for context in args.context:
        windows_of = {}  # manifest -> per clip, its windows in order: a text, or (checked, read, gap in nats)
        seconds = {"encode": 0.0}
        for manifest, rows in sets.items():
            recorded: dict[int, object] = {}

            def verify(results, states, clips, durations):
                for r, s, clip, duration in zip(results, states, clips, durations):
                    checked = verifier.verify(r.text_tokens, _as_array(s), r.token_confidences or None)
                    recorded[id(r)] = tokenizer.decode(checked.tokens)
                    if clip is None or duration is None or duration > args.short:
                        continue
                    t0 = time.perf_counter()
                    pad = context or read_context(len(clip) / SAMPLE_RATE)
                    padded = np.asarray(encoder.encode_padded([clip], pad)[0], np.float32)
                    seconds["encode"] += time.perf_counter() - t0
                    read, gap = verifier.read_gap(checked, r.text_tokens, padded, r.token_confidences or None)
                    if read is None:  # the read said no word: the checked text stands (as reread)
                        continue
                    recorded[id(r)] = (recorded[id(r)], tokenizer.decode(read.tokens), gap)

            clip_windows = []
            decode = Pipeline.decode

            def decode_recorded(self, *a, **k):
                results = decode(self, *a, **k)
                clip_windows[-1].extend(recorded[id(r)] for r in results)
                return results

            pipeline._verify = verify
            Pipeline.decode = decode_recorded
            try:
                for row in rows:
                    clip_windows.append([])
                    list(transcribe([manifest.parent / row["audio"]], options, model=pipeline))
            finally:
                Pipeline.decode = decode
            windows_of[manifest] = clip_windows

        def wer(manifest, choose):
            hyps = [" ".join(w if isinstance(w, str) else choose(*w) for w in clip) for clip in windows_of[manifest]]
            return 100 * corpus_error_rates([row["text"] for row in sets[manifest]], hyps)["wer"]

        rules = {"checked": lambda c, r, gap: c, "read": lambda c, r, gap: r}
        rules.update({f"margin {m:g}": (lambda m: lambda c, r, gap: r if gap > m else c)(m) for m in args.margins})
        reread = sum(1 for clips in windows_of.values() for clip in clips for w in clip if not isinstance(w, str))
        print(f"padded to {context or 'read_context'} s: {reread} windows read, encoder {seconds['encode']:.1f} s")
        print("rule".ljust(12) + "".join(f"{m.parent.name}/{m.stem}"[-22:].rjust(24) for m in sets)
              + f"  mean of {args.mean_of}")
        for name, choose in rules.items():
            wers = [wer(m, choose) for m in sets]
            mean = float(np.mean(wers[: args.mean_of]))
            table.setdefault(str(context), {"encoder_s": seconds["encode"], "windows_read": reread})[name] = \
                {"wer": wers, "mean": mean}
            print(name.ljust(12) + "".join(f"{w:24.1f}" for w in wers) + f"  {mean:9.1f}")
    if args.output:
        args.output.write_text(json.dumps({"manifests": [str(m) for m in sets], "short": args.short,
                                           "table": table}, indent=1))


if __name__ == "__main__":
    main()
