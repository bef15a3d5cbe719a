"""cynorm.torch: cynorm's kernels under torch autograd."""
import subprocess
import sys

import numpy as np
import pytest


@pytest.fixture(scope="module")
def ct(torch):
    import cynorm.torch

    return cynorm.torch


def test_import_cynorm_does_not_import_torch():
    code = "import sys, cynorm; cynorm.layer_norm([[1.0, 2.0]], 2); print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_gradcheck(torch, ct):
    torch.manual_seed(0)
    opts = {"dtype": torch.float64, "requires_grad": True}
    x, w, b = torch.randn(6, 5, **opts), torch.randn(5, **opts), torch.randn(5, **opts)
    assert torch.autograd.gradcheck(lambda x, w, b: ct.layer_norm(x, 5, w, b), (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w, b: ct.batch_norm(x, None, None, w, b, True),
                                    (x, w, b))
    x3 = torch.randn(4, 5, 7, **opts)
    assert torch.autograd.gradcheck(lambda x, w, b: ct.batch_norm(x, None, None, w, b, True),
                                    (x3, w, b))


def _step_both(torch, theirs, ours, x):
    """One forward and backward of both modules on x: outputs and gradients must agree."""
    for m in (theirs, ours):
        m.zero_grad()
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = theirs(xa), ours(xb)
    torch.testing.assert_close(yb, ya, atol=2e-5, rtol=1e-5)
    g = torch.randn(*x.shape)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(xb.grad, xa.grad, atol=2e-5, rtol=1e-4)
    for name in ("weight", "bias"):
        a, b = getattr(theirs, name, None), getattr(ours, name, None)   # RMSNorm: no bias
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(b.grad, a.grad, atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("name,shape", [("LayerNorm", (16, 10)), ("BatchNorm1d", (16, 10)),
                                        ("BatchNorm1d", (8, 10, 30)),
                                        ("BatchNorm2d", (4, 10, 5, 6)),
                                        ("BatchNorm3d", (2, 10, 3, 4, 5))])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("bias", [True, False])
def test_modules_are_drop_in(torch, ct, name, shape, momentum, bias):
    torch.manual_seed(1)
    kwargs = {"bias": bias} if name == "LayerNorm" else {"momentum": momentum, "bias": bias}
    theirs = getattr(torch.nn, name)(10, **kwargs)
    ours = getattr(ct, name)(10, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    for step in range(3):
        _step_both(torch, theirs, ours, torch.randn(*shape) * 2 + step)
    for (k, a), b in zip(theirs.state_dict().items(), ours.state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5, msg=k)
    # frozen statistics: eval, forward and backward (the running statistics are constants)
    theirs.eval()
    ours.eval()
    _step_both(torch, theirs, ours, torch.randn(*shape) * 3 - 1)
    if name != "LayerNorm":  # an empty batch in training: counted, statistics unchanged
        theirs.train()
        ours.train()
        _step_both(torch, theirs, ours, torch.randn(0, *shape[1:]))
        for (k, a), b in zip(theirs.state_dict().items(), ours.state_dict().values()):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5, msg=k)


def test_float16_batch_norm_module(torch, ct):
    torch.manual_seed(4)
    theirs = torch.nn.BatchNorm1d(5, dtype=torch.float16)
    ours = ct.BatchNorm1d(5, dtype=torch.float16)
    for _ in range(3):
        x = (torch.randn(32, 5) * 2 + 3).half()
        torch.testing.assert_close(ours(x), theirs(x), atol=4e-3, rtol=2e-3)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, atol=1e-3, rtol=2e-3)
    torch.testing.assert_close(ours.running_var, theirs.running_var, atol=1e-3, rtol=2e-3)


def test_a_model_trains_the_same(torch, ct):
    torch.manual_seed(2)

    def model(norm):
        torch.manual_seed(3)
        return torch.nn.Sequential(torch.nn.Linear(6, 16), norm(16), torch.nn.ReLU(),
                                   torch.nn.Linear(16, 1))

    a, b = model(torch.nn.LayerNorm), model(ct.LayerNorm)
    x, y = torch.randn(64, 6), torch.randn(64, 1)
    for m in (a, b):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        for _ in range(20):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(m(x), y)
            loss.backward()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pb, pa, atol=1e-4, rtol=1e-4)


def test_unsupported_tensors(torch, ct):
    for dt in (torch.int32, torch.complex64, torch.bool):
        with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64 tensors"):
            ct.layer_norm(torch.ones(2, 3, dtype=dt), 3)
    x = np.ones((2, 3), np.float32)
    y = ct.layer_norm(torch.from_numpy(x), 3)
    assert y.dtype == torch.float32


