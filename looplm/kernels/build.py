"""Compile, verify and load the C kernel library (``csrc/``) on first use.

One shared library holds every C source of ``csrc/`` except the standalone program's ``main``
(``looplm_run.c``): the plain-loop decode kernel (``decode_kernel.c``), the training loss's row
passes (``train_kernel.c``) and the runtime that runs
every model family (``lr_*.c``, driven by ``runtime_stepper``).  It is plain C with OpenMP and
AVX2/AVX-512 intrinsics where the CPU has them; it needs no torch headers, so it builds in a few
seconds with the system C compiler (``$CC``, else ``cc``/``gcc``/``clang``).
``LOOPLM_NATIVE_TARGET=portable`` builds it without ``-march=native``: the SIMD paths compile out and
the scalar fallbacks run (what a CPU without AVX2, or ARM, gets).  The shared library is cached
under ``$LOOPLM_CACHE/native`` (default ``~/.cache/looplm/native``) in a file named by a hash of
the sources, the flags, the compiler and the CPU's feature flags, written atomically (temp file +
rename), so concurrent processes never load a half-written file.

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
``LOOPLM_NATIVE_TARGET`` (``native``, ``portable`` or a feature list, see ``target``) picks the
SIMD paths compiled in; it enters the cache key through the flags.
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from looplm.cache_dir import cache_path
from looplm.kernels.bindings import declare, missing_symbols

CSRC = Path(__file__).with_name("csrc")
PROGRAM = "looplm_run.c"  # the standalone program's main: built by csrc/Makefile, not into the library
# compiled: every C file of csrc/ but the program; every file of csrc/ (headers too) enters the cache key
SOURCES = tuple(sorted(path for path in CSRC.glob("*.c") if path.name != PROGRAM))
FLAGS = ["-O3", "-std=c11", "-fopenmp", "-shared", "-fPIC"]
PORTABLE_FLAG = "-DLOOPLM_PORTABLE"  # marks a portable build (and keeps its cache key apart)
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


# ``LOOPLM_NATIVE_TARGET`` features (gcc/clang -m names) and the /proc/cpuinfo flag each needs.
TARGET_FEATURES = {"avx2": "avx2", "fma": "fma", "f16c": "f16c", "avxvnni": "avx_vnni", "avx512f": "avx512f",
                   "avx512bw": "avx512bw", "avx512vl": "avx512vl", "avx512vnni": "avx512_vnni",
                   "avx512bf16": "avx512_bf16"}


def target() -> str:
    """``$LOOPLM_NATIVE_TARGET``: ``native`` (the default: every SIMD path this CPU has),
    ``portable`` (no -march flags: the scalar fallbacks, what a CPU without the instructions
    runs, ARM included), or a comma list of features such as ``avx2,fma`` (those paths only: the
    tests exercise every fallback on one machine)."""
    return os.environ.get("LOOPLM_NATIVE_TARGET", "native").strip() or "native"


def portable() -> bool:
    """Whether the scalar build is asked for (``LOOPLM_NATIVE_TARGET=portable``)."""
    return target() == "portable"


def _arch_flags(compiler: str) -> list[str]:
    """The architecture flags of ``target()``: -march=native where the compiler accepts it (gcc,
    clang on x86 and arm), only the portable marker for ``portable``, -mFEATURE for a feature list
    (each feature must be one this CPU has, or the library would die on an illegal instruction)."""
    wanted = target()
    if wanted == "portable":
        return [PORTABLE_FLAG]
    if wanted == "native":
        probe = subprocess.run([compiler, "-march=native", "-E", "-x", "c", "-"], input=b"", capture_output=True)
        return ["-march=native"] if probe.returncode == 0 else []
    from looplm.cpu import cpu_flags

    features = [name.strip() for name in wanted.split(",") if name.strip()]
    for name in features:
        if name not in TARGET_FEATURES:
            raise RuntimeError(f"LOOPLM_NATIVE_TARGET: unknown feature {name!r} (use native, portable or a comma"
                               f" list of {', '.join(TARGET_FEATURES)})")
        if TARGET_FEATURES[name] not in cpu_flags():
            raise RuntimeError(f"LOOPLM_NATIVE_TARGET asks for {name}, which this CPU lacks")
    return [f"-m{name}" for name in features]


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
    directory = cache_path("native")
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


def _run_compiler(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{Path(command[0]).name} failed: {result.stderr.strip().splitlines()[-1:]}")


def _compile(compiler: str, flags: list[str], directory: Path, target: Path) -> None:
    """Every source to an object in parallel (the runtime's layer code alone takes seconds at -O3),
    then one link, in a private temporary directory beside the target."""
    handle, temporary = tempfile.mkstemp(dir=directory, suffix=".so.tmp")
    os.close(handle)
    try:
        with tempfile.TemporaryDirectory(dir=directory) as objects:
            outputs = [str(Path(objects) / f"{source.stem}.o") for source in SOURCES]
            compile_flags = [flag for flag in flags if flag != "-shared"]
            with ThreadPoolExecutor(max_workers=min(len(SOURCES), os.cpu_count() or 1)) as pool:
                list(pool.map(_run_compiler, [[compiler, *compile_flags, f"-I{CSRC}", "-c", str(source), "-o", output]
                                              for source, output in zip(SOURCES, outputs)]))
            _run_compiler([compiler, *flags, *outputs, "-o", temporary, "-lm"])
        os.chmod(temporary, 0o700)
        digest = _sha256(Path(temporary))
        os.replace(temporary, target)
        _record(directory, target.name, digest)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def library_digest(compiler: str, flags: list[str]) -> str:
    """The cache key of a build: the sources (headers too), the flags, the compiler and the CPU."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    sources = "\0".join(path.read_text() for path in sorted({*CSRC.glob("*.c"), *CSRC.glob("*.h")}))
    return hashlib.sha256("\0".join([sources, " ".join(flags), version, _cpu_signature(),
                                     platform.machine()]).encode()).hexdigest()[:16]


def _build(compiler: str) -> Path:
    """The verified library for this source, compiler and CPU: the cached one, or a new build."""
    flags = FLAGS + _arch_flags(compiler)
    digest = library_digest(compiler, flags)
    directory = cache_directory()
    if (reason := untrusted_reason(directory)) is not None:
        warnings.warn(f"looplm: the kernel cache {str(directory)!r} {reason}: building in a private"
                      " temporary directory instead", stacklevel=3)
        directory = Path(tempfile.mkdtemp(prefix="looplm-native-"))
    target = directory / f"looplm_native-{digest}.so"
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
                    # a failed build is not a choice: say once that decoding runs on torch, several times slower
                    warnings.warn(f"looplm: {_state['reason']}; decoding falls back to the torch paths, several times"
                                  " slower (LOOPLM_NATIVE=0 chooses them without this warning)", stacklevel=2)
        return _state["library"]


def unavailable_reason() -> str | None:
    """Why ``load_kernel`` returned None (None when the kernel loaded)."""
    load_kernel()
    return _state["reason"]


def simd_paths() -> dict[str, str]:
    """Which SIMD path each projection form of the loaded kernel was compiled to: ``f32``
    (float32 and Q8_0 with float input), ``bf16`` and ``q8_int8`` (Q8_0 × Q8_0) map to
    ``avx2``, ``avx512_bf16``, ``avx512_vnni``, ``avx_vnni`` or ``scalar``; empty without a kernel."""
    library = load_kernel()
    if library is None:
        return {}
    return dict(item.split("=") for item in library.looplm_simd_paths().decode().split())
