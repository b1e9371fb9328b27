"""BiSSL for Detectron2: bilevel alignment of self-supervised pretraining with fine-tuning."""

from . import compat  # noqa: F401, I001  (must run before anything imports detectron2)
from .utils import warnings  # noqa: F401  (imports torch.jit-scripting modules quietly)
from . import modeling  # noqa: F401  (registers the meta-architectures and heads)

__version__ = "0.1.0"
