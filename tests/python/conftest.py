import pytest
import torch

import torchopt_ext  # noqa: F401  (registers the ops)


@pytest.fixture(autouse=True)
def _seed_and_dtype():
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    yield
    torch.set_default_dtype(default)
