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


@torch.library.register_fake("torchopt_ext::adam_magma_step_")
def _adam_magma_step_fake(
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, magma_scores, state_steps, lr, **kwargs
) -> None:
    _check_lengths(
        "adam_magma_step_",
        params,
        grads=grads,
        exp_avgs=exp_avgs,
        exp_avg_sqs=exp_avg_sqs,
        max_exp_avg_sqs=max_exp_avg_sqs,
        magma_scores=magma_scores,
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


def _norm_sqs_fake(op: str, params, k: int, **lists) -> torch.Tensor:
    _check_lengths(op, params, **lists)
    device = params[0].device if params else torch.device("cpu")
    return torch.empty((len(params), k), dtype=torch.float64, device=device)


@torch.library.register_fake("torchopt_ext::lamb_norm_sqs")
def _lamb_norm_sqs_fake(params, grads, exp_avgs, exp_avg_sqs, state_steps, lr, **kwargs) -> torch.Tensor:
    return _norm_sqs_fake(
        "lamb_norm_sqs", params, 2, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs, state_steps=state_steps
    )


@torch.library.register_fake("torchopt_ext::mars_norm_sqs")
def _mars_norm_sqs_fake(
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, last_grads, state_steps, lr, **kwargs
) -> torch.Tensor:
    return _norm_sqs_fake(
        "mars_norm_sqs",
        params,
        1,
        grads=grads,
        exp_avgs=exp_avgs,
        exp_avg_sqs=exp_avg_sqs,
        max_exp_avg_sqs=max_exp_avg_sqs,
        last_grads=last_grads,
        state_steps=state_steps,
    )


@torch.library.register_fake("torchopt_ext::muon_step_")
def _muon_step_fake(params, grads, momentum_buffers, magma_scores, state_steps, lr, **kwargs) -> None:
    _check_lengths(
        "muon_step_",
        params,
        grads=grads,
        momentum_buffers=momentum_buffers,
        magma_scores=magma_scores,
        state_steps=state_steps,
    )


@torch.library.register_fake("torchopt_ext::prism_step_")
def _prism_step_fake(params, grads, momentum_buffers, magma_scores, state_steps, lr, **kwargs) -> None:
    _check_lengths(
        "prism_step_",
        params,
        grads=grads,
        momentum_buffers=momentum_buffers,
        magma_scores=magma_scores,
        state_steps=state_steps,
    )


@torch.library.register_fake("torchopt_ext::muon_momentum_")
def _muon_momentum_fake(grads, momentum_buffers, state_steps, ns_inputs, magma_sums, **kwargs) -> None:
    _check_lengths(
        "muon_momentum_", grads, momentum_buffers=momentum_buffers, state_steps=state_steps, ns_inputs=ns_inputs
    )


@torch.library.register_fake("torchopt_ext::prism_momentum_")
def _prism_momentum_fake(
    grads, momentum_buffers, state_steps, targets, innovations, lookahead_grads, magma_sums, **kwargs
) -> None:
    _check_lengths(
        "prism_momentum_",
        grads,
        momentum_buffers=momentum_buffers,
        state_steps=state_steps,
        targets=targets,
        innovations=innovations,
        lookahead_grads=lookahead_grads,
    )


@torch.library.register_fake("torchopt_ext::prism_shape")
def _prism_shape_fake(target, innovation, grad=None, **kwargs):
    if target.dim() != 2 or innovation.shape != target.shape:
        raise ValueError("prism_shape: target and innovation must be (rows, cols) matrices of one shape")
    return torch.empty(target.shape, dtype=target.dtype, device=target.device)


@torch.library.register_fake("torchopt_ext::matrix_apply_")
def _matrix_apply_fake(params, updates, magma_scores, state_steps, lr, *, matrix_sizes, **kwargs) -> None:
    _check_lengths("matrix_apply_", params, updates=updates, magma_scores=magma_scores, state_steps=state_steps)
    if len(matrix_sizes) != 2 * len(params):
        raise ValueError(
            f"matrix_apply_: matrix_sizes must hold (rows, cols) per param, got {len(matrix_sizes)} values"
        )


@torch.library.register_fake("torchopt_ext::kron_step_")
def _kron_step_fake(params, grads, momentum_buffers, preconditioners, lipschitz, magma_scores, state_steps, lr, **kw):
    _check_lengths(
        "kron_step_",
        params,
        grads=grads,
        momentum_buffers=momentum_buffers,
        preconditioners=preconditioners,
        lipschitz=lipschitz,
        magma_scores=magma_scores,
        state_steps=state_steps,
    )


@torch.library.register_fake("torchopt_ext::prism_nadamw_step_")
def _prism_nadamw_step_fake(params, grads, exp_avgs, exp_avg_sqs, state_steps, lr, **kwargs) -> None:
    _check_lengths(
        "prism_nadamw_step_", params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs, state_steps=state_steps
    )


@torch.library.register_fake("torchopt_ext::kron_psgd_step_")
def _kron_psgd_step_fake(params, grads, momentum_buffers, ql, qr, state_steps, lr, **kwargs) -> None:
    _check_lengths("kron_psgd_step_", params, grads=grads, momentum_buffers=momentum_buffers, state_steps=state_steps)
    matrices = sum(1 for p in params if p.dim() == 2)
    if len(ql) != matrices or len(qr) != matrices:
        raise ValueError(
            f"kron_psgd_step_: ql and qr need one factor per 2-D param ({matrices}), got {len(ql)} and {len(qr)}"
        )


@torch.library.register_fake("torchopt_ext::white_kron_step_")
def _white_kron_step_fake(params, grads, mus, ql, qr, lip_l, lip_r, state_steps, lr, **kwargs) -> None:
    _check_lengths(
        "white_kron_step_",
        params,
        grads=grads,
        mus=mus,
        ql=ql,
        qr=qr,
        lip_l=lip_l,
        lip_r=lip_r,
        state_steps=state_steps,
    )
    if len(ql) != len(params):
        raise ValueError(f"white_kron_step_: ql has {len(ql)} tensors but params has {len(params)}")


@torch.library.register_fake("torchopt_ext::newton_schulz")
def _newton_schulz_fake(input, *, dtype=None, **kwargs):
    if input.dim() < 2:
        raise ValueError(f"newton_schulz: input must have at least 2 dims, got {input.dim()}")
    return input.new_empty(input.shape, dtype=dtype or input.dtype)


@torch.library.register_fake("torchopt_ext::schedulefree_adamw_step_")
def _schedulefree_adamw_step_fake(
    params, grads, zs, exp_avg_sqs, weight_sums, lr_maxes, state_steps, lr, **kwargs
) -> None:
    _check_lengths(
        "schedulefree_adamw_step_",
        params,
        grads=grads,
        zs=zs,
        exp_avg_sqs=exp_avg_sqs,
        weight_sums=weight_sums,
        lr_maxes=lr_maxes,
        state_steps=state_steps,
    )


@torch.library.register_fake("torchopt_ext::schedulefree_sgd_step_")
def _schedulefree_sgd_step_fake(params, grads, zs, weight_sums, lr_maxes, state_steps, lr, **kwargs) -> None:
    _check_lengths(
        "schedulefree_sgd_step_",
        params,
        grads=grads,
        zs=zs,
        weight_sums=weight_sums,
        lr_maxes=lr_maxes,
        state_steps=state_steps,
    )


@torch.library.register_fake("torchopt_ext::schedulefree_set_mode_")
def _schedulefree_set_mode_fake(params, zs, **kwargs) -> None:
    _check_lengths("schedulefree_set_mode_", params, zs=zs)


@torch.library.register_fake("torchopt_ext::schedulefree_wrapper_pre_")
def _schedulefree_wrapper_pre_fake(params, zs, sf_state, lr, **kwargs) -> None:
    _check_lengths("schedulefree_wrapper_pre_", params, zs=zs)


@torch.library.register_fake("torchopt_ext::schedulefree_wrapper_post_")
def _schedulefree_wrapper_post_fake(params, zs, sf_state, lr, **kwargs) -> None:
    _check_lengths("schedulefree_wrapper_post_", params, zs=zs)


@torch.library.register_fake("torchopt_ext::schedulefree_polyak_")
def _schedulefree_polyak_fake(params, grads, zs, polyak_state, loss, sf_state, **kwargs) -> None:
    _check_lengths("schedulefree_polyak_", params, grads=grads, zs=zs)


@torch.library.register_fake("torchopt_ext::sophia_step_")
def _sophia_step_fake(params, grads, exp_avgs, hessians, state_steps, lr, **kwargs) -> None:
    _check_lengths("sophia_step_", params, grads=grads, exp_avgs=exp_avgs, hessians=hessians, state_steps=state_steps)


@torch.library.register_fake("torchopt_ext::sophia_update_hessian_")
def _sophia_update_hessian_fake(hessians, estimates, **kwargs) -> None:
    _check_lengths("sophia_update_hessian_", hessians, estimates=estimates)


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


@torch.library.register_fake("torchopt_ext::adafactor_stage_")
def _adafactor_stage_fake(
    stage, params, grads, row_vars, col_vars, variances, exp_avgs, state_steps, lr, stats, **kwargs
) -> None:
    _adafactor_step_fake(params, grads, row_vars, col_vars, variances, exp_avgs, state_steps, lr)
    _check_lengths("adafactor_stage_", params, stats=stats)


@torch.library.register_fake("torchopt_ext::soap_step_")
def _soap_step_fake(params, grads, exp_avgs, exp_avg_sqs, GGs, Qs, state_steps, lr, **kwargs) -> None:
    _check_lengths(
        "soap_step_",
        params,
        grads=grads,
        exp_avgs=exp_avgs,
        exp_avg_sqs=exp_avg_sqs,
        GGs=GGs,
        Qs=Qs,
        state_steps=state_steps,
    )


@torch.library.register_fake("torchopt_ext::raw_global_grad_clip_")
def _raw_global_grad_clip_fake(grads, max_norm, sum_of_squares=None):
    device = grads[0].device if grads else torch.device("cpu")
    return torch.empty((), dtype=torch.bool, device=device)
