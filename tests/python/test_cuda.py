"""CUDA kernels (csrc/kernels/cuda/): parity with the CPU kernels, AMP
semantics, CUDA-graph capture (of the ops and of the Python classes' steps,
whose counters live on the device) and torch.compile on CUDA params; Magma's
masks equal to the CPU's, Schedule-Free's device-side weights, and bf16
Newton-Schulz on CUDA.

The CUDA kernels run the same per-element math as the CPU kernels
(csrc/kernels/algos/), compiled without FMA contraction, so on equal inputs
they agree to rounding of the double-precision coefficients. Every test here
needs a GPU and skips with "no CUDA device" without one.
"""

import pytest
import torch
from helpers import eager_then_compiled

import torchopt_ext.optim as tox

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]

# Optimizers with CUDA kernels, with options that exercise their branches.
CUDA_OPTIMIZERS = {
    "SGD": dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=False),
    "SGD-nesterov": dict(lr=0.05, momentum=0.9, weight_decay=0.01, nesterov=True),
    "Adam": dict(lr=1e-2, amsgrad=True, weight_decay=0.01),
    "AdamW": dict(lr=1e-2, weight_decay=0.1),
    "NAdamW": dict(lr=1e-2, weight_decay=0.1),
    "RAdam": dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True),
    "QHAdamW": dict(lr=1e-2, nus=(0.7, 1.0), weight_decay=0.1),
    "Lion": dict(lr=1e-3, weight_decay=0.1),
    "SophiaG": dict(lr=1e-2, weight_decay=0.1, seed=3),
    "AdamW-magma": dict(lr=1e-2, weight_decay=0.1, use_magma=True, magma_p=0.5, seed=3),
    "Adam-magma": dict(lr=1e-2, weight_decay=0.01, amsgrad=True, maximize=True, use_magma=True, seed=4),
    "ScheduleFreeAdamW": dict(lr=1e-2, weight_decay=0.1, warmup_steps=2, r=0.5),
    "ScheduleFreeSGD": dict(lr=1e-2, weight_decay=0.1, warmup_steps=2),
    # Two-stage kernels (per-tensor norms first): the global clip binds with
    # these grads (divisor read on the device), and so does MARS's unit clip.
    "LAMB": dict(lr=1e-2, weight_decay=0.1, max_grad_norm=0.5),
    "LAMB-decoupled": dict(lr=1e-2, weight_decay=0.1, decoupled_decay=True, trust_clip=True, max_grad_norm=None),
    "MARS": dict(lr=1e-2, weight_decay=0.1, amsgrad=True, optimize_1d=True),
    "MARS-lion": dict(lr=1e-3, weight_decay=0.1, mars_type="mars-lion"),
}
TWO_STAGE = ["LAMB", "LAMB-decoupled", "MARS", "MARS-lion"]

# Odd sizes (scalar tails), one spanning several 65536-element chunks, and a
# 0-d tensor.
SHAPES = [(33, 5), (7,), (), (65536 * 2 + 3,)]

# A few ulps of the storage type. The CPU kernels are built with GCC's FMA
# contraction (as ATen's, which the torch parity tests pin), the CUDA kernels
# with --fmad=false, so `a * b + c` rounds once on one side and twice on the
# other. Run under the host emulation (tests/cpp/cuda_emulation, which builds
# the .cu files without contraction), the fp32 results differ from the CPU's
# by up to ~5e-7 at values of order 1 after a few steps, and an atol of 1e-7
# failed there (the Schedule-Free lerp pass): hence 1e-6.
TOLERANCES = {
    torch.float32: dict(rtol=2e-6, atol=1e-6),
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.bfloat16: dict(rtol=8e-3, atol=1e-5),
    torch.float16: dict(rtol=1e-3, atol=1e-6),
}


def _make(name, params, **extra):
    cls = getattr(tox, name.split("-")[0])
    return cls(params, **{**CUDA_OPTIMIZERS[name], **extra})


def _unaligned(shape, dtype, device):
    """A contiguous tensor whose data starts one element into its storage
    (not 16-byte aligned: the launcher's element-load path)."""
    numel = int(torch.tensor(shape).prod().item()) if shape else 1
    base = torch.empty(numel + 1, dtype=dtype, device=device)
    return base[1:].view(shape)


def _run(name, device, dtype, steps=5, unaligned=False, **extra):
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES] for _ in range(steps)]
    params = []
    for x in init:
        if unaligned:
            p = _unaligned(x.shape, dtype, device)
            p.copy_(x)
        else:
            p = x.to(device=device, dtype=dtype)
        params.append(p.requires_grad_())
    opt = _make(name, params, **extra)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.to(device=device, dtype=dtype)
        opt.step()
    return [p.detach().cpu() for p in params], opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", sorted(CUDA_OPTIMIZERS))
def test_cuda_matches_cpu(name, dtype):
    cpu, _ = _run(name, "cpu", dtype)
    cuda, opt = _run(name, "cuda", dtype)
    for a, b in zip(cuda, cpu):
        torch.testing.assert_close(a, b, **TOLERANCES[dtype])
    # State stays on the param's device and is updated there.
    for state in opt.state.values():
        for key, value in state.items():
            if torch.is_tensor(value) and key != "step":
                assert value.is_cuda, key


