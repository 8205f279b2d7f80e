import os
import sys

import pytest
import torch

import torchopt_ext  # noqa: F401  (registers the ops)

# tests/reference holds float64 reference implementations written from the specs.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def _seed_and_dtype():
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    yield
    torch.set_default_dtype(default)
