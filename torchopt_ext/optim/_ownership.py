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

    def __init__(self, layouts: list[MatrixLayout], group: Any, rank: int, world_size: int) -> None:
        self.layouts = layouts
        self.group = group
        self.rank = rank
        self.world_size = world_size
        for layout, owner in zip(layouts, assign_owners([(m.rows, m.cols) for m in layouts], world_size)):
            layout.owner = owner

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

    def from_owners(self, results: dict[int, torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
        """results: the (rows, cols) update of each matrix this rank owns.
        Returns every matrix's rows for this rank (flat)."""
        ws, me = self.world_size, self.rank
        send: list[list[torch.Tensor]] = [[] for _ in range(ws)]
        for j, m in enumerate(self.layouts):
            if m.owner != me:
                continue
            for dst in range(ws):
                start, stop = m.send_range(dst, ws, owner_side=True)
                if stop > start:
                    send[dst].append(results[j][start:stop].to(dtype))
        recv = [0] * ws
        for m in self.layouts:
            start, stop = m.send_range(me, ws, owner_side=True)
            recv[m.owner] += (stop - start) * m.cols
        flat = self._all_to_all(send, recv, dtype)
        offsets = [sum(recv[:src]) for src in range(ws)]
        out = []
        for m in self.layouts:
            start, stop = m.send_range(me, ws, owner_side=True)
            n = (stop - start) * m.cols
            out.append(flat[offsets[m.owner] : offsets[m.owner] + n])
            offsets[m.owner] += n
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