@pytest.mark.parametrize("name", sorted(CUDA_OPTIMIZERS))
def test_cuda_unaligned_tensors_match_cpu(name):
    cpu, _ = _run(name, "cpu", torch.float32)
    cuda, _ = _run(name, "cuda", torch.float32, unaligned=True)
    for a, b in zip(cuda, cpu):
        torch.testing.assert_close(a, b, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("name", ["AdamW", "Lion", "SGD", "ScheduleFreeAdamW", "AdamW-magma"])
def test_cuda_bf16_params_fp32_state_with_stochastic_rounding_match_cpu(name):
    # Same seed, same counter-based hash: the same rounding decisions.
    extra = dict(state_dtype=torch.float32, stochastic_rounding=True, seed=11)
    cpu, _ = _run(name, "cpu", torch.bfloat16, **extra)
    cuda, _ = _run(name, "cuda", torch.bfloat16, **extra)
    for a, b in zip(cuda, cpu):
        torch.testing.assert_close(a, b, **TOLERANCES[torch.bfloat16])
        # Stochastic rounding leaves values off the round-to-nearest grid:
        # nearly every element must agree bit for bit, not only to one ulp.
        assert (a == b).float().mean() > 0.999


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_sophia_hessian_refresh_matches_cpu(dtype):
    def run(device):
        gen = torch.Generator().manual_seed(2)
        params = [torch.randn(s, generator=gen).to(device=device, dtype=dtype).requires_grad_() for s in SHAPES]
        opt = tox.SophiaG(params, lr=1e-2, weight_decay=0.1, update_period=1, seed=3)
        for _ in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(device=device, dtype=dtype)
            opt.update_hessian(hessian=[(p.grad.float() ** 2).to(dtype) for p in params])
            opt.step()
        return [p.detach().cpu() for p in params], [opt.state[p]["hessian"].cpu() for p in params]

    (p_cpu, h_cpu), (p_cuda, h_cuda) = run("cpu"), run("cuda")
    for a, b in zip(p_cuda + h_cuda, p_cpu + h_cpu):
        torch.testing.assert_close(a, b, **TOLERANCES[dtype])


def _adam_op_args(device, shapes, dtype=torch.float32, state_dtype=torch.float32, device_scalars=False):
    gen = torch.Generator().manual_seed(5)
    params = [torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in shapes]
    grads = [torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in shapes]
    m = [torch.zeros(s, device=device, dtype=state_dtype) for s in shapes]
    v = [torch.zeros(s, device=device, dtype=state_dtype) for s in shapes]
    scalar_device = device if device_scalars else "cpu"
    steps = [torch.zeros((), dtype=torch.float32, device=scalar_device) for _ in shapes]
    lr = torch.tensor(1e-2, dtype=torch.float32, device=scalar_device)
    kwargs = dict(
        beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decoupled_weight_decay=True, amsgrad=False, maximize=False
    )
    return [params, grads, m, v, [], steps, lr], kwargs


def _cuda_lists(args):
    return [[t.clone() for t in x] if isinstance(x, list) else x.clone() for x in args]


def test_cuda_many_tensors_and_chunks_cover_every_element():
    # More tensors than one launch's table (24) and more chunks than its block
    # table (256 x 65536 elements): the launcher relaunches, also mid-tensor.
    shapes = [(3,)] * 40 + [(256 * 65536 + 17,)] + [(5, 7)] * 3
    args, kwargs = _adam_op_args("cpu", shapes)
    cuda_args = [[t.cuda() for t in x] if isinstance(x, list) else x for x in _cuda_lists(args)]
    torch.ops.torchopt_ext.adam_step_(*args, **kwargs)
    torch.ops.torchopt_ext.adam_step_(*cuda_args, **kwargs)
    for a, b in zip(cuda_args[0], args[0]):
        torch.testing.assert_close(a.cpu(), b, **TOLERANCES[torch.float32])
    for a, b in zip(cuda_args[2], args[2]):
        torch.testing.assert_close(a.cpu(), b, **TOLERANCES[torch.float32])


def test_cuda_device_lr_and_steps_match_host_ones():
    shapes = [(129,), (4, 33)]
    host, kwargs = _adam_op_args("cuda", shapes)
    dev = _cuda_lists(host)
    dev[5] = [s.cuda() for s in dev[5]]
    dev[6] = dev[6].cuda()
    for _ in range(3):
        torch.ops.torchopt_ext.adam_step_(*host, **kwargs)
        torch.ops.torchopt_ext.adam_step_(*dev, **kwargs)
    assert all(s.item() == 3.0 for s in dev[5])
    for a, b in zip(dev[0], host[0]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("device_steps", [False, True])
def test_cuda_found_inf_skips_the_whole_step(device_steps):
    args, kwargs = _adam_op_args("cuda", [(65536 + 5,), (3, 3)], device_scalars=device_steps)
    before = _cuda_lists(args)
    found_inf = torch.ones((), device="cuda")
    grad_scale = torch.full((), 4.0, device="cuda")
    torch.ops.torchopt_ext.adam_step_(*args, **kwargs, grad_scale=grad_scale, found_inf=found_inf)
    for now, then in zip(args, before):
        for a, b in zip(now if isinstance(now, list) else [now], then if isinstance(then, list) else [then]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("device_steps", [False, True])
def test_cuda_grad_scale_unscales_and_writes_grads_back_like_cpu(device_steps):
    shapes = [(65536 + 5,), (3, 3)]
    cpu_args, kwargs = _adam_op_args("cpu", shapes)
    cuda_args, _ = _adam_op_args("cuda", shapes, device_scalars=device_steps)
    torch.ops.torchopt_ext.adam_step_(*cpu_args, **kwargs, grad_scale=torch.tensor(4.0), found_inf=torch.tensor(0.0))
    torch.ops.torchopt_ext.adam_step_(
        *cuda_args,
        **kwargs,
        grad_scale=torch.full((), 4.0, device="cuda"),
        found_inf=torch.zeros((), device="cuda"),
    )
    for k in (0, 1, 2, 3):  # params, unscaled grads, exp_avgs, exp_avg_sqs
        for a, b in zip(cuda_args[k], cpu_args[k]):
            torch.testing.assert_close(a.cpu(), b, **TOLERANCES[torch.float32])
    assert all(s.item() == 1.0 for s in cuda_args[5])


def test_cuda_gradscaler_with_optimizer_class():
    model = torch.nn.Linear(16, 8).cuda()
    opt = tox.AdamW(model.parameters(), lr=1e-2)
    assert opt._step_supports_amp_scaling
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10)
    ref = torch.nn.Linear(16, 8)
    ref.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
    ref_opt = tox.AdamW(ref.parameters(), lr=1e-2)
    x = torch.randn(4, 16)
    for _ in range(3):
        opt.zero_grad()
        scaler.scale(model(x.cuda()).square().sum()).backward()
        scaler.step(opt)
        scaler.update()
        ref_opt.zero_grad()
        ref(x).square().sum().backward()
        ref_opt.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a.detach().cpu(), b.detach(), rtol=1e-5, atol=1e-6)


def test_cuda_graph_capture_of_a_step_with_tensor_lr():
    shapes = [(65536 + 9,), (17, 3)]
    args, kwargs = _adam_op_args("cuda", shapes, device_scalars=True)
    eager = _cuda_lists(args)
    lr = args[6]
    # Warm up on a side stream (allocator and lazy init), as torch.cuda.graphs advises.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.ops.torchopt_ext.adam_step_(*args, **kwargs)
        torch.ops.torchopt_ext.adam_step_(*eager, **kwargs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.ops.torchopt_ext.adam_step_(*args, **kwargs)
    for value in (1e-2, 5e-3, 1e-3):
        lr.fill_(value)
        eager[6].fill_(value)
        graph.replay()
        torch.ops.torchopt_ext.adam_step_(*eager, **kwargs)
    torch.cuda.synchronize()
    # Capture itself does not run the kernels: 1 warm-up + 3 replays.
    assert all(s.item() == 4.0 for s in args[5])
    for a, b in zip(args[0], eager[0]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["AdamW", "SGD", "Lion", "LAMB", "MARS"])
def test_cuda_compiled_step_matches_eager(name):
    eager, compiled, _ = eager_then_compiled(
        lambda ps: _make(name, ps),
        lambda: [torch.randn(8, 5, device="cuda"), torch.randn(5, device="cuda")],
        steps=3,
    )
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)


@pytest.mark.parametrize("on_device", ["lr", "steps"])
def test_cuda_nadam_host_mu_products_with_device_lr_or_steps_are_rejected_before_touching_state(on_device):
    # Host mu-products are advanced on the host: a CUDA lr needs device
    # counters and mu-products, and device counters need device mu-products.
    params = [torch.randn(5, device="cuda")]
    grads = [torch.randn(5, device="cuda")]
    m, v = [torch.zeros(5, device="cuda")], [torch.zeros(5, device="cuda")]
    mu = [torch.ones((), dtype=torch.float32)]
    steps = [torch.zeros((), device="cuda" if on_device == "steps" else "cpu")]
    lr = torch.tensor(1e-2, dtype=torch.float64, device="cuda" if on_device == "lr" else "cpu")
    before = params[0].clone()
    with pytest.raises(ValueError, match="lr must be a CPU tensor" if on_device == "lr" else "mu_products"):
        torch.ops.torchopt_ext.nadam_step_(
            params,
            grads,
            m,
            v,
            mu,
            steps,
            lr,
            beta1=0.9,
            beta2=0.999,
            eps=1e-8,
            weight_decay=0.0,
            momentum_decay=4e-3,
            decoupled_weight_decay=True,
            maximize=False,
        )
    assert torch.equal(params[0], before)
    assert mu[0].item() == 1.0 and steps[0].item() == 0.0


def test_cuda_params_and_cpu_state_are_rejected_with_a_clear_error():
    args, kwargs = _adam_op_args("cuda", [(4,)])
    args[2] = [torch.zeros(4)]  # exp_avgs on the CPU
    with pytest.raises(ValueError, match="exp_avgs"):
        torch.ops.torchopt_ext.adam_step_(*args, **kwargs)


# -- device-side step counters (the Python classes) ----------------------------

# Classes whose ops take CUDA step counters create them on the param's device.
DEVICE_STEP_OPTIMIZERS = ["SGD", "Adam", "AdamW", "AdamW-magma", "RAdam", "QHAdamW", "Lion", "SophiaG"]
DEVICE_STEP_OPTIMIZERS += ["ScheduleFreeAdamW", "ScheduleFreeSGD"]
DEVICE_STEP_OPTIMIZERS += ["NAdamW", "LAMB", "MARS", "MARS-lion"]  # issue 7


@pytest.mark.parametrize("name", DEVICE_STEP_OPTIMIZERS)
def test_cuda_params_get_device_step_counters_and_scalar_state(name):
    _, opt = _run(name, "cuda", torch.float32, steps=2)
    for state in opt.state.values():
        assert state["step"].is_cuda and state["step"].dtype == torch.float32
        assert state["step"].item() == 2.0
        for key in ("weight_sum", "lr_max", "magma_score", "mu_product"):
            if key in state:
                assert state[key].is_cuda, key


@pytest.mark.parametrize("name", ["AdamW", "ScheduleFreeAdamW", "AdamW-magma"])
def test_cuda_state_dict_moves_step_counters_to_the_params_device(name):
    _, cpu_opt = _run(name, "cpu", torch.float32, steps=3)
    _, cuda_opt = _run(name, "cuda", torch.float32, steps=3)
    # CPU checkpoint into CUDA params: counters move to the GPU, and back.
    cuda_opt.load_state_dict(cpu_opt.state_dict())
    for state in cuda_opt.state.values():
        assert state["step"].is_cuda and state["step"].item() == 3.0
        for key in ("weight_sum", "lr_max", "magma_score"):
            if key in state:
                assert state[key].is_cuda, key
    cpu_opt.load_state_dict(cuda_opt.state_dict())
    for state in cpu_opt.state.values():
        assert all(not v.is_cuda for v in state.values() if torch.is_tensor(v))


def _capture_and_replay(graph_params, graph_opt, eager_params, eager_opt, grads):
    """Captures graph_opt.step() in a CUDA graph (after a warm-up step on a
    side stream, as torch.cuda.graphs advises, which creates the state) and
    replays it for grads[1:], stepping eager_opt on the same grads."""

    def load(params, gs):
        for p, g in zip(params, gs):
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        load(graph_params, grads[0])
        graph_opt.step()
    torch.cuda.current_stream().wait_stream(side)
    load(eager_params, grads[0])
    eager_opt.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_opt.step()
    for gs in grads[1:]:
        load(graph_params, gs)
        graph.replay()
        load(eager_params, gs)
        eager_opt.step()
    torch.cuda.synchronize()


@pytest.mark.parametrize("name", ["AdamW", "SGD", "Lion", "ScheduleFreeAdamW", "AdamW-magma"])
def test_cuda_graph_capture_of_the_optimizer_class_step(name):
    shapes = [(65536 + 9,), (17, 3), ()]
    gen = torch.Generator().manual_seed(3)
    init = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen).cuda() for s in shapes] for _ in range(6)]

    def make():
        params = [x.cuda().requires_grad_() for x in init]
        return params, _make(name, params)

    eager_params, eager_opt = make()
    graph_params, graph_opt = make()
    for p in graph_params:
        p.grad = torch.zeros_like(p)  # static grads the graph reads

    _capture_and_replay(graph_params, graph_opt, eager_params, eager_opt, grads)
    # The counters advanced on the device at every replay (a host counter
    # would have been baked into the graph).
    for state in graph_opt.state.values():
        assert state["step"].is_cuda and state["step"].item() == len(grads)
    for a, b in zip(graph_params, eager_params):
        assert torch.equal(a, b)
    for p_graph, p_eager in zip(graph_params, eager_params):
        for key, value in graph_opt.state[p_graph].items():
            assert torch.equal(value, eager_opt.state[p_eager][key]), key


# -- Schedule-Free ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["ScheduleFreeAdamW", "ScheduleFreeSGD"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_schedulefree_eval_train_switch_matches_cpu(name, dtype):
    results = {}
    for device in ("cpu", "cuda"):
        _, opt = _run(name, device, dtype, steps=4)
        params = [p for g in opt.param_groups for p in g["params"]]
        opt.eval()
        x = [p.detach().cpu().clone() for p in params]
        opt.train()
        results[device] = (x, [p.detach().cpu() for p in params])
    for a, b in zip(results["cuda"][0] + results["cuda"][1], results["cpu"][0] + results["cpu"][1]):
        torch.testing.assert_close(a, b, **TOLERANCES[dtype])


@pytest.mark.parametrize("polyak", [False, True])
def test_cuda_schedulefree_wrapper_matches_cpu(polyak):
    def run(device):
        gen = torch.Generator().manual_seed(4)
        params = [torch.randn(s, generator=gen).to(device).requires_grad_() for s in SHAPES]
        opt = tox.ScheduleFree(tox.AdamW(params, lr=1e-2, weight_decay=0.05), weight_decay_at_y=0.01, polyak=polyak)
        for _ in range(4):
            grads = [torch.randn(p.shape, generator=gen).to(device) for p in params]
            for p, g in zip(params, grads):
                p.grad = g
            loss = sum((p.float() ** 2).sum() for p in params).detach()
            opt.step(loss=loss) if polyak else opt.step()
        return [p.detach().cpu() for p in params]

    for a, b in zip(run("cuda"), run("cpu")):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _sf_op_args(device, device_counters, shapes=((65536 + 7,), (5, 3), ())):
    gen = torch.Generator().manual_seed(6)
    params = [torch.randn(s, generator=gen).to(device) for s in shapes]
    grads = [torch.randn(s, generator=gen).to(device) for s in shapes]
    zs = [p.clone() for p in params]
    vs = [torch.zeros_like(p) for p in params]
    where = device if device_counters else "cpu"
    weight_sums = [torch.zeros((), dtype=torch.float64, device=where) for _ in shapes]
    lr_maxes = [torch.full((), -1.0, dtype=torch.float64, device=where) for _ in shapes]
    steps = [torch.zeros((), device=where) for _ in shapes]
    lr = torch.tensor(1e-2, dtype=torch.float64)
    kwargs = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, warmup_steps=3, r=0.5, weight_lr_power=2.0)
    return [params, grads, zs, vs, weight_sums, lr_maxes, steps, lr], kwargs


