"""WhiteKron (skew / quad): parity with the float64 reference written from
white_kron.md (tests/reference/white_kron.py, one tile at a time) on every
path: 1-D, dense tiles with padding (block_size 8), large diagonal, row and
column strips; both styles, the balance step, normalize_grads, b1 = 0; bf16
factor storage; aliases and errors."""

import copy
import os
import sys

import pytest
import torch

import torchopt_ext.optim as tox

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from reference.white_kron import WhiteKronReference, merge_dims  # noqa: E402

# With block_size 8 and max_size_dense 20: (13, 19) is 2 x 3 padded tiles,
# (8, 8) one full tile, (3, 4, 5) merges to (12, 5), (24, 6) is rows large ->
# column... see LARGE below; (7,) and () are 1-D, (1, 9) merges to 1-D.
DENSE_SHAPES = [(13, 19), (8, 8), (3, 4, 5), (7,), (), (1, 9)]
# max_size_dense 20: (10, 23) -> row strips, (25, 6) -> column strips, (22, 21) -> diagonal.
LARGE_SHAPES = [(10, 23), (25, 6), (22, 21)]


def _run(kwargs, shapes, dtype=torch.float64, steps=20, seed=0, factor_dtype=torch.float32):
    torch.manual_seed(seed)
    ours = [torch.randn(s, dtype=dtype) for s in shapes]
    ref = [p.to(torch.float64, copy=True) for p in ours]
    opt = tox.WhiteKron(ours, dtype=factor_dtype, seed=11, **kwargs)
    ref_opt = WhiteKronReference(ref, seed=11, **kwargs)
    for _ in range(steps):
        for p, q in zip(ours, ref):
            g = torch.randn(p.shape, dtype=torch.float64)
            p.grad, q.grad = g.to(dtype), g.clone()
        opt.step()
        ref_opt.step()
    return ours, ref, opt


def _max_err(a, b):
    return max(float((x.double() - y).abs().max()) for x, y in zip(a, b))


BASE = dict(lr=0.05, block_size=8, max_size_dense=20)


@pytest.mark.parametrize("style", ["skew", "quad"])
@pytest.mark.parametrize("shapes", [DENSE_SHAPES, LARGE_SHAPES], ids=["dense", "large"])
def test_matches_reference_float64(style, shapes):
    ours, ref, opt = _run(dict(BASE, update_style=style), shapes)
    assert _max_err(ours, ref) < 1e-12  # measured <= 9e-16
    # The factors moved and padding stayed zero.
    p = ours[0]
    ql = opt.state[p]["ql"]
    assert (ql - opt._fresh(p, opt.param_groups[0])[0]).abs().max() > 1e-3


@pytest.mark.parametrize("style", ["skew", "quad"])
def test_matches_reference_with_balance_normalize_and_no_momentum(style):
    kwargs = dict(BASE, update_style=style, balance_every=3, normalize_grads=True, b1=0.0, weight_decay=0.0)
    ours, ref, _ = _run(kwargs, DENSE_SHAPES + LARGE_SHAPES, steps=10)
    assert _max_err(ours, ref) < 1e-12  # measured <= 9e-16


def test_default_balance_period_runs_past_step_100():
    kwargs = dict(BASE, update_style="skew", lr=0.01)
    ours, ref, opt = _run(kwargs, [(13, 19), (7,)], steps=101)
    assert _max_err(ours, ref) < 1e-12


def test_padding_stays_zero_and_lr_style_none():
    ours, ref, opt = _run(dict(BASE, update_style="quad", lr_style=None), [(13, 19)], steps=5)
    assert _max_err(ours, ref) < 1e-12  # measured <= 9e-16
    ql = opt.state[ours[0]]["ql"]  # tiles (2 x 3): the second tile row has 5 valid rows
    assert ql.shape == (6, 8, 8)
    assert torch.equal(ql[3:, 5:, :], torch.zeros_like(ql[3:, 5:, :]))
    assert torch.equal(ql[3:, :, 5:], torch.zeros_like(ql[3:, :, 5:]))


def test_float32_tracks_the_float64_reference():
    ours, ref, _ = _run(dict(BASE, update_style="skew"), DENSE_SHAPES + LARGE_SHAPES, dtype=torch.float32)
    assert _max_err(ours, ref) < 2e-5  # measured 1.2e-6


