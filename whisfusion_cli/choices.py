"""The names an option may take, defined once for the CLI, the Python API and bench.

Imports nothing, so `whisfusion --help` and shell completion can use these without loading torch; the
modules that act on an option (decoding, encoder, train, data, transcribe, writers) import their list
from here and validate against it.
"""

# transcribe / bench
DEVICES = ("auto", "cpu", "cuda")  # or "cuda:N"
DTYPES = ("auto", "float32", "bfloat16", "float16")
# auto: numpy where it runs what is asked (the CPU, float32, Whisper-family decoders), torch elsewhere
ENGINES = ("auto", "numpy", "torch")
OUTPUT_FORMATS = ("txt", "vtt", "srt", "tsv", "json")
ALL_FORMATS = "all"
# decoding
SELECTIONS = ("confidence", "mbr", "rover")
STRATEGIES = ("remask", "confidence")
# encoder
ENCODER_MODES = ("full", "pad_trim", "short")
ENCODER_BACKENDS = ("torch", "ctranslate2", "auto")
# preprocess / train
STORE_DTYPES = ("float16", "bfloat16", "float32")
TRAIN_STAGES = ("1", "2", "scratch")
TRAIN_PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# segments (timing.split_words): the longest, a subtitle cue's, by convention. Named here, not in timing.py,
# which imports numpy: it is the default that `whisfusion transcribe --help` shows.
MAX_SEGMENT_SECONDS = 7.0