def test_cuda_schedulefree_device_counters_match_host_counters():
    host, kwargs = _sf_op_args("cuda", device_counters=False)
    dev, _ = _sf_op_args("cuda", device_counters=True)
    dev[7] = dev[7].cuda()  # and a device lr
    for _ in range(5):
        torch.ops.torchopt_ext.schedulefree_adamw_step_(*host, **kwargs)
        torch.ops.torchopt_ext.schedulefree_adamw_step_(*dev, **kwargs)
    for k in (0, 2, 3, 4, 5):  # params, z, v, weight sums, lr maxes
        for a, b in zip(dev[k], host[k]):
            torch.testing.assert_close(a.cpu(), b.cpu(), rtol=1e-6, atol=1e-9)
    assert all(s.item() == 5.0 for s in dev[6])


@pytest.mark.parametrize("device_counters", [False, True])
def test_cuda_schedulefree_found_inf_skips_the_whole_step(device_counters):
    args, kwargs = _sf_op_args("cuda", device_counters)
    before = _cuda_lists(args)
    torch.ops.torchopt_ext.schedulefree_adamw_step_(
        *args, **kwargs, grad_scale=torch.full((), 8.0, device="cuda"), found_inf=torch.ones((), device="cuda")
    )
    for now, then in zip(args, before):
        for a, b in zip(now if isinstance(now, list) else [now], then if isinstance(then, list) else [then]):
            assert torch.equal(a, b)


def test_cuda_schedulefree_host_counters_with_a_cuda_lr_are_rejected_before_touching_state():
    args, kwargs = _sf_op_args("cuda", device_counters=False)
    args[7] = args[7].cuda()
    before = _cuda_lists(args)
    with pytest.raises(ValueError, match="CPU tensor"):
        torch.ops.torchopt_ext.schedulefree_adamw_step_(*args, **kwargs)
    for now, then in zip(args, before):
        for a, b in zip(now if isinstance(now, list) else [now], then if isinstance(then, list) else [then]):
            assert torch.equal(a, b)


def test_cuda_schedulefree_device_counters_with_host_weights_are_rejected():
    args, kwargs = _sf_op_args("cuda", device_counters=True)
    args[4] = [w.cpu() for w in args[4]]
    with pytest.raises(ValueError, match="weight_sums"):
        torch.ops.torchopt_ext.schedulefree_adamw_step_(*args, **kwargs)


# -- Magma on Adam ----------------------------------------------------------------


def _magma_op_args(device, device_counters, dtype=torch.float32):
    shapes = [(65536 * 2 + 3,), (33, 5), (7,), (), (1,)] + [(4,)] * 30  # > one score batch of tensors
    gen = torch.Generator().manual_seed(8)
    params = [torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in shapes]
    m = [torch.zeros(s, device=device, dtype=dtype) for s in shapes]
    v = [torch.zeros(s, device=device, dtype=dtype) for s in shapes]
    scores = [torch.full((), 0.5, device=device) for _ in shapes]
    where = device if device_counters else "cpu"
    steps = [torch.zeros((), device=where) for _ in shapes]
    kwargs = dict(
        beta1=0.9,
        beta2=0.999,
        eps=1e-8,
        weight_decay=0.1,
        decoupled_weight_decay=True,
        amsgrad=False,
        maximize=False,
        magma_p=0.5,
        magma_tau=2.0,
        seed=21,
    )
    return [params, None, m, v, [], scores, steps, torch.tensor(1e-2, dtype=torch.float64)], kwargs, gen


@pytest.mark.parametrize("device_counters", [False, True])
def test_cuda_magma_masks_agree_with_cpu_bitwise_and_scores_to_rounding(device_counters):
    cpu_args, kwargs, gen = _magma_op_args("cpu", False)
    cuda_args, _, _ = _magma_op_args("cuda", device_counters)
    for _ in range(6):
        grads = [torch.randn(p.shape, generator=gen) for p in cpu_args[0]]
        cpu_args[1] = grads
        cuda_args[1] = [g.cuda() for g in grads]
        cpu_before = [p.clone() for p in cpu_args[0]]
        cuda_before = [p.clone() for p in cuda_args[0]]
        torch.ops.torchopt_ext.adam_magma_step_(*cpu_args, **kwargs)
        torch.ops.torchopt_ext.adam_magma_step_(*cuda_args, **kwargs)
        # A dropped tensor is left exactly as it was: the keep/drop pattern
        # is the counter hash's, the same on both devices.
        cpu_kept = [not torch.equal(a, b) for a, b in zip(cpu_args[0], cpu_before)]
        cuda_kept = [not torch.equal(a.cpu(), b.cpu()) for a, b in zip(cuda_args[0], cuda_before)]
        assert cuda_kept == cpu_kept
        assert any(cpu_kept) and not all(cpu_kept)
    for k in (0, 2, 3):
        for a, b in zip(cuda_args[k], cpu_args[k]):
            torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-6)
    for a, b in zip(cuda_args[5], cpu_args[5]):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-6, atol=1e-7)
    keep = [torch.ops.torchopt_ext.magma_keep(21, i, 6.0, 0.5) for i in range(len(cpu_args[0]))]
    assert keep == cpu_kept  # the last step's mask is the public draw


def test_cuda_magma_found_inf_leaves_scores_and_state_untouched():
    args, kwargs, gen = _magma_op_args("cuda", True)
    args[1] = [torch.randn(p.shape, generator=gen).cuda() for p in args[0]]
    before = _cuda_lists([a for a in args if a is not None])
    torch.ops.torchopt_ext.adam_magma_step_(
        *args, **kwargs, grad_scale=torch.full((), 2.0, device="cuda"), found_inf=torch.ones((), device="cuda")
    )
    for now, then in zip([a for a in args if a is not None], before):
        for a, b in zip(now if isinstance(now, list) else [now], then if isinstance(then, list) else [then]):
            assert torch.equal(a, b)


def test_cuda_magma_with_cpu_scores_is_rejected_with_a_clear_error():
    args, kwargs, gen = _magma_op_args("cuda", True)
    args[1] = [torch.randn(p.shape, generator=gen).cuda() for p in args[0]]
    args[5] = [s.cpu() for s in args[5]]
    with pytest.raises(ValueError, match="magma_scores"):
        torch.ops.torchopt_ext.adam_magma_step_(*args, **kwargs)


# -- Newton-Schulz ------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(256, 128), (96, 200), (3, 64, 48)])
def test_cuda_bf16_newton_schulz_is_close_to_fp32_cpu(shape):
    # bf16 GEMMs (8 mantissa bits, fp32 accumulation) over 5 quintic steps:
    # the CPU's bf16 path lands 0.013-0.014 (Frobenius, relative) from fp32 on
    # these shapes, ~3.5 bf16 ulps (2^-8); 0.03 leaves 2x room for cuBLAS's
    # different accumulation order, and a wrong dtype or a broken batch fails it.
    x = torch.randn(shape, generator=torch.Generator().manual_seed(9))
    ref = torch.ops.torchopt_ext.newton_schulz(x, dtype=torch.float32)
    out = torch.ops.torchopt_ext.newton_schulz(x.cuda(), dtype=torch.bfloat16)
    assert out.is_cuda and out.dtype == torch.bfloat16 and out.shape == x.shape
    diff = (out.float().cpu() - ref).flatten(-2).norm(dim=-1) / ref.flatten(-2).norm(dim=-1)
    assert diff.max().item() < 0.03, diff
    # Batched on CUDA (one baddbmm per product) equals each matrix on its own to bf16 rounding.
    if len(shape) == 3:
        single = torch.stack([torch.ops.torchopt_ext.newton_schulz(m.cuda(), dtype=torch.bfloat16) for m in x])
        torch.testing.assert_close(out.float(), single.float(), rtol=2e-2, atol=2e-2)


def test_cuda_fp32_newton_schulz_matches_cpu():
    x = torch.randn(64, 40, generator=torch.Generator().manual_seed(10))
    for norm in ("frobenius", "aol", "schatten"):
        ref = torch.ops.torchopt_ext.newton_schulz(x, dtype=torch.float32, normalization=norm)
        out = torch.ops.torchopt_ext.newton_schulz(x.cuda(), dtype=torch.float32, normalization=norm)
        torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=1e-5)


# --- LAMB / MARS: the norm reduction stage on its own ---------------------

_LAMB_KW = dict(
    beta1=0.9,
    beta2=0.999,
    eps=1e-6,
    weight_decay=0.1,
    bias_correction=True,
    grad_averaging=True,
    trust_clip=False,
    always_adapt=False,
    decoupled_decay=False,
    maximize=False,
)
_MARS_KW = dict(
    beta1=0.95,
    beta2=0.99,
    eps=1e-8,
    weight_decay=0.1,
    gamma=0.025,
    mars_type="mars-adamw",
    amsgrad=False,
    maximize=False,
)


def _two_stage_args(algo, device, shapes, dtype=torch.float32, device_scalars=False, seed=7):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in shapes]
    grads = [(3 * torch.randn(s, generator=gen)).to(device=device, dtype=dtype) for s in shapes]
    scalar_device = device if device_scalars else "cpu"
    steps = [torch.full((), 2.0, dtype=torch.float32, device=scalar_device) for _ in shapes]
    lr = torch.tensor(1e-2, dtype=torch.float64, device=scalar_device)
    state = [[torch.randn(s, generator=gen).abs().to(device=device, dtype=dtype) for s in shapes] for _ in range(2)]
    if algo == "lamb":
        return [params, grads, state[0], state[1], steps, lr], dict(_LAMB_KW)
    last = [torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in shapes]
    return [params, grads, state[0], state[1], [], last, steps, lr], dict(_MARS_KW)


def _to(args, device):
    return [[t.to(device) for t in x] if isinstance(x, list) else x.to(device) for x in args]


@pytest.mark.parametrize("device_scalars", [False, True])
@pytest.mark.parametrize("algo", ["lamb", "mars"])
def test_cuda_norm_sqs_match_cpu_and_leave_everything_untouched(algo, device_scalars):
    # More tensors than one norm launch holds (16), a tensor spanning more
    # chunks than one launch's block table (256), empty and 0-d tensors.
    shapes = [(3,)] * 20 + [(256 * 65536 + 17,), (0,), (), (5, 7)]
    cpu_args, kw = _two_stage_args(algo, "cpu", shapes)
    cuda_args = _to(cpu_args, "cuda")
    if device_scalars:
        cuda_args[-2] = [s.cuda() for s in cuda_args[-2]]
        cuda_args[-1] = cuda_args[-1].cuda()
    before = _cuda_lists(cuda_args)
    op = getattr(torch.ops.torchopt_ext, f"{algo}_norm_sqs")
    cpu = op(*cpu_args, **kw)
    cuda = op(*cuda_args, **kw)
    assert cuda.is_cuda and cuda.dtype == torch.float64 and cuda.shape == cpu.shape
    # CPU sums runs of fp32 squares in double, CUDA squares in double: close, not equal.
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=1e-6, atol=0)
    assert cpu[len(shapes) - 3].abs().sum() == 0  # the empty tensor
    for now, then in zip(cuda_args, before):
        for a, b in zip(now if isinstance(now, list) else [now], then if isinstance(then, list) else [then]):
            assert torch.equal(a, b)  # nothing written, steps not advanced
    # Deterministic: no atomics in the reduction.
    assert torch.equal(op(*cuda_args, **kw), cuda)


