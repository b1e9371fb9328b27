"""BiSSL for Detectron2: bilevel alignment of self-supervised pretraining with fine-tuning."""

from . import compat  # noqa: F401  (must run before anything imports detectron2)

__version__ = "0.1.0"
