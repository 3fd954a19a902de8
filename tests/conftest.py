"""Shared by every test module."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # On a 2-core machine shared with data-loader workers or subprocesses, oversubscribed OpenMP
    # threads crawl; one intra-op thread per test process is the fastest setting.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
