import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: on a busy shared machine, 2 threads wait on each other at every layer."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
