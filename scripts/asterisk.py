"""Real speech for training and reporting: Debian's Asterisk voice prompts, fetched and split.

548 prompts spoken by one professional US English voice (Allison Smith), CC-BY-SA-3.0, from Debian's
`asterisk-core-sounds-en-g722` (G.722 audio, 16 kHz) with the text of `asterisk-core-sounds-en`. The
cleaned transcripts and the split of every prompt live in `scripts/data/asterisk.jsonl`, chosen once
(by the SHA-1 of the prompt's name, among the 166 whole sentences):

  report   66 sentences (406 s): numbers are reported here, nothing is chosen on them
  tune     20 sentences: checkpoints and decoding defaults may be chosen here
  train    the other 80 sentences and the 382 words, phrases and fragments
  unscored 3 prompts whose text writes `*` or `#` without saying how it is spoken

    python scripts/asterisk.py OUT            # apt-get download + dpkg -x + ffmpeg (no root needed)
    python scripts/asterisk.py OUT --from DIR # wavs already decoded (NAME.16k.wav in DIR)

writes OUT/wav/NAME.wav (16 kHz mono) and OUT/{train,tune,report}.jsonl, manifests that
`whisfusion preprocess` and `whisfusion bench` read.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

MANIFEST = Path(__file__).parent / "data" / "asterisk.jsonl"
AUDIO_PACKAGE = "asterisk-core-sounds-en-g722"
SOUNDS_DIR = "usr/share/asterisk/sounds/en_US_f_Allison"
SPLITS = ("train", "tune", "report")
LICENSE = "CC-BY-SA-3.0 (recorded by Allison Smith; Debian asterisk-core-sounds-en-g722 1.6.1-1)"


def _ffmpeg() -> str:
    found = shutil.which("ffmpeg")
    if found:
        return found
    try:
        import imageio_ffmpeg
    except ImportError:
        sys.exit("error: ffmpeg is needed to decode G.722 (apt-get install ffmpeg, or pip install imageio-ffmpeg)")
    return imageio_ffmpeg.get_ffmpeg_exe()


def fetch_package(work: Path) -> Path:
    """Download and unpack the audio package (no root: apt-get download + dpkg -x); its sounds folder."""
    work.mkdir(parents=True, exist_ok=True)
    subprocess.run(["apt-get", "download", AUDIO_PACKAGE], cwd=work, check=True, capture_output=True)
    deb = next(work.glob(f"{AUDIO_PACKAGE}_*.deb"))
    subprocess.run(["dpkg", "-x", str(deb), str(work / "root")], check=True)
    return work / "root" / SOUNDS_DIR


def decode(source: Path, wav: Path, ffmpeg: str) -> None:
    tmp = wav.with_suffix(".part.wav")
    subprocess.run([ffmpeg, "-nostdin", "-loglevel", "error", "-y", "-i", str(source), "-ar", "16000", "-ac", "1",
                    "-c:a", "pcm_s16le", str(tmp)], check=True)
    tmp.replace(wav)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--from", dest="source", type=Path, help="folder of decoded NAME.16k.wav files")
    args = parser.parse_args(argv)
    prompts = [json.loads(line) for line in MANIFEST.read_text().splitlines()]
    wav_dir = args.out / "wav"
    wav_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        sounds = None if args.source else fetch_package(Path(tmp))
        ffmpeg = None if args.source else _ffmpeg()
        for p in prompts:
            wav = wav_dir / f"{p['id']}.wav"
            if wav.exists():
                continue
            if args.source:
                shutil.copyfile(args.source / f"{p['id']}.16k.wav", wav)
            else:  # NAME "dir__file" is sounds/dir/file.g722
                decode(sounds / (p["id"].replace("__", "/") + ".g722"), wav, ffmpeg)
    for split in SPLITS:
        rows = [{"id": p["id"], "audio": f"wav/{p['id']}.wav", "text": p["text"], "duration": p["duration_s"],
                 "license": LICENSE} for p in prompts if p["split"] == split]
        (args.out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"{args.out / f'{split}.jsonl'}: {len(rows)} prompts, {sum(r['duration'] for r in rows):.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
