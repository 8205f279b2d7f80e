"""torch.optim drop-ins backed by the fused torchopt_ext kernels."""

from .adam import Adam
from .adamw import AdamW
from .sgd import SGD

__all__ = ["SGD", "Adam", "AdamW"]
