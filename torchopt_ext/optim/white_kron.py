"""White-Kron "skew" / "quad": eformer's blocked Kronecker PSGD (white_kron.md)."""

from __future__ import annotations

from typing import Any, Iterable, Optional, Union

import torch

from ._base import (
    FusedOptimizer,
    check_lr,
    check_non_negative,
    check_range,
    check_stacked,
    draw_seed,
    is_dtensor,
    local,
    sharded_stacked_group,
)
from ._ownership import OwnedStateMixin

_STYLES = ("skew", "quad")
_LR_STYLES = ("adam", None)
_DTYPES = (torch.bfloat16, torch.float32)


class WhiteKron(OwnedStateMixin, FusedOptimizer):
    """eformer's ``skew`` / ``quad`` optimizers (argument names and defaults of
    white_kron.md, ``lr`` as the learning rate; ``update_style`` picks the
    preconditioner update: ``"skew"``, Procrustes-regularised, or ``"quad"``).

    Per step t (from 1), per param: ``mu <- b1 mu + (1 - b1) g`` (stored in
    ``dtype``), ``u = mu / (1 - b1^t)`` (``b1 = 0``: ``u = g``); with
    ``normalize_grads`` ``u /= ||u|| + 1e-6``. ``u`` is reshaped to eformer's
    merged 2-D shape and preconditioned by Kronecker factors fitted on it
    (plus ``noise_scale`` Gaussian noise), with preconditioner step
    ``plr = max(preconditioner_lr (1 + t/10000)^{-1/2}, 0.4)`` (so never below
    0.4, as eformer) and Lipschitz-normalised updates:

    - 1-D (and shapes whose product is their largest dim): diagonal ``q``;
    - both merged dims <= ``max_size_dense``: ``block_size`` tiles with dense
      ``Ql``/``Qr`` each (zero-padded edges, identity on the valid part); all
      tiles of the group's dense params are updated as one batch; every
      ``balance_every`` (100) steps the two factors of a tile are rescaled to
      equal max-abs before the update;
    - both dims larger: diagonal factors on both sides;
    - one dim larger: that side diagonal, the other cut into ``block_size``
      strips with a dense factor each.

    Then ``u *= 1.1 / max(rms(u), 1.1)``, ``/5`` with ``lr_style="adam"``
    (``None``: no division), and ``p <- p - lr (u + weight_decay p)``.

    Numerics: math in fp32 (eformer runs it in ``dtype``, bf16 by default);
    factors and ``mu`` are stored in ``dtype`` (bf16 or fp32; fp64 params keep
    fp64 state), Lipschitz scalars in fp32. Noise and the randomised norm
    bounds draw from generators seeded by ``seed`` and the step in the order
    documented in ``functional/white_kron.h`` (reproducible; the float64
    reference in ``tests/reference/white_kron.py`` replays it). Not offered:
    the pipeline-axis sharding options and the weight-decay mask. NaN/Inf grads
    propagate into the params. State: ``step``, ``mu`` (with ``b1 > 0``),
    ``ql``, ``qr``, ``lip_l``, ``lip_r`` (shapes in ``white_kron.h``).

    ``stacked=True`` (a group option, eformer's ``scanned_layers``): every
    param of the group is (L, ...) with at least 2 dims, and each slice
    ``p[i]`` is preconditioned on its own, with the path and tiles of
    ``p.shape[1:]``; ``ql``, ``qr``, ``lip_l`` and ``lip_r`` gain a leading L
    axis (``mu`` is param-shaped). The op receives the slices as entries
    (views, updated in place), params in group order and slices 0..L-1, so
    all dense tiles of all slices join the group's one tile stack (L slices
    cost one batch) and the draws are those of the slices listed as params.
    Stacked DTensor params (FSDP2's ``Shard(0)`` on a 1-D mesh, sharded along
    L) hold whole slices: each rank steps its own slices on the local shards,
    with no gather or other communication, and its state (``ql`` ... and
    ``mu``) is sharded the same way. The slices' draws are keyed by their
    places in the whole group's entry list, so the result is bitwise that of
    one process. Other DTensor placements in stacked groups are an error.
    """

    _op = "white_kron_step_"
    _state_keys = ("mu", "ql", "qr", "lip_l", "lip_r")
    _whole_tensor_op = True  # tiles need the whole matrix
    _owner_state_keys = ("ql", "qr", "lip_l", "lip_r")  # on the param's owner only (distributed_mode)
    _update_style: Optional[str] = None  # fixed by Skew / Quad
    _local_shards = False  # set while a stacked Shard(0) group is collected (_init_group)

    def __init__(
        self,
        params: Iterable[Any],
        lr: Union[float, torch.Tensor] = 1e-3,
        b1: float = 0.95,
        weight_decay: float = 0.1,
        update_style: str = "skew",
        lr_style: Optional[str] = "adam",
        normalize_grads: bool = False,
        max_size_dense: int = 16384,
        preconditioner_lr: float = 0.7,
        preconditioner_init_scale: float = 1.0,
        dtype: torch.dtype = torch.bfloat16,
        block_size: int = 256,
        noise_scale: float = 1e-9,
        seed: Optional[int] = None,
        *,
        balance_every: int = 100,
        maximize: bool = False,
        stochastic_rounding: bool = False,
        stacked: bool = False,
    ) -> None:
        if self._update_style is not None:
            update_style = self._update_style
        defaults = dict(
            lr=lr,
            b1=b1,
            weight_decay=weight_decay,
            update_style=update_style,
            lr_style=lr_style,
            normalize_grads=normalize_grads,
            max_size_dense=max_size_dense,
            preconditioner_lr=preconditioner_lr,
            preconditioner_init_scale=preconditioner_init_scale,
            dtype=dtype,
            block_size=block_size,
            noise_scale=noise_scale,
            balance_every=balance_every,
            maximize=maximize,
            state_dtype=None,
            stochastic_rounding=stochastic_rounding,
            stacked=stacked,
            # The noise and norm-bound draws always need a seed.
            seed=draw_seed(seed, True),
        )
        super().__init__(params, defaults)
        self._init_distributed_mode()

    def _check_group(self, group: dict[str, Any]) -> None:
        check_lr(group["lr"])
        check_range("b1 value", group["b1"], 0.0, 1.0)
        check_non_negative("weight_decay value", group["weight_decay"])
        style = str(group["update_style"]).lower()
        if style not in _STYLES:
            raise ValueError(f"Invalid update_style: must be 'skew' or 'quad', got {group['update_style']!r}")
        group["update_style"] = style
        if group["lr_style"] not in _LR_STYLES:
            raise ValueError(f"Invalid lr_style: must be 'adam' or None, got {group['lr_style']!r}")
        for name in ("max_size_dense", "block_size", "balance_every"):
            value = group[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Invalid {name}: must be an int >= 1, got {value!r}")
        if not group["preconditioner_lr"] > 0:
            raise ValueError(f"Invalid preconditioner_lr: must be > 0, got {group['preconditioner_lr']}")
        if not group["preconditioner_init_scale"] > 0:
            raise ValueError(
                f"Invalid preconditioner_init_scale: must be > 0, got {group['preconditioner_init_scale']}"
            )
        if group["dtype"] not in _DTYPES:
            raise ValueError(f"Invalid dtype: must be torch.bfloat16 or torch.float32, got {group['dtype']}")
        check_non_negative("noise_scale value", group["noise_scale"])
        check_stacked(group)
        self._sharded_stacked_group(group)  # raises for other DTensor placements

    def _uses_state(self, group: dict[str, Any], key: str) -> bool:
        return key != "mu" or group["b1"] > 0

    def _owner_param_keys(self, group: dict[str, Any], p: torch.Tensor) -> list[str]:
        return ["mu"] if group["b1"] > 0 else []

    def _owner_op_kwargs(self, group, params, owned, whole, plan) -> dict[str, Any]:
        # The op keys its draws by the params' places in the whole group's
        # call (functional/white_kron.h), so an owner's step equals one process's.
        tiles = []
        for p in params:
            ql, qr = self._state_shape(p, "ql"), self._state_shape(p, "qr")
            tiles.append(ql[0] if len(ql) == 3 and len(qr) == 3 else None)  # dense: tiles on both sides
        first_tile, total = {}, 0
        for j, t in enumerate(tiles):
            if t is not None:
                first_tile[j] = total
                total += t
        kwargs: dict[str, Any] = {"param_indices": list(owned)}
        dense = [j for j in owned if tiles[j] is not None]
        if dense:
            # The stack's stream step: the group's first dense param's step after this call's increment.
            step = int(float(self.state[params[min(first_tile)]]["step"])) + 1
            kwargs["dense_tiles"] = [total, step] + [first_tile[j] for j in dense]
        return kwargs

    def _fresh(
        self, p: torch.Tensor, group: dict[str, Any], shape: Optional[tuple[int, ...]] = None
    ) -> list[torch.Tensor]:
        # A storage-free stand-in with p's shape (or `shape`) / dtype / device:
        # the factors are whole-matrix tensors, also for DTensor params (no
        # DTensor dispatch).
        device = p.device if p.device.type == "meta" else local(p).device
        shape_only = torch.empty((), dtype=p.dtype, device=device).expand(p.shape if shape is None else shape)
        return torch.ops.torchopt_ext.white_kron_init_state(
            shape_only, group["max_size_dense"], group["block_size"], group["preconditioner_init_scale"], group["dtype"]
        )

    def _state_shape(self, p: torch.Tensor, key: str) -> Optional[tuple[int, ...]]:
        if key == "mu":
            return tuple(p.shape)
        group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
        meta = torch.empty(p.shape, dtype=p.dtype, device="meta")
        fresh = self._new_state(meta, group, key)
        return tuple(fresh.shape)

    def _state_dtype(self, p: torch.Tensor, group: dict[str, Any], key: str) -> torch.dtype:
        if p.dtype == torch.float64:
            return torch.float64
        if key in ("lip_l", "lip_r"):
            return torch.float32
        return group["dtype"]

    def _new_state(self, p: torch.Tensor, group: dict[str, Any], key: str) -> torch.Tensor:
        if key == "mu":
            return torch.zeros_like(p, dtype=self._state_dtype(p, group, key), memory_format=torch.contiguous_format)
        index = self._state_keys.index(key) - 1
        if not group["stacked"]:
            return self._fresh(p, group)[index]
        # One slice's fresh state, repeated along a leading L axis.
        one = self._fresh(p, group, tuple(p.shape[1:]))[index]
        full = one.unsqueeze(0).repeat(p.shape[0], *([1] * one.dim()))
        if is_dtensor(p):
            # Sharded along L like the param (src_data_rank=None: each rank
            # keeps its own slices, no communication).
            from torch.distributed.tensor import distribute_tensor

            return distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
        return full

    def _owner_supported(self, group: dict[str, Any]) -> bool:
        # Stacked groups slice their params in _group_step; Shard(0) DTensor
        # params step their own slices there (no ownership path).
        return not group["stacked"]

    @staticmethod
    def _sharded_stacked_group(group: dict[str, Any]) -> bool:
        """Whether a stacked group holds DTensor params; then every param must
        be Shard(0) on a 1-D mesh (sharded along L: whole slices per rank)."""
        return sharded_stacked_group("WhiteKron", group)

    def _unwrappers(self):
        if self._local_shards:
            return local, local
        return super()._unwrappers()

    def _init_group(self, group, params, grads, state_steps, *state_lists):
        # Shard(0) of a stacked param holds whole slices: the op steps the
        # local shards (the state is sharded the same way), no gather.
        self._local_shards = self._sharded_stacked_group(group)
        try:
            super()._init_group(group, params, grads, state_steps, *state_lists)
        finally:
            self._local_shards = False

    def _slice_tiles(self, p: torch.Tensor, group: dict[str, Any]) -> Optional[int]:
        """Dense tiles of one slice of a stacked p (None: not a dense path)."""
        meta = torch.empty(p.shape[1:], dtype=p.dtype, device="meta")
        ql, qr = self._fresh(meta, group)[:2]
        return ql.shape[0] if ql.dim() == 3 and qr.dim() == 3 else None

    def _sharded_stacked_kwargs(self, group: dict[str, Any]) -> dict[str, Any]:
        """The op's keys for this rank's slices: each slice's index in the
        whole group's entry list (params with grads in order, slices 0..L-1)
        and, for the dense tile stack, [tiles of the whole stack, its stream
        step, first tile of each local dense slice], as the ownership path
        passes them (functional/white_kron.h). Shard(0) follows torch.chunk:
        ceil(L / n) slices per rank."""
        indices, firsts = [], []
        entry = tile = 0
        stream_step = None
        for p in group["params"]:
            if p.grad is None:
                continue
            total, ranks = p.shape[0], p.device_mesh.size()
            first = min(p.device_mesh.get_local_rank() * -(-total // ranks), total)
            mine = range(first, first + local(p).shape[0])
            indices += [entry + i for i in mine]
            tiles = self._slice_tiles(p, group)
            if tiles is not None:
                if stream_step is None:  # the single process's first dense entry, after its increment
                    stream_step = int(float(self.state[p]["step"])) + 1
                firsts += [tile + i * tiles for i in mine]
                tile += total * tiles
            entry += total
        kwargs: dict[str, Any] = {"param_indices": indices}
        if firsts:
            kwargs["dense_tiles"] = [tile, stream_step] + firsts
        return kwargs

    def _group_step(self, group: dict[str, Any], amp: dict[str, Any]) -> None:
        params, grads, state_steps = [], [], []
        state_lists = [[] for _ in self._state_keys]
        self._init_group(group, params, grads, state_steps, *state_lists)
        if not params:
            return
        if group["stacked"]:
            sharded = self._sharded_stacked_group(group)
            if sharded:
                # Before the op: it advances the step counters.
                group = dict(group, _owner_op_kwargs=self._sharded_stacked_kwargs(group))
            # Here, not in _init_group (which torch.compile runs untraced:
            # views made there would reach the op as unrelated inputs).
            layers = [p.shape[0] for p in params]
            # A rank may hold no slice of a param (L < ranks): no entry advances its counter.
            idle = [s for s, n in zip(state_steps, layers) if n == 0]
            params, grads, *state_lists = [
                [t[i] for t, n in zip(entries, layers) for i in range(n)] if entries else []
                for entries in [params, grads, *state_lists]
            ]
            # The op counts every entry's step: slices after the first get
            # throwaway copies so the param's counter advances once.
            state_steps = [s if i == 0 else s.clone() for s, n in zip(state_steps, layers) for i in range(n)]
            if idle:
                found_inf = amp.get("found_inf")
                # Host read of a CPU tensor, as the op's own found_inf check.
                if found_inf is None or not bool(found_inf.item()):
                    torch._foreach_add_(idle, 1.0)
            if not params:
                return
        self._run_op(group, params, grads, state_lists, state_steps, amp)
        self._whole_tensors.write_back()

    def _op_kwargs(self, group: dict[str, Any]) -> dict[str, Any]:
        return dict(
            update_style=group["update_style"],
            b1=group["b1"],
            weight_decay=group["weight_decay"],
            lr_style=group["lr_style"] or "none",
            normalize_grads=group["normalize_grads"],
            max_size_dense=group["max_size_dense"],
            preconditioner_lr=group["preconditioner_lr"],
            block_size=group["block_size"],
            noise_scale=group["noise_scale"],
            balance_every=group["balance_every"],
            maximize=group["maximize"],
        )


class Skew(WhiteKron):
    """:class:`WhiteKron` with ``update_style="skew"`` (eformer's ``skew``)."""

    _update_style = "skew"


class Quad(WhiteKron):
    """:class:`WhiteKron` with ``update_style="quad"`` (eformer's ``quad``)."""

    _update_style = "quad"
