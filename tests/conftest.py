"""Suite-wide test settings, and the folder on sys.path for shared helpers (real_data)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread per test: the tensors are small, and on a shared two-core machine two
    threads that fight another process can be many times slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
