#!/usr/bin/env bash
# The default model against the previous release and Whisper tiny.en, every system in one `whisfusion bench`
# run per test set, same threads (docs/MODEL_CARD.md, results/default_model/); the new model also without
# verification (its diffusion draft alone).
#   bash scripts/bench_default_model.sh NEW_MODEL_DIR OLD_MODEL_DIR [WORK]
# Test sets (none of them chose anything for the model they report on):
#   asterisk_report  66 Asterisk sentences held out from training and tuning (scripts/asterisk.py WORK/asterisk)
#   realspeech       13 clips of other speakers, tests/data/audio (they chose 0.1.0's decoding defaults)
#   synth_heldout    150 clips of the held-out synthetic voices (python scripts/corpus.py --split test)
#   held_out_words   34 isolated words of KLettres' voices (scripts/held_out_words.py WORK/held_out_words)
#   qabcs_words     147 isolated words of qABCs' voice (scripts/held_out_words.py WORK/qabcs_words --source qabcs)
# RUN="asterisk_report ..." runs only those sets.
# RTFx counts audio / transcription wall time; model_load_s is reported beside it and added in the card.
set -euo pipefail
NEW=${1:?new model dir}; OLD=${2:?old model dir}; W=${3:-work_data}
OUT=${OUT:-results/default_model}
[ -f "$W/asterisk/report.jsonl" ] || python scripts/asterisk.py "$W/asterisk"
[ -f "$W/held_out_words/report.jsonl" ] || python scripts/held_out_words.py "$W/held_out_words"
[ -f "$W/qabcs_words/report.jsonl" ] || python scripts/held_out_words.py "$W/qabcs_words" --source qabcs
declare -A SETS=([asterisk_report]="$W/asterisk/report.jsonl" [realspeech]="tests/data/audio/realspeech.jsonl"
                 [synth_heldout]="$W/corpus/test_synth/manifest.jsonl" [held_out_words]="$W/held_out_words/report.jsonl"
                 [qabcs_words]="$W/qabcs_words/report.jsonl")
for name in ${RUN:-asterisk_report realspeech synth_heldout held_out_words qabcs_words}; do
  whisfusion bench "${SETS[$name]}" -o "$OUT/bench_$name" --threads 2 --no-plots --fresh \
    -s "whisfusion:model=$NEW,label=whisfusion-new" -s "whisfusion:model=$NEW,verify=0,label=whisfusion-new-draft" \
    -s "whisfusion:model=$OLD,label=whisfusion-0.1.0" \
    -s "faster-whisper:tiny.en,compute_type=int8" -s "whisper:tiny.en"
done
