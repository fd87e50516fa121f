"""Atomic writes: a file or directory is either absent, the old version, or complete.

Everything is written into a staging name beside the target (``.NAME.tmp-PID``), flushed and
fsynced, then renamed into place (``os.replace``, atomic on POSIX), and the parent directory is
fsynced so the rename itself survives a power cut.  A directory that replaces an existing one
is swapped in last, so a crash at any point leaves the old one or the new one whole.

Disk errors (a full disk, a read-only file system, a missing permission) become one
``LoopLMError`` line naming the path (``disk_errors``).  Staging names left by a process that
was killed mid-write are removed by ``remove_stale_staging``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from looplm.errors import FILE_HINTS, LoopLMError, listed, one_line

STAGING = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)$")


@contextlib.contextmanager
def disk_errors(path: str | Path) -> Iterator[None]:
    """Turn an OSError while writing ``path`` into one line that names it and says what to do."""
    try:
        yield
    except OSError as error:
        reason = error.strerror or one_line(error) or type(error).__name__
        hint = FILE_HINTS.get(error.errno, "check the path")
        raise LoopLMError(f"cannot write {str(path)!r}: {reason}; {hint}") from None


def save_safetensors(tensors: dict, path: str | Path, metadata: dict | None = None) -> None:
    """``safetensors.torch.save_file``, the file then readable as the user's other new files are:
    the library creates it with mode 0600 whatever the umask, so another account (a server's) could
    not read a checkpoint."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as error:  # its I/O errors end "(os error N)": an OSError, e.g. a full disk
        code = re.search(r"os error (\d+)", str(error))
        if code is None:
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from None
    mask = os.umask(0o022)  # read the umask (set back at once)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def _fsync_directory(directory: Path) -> None:
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:  # some file systems do not open directories
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _fsync_tree(directory: Path) -> None:
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            with open(path, "rb+") as handle:
                os.fsync(handle.fileno())
    _fsync_directory(directory)


def staging_path(target: Path, kind: str = "tmp") -> Path:
    return target.parent / f".{target.name}.{kind}-{os.getpid()}"


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(staging_file)``, fsync it and rename it to ``path``."""
    path = Path(path)
    staging = staging_path(path)
    with disk_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            write(staging)
            with open(staging, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(staging, path)
        finally:
            if staging.exists():
                staging.unlink()
        _fsync_directory(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda staging: staging.write_text(text, encoding="utf-8"))


def atomic_directory(target: str | Path, write: Callable[[Path], None],
                     replaceable: Callable[[str], bool] | None = None) -> Path:
    """Call ``write(staging_dir)``, fsync what it wrote, then rename it to ``target`` (an
    existing ``target`` is moved aside first and removed last).  An existing ``target`` is
    replaced only if it is a directory each of whose entries the new one writes again or
    ``replaceable(name)`` accepts (what an earlier write of the same kind may have left): a
    user's file (or a directory holding anything else) is never removed."""
    target = Path(target)
    check_replaceable(target, lambda name: True)  # a file is never replaced by a directory
    staging = staging_path(target)
    with disk_errors(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()
        try:
            try:
                write(staging)
            except LoopLMError as error:  # a nested write's message names the staging path: name the target
                raise LoopLMError(str(error).replace(str(staging), str(target))) from None
            _refuse_foreign_entries(target, staging, replaceable)
            _fsync_tree(staging)
            if target.exists():
                retired = staging_path(target, "old")
                os.replace(target, retired)
                os.replace(staging, target)
                shutil.rmtree(retired)
            else:
                os.replace(staging, target)
            _fsync_directory(target.parent)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return target


def _refuse_foreign_entries(target: Path, staging: Path, replaceable: Callable[[str], bool] | None) -> None:
    """Refuse to replace ``target`` if it holds entries the new directory (``staging``) does not
    write again and ``replaceable`` does not accept."""
    written = {entry.name for entry in staging.iterdir()}
    check_replaceable(target, lambda name: name in written or bool(replaceable and replaceable(name)))


def check_replaceable(target: str | Path, replaceable: Callable[[str], bool]) -> None:
    """Before slow work whose output directory replaces ``target``: refuse a file there, or a
    directory holding an entry ``replaceable`` does not accept (``atomic_directory``'s rule)."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise LoopLMError(f"{str(target)!r} is a file, not a directory: choose another output path")
    if not target.is_dir():
        return
    foreign = sorted(entry.name for entry in target.iterdir() if not replaceable(entry.name))
    if foreign:
        raise LoopLMError(f"{str(target)!r} holds {listed(foreign)}, which this output would not replace: move them"
                          " away or choose another output directory")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_staging(directory: str | Path) -> list[Path]:
    """Remove the staging files and directories in ``directory`` left by processes that no longer
    run (killed during a save); returns what was removed."""
    directory = Path(directory)
    removed = []
    if not directory.is_dir():
        return removed
    for path in directory.iterdir():
        match = STAGING.match(path.name)
        if match and not _alive(int(match["pid"])):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def check_parent_directory(output: str | Path) -> None:
    """Before slow work: refuse an output under a file (``notes.txt/report.json``), which no
    write can create, in one line."""
    for parent in Path(output).parents:
        if parent.exists():
            if not parent.is_dir():
                raise LoopLMError(f"cannot write {str(output)!r}: {str(parent)!r} is a file, not a directory;"
                                  " choose another path")
            return


def refuse_overlap(output: str | Path, inputs, flag: str = "") -> None:
    """Refuse to write ``output`` when it is, contains, or lies inside one of ``inputs`` (paths or
    None): replacing it would destroy the input it was asked to read; and an empty path (the
    current directory) or one whose nearest existing part is a file, which no write can use."""
    if not str(output).strip():
        raise LoopLMError("the output path is empty: give a file or directory to write")
    check_parent_directory(output)
    target = Path(output).resolve()
    for item in inputs:
        if item is None or str(item) in ("", "byte", "bpe"):
            continue
        source = Path(item).resolve()
        if target == source:
            where = "is"
        elif target in source.parents:
            where = "holds"
        elif source in target.parents:
            where = "lies inside"
        else:
            continue
        raise LoopLMError(f"{str(output)!r} {where} the input {str(item)!r}: writing{f' with {flag}' if flag else ''}"
                          " there could destroy it; choose an output apart from the inputs")
