"""gatelab: learned gating under explicit budgets.

The shared core is :mod:`gatelab.gates` (gating maths) and :mod:`gatelab.cost` (budgets and
trade-offs); each system lives in its own sub-package (``gmoe``, ``moe``, ``exits``, ``edge``,
``comm``) and depends on the core only.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("gatelab")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+src"

__all__ = ["__version__"]
