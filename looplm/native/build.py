"""Compile and load the C decode kernel (``decode_kernel.c``) on first use.

The kernel is plain C with OpenMP and AVX2 intrinsics where the CPU has them; it needs no
torch headers, so it builds in about a second with the system C compiler (``$CC``, else
``cc``/``gcc``/``clang``).  The shared library is cached under ``$LOOPLM_CACHE`` (default
``~/.cache/looplm``) in a file named by a hash of the source, the flags, the compiler and
the CPU's feature flags, and written atomically (temp file + rename), so concurrent
processes never load a half-written file.  With no compiler, or ``LOOPLM_NATIVE=0``,
``load_kernel`` returns None and ``unavailable_reason`` says why; decoding then uses the
torch fast path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from looplm.cache_dir import cache_directory

SOURCE = Path(__file__).with_name("decode_kernel.c")
FLAGS = ["-O3", "-std=c11", "-fopenmp", "-shared", "-fPIC"]
_lock = threading.Lock()
_state: dict = {}


class Dims(ctypes.Structure):
    _fields_ = [("d_model", ctypes.c_int), ("n_heads", ctypes.c_int), ("n_kv_heads", ctypes.c_int),
                ("head_dim", ctypes.c_int), ("hidden", ctypes.c_int), ("max_len", ctypes.c_int),
                ("eps", ctypes.c_float)]


class Projection(ctypes.Structure):
    """float32 ``weights``, or Q8_0 int8 ``values`` + float32 ``scales`` (looplm.quant)."""
    _fields_ = [(name, ctypes.c_void_p) for name in ("weights", "values", "scales")]


class Layer(ctypes.Structure):
    _fields_ = ([(name, ctypes.c_void_p) for name in ("attn_norm", "attn_post_norm", "ffn_norm", "ffn_post_norm")]
                + [(name, Projection) for name in ("qkv", "out", "gate_up", "down")]
                + [(name, ctypes.c_void_p) for name in ("keys", "values")])


class TokenLoop(ctypes.Structure):
    """``looplm_token``'s fixed arguments (see decode_kernel.c)."""
    _fields_ = [("dims", ctypes.c_void_p), ("steps", ctypes.c_void_p), ("count", ctypes.c_int),
                ("threads", ctypes.c_int), ("vocab", ctypes.c_int), ("h", ctypes.c_void_p),
                ("cos", ctypes.c_void_p), ("sin", ctypes.c_void_p), ("scratch", ctypes.c_void_p),
                ("final_norm", ctypes.c_void_p), ("gate_w", ctypes.c_void_p), ("gate_b", ctypes.c_float),
                ("head", ctypes.c_void_p), ("embedding", ctypes.c_void_p), ("logits", ctypes.c_void_p),
                ("best", ctypes.c_void_p)]


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


def _build(compiler: str) -> Path:
    flags = FLAGS + _arch_flags(compiler)
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    digest = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(flags), version, _cpu_signature(),
                                       platform.machine()]).encode()).hexdigest()[:16]
    directory = cache_directory("native")
    target = directory / f"decode_kernel-{digest}.so"
    if target.exists():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=directory, suffix=".so.tmp")
    os.close(handle)
    try:
        result = subprocess.run([compiler, *flags, str(SOURCE), "-o", temporary, "-lm"],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{Path(compiler).name} failed: {result.stderr.strip().splitlines()[-1:]}")
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return target


def _declare(library: ctypes.CDLL) -> ctypes.CDLL:
    pointer, integer = ctypes.c_void_p, ctypes.c_int
    library.looplm_layers.argtypes = [ctypes.POINTER(Dims), ctypes.POINTER(Layer), integer, pointer, integer,
                                      pointer, pointer, pointer, pointer, integer]
    library.looplm_layers.restype = None
    library.looplm_matvec.argtypes = [pointer, pointer, pointer, integer, integer, integer]
    library.looplm_matvec.restype = None
    library.looplm_rms_norm.argtypes = [pointer, pointer, pointer, integer, ctypes.c_float]
    library.looplm_rms_norm.restype = None
    library.looplm_q8_matmul.argtypes = [pointer, pointer, pointer, pointer, pointer, integer, integer, integer,
                                         integer]
    library.looplm_q8_matmul.restype = None
    library.looplm_exit_loop.argtypes = [ctypes.POINTER(Dims), ctypes.POINTER(ctypes.POINTER(Layer)), integer,
                                         integer, integer, pointer, integer, pointer, pointer, pointer, pointer,
                                         integer, pointer, ctypes.c_float, ctypes.c_double, integer, pointer,
                                         pointer, integer, pointer]
    library.looplm_exit_loop.restype = integer
    library.looplm_token.argtypes = [pointer, integer, integer, integer, integer, ctypes.c_double]
    library.looplm_token.restype = integer
    library.looplm_rows_attention.argtypes = [pointer, pointer, pointer, pointer, pointer, integer, integer, integer,
                                              integer, integer, integer, pointer, integer]
    library.looplm_rows_attention.restype = None
    library.looplm_copy_rows.argtypes = [pointer, pointer, pointer, integer, integer, integer, integer, integer,
                                         integer]
    library.looplm_copy_rows.restype = None
    library.looplm_scratch_floats.argtypes = [ctypes.POINTER(Dims)]
    library.looplm_scratch_floats.restype = ctypes.c_long
    return library


def load_kernel() -> ctypes.CDLL | None:
    """The compiled kernel, building it on first use; None where it cannot be built."""
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

                    _state["library"] = _declare(ctypes.CDLL(str(_build(compiler))))
                except (OSError, RuntimeError, subprocess.SubprocessError) as error:
                    _state["reason"] = f"building the C decode kernel failed: {error}"
        return _state["library"]


def unavailable_reason() -> str | None:
    """Why ``load_kernel`` returned None (None when the kernel loaded)."""
    load_kernel()
    return _state["reason"]