@pytest.mark.parametrize("algo", ["lamb", "mars"])
def test_cuda_step_with_given_norm_sqs_is_the_fused_step(algo):
    # The split the FSDP2 front ends run (stage 1, reduce, stage 2) on one
    # device: stage 2 with stage 1's sums equals the fused step bit for bit.
    shapes = [(65536 + 5,), (33, 5), ()]
    fused, kw = _two_stage_args(algo, "cuda", shapes, device_scalars=True)
    split = _cuda_lists(fused)
    step = getattr(torch.ops.torchopt_ext, f"{algo}_step_")
    norms = getattr(torch.ops.torchopt_ext, f"{algo}_norm_sqs")
    for _ in range(3):
        step(*fused, **kw)
        step(*split, **kw, norm_sqs=norms(*split, **kw))
    for a, b in zip(fused, split):
        for x, y in zip(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b]):
            assert torch.equal(x, y)


@pytest.mark.parametrize("algo", ["lamb", "mars"])
@pytest.mark.parametrize("device_steps", [False, True])
def test_cuda_two_stage_found_inf_skips_the_whole_step(algo, device_steps):
    args, kw = _two_stage_args(algo, "cuda", [(65536 + 5,), (3, 3)], device_scalars=device_steps)
    before = _cuda_lists(args)
    amp = dict(grad_scale=torch.full((), 4.0, device="cuda"), found_inf=torch.ones((), device="cuda"))
    getattr(torch.ops.torchopt_ext, f"{algo}_step_")(*args, **kw, **amp)
    sums = getattr(torch.ops.torchopt_ext, f"{algo}_norm_sqs")(*args, **kw, **amp)
    assert torch.equal(sums, torch.zeros_like(sums))
    for now, then in zip(args, before):
        for a, b in zip(now if isinstance(now, list) else [now], then if isinstance(then, list) else [then]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("algo", ["lamb", "mars"])
def test_cuda_two_stage_grad_scale_matches_cpu(algo):
    shapes = [(65536 + 5,), (3, 3)]
    cpu_args, kw = _two_stage_args(algo, "cpu", shapes)
    cuda_args = _to(cpu_args, "cuda")
    step = getattr(torch.ops.torchopt_ext, f"{algo}_step_")
    step(*cpu_args, **kw, grad_scale=torch.tensor(4.0), found_inf=torch.tensor(0.0))
    step(*cuda_args, **kw, grad_scale=torch.full((), 4.0, device="cuda"), found_inf=torch.zeros((), device="cuda"))
    for k in range(4):  # params, unscaled grads, both moments
        for a, b in zip(cuda_args[k], cpu_args[k]):
            torch.testing.assert_close(a.cpu(), b, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("algo", ["lamb", "mars"])
def test_cuda_graph_capture_of_a_two_stage_step(algo):
    args, kw = _two_stage_args(algo, "cuda", [(65536 + 9,), (17, 3)], device_scalars=True)
    eager = _cuda_lists(args)
    step = getattr(torch.ops.torchopt_ext, f"{algo}_step_")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(*args, **kw)
        step(*eager, **kw)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(*args, **kw)
    for value in (1e-2, 5e-3):
        args[-1].fill_(value)
        eager[-1].fill_(value)
        graph.replay()
        step(*eager, **kw)
    torch.cuda.synchronize()
    assert all(s.item() == 5.0 for s in args[-2])  # 2 + 1 warm-up + 2 replays
    for a, b in zip(args[0], eager[0]):
        assert torch.equal(a, b)


# -- Adafactor (kernels/cuda/adafactor.cu): row / column reductions, then the update.
# Shapes: factored with several row slabs (130 > 128 rows) and column blocks
# (300 > 256 columns), a 3-D stack, a vector over several units, 0-d, a 1x1
# matrix and an empty matrix.
ADAFACTOR_SHAPES = [(33, 5), (130, 300), (3, 130, 7), (65536 * 2 + 3,), (), (1, 1), (0, 4)]
ADAFACTOR_CONFIGS = {
    "defaults": dict(),
    "beta1-wd-maximize": dict(beta1=0.9, weight_decay=0.1, maximize=True),
    "no-relative-d": dict(lr=3e-2, relative_step=False, scale_parameter=False, d=1.5),
    "eps1-zero": dict(eps=(0.0, 1e-3)),  # the exact per-element factored form
}
# The CUDA sums add in another order than the CPU ones (alpha and the clip
# differ in the last bits), so this is looser than one ulp but far below a
# wrong row / column / clip (>1e-3 relative).
ADAFACTOR_TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float64: dict(rtol=1e-12, atol=1e-13),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-4),
    torch.float16: dict(rtol=2e-3, atol=1e-5),
}


def _adafactor_run(device, dtype, steps=5, **options):
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in ADAFACTOR_SHAPES]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in ADAFACTOR_SHAPES] for _ in range(steps)]
    params = [x.to(device=device, dtype=dtype).requires_grad_() for x in init]
    opt = tox.Adafactor(params, **options)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.to(device=device, dtype=dtype)
        opt.step()
    state = [v.cpu() for p in params for k, v in sorted(opt.state[p].items()) if k != "step"]
    return [p.detach().cpu() for p in params], state


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("config", sorted(ADAFACTOR_CONFIGS))
def test_cuda_adafactor_matches_cpu(config, dtype):
    extra = dict(state_dtype=torch.float32) if dtype in (torch.bfloat16, torch.float16) else {}
    (p_cpu, s_cpu), (p_cuda, s_cuda) = (
        _adafactor_run(device, dtype, **ADAFACTOR_CONFIGS[config], **extra) for device in ("cpu", "cuda")
    )
    for a, b in zip(p_cuda + s_cuda, p_cpu + s_cpu):
        torch.testing.assert_close(a, b, **ADAFACTOR_TOL[dtype])


def test_cuda_adafactor_is_deterministic():
    first, second = (_adafactor_run("cuda", torch.float32, beta1=0.9) for _ in range(2))
    for a, b in zip(first[0] + first[1], second[0] + second[1]):
        assert torch.equal(a, b)


def test_cuda_adafactor_nan_gradients_propagate_like_cpu():
    def run(device):
        p = torch.ones(4, 6, device=device, requires_grad=True)
        opt = tox.Adafactor([p])
        p.grad = torch.ones(4, 6, device=device)
        p.grad[1, 2] = float("nan")
        opt.step()
        return p.detach().cpu()

    assert torch.equal(run("cuda").isnan(), run("cpu").isnan())


def _adafactor_op_args(device, shapes, device_scalars=False, beta1=None):
    gen = torch.Generator().manual_seed(5)
    params = [torch.randn(s, generator=gen).to(device) for s in shapes]
    grads = [torch.randn(s, generator=gen).to(device) for s in shapes]
    rows = [torch.zeros(p.shape[:-1] + (1,), device=device) for p in params if p.dim() >= 2]
    cols = [torch.zeros(p.shape[:-2] + (1,) + p.shape[-1:], device=device) for p in params if p.dim() >= 2]
    variances = [torch.zeros(p.shape, device=device) for p in params if p.dim() < 2]
    exp_avgs = [torch.zeros(p.shape, device=device) for p in params] if beta1 is not None else []
    scalar_device = device if device_scalars else "cpu"
    steps = [torch.zeros((), dtype=torch.float32, device=scalar_device) for _ in shapes]
    lr = torch.tensor(1e-2, dtype=torch.float32, device=scalar_device)
    kwargs = dict(
        beta2_decay=-0.8,
        eps1=None,
        eps2=1e-3,
        d=1.0,
        weight_decay=0.1,
        beta1=beta1,
        relative_step=True,
        scale_parameter=True,
        warmup_init=False,
        maximize=False,
    )
    return [params, grads, rows, cols, variances, exp_avgs, steps, lr], kwargs