def test_bf16_factor_storage():
    ours, ref, opt = _run(
        dict(BASE, update_style="quad"), DENSE_SHAPES, dtype=torch.float32, factor_dtype=torch.bfloat16
    )
    for p in ours:
        assert opt.state[p]["ql"].dtype == torch.bfloat16
        assert opt.state[p]["mu"].dtype == torch.bfloat16
        assert opt.state[p]["lip_l"].dtype == torch.float32
    # bf16 factors (8 bits of mantissa) after 20 steps: close, not equal.
    err = _max_err(ours, ref)
    assert 0 < err < 2e-2


def test_merge_dims_matches_the_spec():
    assert merge_dims((3, 4, 5)) == (12, 5)
    assert merge_dims((1, 9)) == (9,)
    assert merge_dims((2, 3, 4, 5)) == (6, 20)
    opt = tox.WhiteKron([torch.zeros(3, 4, 5)], block_size=4)
    p = opt.param_groups[0]["params"][0]
    state = opt._fresh(p, opt.param_groups[0])
    assert state[0].shape == (3 * 2, 4, 4)  # (12, 5) in 4-tiles: 3 x 2


def test_aliases_fix_the_style():
    p = torch.zeros(4, 4)
    assert tox.Skew([p]).defaults["update_style"] == "skew"
    assert tox.Quad([p]).defaults["update_style"] == "quad"
    assert tox.Quad([p], update_style="skew").defaults["update_style"] == "quad"
    d = tox.WhiteKron([p]).defaults
    expected = (1e-3, 0.95, 0.1, "adam", False)
    assert (d["lr"], d["b1"], d["weight_decay"], d["lr_style"], d["normalize_grads"]) == expected
    assert (d["max_size_dense"], d["preconditioner_lr"], d["preconditioner_init_scale"]) == (16384, 0.7, 1.0)
    assert (d["dtype"], d["block_size"], d["noise_scale"]) == (torch.bfloat16, 256, 1e-9)


def test_seeded_runs_repeat_and_seeds_differ():
    def run(seed):
        torch.manual_seed(0)
        p = torch.randn(9, 10)
        opt = tox.WhiteKron([p], block_size=4, seed=seed, noise_scale=0.1)
        for _ in range(3):
            p.grad = torch.randn(9, 10)
            opt.step()
        return p

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(update_style="cubic"), "update_style"),
        (dict(lr_style="sgd"), "lr_style"),
        (dict(dtype=torch.float16), "dtype"),
        (dict(block_size=0), "block_size"),
        (dict(max_size_dense=0), "max_size_dense"),
        (dict(b1=1.0), "b1"),
        (dict(weight_decay=-1.0), "weight_decay"),
        (dict(preconditioner_lr=0.0), "preconditioner_lr"),
        (dict(preconditioner_init_scale=0.0), "preconditioner_init_scale"),
        (dict(noise_scale=-1.0), "noise_scale"),
        (dict(lr=-1.0), "learning rate"),
    ],
)
def test_rejects_bad_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tox.WhiteKron([torch.zeros(2, 2)], **kwargs)


def test_op_rejects_state_of_another_layout():
    p = torch.randn(9, 10)
    opt = tox.WhiteKron([p], block_size=4)
    p.grad = torch.randn_like(p)
    opt.step()
    st = opt.state[p]
    op = torch.ops.torchopt_ext.white_kron_step_
    with pytest.raises(ValueError, match=r"ql\[0\] does not match params\[0\]"):
        op(
            [p],
            [p.grad],
            [st["mu"]],
            [st["ql"]],
            [st["qr"]],
            [st["lip_l"]],
            [st["lip_r"]],
            [st["step"]],
            torch.tensor(0.1, dtype=torch.float64),
            block_size=8,
        )


# -- stacked (scanned) layers ---------------------------------------------------

# (L, ...) params: dense tiles with padding, 1-D slices, 3-D slices (merged),
# row strips (max_size_dense 20) and one layer.
STACKED_SHAPES = [(3, 13, 19), (2, 7), (2, 3, 4, 5), (2, 10, 23), (1, 8, 8)]


def _stacked_vs_separate(steps=12, **kwargs):
    gen = torch.Generator().manual_seed(5)
    stacked = [torch.randn(s, generator=gen) for s in STACKED_SHAPES]
    separate = [p[i].clone() for p in stacked for i in range(p.shape[0])]
    opt = tox.WhiteKron(stacked, stacked=True, **kwargs)
    ref = tox.WhiteKron(separate, **kwargs)
    for _ in range(steps):
        grads = [torch.randn(p.shape, generator=gen) for p in stacked]
        for p, g in zip(stacked, grads):
            p.grad = g
        for q, sliced in zip(separate, [g[i].clone() for g in grads for i in range(g.shape[0])]):
            q.grad = sliced
        opt.step()
        ref.step()
    return stacked, separate, opt, ref


