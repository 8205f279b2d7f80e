"""SOAP against a float64 reference written from classic.md §10, the init-only
first step, the factor layout, reduced precision, errors."""

import copy
import io

import pytest
import torch
from reference.soap import SOAPReference

import torchopt_ext.optim as tox
from torchopt_ext.optim.soap import soap_factor_sizes

# Square matrices (and vectors): with a non-square matrix the smaller Gram
# factor is rank-deficient at first, its null-space eigenvectors are arbitrary,
# and parity would test LAPACK rather than SOAP (spec §10).
CONFIGS = {
    "default": ([(8, 8), (6,), ()], dict()),
    "precondition_1d": ([(7, 7), (9,)], dict(precondition_1d=True)),
    "max_precond_dim_exceeded": ([(12, 12), (12, 5)], dict(max_precond_dim=10)),  # one-sided / none
    "merge_dims_4d": ([(3, 3, 3, 3)], dict(merge_dims=True, max_precond_dim=9)),  # -> (9, 9)
    "merge_dims_channels_last": ([(2, 4, 2, 4)], dict(merge_dims=True, max_precond_dim=8, data_format="channels_last")),
    "normalize_grads": ([(8, 8)], dict(normalize_grads=True)),
    "no_bias_correction": ([(8, 8), (5,)], dict(correct_bias=False, shampoo_beta=0.9)),
    "frequency_3": ([(6, 6)], dict(precondition_frequency=3, weight_decay=0.0)),
}

RANK_ONE_INIT = {"precondition_1d"}
STEPS = 25  # 24 updates after the init-only first call: refreshes at steps 10 and 20


def _run(shapes, kwargs, dtype, steps=STEPS):
    torch.manual_seed(0)
    ours = [torch.randn(s, dtype=dtype) for s in shapes]
    ref = [p.detach().to(torch.float64).clone() for p in ours]
    opt = tox.SOAP(ours, lr=1e-2, **kwargs)
    ref_opt = SOAPReference(ref, lr=1e-2, **kwargs)
    for _ in range(steps):
        for p, q in zip(ours, ref):
            g = torch.randn(p.shape, dtype=torch.float64)
            p.grad = g.to(dtype)
            q.grad = g.to(dtype).to(torch.float64)
        opt.step()
        ref_opt.step()
    return ours, ref, opt


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_float64_reference(name, dtype):
    shapes, kwargs = CONFIGS[name]
    if name in RANK_ONE_INIT and dtype != torch.float64:
        # A preconditioned vector starts from g g^T (rank one): its 8-dim
        # null space has an arbitrary basis unless both sides feed eigh the same
        # bits, which only the float64 run does.
        shapes = [s for s in shapes if len(s) != 1]
    ours, ref, _ = _run(shapes, kwargs, dtype)
    # eigh / QR run in float32 on both sides (spec), so a last-bit difference in
    # a Gram matrix moves eigenvectors by ~1e-7: measured max error ~1e-6 in
    # float64 (1.6e-6 with normalize_grads). A wrong formula (eps or decay placement, bias correction, a
    # missing permutation) moves params by >= 1e-4 over these 24 updates.
    tol = 5e-6 if dtype == torch.float64 else 2e-5
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.to(torch.float64), b, rtol=tol, atol=tol)


def test_first_step_only_initializes():
    p = torch.randn(6, 6)
    before = p.clone()
    opt = tox.SOAP([p])
    p.grad = torch.randn(6, 6)
    opt.step()
    assert torch.equal(p, before)
    state = opt.state[p]
    assert state["step"].item() == 0
    gg = state["GG"][:36].view(6, 6)
    torch.testing.assert_close(gg, 0.05 * p.grad @ p.grad.T, rtol=1e-5, atol=1e-6)
    q = state["Q"][:36].view(6, 6)
    torch.testing.assert_close(q.T @ q, torch.eye(6), rtol=0, atol=1e-5)
    eig = torch.diagonal(q.T @ gg @ q)
    assert torch.all(eig[:-1] >= eig[1:] - 1e-6)  # descending
    p.grad = torch.randn(6, 6)
    opt.step()
    assert state["step"].item() == 1
    assert not torch.equal(p, before)


def test_factor_layout():
    group = dict(max_precond_dim=10, precondition_1d=False, merge_dims=False, data_format="channels_first")
    assert soap_factor_sizes((12, 5), group) == [0, 5]
    assert soap_factor_sizes((7,), group) == [0]
    assert soap_factor_sizes((7,), dict(group, precondition_1d=True)) == [7]
    assert soap_factor_sizes((), group) == []
    merged = dict(group, merge_dims=True, max_precond_dim=12)
    assert soap_factor_sizes((4, 3, 3, 3), merged) == [12, 9]
    p = torch.randn(12, 5)
    opt = tox.SOAP([p], max_precond_dim=10)
    p.grad = torch.randn(12, 5)
    opt.step()
    assert opt.state[p]["GG"].shape == (25,)
    assert opt.state[p]["Q"].dtype == torch.float32