def test_cuda_adafactor_device_lr_and_steps_match_host_ones():
    shapes = [(129,), (40, 33), (2, 3, 5)]
    host, kwargs = _adafactor_op_args("cuda", shapes, beta1=0.9)
    dev = _cuda_lists(host)
    dev[6] = [s.cuda() for s in dev[6]]
    dev[7] = dev[7].cuda()
    for _ in range(3):
        torch.ops.torchopt_ext.adafactor_step_(*host, **kwargs)
        torch.ops.torchopt_ext.adafactor_step_(*dev, **kwargs)
    assert all(s.item() == 3.0 for s in dev[6])
    for a, b in zip(dev[0] + dev[2] + dev[3], host[0] + host[2] + host[3]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("device_steps", [False, True])
def test_cuda_adafactor_found_inf_skips_and_grad_scale_unscales(device_steps):
    shapes = [(70000,), (300, 7)]
    args, kwargs = _adafactor_op_args("cuda", shapes, device_scalars=device_steps)
    before = _cuda_lists(args)
    torch.ops.torchopt_ext.adafactor_step_(
        *args, **kwargs, grad_scale=torch.full((), 4.0, device="cuda"), found_inf=torch.ones((), device="cuda")
    )
    for now, then in zip(args, before):
        for a, b in zip(now if isinstance(now, list) else [now], then if isinstance(then, list) else [then]):
            assert torch.equal(a, b)
    cpu_args, _ = _adafactor_op_args("cpu", shapes)
    for x in (args, cpu_args):
        x[1] = [g * 4 for g in x[1]]
    torch.ops.torchopt_ext.adafactor_step_(*cpu_args, **kwargs, grad_scale=torch.tensor(4.0))
    torch.ops.torchopt_ext.adafactor_step_(
        *args, **kwargs, grad_scale=torch.full((), 4.0, device="cuda"), found_inf=torch.zeros((), device="cuda")
    )
    for k in (0, 1, 2, 3, 4):  # params, unscaled grads, row_vars, col_vars, variances
        for a, b in zip(args[k], cpu_args[k]):
            torch.testing.assert_close(a.cpu(), b, **ADAFACTOR_TOL[torch.float32])


def test_cuda_adafactor_stages_equal_the_fused_step_bitwise():
    from torchopt_ext.optim.adafactor import _stats_size

    shapes = [(129,), (140, 33), (2, 3, 5), ()]
    fused, kwargs = _adafactor_op_args("cuda", shapes, beta1=0.5)
    staged = _cuda_lists(fused)
    for _ in range(3):
        torch.ops.torchopt_ext.adafactor_step_(*fused, **kwargs)
        stats = [torch.zeros(_stats_size(p), dtype=torch.float64, device="cuda") for p in staged[0]]
        for stage in (1, 2, 3):
            torch.ops.torchopt_ext.adafactor_stage_(stage, *staged, stats, **kwargs)
    for a, b in zip(
        sum((x for x in fused if isinstance(x, list)), []), sum((x for x in staged if isinstance(x, list)), [])
    ):
        assert torch.equal(a, b)


def test_cuda_adafactor_bf16_stochastic_rounding_follows_the_cpu_stream():
    extra = dict(state_dtype=torch.float32, stochastic_rounding=True, seed=11)
    (p_cpu, _), (p_cuda, _) = (_adafactor_run(d, torch.bfloat16, **extra) for d in ("cpu", "cuda"))
    for a, b in zip(p_cuda, p_cpu):
        torch.testing.assert_close(a, b, **ADAFACTOR_TOL[torch.bfloat16])
        if a.numel():
            # Same hash of (seed, index, step, element): nearly every rounding decision agrees.
            assert (a == b).float().mean() > 0.99


def test_cuda_graph_capture_of_an_adafactor_step():
    args, kwargs = _adafactor_op_args("cuda", [(65536 + 9,), (170, 3)], device_scalars=True)
    eager = _cuda_lists(args)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.ops.torchopt_ext.adafactor_step_(*args, **kwargs)
        torch.ops.torchopt_ext.adafactor_step_(*eager, **kwargs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.ops.torchopt_ext.adafactor_step_(*args, **kwargs)
    for _ in range(3):
        graph.replay()
        torch.ops.torchopt_ext.adafactor_step_(*eager, **kwargs)
    torch.cuda.synchronize()
    assert all(s.item() == 4.0 for s in args[6])
    for a, b in zip(args[0] + args[2] + args[3], eager[0] + eager[2] + eager[3]):
        assert torch.equal(a, b)


def test_cuda_adafactor_compiled_step_matches_eager():
    def run(compiled):
        torch.manual_seed(1)
        params = [torch.randn(8, 5, device="cuda"), torch.randn(5, device="cuda")]
        grads = [[torch.randn_like(p) for p in params] for _ in range(3)]
        opt = tox.Adafactor(params, beta1=0.9)
        step = torch.compile(opt.step, fullgraph=True) if compiled else opt.step
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = g.clone()
            step()
        return params

    torch._dynamo.reset()
    for a, b in zip(run(False), run(True)):
        assert torch.equal(a, b)


# == Matrix optimizers on CUDA (kernels/cuda/matrix.cu; Muon, PRISM, SOAP and the
# ownership-path ops muon_momentum_ / prism_momentum_ / prism_shape / matrix_apply_).
# Grads are fixed sequences, so CPU and CUDA runs only differ by rounding
# (GEMMs, reductions, eigh/QR), never by feedback through the loss.

# Two Muon matrices (one wide: the transposed Newton-Schulz path), a conv
# weight (flattened to (6, 36) with use_muon, else AdamW) and a vector (the
# AdamW fallback, its own CUDA kernel with the device counters).
MATRIX_SHAPES = [(48, 32), (24, 72), (6, 4, 3, 3), (17,)]
MATRIX_STEPS = 10
MATRIX_CONFIGS = {
    # Newton-Schulz in the param's math dtype, so fp32 / fp64 compare tightly.
    "Muon": (tox.Muon, dict(lr=0.02, weight_decay=0.1)),
    "Muon-magma": (tox.Muon, dict(lr=0.02, weight_decay=0.1, use_magma=True, magma_p=0.5, seed=5)),
    "Muon-aol-polar": (tox.Muon, dict(lr=0.02, ns_normalization="aol", ns_coefficients="polar_express")),
    "Muon-schatten-dion": (tox.Muon, dict(lr=0.02, ns_normalization="schatten", ns_coefficients="dion")),
    "Muon-conv-nonesterov": (
        tox.Muon,
        dict(lr=0.02, nesterov=False, maximize=True, adjust_lr_fn="match_rms_adamw", use_muon=True),
    ),
    "PRISM": (tox.PRISM, dict(lr=0.02, weight_decay=0.1)),
    "PRISM-bidirectional": (tox.PRISM, dict(lr=0.02, mode="bidirectional", gamma_l=0.5, weight_decay=0.1)),
    "PRISM-bias-lookahead": (
        tox.PRISM,
        dict(lr=0.02, bias_correction=True, shape_nesterov=False, grad_clip_max_amps=(0.5, 2.0)),
    ),
    "PRISM-heavy-ball-magma": (
        tox.PRISM,
        dict(lr=0.02, momentum_accumulator="heavy_ball", nesterov=False, use_magma=True, seed=7),
    ),
    "PRISM-nadamw-clip": (
        tox.PRISM,
        dict(lr=0.02, adam_nesterov=True, raw_global_grad_clip=5.0, weight_decay=0.1, bias_correction=True),
    ),
    # Factors only on dims <= 32 (full-rank Grams: eigenbases unique up to sign,
    # which SOAP's rotate / rotate-back cancels), refreshes every 3 steps.
    "SOAP": (tox.SOAP, dict(lr=0.01, weight_decay=0.1, precondition_frequency=3, max_precond_dim=32)),
    # MARS-Shampoo: the fused momentum kernel (momentum only), Newton-Schulz,
    # then Muon's apply kernel; with optimize_1d the conv weight and the
    # vector take the mars-adamw kernel (amsgrad), else the AdamW branch.
    "MARS-shampoo": (tox.MARS, dict(lr=0.02, weight_decay=0.1, mars_type="mars-shampoo")),
    "MARS-shampoo-1d": (
        tox.MARS,
        dict(lr=0.02, weight_decay=0.1, mars_type="mars-shampoo", optimize_1d=True, amsgrad=True, gamma=0.05),
    ),
}
# Per dtype, (rtol, atol) on the params after MATRIX_STEPS steps. fp32: the
# GEMM / eigh rounding of one fp32 update (~1e-5 relative, see
# test_cuda_fp32_newton_schulz_matches_cpu) times lr over 10 steps stays
# under 2e-5 absolute; a wrong scale, decay or mask is >1e-3. fp64: GEMMs in
# fp64 (SOAP's eigh runs in fp32 on both, so it keeps the fp32 bound). bf16
# params (fp32 state): one to two bf16 ulps, and nearly every element equal.
MATRIX_TOLERANCES = {
    torch.float32: dict(rtol=1e-5, atol=2e-5),
    torch.float64: dict(rtol=1e-10, atol=1e-11),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-3),
}


def _matrix_run(name, device, dtype, steps=MATRIX_STEPS, **extra):
    cls, options = MATRIX_CONFIGS[name]
    options = {**options, **extra}
    if cls is not tox.SOAP and "ns_dtype" not in options:
        options["ns_dtype"] = torch.float64 if dtype == torch.float64 else torch.float32
    if dtype == torch.bfloat16:
        options.setdefault("state_dtype" if cls is not tox.PRISM else "mu_dtype", torch.float32)
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in MATRIX_SHAPES]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in MATRIX_SHAPES] for _ in range(steps)]
    params = [x.to(device=device, dtype=dtype).requires_grad_() for x in init]
    if options.pop("use_muon", False):
        # The conv weight as a (6, 36) Muon matrix; the vector stays on AdamW.
        matrices = [p for p in params if p.dim() >= 2]
        groups = [dict(params=matrices, use_muon=True), dict(params=[p for p in params if p.dim() < 2])]
        opt = cls(groups, **options)
    else:
        opt = cls(params, **options)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.to(device=device, dtype=dtype)
        opt.step()
    return [p.detach().cpu() for p in params], opt, [x.to(dtype) for x in init]


def _matrix_dtypes(name):
    # SOAP's fp64 params still take fp32 eigenbases (as the reference): fp32 and bf16 cover it.
    return [torch.float32, torch.bfloat16] if name == "SOAP" else [torch.float32, torch.float64, torch.bfloat16]


@pytest.mark.parametrize("name,dtype", [(n, d) for n in sorted(MATRIX_CONFIGS) for d in _matrix_dtypes(n)], ids=str)
def test_cuda_matrix_optimizer_matches_cpu(name, dtype):
    cpu, _, _ = _matrix_run(name, "cpu", dtype)
    cuda, opt, _ = _matrix_run(name, "cuda", dtype)
    for a, b in zip(cuda, cpu):
        torch.testing.assert_close(a, b, **MATRIX_TOLERANCES[dtype])
        if dtype == torch.bfloat16:
            assert (a == b).float().mean() > 0.999
    device_scalars = name != "SOAP"  # SOAP keeps host counters (its refresh branches on the step)
    steps = MATRIX_STEPS - 1 if name == "SOAP" else MATRIX_STEPS  # SOAP's first call only builds Q
    for state in opt.state.values():
        assert state["step"].is_cuda == device_scalars and state["step"].item() == steps
        for key, value in state.items():
            if torch.is_tensor(value) and key != "step":
                assert value.is_cuda, key


@pytest.mark.parametrize("name", ["Muon", "Muon-magma"])
def test_cuda_muon_bf16_newton_schulz_tracks_fp32_cpu(name):
    # The default bf16 GEMMs (cuBLAS vs the CPU's) differ by bf16 rounding: the
    # summed update of 10 steps stays within the 0.03 relative Frobenius bound
    # of one bf16 Newton-Schulz (test_cuda_bf16_newton_schulz_is_close_to_fp32_cpu).
    cpu, _, init = _matrix_run(name, "cpu", torch.float32, ns_dtype=torch.float32)
    cuda, _, _ = _matrix_run(name, "cuda", torch.float32, ns_dtype=torch.bfloat16)
    for a, b, x in zip(cuda, cpu, init):
        if a.dim() == 2:
            assert ((a - x) - (b - x)).norm() / (b - x).norm() < 0.03


@pytest.mark.parametrize("name", ["Muon-magma", "PRISM"])
def test_cuda_matrix_bf16_stochastic_rounding_follows_the_cpu_stream(name):
    extra = dict(stochastic_rounding=True, seed=11)
    cpu, _, _ = _matrix_run(name, "cpu", torch.bfloat16, **extra)
    cuda, _, _ = _matrix_run(name, "cuda", torch.bfloat16, **extra)
    for a, b in zip(cuda, cpu):
        # Same counter hash: off-grid values round the same way element by element.
        assert (a == b).float().mean() > 0.999


def test_cuda_prism_bf16_momentum_with_device_counters_matches_cpu():
    # mu in bf16 is stored with stochastic rounding keyed by the device step,
    # and the bias corrections use it too.
    extra = dict(mu_dtype=torch.bfloat16, bias_correction=True, seed=2)
    cpu, cpu_opt, _ = _matrix_run("PRISM", "cpu", torch.float32, **extra)
    cuda, cuda_opt, _ = _matrix_run("PRISM", "cuda", torch.float32, **extra)
    for a, b in zip(cuda, cpu):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    for p_cuda, p_cpu in zip(cuda_opt.state, cpu_opt.state):
        if "mu" in cuda_opt.state[p_cuda]:
            mu_cuda, mu_cpu = cuda_opt.state[p_cuda]["mu"].cpu(), cpu_opt.state[p_cpu]["mu"]
            assert (mu_cuda == mu_cpu).float().mean() > 0.999


