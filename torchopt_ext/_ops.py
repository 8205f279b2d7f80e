"""Fake (meta) implementations of the torchopt_ext ops.

The ops mutate their list arguments and return nothing, so under FakeTensor
(torch.compile, opcheck) there is nothing to compute: these only check that
the lists line up, so a mismatch fails at trace time with a clear message
instead of inside the compiled graph.
"""

import torch


def _check_lengths(op: str, params, **lists) -> None:
    for name, values in lists.items():
        if values is not None and len(values) not in (0, len(params)):
            raise ValueError(f"{op}: {name} has {len(values)} tensors but params has {len(params)}")


@torch.library.register_fake("torchopt_ext::adam_step_")
def _adam_step_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, **kwargs) -> None:
    _check_lengths(
        "adam_step_",
        params,
        grads=grads,
        exp_avgs=exp_avgs,
        exp_avg_sqs=exp_avg_sqs,
        max_exp_avg_sqs=max_exp_avg_sqs,
        state_steps=state_steps,
    )


@torch.library.register_fake("torchopt_ext::sgd_step_")
def _sgd_step_fake(params, grads, momentum_buffers, state_steps, lr, **kwargs) -> None:
    _check_lengths("sgd_step_", params, grads=grads, momentum_buffers=momentum_buffers, state_steps=state_steps)


@torch.library.register_fake("torchopt_ext::lion_step_")
def _lion_step_fake(params, grads, exp_avgs, state_steps, lr, **kwargs) -> None:
    _check_lengths("lion_step_", params, grads=grads, exp_avgs=exp_avgs, state_steps=state_steps)


@torch.library.register_fake("torchopt_ext::nadam_step_")
def _nadam_step_fake(params, grads, exp_avgs, exp_avg_sqs, mu_products, state_steps, lr, **kwargs) -> None:
    _check_lengths(
        "nadam_step_",
        params,
        grads=grads,
        exp_avgs=exp_avgs,
        exp_avg_sqs=exp_avg_sqs,
        mu_products=mu_products,
        state_steps=state_steps,
    )


@torch.library.register_fake("torchopt_ext::radam_step_")
def _radam_step_fake(params, grads, exp_avgs, exp_avg_sqs, state_steps, lr, **kwargs) -> None:
    _check_lengths(
        "radam_step_", params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs, state_steps=state_steps
    )


@torch.library.register_fake("torchopt_ext::qhadam_step_")
def _qhadam_step_fake(params, grads, exp_avgs, exp_avg_sqs, state_steps, lr, **kwargs) -> None:
    _check_lengths(
        "qhadam_step_", params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs, state_steps=state_steps
    )


@torch.library.register_fake("torchopt_ext::mars_step_")
def _mars_step_fake(
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, last_grads, state_steps, lr, **kwargs
) -> None:
    _check_lengths(
        "mars_step_",
        params,
        grads=grads,
        exp_avgs=exp_avgs,
        exp_avg_sqs=exp_avg_sqs,
        max_exp_avg_sqs=max_exp_avg_sqs,
        last_grads=last_grads,
        state_steps=state_steps,
    )


@torch.library.register_fake("torchopt_ext::lamb_step_")
def _lamb_step_fake(params, grads, exp_avgs, exp_avg_sqs, state_steps, lr, **kwargs) -> None:
    _check_lengths(
        "lamb_step_", params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs, state_steps=state_steps
    )


@torch.library.register_fake("torchopt_ext::adafactor_step_")
def _adafactor_step_fake(params, grads, row_vars, col_vars, variances, exp_avgs, state_steps, lr, **kwargs) -> None:
    _check_lengths("adafactor_step_", params, grads=grads, exp_avgs=exp_avgs, state_steps=state_steps)
    # Factored state only for params with dim >= 2, full variances for the rest.
    factored = sum(1 for p in params if p.dim() >= 2)
    if len(row_vars) != factored or len(col_vars) != factored:
        raise ValueError(
            f"adafactor_step_: row_vars and col_vars have {len(row_vars)} and {len(col_vars)} tensors but "
            f"{factored} params have dim >= 2"
        )
    if len(variances) != len(params) - factored:
        raise ValueError(
            f"adafactor_step_: variances has {len(variances)} tensors but {len(params) - factored} params have dim < 2"
        )
