"""torchopt_ext optimizers under FSDP2 (fully_shard) with gloo on CPU.

Each test spawns its ranks once (see distributed_utils) and runs every
optimizer in turn inside them; rank 0 also trains an unsharded copy of the
model on the whole batch and compares full_tensor() of every param with it.
Different ranks see different micro-batches, so FSDP's gradient averaging
(and gloo's AVG reduction, pytorch#162338) is checked against the
single-process mean over the whole batch.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from distributed_utils import run_distributed
from helpers import ALL_OPTIMIZERS

import torchopt_ext.optim as topt
from torchopt_ext.clip import SpikeGuard

# Element-wise optimizers with no whole-tensor reduction: they run on the
# local shards as they are.
ELEMENTWISE = [
    "SGD",
    "Adam",
    "AdamW",
    "NAdamW",
    "RAdam",
    "QHAdamW",
    "Lion",
    "SophiaH",
    "SophiaG",
    "ScheduleFreeAdamW",
    "ScheduleFreeSGD",
]

# Per-tensor norms on shards: the op runs on the local shards, and the
# whole-tensor norms (LAMB's trust ratio ||p|| / ||r||, MARS's clip of c_t) are
# local sums of squares all-reduced between two ops (LAMB's global clip uses an
# all-reduced sum of squares too). Nothing is gathered.
SHARDED_NORMS = ["LAMB", "MARS"]
# Option variants of those (name -> class, options, loss multiplier,
# distributed_mode): the multiplier makes MARS's ||c_t|| exceed 1, so its clip
# binds; "gather" keeps the all-gather path tested.
NORM_VARIANTS = {
    "LAMB": ("LAMB", ALL_OPTIMIZERS["LAMB"], 1.0),
    "LAMB_gather": ("LAMB", ALL_OPTIMIZERS["LAMB"], 1.0, "gather"),
    "MARS_gather": ("MARS", ALL_OPTIMIZERS["MARS"], 50.0, "gather"),
    "LAMB_decoupled_trustclip": (
        "LAMB",
        dict(lr=1e-2, weight_decay=0.1, decoupled_decay=True, trust_clip=True, max_grad_norm=None),
        1.0,
    ),
    "LAMB_adapt_nodecay": ("LAMB", dict(lr=1e-2, weight_decay=0.0, always_adapt=True, grad_averaging=False), 1.0),
    "MARS_clipped": ("MARS", ALL_OPTIMIZERS["MARS"], 50.0),
    "MARS_lion_1d": ("MARS", dict(lr=1e-3, weight_decay=0.1, mars_type="mars-lion", optimize_1d=True), 50.0),
    "MARS_adamw_1d": ("MARS", dict(lr=1e-2, weight_decay=0.1, optimize_1d=True), 50.0),
    # Newton-Schulz needs whole matrices: mars-shampoo gathers its matrices by itself.
    "MARS_shampoo": ("MARS", dict(lr=1e-2, weight_decay=0.1, mars_type="mars-shampoo"), 50.0),
}

# Optimizers whose op needs whole-tensor quantities: DTensor params and state
# are gathered for the op and the local slices written back.
# State kept whole (on every rank on the gather path, on the owner on the
# ownership path: SOAP's eigenbases, the Kron family's factors); everything
# else is a DTensor placed like its param.
WHOLE_STATE_KEYS = ("GG", "Q", "L", "ql", "qr", "lip_l", "lip_r")
WHOLE_TENSOR = ["Muon", "PRISM", "Kron", "KronPSGD", "WhiteKron"]
# Whole-tensor quantities from all-reduced per-shard statistics, no gathering:
# Adafactor (RMS(theta), RMS(U), column means of Shard(0) matrices).
SHARDED_STATS = ["Adafactor"]
# State placed unlike its param: a 2-D param's Adafactor col_var (1, C) is
# Replicate(), every rank updating the whole row from all-reduced sums.
REPLICATED_2D_STATE = {("Adafactor", "col_var")}


def expected_placements(name: str, key: str, p) -> tuple:
    if (name, key) in REPLICATED_2D_STATE and p.dim() == 2:
        from torch.distributed.tensor import Replicate

        return (Replicate(),) * p.device_mesh.ndim
    return tuple(p.placements)


# Matrix-optimizer variants (name -> class, options, distributed_mode). The
# plain names take whole-matrix ownership ("owner", the default) except
# PRISM, whose raw global clip keeps it on the gather path; "_gather" keeps
# the all-gather path tested.
VARIANTS = {
    "Muon_gather": ("Muon", ALL_OPTIMIZERS["Muon"], "gather"),
    "Muon_magma": ("Muon", dict(lr=2e-2, weight_decay=0.1, adam_lr=1e-2, use_magma=True, magma_p=0.7, seed=5), "owner"),
    "PRISM_owner": ("PRISM", dict(lr=2e-2, weight_decay=0.1, adam_lr=1e-2, use_magma=True, seed=3), "owner"),
    "PRISM_bidi": (
        "PRISM",
        dict(lr=2e-2, weight_decay=0.1, mode="bidirectional", shape_nesterov=False, grad_clip_max_amps=(0.5, 1.0)),
        "owner",
    ),
    # Kron without the raw global clip (which keeps ALL_OPTIMIZERS' Kron on the gather path).
    "Kron_owner": ("Kron", dict(lr=1e-2, weight_decay=0.1, use_magma=True, seed=3), "owner"),
}
# The path the matrix params must take under FSDP2 (and under DDP with
# distributed_mode="replicated"). KronPSGD, WhiteKron and SOAP keep their
# preconditioner state on the owner (OWNER_STATE_KEYS, _ownership.OwnedStateMixin).
MATRIX_PATH = {
    "Muon": "owner",
    "PRISM": "gather",
    "Muon_gather": "gather",
    "Kron": "gather",
    "KronPSGD": "owner",
    "WhiteKron": "owner",
    "SOAP": "owner",
} | {name: "owner" for name in VARIANTS if name != "Muon_gather"}
# State that lives on the param's owner rank only (absent elsewhere) in owner mode.
OWNER_STATE_KEYS = {
    "SOAP": ("GG", "Q"),
    "KronPSGD": ("ql", "qr"),
    "WhiteKron": ("ql", "qr", "lip_l", "lip_r"),
    "Kron_owner": ("Q", "L", "magma_score"),
}
VARIANT_NAMES = list(VARIANTS)

# SOAP's eigenbases of rank-deficient Gram factors (non-square layers) depend on ulp-level
# differences in the gradient (classic.md §10), so an all-reduced gradient (summed in another
# order than one process's) gives a different but equally valid trajectory: a single process
# that accumulates the same batch in two halves moves 0.04 away as well. SOAP runs under
# FSDP2 / DDP (whole-matrix gather, rank-identical replicas are checked) but is not compared
# with a single process.
ULP_SENSITIVE = {"SOAP"}

IN, HIDDEN, OUT = 8, 13, 6  # 13 is uneven for 2 and 4 ranks; 6 for 4 ranks
MICRO_BATCH = 4
STEPS = 10
# fp32, 10 steps: gradients differ from the single process only in the order
# of the cross-rank sum; a wrong shard, state or averaging is off by >1e-3.
TOL = dict(rtol=1e-5, atol=1e-5)


class MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        # The last layer has 3 outputs: at 4 ranks one rank holds an empty shard.
        self.layers = torch.nn.ModuleList(
            [torch.nn.Linear(IN, HIDDEN), torch.nn.Linear(HIDDEN, OUT), torch.nn.Linear(OUT, 3)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i + 1 < len(self.layers):
                x = torch.tanh(x)
        return x


def make_optimizer(name: str, params, replicated: bool = False) -> torch.optim.Optimizer:
    if name in VARIANTS:
        cls, options, mode = VARIANTS[name]
        opt = getattr(topt, cls)(params, **options)
        opt.distributed_mode = "replicated" if replicated and mode == "owner" else mode
        return opt
    opt = getattr(topt, name)(params, **ALL_OPTIMIZERS[name])
    if replicated and name in MATRIX_PATH:
        opt.distributed_mode = "replicated"
    if hasattr(opt, "train"):
        opt.train()
    return opt


def _shard(model: torch.nn.Module, world_size: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world_size,))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _train_step(model, opt, x, y, name: str) -> None:
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    if name in ("SophiaH", "SophiaG"):
        # An explicit Hessian estimate, so the h-dependent clip is exercised
        # (the estimate is a DTensor for sharded params).
        opt.update_hessian(hessian={p: p.grad * p.grad + 0.01 for p in model.parameters()})
    opt.step()
    opt.zero_grad()


def _fsdp_parity_worker(rank: int, world_size: int, names: list[str], steps: int) -> None:
    from torch.distributed.tensor import DTensor

    failures = []
    for name in names:
        torch.manual_seed(0)
        model = MLP()
        ref = copy.deepcopy(model)
        _shard(model, world_size)
        opt = make_optimizer(name, model.parameters())
        ref_opt = make_optimizer(name, ref.parameters())
        data = torch.Generator().manual_seed(1)
        for _ in range(steps):
            x = torch.randn(world_size * MICRO_BATCH, IN, generator=data)
            y = torch.randn(world_size * MICRO_BATCH, 3, generator=data)
            mine = slice(rank * MICRO_BATCH, (rank + 1) * MICRO_BATCH)
            _train_step(model, opt, x[mine], y[mine], name)
            if rank == 0:
                _train_step(ref, ref_opt, x, y, name)
        if name in MATRIX_PATH:
            assert opt._last_matrix_path == MATRIX_PATH[name], f"{name}: took the {opt._last_matrix_path} path"
        max_err = 0.0
        for (pname, p), q in zip(model.named_parameters(), ref.parameters()):
            assert isinstance(p, DTensor), f"{pname} is not sharded"
            for key, value in opt.state[p].items():
                if torch.is_tensor(value) and value.dim() > 0 and key not in WHOLE_STATE_KEYS:
                    assert isinstance(value, DTensor), f"{name}: state {key!r} of {pname} is not a DTensor"
                    want = expected_placements(name, key, p)
                    assert tuple(value.placements) == want, f"{name}: state {key!r} placements differ"
            full = p.full_tensor()  # collective: every rank calls it
            if rank == 0:
                max_err = max(max_err, (full - q).abs().max().item())
                try:
                    torch.testing.assert_close(full, q.detach(), **TOL)
                except AssertionError as e:
                    failures.append(f"{name} {pname}: {e}")
        if rank == 0:
            print(f"[ws={world_size}] {name}: max |sharded - single| = {max_err:.3g}")
    assert not failures, "\n".join(failures)


@pytest.mark.distributed
@pytest.mark.parametrize("world_size", [2, 4])
def test_fsdp2_elementwise_matches_single_process(world_size):
    run_distributed(_fsdp_parity_worker, world_size, ELEMENTWISE, STEPS)


@pytest.mark.distributed
@pytest.mark.parametrize("world_size", [2, 4])
def test_fsdp2_whole_tensor_optimizers_match_single_process(world_size):
    run_distributed(_fsdp_parity_worker, world_size, WHOLE_TENSOR + SHARDED_STATS + VARIANT_NAMES, STEPS)


class MixedShapes(torch.nn.Module):
    """A matrix with uneven rows, a vector, a 3-D stack of matrices (Shard(0)
    splits whole matrices: 5 on 4 ranks is 2, 2, 1, 0) and a 3-row matrix
    (an empty shard at 4 ranks)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(HIDDEN, IN) * 0.3)
        self.b = torch.nn.Parameter(torch.randn(HIDDEN) * 0.1)
        self.t = torch.nn.Parameter(torch.randn(5, HIDDEN, 3) * 0.3)
        self.o = torch.nn.Parameter(torch.randn(3, 3) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(x @ self.w.T + self.b)
        z = torch.einsum("nh,khc->nc", h, self.t)
        return z @ self.o.T


ADAFACTOR_CONFIGS = {
    "beta1-wd": ALL_OPTIMIZERS["Adafactor"],
    "defaults": dict(),
    "no-relative": dict(lr=3e-2, relative_step=False, scale_parameter=False, d=1.5, maximize=True),
    # The gather fallback (2-D meshes, other shard dims) forced on Shard(0) params.
    "gather": dict(ALL_OPTIMIZERS["Adafactor"], distributed_mode="gather"),
}


def _adafactor_shards_worker(rank: int, world_size: int, steps: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from torchopt_ext.optim import _base

    failures = []
    for config_name, config in ADAFACTOR_CONFIGS.items():
        config = dict(config)
        mode = config.pop("distributed_mode", "shards")
        torch.manual_seed(0)
        model = MixedShapes()
        ref = copy.deepcopy(model)
        fully_shard(model, mesh=init_device_mesh("cpu", (world_size,)))
        opt = topt.Adafactor(model.parameters(), **config)
        opt.distributed_mode = mode
        ref_opt = topt.Adafactor(ref.parameters(), **config)
        data = torch.Generator().manual_seed(1)
        comm_before = _base._COMM["bytes"]
        for _ in range(steps):
            x = torch.randn(world_size * MICRO_BATCH, IN, generator=data)
            y = torch.randn(world_size * MICRO_BATCH, 3, generator=data)
            mine = slice(rank * MICRO_BATCH, (rank + 1) * MICRO_BATCH)
            torch.nn.functional.mse_loss(model(x[mine]), y[mine]).backward()
            # Nothing may be gathered whole during the step (on shards).
            full_tensor = DTensor.full_tensor
            if mode == "shards":
                DTensor.full_tensor = None
            try:
                opt.step()
            finally:
                DTensor.full_tensor = full_tensor
            opt.zero_grad()
            if rank == 0:
                torch.nn.functional.mse_loss(ref(x), y).backward()
                ref_opt.step()
                ref_opt.zero_grad()
        # Bytes sent: two all-reduces per step of float64 statistics (2 per
        # param and 2 + C per Shard(0) matrix, then 1 per param), ring cost.
        params = list(model.parameters())
        first = sum(2 + (2 + p.shape[-1] if p.dim() == 2 else 0) for p in params)
        per_round = [first, len(params)]
        expected = steps * sum(2 * (world_size - 1) * n * 8 // world_size for n in per_round)
        sent = _base._COMM["bytes"] - comm_before
        gather_bytes = sum(p.numel() * 4 for p in params)
        if mode == "gather":
            # Every param, grad and state shard goes to the other ranks.
            shard_bytes = sum(p.to_local().numel() * 4 for p in params)
            if sent < steps * (world_size - 1) * 2 * shard_bytes:
                failures.append(f"{config_name}: the gather path sent only {sent} bytes")
        elif sent != expected or sent >= steps * gather_bytes:
            failures.append(f"{config_name}: sent {sent} bytes, expected {expected}")
        max_err = 0.0
        for (pname, p), q in zip(model.named_parameters(), ref.parameters()):
            assert isinstance(p, DTensor), f"{pname} is not sharded"
            for key, value in opt.state[p].items():
                if key == "step":
                    continue
                want = expected_placements("Adafactor", key, p) if mode == "shards" else tuple(p.placements)
                assert tuple(value.placements) == want, f"{pname}.{key}: {value.placements} != {want}"
            if p.dim() == 2 and mode == "shards":
                # The replicated column EMA must agree bit for bit on every rank.
                col = opt.state[p]["col_var"].to_local()
                cols = [torch.empty_like(col) for _ in range(world_size)]
                dist.all_gather(cols, col)
                if not all(torch.equal(c, cols[0]) for c in cols):
                    failures.append(f"{config_name} {pname}: col_var differs across ranks")
            full = p.full_tensor()
            states = {k: v.full_tensor() for k, v in opt.state[p].items() if k != "step"}
            if rank == 0:
                max_err = max(max_err, (full - q).abs().max().item())
                try:
                    torch.testing.assert_close(full, q.detach(), **TOL)
                    for k, v in states.items():
                        torch.testing.assert_close(v, ref_opt.state[q][k], rtol=1e-5, atol=1e-7)
                except AssertionError as e:
                    failures.append(f"{config_name} {pname}: {e}")
        if rank == 0:
            print(f"[ws={world_size}] Adafactor {config_name}: max |sharded - single| = {max_err:.3g}, {sent} bytes")
    assert not failures, "\n".join(failures)


@pytest.mark.distributed
@pytest.mark.parametrize("world_size", [2, 4])
def test_fsdp2_adafactor_steps_on_shards_with_all_reduced_statistics(world_size):
    run_distributed(_adafactor_shards_worker, world_size, STEPS)


def _norm_rows(name: str, opt_name: str, options: dict) -> int:
    """Rows of the per-tensor norm all-reduce in one step of the MLP: LAMB
    reduces ||p||^2 and ||r||^2 of all 6 params, MARS ||c||^2 of its matrix
    params (3 weights, or all 6 with optimize_1d)."""
    if opt_name == "LAMB":
        return 6 * 2
    return 6 if options.get("optimize_1d") else 3


def _count_full_tensor_calls(fn) -> int:
    """Runs fn() and returns how many DTensors it gathered with full_tensor()."""
    from torch.distributed.tensor import DTensor

    calls = []
    real_full = DTensor.full_tensor

    def counting(self, **kwargs):
        calls.append(1)
        return real_full(self, **kwargs)

    DTensor.full_tensor = counting
    try:
        fn()
    finally:
        DTensor.full_tensor = real_full
    return len(calls)


def _fsdp_sharded_norms_worker(rank: int, world_size: int, names: list[str], steps: int) -> None:
    from torch.distributed.tensor import DTensor

    from torchopt_ext.optim import _base

    failures = []
    for name in names:
        opt_name, options, loss_scale, *mode = NORM_VARIANTS[name]
        torch.manual_seed(0)
        model = MLP()
        ref = copy.deepcopy(model)
        _shard(model, world_size)
        opt = getattr(topt, opt_name)(model.parameters(), **options)
        if mode == ["gather"]:
            opt.distributed_mode = "gather"
        gather = mode == ["gather"] or options.get("mars_type") == "mars-shampoo"
        ref_opt = getattr(topt, opt_name)(ref.parameters(), **options)
        data = torch.Generator().manual_seed(1)
        sent = 0
        for _ in range(steps):
            x = torch.randn(world_size * MICRO_BATCH, IN, generator=data)
            y = torch.randn(world_size * MICRO_BATCH, 3, generator=data)
            mine = slice(rank * MICRO_BATCH, (rank + 1) * MICRO_BATCH)
            (torch.nn.functional.mse_loss(model(x[mine]), y[mine]) * loss_scale).backward()
            before = _base._COMM["bytes"]
            gathers = _count_full_tensor_calls(opt.step)
            assert bool(gathers) == gather, f"{name}: the step gathered {gathers} DTensors"
            sent += _base._COMM["bytes"] - before
            opt.zero_grad()
            if rank == 0:
                (torch.nn.functional.mse_loss(ref(x), y) * loss_scale).backward()
                ref_opt.step()
                ref_opt.zero_grad()
        # Only the float64 norm rows went out: (world_size - 1) copies per step.
        expected = steps * _norm_rows(name, opt_name, options) * 8 * (world_size - 1)
        if not gather:
            assert sent == expected, f"{name}: sent {sent} bytes, expected {expected} (norm all-reduces only)"
        max_err = 0.0
        for (pname, p), q in zip(model.named_parameters(), ref.parameters()):
            assert isinstance(p, DTensor), f"{pname} is not sharded"
            for key, value in opt.state[p].items():
                if torch.is_tensor(value) and value.dim() > 0:
                    assert isinstance(value, DTensor), f"{name}: state {key!r} of {pname} is not a DTensor"
                    assert value.placements == p.placements, f"{name}: state {key!r} placements differ"
            full = p.full_tensor()
            if rank == 0:
                max_err = max(max_err, (full - q).abs().max().item())
                try:
                    torch.testing.assert_close(full, q.detach(), **TOL)
                except AssertionError as e:
                    failures.append(f"{name} {pname}: {e}")
        if rank == 0:
            print(f"[ws={world_size}] {name}: max |sharded - single| = {max_err:.3g}, {sent} bytes sent")
    assert not failures, "\n".join(failures)


@pytest.mark.distributed
@pytest.mark.parametrize("world_size", [2, 4])
def test_fsdp2_lamb_mars_run_on_shards_with_reduced_norms(world_size):
    run_distributed(_fsdp_sharded_norms_worker, world_size, list(NORM_VARIANTS), STEPS)


def _ddp_parity_worker(rank: int, world_size: int, names: list[str], steps: int) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    failures = []
    for name in names:
        torch.manual_seed(0)
        ref = MLP()
        model = DDP(copy.deepcopy(ref))
        opt = make_optimizer(name, model.parameters(), replicated=True)
        ref_opt = make_optimizer(name, ref.parameters())
        data = torch.Generator().manual_seed(1)
        for _ in range(steps):
            x = torch.randn(world_size * MICRO_BATCH, IN, generator=data)
            y = torch.randn(world_size * MICRO_BATCH, 3, generator=data)
            mine = slice(rank * MICRO_BATCH, (rank + 1) * MICRO_BATCH)
            _train_step(model, opt, x[mine], y[mine], name)
            if rank == 0:
                _train_step(ref, ref_opt, x, y, name)
        if name in MATRIX_PATH:
            # Replicas take ownership (distributed_mode="replicated") where FSDP2 does.
            expected = "owner" if MATRIX_PATH[name] == "owner" else "local"
            assert opt._last_matrix_path == expected, f"{name}: took the {opt._last_matrix_path} path"
        max_err = 0.0
        for (pname, p), q in zip(model.module.named_parameters(), ref.parameters()):
            # Replicas must stay identical across ranks.
            gathered = [torch.empty_like(p) for _ in range(world_size)]
            dist.all_gather(gathered, p.detach().contiguous())
            if rank == 0:
                max_err = max(max_err, (p - q).abs().max().item())
                try:
                    for other in gathered[1:]:
                        torch.testing.assert_close(other, gathered[0], rtol=0, atol=0)
                    if name not in ULP_SENSITIVE:
                        torch.testing.assert_close(p.detach(), q.detach(), **TOL)
                except AssertionError as e:
                    failures.append(f"{name} {pname}: {e}")
        if rank == 0:
            print(f"[DDP ws={world_size}] {name}: max |ddp - single| = {max_err:.3g}")
    assert not failures, "\n".join(failures)


@pytest.mark.distributed
def test_ddp_all_optimizers_match_single_process():
    # Plain tensors on every rank: every optimizer, Adafactor included.
    run_distributed(_ddp_parity_worker, 2, sorted(ALL_OPTIMIZERS) + VARIANT_NAMES, STEPS)


@pytest.mark.distributed
def test_ddp_ownership_at_4_ranks_matches_single_process():
    # Replicated matrices split over 4 owners (one of them owns none of the 3).
    run_distributed(_ddp_parity_worker, 4, [n for n in MATRIX_PATH if MATRIX_PATH[n] == "owner"], STEPS)


OWNER_NAMES = list(OWNER_STATE_KEYS)


def _owner_state_worker(rank: int, world_size: int, names: list[str], steps: int, layout: str) -> None:
    """Owner-held state: present on the owner only, equal to one process's,
    and per rank a fraction of the whole. Every rank sees the same batch, so
    the averaged grads equal one process's bitwise (the mean of 2 or 4 equal
    values is exact) and even SOAP's ulp-sensitive eigenbases are compared."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    failures = []
    for name in names:
        torch.manual_seed(0)
        model = MLP()
        ref = copy.deepcopy(model)
        if layout == "fsdp":
            _shard(model, world_size)
            mine = model
        else:
            model = DDP(model)
            mine = model.module
        opt = make_optimizer(name, model.parameters(), replicated=layout == "ddp")
        ref_opt = make_optimizer(name, ref.parameters())
        data = torch.Generator().manual_seed(1)
        for _ in range(steps):
            x = torch.randn(MICRO_BATCH, IN, generator=data)
            y = torch.randn(MICRO_BATCH, 3, generator=data)
            _train_step(model, opt, x, y, name)
            _train_step(ref, ref_opt, x, y, name)
        assert opt._last_matrix_path == "owner", f"{name}: took the {opt._last_matrix_path} path"
        ref_of = {id(p): q for p, q in zip(mine.parameters(), ref.parameters())}
        params, plan = opt._owner_plan(opt.param_groups[0])
        held = whole = 0
        max_err = 0.0
        for p, m in zip(params, plan.layouts):
            q = ref_of[id(p)]
            for key in OWNER_STATE_KEYS[name]:
                if key not in ref_opt.state[q]:
                    continue
                expected = ref_opt.state[q][key]
                whole += expected.numel() * expected.element_size()
                if m.owner != rank:
                    assert key not in opt.state[p], f"{name}: rank {rank} keeps {key} of a param owned by {m.owner}"
                    continue
                value = opt.state[p][key]
                assert not isinstance(value, torch.distributed.tensor.DTensor), f"{name}: {key} is a DTensor"
                held += value.numel() * value.element_size()
                if value.numel():
                    max_err = max(max_err, (value - expected).abs().max().item())
                try:
                    torch.testing.assert_close(value, expected, **TOL)
                except AssertionError as e:
                    failures.append(f"{name} state {key}: {e}")
        # A third of the matrices or fewer per rank: well under the whole.
        assert held <= 0.75 * whole, f"{name}: rank {rank} holds {held} of {whole} state bytes"
        for (pname, p), q in zip(mine.named_parameters(), ref.parameters()):
            full = p.full_tensor() if layout == "fsdp" else p.detach()
            max_err = max(max_err, (full - q).abs().max().item())
            try:
                torch.testing.assert_close(full, q.detach(), **TOL)
            except AssertionError as e:
                failures.append(f"{name} {pname}: {e}")
        print(f"[{layout} ws={world_size} rank {rank}] {name}: state {held}/{whole} B, max err {max_err:.3g}")
    assert not failures, "\n".join(failures)


@pytest.mark.distributed
@pytest.mark.parametrize("world_size", [2, 4])
def test_owner_held_state_fsdp2(world_size):
    run_distributed(_owner_state_worker, world_size, OWNER_NAMES, STEPS, "fsdp")


@pytest.mark.distributed
def test_owner_held_state_ddp():
    run_distributed(_owner_state_worker, 2, OWNER_NAMES, STEPS, "ddp")


def _raise_on_rank_1(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("boom from rank 1")
    dist.barrier()  # rank 0 waits here until the harness kills it


@pytest.mark.distributed
def test_harness_reports_child_exception():
    # The root cause comes first, though rank 0 also fails (its peer left).
    first = r"(?s)^_raise_on_rank_1 failed on 2 ranks:\n---- rank1 ----.*boom from rank 1"
    with pytest.raises(RuntimeError, match=first):
        run_distributed(_raise_on_rank_1, 2, timeout=60)


def _hang(rank: int, world_size: int) -> None:
    import time

    time.sleep(600)


@pytest.mark.distributed
def test_harness_kills_hung_ranks():
    with pytest.raises(TimeoutError):
        run_distributed(_hang, 2, timeout=15)


# Whole-tensor decisions of element-wise optimizers under FSDP2: AdamW's Magma
# (cosine per whole tensor; the group is gathered) and the spike guard's global
# norm (all-reduced shard sums; the grads are clipped shard by shard). The max
# norm of 0.7 makes some steps spikes (the worker checks), so clipping and skipping are exercised.
GUARDED = {
    "AdamW_magma": lambda params: topt.AdamW(params, lr=1e-2, weight_decay=0.1, use_magma=True, magma_p=0.6, seed=3),
    "SpikeGuard_permissive": lambda params: SpikeGuard(topt.AdamW(params, lr=1e-2), max_norm=0.7),
    "SpikeGuard_strict": lambda params: SpikeGuard(topt.AdamW(params, lr=1e-2), max_norm=0.7, permissive=False),
}


def _fsdp_guarded_worker(rank: int, world_size: int, names: list[str], steps: int) -> None:
    from torch.distributed.tensor import DTensor

    failures = []
    for name in names:
        torch.manual_seed(0)
        model = MLP()
        ref = copy.deepcopy(model)
        _shard(model, world_size)
        opt = GUARDED[name](list(model.parameters()))
        ref_opt = GUARDED[name](list(ref.parameters()))
        data = torch.Generator().manual_seed(1)
        spikes = []
        for _ in range(steps):
            x = torch.randn(world_size * MICRO_BATCH, IN, generator=data)
            y = torch.randn(world_size * MICRO_BATCH, 3, generator=data)
            mine = slice(rank * MICRO_BATCH, (rank + 1) * MICRO_BATCH)
            torch.nn.functional.mse_loss(model(x[mine]), y[mine]).backward()
            opt.step()
            opt.zero_grad()
            if isinstance(opt, SpikeGuard):
                spikes.append(bool(opt.spike))
            if rank == 0:
                torch.nn.functional.mse_loss(ref(x), y).backward()
                ref_opt.step()
                ref_opt.zero_grad()
                if isinstance(ref_opt, SpikeGuard) and bool(ref_opt.spike) != spikes[-1]:
                    failures.append(f"{name}: spike decision differs from one process at step {len(spikes)}")
        if spikes and (all(spikes) or not any(spikes)):
            failures.append(f"{name}: spikes {spikes}: the test needs both clipped and unclipped steps")
        for (pname, p), q in zip(model.named_parameters(), ref.parameters()):
            assert isinstance(p, DTensor), f"{pname} is not sharded"
            full = p.full_tensor()
            if rank == 0:
                try:
                    torch.testing.assert_close(full, q.detach(), **TOL)
                    if name == "AdamW_magma":
                        score = opt.state[p]["magma_score"]
                        torch.testing.assert_close(score, ref_opt.state[q]["magma_score"], rtol=1e-5, atol=1e-6)
                except AssertionError as e:
                    failures.append(f"{name} {pname}: {e}")
    assert not failures, "\n".join(failures)


@pytest.mark.distributed
@pytest.mark.parametrize("world_size", [2, 4])
def test_fsdp2_magma_and_spike_guard_take_whole_tensor_decisions(world_size):
    run_distributed(_fsdp_guarded_worker, world_size, list(GUARDED), STEPS)
