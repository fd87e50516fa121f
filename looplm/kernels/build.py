"""Compile, verify and load the C kernel (``csrc/decode_kernel.c``) on first use.

The kernel is plain C with OpenMP and AVX2/AVX-512 intrinsics where the CPU has them; it needs
no torch headers, so it builds in about a second with the system C compiler (``$CC``, else
``cc``/``gcc``/``clang``).  The shared library is cached under ``$LOOPLM_CACHE/native``
(default ``~/.cache/looplm/native``) in a file named by a hash of the source, the flags, the
compiler and the CPU's feature flags, written atomically (temp file + rename), so concurrent
processes never load a half-written file.

Loading a shared library runs its constructors, so a library is loaded only when it can be
trusted to be the one this user built:

- the cache directory, the library and the manifest must belong to the current user and be
  writable by nobody else (a directory shared with others is not used: the kernel is built in a
  private temporary directory instead);
- the library's SHA-256, recorded in ``manifest.json`` when it was built, must match its bytes;
  anything else (a file planted under the expected name, a truncated copy) is rebuilt;
- the loaded library must export every entry point ``bindings.SYMBOLS`` lists; otherwise the
  torch paths are used, with one warning.

With no compiler, or ``LOOPLM_NATIVE=0``, ``load_kernel`` returns None and
``unavailable_reason`` says why; decoding then uses the torch fast path.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

from looplm.kernels.bindings import declare, missing_symbols

CSRC = Path(__file__).with_name("csrc")
SOURCES = (CSRC / "decode_kernel.c",)  # compiled; every file of csrc/ (headers too) enters the cache key
FLAGS = ["-O3", "-std=c11", "-fopenmp", "-shared", "-fPIC"]
MANIFEST = "manifest.json"
_lock = threading.Lock()
_state: dict = {}


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_signature() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _arch_flags(compiler: str) -> list[str]:
    """-march=native when the compiler accepts it (gcc, clang on x86 and arm)."""
    probe = subprocess.run([compiler, "-march=native", "-E", "-x", "c", "-"], input=b"", capture_output=True)
    return ["-march=native"] if probe.returncode == 0 else []


def untrusted_reason(path: Path) -> str | None:
    """Why ``path`` may have been written by someone else (another owner, or group/world
    writable), or None when only this user can have written it."""
    try:
        status = path.stat()
    except OSError as error:
        return f"cannot be read ({error.strerror})"
    if hasattr(os, "getuid") and status.st_uid != os.getuid():
        return f"belongs to user id {status.st_uid}, not to this user ({os.getuid()})"
    if status.st_mode & 0o022:
        return f"is writable by other users (mode {oct(status.st_mode & 0o777)})"
    return None


def cache_directory() -> Path:
    """``$LOOPLM_CACHE/native`` (default ``~/.cache/looplm/native``), created private (0700)."""
    directory = Path(os.environ.get("LOOPLM_CACHE", Path.home() / ".cache" / "looplm")) / "native"
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    return directory


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_manifest(directory: Path) -> dict[str, str]:
    path = directory / MANIFEST
    if not path.is_file() or untrusted_reason(path) is not None:
        return {}
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def _record(directory: Path, name: str, digest: str) -> None:
    """Add ``name``'s hash to the manifest (rewritten atomically, readable by this user only)."""
    manifest = _read_manifest(directory)
    manifest[name] = digest
    handle, temporary = tempfile.mkstemp(dir=directory, suffix=".json.tmp")
    with os.fdopen(handle, "w") as file:
        json.dump(manifest, file, indent=1, sort_keys=True)
    os.replace(temporary, directory / MANIFEST)


def verified(directory: Path, target: Path) -> bool:
    """Whether ``target`` is a library this user built: owned by this user, written by nobody
    else, and with the SHA-256 the manifest recorded when it was built."""
    if not target.is_file() or untrusted_reason(target) is not None:
        return False
    expected = _read_manifest(directory).get(target.name)
    return expected is not None and expected == _sha256(target)


def _compile(compiler: str, flags: list[str], directory: Path, target: Path) -> None:
    handle, temporary = tempfile.mkstemp(dir=directory, suffix=".so.tmp")
    os.close(handle)
    try:
        result = subprocess.run([compiler, *flags, f"-I{CSRC}", *map(str, SOURCES), "-o", temporary, "-lm"],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{Path(compiler).name} failed: {result.stderr.strip().splitlines()[-1:]}")
        os.chmod(temporary, 0o700)
        digest = _sha256(Path(temporary))
        os.replace(temporary, target)
        _record(directory, target.name, digest)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _build(compiler: str) -> Path:
    """The verified library for this source, compiler and CPU: the cached one, or a new build."""
    flags = FLAGS + _arch_flags(compiler)
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    sources = "\0".join(path.read_text() for path in sorted({*SOURCES, *CSRC.glob("*.h")}))
    digest = hashlib.sha256("\0".join([sources, " ".join(flags), version, _cpu_signature(),
                                       platform.machine()]).encode()).hexdigest()[:16]
    directory = cache_directory()
    if (reason := untrusted_reason(directory)) is not None:
        warnings.warn(f"looplm: the kernel cache {str(directory)!r} {reason}: building in a private"
                      " temporary directory instead", stacklevel=3)
        directory = Path(tempfile.mkdtemp(prefix="looplm-native-"))
    target = directory / f"decode_kernel-{digest}.so"
    if not verified(directory, target):
        _compile(compiler, flags, directory, target)
    return target


def load_kernel() -> ctypes.CDLL | None:
    """The compiled kernel, building it on first use; None where it cannot be built or loaded."""
    with _lock:
        if "library" not in _state:
            _state["library"], _state["reason"] = None, None
            if os.environ.get("LOOPLM_NATIVE", "1") == "0":
                _state["reason"] = "disabled by LOOPLM_NATIVE=0"
            elif (compiler := _compiler()) is None:
                _state["reason"] = "no C compiler found (set CC)"
            else:
                try:
                    import torch  # noqa: F401  -- load torch's OpenMP runtime first so the kernel shares it

                    library = ctypes.CDLL(str(_build(compiler)))
                    if missing := missing_symbols(library):
                        _state["reason"] = f"the C kernel lacks {', '.join(missing[:3])}"
                        warnings.warn(f"looplm: {_state['reason']}; using the torch paths", stacklevel=2)
                    else:
                        _state["library"] = declare(library)
                except (OSError, RuntimeError, subprocess.SubprocessError) as error:
                    _state["reason"] = f"building the C decode kernel failed: {error}"
        return _state["library"]


def unavailable_reason() -> str | None:
    """Why ``load_kernel`` returned None (None when the kernel loaded)."""
    load_kernel()
    return _state["reason"]
