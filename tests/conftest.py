"""Shared pytest setup."""

from pathlib import Path

import pytest

from tests.helpers import FIXTURE_CORPUS, tiny_cfg, torch_threads


def pytest_configure(config):
    config.addinivalue_line("markers", "network: needs pip/npm to reach the package registries (skips if not)")
    config.addinivalue_line("markers", "gpu: needs CUDA (skipped without it); `make gpu-check` runs only these")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `make gpu-check` on a machine with one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# ---------------------------------------------------------------------------------------------------------
# A server that dies mid-run, for resume tests


# ---------------------------------------------------------------------------------------------------------
# The CLI, called in this process


@pytest.fixture
def photon(monkeypatch, capsys):
    """Run `photon ARGS` in this process through `cli.main` (what the console script calls); returns
    (exit code, stdout, stderr)."""
    import sys

    from photon import cli
    from photon.cli import common

    def call(*args):
        monkeypatch.setattr(sys, "argv", ["photon", *map(str, args)])
        monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")  # main() sets it; undo that after the test
        monkeypatch.setitem(common.STATE, "debug", False)
        try:
            cli.main()
            code = 0
        except SystemExit as e:
            code = e.code or 0
        out, err = capsys.readouterr()
        return code, out, err

    return call


# ---------------------------------------------------------------------------------------------------------
# The tiny fixture corpus, prepared once per session, and configs that point at it.


@pytest.fixture(scope="session")
def tiny_prep(tmp_path_factory) -> Path:
    """The tiny fixture corpus (3 domains), prepared once per session with the tiny preset's data recipe
    (vocab 1024); returns the prep dir. Shared by many tests: treat it as read-only."""
    from photon.data.shards import prepare

    prep_dir = tmp_path_factory.mktemp("tiny") / "prep"
    cfg = tiny_cfg(prep_dir)
    return prepare(cfg.data, cfg.model.vocab_size, source=FIXTURE_CORPUS)


@pytest.fixture(scope="session")
def tiny_prepared(tiny_prep):
    """`Prepared` handle on `tiny_prep`."""
    from photon.data.shards import open_prepared

    return open_prepared(tiny_prep)


@pytest.fixture
def one_thread():
    """torch on one intra-op thread for the test. Tiny models gain nothing from a second thread, and on a
    busy 2-core box two spinning OpenMP threads make a step 10-30x slower. Opt in per module with
    `pytestmark = pytest.mark.usefixtures("one_thread")` (module-scoped fixtures: `with torch_threads(1)`)."""
    with torch_threads(1):
        yield
