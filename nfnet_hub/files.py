"""Files a user can trust: text read as the user's editor wrote it, and files written whole or not at all, with
the user's umask, and never over what we did not write.

Work in progress lives beside its target under a hidden name that says whose it is and which process
wrote it (``.model.onnx.nfnet-hub-partial.PID.RANDOM.HOST``). A run killed with SIGKILL cannot clean
up after itself, so every run sweeps the partial files of dead processes of this host first.
"""
from __future__ import annotations

import codecs
import io
import os
import re
import secrets
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import UsageError

__all__ = ["atomic_folder", "check_writable_folder", "honour_umask", "is_protected_folder", "partial_path",
           "read_text", "sweep_partials", "write_atomically"]

_MARK = "nfnet-hub-partial"
_PARTIAL = re.compile(rf"^\..+\.{_MARK}\.(\d+)\.[0-9a-f]+\.(.+)$")


def read_text(path: str | os.PathLike) -> str:
    """A text file in UTF-8, or in UTF-16 where its byte-order mark says so (PowerShell writes that), with the mark
    left out (Excel and Notepad put one before UTF-8 too, and it would stick to the first name) and every newline
    read as ``\\n``. Anything else raises UnicodeDecodeError."""
    data = Path(path).read_bytes()
    text = data.decode("utf-16" if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) else "utf-8-sig")
    return io.StringIO(text, newline=None).read()


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: Path, folder: bool = False) -> None:
    """Give ``path`` the mode open() or mkdir() would (mkdtemp makes 0700 folders, safetensors 0600 files)."""
    os.chmod(path, (0o777 if folder else 0o666) & ~_umask())


def partial_path(target: Path) -> Path:
    """A hidden name beside ``target`` for work in progress, recognisably ours and this process's."""
    return target.parent / f".{target.name}.{_MARK}.{os.getpid()}.{secrets.token_hex(4)}.{_host()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_partials(folder: Path) -> list[Path]:
    """Remove the partial files and folders that killed runs of this host left in ``folder``."""
    removed = []
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        m = _PARTIAL.match(path.name)
        if not m or m.group(2) != _host() or _alive(int(m.group(1))):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
        print(f"removed {path}: a partial file left by an interrupted run (process {m.group(1)})", flush=True)
    return removed


def check_writable_folder(folder: Path) -> None:
    """Fail before any work if ``folder`` cannot be created or written (the nearest existing folder is tried)."""
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"cannot write to {folder}: {probe} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise UsageError(f"cannot write to {folder}: {e.strerror or e} in {probe}") from None


def write_atomically(data: bytes, path: Path) -> None:
    """Write ``path`` whole or not at all (a partial file, then a rename), with the umask honoured."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_partials(path.parent)
    tmp = partial_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_folder(out: Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield a partial folder to fill; on success it becomes ``out`` (the old ``out`` is removed only when
    ``replace`` is set, and only after the new one is complete). On failure nothing is left behind."""
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_partials(out.parent)
    tmp = partial_path(out)
    tmp.mkdir()
    honour_umask(tmp, folder=True)
    try:
        yield tmp
        old = None
        if out.exists():
            if not replace:
                raise FileExistsError(f"{out} exists")
            old = partial_path(out)
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def is_protected_folder(folder: Path) -> str | None:
    """Why ``folder`` must never be replaced as a whole (the working folder, one above it, home), or None."""
    folder, cwd, home = folder.resolve(), Path.cwd().resolve(), Path.home().resolve()
    if folder == cwd:
        return "it is the working folder"
    if folder in cwd.parents:
        return "it holds the working folder"
    if folder == home or folder in home.parents:
        return "it is or holds the home folder"
    return None