def test_state_dict_round_trip_with_factors():
    torch.manual_seed(3)
    params = [torch.randn(6, 6), torch.randn(4, 20), torch.randn(5)]
    kwargs = dict(max_precond_dim=10, precondition_frequency=3)
    opt = tox.SOAP(params, **kwargs)
    grads = [[torch.randn_like(p) for p in params] for _ in range(10)]
    for gs in grads[:5]:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
    buffer = io.BytesIO()
    torch.save({"params": [p.clone() for p in params], "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_params = saved["params"]
    resumed = tox.SOAP(resumed_params, **kwargs)
    resumed.load_state_dict(saved["opt"])
    for o, ps in ((opt, params), (resumed, resumed_params)):
        for gs in grads[5:]:
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            o.step()
    for a, b in zip(params, resumed_params):
        assert torch.equal(a, b)
    # The checkpoint's group options (which fix the factor layout) win, as in torch.optim.
    other = tox.SOAP([torch.randn(6, 6), torch.randn(4, 20), torch.randn(5)], max_precond_dim=3)
    other.load_state_dict(opt.state_dict())
    assert other.param_groups[0]["max_precond_dim"] == 10
    # A factor tensor of the wrong size (another model) fails clearly.
    bad = opt.state_dict()
    bad["state"][0]["GG"] = torch.zeros(5)
    with pytest.raises(ValueError, match="GG"):
        tox.SOAP([torch.randn(6, 6), torch.randn(4, 20), torch.randn(5)], **kwargs).load_state_dict(bad)


def test_bf16_params_keep_fp32_factors_and_track_fp32():
    torch.manual_seed(0)
    p32 = torch.randn(8, 8)
    p16 = p32.to(torch.bfloat16)
    opt32 = tox.SOAP([p32], lr=1e-2)
    opt16 = tox.SOAP([p16], lr=1e-2, state_dtype=torch.float32)
    for _ in range(12):
        g = torch.randn(8, 8)
        p32.grad, p16.grad = g.clone(), g.to(torch.bfloat16)
        opt32.step()
        opt16.step()
    assert opt16.state[p16]["GG"].dtype == torch.float32
    assert opt16.state[p16]["exp_avg"].dtype == torch.float32
    torch.testing.assert_close(p16.float(), p32, rtol=0, atol=3e-2)
    assert not torch.equal(p16.float(), torch.zeros(8, 8))


def test_nan_gradient_propagates():
    p = torch.randn(4, 4)
    opt = tox.SOAP([p])
    p.grad = torch.randn(4, 4)
    opt.step()
    p.grad = torch.full((4, 4), float("nan"))
    opt.step()  # no crash: eigh is only called on refresh steps
    assert torch.isnan(p).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr=-1.0), "lr"),
        (dict(betas=(1.0, 0.9)), "betas\\[0\\]"),
        (dict(betas=(0.9, 1.5)), "betas\\[1\\]"),
        (dict(shampoo_beta=1.0), "shampoo_beta"),
        (dict(eps=-1.0), "eps"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(precondition_frequency=0), "precondition_frequency"),
        (dict(max_precond_dim=0), "max_precond_dim"),
        (dict(data_format="nhwc"), "data_format"),
    ],
)
def test_rejects_bad_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tox.SOAP([torch.randn(3, 3)], **kwargs)


def test_op_rejects_wrong_factor_size():
    p, g = torch.randn(4, 4), torch.randn(4, 4)
    with pytest.raises(ValueError, match="GGs\\[0\\] must be a contiguous 1-D tensor of 32 elements"):
        torch.ops.torchopt_ext.soap_step_(
            [p], [g], [torch.zeros(4, 4)], [torch.zeros(4, 4)], [torch.zeros(16)], [torch.zeros(32)],
            [torch.zeros(())], torch.tensor(1e-3, dtype=torch.float64), beta1=0.9, beta2=0.9, shampoo_beta=-1.0,
            eps=1e-8, weight_decay=0.0, precondition_frequency=10, max_precond_dim=100, merge_dims=False,
            precondition_1d=False, normalize_grads=False, data_format="channels_first", correct_bias=True,
        )  # fmt: skip


