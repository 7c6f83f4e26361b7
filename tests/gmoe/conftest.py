import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """The gmoe tensors are small: one thread is fastest, above all on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
