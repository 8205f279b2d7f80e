"""Where step counters live (docs/design.md "CUDA kernels"): the classes whose
ops take device counters create them on a CUDA param's device (tested in
test_cuda.py); CPU params keep float32 CPU counters and CPU scalar state for
every optimizer, so CPU checkpoints are unchanged."""

import pytest
import torch
from helpers import ALL_OPTIMIZERS

import torchopt_ext.optim as tox

# The classes whose ops have CUDA kernels that read device step counters.
DEVICE_STEP_CLASSES = {"SGD", "Adam", "AdamW", "RAdam", "QHAdamW", "Lion", "SophiaH", "SophiaG"}
DEVICE_STEP_CLASSES |= {"ScheduleFreeAdamW", "ScheduleFreeSGD"}
# The matrix optimizers (kernels/cuda/matrix.cu reads their counters on the device).
DEVICE_STEP_CLASSES |= {"Muon", "PRISM"}
DEVICE_STEP_CLASSES |= {"NAdamW", "LAMB", "MARS", "Adafactor"}


@pytest.mark.parametrize("name", sorted(ALL_OPTIMIZERS))
def test_cpu_params_keep_cpu_step_counters_and_scalar_state(name):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(6, 4, generator=gen).requires_grad_(), torch.randn(5, generator=gen).requires_grad_()]
    opt = getattr(tox, name)(params, **ALL_OPTIMIZERS[name])
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    for state in opt.state.values():
        assert state["step"].device.type == "cpu" and state["step"].dtype == torch.float32
        assert state["step"].dim() == 0
        for key, value in state.items():
            if torch.is_tensor(value):
                assert value.device.type == "cpu", key
    # A checkpoint whose counters were saved elsewhere (here: float64, 1-element)
    # comes back as float32 0-d CPU counters.
    sd = opt.state_dict()
    for state in sd["state"].values():
        state["step"] = state["step"].to(torch.float64).reshape(1)
    opt.load_state_dict(sd)
    for state in opt.state.values():
        assert state["step"].dtype == torch.float32 and state["step"].dim() == 0
        assert state["step"].device.type == "cpu"


@pytest.mark.parametrize("name", sorted(ALL_OPTIMIZERS))
def test_device_counters_only_where_the_op_accepts_them(name):
    cls = getattr(tox, name)
    assert cls._device_steps == (name in DEVICE_STEP_CLASSES)
    p = torch.zeros(3)
    opt = cls([p.requires_grad_()], **ALL_OPTIMIZERS[name])
    assert opt._scalar_device(p) == torch.device("cpu")