def test_converges_like_pytorch_optimizer_soap():
    # A public SOAP (pytorch-optimizer 4.1.0; spec §10 lists its differences:
    # group step counting the init call, m kept unrotated) on least squares:
    # both should reach a similar loss.
    import pytorch_optimizer  # test dependency (.ci/test.sh)

    torch.manual_seed(0)
    a, x_true = torch.randn(64, 16), torch.randn(16, 8)
    b = a @ x_true
    losses = {}
    for name, make in (
        ("ours", lambda ps: tox.SOAP(ps, lr=3e-2, weight_decay=0.0)),
        ("public", lambda ps: pytorch_optimizer.SOAP(ps, lr=3e-2, weight_decay=0.0)),
    ):
        x = torch.zeros(16, 8, requires_grad=True)
        opt = make([x])
        start = torch.nn.functional.mse_loss(a @ x, b).item()
        for _ in range(300):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(a @ x, b)
            loss.backward()
            opt.step()
        losses[name] = torch.nn.functional.mse_loss(a @ x, b).item()
    assert losses["ours"] < 0.05 * start
    assert losses["public"] < 0.05 * start
    assert 0.5 < (losses["ours"] + 1e-6) / (losses["public"] + 1e-6) < 2.0, losses


# -- Batched factor updates (issue 7): params of one call with equal layouts
# and steps run as one bmm / batched eigh / QR (batch_equal_shapes=True, the
# op's default) instead of one small op per tensor.


class _SwitchedSOAP(tox.SOAP):
    """SOAP passing the op-level batch_equal_shapes switch."""

    def __init__(self, params, batch, **kwargs):
        self._batch = batch
        super().__init__(params, **kwargs)

    def _op_kwargs(self, group):
        return dict(super()._op_kwargs(group), batch_equal_shapes=self._batch)


# Three equal matrices (a batch of 3, rank-deficient 24x24 Grams at first),
# a singleton, two equal conv weights (4 factors each, or 3 merged), two
# vectors (per tensor even when equal: see soap.cpp).
BATCH_SHAPES = [(24, 16), (24, 16), (16, 40), (24, 16), (6, 4, 3, 3), (6, 4, 3, 3), (7,), (7,)]
BATCH_CONFIGS = {
    "default": dict(precondition_frequency=3),
    "merged-normalized-1d": dict(
        precondition_frequency=2, merge_dims=True, max_precond_dim=20, normalize_grads=True, precondition_1d=True
    ),
}


def _batched_run(batch, dtype, config, steps=12):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).requires_grad_() for s in BATCH_SHAPES]
    opt = _SwitchedSOAP(params, batch, lr=0.01, weight_decay=0.1, **BATCH_CONFIGS[config])
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype)
        opt.step()
    return params, opt


