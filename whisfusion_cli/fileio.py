"""Atomic file output: readers see the old file or the whole new one, never a part.

Every module that writes a file the user keeps (transcripts, run records, model directories, shards,
checkpoints, corpus audio, bench tables and plots) goes through here. Standard library only, so the CLI
and the torch-free paths can use it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from pathlib import Path
from typing import Iterator, Union


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _file_mode() -> int:
    """Ordinary permissions for a published file (its temporary is created 0600)."""
    return 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_path(path, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block ends without an error, move it into place.

    Use it for writers that take a file name (`torch.save`, `safetensors.save_file`, `soundfile.write`,
    `Figure.savefig`): `with atomic_path(out) as tmp: save(tmp)`. With `is_dir`, a temporary directory
    replaces `path` as a whole (a directory already there is left as it is: another writer won the race
    with an equally good copy). On any error, KeyboardInterrupt included, the temporary is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The name is chosen before the `try` and the temporary made inside it: a Ctrl-C that lands while it is
    # made (tempfile.mkstemp creates the file before it returns the name) still finds and removes it.
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    try:
        try:
            if is_dir:
                os.mkdir(tmp, 0o777)  # the umask applies
            else:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            tmp = None  # another writer's: not ours to remove
            raise
        yield tmp
        if is_dir:
            try:
                os.replace(tmp, path)
            except OSError:
                if not path.is_dir():
                    raise
        else:
            os.chmod(tmp, _file_mode())
            os.replace(tmp, path)
    finally:
        if tmp is not None and tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp is not None and tmp.exists():
            tmp.unlink()


def write_atomic(path, data: Union[str, bytes]) -> Path:
    """Write `data` (str as UTF-8, bytes as they are) to `path` atomically, fsync'ed; return the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
    return path
