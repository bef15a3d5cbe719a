"""16-bit GroupNorm and InstanceNorm forward (float16, bfloat16), read and written by the
kernels in both layouts; each output element within one unit in the last place of the
correctly rounded float64 reference."""
import numpy as np
import pytest

import cynorm
from conftest import (HALVES, at_phase, bfloat16_or_skip, check_half, correctly_rounded,
                      deep_cancelling_params, half_data, half_dtype, half_params,
                      mean_beside_150, same_gradients_as_torch, ulps16)


def _gn_ref(x64, G, w=None, b=None, eps=1e-5, mean=None, var=None):
    """GroupNorm of (N, C, *) in float64 (InstanceNorm: G = C); mean / var (N, G) given or the
    groups' own."""
    N, C = x64.shape[:2]
    xg = x64.reshape(N, G, -1)
    if mean is None:
        mean, var = xg.mean(axis=2), xg.var(axis=2)
    r = ((xg - mean[..., None]) / np.sqrt(var[..., None] + eps)).reshape(x64.shape)
    shape = [1, C] + [1] * (x64.ndim - 2)
    if w is not None:
        r = r * w.astype(np.float64).reshape(shape)
    if b is not None:
        r = r + b.astype(np.float64).reshape(shape)
    return r


GN_CASES = [((8, 6, 20), 3), ((4, 64, 7, 9), 32), ((3, 8, 1000), 2), ((5, 4), 2),
            ((2, 6, 3, 4, 5), 3), ((2, 4, 3000), 4)]


@pytest.mark.parametrize("name", HALVES)
@pytest.mark.parametrize("shape, G", GN_CASES)
@pytest.mark.parametrize("params", ["none", "float32", "input"])
def test_group_norm_within_one_ulp_of_the_reference(rng, name, shape, G, params):
    dt = half_dtype(name)
    x = half_data(rng, shape, dt)
    C = shape[1]
    w, b = half_params(rng, C, params, dt)
    x64 = x.astype(np.float64)
    y, mean, rstd = cynorm.group_norm(x, G, w, b, return_stats=True)
    check_half(y, _gn_ref(x64, G, w, b), dt)
    xg = x64.reshape(shape[0], G, -1)
    assert mean.dtype == rstd.dtype == np.float64
    np.testing.assert_allclose(mean, xg.mean(axis=2), rtol=1e-14)
    np.testing.assert_allclose(rstd, 1 / np.sqrt(xg.var(axis=2) + 1e-5), rtol=1e-12)
    if len(shape) > 2:
        yi = cynorm.instance_norm(x, weight=w, bias=b)
        check_half(yi, _gn_ref(x64, C, w, b), dt)
        xl = np.ascontiguousarray(np.moveaxis(x, 1, -1))   # channels-last
        yl, mean_l, rstd_l = cynorm.group_norm(xl, G, w, b, axis=-1, return_stats=True)
        check_half(yl, np.moveaxis(_gn_ref(x64, G, w, b), 1, -1), dt)
        np.testing.assert_allclose(mean_l, mean, rtol=1e-14)
        np.testing.assert_allclose(rstd_l, rstd, rtol=1e-12)
        yi = cynorm.instance_norm(xl, weight=w, bias=b, axis=-1)
        check_half(yi, np.moveaxis(_gn_ref(x64, C, w, b), 1, -1), dt)


@pytest.mark.parametrize("name", HALVES)
def test_instance_norm_running_statistics_then_eval(rng, name):
    """Training updates the running statistics (16-bit buffers) from the 16-bit input's
    float64 moments, as for a float32 copy; eval normalizes with them, within one ulp."""
    dt = half_dtype(name)
    x = half_data(rng, (6, 5, 300), dt, offset_sigmas=40)
    w = rng.uniform(0.5, 2.0, 5).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32)
    rm, rv = np.zeros(5, dt), np.ones(5, dt)
    x64 = x.astype(np.float64)
    batch_mean = x64.mean(axis=2).mean(axis=0)
    batch_var = x64.var(axis=2, ddof=1).mean(axis=0)
    for _ in range(3):
        want_m = 0.7 * rm.astype(np.float64) + 0.3 * batch_mean
        want_v = 0.7 * rv.astype(np.float64) + 0.3 * batch_var
        cynorm.instance_norm(x, rm, rv, w, b, momentum=0.3)
        assert rm.dtype == rv.dtype == dt
        assert ulps16(rm, correctly_rounded(want_m, dt)).max() <= 1
        assert ulps16(rv, correctly_rounded(want_v, dt)).max() <= 1
    y = cynorm.instance_norm(x, rm, rv, w, b, use_input_stats=False)
    mean = np.tile(rm.astype(np.float64), (6, 1))
    var = np.tile(rv.astype(np.float64), (6, 1))
    check_half(y, _gn_ref(x64, 5, w, b, mean=mean, var=var), dt)


