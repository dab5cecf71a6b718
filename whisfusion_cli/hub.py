"""The released artefacts (SPEC section 1), downloading them with huggingface_hub, and finding them offline.

Two levels of names:
* artefacts — one repository's files: `smdm-base`, `whisfusion-stage2`, `whisfusion-stage1-adapter`, `whisper-small`,
  `tinyllama-tokenizer` (KNOWN_ARTEFACTS);
* models — what `transcribe --model NAME` loads, built from artefacts: `whisfusion` (the stage-2 decoder,
  whisper-small's encoder, the TinyLlama tokenizer) and `whisfusion-stage1` (SMDM base + stage-1 adapter).

Files go into the Hugging Face cache (HF_HOME / HF_HUB_CACHE are honoured) or `--local-dir`. The first use of
a model turns the upstream files into one of our model directories (config.json + model.safetensors +
tokenizer.json; checkpoint.save_model_dir) next to the cache, because upstream ships a pickle and no config.
With HF_HUB_OFFLINE=1 nothing touches the network; a file that is not cached is one line of error that says
what is missing and how to point the tool at local files.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from . import first_line

TRUE_VALUES = {"1", "true", "yes", "on"}
ASSEMBLED_SUBDIR = "whisfusion"  # under HF_HOME (or --local-dir): our model directories built from artefacts
STAMP_KEY = "assembled_from"
PROBE_TIMEOUT_S = 5.0  # connecting to the hub before downloading  # config.json key recording which files a model directory was built from


class HubError(RuntimeError):
    """Downloading or finding a released artefact failed; str() is one line saying what and how to fix it."""


@dataclass(frozen=True)
class Artefact:
    name: str
    repo_id: str
    files: tuple[str, ...]
    role: str  # "decoder" | "adapter" | "base" | "encoder" | "tokenizer"
    description: str
    approx_size: str
    revision: str = "main"

    @property
    def single_file(self) -> bool:
        return len(self.files) == 1


@dataclass(frozen=True)
class ModelSpec:
    """A transcription model assembled from artefacts."""

    name: str
    description: str
    decoder: str  # artefact with the decoder weights
    encoder: str  # artefact with the Whisper encoder
    tokenizer: str  # artefact with tokenizer.json
    base: str | None = None  # artefact loaded first, `decoder` on top (stage-1 adapter over the SMDM base)
    decoder_config: str | dict = "Diff_LLaMA_170M"  # a model.PRESETS name or a ModelConfig dict
    encoder_mode: str = "full"  # upstream runs the encoder on 30 s windows and keeps all 1500 frames
    tokenizer_config: dict = field(default_factory=dict)  # TokenizerConfig fields; {} is the Llama default
    decoding: dict = field(default_factory=dict)  # DecodingOptions defaults; {} is upstream's loop

    @property
    def artefacts(self) -> tuple[str, ...]:
        return tuple(a for a in (self.base, self.decoder, self.encoder, self.tokenizer) if a)


KNOWN_ARTEFACTS: dict[str, Artefact] = {
    a.name: a
    for a in (
        Artefact("smdm-base", "nieshen/SMDM", ("mdm_safetensors/mdm-170M-100e18-rsl-0.01.safetensors",), "base",
                 "SMDM 170M masked-diffusion LM, the decoder base (no cross-attention)", "0.7 GB"),
        Artefact("whisfusion-stage2", "taeyoun811/whisfusion", ("whisfusion_stage2_decoder.pt",), "decoder",
                 "Whisfusion stage-2 decoder, all 201 tensors incl. the adapter", "1.0 GB"),
        Artefact("whisfusion-stage1-adapter", "taeyoun811/whisfusion", ("whisfusion_stage1_adapter.pt",), "adapter",
                 "Whisfusion stage-1 cross-attention adapter only (72 tensors)", "0.2 GB"),
        Artefact("whisper-small", "openai/whisper-small",
                 ("config.json", "preprocessor_config.json", "model.safetensors"), "encoder",
                 "Whisper small (transformers); its encoder makes the audio states", "1.0 GB"),
        Artefact("tinyllama-tokenizer", "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T",
                 ("tokenizer.json", "tokenizer_config.json"), "tokenizer",
                 "Llama-2 SentencePiece tokenizer, 32000 tokens", "2 MB"),
    )
}

KNOWN_MODELS: dict[str, ModelSpec] = {
    m.name: m
    for m in (
        ModelSpec("whisfusion", "released Whisfusion (stage 2) on whisper-small, upstream decoding defaults",
                  decoder="whisfusion-stage2", encoder="whisper-small", tokenizer="tinyllama-tokenizer"),
        ModelSpec("whisfusion-stage1", "SMDM base + released stage-1 adapter (before stage 2), for comparison",
                  decoder="whisfusion-stage1-adapter", base="smdm-base", encoder="whisper-small",
                  tokenizer="tinyllama-tokenizer"),
    )
}


def known_names() -> list[str]:
    return sorted(KNOWN_MODELS) + sorted(KNOWN_ARTEFACTS)


# --------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class HubSettings:
    endpoint: str
    cache_dir: Path
    hf_home: Path
    offline: bool


def settings() -> HubSettings:
    """Read at call time (huggingface_hub reads its environment once, at import), so HF_HOME, HF_HUB_CACHE,
    HF_ENDPOINT and HF_HUB_OFFLINE set by the caller at any point are honoured."""
    from huggingface_hub import constants

    env = os.environ
    hf_home = Path(os.path.expanduser(env["HF_HOME"])) if env.get("HF_HOME") else Path(constants.HF_HOME)
    if env.get("HF_HUB_CACHE"):
        cache = Path(os.path.expanduser(env["HF_HUB_CACHE"]))
    elif env.get("HF_HOME"):
        cache = hf_home / "hub"
    else:
        cache = Path(constants.HF_HUB_CACHE)
    endpoint = (env.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    if "HF_HUB_OFFLINE" in env or "TRANSFORMERS_OFFLINE" in env:
        offline = (env.get("HF_HUB_OFFLINE") or env.get("TRANSFORMERS_OFFLINE") or "").lower() in TRUE_VALUES
    else:
        offline = bool(constants.HF_HUB_OFFLINE)
    return HubSettings(endpoint, cache, hf_home, offline)


def _lookup(name: str) -> tuple[ModelSpec | None, list[Artefact]]:
    if name in KNOWN_MODELS:
        spec = KNOWN_MODELS[name]
        return spec, [KNOWN_ARTEFACTS[a] for a in spec.artefacts]
    if name in KNOWN_ARTEFACTS:
        return None, [KNOWN_ARTEFACTS[name]]
    raise HubError(f"unknown model {name!r}: known names are {', '.join(known_names())} "
                   f"(or pass a model directory)")


def _hint(s: HubSettings, name: str) -> str:
    return (f"run `whisfusion download {name}` where the hub is reachable (or set HF_ENDPOINT to a mirror), "
            f"copy an existing Hugging Face cache into {s.cache_dir}, or pass --model DIR with a model directory")


# ---------------------------------------------------------------------------------------------- finding


def _cached_file(a: Artefact, filename: str, s: HubSettings, local_dir: Path | None) -> Path | None:
    if local_dir is not None:
        p = local_dir / a.name / filename
        return p if p.is_file() else None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(a.repo_id, filename, cache_dir=str(s.cache_dir), revision=a.revision)
    return Path(found) if isinstance(found, str) and Path(found).is_file() else None


def artefact_files(a: Artefact, s: HubSettings | None = None, local_dir=None) -> dict[str, Path | None]:
    """{filename: local path or None} for one artefact, without network."""
    s = s or settings()
    local = Path(local_dir) if local_dir is not None else None
    return {f: _cached_file(a, f, s, local) for f in a.files}


def _artefact_path(a: Artefact, files: dict[str, Path]) -> Path:
    """The file of a single-file artefact, else the directory holding its files (a snapshot directory)."""
    first = files[a.files[0]]
    if a.single_file:
        return first
    return first.parent if "/" not in a.files[0] else first.parents[a.files[0].count("/")]


def cached_path(name: str, local_dir=None) -> Path:
    """Local path for a registered name, without network: a model name gives a model directory (built on first
    use from the cached artefacts), an artefact name its file (or its snapshot directory).
    Raises HubError naming what is missing and how to get it."""
    s = settings()
    spec, artefacts = _lookup(name)
    found: dict[str, dict[str, Path]] = {}
    missing = []
    for a in artefacts:
        files = artefact_files(a, s, local_dir)
        absent = [f for f, p in files.items() if p is None]
        if absent:
            missing.append(f"{a.name} ({a.repo_id}: {', '.join(absent)})")
        else:
            found[a.name] = files  # type: ignore[assignment]
    if missing:
        where = f"in {local_dir}" if local_dir is not None else f"in the Hugging Face cache {s.cache_dir}"
        raise HubError(f"{name!r} is not downloaded: missing {'; '.join(missing)} {where}; {_hint(s, name)}")
    if spec is None:
        return _artefact_path(artefacts[0], found[artefacts[0].name])
    paths = {a: _artefact_path(KNOWN_ARTEFACTS[a], found[a]) for a in spec.artefacts}
    out = Path(local_dir) if local_dir is not None else s.hf_home / ASSEMBLED_SUBDIR / spec.name
    return assemble_model_dir(spec, paths, out)


# ------------------------------------------------------------------------------------------ downloading


def _fetch(a: Artefact, filename: str, s: HubSettings, local_dir: Path | None, name: str) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    what = f"{a.repo_id}/{filename}"
    kwargs = dict(revision=a.revision, endpoint=s.endpoint, local_files_only=s.offline)
    if local_dir is not None:
        kwargs["local_dir"] = str(local_dir / a.name)
    else:
        kwargs["cache_dir"] = str(s.cache_dir)
    try:
        return Path(hf_hub_download(a.repo_id, filename, **kwargs))
    except LocalEntryNotFoundError as e:  # before EntryNotFoundError: it is a subclass
        if s.offline:
            reason = "offline mode is on (HF_HUB_OFFLINE=1) and the file is not in the cache"
        else:
            cause = e.__cause__ or e.__context__
            detail = f" ({first_line(cause)})" if cause and str(cause) else ""
            reason = f"the hub at {s.endpoint} is unreachable{detail}"
        raise HubError(f"cannot fetch {what}: {reason}; {_hint(s, name)}") from None
    except (GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise HubError(f"cannot fetch {what}: the repository or revision {a.revision!r} is not available at "
                       f"{s.endpoint} ({type(e).__name__}); {_hint(s, name)}") from None
    except EntryNotFoundError:
        raise HubError(f"cannot fetch {what}: no such file in the repository at {s.endpoint}") from None
    except HfHubHTTPError as e:
        raise HubError(f"cannot fetch {what}: {first_line(e)}; {_hint(s, name)}") from None
    except OSError as e:
        raise HubError(f"cannot fetch {what}: {type(e).__name__}: {first_line(e)}") from None


def _unreachable(endpoint: str) -> str | None:
    """Why the endpoint cannot be reached (None if a TCP connection opens), checked in a few seconds.

    huggingface_hub retries a failed request with backoff for about half a minute before giving up; an
    offline user should get the answer at once. Behind a proxy the direct probe means nothing: skipped."""
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return None
    url = urlparse(endpoint)
    if not url.hostname:
        return f"invalid endpoint {endpoint!r}"
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=PROBE_TIMEOUT_S):
            return None
    except OSError as e:
        return e.strerror or type(e).__name__


def download(name: str, local_dir=None) -> Path:
    """Fetch a model's or an artefact's files (into the HF cache, or `local_dir`) and return what
    `cached_path` returns: a model directory for a model name, the file/snapshot directory for an artefact."""
    s = settings()
    spec, artefacts = _lookup(name)
    local = Path(local_dir).expanduser() if local_dir is not None else None
    todo = [(a, f) for a in artefacts for f, p in artefact_files(a, s, local).items() if p is None]
    if todo and not s.offline:
        why = _unreachable(s.endpoint)
        if why:
            a, f = todo[0]
            more = f" and {len(todo) - 1} more file(s)" if len(todo) > 1 else ""
            raise HubError(f"cannot fetch {a.repo_id}/{f}{more}: the hub at {s.endpoint} is unreachable ({why}); "
                           f"{_hint(s, name)}")
    for a in artefacts:
        for filename in a.files:
            # Cached files are checked against the hub too (a new revision is fetched), unless offline.
            _fetch(a, filename, s, local, name)
    return cached_path(name, local_dir=local)


# ------------------------------------------------------------------------------------------- assembling


def _stamp(paths: dict[str, Path]) -> dict:
    """What the model directory was built from: each source file's path, size and mtime."""
    out = {}
    for name, p in sorted(paths.items()):
        files = [p] if p.is_file() else sorted(q for q in p.iterdir() if q.is_file())
        out[name] = [[str(q), q.stat().st_size, int(q.stat().st_mtime)] for q in files]
    return out


