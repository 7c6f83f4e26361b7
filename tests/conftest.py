import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny tensors: one torch thread, or every op pays for waking the pool on a busy CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
