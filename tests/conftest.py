"""Test setup: Triton runs in its CPU interpreter (must be set before triton is imported); caches in tmp."""

import os
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from train_helpers import make_image_folder  # noqa: E402


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """jit_fast's cache (demo digits, file indexes, FID statistics) lives in the session's tmp dir."""
    monkeypatch.setenv("JIT_FAST_CACHE", str(tmp_path_factory.getbasetemp() / "jit_fast_cache"))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ImageFolder (4 classes x 16 images, 20 px) for training tests."""
    return make_image_folder(tmp_path_factory.mktemp("tiny_data"))


def _single_intra_op_thread():
    """One intra-op thread while the fixture lives, the previous count after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread is faster, and immune to a busy second core (opt-in per module)."""
    yield from _single_intra_op_thread()


@pytest.fixture
def one_thread_test():
    """`one_thread` for one test only: a module fixture's run, which later tests compare bitwise with their own,
    must not get the thread count of whichever test happened to request it first (CPU kernels round per count)."""
    yield from _single_intra_op_thread()
