"""Shared fixtures.  The suite runs on pytest-xdist workers by default (``-n auto`` in
pyproject.toml's addopts; ``-n 0`` runs it in one process): each worker gets its share of the
cores as its thread count, set when the worker starts and inherited by the subprocesses tests spawn,
so two workers on two cores do not each spin two OpenMP threads (that made the suite 2.8x slower
than one process). Tests of threaded C paths set their thread counts explicitly.  Property tests
(hypothesis) are derandomized unless LOOPLM_HYPOTHESIS=explore."""

import os
from contextlib import contextmanager

import pytest
import torch
from hypothesis import settings

from looplm.config import ModelConfig
from looplm.model import LoopLM

# Property tests draw the same examples on every run (a clean clone has no example database, so a
# random draw would make a run's verdict depend on luck); LOOPLM_HYPOTHESIS=explore draws new ones.
settings.register_profile("deterministic", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile("explore" if os.environ.get("LOOPLM_HYPOTHESIS") == "explore" else "deterministic")

WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // WORKERS))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def well_conditioned(config: ModelConfig, seed: int) -> LoopLM:
    """A model away from the init's identity norms: norms in [0.5, 1.5], unit-gain matrices, so
    float32 sums in two orders (a C kernel against torch) agree to ~1e-5 (std 0.5 on every matrix
    made many draws chaotic over the loop, the fp32 reference up to ~4e-4 off the float64 truth)."""
    from looplm.model.norms import RMSNorm

    torch.manual_seed(seed)
    model = LoopLM(config).eval()
    for parameter in model.parameters():
        if parameter.dim() == 2:
            torch.nn.init.normal_(parameter, std=parameter.shape[1] ** -0.5)
        else:
            torch.nn.init.normal_(parameter, std=0.5)
    for module in model.modules():
        if isinstance(module, RMSNorm):
            torch.nn.init.uniform_(module.weight, 0.5, 1.5)
    return model


def tiny_config(**overrides) -> ModelConfig:
    values = dict(vocab_size=64, d_model=32, n_heads=4, n_core_layers=2, loop_steps=3, max_seq_len=48)
    values.update(overrides)
    return ModelConfig(**values)


@pytest.fixture
def tiny_model() -> LoopLM:
    torch.manual_seed(0)
    model = LoopLM(tiny_config())
    # Non-zero gate weights so exit probabilities vary per token and per step.
    torch.nn.init.normal_(model.exit_gate.weight, std=0.5)
    return model.eval()


@pytest.fixture(autouse=True)
def nan_filled_empty(monkeypatch):
    """``torch.empty``/``empty_like`` return NaN-filled floating tensors in every test, so code
    that reads memory it never wrote produces NaN (and fails) instead of passing by luck."""
    empty, empty_like = torch.empty, torch.empty_like
    # ``with torch.device(...)`` recognises constructors by identity from a set it builds once:
    # build it from the real functions before they are replaced.
    from torch.utils._device import _device_constructors

    _device_constructors()

    def filled(tensor):
        return tensor.fill_(float("nan")) if tensor.is_floating_point() and tensor.numel() else tensor

    monkeypatch.setattr(torch, "empty", lambda *args, **kwargs: filled(empty(*args, **kwargs)))
    monkeypatch.setattr(torch, "empty_like", lambda *args, **kwargs: filled(empty_like(*args, **kwargs)))


@contextmanager
def serving(engine, config=None):
    """A uvicorn server for ``engine``'s model in a background thread on a free loopback port;
    yields (an httpx client, the port)."""
    import socket
    import threading
    import time

    import httpx
    import uvicorn

    from looplm.serve import create_app
    from looplm.serve.app import ServerConfig

    config = config or ServerConfig()
    app = create_app(engine.model, engine.tokenizer, config, engine)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            yield client, port
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="session")
def looplm_run(tmp_path_factory):
    """The standalone program looplm-run, built once per test session (skips without a C compiler)."""
    from looplm.kernels import build, program

    if build._compiler() is None:
        pytest.skip("no C compiler")
    return program.build(tmp_path_factory.mktemp("bin") / "looplm-run")


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto``: one worker per core this process may run on, at most 8 (each worker holds its
    own torch; more buys little here); ``PYTEST_XDIST_AUTO_NUM_WORKERS`` overrides."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return int(os.environ["PYTEST_XDIST_AUTO_NUM_WORKERS"])
    return max(1, min(8, len(os.sched_getaffinity(0))))


def one_line_error(argv, capsys) -> str:
    """Run ``looplm ARGV`` in this process; assert exit status 2 and one error line, and return it."""
    from looplm.cli import main

    capsys.readouterr()
    status = main([str(arg) for arg in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2, err
    assert len(lines) == 1 and lines[0].startswith("looplm: error:"), err
    return lines[0]


def write_gguf(writer, target):
    """Finish a ``gguf.GGUFWriter`` the tests filled (header, metadata, tensors) and return ``target``."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target