@pytest.mark.parametrize("style", ["skew", "quad"])
def test_stacked_equals_separate_slices(style):
    # The slices reach the op as params (views): the same tile stack, the
    # same per-index draws, so the results are bitwise those of the slices
    # listed as params.
    kwargs = dict(lr=0.02, block_size=8, max_size_dense=20, balance_every=5, update_style=style, seed=2)
    stacked, separate, opt, ref = _stacked_vs_separate(dtype=torch.float32, **kwargs)
    k = 0
    for p in stacked:
        state = opt.state[p]
        assert float(state["step"]) == 12
        for i in range(p.shape[0]):
            other = ref.state[separate[k]]
            assert torch.equal(p[i], separate[k])
            for key in ("mu", "ql", "qr", "lip_l", "lip_r"):
                assert state[key].shape[0] == p.shape[0], key
                assert torch.equal(state[key][i], other[key]), key
            k += 1
    # The slices' factors did move apart.
    assert (opt.state[stacked[0]]["ql"][0] - opt.state[stacked[0]]["ql"][1]).abs().max() > 1e-4


def test_stacked_state_dict_round_trip():
    gen = torch.Generator().manual_seed(3)
    params = [torch.randn(3, 10, 9, generator=gen), torch.randn(2, 7, generator=gen)]
    kwargs = dict(lr=0.02, block_size=4, seed=6)
    opt = tox.WhiteKron([{"params": params, "stacked": True}], **kwargs)
    grads = [[torch.randn(p.shape, generator=gen) for p in params] for _ in range(6)]

    def run(ps, o, steps):
        for step in steps:
            for p, g in zip(ps, step):
                p.grad = g.clone()
            o.step()

    run(params, opt, grads[:3])
    saved = copy.deepcopy(opt.state_dict())
    assert saved["state"][0]["ql"].shape == (3, 9, 4, 4)  # (10, 9) slices: 3 x 3 tiles of 4
    assert saved["state"][1]["ql"].shape == (2, 7)  # 1-D slices: a diagonal each
    assert saved["param_groups"][0]["stacked"]
    resumed_params = [p.detach().clone() for p in params]
    resumed = tox.WhiteKron([{"params": resumed_params, "stacked": True}], lr=0.5, block_size=4, seed=0)
    resumed.load_state_dict(saved)
    run(params, opt, grads[3:])
    run(resumed_params, resumed, grads[3:])
    for a, b in zip(params, resumed_params):
        assert torch.equal(a, b)
    # Unstacked state does not fit a stacked group.
    plain = tox.WhiteKron([params[0].detach().clone()], lr=0.02, block_size=4)
    with pytest.raises(ValueError, match="state 'ql' has shape"):
        plain.load_state_dict(
            {
                **saved,
                "param_groups": [{**saved["param_groups"][0], "params": [0], "stacked": False}],
                "state": {0: saved["state"][0]},
            }
        )


@pytest.mark.parametrize("shape", [(5,), ()])
def test_stacked_rejects_params_without_a_layer_axis(shape):
    with pytest.raises(ValueError, match="stacked"):
        tox.WhiteKron([torch.randn(shape)], stacked=True)
    with pytest.raises(ValueError, match="stacked"):
        tox.WhiteKron([torch.randn(3, 3)], stacked="yes")


def test_stacked_step_compiles():
    torch._dynamo.reset()

    def run(compiled):
        gen = torch.Generator().manual_seed(4)
        p = torch.randn(3, 6, 5, generator=gen)
        opt = tox.WhiteKron([p], lr=0.01, block_size=4, seed=3, stacked=True)
        step = torch.compile(opt.step, fullgraph=True) if compiled else opt.step
        for _ in range(3):
            p.grad = torch.randn(3, 6, 5, generator=gen)
            step()
        return p, opt

    eager, e_opt = run(False)
    compiled, c_opt = run(True)
    assert torch.equal(eager, compiled)
    for key in ("mu", "ql", "qr", "lip_l", "lip_r", "step"):
        assert torch.equal(e_opt.state[eager][key], c_opt.state[compiled][key]), key