@pytest.mark.parametrize("name", HALVES)
@pytest.mark.parametrize("shape, G", [((3, 66, 1000), 33), ((5, 12, 3000), 6),
                                      ((2, 4, 40000), 2)])
def test_group_norm_groups_in_batches(rng, name, shape, G):
    """Channels-first groups go in batches of a sample's groups (their parameters made in one
    call): batches of 16 + 16 + 1 groups, of 5 + 1, and of one group each; a thread's units
    ending part-way through a batch.  Each output is within one ulp, the bits those of one
    thread, with and without a mask, and with given (running) statistics."""
    dt = half_dtype(name)
    x = half_data(rng, shape, dt, offset_sigmas=20)
    N, C, S = shape
    w = rng.uniform(0.5, 2.0, C).astype(np.float32)
    b = rng.standard_normal(C).astype(np.float32)
    x64 = x.astype(np.float64)
    lengths = rng.integers(0, S + 1, N)
    lengths[0] = S
    with cynorm.num_threads(1):
        y1 = cynorm.group_norm(x, G, w, b)
        ym1 = cynorm.group_norm(x, G, w, b, lengths=lengths)
    with cynorm.num_threads(2):
        y2 = cynorm.group_norm(x, G, w, b)
        ym2 = cynorm.group_norm(x, G, w, b, lengths=lengths)
    check_half(y1, _gn_ref(x64, G, w, b), dt)
    assert y1.tobytes() == y2.tobytes() and ym1.tobytes() == ym2.tobytes()
    for n, k in enumerate(lengths):
        if k:
            check_half(ym1[n:n + 1, :, :k], _gn_ref(x64[n:n + 1, :, :k], G, w, b), dt)
        assert not ym1[n, :, k:].astype(np.float32).any()
    rm = (x64.mean(axis=(0, 2)) + rng.standard_normal(C)).astype(np.float32)
    rv = rng.uniform(1, 4, C).astype(np.float32)
    with cynorm.num_threads(2):
        ye = cynorm.instance_norm(x, rm, rv, w, b, use_input_stats=False)
    ref = _gn_ref(x64, C, w, b, mean=np.tile(rm.astype(np.float64), (N, 1)),
                  var=np.tile(rv.astype(np.float64), (N, 1)))
    check_half(ye, ref, dt)


@pytest.mark.parametrize("name", HALVES)
def test_group_norm_bias_cancelling_the_product(rng, name):
    """InstanceNorm in eval mode whose bias is minus the product at sample 0's first
    position: those outputs are far smaller than their terms, and still within one ulp."""
    dt = half_dtype(name)
    x = half_data(rng, (4, 6, 100), dt, offset_sigmas=50)
    rm = rng.standard_normal(6).astype(np.float32) + 150
    rv = rng.uniform(1, 4, 6).astype(np.float32)
    w = rng.uniform(0.5, 2.0, 6).astype(np.float32)
    x64 = x.astype(np.float64)
    b = (-(x64[0, :, 0] - rm) / np.sqrt(rv.astype(np.float64) + 1e-5) * w).astype(np.float32)
    mean, var = np.tile(rm.astype(np.float64), (4, 1)), np.tile(rv.astype(np.float64), (4, 1))
    ref = _gn_ref(x64, 6, w, b, mean=mean, var=var)
    assert np.median(np.abs(ref[0, :, 0])) < 1e-4 * np.median(np.abs(b))
    check_half(cynorm.instance_norm(x, rm, rv, w, b, use_input_stats=False), ref, dt)


