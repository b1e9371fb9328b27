"""Small utilities shared across the project (no detectron2 imports here).

The process-group helpers of :mod:`.distributed` are re-exported here under the same names.
"""

from . import distributed
from .distributed import *  # noqa: F403  (the names listed in distributed.__all__)

__all__ = list(distributed.__all__)
