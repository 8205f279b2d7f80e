"""Adam (coupled L2 weight decay by default) on the fused torchopt_ext kernel."""

from __future__ import annotations

from typing import Any, Iterable, Optional, Union

import torch

from ._base import FusedOptimizer, check_adam_like, check_magma, draw_seed, is_dtensor, torch_switches


class Adam(FusedOptimizer):
    """Drop-in for ``torch.optim.Adam`` (same argument names and defaults).

    Extra arguments: ``state_dtype`` (storage dtype of the moments; default the
    param's dtype, math is always fp32 or wider), ``stochastic_rounding`` (bf16
    params are rounded stochastically after each update) and ``seed`` (its
    random stream; default drawn from torch's generator). Weight decay is
    coupled (added to the gradient) unless ``decoupled_weight_decay=True``.

    Magma (``use_magma``, ``magma_p``, ``magma_tau``; rollfast.md §5, defaults
    False / 0.5 / 2.0): per param tensor and step, the cosine between the raw
    gradient (negated with ``maximize``) and ``exp_avg`` after this step's
    update (no bias correction) smooths a score ``s <- 0.9 s + 0.1
    sigmoid(cos / tau)`` (fp32 state ``magma_score``, 0.5 at first), and a
    Bernoulli(p) draw ``z`` from a counter-based hash of (``seed``, tensor
    index in the group, step) keeps or drops the tensor's update: the whole
    update, decoupled decay included, is scaled by ``z * s`` (no 1/p
    rescaling: expect ~0.25x attenuation, rollfast suggests ~4x the lr). The
    moments are updated every step. With coupled decay (Adam) the decay is
    already inside the moments. One fused op (``adam_magma_step_``);
    ``use_magma=False`` runs the plain ``adam_step_`` kernel.
    """

    _op = "adam_step_"
    _state_keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "magma_score")
    _scalar_state_keys = ("magma_score",)
    _device_steps = True

    def __init__(
        self,
        params: Iterable[Any],
        lr: Union[float, torch.Tensor] = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: Optional[bool] = None,
        decoupled_weight_decay: bool = False,
        state_dtype: Optional[torch.dtype] = None,
        stochastic_rounding: bool = False,
        seed: Optional[int] = None,
        use_magma: bool = False,
        magma_p: float = 0.5,
        magma_tau: float = 2.0,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            decoupled_weight_decay=decoupled_weight_decay,
            state_dtype=state_dtype,
            stochastic_rounding=stochastic_rounding,
            seed=draw_seed(seed, stochastic_rounding or use_magma),
            use_magma=use_magma,
            magma_p=magma_p,
            magma_tau=magma_tau,
        )
        defaults.update(
            torch_switches(
                type(self).__name__, foreach=foreach, capturable=capturable, differentiable=differentiable, fused=fused
            )
        )
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_adam_like(group)
        check_magma(group)

    def _uses_state(self, group: dict[str, Any], key: str) -> bool:
        if key == "magma_score":
            return group["use_magma"]
        return key != "max_exp_avg_sq" or group["amsgrad"]

    def _new_state(self, p: torch.Tensor, group: dict[str, Any], key: str) -> torch.Tensor:
        if key == "magma_score":
            return torch.full((), 0.5, dtype=torch.float32, device=self._scalar_device(p))
        return super()._new_state(p, group, key)

    def _group_step(self, group: dict[str, Any], amp: dict[str, Any]) -> None:
        # Magma scores the cosine of whole tensors: DTensor (FSDP2) params
        # of a Magma group are gathered for the op (as WholeTensors does for
        # LAMB's gather path), so every rank scores and masks like one
        # process; without Magma the op runs on the local shards.
        self._gather_now = group["use_magma"] and any(is_dtensor(p) for p in group["params"])
        try:
            super()._group_step(group, amp)
        finally:
            self._gather_now = False

    def _op_for(self, group: dict[str, Any], state_lists: list) -> tuple[str, list, dict[str, Any]]:
        if group["use_magma"]:
            return "adam_magma_step_", state_lists, {"magma_p": group["magma_p"], "magma_tau": group["magma_tau"]}
        return "adam_step_", state_lists[:3], {}

    def _decoupled(self, group: dict[str, Any]) -> bool:
        return group["decoupled_weight_decay"]

    def _op_kwargs(self, group: dict[str, Any]) -> dict[str, Any]:
        beta1, beta2 = group["betas"]
        return dict(
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            decoupled_weight_decay=self._decoupled(group),
            amsgrad=group["amsgrad"],
            maximize=group["maximize"],
        )