def _matrix_op_problem(device, device_steps, n=3, dtype=torch.float32):
    gen = torch.Generator().manual_seed(4)
    shapes = [(40, 24), (16, 56), (40, 24)][:n]
    params = [torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in shapes]
    grads = [torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in shapes]
    bufs = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    steps_device = device if device_steps else "cpu"
    steps = [torch.zeros((), dtype=torch.float32, device=steps_device) for _ in params]
    scores = [torch.full((), 0.5, dtype=torch.float32, device=steps_device) for _ in params]
    return params, grads, bufs, steps, scores


MUON_OP_KW = dict(
    weight_decay=0.1,
    momentum=0.95,
    nesterov=True,
    ns_coefficients=[3.4445, -4.775, 2.0315],
    ns_steps=5,
    eps=1e-7,
    adjust_lr_fn="original",
    ns_dtype=torch.float32,
)


@pytest.mark.parametrize("device_steps", [False, True])
@pytest.mark.parametrize("device_lr", [False, True])
def test_cuda_muon_op_device_and_host_scalars_agree(device_steps, device_lr):
    # Where the scalars live must not change the math: host lr / counters
    # (passed by value) and device ones (read by the kernel) give equal params.
    results = []
    for on_device in (False, True):
        params, grads, bufs, steps, scores = _matrix_op_problem("cuda", on_device and device_steps)
        lr = torch.tensor(0.02, dtype=torch.float64, device="cuda" if on_device and device_lr else "cpu")
        for _ in range(4):
            torch.ops.torchopt_ext.muon_step_(
                params, [g.clone() for g in grads], bufs, scores, steps, lr,
                use_magma=True, magma_p=0.5, seed=3, **MUON_OP_KW,
            )  # fmt: skip
        assert all(s.item() == 4 for s in steps)
        results.append((params, scores))
    for a, b in zip(results[0][0], results[1][0]):
        assert torch.equal(a, b)
    for a, b in zip(results[0][1], results[1][1]):
        assert torch.equal(a.cpu(), b.cpu())


@pytest.mark.parametrize("device_steps", [False, True])
def test_cuda_matrix_found_inf_skips_and_grad_scale_unscales(device_steps):
    params, grads, bufs, steps, scores = _matrix_op_problem("cuda", device_steps)
    before = [t.clone() for t in params + bufs + steps + scores]
    found_inf = torch.ones((), device="cuda")
    for op_kw in (dict(op="muon"), dict(op="prism")):
        if op_kw["op"] == "muon":
            torch.ops.torchopt_ext.muon_step_(
                params, grads, bufs, scores, steps, torch.tensor(0.02), use_magma=True, found_inf=found_inf,
                **MUON_OP_KW,
            )  # fmt: skip
        else:
            torch.ops.torchopt_ext.prism_step_(
                params, grads, bufs, scores, steps, torch.tensor(0.02), b1=0.9, gamma=1.0, weight_decay=0.1,
                ns_iters=5, ns_coeffs=[3.4445, -4.775, 2.0315], use_magma=True, found_inf=found_inf,
            )  # fmt: skip
        for a, b in zip(params + bufs + steps + scores, before):
            assert torch.equal(a, b)
    # grad_scale on the device: the grads are unscaled in place, the step equals unscaled grads.
    ref_params, ref_grads, ref_bufs, ref_steps, _ = _matrix_op_problem("cuda", device_steps)
    scaled = [g * 1024.0 for g in grads]
    torch.ops.torchopt_ext.muon_step_(
        params, scaled, bufs, [], steps, torch.tensor(0.02), grad_scale=torch.full((), 1024.0, device="cuda"),
        found_inf=torch.zeros((), device="cuda"), **MUON_OP_KW,
    )  # fmt: skip
    torch.ops.torchopt_ext.muon_step_(ref_params, ref_grads, ref_bufs, [], ref_steps, torch.tensor(0.02), **MUON_OP_KW)
    for a, b in zip(params, ref_params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for a, b in zip(scaled, grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert all(s.item() == 1 for s in steps)


@pytest.mark.parametrize("use_magma", [False, True])
@pytest.mark.parametrize("device_steps", [False, True])
def test_cuda_muon_split_ops_track_the_fused_step(use_magma, device_steps):
    # The ownership path on one rank: muon_momentum_ -> newton_schulz ->
    # matrix_apply_ on CUDA tensors equals muon_step_ (bitwise without Magma;
    # with Magma the cosine comes from float64 sums, so the scores agree to
    # rounding and the masks exactly).
    fused = _matrix_op_problem("cuda", device_steps)
    split = _matrix_op_problem("cuda", device_steps)
    lr = torch.tensor(0.02, dtype=torch.float64)
    magma = dict(use_magma=use_magma, magma_p=0.5, magma_tau=2.0, seed=3)
    kw = {k: v for k, v in MUON_OP_KW.items() if k != "adjust_lr_fn"}
    ops = torch.ops.torchopt_ext
    for _ in range(5):
        params, grads, bufs, steps, scores = fused
        ops.muon_step_(params, [g.clone() for g in grads], bufs, scores if use_magma else [], steps, lr,
                       adjust_lr_fn="original", **kw, **magma)  # fmt: skip
        params, grads, bufs, steps, scores = split
        inputs = [torch.empty_like(b) for b in bufs]
        sums = torch.zeros(len(params), 3, dtype=torch.float64, device="cuda")
        ops.muon_momentum_([g.clone() for g in grads], bufs, steps, inputs, sums, momentum=kw["momentum"],
                           nesterov=True, use_magma=use_magma)  # fmt: skip
        updates = [
            ops.newton_schulz(x, coefficients=kw["ns_coefficients"], steps=5, eps=1e-7, dtype=torch.float32).reshape(-1)
            for x in inputs
        ]
        ops.matrix_apply_(params, updates, scores if use_magma else [], steps, lr, weight_decay=0.1,
                          matrix_sizes=[n for p in params for n in p.shape], adjust_lr_fn="original",
                          magma_sums=sums if use_magma else None, **magma)  # fmt: skip
    for a, b in zip(fused[0], split[0]):
        if use_magma:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(a, b)
    for a, b in zip(fused[3], split[3]):
        assert a.is_cuda == device_steps and a.item() == b.item() == 5


def test_cuda_prism_split_ops_equal_the_fused_step():
    fused = _matrix_op_problem("cuda", True)
    split = _matrix_op_problem("cuda", True)
    lr = torch.tensor(0.02, dtype=torch.float64)
    ops = torch.ops.torchopt_ext
    shape_kw = dict(gamma=1.0, ns_iters=5, ns_coeffs=[3.4445, -4.775, 2.0315], ns_dtype=torch.float32, b1=0.9)
    for _ in range(4):
        params, grads, bufs, steps, _ = fused
        ops.prism_step_(params, [g.clone() for g in grads], bufs, [], steps, lr, weight_decay=0.1, **shape_kw)
        params, grads, bufs, steps, _ = split
        targets = [torch.empty_like(b) for b in bufs]
        innovations = [torch.empty_like(b) for b in bufs]
        sums = torch.zeros(0, 3, dtype=torch.float64, device="cuda")
        ops.prism_momentum_([g.clone() for g in grads], bufs, steps, targets, innovations, [], sums, b1=0.9)
        updates = [ops.prism_shape(m, d, None, **shape_kw).reshape(-1) for m, d in zip(targets, innovations)]
        assert all(u.is_cuda for u in updates)
        ops.matrix_apply_(params, updates, [], steps, lr, weight_decay=0.1,
                          matrix_sizes=[n for p in params for n in p.shape])  # fmt: skip
    for a, b in zip(fused[0], split[0]):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "name", ["Muon", "Muon-magma", "PRISM", "PRISM-bias-lookahead", "PRISM-nadamw", "MARS-shampoo"]
)
def test_cuda_graph_capture_of_a_matrix_optimizer_step(name):
    # No host sync in these steps (device counters, scores and the apply
    # kernel's scalars), so the step captures; replays advance the counters.
    # PRISM-nadamw: the NAdamW fallback's bias corrections from the device step.
    cls, options = MATRIX_CONFIGS[name.replace("PRISM-nadamw", "PRISM")]
    if name == "PRISM-nadamw":
        options = dict(options, adam_nesterov=True, bias_correction=True)
    options = dict(options, ns_dtype=torch.float32, seed=3, stochastic_rounding=True)
    gen = torch.Generator().manual_seed(3)
    init = [torch.randn(s, generator=gen) for s in MATRIX_SHAPES]
    grads = [[torch.randn(s, generator=gen).cuda() for s in MATRIX_SHAPES] for _ in range(6)]

    def make():
        params = [x.cuda().requires_grad_() for x in init]
        return params, cls(params, **options)

    eager_params, eager_opt = make()
    graph_params, graph_opt = make()
    for p in graph_params:
        p.grad = torch.zeros_like(p)

    _capture_and_replay(graph_params, graph_opt, eager_params, eager_opt, grads)
    for state in graph_opt.state.values():
        assert state["step"].is_cuda and state["step"].item() == len(grads)
    # Same kernels on the same device; cuBLAS may pick another GEMM algorithm
    # under capture, so allow fp32 rounding rather than bit equality.
    for a, b in zip(graph_params, eager_params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["Muon-magma", "PRISM", "SOAP", "MARS-shampoo-1d"])
def test_cuda_compiled_matrix_step_matches_eager(name):
    cls, options = MATRIX_CONFIGS[name]

    def run(compiled):
        torch.manual_seed(1)
        params = [torch.randn(s, device="cuda") for s in MATRIX_SHAPES]
        grads = [[torch.randn_like(p) for p in params] for _ in range(4)]
        opt = cls(params, **options)
        step = torch.compile(opt.step, fullgraph=True) if compiled else opt.step
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = g.clone()
            step()
        return params

    torch._dynamo.reset()
    for a, b in zip(run(False), run(True)):
        assert torch.equal(a, b)


SOAP_OP_KW = dict(
    beta1=0.9, beta2=0.95, shampoo_beta=-1.0, eps=1e-8, weight_decay=0.0, precondition_frequency=2,
    max_precond_dim=100, merge_dims=False, precondition_1d=False, normalize_grads=False,
    data_format="channels_first", correct_bias=True,
)  # fmt: skip


@pytest.mark.parametrize("on_device", ["lr", "steps"])
def test_cuda_soap_with_device_lr_or_steps_is_rejected_before_touching_state(on_device):
    p = torch.randn(8, 6, device="cuda")
    g = torch.randn(8, 6, device="cuda")
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    gg, q = torch.zeros(100, device="cuda"), torch.zeros(100, device="cuda")
    step = torch.zeros((), device="cuda" if on_device == "steps" else "cpu")
    lr = torch.tensor(0.01, device="cuda" if on_device == "lr" else "cpu")
    before = [t.clone() for t in (p, m, v, gg, q, step)]
    with pytest.raises(ValueError, match="on CUDA, lr and state_steps must be CPU tensors"):
        torch.ops.torchopt_ext.soap_step_([p], [g], [m], [v], [gg], [q], [step], lr, **SOAP_OP_KW)
    for a, b in zip((p, m, v, gg, q, step), before):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_soap_batched_factor_updates_track_the_per_tensor_path(dtype):
    # cuSOLVER's batched eigh may choose other eigenvector signs than the
    # single-matrix call (SOAP cancels them) and rounds differently: the
    # fp32 bound of test_cuda_matrix_optimizer_matches_cpu applies.
    class Switched(tox.SOAP):
        def __init__(self, params, batch, **kwargs):
            self._batch = batch
            super().__init__(params, **kwargs)

        def _op_kwargs(self, group):
            return dict(super()._op_kwargs(group), batch_equal_shapes=self._batch)

    shapes = [(32, 24), (32, 24), (32, 24), (12, 20), (6, 4, 3, 3), (6, 4, 3, 3)]

    def run(batch):
        gen = torch.Generator().manual_seed(0)
        params = [torch.randn(s, generator=gen).to("cuda", dtype).requires_grad_() for s in shapes]
        opt = Switched(params, batch, lr=0.01, weight_decay=0.1, precondition_frequency=3, max_precond_dim=32)
        for _ in range(MATRIX_STEPS):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to("cuda", dtype)
            opt.step()
        return [p.detach().cpu() for p in params]

    for a, b in zip(run(False), run(True)):
        torch.testing.assert_close(a, b, **MATRIX_TOLERANCES[dtype])


# ==============================================================================
# Issue 7: device step counters for NAdamW, LAMB, MARS and Adafactor (their
# counters, and NAdamW's mu_product, live on a CUDA param's device) and CUDA
# graph capture of their optimizer-class steps.
# ==============================================================================

ISSUE7_OPTIMIZERS = {
    "NAdamW": lambda ps: tox.NAdamW(ps, lr=1e-2, weight_decay=0.1, momentum_decay=0.02),
    "LAMB": lambda ps: tox.LAMB(ps, lr=1e-2, weight_decay=0.1, max_grad_norm=0.5),
    "MARS": lambda ps: tox.MARS(ps, lr=1e-2, weight_decay=0.1, amsgrad=True),  # 1-D params take its AdamW branch
    "Adafactor": lambda ps: tox.Adafactor(ps, lr=1e-2, beta1=0.9, weight_decay=0.01),
}
ISSUE7_SHAPES = [(65536 + 9,), (17, 3), (), (2, 5, 4)]


def _issue7_data(steps, seed=3):
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen) for s in ISSUE7_SHAPES]
    grads = [[torch.randn(s, generator=gen) for s in ISSUE7_SHAPES] for _ in range(steps)]
    return init, grads


