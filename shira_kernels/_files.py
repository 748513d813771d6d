"""Files shared between processes: written so that a failure never leaves a truncated file
under the final name, and locked so that the lock goes when its holder dies. And the package's
own files: where its native sources are, and a digest of its code."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import tempfile
from pathlib import Path


@contextlib.contextmanager
def locked(lock_path: Path):
    """Hold an exclusive advisory lock (flock) on ``lock_path`` (created if missing) for the
    block: one holder at a time across processes, released by the OS if the holder dies. Where
    the OS has no flock (Windows), no lock."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path``."""
    folder = path.parent
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes the file private (0600); give it the mode an ordinary open would.
        mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def csrc_dir() -> Path:
    """Where the C++/CUDA sources are: inside an installed package, or in the source tree."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "csrc", here.parent / "csrc"):
        if (candidate / "cpu").is_dir():
            return candidate
    raise FileNotFoundError(f"csrc/ with the native sources was not found next to {here}")


CODE_SUFFIXES = (".py", ".cpp", ".h", ".cu", ".cuh")


def code_digest(*folders: Path) -> str:
    """A short hash of the code files under ``folders`` (CODE_SUFFIXES: names and contents, in
    a fixed order); other files (docs, caches) do not count."""
    digest = hashlib.sha256()
    for folder in folders:
        for path in sorted(p for p in folder.rglob("*") if p.suffix in CODE_SUFFIXES
                           and "__pycache__" not in p.parts and p.is_file()):
            digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


@functools.cache
def package_code_digest() -> str:
    """code_digest of this package's Python and native sources: what its measured choices
    time, so that a change of the code (an upgrade) measures them again."""
    return code_digest(Path(__file__).resolve().parent, csrc_dir())
