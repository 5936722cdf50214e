"""Fixtures shared across test files."""

import os
import subprocess
import sys

import pytest

from po_batch.tiny import build_checkpoint


@pytest.fixture(scope="session")
def tiny_qwen3_vl(tmp_path_factory):
    """A tiny random Qwen3-VL checkpoint directory, built once per session."""
    return build_checkpoint(tmp_path_factory.mktemp("ckpt"), "qwen3_vl")


def cli_env() -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="session")
def po_batch_cli():
    """Runs `po-batch ARGS...` in a subprocess; returns the CompletedProcess (text stdout/stderr)."""

    def run(*args, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "po_batch.cli", *map(str, args)], env=cli_env(),
                              capture_output=True, text=True, timeout=timeout)

    return run
