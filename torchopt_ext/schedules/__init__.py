"""Learning-rate schedules whose math lives in C++ (shared with LibTorch)."""

from .wsd import WSD

__all__ = ["WSD"]
