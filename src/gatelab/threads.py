"""One context manager for torch's CPU thread count, restored on exit.

Small models are bound by per-op overhead: on a 2-core machine one thread is often faster than
two, and benchmarks time one thread. Every system sets threads through :func:`torch_threads`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)`` (``None`` or 0: leave it), then restore."""
    if n is not None and n < 0:
        raise ValueError(f"threads must be >= 1 (or None for torch's default), got {n}")
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)
