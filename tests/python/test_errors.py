"""Bad input gets a clear error naming the problem."""

import pytest
import torch

import torchopt_ext.optim as tox


def _param():
    return [torch.randn(3, requires_grad=True)]


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr=-1.0), "lr"),
        (dict(eps=-1e-8), "eps"),
        (dict(betas=(1.0, 0.999)), "betas\\[0\\]"),
        (dict(betas=(0.9, -0.1)), "betas\\[1\\]"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(state_dtype=torch.int32), "state_dtype"),
        (dict(lr=torch.tensor([0.1, 0.2])), "lr"),
    ],
)
def test_adam_rejects_bad_hyperparameters(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        getattr(tox, name)(_param(), **kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr=-0.1), "lr"),
        (dict(momentum=-0.5), "momentum"),
        (dict(dampening=1.5), "dampening"),
        (dict(weight_decay=-1.0), "weight_decay"),
        (dict(nesterov=True), "Nesterov"),
        (dict(nesterov=True, momentum=0.9, dampening=0.1), "Nesterov"),
    ],
)
def test_sgd_rejects_bad_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tox.SGD(_param(), **kwargs)


def test_bad_group_added_later_is_rejected():
    opt = tox.AdamW(_param())
    with pytest.raises(ValueError, match="weight_decay"):
        opt.add_param_group({"params": [torch.randn(2)], "weight_decay": -1.0})


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_sparse_gradients_are_rejected(name):
    p = torch.zeros(5)
    opt = getattr(tox, name)([p], lr=0.1)
    p.grad = torch.sparse_coo_tensor(torch.tensor([[1, 3]]), torch.tensor([1.0, 2.0]), (5,))
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def test_complex_params_are_rejected():
    p = torch.zeros(3, dtype=torch.complex64)
    opt = tox.AdamW([p])
    p.grad = torch.ones(3, dtype=torch.complex64)
    with pytest.raises(RuntimeError, match="complex"):
        opt.step()


def test_integer_params_are_rejected_by_the_op():
    p = torch.zeros(3, dtype=torch.int64)
    with pytest.raises(ValueError, match="params\\[0\\]"):
        torch.ops.torchopt_ext.sgd_step_(
            [p],
            [torch.ones(3, dtype=torch.int64)],
            [],
            [torch.zeros(())],
            torch.tensor(0.1),
            momentum=0.0,
            dampening=0.0,
            weight_decay=0.0,
            nesterov=False,
            maximize=False,
        )


def test_nan_gradients_propagate_without_crashing():
    # Documented behaviour: like torch.optim, a NaN/Inf gradient is applied
    # as-is (use GradScaler or spike protection to skip such steps).
    p = torch.ones(4)
    opt = tox.AdamW([p], lr=0.1)
    p.grad = torch.tensor([float("nan"), 1.0, float("inf"), 1.0])
    opt.step()
    assert torch.isnan(p[0]) and torch.isfinite(p[1]) and torch.isfinite(p[3])


@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        ("NAdamW", dict(momentum_decay=-1.0), "momentum_decay"),
        ("NAdamW", dict(betas=(0.9, 1.0)), "betas\\[1\\]"),
        ("RAdam", dict(eps=-1.0), "eps"),
        ("QHAdamW", dict(nus=(1.5, 1.0)), "nus\\[0\\]"),
        ("QHAdamW", dict(nus=(1.0,)), "nus"),
        ("Lion", dict(betas=(1.5, 0.99)), "betas\\[0\\]"),
        ("Lion", dict(weight_decay=-0.1), "weight_decay"),
        ("Lion", dict(lr=-1e-4), "lr"),
        ("ScheduleFreeAdamW", dict(betas=(1.0, 0.999)), "betas\\[0\\]"),
        ("ScheduleFreeAdamW", dict(weight_decay=-0.1), "weight_decay"),
        ("ScheduleFreeSGD", dict(momentum=0.0), "momentum"),
        ("ScheduleFreeSGD", dict(warmup_steps=1.5), "warmup_steps"),
    ],
)
def test_elementwise_family_rejects_bad_hyperparameters(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        getattr(tox, name)(_param(), **kwargs)


@pytest.mark.parametrize("name", ["NAdamW", "RAdam", "QHAdamW", "Lion", "ScheduleFreeAdamW", "ScheduleFreeSGD"])
def test_elementwise_family_rejects_sparse_gradients(name):
    p = torch.zeros(5)
    opt = getattr(tox, name)([p])
    p.grad = torch.sparse_coo_tensor(torch.tensor([[1, 3]]), torch.tensor([1.0, 2.0]), (5,))
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
