"""Loading a shared library runs its constructors: the kernel cache loads only what this user
built (``looplm.kernels.build``).  A library planted under the expected name is rebuilt over,
never loaded; a cache directory others can write to is not used; a library without the
kernel's entry points is refused with one warning and the torch paths run."""

import os
import subprocess
import textwrap
import warnings

import pytest

from looplm.kernels import build
from looplm.kernels.bindings import SYMBOLS

compiler = build._compiler()
pytestmark = pytest.mark.skipif(compiler is None, reason="no C compiler")

PLANTED = textwrap.dedent("""
    #include <stdio.h>
    __attribute__((constructor)) static void planted(void) {
        FILE *f = fopen(MARKER, "w"); if (f) { fputs("ran", f); fclose(f); }
    }
    int looplm_layers(void) { return 0; }
""")


def _planted_library(tmp_path, marker):
    source = tmp_path / "planted.c"
    source.write_text(f'#define MARKER "{marker}"\n' + PLANTED)
    library = tmp_path / "planted.so"
    subprocess.run([compiler, "-shared", "-fPIC", str(source), "-o", str(library)], check=True)
    return library.read_bytes()


@pytest.fixture
def fresh_kernel(monkeypatch, tmp_path):
    """An empty kernel cache, and a stand-in source exporting every entry point: the trust rules
    (manifest, owner, mode, SHA-256, symbols) do not depend on what the library computes, and the
    stand-in builds in a fraction of a second (the real build is tested in test_native_decode)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("LOOPLM_CACHE", str(cache))
    monkeypatch.setattr(build, "_state", {})
    stand_in = tmp_path / "stand_in.c"
    stand_in.write_text("".join(f"void {name}(void) {{}}\n" for name in SYMBOLS))
    monkeypatch.setattr(build, "SOURCES", (stand_in,))
    return cache


def test_a_library_planted_under_the_expected_name_is_never_loaded(fresh_kernel, tmp_path):
    marker = tmp_path / "constructor-ran"
    target = build._build(compiler)  # learn the name the cache uses for this source, compiler and CPU
    target.write_bytes(_planted_library(tmp_path, marker))  # same owner, but not the bytes that were built
    assert not build.verified(target.parent, target)
    library = build.load_kernel()
    assert library is not None and hasattr(library, "looplm_rows_attention")  # rebuilt, then loaded
    assert not marker.exists()
    assert build.verified(target.parent, target)


def test_a_planted_library_without_a_manifest_entry_is_rebuilt(fresh_kernel, tmp_path):
    marker = tmp_path / "constructor-ran"
    target = build._build(compiler)
    (target.parent / build.MANIFEST).unlink()
    target.write_bytes(_planted_library(tmp_path, marker))
    assert build._build(compiler) == target and build.verified(target.parent, target)
    assert build.load_kernel() is not None and not marker.exists()


def test_a_cache_directory_others_can_write_is_not_used(fresh_kernel):
    shared = fresh_kernel / "native"
    shared.mkdir(parents=True)
    os.chmod(shared, 0o777)
    with pytest.warns(UserWarning, match="writable by other users.*private temporary directory"):
        target = build._build(compiler)
    assert shared not in target.parents and list(shared.iterdir()) == []


def test_a_library_without_the_entry_points_is_refused_with_one_warning(fresh_kernel, tmp_path, monkeypatch):
    source = tmp_path / "empty.c"
    source.write_text("int looplm_layers(void) { return 0; }\n")
    monkeypatch.setattr(build, "SOURCES", (source,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert build.load_kernel() is None
    assert "lacks looplm_matvec" in build.unavailable_reason()
    assert [str(w.message) for w in caught] == [f"looplm: {build.unavailable_reason()}; using the torch paths"]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="changing a file's owner needs root")
def test_a_library_owned_by_another_user_is_not_trusted(fresh_kernel):
    target = build._build(compiler)
    os.chown(target, 12345, -1)
    assert "belongs to user id 12345" in build.untrusted_reason(target)
    assert not build.verified(target.parent, target)