@pytest.mark.parametrize("G", [8, 32])
def test_cancelling_bias_next_to_a_mean_far_from_the_first_element(rng, G):
    """Training-mode GroupNorm (G 8) and InstanceNorm (G = C = 32), channels first, on rows
    whose mean (150 + 1/S) lies 50 from the group's first element, each channel's bias minus
    the product at one of sample 0's elements equal to 150: those outputs, far smaller than
    their terms, need the mean to far finer than one float64 (group_half_first's mean_rest).
    Against exact arithmetic (as test_half_precision.py's LayerNorm case)."""
    dt = bfloat16_or_skip()
    N, C, S = 2, 32, 2000
    x = mean_beside_150(rng, (N, C, S)).astype(dt)
    x64 = x.astype(np.float64)
    Cg = C // G
    units = [x64[0].reshape(G, -1)[c // Cg] for c in range(C)]   # channel c's group of sample 0
    at = [(c % Cg) * S + int(np.nonzero(x64[0, c] == 150)[0][0]) for c in range(C)]
    w, b, want = deep_cancelling_params(rng, units, at)
    y = (cynorm.instance_norm(x, None, None, w, b, use_input_stats=True) if G == C
         else cynorm.group_norm(x, G, w, b))
    got = np.array([y[0, c].reshape(-1)[at[c] % S] for c in range(C)], dt)
    check_half(got, want, dt, 2.0 ** -49 * np.abs(b))   # 2^-50 of the terms


@pytest.mark.parametrize("name", HALVES)
def test_group_norm_out_in_place_threads_and_every_kernels_build(rng, name):
    from cynorm import _isa
    from cynorm._validation import half_kind

    dt = half_dtype(name)
    x = half_data(rng, (6, 8, 40, 50), dt, offset_sigmas=30)
    w = rng.uniform(0.5, 2.0, 8).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    with cynorm.num_threads(1):
        y1 = cynorm.group_norm(x, 4, w, b)
    with cynorm.num_threads(2):
        y2, mean, rstd = cynorm.group_norm(x, 4, w, b, return_stats=True)
    check_half(y1, _gn_ref(x.astype(np.float64), 4, w, b), dt)
    assert y1.tobytes() == y2.tobytes()   # the same bits on any thread count
    out = at_phase(np.empty_like(x), 6)
    assert cynorm.group_norm(x, 4, w, b, out=out) is out
    assert out.tobytes() == y1.tobytes()
    xc = x.copy()
    assert cynorm.group_norm(xc, 4, w, b, out=xc) is xc
    assert xc.tobytes() == y1.tobytes()
    strided = np.empty((6, 8, 40, 100), dt)[..., ::2]   # an out= with gaps
    assert cynorm.group_norm(x, 4, w, b, out=strided) is strided
    assert strided.tobytes() == y1.tobytes()
    for level in _isa.available():   # each kernels module (the baseline's affine in float64)
        y = np.empty_like(x)
        stats = np.empty((6, 24))
        _isa.load(level).group_norm_half(x, y, 6, 8, 2000, 4, False, w, b, 1e-5, stats, False,
                                         None, True, half_kind(dt), 2)
        check_half(y, _gn_ref(x.astype(np.float64), 4, w, b), dt)
        np.testing.assert_allclose(stats[4:], np.stack([mean.ravel(), rstd.ravel()]),
                                   rtol=1e-14)
        xl = np.ascontiguousarray(np.moveaxis(x, 1, -1))
        yl = np.empty_like(xl)
        mask = np.arange(2000) < np.array([2000, 5, 0, 1999, 1000, 3])[:, None]
        _isa.load(level).group_norm_half(xl, yl, 6, 8, 2000, 4, True, w, b, 1e-5, stats,
                                         False, mask, True, half_kind(dt), 2)
        for n, k in enumerate(mask.sum(axis=1)):
            if k:
                ref = _gn_ref(x[n:n + 1].reshape(1, 8, -1)[..., :k].astype(np.float64), 4, w, b)
                check_half(yl[n].reshape(-1, 8)[:k], np.moveaxis(ref, 1, -1)[0], dt)
            assert not yl[n].reshape(-1, 8)[k:].astype(np.float32).any()
    # channels-last and masked input: the same results within one ulp
    yl = cynorm.group_norm(np.ascontiguousarray(np.moveaxis(x, 1, -1)), 4, w, b, axis=-1)
    assert ulps16(np.moveaxis(yl, -1, 1), y1).max() <= 1
    x3 = x.reshape(6, 8, -1)
    lengths = np.array([2000, 1, 0, 700, 2000, 1999])
    x3l = np.ascontiguousarray(np.moveaxis(x3, 1, -1))
    for out in (None, np.ones_like(x3)):   # padding written as 0 over what out held
        ym = cynorm.group_norm(x3, 4, w, b, lengths=lengths, out=out)
        yml = cynorm.group_norm(x3l, 4, w, b, axis=-1, lengths=lengths,
                                out=None if out is None else np.ones_like(x3l))
        for n, k in enumerate(lengths):
            if k:
                ref = _gn_ref(x3[n:n + 1, :, :k].astype(np.float64), 4, w, b)
                check_half(ym[n:n + 1, :, :k], ref, dt)
                check_half(yml[n:n + 1, :k], np.moveaxis(ref, 1, -1), dt)
            assert not ym[n, :, k:].astype(np.float32).any()
            assert not yml[n, k:].astype(np.float32).any()


@pytest.mark.parametrize("name", HALVES)
def test_group_norm_nan_inf_and_huge(rng, name):
    dt = half_dtype(name)
    big = 6.0e4 if name == "float16" else 1e37
    x = (big + big * 1e-2 * rng.standard_normal((3, 4, 50))).astype(dt)
    y = cynorm.group_norm(x, 2)
    assert np.isfinite(y.astype(np.float32)).all()   # a finite result from huge inputs
    check_half(y, _gn_ref(x.astype(np.float64), 2), dt)
    x = half_data(rng, (3, 4, 50), dt, offset_sigmas=3)
    x[1, 0, 7] = np.nan
    x[2, 3, 9] = np.inf
    yf = cynorm.group_norm(x, 2).astype(np.float32)
    yl = cynorm.group_norm(np.ascontiguousarray(np.moveaxis(x, 1, -1)), 2, axis=-1)
    for y in (yf, np.moveaxis(yl, -1, 1).astype(np.float32)):
        assert np.isnan(y[1, :2]).all() and np.isnan(y[2, 2:]).all()
        assert np.isfinite(y[0]).all() and np.isfinite(y[1, 2:]).all()
        assert np.isfinite(y[2, :2]).all()


@pytest.mark.parametrize("name", HALVES)
@pytest.mark.parametrize("C, S", [(40, 700), (24, 37), (64, 3136), (8, 16)])
def test_group_norm_channels_last_rows_widened_in_registers(rng, name, C, S):
    """Channels-last 16-bit rows are widened in registers as the float64 sweep sums them (the
    last columns of a row under a mask, the rows left over one at a time): the output within
    one ulp, and the statistics those of the channels-first path to float64's precision, for
    data far from zero, around zero, near the top of the range, and with a constant first
    block.  A mean only good to float32's precision (some 1e-9 of the standard deviation)
    would fail the mean's bound, and the one-ulp bound of outputs next to it."""
    dt = half_dtype(name)
    G = C // 8
    top = 6.0e4 if name == "float16" else 1e37
    cases = [half_data(rng, (3, C, S), dt, offset_sigmas=300),
             (1e-3 * rng.standard_normal((3, C, S))).astype(np.float32).astype(dt),
             (top / 4 * rng.uniform(-1, 1, (3, C, S))).astype(np.float32).astype(dt)]
    x = (top / 8 * rng.standard_normal((3, C, S))).astype(np.float32).astype(dt)
    x[:, :, :16] = 2.0 ** -10
    cases.append(x)
    for x in cases:
        x64 = x.astype(np.float64)
        assert np.isfinite(x64).all()
        xg = x64.reshape(3, G, -1)
        _, mean, rstd = cynorm.group_norm(x, G, return_stats=True)
        xl = np.ascontiguousarray(np.moveaxis(x, 1, -1))
        for T in (1, 2):
            with cynorm.num_threads(T):
                yl, mean_l, rstd_l = cynorm.group_norm(xl, G, axis=-1, return_stats=True)
            check_half(yl, np.moveaxis(_gn_ref(x64, G), 1, -1), dt)
            np.testing.assert_allclose(mean_l, xg.mean(axis=2), rtol=1e-14,
                                       atol=1e-13 * xg.std(axis=2).min())
            np.testing.assert_allclose(mean_l, mean, rtol=1e-14,
                                       atol=1e-13 * xg.std(axis=2).min())
            np.testing.assert_allclose(rstd_l, rstd, rtol=1e-12)
    lengths = np.array([S, S // 2 + 1, 0])   # masked rows are not summed
    yl = cynorm.group_norm(xl, G, axis=-1, lengths=lengths)
    for n, k in enumerate(lengths):
        if k:
            ref = np.moveaxis(_gn_ref(x64[n:n + 1, :, :k], G), 1, -1)
            check_half(yl[n:n + 1, :k], ref, dt)
        assert not yl[n, k:].astype(np.float32).any()


@pytest.mark.parametrize("name", HALVES)
def test_group_norm_element_equal_to_the_mean_gives_zero(rng, name):
    dt = half_dtype(name)
    x = half_data(rng, (3, 4, 30), dt, offset_sigmas=300)
    x[1, 2:] = 512.0   # sample 1's group 1: 512 but for 516 and 508 (exact in both dtypes)
    x[1, 2, 0] = 516.0
    x[1, 3, 5] = 508.0
    y = cynorm.group_norm(x, 2)
    assert float(y[1, 2, 1]) == 0.0 and not y[1, 3, 6:].astype(np.float32).any()
    y = np.moveaxis(cynorm.group_norm(np.ascontiguousarray(np.moveaxis(x, 1, -1)), 2, axis=-1),
                    -1, 1)
    assert float(y[1, 2, 1]) == 0.0 and not y[1, 3, 6:].astype(np.float32).any()


def test_group_norm_mean_merged_from_channels_keeps_zero():
    """A group's mean merged from its channels' means rounds at some 2^-53 of their spread:
    an element equal to the exact mean must still give 0, not that rounding times rstd.  These
    fixed draws (bfloat16, (8, 6, 20), 3 groups) each hold such an element, and gave
    1e-17-sized outputs there before the second term of the mean below 2^-50 of the standard
    deviation was taken as noise."""
    dt = bfloat16_or_skip()
    for seed in (92, 100, 211, 235):
        x = half_data(np.random.default_rng(seed), (8, 6, 20), dt, offset_sigmas=20)
        x64 = x.astype(np.float64)
        xg = x64.reshape(8, 3, 40)
        assert (xg == xg.mean(axis=2, keepdims=True)).any()   # the case this is about
        check_half(cynorm.group_norm(x, 3), _gn_ref(x64, 3), dt)


@pytest.mark.parametrize("name", HALVES)
def test_torch_group_norm_half_tensors_under_autograd(rng, torch, name):
    import cynorm.torch as ct

    dt = half_dtype(name)
    tdt = getattr(torch, name)
    x0 = torch.from_numpy(50 + 3 * rng.standard_normal((4, 8, 60)).astype(np.float32))
    x = x0.to(tdt).requires_grad_()
    xt = x0.to(tdt).requires_grad_()
    w = torch.from_numpy(rng.uniform(0.5, 2, 8).astype(np.float32)).to(tdt).requires_grad_()
    wt = w.detach().clone().requires_grad_()
    y = ct.group_norm(x, 4, w, None)
    yt = torch.nn.functional.group_norm(xt, 4, wt, None)
    assert y.dtype == tdt
    ref = _gn_ref(x.detach().float().numpy().astype(np.float64), 4,
                  w.detach().float().numpy())
    check_half(y.detach().view(torch.int16).numpy().view(dt), ref, dt)
    ulp = torch.finfo(tdt).eps * torch.from_numpy(ref).abs().clamp(min=1.0)
    assert ((yt.double() - torch.from_numpy(ref)).abs() <= 4 * ulp).all()
    same_gradients_as_torch(torch, (y, x, w), (yt, xt, wt), 40)
