"""The split Muon / PRISM ops of the whole-matrix ownership path, on one
process: composed (momentum on row shards, the matrix function on the whole
matrix, the apply on the shards) they must give muon_step_ / prism_step_;
opcheck; the owner map and the row split. The multi-process runs are in
test_distributed.py."""

from __future__ import annotations

import pytest
import torch

import torchopt_ext.optim as tox
from torchopt_ext.optim._ownership import assign_owners, chunk_rows

OPS = torch.ops.torchopt_ext
OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
SHAPES = [(6, 4), (3, 7), (5, 2, 3)]  # a tall, a wide and a (5, 6) matrix from a 3-D param
MAGMA = dict(magma_p=0.6, magma_tau=2.0, seed=11)


def _problem(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g, dtype=dtype) for s in SHAPES]
    grads = [[torch.randn(s, generator=g, dtype=dtype) for s in SHAPES] for _ in range(4)]
    return params, grads


def _sizes(params):
    return [n for p in params for n in (p.shape[0], p.numel() // p.shape[0])]


def _shards(t, ws):
    """Row shards as Shard(0) splits them (trailing ones may be empty)."""
    return [t[slice(*chunk_rows(t.shape[0], ws, r))] for r in range(ws)]


MUON = dict(momentum=0.9, nesterov=True, ns_coefficients=[3.4445, -4.775, 2.0315], ns_steps=5, eps=1e-7)


def _muon_single(params, grads, use_magma, nesterov=True, ns_dtype=torch.bfloat16, **extra):
    params = [p.clone() for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    steps = [torch.zeros(()) for _ in params]
    scores = [torch.full((), 0.5) for _ in params] if use_magma else []
    opts = dict(MUON, nesterov=nesterov)
    for gs in grads:
        OPS.muon_step_(
            params, [g.clone() for g in gs], bufs, scores, steps, torch.tensor(0.02, dtype=torch.float64),
            weight_decay=0.1, adjust_lr_fn="original", ns_dtype=ns_dtype, use_magma=use_magma,
            **(MAGMA if use_magma else {}), **extra, **opts,
        )  # fmt: skip
    return params, bufs, scores


def _muon_split(params, grads, use_magma, ws, nesterov=True, ns_dtype=torch.bfloat16, **extra):
    """The ownership path by hand: every op on row shards, NS on the whole."""
    params = [p.clone() for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    steps = [[torch.zeros(()) for _ in params] for _ in range(ws)]
    scores = [torch.full((), 0.5) for _ in params] if use_magma else []
    p_shards = [[s[r] for s in (_shards(p, ws) for p in params)] for r in range(ws)]
    b_shards = [[s[r] for s in (_shards(b, ws) for b in bufs)] for r in range(ws)]
    for gs in grads:
        outs = []
        for r in range(ws):
            inputs = [torch.empty_like(b) for b in b_shards[r]]
            sums = torch.zeros(len(params), 3, dtype=torch.float64)
            OPS.muon_momentum_(
                [s[r].clone() for s in (_shards(g, ws) for g in gs)], b_shards[r], steps[r], inputs, sums,
                momentum=MUON["momentum"], nesterov=nesterov, use_magma=use_magma,
            )  # fmt: skip
            outs.append((inputs, sums))
        sums = sum(o[1] for o in outs)  # the all-reduce
        updates = []
        for j, p in enumerate(params):
            whole = torch.cat([o[0][j] for o in outs]).reshape(p.shape[0], -1)
            updates.append(
                OPS.newton_schulz(whole, coefficients=MUON["ns_coefficients"], steps=5, eps=1e-7, dtype=ns_dtype)
            )
        before = [s.clone() for s in scores]
        for r in range(ws):
            mine = [u[slice(*chunk_rows(u.shape[0], ws, r))].reshape(-1) for u in updates]
            # Each rank scores on its own copy; rank 0's copy is checked below.
            OPS.matrix_apply_(
                p_shards[r], mine, scores if r == 0 else [s.clone() for s in before], steps[r],
                torch.tensor(0.02, dtype=torch.float64), weight_decay=0.1, matrix_sizes=_sizes(params),
                adjust_lr_fn="original", magma_sums=sums if use_magma else None, use_magma=use_magma,
                **(MAGMA if use_magma else {}), **extra,
            )  # fmt: skip
    return params, bufs, scores


@pytest.mark.parametrize("ws", [1, 2, 4])
@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_split_equals_muon_step(ws, nesterov):
    params, grads = _problem()
    ref, ref_bufs, _ = _muon_single(params, grads, False, nesterov)
    out, bufs, _ = _muon_split(params, grads, False, ws, nesterov)
    for a, b in zip(out + bufs, ref + ref_bufs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("ws", [1, 4])
def test_muon_split_with_magma_tracks_muon_step(ws):
    # The cosine comes from float64 shard sums instead of a float32 whole-tensor
    # norm: equal to rounding. Over 4 steps with p = 0.6 some draws drop a matrix.
    params, grads = _problem()
    ref, _, ref_scores = _muon_single(params, grads, True)
    out, _, scores = _muon_split(params, grads, True, ws)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    for a, b in zip(scores, ref_scores):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(p, q) for p, q in zip(ref, _muon_single(params, grads, False)[0]))


def test_muon_split_bf16_params_equal_muon_step():
    # Round-to-nearest is per element, so shards round as the whole does.
    params, grads = _problem(torch.bfloat16)
    ref, _, _ = _muon_single(params, grads, False)
    out, _, _ = _muon_split(params, grads, False, 2)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


PRISM_CASES = {
    "original": dict(),
    "bidirectional": dict(prism_mode="bidirectional", gamma_l=0.5),
    "shape_after": dict(shape_nesterov=False, grad_clip_max_amps=[0.3, 0.5]),
    "heavy_ball_bias": dict(momentum_accumulator="heavy_ball", nesterov=False, bias_correction=True),
    "ema_bias": dict(bias_correction=True),
    "no_clip_fp64_ns": dict(grad_clip_max_amps=[], ns_dtype=torch.float64),
}
_MOMENTUM_KEYS = ("b1", "nesterov", "shape_nesterov", "bias_correction", "momentum_accumulator")
_APPLY_KEYS = ("weight_decay", "use_magma", "magma_p", "magma_tau", "seed")


def _prism_kwargs(case, use_magma):
    kw = dict(b1=0.9, gamma=0.7, weight_decay=0.1, ns_iters=5, prism_mode="original", ns_dtype=torch.float32)
    kw.update(PRISM_CASES[case])
    if use_magma:
        kw.update(use_magma=True, **MAGMA)
    return kw


def _prism_single(params, grads, kw):
    params = [p.clone() for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    steps = [torch.zeros(()) for _ in params]
    scores = [torch.full((), 0.5) for _ in params] if kw.get("use_magma") else []
    for gs in grads:
        OPS.prism_step_(
            params, [g.clone() for g in gs], bufs, scores, steps, torch.tensor(0.02, dtype=torch.float64), **kw
        )
    return params, bufs


def _prism_split(params, grads, kw, ws):
    params = [p.clone() for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    steps = [[torch.zeros(()) for _ in params] for _ in range(ws)]
    use_magma = kw.get("use_magma", False)
    scores = [[torch.full((), 0.5) for _ in params] if use_magma else [] for _ in range(ws)]
    p_shards = [[s[r] for s in (_shards(p, ws) for p in params)] for r in range(ws)]
    b_shards = [[s[r] for s in (_shards(b, ws) for b in bufs)] for r in range(ws)]
    momentum_kw = {k: kw[k] for k in _MOMENTUM_KEYS if k in kw}
    shape_kw = {k: v for k, v in kw.items() if k not in _APPLY_KEYS + ("bias_correction",)}
    for gs in grads:
        outs = []
        lookahead = kw.get("nesterov", True) and not kw.get("shape_nesterov", True)
        for r in range(ws):
            out = [[torch.empty_like(b) for b in b_shards[r]] for _ in range(3 if lookahead else 2)]
            if not lookahead:
                out.append([])
            out.append(torch.zeros(len(params), 3, dtype=torch.float64))
            OPS.prism_momentum_(
                [s[r].clone() for s in (_shards(g, ws) for g in gs)], b_shards[r], steps[r], *out,
                use_magma=use_magma, seed=kw.get("seed", 0), **momentum_kw,
            )  # fmt: skip
            outs.append(out)
        sums = sum(o[3] for o in outs)
        updates = []
        for j, p in enumerate(params):
            whole = [torch.cat([o[k][j] for o in outs]).reshape(p.shape[0], -1) for k in range(3) if outs[0][k]]
            updates.append(
                OPS.prism_shape(*whole, **shape_kw) if len(whole) == 3 else OPS.prism_shape(*whole, None, **shape_kw)
            )
        for r in range(ws):
            mine = [u[slice(*chunk_rows(u.shape[0], ws, r))].reshape(-1) for u in updates]
            OPS.matrix_apply_(
                p_shards[r], mine, scores[r], steps[r], torch.tensor(0.02, dtype=torch.float64),
                matrix_sizes=_sizes(params), magma_sums=sums if use_magma else None,
                **{k: kw[k] for k in _APPLY_KEYS if k in kw},
            )  # fmt: skip
    return params, bufs


@pytest.mark.parametrize("case", sorted(PRISM_CASES))
@pytest.mark.parametrize("ws", [1, 3])
def test_prism_split_equals_prism_step(case, ws):
    params, grads = _problem(torch.float64 if "fp64" in case else torch.float32)
    kw = _prism_kwargs(case, use_magma=False)
    ref, ref_bufs = _prism_single(params, grads, kw)
    out, bufs = _prism_split(params, grads, kw, ws)
    for a, b in zip(out + bufs, ref + ref_bufs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_prism_split_with_magma_tracks_prism_step():
    params, grads = _problem()
    kw = _prism_kwargs("original", use_magma=True)
    ref, _ = _prism_single(params, grads, kw)
    out, _ = _prism_split(params, grads, kw, 2)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_opcheck_split_ops():
    params, grads = _problem()
    g0 = grads[0]
    steps = [torch.zeros(()) for _ in params]
    bufs = [torch.randn_like(p) for p in params]
    lr = torch.tensor(0.02, dtype=torch.float64)

    def outs():
        return [torch.empty_like(p) for p in params]

    sums = torch.zeros(len(params), 3, dtype=torch.float64)
    torch.library.opcheck(
        OPS.muon_momentum_.default, ([g.clone() for g in g0], bufs, steps, outs(), sums),
        dict(momentum=0.9, nesterov=False, use_magma=True), test_utils=OPCHECK_UTILS,
    )  # fmt: skip
    for shape_nesterov in (True, False):
        torch.library.opcheck(
            OPS.prism_momentum_.default,
            ([g.clone() for g in g0], bufs, steps, outs(), outs(), [] if shape_nesterov else outs(), sums),
            dict(b1=0.9, shape_nesterov=shape_nesterov, use_magma=True, grad_scale=torch.tensor(2.0)),
            test_utils=OPCHECK_UTILS,
        )  # fmt: skip
    m, d = torch.randn(5, 3), torch.randn(5, 3)
    torch.library.opcheck(OPS.prism_shape.default, (m, d, None), dict(gamma=0.5), test_utils=OPCHECK_UTILS)
    torch.library.opcheck(
        OPS.prism_shape.default, (m, d, torch.randn(5, 3)), dict(shape_nesterov=False, prism_mode="bidirectional"),
        test_utils=OPCHECK_UTILS,
    )  # fmt: skip
    updates = [torch.randn(p.numel(), dtype=torch.bfloat16) for p in params]
    scores = [torch.full((), 0.5) for _ in params]
    torch.library.opcheck(
        OPS.matrix_apply_.default, (params, updates, scores, steps, lr),
        dict(weight_decay=0.1, matrix_sizes=_sizes(params), adjust_lr_fn="match_rms_adamw",
             magma_sums=torch.rand(len(params), 3, dtype=torch.float64), use_magma=True),
        test_utils=OPCHECK_UTILS,
    )  # fmt: skip


def test_split_ops_reject_bad_input():
    params, _ = _problem()
    steps = [torch.ones(()) for _ in params]
    updates = [torch.zeros(p.numel()) for p in params]
    lr = torch.tensor(0.1)
    with pytest.raises(ValueError, match="matrix_apply_: matrix_sizes must hold"):
        OPS.matrix_apply_(params, updates, [], steps, lr, weight_decay=0.0, matrix_sizes=[1, 2])
    with pytest.raises(ValueError, match=r"matrix_apply_: updates\[1\] has 6 elements"):
        OPS.matrix_apply_(params, [updates[0], torch.zeros(6), updates[2]], [], steps, lr, weight_decay=0.0,
                          matrix_sizes=_sizes(params))  # fmt: skip
    with pytest.raises(ValueError, match="use_magma needs magma_sums"):
        OPS.matrix_apply_(params, updates, [torch.full((), 0.5)] * 3, steps, lr, weight_decay=0.0,
                          matrix_sizes=_sizes(params), use_magma=True)  # fmt: skip
    with pytest.raises(ValueError, match="adjust_lr_fn must be"):
        OPS.matrix_apply_(
            params, updates, [], steps, lr, weight_decay=0.0, matrix_sizes=_sizes(params), adjust_lr_fn="x"
        )
    zeros = [torch.zeros_like(p) for p in params]
    no_sums = torch.zeros(0, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="muon_momentum_: momentum must be in"):
        OPS.muon_momentum_([p.clone() for p in params], zeros, steps, zeros, no_sums, momentum=1.0, nesterov=True)
    with pytest.raises(ValueError, match=r"muon_momentum_: momentum_buffers\[0\] has shape"):
        OPS.muon_momentum_([params[0]], [torch.zeros(2, 2)], steps[:1], zeros[:1], no_sums, momentum=0.9, nesterov=True)
    with pytest.raises(ValueError, match=r"muon_momentum_: ns_inputs\[0\] must have shape"):
        OPS.muon_momentum_([params[0]], zeros[:1], steps[:1], [torch.zeros(2)], no_sums, momentum=0.9, nesterov=True)
    with pytest.raises(ValueError, match="muon_momentum_: use_magma needs float64 magma_sums"):
        OPS.muon_momentum_(params, zeros, steps, zeros, no_sums, momentum=0.9, nesterov=True, use_magma=True)
    with pytest.raises(ValueError, match="prism_momentum_: lookahead_grads must be empty"):
        OPS.prism_momentum_(params, zeros, steps, zeros, zeros, zeros, no_sums)
    with pytest.raises(ValueError, match="prism_shape: target and innovation must be"):
        OPS.prism_shape(torch.zeros(3, 2), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="prism_shape: the look-ahead after shaping needs the grad"):
        OPS.prism_shape(torch.ones(3, 2), torch.ones(3, 2), None, shape_nesterov=False)
    with pytest.raises(ValueError, match="prism_shape: mode must be"):
        OPS.prism_shape(torch.ones(3, 2), torch.ones(3, 2), prism_mode="sideways")
    opt = tox.Muon([torch.nn.Parameter(torch.zeros(2, 2))])
    with pytest.raises(ValueError, match="Invalid distributed_mode"):
        opt.distributed_mode = "scatter"


def test_chunk_rows_is_torch_chunk():
    for rows in range(0, 11):
        for ws in (1, 2, 3, 4):
            chunks = torch.arange(rows).chunk(ws) if rows else ()
            got = [chunk_rows(rows, ws, r) for r in range(ws)]
            expect = [(int(c[0]), int(c[-1]) + 1) for c in chunks if c.numel()]
            assert [g for g in got if g[1] > g[0]] == expect
            assert sum(b - a for a, b in got) == rows


def test_owner_map_balances_cost():
    sizes = [(1024, 1024), (1024, 256), (256, 1024), (64, 64), (4096, 128), (1024, 1024)]
    owners = assign_owners(sizes, 4)
    assert owners == assign_owners(sizes, 4)  # deterministic
    # The two largest matrices go to different ranks.
    assert owners[0] != owners[5]
    load = [0] * 4
    for (r, c), o in zip(sizes, owners):
        load[o] += r * c * min(r, c)
    assert max(load) == 1024**3  # no rank gets more than one big square
    assert assign_owners([(3, 2)], 4) == [0]


# -- keyed draws of the owner-held-state ops (Kron, WhiteKron) ---------------
# The ownership path calls the op once per owner with the params it holds;
# with param_indices / group_shapes (Kron) or dense_tiles (WhiteKron) every
# param must get the draws of the single call over the whole group.

SPLITS = [[0, 2], [1, 3]]  # two owners, interleaved


def _kron_state(params):
    state = []
    for p in params:
        dense = OPS.kron_factor_layout(list(p.shape))
        numel = sum(d * d if f else d for d, f in zip(p.shape, dense)) if p.dim() else 1
        state.append(
            dict(mu=torch.zeros_like(p), Q=torch.zeros(numel), L=torch.zeros(len(dense)),
                 score=torch.full((), 0.5), step=torch.zeros(()))
        )  # fmt: skip
    return state


def _kron_call(params, grads, state, idx, rng, group_shapes=None, prob=None):
    extra = {} if group_shapes is None else dict(param_indices=idx, group_shapes=group_shapes)
    OPS.kron_step_(
        [params[i] for i in idx], [grads[i] for i in idx], [state[i]["mu"] for i in idx],
        [state[i]["Q"] for i in idx], [state[i]["L"] for i in idx], [state[i]["score"] for i in idx],
        [state[i]["step"] for i in idx], torch.tensor(0.01, dtype=torch.float64), rng_state=rng,
        weight_decay=0.1, use_magma=True, magma_p=0.6, seed=5, preconditioner_init_scale=1.0,
        update_probability=prob, **extra,
    )  # fmt: skip


@pytest.mark.parametrize("prob", [None, 0.5])
def test_kron_owner_calls_equal_group_call(prob):
    shapes = [(6, 4), (3, 7), (5, 2, 3), (4,)]
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(5)]
    group_shapes = [v for s in shapes for v in (len(s), *s, 0)]
    p_tensor = None if prob is None else torch.tensor(prob, dtype=torch.float64)
    single, split = [p.clone() for p in base], [p.clone() for p in base]
    s_state, o_state = _kron_state(base), _kron_state(base)
    s_rng = torch.Generator().manual_seed(3).get_state()
    o_rng = s_rng.clone()
    for step_grads in grads:
        _kron_call(single, step_grads, s_state, list(range(len(shapes))), s_rng, prob=p_tensor)
        after = []
        for idx in SPLITS:
            rng = o_rng.clone()
            _kron_call(split, step_grads, o_state, idx, rng, group_shapes, p_tensor)
            after.append(rng)
        assert torch.equal(after[0], after[1]), "owners' generators diverged"
        o_rng.copy_(after[0])
    assert torch.equal(o_rng, s_rng)
    for a, b, sa, sb in zip(single, split, s_state, o_state):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
        for key in ("mu", "Q", "L", "score"):
            torch.testing.assert_close(sb[key], sa[key], rtol=0, atol=0)


def _white_kron_call(params, grads, state, idx, **extra):
    OPS.white_kron_step_(
        [params[i] for i in idx], [grads[i] for i in idx], [state[i][0] for i in idx],
        *[[state[i][k] for i in idx] for k in range(1, 5)], [state[i][5] for i in idx],
        torch.tensor(0.01, dtype=torch.float64), max_size_dense=8, block_size=2, seed=7, **extra,
    )  # fmt: skip


def test_white_kron_owner_calls_equal_group_call():
    # Dense tiles (both dims <= 8), a 1-D param and row strips (9 > 8).
    shapes = [(6, 4), (5,), (3, 7), (9, 2)]
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(4)]

    def fresh():
        return [
            [torch.zeros_like(p), *OPS.white_kron_init_state(p, 8, 2, 1.0, torch.float32), torch.zeros(())]
            for p in base
        ]

    tiles = [st[1].shape[0] if st[1].dim() == 3 and st[2].dim() == 3 else None for st in fresh()]
    assert tiles[0] and tiles[2] and tiles[1] is None and tiles[3] is None
    first = {j: sum(t for t in tiles[:j] if t) for j, t in enumerate(tiles) if t}
    single, split = [p.clone() for p in base], [p.clone() for p in base]
    s_state, o_state = fresh(), fresh()
    for step, step_grads in enumerate(grads):
        _white_kron_call(single, step_grads, s_state, list(range(len(shapes))))
        for idx in SPLITS:
            dense = [first[j] for j in idx if j in first]
            extra = dict(param_indices=idx)
            if dense:
                extra["dense_tiles"] = [sum(t for t in tiles if t), step + 1, *dense]
            _white_kron_call(split, step_grads, o_state, idx, **extra)
    for a, b, sa, sb in zip(single, split, s_state, o_state):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
        for x, y in zip(sa, sb):
            torch.testing.assert_close(y, x, rtol=0, atol=0)


def test_owner_path_arguments_are_checked():
    p, gr = torch.randn(4, 3), torch.randn(4, 3)
    st = _kron_state([p])
    with pytest.raises(ValueError, match="param_indices must have one entry per param"):
        OPS.kron_step_([p], [gr], [st[0]["mu"]], [st[0]["Q"]], [st[0]["L"]], [], [st[0]["step"]],
                       torch.tensor(0.01), rng_state=torch.Generator().get_state(), param_indices=[0, 1])  # fmt: skip
    with pytest.raises(ValueError, match="shape group_shapes gives"):
        _kron_call([p], [gr], _kron_state([p]), [0], torch.Generator().get_state(), group_shapes=[2, 3, 4, 0])
    ws = [[torch.zeros_like(p), *OPS.white_kron_init_state(p, 8, 2, 1.0, torch.float32), torch.zeros(())]]
    with pytest.raises(ValueError, match="dense_tiles"):
        _white_kron_call([p], [gr], ws, [0], param_indices=[0], dense_tiles=[1, 1, 0])