def _issue7_run(name, device, init, grads, opt=None, params=None):
    if params is None:
        params = [x.to(device).requires_grad_() for x in init]
    if opt is None:
        opt = ISSUE7_OPTIMIZERS[name](params)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.to(device)
        opt.step()
    return params, opt


@pytest.mark.parametrize("name", sorted(ISSUE7_OPTIMIZERS))
def test_cuda_issue7_classes_create_device_counters_and_match_cpu(name):
    init, grads = _issue7_data(4)
    p_cpu, _ = _issue7_run(name, "cpu", init, grads)
    p_cuda, opt = _issue7_run(name, "cuda", init, grads)
    for state in opt.state.values():
        assert state["step"].is_cuda and state["step"].dtype == torch.float32 and state["step"].dim() == 0
        assert state["step"].item() == 4.0
        if name == "NAdamW":
            assert state["mu_product"].is_cuda and state["mu_product"].dtype == torch.float32
    for a, b in zip(p_cuda, p_cpu):
        torch.testing.assert_close(a.detach().cpu(), b.detach(), rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(ISSUE7_OPTIMIZERS))
def test_cuda_issue7_graph_capture_of_the_optimizer_class_step(name):
    init, grads = _issue7_data(6)
    grads = [[g.cuda() for g in gs] for gs in grads]
    eager_params = [x.cuda().requires_grad_() for x in init]
    graph_params = [x.cuda().requires_grad_() for x in init]
    eager_opt = ISSUE7_OPTIMIZERS[name](eager_params)
    graph_opt = ISSUE7_OPTIMIZERS[name](graph_params)

    _capture_and_replay(graph_params, graph_opt, eager_params, eager_opt, grads)
    # The counters (and NAdamW's mu-products) advanced on the device at every
    # replay; a host value would have been baked into the graph.
    for state in graph_opt.state.values():
        assert state["step"].is_cuda and state["step"].item() == len(grads)
    for a, b in zip(graph_params, eager_params):
        assert torch.equal(a, b)
    for p_graph, p_eager in zip(graph_params, eager_params):
        for key, value in graph_opt.state[p_graph].items():
            if torch.is_tensor(value):
                assert torch.equal(value, eager_opt.state[p_eager][key]), key


@pytest.mark.parametrize("name", sorted(ISSUE7_OPTIMIZERS))
def test_cuda_issue7_checkpoints_move_counters_to_the_params_device(name):
    init, grads = _issue7_data(6)
    first, second = grads[:3], grads[3:]
    cpu_params, cpu_opt = _issue7_run(name, "cpu", init, first)
    saved = cpu_opt.state_dict()
    cuda_params = [p.detach().cuda().requires_grad_() for p in cpu_params]
    cuda_opt = ISSUE7_OPTIMIZERS[name](cuda_params)
    cuda_opt.load_state_dict(saved)
    for state in cuda_opt.state.values():
        assert state["step"].is_cuda and state["step"].item() == 3.0
        if name == "NAdamW":
            assert state["mu_product"].is_cuda
    _issue7_run(name, "cpu", init, second, opt=cpu_opt, params=cpu_params)
    _issue7_run(name, "cuda", init, second, opt=cuda_opt, params=cuda_params)
    for a, b in zip(cuda_params, cpu_params):
        torch.testing.assert_close(a.detach().cpu(), b.detach(), rtol=2e-5, atol=1e-6)
    # A CUDA checkpoint resumed on CPU params keeps CPU counters.
    cpu_opt.load_state_dict(cuda_opt.state_dict())
    for state in cpu_opt.state.values():
        assert all(not v.is_cuda for v in state.values() if torch.is_tensor(v))


def test_cuda_issue7_nadamw_checkpoint_with_host_counters_loads_onto_the_device():
    # What a NAdamW checkpoint of CUDA params held before device counters:
    # CPU step and mu_product next to CUDA moments.
    init, grads = _issue7_data(6)
    params, opt = _issue7_run("NAdamW", "cuda", init, grads[:3])
    saved = opt.state_dict()
    for state in saved["state"].values():
        state["step"] = state["step"].cpu()
        state["mu_product"] = state["mu_product"].cpu()
    resumed_params = [p.detach().clone().requires_grad_() for p in params]
    resumed = ISSUE7_OPTIMIZERS["NAdamW"](resumed_params)
    resumed.load_state_dict(saved)
    for state in resumed.state.values():
        assert state["step"].is_cuda and state["mu_product"].is_cuda
    _issue7_run("NAdamW", "cuda", init, grads[3:], opt=opt, params=params)
    _issue7_run("NAdamW", "cuda", init, grads[3:], opt=resumed, params=resumed_params)
    for a, b in zip(resumed_params, params):
        assert torch.equal(a, b)


def _nadam_issue7_args(device_counters, device_lr=False, shapes=((65536 + 7,), (5, 3), ())):
    gen = torch.Generator().manual_seed(11)
    params = [torch.randn(s, generator=gen).cuda() for s in shapes]
    grads = [torch.randn(s, generator=gen).cuda() for s in shapes]
    scalar_device = "cuda" if device_counters else "cpu"
    m = [torch.zeros(s, device="cuda") for s in shapes]
    v = [torch.zeros(s, device="cuda") for s in shapes]
    mu = [torch.ones((), device=scalar_device) for _ in shapes]
    steps = [torch.zeros((), device=scalar_device) for _ in shapes]
    lr = torch.tensor(1e-2, dtype=torch.float64, device="cuda" if device_lr else "cpu")
    kwargs = dict(
        beta1=0.9,
        beta2=0.999,
        eps=1e-8,
        weight_decay=0.1,
        momentum_decay=0.05,
        decoupled_weight_decay=True,
        maximize=False,
    )
    return [params, grads, m, v, mu, steps, lr], kwargs


@pytest.mark.parametrize("device_lr", [False, True])
def test_cuda_issue7_nadam_device_counters_match_host_counters(device_lr):
    host, kwargs = _nadam_issue7_args(device_counters=False)
    dev, _ = _nadam_issue7_args(device_counters=True, device_lr=device_lr)
    for _ in range(20):
        torch.ops.torchopt_ext.nadam_step_(*host, **kwargs)
        torch.ops.torchopt_ext.nadam_step_(*dev, **kwargs)
    torch.cuda.synchronize()
    # The pre-kernel runs the host's nadam_advance; only the device pow may
    # round differently in the last bit (an off-by-one step would move the
    # mu-products by ~1e-3).
    for a, b in zip(dev[4], host[4]):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-6, atol=0.0)
    for a, b in zip(dev[5], host[5]):
        assert a.item() == b.item() == 20.0
    for a, b in zip(dev[0] + dev[2] + dev[3], host[0] + host[2] + host[3]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_cuda_issue7_nadam_found_inf_skips_counters_and_mu_products():
    args, kwargs = _nadam_issue7_args(device_counters=True)
    torch.ops.torchopt_ext.nadam_step_(*args, **kwargs)
    before = [[t.clone() for t in lst] for lst in args[:6]]
    found_inf = torch.ones((), device="cuda")
    torch.ops.torchopt_ext.nadam_step_(*args, **kwargs, found_inf=found_inf)
    torch.cuda.synchronize()
    for lst, old in zip(args[:6], before):
        for a, b in zip(lst, old):
            assert torch.equal(a, b)


def test_cuda_issue7_nadam_device_counters_with_host_mu_products_are_rejected():
    args, kwargs = _nadam_issue7_args(device_counters=True)
    args[4] = [torch.ones(()) for _ in args[4]]  # mu_products on the CPU
    before = args[0][0].clone()
    with pytest.raises(ValueError, match=r"mu_products\[0\] must be a one-element"):
        torch.ops.torchopt_ext.nadam_step_(*args, **kwargs)
    assert torch.equal(args[0][0], before) and all(s.item() == 0.0 for s in args[5])


@pytest.mark.parametrize("name", ["NAdamW", "Adafactor"])
def test_cuda_issue7_compiled_step_matches_eager(name):
    eager, compiled, _ = eager_then_compiled(
        lambda ps: ISSUE7_OPTIMIZERS[name](ps),
        lambda: [torch.randn(8, 5, device="cuda"), torch.randn(5, device="cuda")],
        steps=3,
    )
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)