def assemble_model_dir(spec: ModelSpec, paths: dict[str, Path], out_dir: Path) -> Path:
    """Build (or reuse) our model directory for `spec` from its artefacts' local paths."""
    out_dir = Path(out_dir)
    stamp = _stamp(paths)
    config_file = out_dir / "config.json"
    if config_file.is_file():
        try:
            if json.loads(config_file.read_text()).get(STAMP_KEY) == stamp:
                return out_dir
        except (OSError, json.JSONDecodeError):
            pass  # rebuilt below
    from .checkpoint import CheckpointError, load_decoder, read_config, save_model_dir

    try:
        decoder = load_decoder(paths[spec.decoder], config=read_config(spec.decoder_config),
                               base=paths[spec.base] if spec.base else None)
    except CheckpointError as e:
        raise HubError(f"{spec.name}: the downloaded decoder cannot be used: {e}") from None
    except Exception as e:  # a garbled download can fail inside the unpickler in many ways
        raise HubError(f"{spec.name}: the downloaded decoder cannot be used: {paths[spec.decoder]}: not a readable "
                       f"checkpoint ({type(e).__name__}: {first_line(e)}); delete it and download again") from None
    cfg = decoder.config
    encoder_spec = {"source": str(paths[spec.encoder]), "mode": spec.encoder_mode,
                    "dim": int(cfg.condition_dim or cfg.n_embd)}
    tok = paths[spec.tokenizer]
    save_model_dir(
        out_dir, decoder, tok if tok.is_file() else tok / "tokenizer.json", spec.tokenizer_config, encoder_spec,
        decoding_defaults=spec.decoding, extra={STAMP_KEY: stamp, "name": spec.name},
    )
    return out_dir


