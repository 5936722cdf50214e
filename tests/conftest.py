"""Fixtures shared across test files."""

import contextlib
import os
import shutil
import subprocess
import sys

import pytest

from po_batch.tiny import build_checkpoint


@pytest.fixture(scope="session")
def tiny_qwen3_vl(tmp_path_factory):
    """A tiny random Qwen3-VL checkpoint directory, built once per session."""
    return build_checkpoint(tmp_path_factory.mktemp("ckpt"), "qwen3_vl")


@pytest.fixture(scope="session")
def po_batch_cli():
    """Runs `po-batch ARGS...` in a subprocess and returns the CompletedProcess (text stdout and stderr)."""

    def run(*args, timeout: float = 180) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "po_batch.cli", *map(str, args)], capture_output=True, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=timeout)

    return run


@contextlib.contextmanager
def tmpfs(path, size: str):
    """A real tmpfs of `size` (e.g. "64k") mounted at the new folder `path`, for full-disk tests; root only."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)