def test_gradcheck_rms_norm_and_the_residual_forms(torch, ct):
    torch.manual_seed(5)
    opts = {"dtype": torch.float64, "requires_grad": True}
    x, r = torch.randn(6, 5, **opts), torch.randn(6, 5, **opts)
    w, b = torch.randn(5, **opts), torch.randn(5, **opts)
    assert torch.autograd.gradcheck(lambda x, w: ct.rms_norm(x, 5, w, 1e-3), (x, w))
    assert torch.autograd.gradcheck(lambda x: ct.rms_norm(x, (6, 5)), (x,))
    # both outputs differentiable, in x, residual and the parameters
    assert torch.autograd.gradcheck(lambda x, r, w, b: ct.add_layer_norm(x, r, 5, w, b),
                                    (x, r, w, b))
    assert torch.autograd.gradcheck(lambda x, r, w: ct.add_rms_norm(x, r, 5, w, 1e-3),
                                    (x, r, w))
    # only y used downstream: h's gradient arrives as zeros
    assert torch.autograd.gradcheck(lambda x, r: ct.add_rms_norm(x, r, 5)[0], (x, r))


def test_residual_forms_equal_torch_unfused(torch, ct):
    torch.manual_seed(6)
    x, r = torch.randn(8, 3, 32) * 2 + 1, torch.randn(8, 3, 32)
    w, b = torch.rand(32) + 0.5, torch.randn(32)
    h = x + r
    y, h2 = ct.add_layer_norm(x, r, 32, w, b)
    torch.testing.assert_close(h2, h, rtol=0, atol=0)
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(h, (32,), w, b))
    y, h2 = ct.add_rms_norm(x, r, 32, w)
    torch.testing.assert_close(h2, h, rtol=0, atol=0)
    torch.testing.assert_close(y, torch.nn.functional.rms_norm(h, (32,), w))


@pytest.mark.parametrize("eps", [None, 1e-4])
def test_rms_norm_module_is_drop_in(torch, ct, eps):
    torch.manual_seed(7)
    theirs = torch.nn.RMSNorm((4, 10), eps=eps)
    ours = ct.RMSNorm((4, 10), eps=eps)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 2)
    ours.load_state_dict(theirs.state_dict())
    assert isinstance(ours, torch.nn.RMSNorm)
    for step in range(2):
        _step_both(torch, theirs, ours, torch.randn(6, 4, 10) * 2 + step)


def test_gradcheck_group_and_instance_norm(torch, ct):
    torch.manual_seed(3)
    opts = {"dtype": torch.float64, "requires_grad": True}
    x, w, b = torch.randn(3, 6, 5, **opts), torch.randn(6, **opts), torch.randn(6, **opts)
    assert torch.autograd.gradcheck(lambda x, w, b: ct.group_norm(x, 3, w, b), (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w, b: ct.instance_norm(x, weight=w, bias=b),
                                    (x, w, b))
    rm, rv = torch.randn(6, dtype=torch.float64), torch.rand(6, dtype=torch.float64) + 0.5
    assert torch.autograd.gradcheck(
        lambda x, w, b: ct.instance_norm(x, rm, rv, w, b, use_input_stats=False), (x, w, b))
    # channels_last tensors are read as they lie, and the result keeps their layout
    x4 = torch.randn(2, 6, 4, 3, **opts).contiguous(memory_format=torch.channels_last)
    assert torch.autograd.gradcheck(lambda x, w, b: ct.group_norm(x, 2, w, b), (x4, w, b))
    y = ct.group_norm(x4, 2, w, b)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, torch.nn.functional.group_norm(x4, 2, w, b))


@pytest.mark.parametrize("name,shape,kwargs", [
    ("GroupNorm", (4, 12, 7), {"num_groups": 3}),
    ("GroupNorm", (2, 12, 5, 6), {"num_groups": 4, "affine": False}),
    ("InstanceNorm1d", (4, 12, 9), {"affine": True, "track_running_stats": True}),
    ("InstanceNorm1d", (12, 9), {"affine": True}),
    ("InstanceNorm2d", (2, 12, 5, 6), {"track_running_stats": True, "momentum": None}),
    ("InstanceNorm3d", (2, 12, 3, 4, 5), {"affine": True, "bias": False}),
])
def test_group_and_instance_modules_are_drop_in(torch, ct, name, shape, kwargs):
    torch.manual_seed(4)
    kwargs = dict(kwargs)
    args = (kwargs.pop("num_groups"), 12) if name == "GroupNorm" else (12,)
    theirs = getattr(torch.nn, name)(*args, **kwargs)
    ours = getattr(ct, name)(*args, **kwargs)
    assert isinstance(ours, getattr(torch.nn, name))
    if getattr(theirs, "weight", None) is not None:
        with torch.no_grad():
            theirs.weight.uniform_(0.5, 2)
    ours.load_state_dict(theirs.state_dict())
    for step in range(3):
        _step_both(torch, theirs, ours, torch.randn(*shape) * 2 + step)
    for (k, a), b in zip(theirs.state_dict().items(), ours.state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5, msg=k)
    theirs.eval()
    ours.eval()
    _step_both(torch, theirs, ours, torch.randn(*shape) * 3 - 1)
