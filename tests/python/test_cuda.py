"""CUDA kernels (csrc/kernels/cuda/): parity with the CPU kernels, AMP
semantics, CUDA-graph capture and torch.compile on CUDA params.

The CUDA kernels run the same per-element math as the CPU kernels
(csrc/kernels/algos/), compiled without FMA contraction, so on equal inputs
they agree to rounding of the double-precision coefficients. Every test here
needs a GPU and skips with "no CUDA device" without one.
"""

import pytest
import torch

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
}

# Odd sizes (scalar tails), one spanning several 65536-element chunks, and a
# 0-d tensor.
SHAPES = [(33, 5), (7,), (), (65536 * 2 + 3,)]

# One ulp of the storage type (the CUDA and CPU paths may differ by the last
# bit where a double coefficient rounds differently).
TOLERANCES = {
    torch.float32: dict(rtol=2e-6, atol=1e-7),
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.bfloat16: dict(rtol=8e-3, atol=1e-5),
    torch.float16: dict(rtol=1e-3, atol=1e-6),
}


def _make(name, params, **extra):
    cls = getattr(tox, name.split("-")[0])
    return cls(params, **CUDA_OPTIMIZERS[name], **extra)


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


@pytest.mark.parametrize("name", ["AdamW", "Lion", "SGD"])
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


@pytest.mark.parametrize("name", ["AdamW", "SGD", "Lion"])
def test_cuda_compiled_step_matches_eager(name):
    def run(compiled):
        torch.manual_seed(1)
        params = [torch.randn(8, 5, device="cuda"), torch.randn(5, device="cuda")]
        grads = [[torch.randn_like(p) for p in params] for _ in range(3)]
        opt = _make(name, params)
        step = torch.compile(opt.step, fullgraph=True) if compiled else opt.step
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = g.clone()
            step()
        return params

    torch._dynamo.reset()
    for a, b in zip(run(False), run(True)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("on_device", ["lr", "steps"])
def test_cuda_nadam_with_device_lr_or_steps_is_rejected_before_touching_state(on_device):
    # NAdam's scalars come from the host mu-products: device lr / counters are refused up front.
    params = [torch.randn(5, device="cuda")]
    grads = [torch.randn(5, device="cuda")]
    m, v = [torch.zeros(5, device="cuda")], [torch.zeros(5, device="cuda")]
    mu = [torch.ones((), dtype=torch.float32)]
    steps = [torch.zeros((), device="cuda" if on_device == "steps" else "cpu")]
    lr = torch.tensor(1e-2, dtype=torch.float64, device="cuda" if on_device == "lr" else "cpu")
    before = params[0].clone()
    with pytest.raises(ValueError, match="CPU tensors"):
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
