"""Whole-matrix ownership for the matrix optimizers under FSDP2 / DDP (issue 8).

Each matrix of a param group gets one owner rank (greedy, balanced by the
cost of its matrix function ~ rows * cols * min(rows, cols)). The element-wise
part of the step runs where the data lives (local shards of Shard(0)
DTensors, or every replica of replicated params); the matrix-function inputs
go to the owners with one ``all_to_all_single`` per dtype, the owner runs the
matrix function on the whole matrix, and the rows of the result go back the
same way. So each matrix is processed once in the job, and a rank receives
only the matrices it owns plus its own rows of the results, instead of
all-gathering every param and state tensor (``WholeTensors``).

Layouts: a 1-D mesh with ``Shard(0)`` (uneven and empty shards included; the
rows follow ``torch.chunk``, as DTensor's) or replicated tensors (``Replicate()``
DTensors, or plain tensors when the optimizer's ``distributed_mode`` is
``"replicated"``: DDP). Other layouts take the gather path.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from ._base import _COMM, is_dtensor


def comm_bytes() -> int:
    return _COMM["bytes"]


def reset_comm_bytes() -> None:
    _COMM["bytes"] = 0


def count_comm_bytes(n: int) -> None:
    """Adds n bytes sent to other ranks (all-to-all payloads, Magma's all-reduce)."""
    _COMM["bytes"] += int(n)


def assign_owners(sizes: list[tuple[int, int]], world_size: int) -> list[int]:
    """Owner rank per (rows, cols) matrix: largest cost first to the least
    loaded rank (ties: lowest rank), so every rank computes the same map."""
    load = [0] * world_size
    owners = [0] * len(sizes)
    order = sorted(range(len(sizes)), key=lambda j: (-_cost(sizes[j]), j))
    for j in order:
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owners[j] = rank
        load[rank] += _cost(sizes[j])
    return owners


def _cost(size: tuple[int, int]) -> int:
    rows, cols = size
    return rows * cols * max(1, min(rows, cols))


def chunk_rows(rows: int, world_size: int, rank: int) -> tuple[int, int]:
    """[start, stop) of ``rank``'s rows under Shard(0) (torch.chunk's split:
    ceil(rows / world_size) per rank, trailing ranks short or empty)."""
    size = -(-rows // world_size) if rows else 0
    start = min(rows, rank * size)
    return start, min(rows, start + size)


@dataclass
class MatrixLayout:
    """One matrix of a group: its whole (rows, cols) view, whether its data is
    sharded (Shard(0)) or replicated, and its owner."""

    rows: int
    cols: int
    sharded: bool
    owner: int = 0

    def send_range(self, rank: int, world_size: int, owner_side: bool) -> tuple[int, int]:
        """Rows ``rank`` contributes to the owner (owner_side=False) or receives
        back from it (True)."""
        if self.sharded:
            return chunk_rows(self.rows, world_size, rank)
        if owner_side:
            return 0, self.rows  # every replica takes the whole result
        return (0, self.rows) if rank == self.owner else (0, 0)  # the owner has its copy


class OwnershipPlan:
    """Layouts, owners and the process group of one param group's matrices;
    None from ``build`` when the layout is not covered (gather path)."""

    def __init__(
        self,
        layouts: list[MatrixLayout],
        group: Any,
        rank: int,
        world_size: int,
        owners: Optional[list[int]] = None,
    ) -> None:
        self.layouts = layouts
        self.group = group
        self.rank = rank
        self.world_size = world_size
        if owners is None:
            owners = assign_owners([(m.rows, m.cols) for m in layouts], world_size)
        for layout, owner in zip(layouts, owners):
            layout.owner = owner

    def subset(self, indices: list[int]) -> OwnershipPlan:
        """The plan of some of the matrices, with the owners they have here
        (owners stay those of the whole group whichever params have grads)."""
        layouts = [self.layouts[j] for j in indices]
        return OwnershipPlan(layouts, self.group, self.rank, self.world_size, [m.owner for m in layouts])

    def with_layouts(self, layouts: list[MatrixLayout]) -> OwnershipPlan:
        """Another set of matrices (owners already set) over the same ranks."""
        return OwnershipPlan(layouts, self.group, self.rank, self.world_size, [m.owner for m in layouts])

    @property
    def sharded(self) -> bool:
        return any(m.sharded for m in self.layouts)

    @staticmethod
    def build(params: list[torch.Tensor], replicated_group: Optional[Any]) -> Optional[OwnershipPlan]:
        """``params``: the group's matrix params as the user holds them (DTensors
        or plain tensors). ``replicated_group``: the process group plain tensors
        are replicated over (DDP), or None (plain tensors: no ownership)."""
        import torch.distributed as dist

        if not params or not dist.is_available() or not dist.is_initialized():
            return None
        layouts = []
        group = None
        mesh = None
        for p in params:
            if p.dim() == 0:
                return None  # no rows to split: the gather path
            rows = p.shape[0]
            cols = p.numel() // rows if rows else 0
            if is_dtensor(p):
                if p.device_mesh.ndim != 1 or (mesh is not None and p.device_mesh != mesh):
                    return None
                mesh = p.device_mesh
                placement = p.placements[0]
                if placement.is_shard() and placement.dim == 0:
                    sharded = True
                elif placement.is_replicate():
                    sharded = False
                else:
                    return None
                layouts.append(MatrixLayout(rows, cols, sharded))
            else:
                if replicated_group is None:
                    return None
                layouts.append(MatrixLayout(rows, cols, False))
        if mesh is not None:
            if replicated_group is not None and any(not is_dtensor(p) for p in params):
                return None  # one group of ranks per param group
            group = mesh.get_group()
        else:
            group = replicated_group
        world_size = dist.get_world_size(group)
        rank = dist.get_rank(group)
        if world_size < 2:
            return None
        plan = OwnershipPlan(layouts, group, rank, world_size)
        for p, layout in zip(params, layouts):
            if layout.sharded:
                start, stop = chunk_rows(layout.rows, world_size, rank)
                if p.to_local().shape[0] != stop - start:
                    return None  # not torch.chunk's split: not covered
        return plan

    # -- communication -------------------------------------------------------

    def _all_to_all(self, send: list[list[torch.Tensor]], recv_numels: list[int], dtype: torch.dtype) -> torch.Tensor:
        """send[dst]: flat pieces for rank dst; recv_numels[src]: elements from src."""
        import torch.distributed as dist

        in_splits = [sum(t.numel() for t in pieces) for pieces in send]
        flat = [t.reshape(-1) for pieces in send for t in pieces]
        buffer = torch.cat(flat) if flat else torch.empty(0, dtype=dtype)
        out = torch.empty(sum(recv_numels), dtype=dtype)
        dist.all_to_all_single(out, buffer, recv_numels, in_splits, group=self.group)
        element = torch.empty((), dtype=dtype).element_size()
        count_comm_bytes(sum(n for dst, n in enumerate(in_splits) if dst != self.rank) * element)
        return out

    def to_owners(self, pieces: list[list[torch.Tensor]]) -> dict[int, list[torch.Tensor]]:
        """pieces[j]: the local tensors (any shape, this rank's rows) of matrix
        j, all of one dtype. Returns, for each matrix this rank owns, the whole
        (rows, cols) tensors in the same order."""
        ws, me = self.world_size, self.rank
        dtype = next((t.dtype for ts in pieces for t in ts), torch.float32)
        send: list[list[torch.Tensor]] = [[] for _ in range(ws)]
        for j, m in enumerate(self.layouts):
            start, stop = m.send_range(me, ws, owner_side=False)
            if stop > start:
                for t in pieces[j]:
                    t2 = t.reshape(t.shape[0], -1) if m.sharded else t.reshape(m.rows, m.cols)
                    send[m.owner].append(t2 if m.sharded else t2[start:stop])
        recv = [0] * ws
        for j, m in enumerate(self.layouts):
            if m.owner != me:
                continue
            for src in range(ws):
                start, stop = m.send_range(src, ws, owner_side=False)
                recv[src] += (stop - start) * m.cols * len(pieces[j])
        flat = self._all_to_all(send, recv, dtype)
        # Unpack: per source rank, the owned matrices in order, k tensors each.
        offsets = [sum(recv[:src]) for src in range(ws)]
        parts: dict[int, list[list[torch.Tensor]]] = {}
        for src in range(ws):
            for j, m in enumerate(self.layouts):
                if m.owner != me:
                    continue
                start, stop = m.send_range(src, ws, owner_side=False)
                n = (stop - start) * m.cols
                slots = parts.setdefault(j, [[] for _ in pieces[j]])
                for k in range(len(pieces[j])):
                    if n:
                        slots[k].append(flat[offsets[src] : offsets[src] + n].view(stop - start, m.cols))
                    offsets[src] += n
        return {
            j: [torch.cat(rows) if rows else flat.new_empty(0, self.layouts[j].cols) for rows in slots]
            for j, slots in parts.items()
        }

    def from_owners(self, results: dict[int, torch.Tensor], dtype: torch.dtype, count: int = 1) -> list[torch.Tensor]:
        """results: the (rows, cols) update of each matrix this rank owns, or
        (``count`` > 1) a list of ``count`` such tensors per matrix. Returns
        every matrix's rows for this rank (flat; with ``count`` > 1, a list of
        ``count`` flat tensors per matrix)."""
        ws, me = self.world_size, self.rank
        send: list[list[torch.Tensor]] = [[] for _ in range(ws)]
        for j, m in enumerate(self.layouts):
            if m.owner != me:
                continue
            tensors = results[j] if count > 1 else [results[j]]
            for dst in range(ws):
                start, stop = m.send_range(dst, ws, owner_side=True)
                if stop > start:
                    send[dst].extend(t[start:stop].to(dtype) for t in tensors)
        recv = [0] * ws
        for m in self.layouts:
            start, stop = m.send_range(me, ws, owner_side=True)
            recv[m.owner] += (stop - start) * m.cols * count
        flat = self._all_to_all(send, recv, dtype)
        offsets = [sum(recv[:src]) for src in range(ws)]
        out = []
        for m in self.layouts:
            start, stop = m.send_range(me, ws, owner_side=True)
            n = (stop - start) * m.cols
            parts = []
            for _ in range(count):
                parts.append(flat[offsets[m.owner] : offsets[m.owner] + n])
                offsets[m.owner] += n
            out.append(parts if count > 1 else parts[0])
        return out

    def all_reduce_sums(self, sums: torch.Tensor) -> torch.Tensor:
        """Magma's per-matrix sums summed over the shards (replicated rows are
        whole already: only sharded matrices are reduced)."""
        if not self.sharded or sums.numel() == 0:
            return sums
        import torch.distributed as dist

        mask = torch.tensor([m.sharded for m in self.layouts]).unsqueeze(1)
        reduced = torch.where(mask, sums, torch.zeros_like(sums))
        dist.all_reduce(reduced, group=self.group)
        count_comm_bytes(reduced.numel() * reduced.element_size() * (self.world_size - 1))
        return torch.where(mask, reduced, sums)

    def run(
        self,
        pieces: list[list[torch.Tensor]],
        compute: Callable[[list[int], list[list[torch.Tensor]]], list[torch.Tensor]],
        result_dtype: Callable[[torch.dtype], torch.dtype],
    ) -> list[torch.Tensor]:
        """The whole exchange: pieces to the owners, ``compute(owned indices,
        whole inputs)`` there, this rank's rows of every result back (flat).
        Matrices are bucketed by input dtype (one all-to-all pair per dtype)."""
        out: list[Optional[torch.Tensor]] = [None] * len(self.layouts)
        dtypes = sorted({ts[0].dtype for ts in pieces}, key=str)
        all_layouts = self.layouts
        try:
            for dtype in dtypes:
                idx = [j for j, ts in enumerate(pieces) if ts[0].dtype == dtype]
                self.layouts = [all_layouts[j] for j in idx]
                whole = self.to_owners([pieces[j] for j in idx])
                owned = sorted(whole)
                results = dict(zip(owned, compute([idx[j] for j in owned], [whole[j] for j in owned])))
                rows = self.from_owners(results, result_dtype(dtype))
                for j, r in zip(idx, rows):
                    out[j] = r
        finally:
            self.layouts = all_layouts
        return out  # type: ignore[return-value]

    # -- several dtypes ------------------------------------------------------

    def _buckets(self, dtypes: list[torch.dtype]) -> list[tuple[torch.dtype, list[int]]]:
        return [(d, [j for j, dj in enumerate(dtypes) if dj == d]) for d in sorted(set(dtypes), key=str)]

    def gather_whole(
        self, pieces: list[list[torch.Tensor]], dtypes: list[torch.dtype]
    ) -> dict[int, list[torch.Tensor]]:
        """``to_owners`` with matrix j's pieces in ``dtypes[j]``: one all-to-all per dtype."""
        out: dict[int, list[torch.Tensor]] = {}
        for _, idx in self._buckets(dtypes):
            whole = self.subset(idx).to_owners([pieces[j] for j in idx])
            out.update({idx[k]: ts for k, ts in whole.items()})
        return out

    def scatter_rows(self, results: dict[int, list[torch.Tensor]], dtypes: list[torch.dtype], count: int) -> list:
        """``from_owners`` of ``count`` tensors per matrix, matrix j in ``dtypes[j]``."""
        out: list[Any] = [None] * len(self.layouts)
        for dtype, idx in self._buckets(dtypes):
            mine = {k: results[j] if count > 1 else results[j][0] for k, j in enumerate(idx) if j in results}
            rows = self.subset(idx).from_owners(mine, dtype, count)
            for j, r in zip(idx, rows):
                out[j] = r if count > 1 else [r]
        return out


# -- owner-held preconditioner state (SOAP, Kron, KronPSGD, WhiteKron) -------

_DISTRIBUTED_MODES = ("owner", "replicated", "gather")


class DistributedModeMixin:
    """``distributed_mode`` and ``process_group`` of the optimizers that offer
    whole-matrix ownership (docs/design.md, "Distributed"): "owner" (default:
    Shard(0) / Replicate() DTensors by ownership, plain tensors locally),
    "replicated" (plain tensors are DDP replicas over ``process_group``, None:
    the default group, and use ownership too), "gather" (every rank gathers
    every whole tensor). The environment variable
    TORCHOPT_EXT_DISTRIBUTED_MODE sets the default."""

    def _init_distributed_mode(self) -> None:
        self.distributed_mode = os.environ.get("TORCHOPT_EXT_DISTRIBUTED_MODE", "owner")
        self.process_group = None

    @property
    def distributed_mode(self) -> str:
        return self._distributed_mode

    @distributed_mode.setter
    def distributed_mode(self, mode: str) -> None:
        if mode not in _DISTRIBUTED_MODES:
            raise ValueError(f"Invalid distributed_mode: must be one of {_DISTRIBUTED_MODES}, got {mode!r}")
        self._distributed_mode = mode

    def _unwrappers(self):
        if getattr(self, "_local_only", False):  # the ownership path's local shards
            from ._base import local

            return local, local
        return super()._unwrappers()

    def _replicated_group(self) -> Optional[Any]:
        """The process group plain tensors are replicated over, or None."""
        if self._distributed_mode != "replicated":
            return None
        import torch.distributed as dist

        return self.process_group if self.process_group is not None else dist.group.WORLD


def _transport_dtype(tensors: list[torch.Tensor]) -> torch.dtype:
    """The widest dtype of a matrix's tensors: bf16 / fp16 values widen exactly
    to it and back, so one buffer per dtype carries param, grad and state."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _as_rows(t: torch.Tensor, layout: MatrixLayout) -> torch.Tensor:
    return t.reshape(layout.rows, layout.cols)


class OwnedStateMixin(DistributedModeMixin):
    """Whole-tensor optimizers whose preconditioner state lives on one owner
    rank per param (issue 8). Per param group and step, for the params the
    group's plan covers (Shard(0) DTensors on one 1-D mesh, Replicate()
    DTensors, or DDP replicas with ``distributed_mode="replicated"``):

    1. one all-to-all per dtype sends each rank's rows of the param, its grad
       and its param-shaped state (``_owner_param_keys``: momenta, kept as
       DTensors sharded like the param, so DCP sees ordinary state) to the
       param's owner (``assign_owners``: by cost, over all the group's params,
       so owners do not move when a param has no grad);
    2. the owner runs the optimizer's own op (``_group_step``, unchanged math)
       on the whole tensors, with the owner-held state (``_owner_state_keys``:
       Gram factors, eigenbases, Kronecker factors, tiles) that only it keeps;
    3. a second all-to-all returns each rank's rows of the new param and
       param-shaped state (the whole tensors to every replica);
    4. one all-reduce copies the owners' step counters to every rank.

    Non-owners keep no owner-held entry for the param (the key is absent).
    ``state_dict()`` is collective: owner-held state comes out as DTensors
    sharded Shard(0) over the param's mesh (each rank its rows, sent by the
    owner), or whole plain tensors on every rank for plain (DDP) params, so
    DCP saves and reshards it like any state; ``load_state_dict`` sends rows
    to the (possibly new) owners and drops them elsewhere.
    """

    _owner_state_keys: tuple[str, ...] = ()

    # -- hooks -------------------------------------------------------------

    def _owner_supported(self, group: dict[str, Any]) -> bool:
        return True

    def _owner_eligible(self, group: dict[str, Any], p: torch.Tensor) -> bool:
        """Whether p takes ownership (else its op runs on local shards)."""
        return True

    def _owner_param_keys(self, group: dict[str, Any], p: torch.Tensor) -> list[str]:
        """Param-shaped state of p, kept sharded like p."""
        raise NotImplementedError(
            f"{type(self).__name__} must define _owner_param_keys (the optimizers with owner-held state do)"
        )

    def _owner_held_keys(self, group: dict[str, Any], p: torch.Tensor) -> list[str]:
        """The owner-held state p has once it has stepped."""
        return list(self._owner_state_keys)

    def _owner_initial_step(self) -> torch.Tensor:
        return torch.zeros((), dtype=torch.float32)

    def _owner_op_kwargs(self, group, params, owned, whole, plan) -> dict[str, Any]:
        """Extra op arguments of an owner's call, computed on every rank (it
        may communicate): ``params`` are the group's params with grads (the
        single-process call's list), ``owned`` the positions in it this rank
        steps (ops with keyed draws use them), ``whole[j]`` their gathered
        (rows, cols) param, grad and param-shaped state."""
        return {}

    def _owner_after_step(self, group, plan) -> None:
        """Runs on every rank after the owners' op (Kron syncs its generator)."""

    # The optimizer's single-group step on ``group["params"]`` is its
    # ``_group_step(group, amp)`` (FusedOptimizer's, or its own).

    # -- plan --------------------------------------------------------------

    def _owner_plan(self, group: dict[str, Any]) -> Optional[tuple[list[torch.Tensor], OwnershipPlan]]:
        if self._distributed_mode == "gather" or not self._owner_supported(group):
            return None
        params = [p for p in group["params"] if self._owner_eligible(group, p)]
        if self._distributed_mode == "owner" and not any(is_dtensor(p) for p in params):
            return None  # plain tensors: the single-process step
        plan = OwnershipPlan.build(params, self._replicated_group())
        return None if plan is None else (params, plan)

    # -- step --------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        loss = self._run_closure(closure)
        amp = self._amp_args()
        for group in self.param_groups:
            planned = self._owner_plan(group)
            if planned is None:
                if any(p.grad is not None for p in group["params"]):
                    distributed = any(is_dtensor(p) for p in group["params"])
                    self._last_matrix_path = "gather" if distributed else "local"
                self._group_step(group, amp)
                continue
            params, plan = planned
            ids = {id(p) for p in params}
            rest = [p for p in group["params"] if p.grad is not None and id(p) not in ids]
            if rest:  # element-wise params of the group: on their local shards
                self._local_only = True
                try:
                    self._group_step(dict(group, params=rest), amp)
                finally:
                    self._local_only = False
            if any(p.grad is not None for p in params):
                self._last_matrix_path = "owner"
                self._owner_group_step(group, params, plan, amp)
        return loss

    def _owner_group_step(self, group, params, full_plan, amp) -> None:
        from ._base import local

        found_inf = amp["found_inf"]
        # Host read of a CPU tensor, as the ops' own found_inf check.
        if found_inf is not None and bool(found_inf.item()):
            return
        with_grad = [j for j, p in enumerate(params) if p.grad is not None]
        plan = full_plan.subset(with_grad)
        params = [params[j] for j in with_grad]
        keys = [self._owner_param_keys(group, p) for p in params]
        if len({len(k) for k in keys}) > 1:
            raise RuntimeError(f"{type(self).__name__}: params of one group keep different param-shaped state")
        pieces, dtypes = [], []
        for p, pkeys in zip(params, keys):
            state = self.state[p]
            if "step" not in state:
                state["step"] = self._owner_initial_step()
            for key in pkeys:
                if key not in state:
                    state[key] = self._new_state(p, group, key)
            tensors = [local(p), local(p.grad)] + [local(state[k]) for k in pkeys]
            dtype = _transport_dtype(tensors)
            pieces.append([t.to(dtype) for t in tensors])
            dtypes.append(dtype)
        whole = plan.gather_whole(pieces, dtypes)
        owned = sorted(whole)
        results: dict[int, list[torch.Tensor]] = {}
        extra = self._owner_op_kwargs(group, params, owned, whole, plan)
        if owned:
            results = self._owner_compute(group, [plan.layouts[j] for j in owned], [params[j] for j in owned],
                                          [keys[j] for j in owned], [whole[j] for j in owned], amp, extra)  # fmt: skip
            results = dict(zip(owned, results))
        count = 1 + len(keys[0])
        rows = plan.scatter_rows(results, dtypes, count)
        for p, pkeys, r in zip(params, keys, rows):
            targets = [local(p)] + [local(self.state[p][k]) for k in pkeys]
            for t, flat in zip(targets, r):
                if t.numel():
                    t.copy_(flat.view(t.shape))
        self._sync_steps(plan, params)
        self._owner_after_step(group, plan)

    def _owner_compute(self, group, layouts, params, keys, whole, amp, extra) -> list[list[torch.Tensor]]:
        """On the owner: the op on whole stand-ins of its params; returns, per
        param, the whole (rows, cols) param and param-shaped state."""
        stand_ins = []
        tmp_state: dict[torch.Tensor, dict[str, Any]] = {}
        for p, pkeys, ts in zip(params, keys, whole):
            shape = tuple(p.shape)
            wp = ts[0].reshape(shape).to(p.dtype).clone()
            wp.grad = ts[1].reshape(shape).to(p.grad.dtype)
            state = self.state[p]
            entry = {"step": state["step"]}
            for k, t in zip(pkeys, ts[2:]):
                entry[k] = t.reshape(shape).to(state[k].dtype).clone()
            for k in self._owner_state_keys:
                if k in state:
                    entry[k] = state[k]
            tmp_state[wp] = entry
            stand_ins.append(wp)
        saved, saved_groups = self.state, self.param_groups
        owner_group = dict(group, params=stand_ins, _owner_op_kwargs=extra)
        # The op's view: the stand-ins are this group's params (state hooks look groups up by param).
        self.state, self.param_groups = _IdentityState(tmp_state), [owner_group]
        try:
            self._group_step(owner_group, amp)
        finally:
            self.state, self.param_groups = saved, saved_groups
        out = []
        for p, pkeys, wp, layout in zip(params, keys, stand_ins, layouts):
            entry = tmp_state[wp]
            for k in self._owner_state_keys:
                if k in entry:
                    self.state[p][k] = entry[k]
            out.append([_as_rows(wp, layout)] + [_as_rows(entry[k], layout) for k in pkeys])
        return out

    def _sync_steps(self, plan: OwnershipPlan, params: list[torch.Tensor]) -> None:
        """Every rank takes the owners' step counters (an op may leave a
        step unchanged: SOAP's init call, skipped steps)."""
        import torch.distributed as dist

        steps = torch.tensor(
            [float(self.state[p]["step"]) if m.owner == plan.rank else 0.0 for p, m in zip(params, plan.layouts)],
            dtype=torch.float64,
        )
        dist.all_reduce(steps, group=plan.group)
        count_comm_bytes(steps.numel() * steps.element_size() * (plan.world_size - 1))
        for p, value in zip(params, steps.tolist()):
            self.state[p]["step"].fill_(value)

    # -- state_dict / load_state_dict --------------------------------------

    def _held_entries(self, plan: OwnershipPlan, group, params):
        """(param, key, layout of the value) of the owner-held state every rank
        agrees exists (the param has stepped: ``step`` is on every rank)."""
        entries = []
        for p, m in zip(params, plan.layouts):
            if "step" not in self.state.get(p, {}):
                continue
            for key in self._owner_held_keys(group, p):
                shape = self._state_shape(p, key)
                if shape is None:
                    continue
                sharded = is_dtensor(p) and len(shape) >= 1
                rows = shape[0] if len(shape) >= 1 else 1
                numel = math.prod(shape)
                cols = numel // rows if rows else 1
                entries.append((p, key, shape, MatrixLayout(rows, cols, sharded, m.owner)))
        return entries

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        index = {}
        for group in self.param_groups:
            for p in group["params"]:
                index.setdefault(id(p), len(index))
        for group in self.param_groups:
            planned = self._owner_plan(group)
            if planned is None:
                continue
            params, plan = planned
            entries = self._held_entries(plan, group, params)
            if not entries:
                continue
            layouts = [e[3] for e in entries]
            save_plan = plan.with_layouts(layouts)
            dtypes = [self._state_dtype(p, group, key) for p, key, _, _ in entries]
            results = {
                j: [_as_rows(self.state[p][key], m)] for j, (p, key, _, m) in enumerate(entries) if m.owner == plan.rank
            }
            rows = save_plan.scatter_rows(results, dtypes, 1)
            for (p, key, shape, m), (flat,) in zip(entries, rows):
                if m.sharded:
                    from torch.distributed.tensor import DTensor, Shard

                    start, stop = chunk_rows(m.rows, plan.world_size, plan.rank)
                    local_value = flat.view((stop - start, *shape[1:])).clone()
                    value = DTensor.from_local(
                        local_value, p.device_mesh, [Shard(0)], run_check=False, shape=torch.Size(shape),
                        stride=_contiguous_strides(shape),
                    )  # fmt: skip
                else:
                    value = flat.view(shape).clone()
                i = index[id(p)]
                sd["state"][i] = dict(sd["state"][i], **{key: value})
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            planned = self._owner_plan(group)
            if planned is None:
                continue
            params, plan = planned
            entries = [e for e in self._held_entries(plan, group, params) if e[1] in self.state[e[0]]]
            layouts, pieces, dtypes = [], [], []
            for p, key, _, m in entries:
                value = self.state[p][key]
                if is_dtensor(value):
                    shard_ok = (
                        m.sharded
                        and value.device_mesh == p.device_mesh
                        and value.placements[0].is_shard()
                        and value.placements[0].dim == 0
                        and value.to_local().shape[0] == _chunk_len(m.rows, plan.world_size, plan.rank)
                    )
                    if not shard_ok:
                        value = value.full_tensor()  # collective: every rank, same order
                        m = MatrixLayout(m.rows, m.cols, False, m.owner)
                    else:
                        value = value.to_local()
                else:
                    m = MatrixLayout(m.rows, m.cols, False, m.owner)
                layouts.append(m)
                pieces.append([value])
                dtypes.append(value.dtype)
            whole = plan.with_layouts(layouts).gather_whole(pieces, dtypes) if layouts else {}
            for j, (p, key, shape, _) in enumerate(entries):
                if j in whole:
                    self.state[p][key] = whole[j][0].reshape(shape).clone()
                else:
                    del self.state[p][key]


def _chunk_len(rows: int, world_size: int, rank: int) -> int:
    start, stop = chunk_rows(rows, world_size, rank)
    return stop - start


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, acc = [], 1
    for d in reversed(shape):
        strides.append(acc)
        acc *= max(d, 1)
    return tuple(reversed(strides))


class _IdentityState(dict):
    """The owner's temporary ``state``: whole stand-ins keyed by identity,
    with ``self.state[p]`` creating an entry as torch.optim's defaultdict."""

    def __missing__(self, key: Any) -> dict[str, Any]:
        value: dict[str, Any] = {}
        self[key] = value
        return value