# --------------------------------------------------------------------------------------------- listing


@dataclass(frozen=True)
class ListEntry:
    name: str
    kind: str  # "model" | "artefact"
    source: str  # repo id(s)
    description: str
    status: str  # "present" | "partial" | "missing"
    size_bytes: int  # on disk, of what is present
    approx_size: str


def list_artefacts(local_dir=None) -> list[ListEntry]:
    """Every known model and artefact with what is present locally (no network)."""
    s = settings()
    rows = []
    present: dict[str, tuple[int, int]] = {}  # artefact -> (files present, bytes)
    for a in KNOWN_ARTEFACTS.values():
        files = artefact_files(a, s, local_dir)
        have = [p for p in files.values() if p is not None]
        size = sum(p.stat().st_size for p in have)
        present[a.name] = (len(have), size)
        status = "present" if len(have) == len(a.files) else "partial" if have else "missing"
        rows.append(ListEntry(a.name, "artefact", a.repo_id, a.description, status, size, a.approx_size))
    models = []
    for m in KNOWN_MODELS.values():
        arts = [KNOWN_ARTEFACTS[x] for x in m.artefacts]
        n_have = sum(present[a.name][0] for a in arts)
        n_all = sum(len(a.files) for a in arts)
        status = "present" if n_have == n_all else "partial" if n_have else "missing"
        repos = ", ".join(dict.fromkeys(a.repo_id for a in arts))
        models.append(ListEntry(m.name, "model", repos, m.description, status,
                                sum(present[a.name][1] for a in arts), "+".join(m.artefacts)))
    return models + rows


__all__ = [
    "Artefact", "HubError", "HubSettings", "KNOWN_ARTEFACTS", "KNOWN_MODELS", "ListEntry", "ModelSpec",
    "assemble_model_dir", "cached_path", "download", "known_names", "list_artefacts", "settings",
]
