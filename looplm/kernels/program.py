"""The standalone program ``looplm-run`` (``csrc/looplm_run.c`` over the C runtime): how to build
it, what to tell a user who exported a GGUF file, and how to read its per-step logits dump.

The program needs only a C compiler with OpenMP, libc and libm: ``make -C <csrc>`` (or the one
``cc`` line ``build_command`` gives) builds it; docs/C_RUNTIME.md describes it.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import numpy as np

from looplm.errors import LoopLMError
from looplm.kernels.build import CSRC, PORTABLE_FLAG, PROGRAM, _compiler

DUMP_MAGIC = b"LPLMLGT1"
IN_PROCESS_ONLY = ("decode_kernel.c", "train_kernel.c")  # csrc/Makefile filters out the same files


def sources() -> list[Path]:
    """The program's C sources: every file of csrc/ but the in-process decode kernel and
    training-loss passes."""
    return sorted(path for path in CSRC.glob("*.c") if path.name not in IN_PROCESS_ONLY)


def build_command(output: str | Path, portable: bool = False, compiler: str = "cc") -> list[str]:
    """The one compiler line that builds the program (what csrc/Makefile runs)."""
    arch = [PORTABLE_FLAG] if portable else ["-march=native"]
    return [compiler, "-O3", *arch, "-std=c11", "-fopenmp", "-o", str(output), *map(str, sources()), "-lm"]


def build(output: str | Path, portable: bool = False) -> Path:
    """Compile the program to ``output``: ``make`` with csrc/Makefile where make exists, else the
    ``build_command`` line; one-line error if it fails."""
    compiler = _compiler()
    if compiler is None:
        raise LoopLMError("building looplm-run needs a C compiler (set CC)")
    output = Path(output).resolve()
    if shutil.which("make"):
        command = ["make", "-s", "-B", "-C", str(CSRC), f"OUT={output}", f"CC={compiler}"]
        command += ["PORTABLE=1"] if portable else []
    else:
        command = build_command(output, portable, compiler)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no message"])[-1]
        raise LoopLMError(f"building looplm-run failed: {last}")
    return Path(output)


def instructions(model_path: str | Path) -> str:
    """How to build the program and run a GGUF file with it (printed by ``looplm export gguf``)."""
    csrc = shlex.quote(str(CSRC))
    make = f"make -C {csrc} OUT=$PWD/looplm-run" if shutil.which("make") else shlex.join(build_command("looplm-run"))
    return (f"run it without Python: {make}\n"
            f"  ./looplm-run {shlex.quote(str(model_path))} --prompt 'Hello' [-q 0.5] [--show-steps]"
            f"  (docs/C_RUNTIME.md; sources in {csrc}, main in {PROGRAM})")


def read_dump(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A ``--dump-logits`` file: positions [R], 1-based loop steps [R] and logits [R, V] of every
    step the program ran, in the order it ran them."""
    raw = Path(path).read_bytes()
    if raw[:8] != DUMP_MAGIC:
        raise LoopLMError(f"{str(path)!r} is not a looplm-run logits dump")
    vocab = int(np.frombuffer(raw[8:12], np.uint32)[0])
    records = np.frombuffer(raw[12:], dtype=np.uint8).reshape(-1, 8 + 4 * vocab)
    header = records[:, :8].copy().view(np.int32)
    return header[:, 0], header[:, 1], records[:, 8:].copy().view(np.float32)