@pytest.mark.parametrize("config", sorted(BATCH_CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_batched_factor_updates_equal_the_per_tensor_path(config, dtype):
    # Measured: fp64 <= 8.9e-16 (bmm vs mm summation order; eigh / QR run in
    # fp32 on the same inputs and agree bit for bit), fp32 and bf16 bitwise
    # on this CPU. Bounds: fp64 1e-14, fp32 one ulp of the step (~1e-7).
    per_tensor, opt_a = _batched_run(False, dtype, config)
    batched, opt_b = _batched_run(True, dtype, config)
    tol = {torch.float64: 1e-14, torch.float32: 2e-7, torch.bfloat16: 0.0}[dtype]
    for a, b in zip(per_tensor, batched):
        assert (a.double() - b.double()).abs().max().item() <= tol
    for a, b in zip(per_tensor, batched):
        for key in ("exp_avg", "exp_avg_sq", "GG", "Q"):
            x, y = opt_a.state[a][key].double(), opt_b.state[b][key].double()
            if key == "Q":  # eigenvector signs may differ between batched and single calls
                x, y = x.abs(), y.abs()
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_batched_factor_updates_take_one_call_per_shape(monkeypatch):
    # The first step builds every Q: batched, one eigh per factor of a batch
    # ((24, 16) x3: 2 calls, (16, 40): 2, the two conv weights: 4; vectors
    # have no factor by default); per tensor, one per factor of every param.
    calls = {}
    for batch in (False, True):
        gen = torch.Generator().manual_seed(0)
        params = [torch.randn(s, generator=gen).requires_grad_() for s in BATCH_SHAPES]
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt = _SwitchedSOAP(params, batch, lr=0.01)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            opt.step()  # the first call builds every GG and Q
        calls[batch] = sum(e.count for e in prof.key_averages() if e.key == "aten::linalg_eigh")
    assert calls[False] == 2 * 3 + 2 + 4 * 2  # every factor of every param on its own
    assert calls[True] == 2 + 2 + 4  # one call per factor of each batch


# Side by side (issue: SOAP step speed on the CPU): with 2+ intra-op threads
# the per-param units (and batches) run one per thread. A large param (its
# unit above an even share: alone, with every thread), per-tensor params
# above the batching size, a batch of small equal matrices, a conv weight,
# a vector and a scalar; refreshes every 4 steps. The matrices' grads are a
# fixed U diag(s) V^T with spread singular values plus a little noise, so
# eigenvalue gaps keep eigh / QR well conditioned.
SIDE_BY_SIDE_SHAPES = [(200, 200), (100, 100), (100, 100), (120, 120)] + [(40, 40)] * 3 + [(8, 6, 3, 3), (33,), ()]


def _side_by_side_grads(steps, gen):
    bases = []
    for s in SIDE_BY_SIDE_SHAPES:
        if len(s) != 2:
            bases.append(torch.zeros(s, dtype=torch.float64))
            continue
        u = torch.linalg.qr(torch.randn(s[0], s[0], generator=gen, dtype=torch.float64))[0]
        v = torch.linalg.qr(torch.randn(s[1], s[1], generator=gen, dtype=torch.float64))[0]
        bases.append((u * torch.linspace(1.0, 4.0, s[0], dtype=torch.float64)) @ v.T)
    return [[b + 0.005 * torch.randn(b.shape, generator=gen, dtype=torch.float64) for b in bases] for _ in range(steps)]


def _with_threads(threads, fn):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_threads_equal_one_thread(dtype):
    # Each of 22 steps (the init call, 21 updates, 5 refreshes) runs from the
    # same params and state at 1 thread and at 2, then the 2-thread copy is
    # reset to the 1-thread result: the difference is what one step's thread
    # count makes, not the drift of two trajectories (eigenvectors amplify a
    # last-bit difference). Within a lane ATen / MKL run single-threaded, but
    # MKL's LAPACK (eigh, QR) may still round differently than in a 1-thread
    # process, and the large param's unit runs alone with both threads.
    # Measured max |diff|: params 0 (fp32 and bf16), exp_avg / exp_avg_sq
    # 5.6e-7 (fp32) / 2.3e-5 (bf16) of their scale (after a refresh's QR),
    # GG 0, |Q| 3.3e-5 (the init eigh). A unit touching another's state or a misplaced draw moves
    # params by >= lr = 3e-3 (sharing state between the two optimizers, a
    # bug of an earlier draft of this test, moved them by 2e-3).
    gen = torch.Generator().manual_seed(5)
    grads = _side_by_side_grads(22, gen)
    one = [torch.randn(s, generator=gen).to(dtype) for s in SIDE_BY_SIDE_SHAPES]
    two = [p.clone() for p in one]
    kwargs = dict(lr=3e-3, precondition_frequency=4, weight_decay=0.01)
    opt_one, opt_two = tox.SOAP(one, **kwargs), tox.SOAP(two, **kwargs)
    worst = dict(param=0.0, moment=0.0, Q=0.0, GG=0.0)
    for gs in grads:
        for a, b, g in zip(one, two, gs):
            a.grad, b.grad = g.to(dtype), g.to(dtype)
        _with_threads(1, opt_one.step)
        _with_threads(2, opt_two.step)
        for a, b in zip(one, two):
            worst["param"] = max(worst["param"], (a.double() - b.double()).abs().max().item())
            sa, sb = opt_one.state[a], opt_two.state[b]
            assert sa["step"].item() == sb["step"].item()
            for key, name in (("exp_avg", "moment"), ("exp_avg_sq", "moment"), ("GG", "GG"), ("Q", "Q")):
                if sa[key].numel():
                    x, y = sa[key].double(), sb[key].double()
                    if key == "Q":  # eigenvector signs are arbitrary (SOAP rotates back with the same Q)
                        x, y = x.abs(), y.abs()
                    diff = (x - y).abs().max().item()
                    if name == "moment":  # relative to the tensor's scale
                        diff /= max(x.abs().max().item(), 1e-30)
                    worst[name] = max(worst[name], diff)
        # Both continue from the 1-thread result (copies: load_state_dict
        # would share the tensors).
        opt_two.load_state_dict(copy.deepcopy(opt_one.state_dict()))
        with torch.no_grad():
            for a, b in zip(one, two):
                b.copy_(a)
    assert worst["param"] <= 1e-6, worst
    assert worst["moment"] <= 1e-4, worst
    assert worst["GG"] == 0.0, worst
    assert worst["Q"] <= 1e-4, worst


def test_step_under_inference_mode_with_several_params():
    # The state is created inside inference_mode (inference tensors) and the
    # units' worker threads must see the caller's mode to update it in place.
    def run(inference):
        gen = torch.Generator().manual_seed(5)
        grads = _side_by_side_grads(9, gen)
        params = [torch.randn(s, generator=gen) for s in SIDE_BY_SIDE_SHAPES]
        opt = tox.SOAP(params, lr=3e-3, precondition_frequency=4)
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = g.float()
            if inference:
                with torch.inference_mode():
                    _with_threads(2, opt.step)
            else:
                _with_threads(2, opt.step)
        return params, opt

    plain, _ = run(False)
    inference, opt = run(True)
    for a, b in zip(plain, inference):
        assert torch.equal(a, b)
    assert opt.state[inference[0]]["Q"].is_inference()