# ==============================================================================
# End of the issue 7 block.
# ==============================================================================


# -- PSGD family on CUDA: Kron, KronPSGD, WhiteKron ----------------------------
# ATen ops (cuBLAS) plus the CUDA reduced-precision store; the generators,
# the update gate and every random draw stay on the host and are copied, so
# a seed draws the same numbers on both devices and CUDA vs CPU differ only
# by GEMM / reduction rounding. TF32 is disabled (fp32 GEMMs in full fp32).
# Tolerances over 10 steps: float64 1e-9 (cuBLAS vs MKL summation order,
# compounded over the factor updates), float32 1e-3 absolute on O(1) values.
PSGD_TOL = {torch.float64: 1e-9, torch.float32: 1e-3}


@pytest.fixture
def no_tf32():
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _psgd_run(cls, shapes, device, dtype, steps=10, **kwargs):
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(steps)]
    params = [x.to(device=device, dtype=dtype).requires_grad_() for x in init]
    opt = cls(params, **kwargs)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.to(device=device, dtype=dtype)
        opt.step()
    return [p.detach().cpu() for p in params], opt


def _psgd_compare(cls, shapes, dtype, **kwargs):
    cpu, cpu_opt = _psgd_run(cls, shapes, "cpu", dtype, **kwargs)
    gpu, gpu_opt = _psgd_run(cls, shapes, "cuda", dtype, **kwargs)
    for a, b in zip(cpu, gpu):
        err = float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
        assert err <= PSGD_TOL[dtype], f"{cls.__name__} {kwargs}: CUDA vs CPU {err}"
    return cpu_opt, gpu_opt


# 1-D (diagonal), dense 2-D, mixed (one axis over max_size_triangular), 3-D,
# a 0-d, and two params of equal shape (batched together on CUDA by default).
KRON_SHAPES = [(7,), (12, 9), (40, 6), (3, 4, 5), (), (12, 9)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode", ["Q0.5EQ1.5", "EQ", "QUAD", "NS", "EXP", "TAYLOR2", "HYPER"])
def test_cuda_kron_matches_cpu(no_tf32, mode, dtype):
    cpu_opt, gpu_opt = _psgd_compare(
        tox.Kron,
        KRON_SHAPES,
        dtype,
        lr=0.02,
        seed=3,
        preconditioner_mode=mode,
        max_size_triangular=20,
        preconditioner_update_probability=1.0,
    )
    # The host generator drew the same numbers in the same order.
    assert torch.equal(cpu_opt.param_groups[0]["rng_state"], gpu_opt.param_groups[0]["rng_state"])


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),  # default schedule for the update probability, lazy init scale
        dict(memory_save_mode="all_diag"),
        dict(grad_clip_mode="global_rms", raw_global_grad_clip=5.0),
        dict(whiten_grad=False, update_preconditioner_first=False, weight_decay=0.1),
        dict(batch_equal_shapes=False),
    ],
)
def test_cuda_kron_options_match_cpu(no_tf32, kwargs):
    _psgd_compare(tox.Kron, KRON_SHAPES, torch.float64, lr=0.02, seed=3, **kwargs)


@pytest.mark.parametrize("chunk", [None, 2])
@pytest.mark.parametrize("mode", ["Q0.5EQ1.5", "EQ"])
def test_cuda_kron_stacked_matches_cpu(no_tf32, mode, chunk):
    _psgd_compare(
        tox.Kron,
        [(4, 8, 6), (3, 5, 2, 3)],
        torch.float64,
        lr=0.02,
        seed=3,
        stacked=True,
        stacked_chunk_size=chunk,
        preconditioner_mode=mode,
        preconditioner_update_probability=1.0,
    )


def test_cuda_kron_bf16_state_and_params_track_cpu(no_tf32):
    # bf16 params, momentum and factors stored with stochastic rounding from
    # the same hash on both devices: after rounding-level differences in the
    # fp32 math the stored values mostly agree bit for bit.
    kwargs = dict(lr=0.02, seed=3, mu_dtype=torch.bfloat16, precond_dtype=torch.bfloat16, stochastic_rounding=True)
    cpu, _ = _psgd_run(tox.Kron, [(12, 9), (7,)], "cpu", torch.bfloat16, **kwargs)
    gpu, _ = _psgd_run(tox.Kron, [(12, 9), (7,)], "cuda", torch.bfloat16, **kwargs)
    for a, b in zip(cpu, gpu):
        assert torch.allclose(a.float(), b.float(), rtol=2e-2, atol=2e-2)
        assert (a == b).float().mean() > 0.9


def test_cuda_kron_rejects_device_lr_probability_and_cpu_magma_scores_before_touching_state():
    p = torch.randn(4, 3, device="cuda", requires_grad=True)
    p.grad = torch.randn_like(p)
    opt = tox.Kron([p], lr=torch.tensor(0.01, device="cuda"))
    before = p.detach().clone()
    with pytest.raises(ValueError, match="lr must be a float or a CPU tensor"):
        opt.step()
    assert torch.equal(p.detach(), before)
    assert float(opt.state[p]["step"]) == 0.0
    # Magma's scores are read and updated on the param's device.
    opt = tox.Kron([p], lr=0.01, use_magma=True)
    opt.step()
    opt.state[p]["magma_score"] = opt.state[p]["magma_score"].cpu()
    before = p.detach().clone()
    with pytest.raises(ValueError, match=r"magma_scores\[0\] must be .* on the param's device"):
        opt.step()
    assert torch.equal(p.detach(), before)
    assert float(opt.state[p]["step"]) == 1.0
    opt = tox.Kron([p], preconditioner_update_probability=lambda n: torch.ones((), device="cuda"))
    with pytest.raises((ValueError, RuntimeError), match="preconditioner_update_probability"):
        opt.step()


@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_kron_magma_matches_cpu_with_scores_on_the_device(no_tf32, dtype, stacked):
    # The keep / drop draws are a hash of (seed, index, step), equal on both
    # devices; the multiplier is applied on the device (no host read), so
    # params and scores differ from the CPU's by rounding only.
    shapes = [(4, 8, 6), (3, 5, 2, 3)] if stacked else KRON_SHAPES
    kwargs = dict(lr=0.02, seed=3, use_magma=True, magma_p=0.5, weight_decay=0.1, stacked=stacked)
    cpu_opt, gpu_opt = _psgd_compare(tox.Kron, shapes, dtype, **kwargs)
    cpu_params = cpu_opt.param_groups[0]["params"]
    for p, q in zip(cpu_params, gpu_opt.param_groups[0]["params"]):
        score = gpu_opt.state[q]["magma_score"]
        assert score.device == q.device
        torch.testing.assert_close(score.cpu(), cpu_opt.state[p]["magma_score"], rtol=1e-5, atol=1e-6)


def test_cuda_kron_magma_bf16_params_track_cpu(no_tf32):
    # bf16 params: the store kernel reads (decay, alpha) from the device.
    kwargs = dict(lr=0.02, seed=3, use_magma=True, weight_decay=0.1, stochastic_rounding=True)
    cpu, _ = _psgd_run(tox.Kron, [(12, 9), (7,)], "cpu", torch.bfloat16, **kwargs)
    gpu, _ = _psgd_run(tox.Kron, [(12, 9), (7,)], "cuda", torch.bfloat16, **kwargs)
    for a, b in zip(cpu, gpu):
        assert torch.allclose(a.float(), b.float(), rtol=2e-2, atol=2e-2)
        assert (a == b).float().mean() > 0.9


@pytest.mark.parametrize("name", ["Kron", "KronPSGD", "WhiteKron"])
def test_cuda_psgd_gradscaler_unscales_on_the_device_like_cpu(no_tf32, name):
    # GradScaler hands the optimizer a CUDA grad_scale / found_inf: the grads
    # are divided on the device (no host read of the scale); the model matches
    # an unscaled CPU run.
    cls = getattr(tox, name)
    model = torch.nn.Linear(16, 8).double().cuda()
    ref = torch.nn.Linear(16, 8).double()
    ref.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
    opt = cls(model.parameters(), lr=1e-2)
    ref_opt = cls(ref.parameters(), lr=1e-2)
    if name != "KronPSGD":
        opt = cls(model.parameters(), lr=1e-2, seed=4)
        ref_opt = cls(ref.parameters(), lr=1e-2, seed=4)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10)
    x = torch.randn(4, 16, dtype=torch.float64)
    for _ in range(3):
        opt.zero_grad()
        scaler.scale(model(x.cuda()).square().sum()).backward()
        scaler.step(opt)
        scaler.update()
        ref_opt.zero_grad()
        ref(x).square().sum().backward()
        ref_opt.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a.detach().cpu(), b.detach(), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_kron_psgd_matches_cpu(no_tf32, dtype):
    _psgd_compare(tox.KronPSGD, [(12, 9), (7,), (5, 5)], dtype, lr=0.01)


def test_cuda_kron_psgd_bf16_params_track_cpu(no_tf32):
    kwargs = dict(lr=0.01, stochastic_rounding=True)
    cpu, _ = _psgd_run(tox.KronPSGD, [(12, 9), (7,)], "cpu", torch.bfloat16, **kwargs)
    gpu, _ = _psgd_run(tox.KronPSGD, [(12, 9), (7,)], "cuda", torch.bfloat16, **kwargs)
    for a, b in zip(cpu, gpu):
        assert torch.allclose(a.float(), b.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("style", ["skew", "quad"])
def test_cuda_white_kron_matches_cpu(no_tf32, style, dtype):
    # Dense tiles (with padding), row and column strips, large-diagonal, 1-D;
    # balance_every=3 balances within the run.
    _psgd_compare(
        tox.WhiteKron,
        [(20, 12), (9,), (40, 6), (6, 40), (50, 45), (3, 4, 5)],
        dtype,
        lr=0.01,
        update_style=style,
        block_size=8,
        max_size_dense=32,
        balance_every=3,
        seed=2,
    )


@pytest.mark.parametrize("name", ["Kron", "KronPSGD", "WhiteKron"])
def test_cuda_psgd_compiled_step_matches_eager(no_tf32, name):
    cls = getattr(tox, name)
    kwargs = {"Kron": dict(seed=1, preconditioner_update_probability=1.0), "KronPSGD": {}, "WhiteKron": dict(seed=1)}[
        name
    ]

    def run(compiled):
        torch.manual_seed(1)
        params = [torch.randn(8, 5, device="cuda"), torch.randn(5, device="cuda"), torch.randn(8, 5, device="cuda")]
        grads = [[torch.randn_like(p) for p in params] for _ in range(3)]
        opt = cls(params, lr=0.01, **kwargs)
        step = torch.compile(opt.step, fullgraph=True) if compiled else opt.step
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = g.clone()
            step()
        return params

    torch._dynamo.reset()
    for a, b in zip(run(False), run(True)):
        assert torch.equal(a, b)
