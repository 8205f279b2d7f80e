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


@pytest.mark.parametrize("name", ["AdamW", "SGD", "Lion", "LAMB", "MARS"])
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
