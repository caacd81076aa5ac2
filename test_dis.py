"""Tests for DiS.py, train.py and sample.py. Run: pytest test_dis.py  (about 5 minutes on a 2-core CPU).
Under DIS_CI=1 a test that would skip for a missing optional package fails instead (CUDA and mamba-ssm excepted)."""
import gzip
import importlib
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import time
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

if not torch.cuda.is_available():
    # The Triton scan runs on a CPU only in Triton's interpreter, which must be on before triton is first
    # imported (importing DiS imports torch.utils.checkpoint, which imports triton) and stay on while
    # kernels run. Nothing else in these tests uses Triton on a CPU (torch.compile's CPU code is C++).
    os.environ.setdefault("TRITON_INTERPRET", "1")
import DiS  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CI = os.environ.get("DIS_CI") == "1"


def need(module):
    """Import an optional test dependency: skip without it, except on CI, where it must be installed."""
    if CI:
        return __import__(module)
    return pytest.importorskip(module)


#################################################################################
#                                 Selective scan                                #
#################################################################################

def naive_scan(u, delta, A, B, C, D, z, delta_bias, softplus):
    """The recurrence written out element by element in float64: the ground truth."""
    b, d, l = u.shape
    out = torch.zeros(b, d, l, dtype=torch.float64)
    for i in range(b):
        for j in range(d):
            h = torch.zeros(A.shape[1], dtype=torch.float64)
            for t in range(l):
                dt = delta[i, j, t] + (delta_bias[j] if delta_bias is not None else 0)
                dt = torch.log1p(torch.exp(dt)) if softplus else dt
                h = torch.exp(dt * A[j]) * h + dt * B[i, :, t] * u[i, j, t]
                y = (h * C[i, :, t]).sum() + (D[j] * u[i, j, t] if D is not None else 0)
                out[i, j, t] = y * (z[i, j, t] * torch.sigmoid(z[i, j, t]) if z is not None else 1)
    return out


def scan_inputs(b, d, l, n, dtype=torch.float64, seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)
    t = dict(u=r(b, d, l), delta=r(b, d, l) * 0.5, A=-torch.rand(d, n, generator=g, dtype=torch.float64).to(dtype) * 3,
             B=r(b, n, l), C=r(b, n, l), D=r(d), z=r(b, d, l), delta_bias=r(d) * 0.3)
    return {k: v.requires_grad_(requires_grad) for k, v in t.items()}


SCANS = {"ref": DiS.selective_scan_ref, "lean": DiS.selective_scan_lean,
         "lean_chunk3": lambda *a, **k: DiS.selective_scan_lean(*a, chunk=3, keep_states=False, **k),
         "lean_chunk3_kept": lambda *a, **k: DiS.selective_scan_lean(*a, chunk=3, keep_states=True, **k),
         "lean_chunk64": lambda *a, **k: DiS.selective_scan_lean(*a, chunk=64, keep_states=False, **k),
         "small": DiS.selective_scan_small}


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 1, 4), (2, 3, 7, 4), (1, 2, 20, 3), (2, 4, 9, 4)])
@pytest.mark.parametrize("name", list(SCANS) + ["lean_matmul"])
@pytest.mark.parametrize("extras", ["all", "none"])
def test_scan_equals_naive_float64_recurrence(shape, name, extras):
    x = scan_inputs(*shape)
    if extras == "none":
        x["D"] = x["z"] = x["delta_bias"] = None
    softplus = extras == "all"
    scan = (lambda *a, **k: DiS.selective_scan_lean(*a, chunk=3, matmul=True, **k)) if name == "lean_matmul" \
        else SCANS[name]   # lean_matmul: the CUDA form of the lean scan's contractions, on CPU
    out = scan(x["u"], x["delta"], x["A"], x["B"], x["C"], D=x["D"], z=x["z"],
                      delta_bias=x["delta_bias"], delta_softplus=softplus)
    expected = naive_scan(*(x[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")), softplus)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    leaves = [v for v in x.values() if v is not None]
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, g)
    want = torch.autograd.grad(expected, leaves, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_reference_scan_can_be_copied_alone():
    """selective_scan_ref pasted into a file that imports only torch, F and einops runs and is right."""
    import inspect
    src = ("import torch\nimport torch.nn.functional as F\nfrom einops import rearrange\n\n\n"
           + inspect.getsource(DiS.selective_scan_ref))
    namespace = {}
    exec(compile(src, "copied.py", "exec"), namespace)
    x = scan_inputs(2, 3, 6, 4, requires_grad=False)
    args = [x[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    torch.testing.assert_close(namespace["selective_scan_ref"](*args, delta_softplus=True),
                               naive_scan(*args, True), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("chunk,l", [(1, 5), (3, 7), (8, 8), (4, 1)])
@pytest.mark.parametrize("matmul,keep_states", [(False, False), (True, False), (False, True)])
def test_lean_scan_gradcheck(chunk, l, matmul, keep_states):
    x = scan_inputs(2, 3, l, 2)
    fn = lambda *a: DiS.selective_scan_lean(*a[:5], D=a[5], z=a[6], delta_bias=a[7], delta_softplus=True,
                                            chunk=chunk, matmul=matmul, keep_states=keep_states)
    assert torch.autograd.gradcheck(fn, tuple(x.values()))   # matmul: the CUDA form, on CPU


def test_lean_scan_keeps_states_only_when_they_are_small(monkeypatch):
    """keep_states' default: the (l, b, d_inner, n) tensors are saved below KEEP_STATES_MB, not above; a
    kept scan's graph can be run backward twice (its backward writes into no saved tensor). The small-scan
    path is switched off, so that these sizes run the chunked lean scan."""
    monkeypatch.setattr(DiS, "SMALL_SCAN_MB", 0)
    x = scan_inputs(2, 4, 6, 3, dtype=torch.float32)
    args = [x[k] for k in ("u", "delta", "A", "B", "C")]
    kw = dict(D=x["D"], z=x["z"], delta_bias=x["delta_bias"], delta_softplus=True)

    def saved_shapes():
        shapes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
            out = DiS.selective_scan_lean(*args, **kw)
        return out, shapes
    monkeypatch.setattr(DiS, "KEEP_STATES_MB", 1)      # 3 x 6*2*4*3 floats = 0.0008 MB: kept
    out, shapes = saved_shapes()
    assert (6, 2, 4, 3) in shapes
    first = torch.autograd.grad(out.sum(), args, retain_graph=True)
    for a, b in zip(torch.autograd.grad(out.sum(), args), first):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    monkeypatch.setattr(DiS, "KEEP_STATES_MB", 0.0005)  # below: only the chunk start states
    out, shapes = saved_shapes()
    assert (6, 2, 4, 3) not in shapes and (1, 2, 4, 3) in shapes
    for a, b in zip(torch.autograd.grad(out.sum(), args), first):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def scan_path(out):
    """Which scan made out: "small" or "lean" (the name of its autograd function)."""
    return {"_SmallScanBackward": "small", "_LeanScanBackward": "lean"}[type(out.grad_fn).__name__]


@pytest.mark.parametrize("l", [1, 2, 17, 18, 19])
def test_small_scan_equals_reference_around_its_threshold(monkeypatch, l):
    """selective_scan_lean's default on a CPU: the whole-sequence scan up to SMALL_SCAN_MB (here set so that
    l = 18 is the last length that fits), the chunked lean scan above; either way the output and every
    gradient equal selective_scan_ref's in float64, with and without D, z, delta_bias and softplus."""
    b, d, n = 2, 3, 4
    monkeypatch.setattr(DiS, "SMALL_SCAN_MB", 2 * 4 * b * d * 18 * n / 2 ** 20)
    for D, z, bias, softplus in itertools.product([True, False], repeat=4):
        x = scan_inputs(b, d, l, n, seed=l)
        if not softplus:   # dt = delta itself: keep it positive, as softplus would
            x["delta"] = x["delta"].detach().abs().requires_grad_()
        for name, keep in (("D", D), ("z", z), ("delta_bias", bias)):
            x[name] = x[name] if keep else None
        args = [x[k] for k in ("u", "delta", "A", "B", "C")]
        kw = dict(D=x["D"], z=x["z"], delta_bias=x["delta_bias"], delta_softplus=softplus)
        out = DiS.selective_scan_lean(*args, **kw)
        assert scan_path(out) == ("small" if l <= 18 else "lean")
        expected = DiS.selective_scan_ref(*args, **kw)
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
        leaves = [v for v in x.values() if v is not None]
        g = torch.randn_like(out)
        for a, b_ in zip(torch.autograd.grad(out, leaves, g), torch.autograd.grad(expected, leaves, g)):
            torch.testing.assert_close(a, b_, rtol=1e-9, atol=1e-10)


def test_small_scan_is_chosen_by_size_device_and_arguments(monkeypatch):
    """The whole-sequence scan runs for the CPU quickstart's scan (b 64, d_inner 192, l 18, n 4), not when
    its kept states exceed SMALL_SCAN_MB, nor when chunk, matmul or keep_states is given; on CUDA never."""
    x = scan_inputs(64, 192, 18, 4, dtype=torch.float32)
    args = [x[k] for k in ("u", "delta", "A", "B", "C")]
    kw = dict(D=x["D"], z=x["z"], delta_bias=x["delta_bias"], delta_softplus=True)
    assert DiS.small_scan_suits(x["u"], x["A"])
    assert scan_path(DiS.selective_scan(*args, **kw)) == "small"   # "auto" on a CPU
    for given in (dict(chunk=8), dict(matmul=False), dict(keep_states=True)):
        assert scan_path(DiS.selective_scan_lean(*args, **given, **kw)) == "lean"
    monkeypatch.setattr(DiS, "SMALL_SCAN_MB", 2 * 4 * x["u"].numel() * 4 / 2 ** 20 - 0.01)   # just too small
    assert scan_path(DiS.selective_scan(*args, **kw)) == "lean"
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        assert not DiS.small_scan_suits(torch.empty(1, 2, 3, device="cuda"), torch.empty(2, 4, device="cuda"))


def test_small_scan_backward_twice_and_without_grad():
    """Its backward writes into no saved tensor (a graph can be run backward twice), and without autograd
    it returns the same output."""
    x = scan_inputs(2, 4, 6, 3)
    args = [x[k] for k in ("u", "delta", "A", "B", "C")]
    kw = dict(D=x["D"], z=x["z"], delta_bias=x["delta_bias"], delta_softplus=True)
    out = DiS.selective_scan_small(*args, **kw)
    first = torch.autograd.grad(out.sum(), list(x.values()), retain_graph=True)
    for a, b in zip(torch.autograd.grad(out.sum(), list(x.values())), first):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(DiS.selective_scan_small(*args, **kw), out.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("l", [1, 2, 17, 18, 19])
def test_reverse_small_scan_is_the_flipped_reference(l):
    """selective_scan_small(reverse=True), the CPU block's backward direction, equals flip(ref(flip(.))) in
    float64, output and every gradient, with and without D, z, delta_bias and softplus."""
    flip = lambda t: t.flip(-1) if t is not None else None
    for D, z, bias, softplus in itertools.product([True, False], repeat=4):
        x = scan_inputs(2, 3, l, 4, seed=l)
        if not softplus:
            x["delta"] = x["delta"].detach().abs().requires_grad_()
        for name, keep in (("D", D), ("z", z), ("delta_bias", bias)):
            x[name] = x[name] if keep else None
        out = DiS.selective_scan_small(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"],
                                       softplus, reverse=True)
        expected = flip(DiS.selective_scan_ref(flip(x["u"]), flip(x["delta"]), x["A"], flip(x["B"]), flip(x["C"]),
                                               x["D"], flip(x["z"]), x["delta_bias"], softplus))
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
        leaves = [v for v in x.values() if v is not None]
        g = torch.randn(out.shape, dtype=out.dtype)
        for a, b_ in zip(torch.autograd.grad(out, leaves, g), torch.autograd.grad(expected, leaves, g)):
            torch.testing.assert_close(a, b_, rtol=1e-9, atol=1e-10)


def block_results(monkeypatch, backend, block, hidden, residual, skip=None, seed=3):
    """Block's (mixer output, residual stream) and the gradients of hidden, residual, skip and every parameter
    under backend, for fixed output gradients (drawn with torch.randn: randn_like would copy the output's strides)."""
    monkeypatch.setattr(DiS, "SCAN_BACKEND", backend)
    inputs = [t.clone().requires_grad_() for t in (hidden, residual, skip) if t is not None]
    given = iter(inputs)
    hidden, residual, skip = (next(given) if t is not None else None for t in (hidden, residual, skip))
    torch.manual_seed(seed)   # drop-path's draws
    out, stream = block(hidden, residual, skip)
    g = torch.Generator().manual_seed(seed)
    grads = [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in (out, stream)]
    return [out, stream, *torch.autograd.grad([out, stream], inputs + list(block.parameters()), grads)]


@pytest.mark.parametrize("l", [1, 2, 17, 18, 19])
@pytest.mark.parametrize("kind", ["first", "middle", "takes_skip"])
def test_cpu_block_equals_the_readable_block(monkeypatch, l, kind):
    """"auto" on a CPU runs Block.forward's rest as cpu_block (token-major, shifted-add convs, the reverse
    small scan): in float64 its mixer output, residual stream and every gradient (hidden, residual, skip,
    every parameter) equal the readable block's with the lean and the ref scans, drop-path on (same draws)
    and off; the first block (no residual), a middle one and an out-block that merges a long skip."""
    torch.manual_seed(l)
    calls, cpu_mixer = [], DiS.cpu_mixer
    monkeypatch.setattr(DiS, "cpu_mixer", lambda *a: calls.append(1) or cpu_mixer(*a))
    for drop_prob in (0.0, 0.5):
        block = DiS.Block(16, 4, drop_prob=drop_prob, takes_skip=kind == "takes_skip", d_state=4, expand=2)
        block = block.double().train()
        with torch.no_grad():   # a non-zero skip merge and norm weight, so that every gradient is exercised
            for p in block.parameters():
                p.add_(0.1 * torch.randn_like(p)) if p.ndim == 1 else None
        hidden, residual, skip = (torch.randn(3, l, 16, dtype=torch.float64) for _ in range(3))
        args = (block, hidden, None if kind == "first" else residual, skip if kind == "takes_skip" else None)
        calls.clear()
        new = block_results(monkeypatch, "auto", *args)
        assert calls == [1]
        for backend in ("lean", "ref"):
            for a, b_ in zip(new, block_results(monkeypatch, backend, *args)):
                torch.testing.assert_close(a, b_, rtol=1e-9, atol=1e-11)
            assert calls == [1]   # forced backends keep the readable path


def test_cpu_block_is_chosen_by_backend_device_and_size(monkeypatch):
    """The hook to section 5 takes "auto" on a CPU to cpu_block, which runs cpu_mixer while the mixer's scans
    suit the small scan (small_scan_suits: the DiS-Q/8 quickstart's block does) and the readable mixer above
    that; forced "lean" and "ref" keep the readable block; on CUDA "auto" is unchanged (its own tests)."""
    calls, cpu_mixer = [], DiS.cpu_mixer
    monkeypatch.setattr(DiS, "cpu_mixer", lambda *a: calls.append(a[1].shape) or cpu_mixer(*a))
    x = torch.zeros(64, 18, 192)
    for backend, taken in (("auto", True), ("lean", False), ("ref", False)):
        monkeypatch.setattr(DiS, "SCAN_BACKEND", backend)
        assert DiS.fused_path_runs(x) == taken
        assert not DiS.fused_path_runs(x, backend)   # selective_scan's question: a scan alone is never Triton's
    monkeypatch.setattr(DiS, "SCAN_BACKEND", "auto")
    block = DiS.Block(192, 6, d_state=4, expand=1)
    with torch.no_grad():
        block(x, x)
    assert calls == [(64, 18, 192)]
    b, d_inner, l, n = 64, 192, 18, 4
    monkeypatch.setattr(DiS, "SMALL_SCAN_MB", 2 * 4 * b * d_inner * l * n / 2 ** 20 - 0.01)   # just too small
    with torch.no_grad():
        out, _ = block(x, x)
    assert len(calls) == 1 and out.is_contiguous()   # the readable mixer's output
    monkeypatch.setattr(DiS, "SMALL_SCAN_MB", 2 * 4 * b * d_inner * l * n / 2 ** 20)            # just fits
    with torch.no_grad():
        block(x, x)
    assert len(calls) == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_variants_equal_default_and_keep_dtype(dtype):
    x = scan_inputs(2, 16, 37, 8, dtype=dtype)
    outs, grads = [], []
    for fn in SCANS.values():
        out = fn(x["u"], x["delta"], x["A"].float(), x["B"], x["C"], D=x["D"].float(), z=x["z"],
                 delta_bias=x["delta_bias"].float(), delta_softplus=True)
        assert out.dtype == dtype
        outs.append(out.float())
        grads.append(torch.autograd.grad(out.float().sum(), [x["u"], x["delta"], x["B"], x["C"], x["z"]]))
    # every path computes in float32, so they agree far better than the input precision
    for o, g in zip(outs[1:], grads[1:]):
        torch.testing.assert_close(o, outs[0], rtol=1e-2 if dtype != torch.float32 else 1e-5, atol=1e-4)
        for a, b in zip(g, grads[0]):
            assert a.dtype == dtype
            torch.testing.assert_close(a.float(), b.float(), rtol=2e-2 if dtype != torch.float32 else 1e-4, atol=1e-3)


def test_every_scan_computes_in_float32_under_autocast():
    x = scan_inputs(2, 16, 20, 8, dtype=torch.float32, requires_grad=False)
    args = (x["u"], x["delta"], x["A"], x["B"], x["C"])
    kw = dict(D=x["D"], z=x["z"], delta_bias=x["delta_bias"], delta_softplus=True)
    plain = DiS.selective_scan_ref(*args, **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for fn in SCANS.values():
            torch.testing.assert_close(fn(*args, **kw), plain, rtol=1e-5, atol=1e-5)


def test_scan_dispatch_uses_kernel_only_when_usable(monkeypatch):
    calls = []

    def stand_in(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
        calls.append(u.shape)
        return DiS.selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    monkeypatch.setattr(DiS, "mamba_selective_scan_fn", stand_in)
    x = scan_inputs(1, 4, 5, 3, dtype=torch.float32, requires_grad=False)
    args = (x["u"], x["delta"], x["A"], x["B"], x["C"])
    kw = dict(D=x["D"], z=x["z"], delta_bias=x["delta_bias"], delta_softplus=True)
    assert not DiS.mamba_kernel_usable(*args, kw["D"], kw["z"], kw["delta_bias"])   # CPU tensors: not the kernel's
    DiS.selective_scan(*args, **kw)
    assert calls == []
    # from here on, pretend the tensors are on CUDA (fake CUDA tensors of the same dtypes and strides), so
    # that the kernel's other conditions still apply
    from torch._subclasses.fake_tensor import FakeTensorMode

    def on_cuda(*tensors):
        with FakeTensorMode():
            return [None if x is None else torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="cuda")
                    for x in tensors]
    usable = DiS.mamba_kernel_usable
    assert usable(*on_cuda(*args, kw["D"], kw["z"], kw["delta_bias"]))
    monkeypatch.setattr(DiS, "mamba_kernel_usable", lambda *a: usable(*on_cuda(*a)))
    DiS.selective_scan(*args, **kw)
    assert len(calls) == 1                                            # auto: the kernel
    DiS.selective_scan(*args, backend="lean", **kw)
    assert len(calls) == 1                                            # forced PyTorch
    x64 = scan_inputs(1, 4, 5, 3, requires_grad=False)
    DiS.selective_scan(x64["u"], x64["delta"], x64["A"].float(), x64["B"], x64["C"], delta_softplus=True)
    assert len(calls) == 1                                            # float64 input: PyTorch
    u_strided = x["u"].transpose(1, 2).contiguous().transpose(1, 2)  # same values, last dim not contiguous
    DiS.selective_scan(u_strided, *args[1:], **kw)
    assert len(calls) == 1
    with pytest.raises(RuntimeError, match="mamba_ssm"):
        DiS.selective_scan(x64["u"], x64["delta"], x64["A"], x64["B"], x64["C"], backend="mamba_ssm")
    monkeypatch.setattr(DiS, "SCAN_BACKEND", "lean")
    DiS.selective_scan(*args, **kw)
    assert len(calls) == 1                                            # the module switch
    monkeypatch.setattr(DiS, "mamba_selective_scan_fn", None)
    with pytest.raises(RuntimeError, match="not installed"):
        DiS.selective_scan(*args, backend="mamba_ssm", **kw)
    with pytest.raises(ValueError, match="'triton'"):
        DiS.selective_scan(*args, backend="cuda", **kw)


def fake_cuda(*shape, index=0):
    """A fake CUDA tensor (no GPU needed): enough for code that only looks at a tensor's device."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        return torch.empty(shape, device=f"cuda:{index}")


@pytest.fixture
def auto_fresh(monkeypatch):
    """No device checked yet, SCAN_BACKEND "auto", no mamba-ssm; returns the list of devices the check ran on
    once a test replaces the check with calls.fake."""
    monkeypatch.setattr(DiS, "_AUTO_VERDICT", {})
    monkeypatch.setattr(DiS, "SCAN_BACKEND", "auto")
    monkeypatch.setattr(DiS, "mamba_selective_scan_fn", None)
    calls = []
    return calls


def test_auto_on_cuda_takes_the_fused_path_once_its_check_passes(monkeypatch, auto_fresh):
    import warnings
    monkeypatch.setattr(DiS, "fused_first_use_check", lambda device: auto_fresh.append(device) or "checked on fake")
    x0, x1 = fake_cuda(2, 3), fake_cuda(2, 3, index=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # a passing check says nothing
        assert DiS.fused_path_runs(x0) and DiS.fused_path_runs(x0) and DiS.fused_path_runs(x1)
    assert auto_fresh == [torch.device("cuda", 0), torch.device("cuda", 1)]   # once per device
    assert DiS.resolve_auto(torch.device("cuda", 0)) == ("fused", "checked on fake")
    for forced in ("lean", "ref", "triton", "mamba_ssm"):   # a forced backend never runs the check
        monkeypatch.setattr(DiS, "SCAN_BACKEND", forced)
        assert not DiS.fused_path_runs(fake_cuda(2, 3, index=2))
    monkeypatch.setattr(DiS, "SCAN_BACKEND", "fused")
    assert DiS.fused_path_runs(fake_cuda(2, 3, index=2)) and DiS.fused_path_runs(torch.zeros(1))
    assert len(auto_fresh) == 2
    monkeypatch.setattr(DiS, "SCAN_BACKEND", "auto")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)   # a trace only reads verdicts
    assert DiS.fused_path_runs(x1) and not DiS.fused_path_runs(fake_cuda(2, 3, index=3))
    assert len(auto_fresh) == 2


@pytest.mark.parametrize("failure", ["no triton", "raises", "mismatch"])
def test_auto_keeps_the_pytorch_path_with_one_warning_when_the_check_fails(monkeypatch, auto_fresh, failure):
    if failure == "no triton":
        def no_triton(backend):
            raise RuntimeError("scan backend 'fused' needs scan_triton.py beside DiS.py and Triton (No module named "
                               "'triton')")
        monkeypatch.setattr(DiS, "triton_module", no_triton)
    else:
        def check(device):
            auto_fresh.append(device)
            if failure == "raises":
                raise RuntimeError("PTX .version 8.7 does not support .target sm_120")
            raise RuntimeError("the fused grad hidden differs from lean by 0.9 of its scale (tolerance 0.1)")
        monkeypatch.setattr(DiS, "fused_first_use_check", check)
    x = fake_cuda(2, 3)
    with pytest.warns(UserWarning) as caught:
        assert not DiS.fused_path_runs(x) and not DiS.fused_path_runs(x)
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    backend, reason = DiS.resolve_auto(torch.device("cuda", 0))
    expected = {"no triton": "No module named 'triton'", "raises": "sm_120", "mismatch": "differs from lean"}[failure]
    assert backend == "lean" and expected in reason and expected in str(caught[0].message)
    assert len(auto_fresh) == (failure != "no triton")
    monkeypatch.setattr(DiS, "mamba_selective_scan_fn", object())   # with mamba-ssm installed: its kernel instead
    monkeypatch.setattr(DiS, "_AUTO_VERDICT", {})
    with pytest.warns(UserWarning, match="running mamba_ssm instead"):
        assert DiS.resolve_auto(torch.device("cuda", 0))[0] == "mamba_ssm"


def test_auto_off_cuda_is_the_lean_scan_without_a_check(monkeypatch, auto_fresh):
    """Off CUDA, "auto" runs no check and no Triton: the PyTorch scans, and on a CPU the blocks' hook goes to
    cpu_block (plain PyTorch; test_cpu_block_*)."""
    import warnings
    monkeypatch.setattr(DiS, "fused_first_use_check", lambda device: auto_fresh.append(device))
    monkeypatch.setattr(DiS, "triton_module", lambda backend: pytest.fail("Triton was imported"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert DiS.fused_path_runs(torch.zeros(2, 3))   # cpu_block
        DiS.Block(8, 1)(torch.randn(2, 3, 8), None)
        assert DiS.resolve_auto("cpu") == ("lean", "PyTorch on cpu, small blocks token-major")
    assert auto_fresh == []
    from dis_cli import set_scan_backend
    assert set_scan_backend("auto", torch.device("cpu")) == "scan backend: lean (auto: PyTorch on cpu, small blocks token-major)"
    assert set_scan_backend("ref", torch.device("cpu")) == "scan backend: ref (--scan-backend ref)"


def test_ref_backend_runs_the_model_on_section_1_alone(monkeypatch):
    """SCAN_BACKEND = "ref": the model's scans are selective_scan_ref itself (nothing of section 5 runs), and
    the model's output and gradients equal those with the lean scan."""
    m, x, t, y = conditional_model_and_batch()
    results = []
    for backend in ("lean", "ref"):
        monkeypatch.setattr(DiS, "SCAN_BACKEND", backend)
        if backend == "ref":
            def forbidden(*a, **k):
                raise AssertionError("section 5 ran")
            for name in ("selective_scan_lean", "mamba_kernel_usable", "triton_module", "fused_block"):
                monkeypatch.setattr(DiS, name, forbidden)
        torch.manual_seed(1)
        m.zero_grad()
        out = m(x, t, y)
        out.square().sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in m.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-4, atol=1e-6)
    for a, b in zip(results[1][1], results[0][1]):   # float32 sums in another order: tiny absolute differences
        torch.testing.assert_close(a, b, rtol=1e-3, atol=5e-5)


def test_quickstart_training_step_equals_reference_scan(monkeypatch):
    """One whole DiS-Q/8 training step as the CPU quickstart takes it (32x32 grey images, 10 classes, the
    hybrid loss, backward, AdamW): the default scan, which on a CPU is the whole-sequence scan, gives the
    loss, every gradient and every updated parameter of SCAN_BACKEND = "ref" (float32 sums in another order:
    tiny differences; AdamW's eps is raised so that its first step, lr * g / (|g| + eps), does not turn
    them into a sign flip of a near-zero gradient)."""
    calls, small = [], DiS.selective_scan_small
    monkeypatch.setattr(DiS, "selective_scan_small", lambda *a: calls.append(a[0].shape) or small(*a))
    diffusion, results = DiS.Diffusion(), []
    for backend in ("auto", "ref"):
        monkeypatch.setattr(DiS, "SCAN_BACKEND", backend)
        torch.manual_seed(0)
        m = DiS.create_model("DiS-Q/8", image_size=32, in_channels=1, num_classes=10)
        with torch.no_grad():   # a non-zero output layer, so that every parameter gets a gradient
            m.final_layer.linear.weight.normal_(std=0.1)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3, eps=1e-3)
        x, y = torch.randn(8, 1, 32, 32), torch.arange(8)
        loss = diffusion.training_loss(m, x, y)
        loss.backward()
        grads = [p.grad.clone() for p in m.parameters()]
        opt.step()
        results.append((loss.detach(), grads, [p.detach().clone() for p in m.parameters()]))
    assert len(calls) == 2 * 7 and calls[0] == (8, 192, 18)   # both directions of all 7 layers
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=0)
    assert all(g.abs().sum() > 0 for g in results[1][1])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    for a, b in zip(results[0][2], results[1][2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_sections_1_to_4_need_only_the_two_hooks_of_section_5():
    """A reader of DiS.py's first four sections never has to jump ahead: the only names of section 5 they
    use are in selective_scan (the scan's entry point) and Block.forward's hook to the fused block."""
    import ast
    with open(os.path.join(HERE, "DiS.py")) as f:
        source = f.read()
    tree = ast.parse(source)
    line_of_fast = next(k for k, line in enumerate(source.splitlines(), 1)
                        if line.startswith("#") and "5. Making it fast" in line)   # the section's banner
    fast_names = {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))
                  and node.lineno > line_of_fast}
    fast_names |= {t.id for node in tree.body if isinstance(node, ast.Assign) and node.lineno > line_of_fast
                   for t in node.targets if isinstance(t, ast.Name)}
    assert {"selective_scan_lean", "fused_block", "mamba_kernel_usable"} <= fast_names
    functions = {}   # "name" or "Class.method" -> node, for everything before section 5
    for node in tree.body:
        if node.lineno < line_of_fast and isinstance(node, ast.FunctionDef):
            functions[node.name] = node
        if node.lineno < line_of_fast and isinstance(node, ast.ClassDef):
            functions.update({f"{node.name}.{f.name}": f for f in node.body if isinstance(f, ast.FunctionDef)})
    seen = {}
    for name, node in functions.items():
        used = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} & fast_names
        if used:
            seen[name] = used
    assert seen == {"selective_scan": {"selective_scan_lean", "mamba_kernel_usable", "triton_module", "fused_path_runs"},
                    "Block.forward": {"fused_path_runs", "fused_block"}}, seen


@pytest.mark.skipif(DiS.mamba_selective_scan_fn is None or not torch.cuda.is_available(),
                    reason="needs mamba-ssm and CUDA")
def test_mamba_ssm_kernel_equals_pytorch():
    x = {k: v.detach().float().cuda().requires_grad_() for k, v in scan_inputs(2, 64, 100, 16).items()}
    outs = [DiS.selective_scan(*(x[k] for k in ("u", "delta", "A", "B", "C")), D=x["D"], z=x["z"],
                               delta_bias=x["delta_bias"], delta_softplus=True, backend=backend)
            for backend in ("mamba_ssm", "lean")]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-3, atol=1e-3)
    g = torch.randn_like(outs[0])
    for a, b in zip(*(torch.autograd.grad(o, list(x.values()), g) for o in outs)):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def test_scan_rejects_bad_shapes():
    x = scan_inputs(2, 3, 5, 4, requires_grad=False)
    with pytest.raises(ValueError, match="B has shape"):
        DiS.selective_scan(x["u"], x["delta"], x["A"], x["B"][:, :, :4], x["C"])
    with pytest.raises(ValueError, match="delta_bias"):
        DiS.selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], delta_bias=torch.zeros(2, dtype=torch.float64))


#################################################################################
#                    The Triton scan (scan_triton.py, optional)                 #
#################################################################################
# Without CUDA the kernels run in Triton's CPU interpreter, which is slow per operation: the shapes are tiny,
# but odd, ragged (l not a multiple of the chunk) and long enough for several chunks.

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OPTIONAL = ("D", "z", "delta_bias")


@pytest.fixture(scope="module")
def st():
    """The scan_triton module, imported on first use (DiS imports it lazily the same way)."""
    need("triton")
    mod = importlib.import_module("scan_triton")
    if not mod.triton_scan_usable(torch.empty(0, device=TRITON_DEVICE)):
        pytest.fail("no CUDA, and Triton's interpreter is off: triton was imported before TRITON_INTERPRET=1 "
                    "was set (set it in the environment of the pytest run)")
    return mod


def _scan_inputs(b, d, n, l, dtype=torch.float32, param_dtype=None, seed=0):
    """All eight scan tensors, float32 values rounded to dtype (A, D, delta_bias in param_dtype)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0: torch.randn(*s, generator=g) * scale
    x = dict(u=r(b, d, l), delta=r(b, d, l, scale=0.5), A=-(torch.rand(d, n, generator=g) + 0.3),
             B=r(b, n, l), C=r(b, n, l), D=r(d), z=r(b, d, l), delta_bias=r(d, scale=0.3))
    pdt = param_dtype or dtype
    return {k: v.to(pdt if k in ("A", "D", "delta_bias") else dtype).to(TRITON_DEVICE) for k, v in x.items()}


def _run(fn, x, delta_softplus, g_out, **kw):
    """Output and gradients of every input tensor for the upstream gradient g_out."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in x.items()}
    out = fn(**leaves, delta_softplus=delta_softplus, **kw)
    grads = torch.autograd.grad(out, list(leaves.values()), g_out.to(out.dtype))
    return out, dict(zip(leaves, grads))


def _reference(x, delta_softplus, g_out):
    return _run(DiS.selective_scan_ref, {k: v.double() for k, v in x.items()}, delta_softplus, g_out.double())


def _assert_close(actual, expected, rel, what):
    """|actual - expected| <= rel * (|expected| + max |expected|): relative to each value and to the scale."""
    assert actual.shape == expected.shape, what
    err = (actual.double() - expected).abs()
    bound = rel * (expected.abs() + expected.abs().max() + 1e-12)
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"{what}: max error {err.max().item():.3g} is {worst:.3g} x the tolerance (rel {rel})"


# (b, d, n, l, chunk, optional inputs given, delta_softplus). The chunk sizes make l > chunk (several chunks)
# and ragged last chunks; d = 5, n = 3 test the channel and state masks, d = 40 two channel blocks (BLOCK_D 32).
CASES = [
    (2, 8, 4, 1, 32, OPTIONAL, True),
    (2, 8, 16, 7, 4, (), False),
    (2, 8, 4, 40, 8, OPTIONAL, True),
    (2, 8, 16, 67, 32, ("D",), True),
    (2, 5, 3, 23, 8, ("z", "delta_bias"), False),
    (1, 40, 4, 9, 4, ("D", "delta_bias"), True),
]


@pytest.mark.parametrize("b,d,n,l,chunk,given,softplus", CASES)
def test_triton_scan_matches_reference_fp32(st, b, d, n, l, chunk, given, softplus):
    x = _scan_inputs(b, d, n, l)
    x = {k: v for k, v in x.items() if k not in OPTIONAL or k in given}
    g_out = torch.randn(b, d, l, generator=torch.Generator().manual_seed(1)).to(TRITON_DEVICE)
    out, grads = _run(st.selective_scan_triton, x, softplus, g_out, chunk=chunk)
    ref, ref_grads = _reference(x, softplus, g_out)
    assert out.dtype == torch.float32
    _assert_close(out, ref, 1e-4, "out")
    for k in x:
        assert grads[k].dtype == x[k].dtype, k
        _assert_close(grads[k], ref_grads[k], 1e-4, f"grad of {k}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_scan_half_inputs(st, dtype):
    """Half-precision activations with float32 A, D, delta_bias (as in mamba-ssm); computed in float32, so
    only the rounding of the stored results differs from the float64 reference of the same input values."""
    b, d, n, l = 2, 8, 4, 19
    x = _scan_inputs(b, d, n, l, dtype=dtype, param_dtype=torch.float32)
    g_out = torch.randn(b, d, l, generator=torch.Generator().manual_seed(1)).to(dtype).to(TRITON_DEVICE)
    out, grads = _run(st.selective_scan_triton, x, True, g_out, chunk=8)
    ref, ref_grads = _reference(x, True, g_out)
    assert out.dtype == dtype
    _assert_close(out, ref, 1e-2, "out")
    for k in x:
        assert grads[k].dtype == x[k].dtype, k
        _assert_close(grads[k], ref_grads[k], 1e-2, f"grad of {k}")


def test_triton_scan_zero_stride_grad_and_saved_memory(st):
    """out.sum() sends an expanded (zero-stride) gradient; and autograd keeps nothing of size (b, d, l, n):
    besides the inputs only one float32 state per chunk."""
    b, d, n, l, chunk = 2, 8, 16, 24, 8
    x = {k: v.requires_grad_() for k, v in _scan_inputs(b, d, n, l).items()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        out = st.selective_scan_triton(**x, delta_softplus=True, chunk=chunk)
    out.sum().backward()
    ref, ref_grads = _reference({k: v.detach() for k, v in x.items()}, True, torch.ones(b, d, l, device=TRITON_DEVICE))
    for k, v in x.items():
        _assert_close(v.grad, ref_grads[k], 1e-4, f"grad of {k}")
    assert torch.Size([b, l // chunk, d, n]) in saved
    assert max(s.numel() for s in saved) <= max(b * d * l, b * (l // chunk) * d * n)


def test_triton_scan_opcheck(st):
    x = _scan_inputs(1, 4, 2, 5)
    for v in x.values():
        v.requires_grad_()
    args = (x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"], True, 2)
    torch.library.opcheck(torch.ops.dis_scan.selective_scan_fwd.default, args)
    out, starts = torch.ops.dis_scan.selective_scan_fwd(*args)
    assert starts.shape == (1, 3, 4, 2)
    detached = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    torch.library.opcheck(torch.ops.dis_scan.selective_scan_bwd.default,
                          (torch.randn_like(out),) + tuple(detached[:8]) + (starts.detach(), True, 2))


def test_triton_scan_compiles_without_graph_break(st):
    x = _scan_inputs(2, 8, 4, 12)
    g_out = torch.randn(2, 8, 12, generator=torch.Generator().manual_seed(1)).to(TRITON_DEVICE)

    def f(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        return st.selective_scan_triton(u.sin(), delta, A, B, C, D, z, delta_bias, delta_softplus, chunk=8) * 2

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out_c, grads_c = _run(compiled, x, True, g_out)
    out_e, grads_e = _run(f, x, True, g_out)
    torch.testing.assert_close(out_c, out_e, rtol=1e-6, atol=1e-6)
    for k in x:
        torch.testing.assert_close(grads_c[k], grads_e[k], rtol=1e-6, atol=1e-6)


def test_triton_scan_rejects_bad_inputs(st):
    x = _scan_inputs(1, 4, 2, 5)
    with pytest.raises(TypeError):
        st.selective_scan_triton(**{k: v.double() for k, v in x.items()})
    with pytest.raises(ValueError):
        st.selective_scan_triton(**{**x, "B": x["B"][:, :, :4]})


def test_triton_backend_in_a_compiled_mixer(st, monkeypatch):
    """DiS.SCAN_BACKEND = "triton" routes the mixer's scans to the kernel; the mixer compiles without a graph
    break and equals the lean PyTorch scan, forward and backward."""
    torch.manual_seed(0)
    mixer = DiS.BiMamba(8, d_state=4).to(TRITON_DEVICE)
    x = torch.randn(2, 11, 8, device=TRITON_DEVICE)
    g = torch.randn(2, 11, 8, device=TRITON_DEVICE)
    results = []
    for backend, wrap in (("lean", lambda m: m), ("triton", lambda m: torch.compile(m, fullgraph=True,
                                                                                     backend="aot_eager"))):
        monkeypatch.setattr(DiS, "SCAN_BACKEND", backend)
        torch._dynamo.reset()
        mixer.zero_grad()
        out = wrap(mixer)(x)
        out.backward(g)
        results.append((out.detach(), [p.grad.clone() for p in mixer.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-4, atol=1e-5)
    for a, b in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ---- The token-major scan (scan_triton.selective_scan_triton_tm) ----
# The (b, l, d) entry point the mixer calls: strided views of u, z, B, C, reverse scans, and add (the second
# direction adding into the first's output), against the float64 reference.

TM_ACTIVATIONS = ("u", "delta", "B", "C", "z")   # the (b, ., l) tensors, flipped along l for a reverse scan
TM_R = 3                                          # dt_rank: the columns in front of B and C in the mixer's x_dbl


def _tm_flip(x):
    return {k: v.flip(-1) if k in TM_ACTIVATIONS else v for k, v in x.items()}


def _tm_expected(x, softplus, g_out, reverse=False):
    """The float64 reference output and gradients, (b, d, l) layout; for reverse flip(ref(flip(inputs)))."""
    if not reverse:
        return _reference(x, softplus, g_out)
    out, grads = _reference(_tm_flip(x), softplus, g_out.flip(-1))
    return out.flip(-1), _tm_flip(grads)


def _tm_run(st, x, softplus, g_out, **kw):
    """Run selective_scan_triton_tm on x's (b, d, l) tensors laid out as in the mixer: u and z the halves of
    one (b, l, 2d) tensor, B and C column slices of one (b, l, TM_R + 2n) tensor, delta a (b, l, d) view of a
    (b, d, l) tensor (unit token stride). Returns the output and the gradients, both in x's (b, d, l) layout."""
    b, d, l = x["u"].shape
    n = x["A"].shape[1]
    tm = lambda v: v.transpose(1, 2)
    uz = torch.cat([tm(x["u"]), tm(x["z"]) if "z" in x else torch.zeros_like(tm(x["u"]))], -1)
    pad = torch.zeros(b, l, TM_R, dtype=x["B"].dtype, device=TRITON_DEVICE)
    x_dbl = torch.cat([pad, tm(x["B"]), tm(x["C"])], -1)
    leaves = {"uz": uz, "x_dbl": x_dbl, "delta": x["delta"]}
    leaves.update({k: x[k] for k in ("A", "D", "delta_bias") if k in x})
    leaves = {k: v.detach().clone().requires_grad_() for k, v in leaves.items()}
    uz, x_dbl = leaves["uz"], leaves["x_dbl"]
    out = st.selective_scan_triton_tm(
        uz[..., :d], tm(leaves["delta"]), leaves["A"], x_dbl[..., TM_R:TM_R + n], x_dbl[..., TM_R + n:],
        D=leaves.get("D"), z=uz[..., d:] if "z" in x else None, delta_bias=leaves.get("delta_bias"),
        delta_softplus=softplus, **kw)
    assert out.shape == (b, l, d) and out.is_contiguous() and out.dtype == x["u"].dtype
    g = dict(zip(leaves, torch.autograd.grad(out, list(leaves.values()), tm(g_out).to(out.dtype))))
    grads = {"u": tm(g["uz"][..., :d]), "delta": g["delta"], "B": tm(g["x_dbl"][..., TM_R:TM_R + n]),
             "C": tm(g["x_dbl"][..., TM_R + n:]), "z": tm(g["uz"][..., d:])}
    grads.update({k: g[k] for k in ("A", "D", "delta_bias") if k in g})
    return tm(out), {k: grads[k] for k in x}


def _tm_g_out(b, d, l, dtype=torch.float32):
    return torch.randn(b, d, l, generator=torch.Generator().manual_seed(1)).to(dtype).to(TRITON_DEVICE)


# (b, d, n, l, chunk, optional inputs given, delta_softplus, reverse): l in {1, 7, 23} with ragged last chunks,
# d = 5 (masked channels), d = 40 (two channel blocks, the second ragged)
TM_CASES = [
    (2, 5, 3, 1, 4, OPTIONAL, True, False),
    (2, 5, 3, 7, 3, (), False, True),
    (1, 40, 4, 23, 8, OPTIONAL, True, False),
    (1, 40, 4, 23, 5, OPTIONAL, True, True),
    (2, 5, 2, 23, 8, ("z", "delta_bias"), False, True),
    (1, 40, 2, 7, 4, ("D",), True, False),
]


@pytest.mark.parametrize("b,d,n,l,chunk,given,softplus,reverse", TM_CASES)
def test_triton_scan_tm_strided_matches_reference_fp32(st, b, d, n, l, chunk, given, softplus, reverse):
    """Strided token-major inputs, both directions: output and every gradient equal the float64 reference."""
    x = {k: v for k, v in _scan_inputs(b, d, n, l).items() if k not in OPTIONAL or k in given}
    g_out = _tm_g_out(b, d, l)
    out, grads = _tm_run(st, x, softplus, g_out, reverse=reverse, chunk=chunk)
    ref, ref_grads = _tm_expected(x, softplus, g_out, reverse)
    _assert_close(out, ref, 1e-4, "out")
    for k in x:
        assert grads[k].dtype == x[k].dtype, k
        _assert_close(grads[k], ref_grads[k], 1e-4, f"grad of {k}")


# (l, chunk, piece): the backward reruns each chunk (one saved state each) in pieces of SUB_CHUNK steps. One
# chunk of several pieces with a ragged last piece; chunk borders one step either side (l = 15, 17); a chunk
# shorter than a piece (l = 7); a chunk that is no multiple of the piece (12 = 5 + 5 + 2)
@pytest.mark.parametrize("l,chunk,piece", [(9, 8, 3), (15, 8, 4), (17, 8, 4), (7, 16, 4), (25, 12, 5)])
def test_triton_scan_tm_backward_pieces(st, monkeypatch, l, chunk, piece):
    """Every gradient equals the float64 reference across chunk and piece borders, both directions."""
    monkeypatch.setattr(st, "SUB_CHUNK", piece)
    x = _scan_inputs(1, 5, 3, l)
    g_out = _tm_g_out(1, 5, l)
    for reverse in (False, True):
        out, grads = _tm_run(st, x, True, g_out, reverse=reverse, chunk=chunk)
        ref, ref_grads = _tm_expected(x, True, g_out, reverse)
        _assert_close(out, ref, 1e-4, f"out, reverse={reverse}")
        for k in x:
            _assert_close(grads[k], ref_grads[k], 1e-4, f"grad of {k}, reverse={reverse}")


def test_triton_scan_tm_low_rank_delta(st):
    """delta_proj: the op projects the low-rank delta itself (and again in its backward); output and
    gradients equal those of the scan of the projected delta."""
    b, d, n, l, r = 2, 8, 4, 11, 3
    x = {k: v.transpose(1, 2) if k in TM_ACTIVATIONS else v for k, v in _scan_inputs(b, d, n, l).items()}
    g = torch.Generator().manual_seed(2)
    low = torch.randn(b, l, r, generator=g).to(TRITON_DEVICE)
    proj = (torch.randn(d, r, generator=g) * 0.5).to(TRITON_DEVICE)
    g_out = torch.randn(b, l, d, generator=g).to(TRITON_DEVICE)
    kw = dict(delta_softplus=True, reverse=True, chunk=4)
    rest = {k: v for k, v in x.items() if k != "delta"}

    def run(project_outside):
        leaves = {k: v.detach().clone().requires_grad_() for k, v in dict(rest, low=low, proj=proj).items()}
        args = {k: v for k, v in leaves.items() if k not in ("low", "proj")}
        if project_outside:
            out = st.selective_scan_triton_tm(delta=F.linear(leaves["low"], leaves["proj"]), **args, **kw)
        else:
            out = st.selective_scan_triton_tm(delta=leaves["low"], delta_proj=leaves["proj"], **args, **kw)
        return out, dict(zip(leaves, torch.autograd.grad(out, list(leaves.values()), g_out)))

    (out, grads), (ref, ref_grads) = run(False), run(True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-5, atol=1e-5, msg=k)


@pytest.mark.parametrize("reverse", [False, True])
def test_triton_scan_tm_direction(st, reverse):
    """A scan sees only the tokens before it (after it when reverse): change the first or the last token's u."""
    b, d, n, l = 1, 4, 2, 6
    x = _scan_inputs(b, d, n, l)
    tm = {k: v.transpose(1, 2) if k in TM_ACTIVATIONS else v for k, v in x.items()}
    run = lambda u: st.selective_scan_triton_tm(**{**tm, "u": u}, delta_softplus=True, reverse=reverse, chunk=4)
    out = run(tm["u"])
    first, last = tm["u"].clone(), tm["u"].clone()
    first[:, 0] += 1.0
    last[:, -1] += 1.0
    out_first, out_last = run(first), run(last)
    seen, unseen = (out_last[:, 0], out_first[:, -1]) if reverse else (out_first[:, -1], out_last[:, 0])
    assert not torch.equal(seen, out[:, 0 if reverse else -1])
    assert torch.equal(unseen, out[:, -1 if reverse else 0])


def test_triton_scan_tm_add_both_directions(st):
    """The second direction adds into the first's output: out == add + scan, add's gradient is g_out, and
    the chain's gradients equal those of the two scans summed outside."""
    b, d, n, l = 2, 6, 3, 9
    x = _scan_inputs(b, d, n, l)
    tm = {k: v.transpose(1, 2) if k in TM_ACTIVATIONS else v for k, v in x.items()}
    g_out = _tm_g_out(b, l, d)
    kw = dict(delta_softplus=True, chunk=4)

    def grads_of(fn):
        leaves = {k: v.detach().clone().requires_grad_() for k, v in tm.items()}
        out = fn(leaves)
        return out, torch.autograd.grad(out, list(leaves.values()), g_out)

    fused, g_fused = grads_of(lambda v: st.selective_scan_triton_tm(
        **v, reverse=True, add=st.selective_scan_triton_tm(**v, **kw), **kw))
    apart, g_apart = grads_of(lambda v: st.selective_scan_triton_tm(**v, **kw)
                              + st.selective_scan_triton_tm(**v, reverse=True, **kw))
    torch.testing.assert_close(fused, apart, rtol=1e-6, atol=1e-6)
    for k, a, e in zip(tm, g_fused, g_apart):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6, msg=k)

    add = torch.randn(b, l, d, device=TRITON_DEVICE, requires_grad=True)   # only add needs a gradient
    out = st.selective_scan_triton_tm(**tm, add=add, **kw)
    torch.testing.assert_close(out, add.detach() + st.selective_scan_triton_tm(**tm, **kw), rtol=1e-6, atol=1e-6)
    out.backward(g_out)
    assert torch.equal(add.grad, g_out)


@pytest.mark.parametrize("reverse", [False, True])
def test_triton_scan_tm_bf16_inputs(st, reverse):
    """bf16 activations (and a bf16 add) with float32 A, D, delta_bias: each result in its input's dtype."""
    b, d, n, l = 2, 8, 4, 13
    x = _scan_inputs(b, d, n, l, dtype=torch.bfloat16, param_dtype=torch.float32)
    g_out = _tm_g_out(b, d, l, torch.bfloat16)
    out, grads = _tm_run(st, x, True, g_out, reverse=reverse, chunk=4)
    ref, ref_grads = _tm_expected(x, True, g_out, reverse)
    assert out.dtype == torch.bfloat16
    _assert_close(out, ref, 1e-2, "out")
    for k in x:
        assert grads[k].dtype == x[k].dtype, k
        _assert_close(grads[k], ref_grads[k], 1e-2, f"grad of {k}")

    tm = {k: v.transpose(1, 2) if k in TM_ACTIVATIONS else v for k, v in x.items()}
    add = torch.randn(b, l, d, device=TRITON_DEVICE).bfloat16().requires_grad_()
    out = st.selective_scan_triton_tm(**tm, add=add, delta_softplus=True, reverse=reverse, chunk=4)
    assert out.dtype == torch.bfloat16
    _assert_close(out, add.double() + ref.transpose(1, 2), 1e-2, "out with add")
    out.backward(g_out.transpose(1, 2))
    assert add.grad.dtype == torch.bfloat16 and torch.equal(add.grad, g_out.transpose(1, 2))


def test_triton_scan_tm_zero_stride_grad_and_saved_memory(st):
    """out.sum() sends an expanded (zero-stride) gradient; autograd keeps nothing of size (b, l, d, n)."""
    b, d, n, l, chunk = 2, 8, 16, 24, 8
    x = _scan_inputs(b, d, n, l)
    leaves = {k: v.transpose(1, 2).detach().requires_grad_() if k in TM_ACTIVATIONS else v.requires_grad_()
              for k, v in x.items()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        out = st.selective_scan_triton_tm(**leaves, delta_softplus=True, reverse=True, chunk=chunk,
                                          add=torch.zeros(b, l, d, device=TRITON_DEVICE))
    out.sum().backward()
    ref, ref_grads = _tm_expected(x, True, torch.ones(b, d, l, device=TRITON_DEVICE), reverse=True)
    for k, v in leaves.items():
        _assert_close(v.grad.transpose(1, 2) if k in TM_ACTIVATIONS else v.grad, ref_grads[k], 1e-4,
                      f"grad of {k}")
    assert torch.Size([b, l // chunk, d, n]) in saved
    assert max(s.numel() for s in saved) <= max(b * d * l, b * (l // chunk) * d * n) < b * l * d * n


def _tm_strided_op_args(b, d, n, l):
    """Token-major op inputs as strided views (as in the mixer): u, z halves of (b, l, 2d), B, C slices."""
    x = _scan_inputs(b, d, n, l)
    uz = torch.cat([x["u"], x["z"]], 1).transpose(1, 2).contiguous().requires_grad_()
    x_dbl = torch.cat([torch.zeros(b, TM_R, l, device=TRITON_DEVICE), x["B"], x["C"]], 1)
    x_dbl = x_dbl.transpose(1, 2).contiguous().requires_grad_()
    delta = x["delta"].transpose(1, 2).contiguous().requires_grad_()
    A, D, bias = (x[k].requires_grad_() for k in ("A", "D", "delta_bias"))
    add = torch.randn(b, l, d, device=TRITON_DEVICE, requires_grad=True)
    return (uz[..., :d], delta, A, x_dbl[..., TM_R:TM_R + n], x_dbl[..., TM_R + n:], D, uz[..., d:], bias, True,
            3, True, add, True)


def test_triton_scan_tm_opcheck(st):
    """torch.library.opcheck of the token-major forward and backward ops on strided views and a zero-stride
    gradient; the forward's output and saved chunk states have the expected shapes."""
    b, d, n, l = 1, 4, 2, 5
    args = _tm_strided_op_args(b, d, n, l)
    torch.library.opcheck(torch.ops.dis_scan.selective_scan_fwd.default, args)
    out, starts = torch.ops.dis_scan.selective_scan_fwd(*args)
    assert out.shape == (b, l, d) and out.is_contiguous() and starts.shape == (b, 2, d, n)
    detached = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    g_out = torch.randn(1, 1, d, device=TRITON_DEVICE).expand(b, l, d)          # zero strides
    torch.library.opcheck(torch.ops.dis_scan.selective_scan_bwd.default,
                          (g_out, *detached[:8], starts.detach(), True, 3, True, True))


def _compiled_equals_eager(f, inputs, g_out):
    """torch.compile(f, fullgraph=True) (aot_eager: every op as eager runs it) gives eager's output and input
    gradients for the upstream gradient g_out: no graph break, and the ops' fake and autograd rules hold."""
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (compiled, f):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        out = fn(*leaves)
        results.append((out, torch.autograd.grad(out, leaves, g_out)))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-6)
    for a, e in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)


def test_triton_scan_tm_compiles_without_graph_break(st):
    """Both directions of a mixer, the second adding into the first, compiled whole: equals eager."""
    args = _tm_strided_op_args(2, 6, 3, 9)
    u, delta, A, B, C, D, z, bias = args[:8]
    g_out = torch.randn(2, 9, 6, generator=torch.Generator().manual_seed(1)).to(TRITON_DEVICE)

    def f(u, delta, A, B, C, D, z, bias):
        fwd = st.selective_scan_triton_tm(u.sin(), delta, A, B, C, D, z, bias, True, chunk=4)
        return st.selective_scan_triton_tm(u, delta, A, B, C, D, z, bias, True, reverse=True, add=fwd, chunk=4) * 2

    _compiled_equals_eager(f, (u, delta, A, B, C, D, z, bias), g_out)


def test_triton_scan_tm_rejects_bad_inputs(st):
    """Each bad argument raises the right error type with a one-line message naming the function and argument."""
    x = _scan_inputs(1, 4, 2, 5)
    tm = {k: v.transpose(1, 2) if k in TM_ACTIVATIONS else v for k, v in x.items()}
    bad = [
        (TypeError, "u is torch.float64", {"u": tm["u"].double()}),
        (TypeError, "A is torch.complex64", {"A": torch.complex(x["A"], x["A"])}),
        (ValueError, r"B has shape \(1, 4, 2\), expected \(1, 5, 2\)", {"B": x["B"][:, :, :4].transpose(1, 2)}),
        (ValueError, r"z has shape \(1, 4, 5\), expected \(1, 5, 4\)", {"z": x["z"]}),
        (ValueError, r"add has shape \(1, 5, 3\)", {"add": tm["u"][..., :3]}),
        (ValueError, r"D has shape \(5,\), expected \(4,\)", {"D": torch.zeros(5, device=TRITON_DEVICE)}),
        (ValueError, "C is on meta", {"C": tm["C"].to("meta")}),
        (ValueError, "u must be", {"u": tm["u"][0]}),
        (ValueError, "chunk must be", {"chunk": 0}),
    ]
    for error, message, change in bad:
        with pytest.raises(error, match="^selective_scan_triton_tm: " + message) as info:
            st.selective_scan_triton_tm(**{**tm, **change})
        assert "\n" not in str(info.value)


# ---- The causal conv (scan_triton.causal_conv1d_triton) ----
# The depthwise causal (or reverse) conv1d + bias + SiLU on token-major x, against nn.Conv1d in float64. Most
# tests shrink the blocks so that tiny shapes still span several token and channel blocks (halos across
# blocks, ragged last blocks).

@pytest.fixture
def conv_small_blocks(st, monkeypatch):
    """BLOCK_L 8, BLOCK_C 32: l = 19 is three token blocks, d = 40 two channel blocks (the last ragged)."""
    monkeypatch.setattr(st, "CONV_BLOCK_L", 8)
    monkeypatch.setattr(st, "CONV_BLOCK_D", 32)


def _conv_inputs(b, l, d, w, has_bias=True, dtype=torch.float32, param_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, d, generator=g)
    weight = torch.randn(d, w, generator=g) * 0.5
    bias = torch.randn(d, generator=g) * 0.3 if has_bias else None
    g_out = torch.randn(b, l, d, generator=g)
    pdt = param_dtype or dtype
    cast = lambda t, dt: t.to(dt).to(TRITON_DEVICE) if t is not None else None
    return cast(x, dtype), cast(weight, pdt), cast(bias, pdt), cast(g_out, dtype)


def _conv_run(st, x, weight, bias, g_out, **kw):
    """Output and the gradients (x, weight[, bias]) of the kernel for the upstream gradient g_out."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias) if t is not None]
    out = st.causal_conv1d_triton(leaves[0], leaves[1], leaves[2] if bias is not None else None, **kw)
    return out, torch.autograd.grad(out, leaves, g_out.to(out.dtype))


def _conv_reference(x, weight, bias, g_out, reverse=False, activation=True):
    """nn.Conv1d padded by w-1 and sliced to the first l outputs (+ SiLU), in float64; for reverse the same
    conv on the flipped sequence, flipped back. Returns out and the gradients (x, weight[, bias])."""
    b, l, d = x.shape
    w = weight.shape[-1]
    conv = nn.Conv1d(d, d, w, groups=d, padding=w - 1, bias=bias is not None, dtype=torch.float64,
                     device=x.device)
    with torch.no_grad():
        conv.weight.copy_(weight.reshape(d, 1, w).double())
        if bias is not None:
            conv.bias.copy_(bias.double())
    xr = x.detach().double().requires_grad_()
    seq = xr.flip(1) if reverse else xr
    pre = conv(seq.transpose(1, 2))[..., :l].transpose(1, 2)
    pre = pre.flip(1) if reverse else pre
    out = F.silu(pre) if activation else pre
    params = [xr, conv.weight] + ([conv.bias] if bias is not None else [])
    grads = torch.autograd.grad(out, params, g_out.double())
    return out, (grads[0], grads[1].reshape(weight.shape)) + tuple(grads[2:])


def _conv_check(st, x, weight, bias, g_out, rel, reverse, activation, what=""):
    out, grads = _conv_run(st, x, weight, bias, g_out, reverse=reverse, activation=activation)
    ref, ref_grads = _conv_reference(x, weight, bias, g_out, reverse, activation)
    assert out.dtype == x.dtype and out.is_contiguous()
    _assert_close(out, ref, rel, f"out {what}")
    for name, t, gr, gref in zip(("x", "weight", "bias"), (x, weight, bias), grads, ref_grads):
        assert gr.dtype == t.dtype and gr.shape == t.shape, name
        _assert_close(gr, gref, rel, f"grad of {name} {what}")


# every (l, d, w); each w meets each (bias, activation) pair once per two l's; both directions per case
CONV_CASES = [(l, d, w, *ba) for (l, d, w), ba in zip(itertools.product((1, 3, 7, 19), (5, 40), (4, 2)),
                                                     itertools.cycle(itertools.product((True, False), repeat=2)))]


@pytest.mark.parametrize("l,d,w,has_bias,activation", CONV_CASES)
def test_triton_conv_matches_conv1d_fp32(st, conv_small_blocks, l, d, w, has_bias, activation):
    """Both directions, with and without bias and SiLU: output and gradients equal nn.Conv1d's in float64."""
    x, weight, bias, g_out = _conv_inputs(2, l, d, w, has_bias)
    for reverse in (False, True):
        _conv_check(st, x, weight, bias, g_out, 1e-5, reverse, activation, f"reverse={reverse}")


@pytest.mark.parametrize("w", [1, 3, 8])
def test_triton_conv_other_widths_and_conv1d_weight_shape(st, monkeypatch, w):
    """w from 1 to 8, given as nn.Conv1d's (d, 1, w) weight; BLOCK_L 4 < w - 1: halos span two blocks."""
    monkeypatch.setattr(st, "CONV_BLOCK_L", 4)
    monkeypatch.setattr(st, "CONV_BLOCK_D", 8)
    x, weight, bias, g_out = _conv_inputs(1, 11, 10, w)
    for reverse in (False, True):
        _conv_check(st, x, weight.reshape(10, 1, w), bias, g_out, 1e-5, reverse, True, f"reverse={reverse}")


def test_triton_conv_default_blocks(st):
    """The default block sizes, with l and d spanning two token and two channel blocks."""
    x, weight, bias, g_out = _conv_inputs(1, st.CONV_BLOCK_L + 5, st.CONV_BLOCK_D + 3, 4)
    for reverse in (False, True):
        _conv_check(st, x, weight, bias, g_out, 1e-5, reverse, True, f"reverse={reverse}")


@pytest.mark.parametrize("half", [0, 1])
def test_triton_conv_strided_view_and_zero_stride_grad(st, conv_small_blocks, half):
    """x is one half of a (b, l, 2d) tensor (a view, never copied: autograd saves that very view and nothing
    but x, weight, bias); out.sum() sends an expanded, zero-stride gradient."""
    b, l, d, w = 2, 19, 40, 4
    full, weight, bias, _ = _conv_inputs(b, l, 2 * d, w)
    weight, bias = weight[:d], bias[:d]
    for reverse in (False, True):
        leaves = [t.clone().requires_grad_() for t in (full, weight, bias)]
        x = leaves[0][..., half * d:(half + 1) * d]
        assert x.stride() == (l * 2 * d, 2 * d, 1)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = st.causal_conv1d_triton(x, leaves[1], leaves[2], reverse=reverse)
        assert len(saved) == 3 and any(s.data_ptr() == x.data_ptr() and s.stride() == x.stride() for s in saved)
        out.sum().backward()
        ref, ref_grads = _conv_reference(x.detach(), weight, bias, torch.ones(b, l, d, device=TRITON_DEVICE),
                                         reverse)
        _assert_close(out, ref, 1e-5, "out")
        g_full = leaves[0].grad
        _assert_close(g_full[..., half * d:(half + 1) * d], ref_grads[0], 1e-5, "grad of x")
        assert (g_full[..., (1 - half) * d:(2 - half) * d] == 0).all()
        _assert_close(leaves[1].grad, ref_grads[1], 1e-5, "grad of weight")
        _assert_close(leaves[2].grad, ref_grads[2], 1e-5, "grad of bias")
        # the backward op itself, given an expanded gradient and the strided x, equals a dense call
        ones = torch.ones((), device=TRITON_DEVICE).expand(b, l, d)
        assert ones.stride() == (0, 0, 0)
        args = (x.detach(), weight, bias, reverse, True)
        dense = torch.ops.dis_scan.causal_conv1d_bwd(ones.contiguous(), x.detach().contiguous(), *args[1:])
        for a, e in zip(torch.ops.dis_scan.causal_conv1d_bwd(ones, *args), dense):
            torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("w", [4, 2])
def test_triton_conv_causality(st, monkeypatch, w):
    """Causal: token j changes the outputs at t in [j, j + w - 1] only; reverse: at t in [j - w + 1, j] only."""
    monkeypatch.setattr(st, "CONV_BLOCK_L", 4)
    l, d = 12, 3
    x, weight, bias, _ = _conv_inputs(1, l, d, w)
    for reverse, j in itertools.product((False, True), (0, 5, l - 1)):
        x2 = x.clone()
        x2[:, j] += 1.0
        out, out2 = (st.causal_conv1d_triton(v, weight, bias, reverse=reverse) for v in (x, x2))
        changed = set((out2 - out).abs().amax(dim=(0, 2)).nonzero().flatten().tolist())
        lo, hi = (j - w + 1, j) if reverse else (j, j + w - 1)
        assert changed == set(range(max(lo, 0), min(hi, l - 1) + 1)), (reverse, j, changed)


@pytest.mark.parametrize("param_dtype", [torch.bfloat16, torch.float32])
def test_triton_conv_bf16_inputs(st, conv_small_blocks, param_dtype):
    """bf16 x (and bf16 or float32 weight, bias): computed in float32, so only the rounding of the stored
    results differs from the float64 reference of the same input values; dtypes follow the inputs."""
    x, weight, bias, g_out = _conv_inputs(2, 19, 40, 4, dtype=torch.bfloat16, param_dtype=param_dtype)
    for reverse in (False, True):
        _conv_check(st, x, weight, bias, g_out, 1e-2, reverse, True, f"reverse={reverse}")


def test_triton_conv_empty_inputs(st):
    """b = 0 or l = 0: empty output and x gradient of the right shapes, zero weight and bias gradients."""
    for b, l in ((0, 5), (2, 0)):
        x, weight, bias, g_out = _conv_inputs(b, l, 4, 3)
        out, grads = _conv_run(st, x, weight, bias, g_out)
        assert out.shape == (b, l, 4) and grads[0].shape == x.shape
        assert (grads[1] == 0).all() and (grads[2] == 0).all()


def test_triton_conv_opcheck(st, conv_small_blocks):
    """torch.library.opcheck of the forward and backward ops on a strided x, with and without bias; without
    bias the backward returns an empty bias gradient."""
    full, weight, bias, g_out = _conv_inputs(1, 5, 8, 3)
    x = full[..., 2:6]                       # a strided view
    weight, bias, g_out = weight[:4], bias[:4], g_out[..., :4]
    for b_, reverse in ((bias, False), (None, True)):
        args = [t.clone().requires_grad_() if t is not None else None for t in (x, weight, b_)]
        torch.library.opcheck(torch.ops.dis_scan.causal_conv1d_fwd.default, (*args, reverse, True))
        torch.library.opcheck(torch.ops.dis_scan.causal_conv1d_bwd.default,
                              (g_out, x, weight, b_, reverse, not reverse))
    g_b = torch.ops.dis_scan.causal_conv1d_bwd(g_out, x, weight, None, False, True)[2]
    assert g_b.shape == (0,)


def test_triton_conv_compiles_without_graph_break(st, conv_small_blocks):
    """Two chained convs (causal, then reverse without bias and SiLU) compiled whole: equal eager."""
    x, weight, bias, g_out = _conv_inputs(2, 9, 6, 4)
    weight = weight.reshape(6, 1, 4)

    def f(x, weight, bias):
        y = st.causal_conv1d_triton(x.sin(), weight, bias)
        return st.causal_conv1d_triton(y, weight, None, reverse=True, activation=False) * 2

    _compiled_equals_eager(f, (x, weight, bias), g_out)


def test_triton_conv_rejects_bad_inputs(st):
    """Each bad argument raises the right error type with a one-line message naming the function."""
    x, weight, bias, _ = _conv_inputs(1, 5, 4, 3)
    bad = [
        (ValueError, dict(x=x[0])),                                  # x not 3-d
        (ValueError, dict(weight=weight[:3])),                       # weight for another d
        (ValueError, dict(weight=weight[:, None].expand(4, 2, 3))),  # (d, 2, w)
        (ValueError, dict(weight=weight[:, :0])),                    # w = 0
        (ValueError, dict(bias=bias[:3])),
        (TypeError, dict(x=x.double())),
        (TypeError, dict(weight=weight.double())),
        (TypeError, dict(bias=bias.to(torch.int32))),
        (ValueError, dict(weight=weight.to("meta"))),                # another device
    ]
    for error, change in bad:
        kw = dict(x=x, weight=weight, bias=bias)
        kw.update(change)
        with pytest.raises(error, match="^causal_conv1d_triton: ") as info:
            st.causal_conv1d_triton(**kw)
        assert "\n" not in str(info.value)


# ---- Both conv directions in one kernel (scan_triton.causal_conv1d_bidir_triton) ----
# The bidirectional mixer's two convs in one launch (dis_scan::causal_conv1d_bidir_fwd/bwd), against two
# single-direction float64 references (_conv_reference); blocks shrunk as above.

def _bidir_inputs(b, l, d, w_f, w_b, bias_f=True, bias_b=True, dtype=torch.float32, param_dtype=None, seed=0):
    """x as the first half of a (b, l, 2d) tensor (a strided view), the two directions' parameters and two
    upstream gradients."""
    g = torch.Generator().manual_seed(seed)
    pdt = param_dtype or dtype
    cast = lambda t, dt: t.to(dt).to(TRITON_DEVICE) if t is not None else None      # noqa: E731
    full = cast(torch.randn(b, l, 2 * d, generator=g), dtype)
    params = [torch.randn(d, w_f, generator=g) * 0.5, torch.randn(d, generator=g) * 0.3 if bias_f else None,
              torch.randn(d, w_b, generator=g) * 0.5, torch.randn(d, generator=g) * 0.3 if bias_b else None]
    g_u = [cast(torch.randn(b, l, d, generator=g), dtype) for _ in range(2)]
    return full[..., :d], [cast(p, pdt) for p in params], g_u


def _bidir_reference(x, params, g_u, activation):
    """(u_f, u_b) and the gradients (x, weight_f, bias_f, weight_b, bias_b; None for a bias not given) from two
    single-direction references; a None upstream gradient counts as zeros."""
    weight_f, bias_f, weight_b, bias_b = params
    g_u = [g if g is not None else torch.zeros(x.shape, dtype=torch.float64, device=x.device) for g in g_u]
    u_f, (gx_f, gw_f, *gb_f) = _conv_reference(x, weight_f, bias_f, g_u[0], False, activation)
    u_b, (gx_b, gw_b, *gb_b) = _conv_reference(x, weight_b, bias_b, g_u[1], True, activation)
    return (u_f, u_b), (gx_f + gx_b, gw_f, gb_f[0] if gb_f else None, gw_b, gb_b[0] if gb_b else None)


def _bidir_check(st, x, params, g_u, rel, activation=True, what=""):
    """The bidirectional op through autograd (leaves: x's (b, l, 2d) base and the parameters; only the outputs
    whose g_u is not None enter the loss) against the references."""
    d = x.shape[2]
    base = x._base.detach().clone().requires_grad_()                 # x = base[..., :d], see _bidir_inputs
    xv = base[..., :d]
    leaves = [p.detach().clone().requires_grad_() if p is not None else None for p in params]
    u = st.causal_conv1d_bidir_triton(xv, *leaves, activation=activation)
    used = [(o, g.to(o.dtype)) for o, g in zip(u, g_u) if g is not None]
    torch.autograd.backward([o for o, _ in used], [g for _, g in used])
    ref_u, ref_g = _bidir_reference(x, params, g_u, activation)
    for name, out, ref in zip(("u_f", "u_b"), u, ref_u):
        assert out.dtype == x.dtype and out.is_contiguous() and out.shape == x.shape, name
        _assert_close(out, ref, rel, f"{name} {what}")
    assert (base.grad[..., d:] == 0).all()
    grads = [base.grad[..., :d]] + [p.grad if p is not None else None for p in leaves]
    for name, t, gr, gref in zip(("x", "weight_f", "bias_f", "weight_b", "bias_b"), [x] + params, grads, ref_g):
        if t is None:
            assert gref is None and gr is None, name
            continue
        assert gr.dtype == t.dtype and gr.shape == t.shape, name
        _assert_close(gr, gref, rel, f"grad of {name} {what}")


# every (l, d, w); (bias_f, bias_b, activation) cycles through all eight combinations
BIDIR_CASES = [(*ldw, *flags) for ldw, flags in zip(itertools.product((1, 3, 7, 19), (5, 40), (4, 2)),
                                                    itertools.cycle(itertools.product((True, False), repeat=3)))]


@pytest.mark.parametrize("l,d,w,bias_f,bias_b,activation", BIDIR_CASES)
def test_triton_conv_bidir_matches_two_single_direction_references(st, conv_small_blocks, l, d, w, bias_f,
                                                                   bias_b, activation):
    """u_f, u_b and every gradient (x's summed over both directions) equal two single-direction references."""
    x, params, g_u = _bidir_inputs(2, l, d, w, w, bias_f, bias_b)
    assert x.stride() == (l * 2 * d, 2 * d, 1)
    _bidir_check(st, x, params, g_u, 1e-5, activation)


def test_triton_conv_bidir_different_widths_and_conv1d_weight_shape(st, monkeypatch):
    """w_f = 5, w_b = 3 as nn.Conv1d's (d, 1, w) weights; BLOCK_L 2 < w - 1: halos span two blocks."""
    monkeypatch.setattr(st, "CONV_BLOCK_L", 2)
    monkeypatch.setattr(st, "CONV_BLOCK_D", 8)
    x, params, g_u = _bidir_inputs(1, 11, 10, 5, 3)
    params[0], params[2] = params[0].reshape(10, 1, 5), params[2].reshape(10, 1, 3)
    _bidir_check(st, x, params, g_u, 1e-5)


@pytest.mark.parametrize("used", [0, 1])
def test_triton_conv_bidir_one_output_unused(st, conv_small_blocks, monkeypatch, used):
    """A loss of u_f alone (or u_b alone): the backward op gets None for the other output (not a materialised
    zero tensor), and that direction's weight and bias gradients are 0."""
    seen = []
    bwd = st._conv_bwd_impl
    monkeypatch.setattr(st, "_conv_bwd_impl", lambda *a: seen.append(a[:2]) or bwd(*a))
    x, params, g_u = _bidir_inputs(2, 19, 40, 4, 4)
    g_u[1 - used] = None
    _bidir_check(st, x, params, g_u, 1e-5, what=f"(only u_{'fb'[used]})")
    assert len(seen) == 1 and seen[0][1 - used] is None and seen[0][used] is not None


def test_triton_conv_bidir_zero_stride_grads(st, conv_small_blocks):
    """u_f.sum() + 2 u_b.sum() sends expanded gradients with all strides 0; the autograd path saves only x (the
    strided view itself), the weights and the biases; the backward op on expanded gradients equals dense ones."""
    b, l, d, w = 2, 11, 40, 4
    x, params, _ = _bidir_inputs(b, l, d, w, w)
    saved = []
    base = x._base.clone().requires_grad_()
    xv = base[..., :d]
    leaves = [p.clone().requires_grad_() for p in params]
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        u_f, u_b = st.causal_conv1d_bidir_triton(xv, *leaves)
    assert len(saved) == 5 and any(s.data_ptr() == xv.data_ptr() and s.stride() == xv.stride() for s in saved)
    (u_f.sum() + 2 * u_b.sum()).backward()
    g_u = [torch.ones(b, l, d, device=TRITON_DEVICE), torch.full((b, l, d), 2.0, device=TRITON_DEVICE)]
    _, ref_g = _bidir_reference(x, params, g_u, True)
    for name, gr, gref in zip(("x", "weight_f", "bias_f", "weight_b", "bias_b"),
                              [base.grad[..., :d]] + [p.grad for p in leaves], ref_g):
        _assert_close(gr, gref, 1e-5, f"grad of {name}")
    ones = torch.ones((), device=TRITON_DEVICE).expand(b, l, d)
    assert ones.stride() == (0, 0, 0)
    for g_pair in ((ones, 2 * ones), (None, ones)):
        dense = [g.contiguous() if g is not None else None for g in g_pair]
        got = torch.ops.dis_scan.causal_conv1d_bidir_bwd(*g_pair, x, *params, True)
        want = torch.ops.dis_scan.causal_conv1d_bidir_bwd(*dense, x.contiguous(), *params, True)
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("param_dtype", [torch.bfloat16, torch.float32])
def test_triton_conv_bidir_bf16_inputs(st, conv_small_blocks, param_dtype):
    """bf16 x and gradients (bf16 or float32 parameters): computed in float32, so only the rounding of the
    stored results differs from the float64 reference of the same values; dtypes follow the inputs."""
    x, params, g_u = _bidir_inputs(2, 19, 40, 4, 4, dtype=torch.bfloat16, param_dtype=param_dtype)
    _bidir_check(st, x, params, g_u, 1e-2)


def test_triton_conv_bidir_empty_inputs(st):
    """b = 0 or l = 0: two empty outputs of x's shape, an x gradient of x's shape, zero parameter gradients."""
    for b, l in ((0, 5), (2, 0)):
        x, params, g_u = _bidir_inputs(b, l, 4, 3, 2)
        u = st.causal_conv1d_bidir_triton(x, *params)
        assert [t.shape for t in u] == [x.shape, x.shape]
        grads = torch.ops.dis_scan.causal_conv1d_bidir_bwd(*g_u, x, *params, True)
        assert grads[0].shape == x.shape and all((g == 0).all() for g in grads[1:])


def test_triton_conv_bidir_opcheck(st, conv_small_blocks):
    """torch.library.opcheck of the forward (either bias missing) and the backward (both, or only one, upstream
    gradient); a missing bias gets an empty gradient."""
    x, params, g_u = _bidir_inputs(1, 5, 4, 3, 2)
    weight_f, bias_f, weight_b, bias_b = params
    for p in ([weight_f, bias_f, weight_b, None], [weight_f, None, weight_b, bias_b]):
        args = [t.clone().requires_grad_() if t is not None else None for t in [x] + p]
        torch.library.opcheck(torch.ops.dis_scan.causal_conv1d_bidir_fwd.default, (*args, True))
    for g_pair, p, act in (((g_u[0], g_u[1]), params, True),
                           ((g_u[0], None), [weight_f, None, weight_b, bias_b], False),
                           ((None, g_u[1]), [weight_f, bias_f, weight_b, None], True)):
        torch.library.opcheck(torch.ops.dis_scan.causal_conv1d_bidir_bwd.default, (*g_pair, x, *p, act))
    grads = torch.ops.dis_scan.causal_conv1d_bidir_bwd(*g_u, x, weight_f, None, weight_b, None, True)
    assert grads[2].shape == (0,) and grads[4].shape == (0,)


def test_triton_conv_bidir_compiles_without_graph_break(st, conv_small_blocks):
    """Two chained bidirectional convs (the second's u_b unused) compiled whole: equal eager."""
    x, params, g_u = _bidir_inputs(2, 9, 6, 4, 4)
    params[0] = params[0].reshape(6, 1, 4)

    def f(x, weight_f, bias_f, weight_b, bias_b):
        u_f, u_b = st.causal_conv1d_bidir_triton(x.sin(), weight_f, bias_f, weight_b, bias_b)
        v_f, _ = st.causal_conv1d_bidir_triton(u_f * u_b, weight_f, None, weight_b, bias_b, activation=False)
        return v_f * 2                      # the second call's u_b is unused: its gradient is None

    _compiled_equals_eager(f, [x] + params, g_u[0])


def test_triton_conv_bidir_rejects_bad_inputs(st):
    """Each bad argument raises the right error type with a one-line message naming the function and argument."""
    x, (weight_f, bias_f, weight_b, bias_b), _ = _bidir_inputs(1, 5, 4, 3, 3)
    bad = [
        (ValueError, dict(x=x[0]), "x"),                                        # x not 3-d
        (ValueError, dict(weight_f=weight_f[:3]), "weight_f"),                  # weight for another d
        (ValueError, dict(weight_b=weight_b[:, None].expand(4, 2, 3)), "weight_b"),   # (d, 2, w)
        (ValueError, dict(weight_b=weight_b[:, :0]), "weight_b"),               # w = 0
        (ValueError, dict(bias_f=bias_f[:3]), "bias_f"),
        (TypeError, dict(x=x.double()), "x"),
        (TypeError, dict(weight_b=weight_b.double()), "weight_b"),
        (TypeError, dict(bias_b=bias_b.to(torch.int32)), "bias_b"),
        (ValueError, dict(weight_f=weight_f.to("meta")), "weight_f"),           # another device
    ]
    for error, change, name in bad:
        kw = dict(x=x, weight_f=weight_f, bias_f=bias_f, weight_b=weight_b, bias_b=bias_b)
        kw.update(change)
        with pytest.raises(error, match=f"^causal_conv1d_bidir_triton: {name} ") as info:
            st.causal_conv1d_bidir_triton(**kw)
        assert "\n" not in str(info.value)


# ---- Fused residual add + RMSNorm (scan_triton.add_rms_norm_triton) ----
# residual + drop-path scale * hidden, then RMSNorm, forward and backward, against the float64 computation and
# DiS.Block's own expressions.

NORM_EPS = 1e-5
NORM_SCALES = {None: None, "drop": [0.0, 1 / (1 - 0.3), 1 / (1 - 0.3)]}   # drop-path: sample 0 dropped


def _norm_make(b, l, d, dtype=torch.float32, with_residual=True, scale=None, seed=0):
    """hidden (in dtype), residual (float32 or None), weight, scale ((b,) or None), and the two output
    gradients g_normed, g_residual_out (float32; cast to normed's dtype by the caller)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    x = dict(hidden=r(b, l, d).to(dtype), residual=r(b, l, d) if with_residual else None,
             weight=1 + 0.5 * r(d), scale=None if scale is None else torch.tensor(scale, dtype=torch.float32),
             g_normed=r(b, l, d), g_res=r(b, l, d))
    return {k: v.to(TRITON_DEVICE) if v is not None else None for k, v in x.items()}


def _norm_reference(hidden, residual, weight, scale, eps=NORM_EPS):
    """The readable computation in float64."""
    h = hidden.double()
    if scale is not None:
        h = h * scale.double()[:, None, None]
    res = h if residual is None else residual.double() + h
    normed = res * torch.rsqrt(res.pow(2).mean(-1, keepdim=True) + eps) * weight.double()
    return normed, res


def _norm_run(fn, x, grad_of=("normed", "res"), leaf_dtype=None, **kw):
    """Outputs of fn(hidden, residual, weight, scale, **kw) and gradients of hidden, residual, weight for the
    loss <g_normed, normed> + <g_res, residual_out> (only the terms named in grad_of)."""
    leaves = {k: (x[k].detach().to(leaf_dtype) if leaf_dtype else x[k].detach()).requires_grad_()
              for k in ("hidden", "residual", "weight") if x[k] is not None}
    normed, res = fn(leaves["hidden"], leaves.get("residual"), leaves["weight"], x["scale"], **kw)
    loss = 0
    if "normed" in grad_of:
        loss = loss + (normed.double() * x["g_normed"].to(normed.dtype).double()).sum()
    if "res" in grad_of:
        loss = loss + (res.double() * x["g_res"].double()).sum()
    loss.backward()
    return (normed, res), {k: v.grad for k, v in leaves.items()}


def _norm_triton(st):
    """st.add_rms_norm_triton with _norm_reference's signature (hidden, residual, weight, scale), for _norm_run."""
    def fn(hidden, residual, weight, scale, **kw):
        return st.add_rms_norm_triton(hidden, residual, weight, NORM_EPS, scale=scale, **kw)
    return fn


def _norm_assert_matches(x, got, want, rtol=1e-5, atol=1e-5, grad_rtol=None, grad_atol=None):
    (n, r), grads = got
    (n_ref, r_ref), grads_ref = want
    torch.testing.assert_close(n.double(), n_ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(r.double(), r_ref, rtol=1e-6, atol=1e-6)
    for k in grads_ref:
        if grads_ref[k] is None:   # the reference loss does not use it (weight, with the stream alone)
            grads_ref[k] = torch.zeros_like(grads[k], dtype=torch.float64)
        torch.testing.assert_close(grads[k].double(), grads_ref[k], rtol=grad_rtol or rtol, atol=grad_atol or atol,
                                   msg=lambda m: f"gradient of {k}: {m}")


@pytest.mark.parametrize("d", [5, 40, 48])
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("scale", list(NORM_SCALES))
def test_triton_norm_matches_float64_reference(st, d, with_residual, scale):
    """With or without a residual and a drop-path scale: outputs (float32) and gradients equal float64's."""
    x = _norm_make(3, 4, d, with_residual=with_residual, scale=NORM_SCALES[scale], seed=d)
    got = _norm_run(_norm_triton(st), x)
    assert got[0][0].dtype == torch.float32 and got[0][1].dtype == torch.float32
    _norm_assert_matches(x, got, _norm_run(_norm_reference, x, leaf_dtype=torch.float64))
    if scale is not None:   # a dropped sample gets no gradient into hidden, the kept ones a scaled one
        assert got[1]["hidden"][0].abs().max() == 0 and got[1]["hidden"][1:].abs().max() > 0


def test_triton_norm_wide_row_and_partial_gradients(st):
    """d = 368 (DiS-S, BLOCK_D 512 with a mask), more rows than backward programs, and losses that use only
    one output: the stream alone (no g_normed) or the normed rows alone (no g_residual_out)."""
    x = _norm_make(2, 5, 368, scale=[1 / 0.9, 0.0], seed=3)
    for grad_of in (("normed", "res"), ("res",), ("normed",)):
        _norm_assert_matches(x, _norm_run(_norm_triton(st), x, grad_of),
                             _norm_run(_norm_reference, x, grad_of, leaf_dtype=torch.float64))


def test_triton_norm_equals_the_block_code_path(st):
    """The exact expressions of DiS.Block.forward (drop_path with a drawn keep mask, nn.RMSNorm) in float32."""
    torch.manual_seed(0)
    b, l, d, prob = 4, 3, 40, 0.25
    x = _norm_make(b, l, d, seed=1)
    norm = nn.RMSNorm(d, eps=NORM_EPS).to(TRITON_DEVICE)
    with torch.no_grad():
        norm.weight.copy_(x["weight"])
    keep = torch.tensor([1.0, 0.0, 1.0, 1.0], device=TRITON_DEVICE)
    readable_res = x["residual"] + x["hidden"] * keep[:, None, None] / (1 - prob)
    normed, res = st.add_rms_norm_triton(x["hidden"], x["residual"], norm.weight, norm.eps, scale=keep / (1 - prob))
    torch.testing.assert_close(res, readable_res, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(normed, norm(readable_res), rtol=1e-5, atol=1e-5)
    normed0, res0 = st.add_rms_norm_triton(x["hidden"], None, norm.weight, norm.eps)   # first block
    torch.testing.assert_close(res0, x["hidden"].float(), rtol=0, atol=0)
    torch.testing.assert_close(normed0, norm(x["hidden"].float()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hidden_dtype,out_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, None),
                                                    (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
def test_triton_norm_low_precision_dtypes(st, hidden_dtype, out_dtype):
    """16-bit hidden or normed: the stream and its gradient stay float32, the rest is rounded once."""
    x = _norm_make(2, 3, 40, dtype=hidden_dtype, scale=[1.25, 0.0], seed=7)
    got = _norm_run(_norm_triton(st), x, out_dtype=out_dtype)
    (normed, res), grads = got
    assert normed.dtype == (out_dtype or hidden_dtype) and res.dtype == torch.float32
    assert grads["hidden"].dtype == hidden_dtype
    assert grads["residual"].dtype == torch.float32 and grads["weight"].dtype == torch.float32
    # the reference sees the same rounded hidden and (through the loss) the same rounded g_normed; the stream
    # and g_residual are float32, the rest rounded once to a 16-bit type
    want = _norm_run(_norm_reference, {**x, "g_normed": x["g_normed"].to(normed.dtype)}, leaf_dtype=torch.float64)
    _norm_assert_matches(x, got, want, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(grads["residual"].double(), want[1]["residual"], rtol=1e-5, atol=1e-5)


def test_triton_norm_strided_inputs_and_expanded_gradients(st):
    """hidden / residual as views with row strides != d (no copy), hidden with a non-unit channel stride (copied),
    and gradients that arrive expanded with zero strides (from .sum())."""
    b, l, d = 2, 3, 40
    x = _norm_make(b, l, d, scale=[0.5, 2.0], seed=11)
    wide = torch.randn(l, b, d + 8, device=TRITON_DEVICE)
    hidden = wide[:, :, 3:3 + d].transpose(0, 1)                              # (b, l, d), strides (d+8, b(d+8), 1)
    residual = torch.randn(b, d, l, device=TRITON_DEVICE).transpose(1, 2)     # channel stride l (copied)
    for h, r in ((hidden, x["residual"]), (x["hidden"], residual), (hidden, residual)):
        normed, res = st.add_rms_norm_triton(h, r, x["weight"], NORM_EPS, scale=x["scale"])
        n_ref, r_ref = _norm_reference(h, r, x["weight"], x["scale"])
        torch.testing.assert_close(normed.double(), n_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(res.double(), r_ref, rtol=1e-6, atol=1e-6)
    leaves = [t.clone().requires_grad_() for t in (x["hidden"], x["residual"], x["weight"])]
    normed, res = st.add_rms_norm_triton(*leaves, NORM_EPS, scale=x["scale"])
    (normed.sum() + 2 * res.sum()).backward()
    ref_leaves = [t.double().requires_grad_() for t in (x["hidden"], x["residual"], x["weight"])]
    n_ref, r_ref = _norm_reference(*ref_leaves, x["scale"])
    (n_ref.sum() + 2 * r_ref.sum()).backward()
    for a, c in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad.double(), c.grad, rtol=1e-5, atol=1e-5)


def test_triton_norm_saves_only_the_stream(st):
    """The backward keeps residual_out (the stream, kept by the caller anyway), weight and scale: not hidden."""
    x = _norm_make(2, 3, 8, scale=[1.0, 2.0])
    saved = []
    h = x["hidden"].clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        normed, res = st.add_rms_norm_triton(h, x["residual"], x["weight"], NORM_EPS, scale=x["scale"])
    assert [tuple(t.shape) for t in saved] == [(2, 3, 8), (8,), (2,)]
    assert saved[0].data_ptr() == res.data_ptr()


def test_triton_norm_opcheck(st):
    """torch.library.opcheck of the forward (with and without residual and scale, float32 and bf16) and of the
    backward (with and without g_residual_out)."""
    x = _norm_make(2, 3, 6, scale=[0.0, 1.5], seed=5)
    hidden, residual, weight = (x[k].clone().requires_grad_() for k in ("hidden", "residual", "weight"))
    for args in ((hidden, residual, weight, x["scale"], NORM_EPS, None),
                 (hidden.detach().bfloat16().requires_grad_(), None, weight, None, NORM_EPS, torch.bfloat16)):
        torch.library.opcheck(torch.ops.dis_scan.add_rms_norm_fwd.default, args)
    normed, res = torch.ops.dis_scan.add_rms_norm_fwd(hidden.detach(), residual.detach(), weight.detach(),
                                                      x["scale"], NORM_EPS, None)
    for g_res, dtype, need in ((x["g_res"], torch.float32, True), (None, torch.bfloat16, False)):
        torch.library.opcheck(torch.ops.dis_scan.add_rms_norm_bwd.default,
                              (x["g_normed"], g_res, res, weight.detach(), x["scale"], NORM_EPS, dtype, need))


def test_triton_norm_bwd_op_directly(st):
    """No g_residual_out equals a zero one; without need_g_residual g_residual is empty; outputs are new tensors."""
    x = _norm_make(2, 3, 6, scale=[0.0, 1.5], seed=5)
    _, res = torch.ops.dis_scan.add_rms_norm_fwd(x["hidden"], x["residual"], x["weight"], x["scale"], NORM_EPS,
                                                 None)
    a = torch.ops.dis_scan.add_rms_norm_bwd(x["g_normed"], None, res, x["weight"], x["scale"], NORM_EPS,
                                           torch.float32, True)
    z = torch.zeros_like(res)
    b = torch.ops.dis_scan.add_rms_norm_bwd(x["g_normed"], z, res, x["weight"], x["scale"], NORM_EPS, torch.float32,
                                           False)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    torch.testing.assert_close(a[2], b[2], rtol=0, atol=0)
    assert b[1].shape == (0,)
    assert a[1].data_ptr() not in (res.data_ptr(), x["g_normed"].data_ptr())


def test_triton_norm_compiles_without_graph_break(st):
    """With and without a residual, compiled whole with a bf16 output: equals eager."""
    x = _norm_make(2, 3, 40, scale=[1.0, 0.0], seed=2)

    def f(hidden, residual, weight, scale):
        normed, res = st.add_rms_norm_triton(hidden.sin(), residual, weight, NORM_EPS, scale=scale,
                                             out_dtype=torch.bfloat16)
        return normed * 2, res + 1

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for with_residual in (True, False):
        y = {**x, "residual": x["residual"] if with_residual else None}
        (nc, rc), gc = _norm_run(compiled, y)
        (ne, re_), ge = _norm_run(f, y)
        assert nc.dtype == torch.bfloat16
        torch.testing.assert_close(nc, ne, rtol=0, atol=0)
        torch.testing.assert_close(rc, re_, rtol=0, atol=0)
        for k in ge:
            torch.testing.assert_close(gc[k], ge[k], rtol=1e-6, atol=1e-6)


def test_triton_norm_rejects_bad_inputs(st):
    """Each bad argument (shape, dtype, d = 0) raises the right error type naming the function."""
    x = _norm_make(2, 3, 6)
    h, r, w = x["hidden"], x["residual"], x["weight"]
    cases = [
        (ValueError, (h[0], r, w), {}),                                            # not (b, l, d)
        (ValueError, (h, r[:, :2], w), {}),                                        # residual shape
        (ValueError, (h, r, w[:5]), {}),                                           # weight shape
        (ValueError, (h, r, w), {"scale": torch.ones(3, device=TRITON_DEVICE)}),   # scale shape
        (TypeError, (h.double(), r, w), {}),                                       # hidden dtype
        (TypeError, (h, r.bfloat16(), w), {}),                                     # the stream must be float32
        (TypeError, (h, r, w.half()), {}),                                         # weight dtype
        (TypeError, (h, r, w), {"out_dtype": torch.int32}),
        (ValueError, (h[:, :, :0], r[:, :, :0], w[:0]), {}),                       # d = 0
    ]
    for err, args, kw in cases:
        with pytest.raises(err, match="add_rms_norm_triton: "):
            st.add_rms_norm_triton(*args[:3], NORM_EPS, **kw)


# ---- The fused mixer and model (scan_triton.bimamba_inner_fn, DiS.SCAN_BACKEND = "fused") ----
# The whole bidirectional mixer, and the whole model, in fused Triton kernels against the readable PyTorch ones.

def _fused_grads(fn, module, x, g):
    """fn(x), x's gradient and every parameter gradient of module, for the upstream gradient g."""
    module.zero_grad()
    x = x.detach().clone().requires_grad_()
    out = fn(x)
    out.backward(g)
    return out.detach(), x.grad, [p.grad.clone() for p in module.parameters()]


@pytest.mark.parametrize("l,d_model,d_state", [(1, 8, 4), (7, 8, 4), (37, 12, 3)])
def test_fused_mixer_equals_readable(st, l, d_model, d_state):
    """bimamba_inner_fn equals DiS.BiMamba.forward: output, input gradient and every parameter gradient."""
    torch.manual_seed(0)
    mixer = DiS.BiMamba(d_model, d_state=d_state).to(TRITON_DEVICE)   # d_inner 16 or 24
    x = torch.randn(2, l, d_model, device=TRITON_DEVICE)
    g = torch.randn(2, l, d_model, device=TRITON_DEVICE)
    ref = _fused_grads(mixer, mixer, x, g)
    fused = _fused_grads(lambda h: st.bimamba_inner_fn(h, *DiS.mixer_weights(mixer)), mixer, x, g)
    torch.testing.assert_close(fused[0], ref[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused[1], ref[1], rtol=1e-4, atol=1e-5)
    for (name, _), a, b in zip(mixer.named_parameters(), fused[2], ref[2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_fused_model_equals_readable_and_compiles(st, monkeypatch):
    """A small DiS in training mode (drop-path, label dropout): SCAN_BACKEND "fused", eager and compiled without
    a graph break, gives the lean PyTorch backend's output and parameter gradients."""
    torch.manual_seed(0)
    # 2 + 3 x 3 tokens, d_inner 32, 3 layers with a long skip; drop-path on (training mode)
    m = DiS.DiS(image_size=6, patch_size=2, in_channels=1, hidden_size=16, depth=2, num_classes=10,
                drop_path_rate=0.5).to(TRITON_DEVICE)
    with torch.no_grad():
        m.final_layer.linear.weight.normal_(std=0.1)
    x, t, y = (v.to(TRITON_DEVICE) for v in (torch.randn(2, 1, 6, 6), torch.tensor([3, 700]), torch.tensor([1, 2])))
    results = []
    for backend, compiled in (("lean", False), ("fused", False), ("fused", True)):
        monkeypatch.setattr(DiS, "SCAN_BACKEND", backend)
        torch._dynamo.reset()
        fn = torch.compile(m, fullgraph=True, backend="aot_eager") if compiled else m
        torch.manual_seed(1)    # the same drop-path and label-dropout draws
        m.zero_grad()
        out = fn(x, t, y)
        out.square().sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in m.parameters()]))
    for other in results[1:]:
        torch.testing.assert_close(other[0], results[0][0], rtol=1e-4, atol=1e-5)
        for a, b in zip(other[1], results[0][1]):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=5e-5)


def test_first_use_check_passes_the_fused_path_and_catches_a_wrong_one(st, monkeypatch):
    """The check "auto" runs before taking the fused path on a GPU, for real (on the interpreter here): it passes,
    leaves the random state and SCAN_BACKEND as they were, and fails a fused path whose output is off."""
    device = torch.device(TRITON_DEVICE)
    monkeypatch.setattr(DiS, "SCAN_BACKEND", "auto")
    rng = torch.get_rng_state()
    assert DiS.fused_first_use_check(device, l=9, d=16).startswith("checked on ")
    assert torch.equal(torch.get_rng_state(), rng) and DiS.SCAN_BACKEND == "auto"
    with torch.no_grad():   # e.g. the first forward of a sampler
        assert DiS.fused_first_use_check(device, b=1, l=3, d=8).startswith("checked on ")
    right = st.bimamba_inner_fn
    monkeypatch.setattr(st, "bimamba_inner_fn", lambda *a: right(*a) * 1.3)
    with pytest.raises(RuntimeError, match=r"mixer output differs from lean by 0\.(29|3)"):
        DiS.fused_first_use_check(device, l=9, d=16)
    assert DiS.SCAN_BACKEND == "auto"


def test_triton_softplus_keeps_its_relative_accuracy(st):
    """dt = softplus(delta) read back through a one-token scan (y = dt u B C = dt): right to float32's precision
    over the whole range, the very negative deltas (dt ~ e^delta, tiny) included."""
    delta = torch.linspace(-40, 40, 321, dtype=torch.float64)
    d = delta.numel()
    ones = lambda *shape: torch.ones(*shape, device=TRITON_DEVICE)   # noqa: E731
    y = st.selective_scan_triton(ones(1, d, 1), delta.float().to(TRITON_DEVICE)[None, :, None], -ones(d, 1),
                                 ones(1, 1, 1), ones(1, 1, 1), delta_softplus=True)
    expected = torch.where(delta > 30, delta, torch.log1p(torch.exp(delta)))
    torch.testing.assert_close(y.flatten().double().cpu(), expected, rtol=2e-6, atol=0)


def test_kernels_launch_under_their_tensors_device(st, monkeypatch):
    """Every function of scan_triton.py that launches a kernel makes its first tensor's CUDA device current, so a
    model on cuda:1 runs without torch.cuda.set_device; the guard itself, with a fake cuda:1 tensor."""
    import ast
    tree = ast.parse(open(os.path.join(HERE, "scan_triton.py")).read())
    launchers = {f.name: {ast.unparse(d) for d in f.decorator_list} for f in tree.body if isinstance(f, ast.FunctionDef)
                 and any(isinstance(n, ast.Subscript) and ast.unparse(n.value).endswith("_kernel") for n in ast.walk(f))}
    assert len(launchers) >= 6 and all("_on_its_device" in d for d in launchers.values()), launchers
    seen = []

    class Guard:
        def __init__(self, device):
            seen.append(torch.device(device))

        def __enter__(self):
            seen.append("in")

        def __exit__(self, *exc):
            seen.append("out")
    monkeypatch.setattr(torch.cuda, "device", Guard)
    run = st._on_its_device(lambda x, k=1: seen.append("ran") or k)
    assert run(fake_cuda(2, index=1), k=5) == 5 and seen == [torch.device("cuda", 1), "in", "ran", "out"]
    assert run(torch.zeros(2)) == 1 and seen[4:] == ["ran"]   # CPU tensors: nothing to guard


def test_DiS_and_scan_triton_copied_into_a_package(tmp_path):
    """pkg/DiS.py reaches pkg/scan_triton.py (not a top-level scan_triton) with only pkg's parent on sys.path, and
    runs the fused path there; DiS.py copied alone runs the model without it."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "alone").mkdir()
    for name, folder in (("DiS.py", "pkg"), ("scan_triton.py", "pkg"), ("DiS.py", "alone")):
        shutil.copy(os.path.join(HERE, name), tmp_path / folder / name)
    code = """if True:
        import sys, torch
        import pkg.DiS as D
        st = D.triton_module("fused")
        assert st.__name__ == "pkg.scan_triton" and "scan_triton" not in sys.modules, st.__name__
        torch.manual_seed(0)
        block = D.Block(8, n_layer=1)
        hidden, residual = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
        out = {}
        for backend in ("lean", "fused"):
            D.SCAN_BACKEND = backend
            out[backend] = block(hidden, residual)[0]
        torch.testing.assert_close(out["fused"], out["lean"], rtol=1e-4, atol=1e-5)
        sys.path.insert(0, sys.argv[1])
        import DiS
        m = DiS.create_model("DiS-T/4", image_size=8, in_channels=1)
        assert m(torch.randn(1, 1, 8, 8), torch.tensor([5])).shape == (1, 2, 8, 8)
        assert "scan_triton" not in sys.modules and DiS.resolve_auto("cpu")[0] == "lean"
        print("ok")
    """
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "alone")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


def test_every_kernel_compiles_for_real_gpus_without_spills():
    """What CI's interpreter never does: compile each kernel specialisation of a fused training step (DiS-S/2 in
    bf16 autocast and float32, DiS-H/2 on 256px latents) for sm_80 and sm_90 with Triton's own compiler and the
    ptxas in its wheel, no GPU; any compile error or register spill fails, naming the kernel and specialisation."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        ptxas = get_ptxas(90).path
    except Exception as e:
        ptxas, why = None, f"{type(e).__name__}: {e}"
    if not ptxas or not os.path.exists(ptxas):
        if CI:
            pytest.fail(f"Triton's ptxas is missing ({ptxas or why}): the kernels cannot be compiled")
        pytest.skip("needs the ptxas of Triton's wheel")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "bench.py", "--compile-kernels", "--arch", "80", "90"], cwd=HERE, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "all compile, no spills" in r.stdout
    rows = [line.split(" | ") for line in r.stdout.splitlines() if line.startswith("| _")]
    for arch in (80, 90):   # each part of the fused block, forward and backward, for each target
        names = {row[0][2:] for row in rows if row[1] == f"sm_{arch}"}
        for part in ("_scan_fwd", "_scan_bwd", "_conv_fwd", "_conv_bwd", "_add_rms_norm_fwd", "_add_rms_norm_bwd"):
            assert any(name.startswith(part) for name in names), (part, arch, names)


#################################################################################
#                                 Mixer and model                               #
#################################################################################

def test_mixer_runs_both_directions():
    torch.manual_seed(0)
    mixer = DiS.BiMamba(32, n_layer=2).double()
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    x2 = x.clone()
    x2[:, -1] += 1.0                                      # change only the last token
    first = lambda inp: mixer(inp)[:, 0]
    assert (first(x) - first(x2)).abs().max() > 1e-6      # the first output sees it: the backward branch ran
    x3 = x.clone()
    x3[:, 0] += 1.0
    assert (mixer(x)[:, -1] - mixer(x3)[:, -1]).abs().max() > 1e-6
    # and the mixer's init matches upstream Mamba
    for ssm in (mixer.forward_ssm, mixer.backward_ssm):
        torch.testing.assert_close(ssm.A_log[0].exp(), torch.arange(1, 17, dtype=torch.float64))
        dt = torch.nn.functional.softplus(ssm.dt_proj.bias)
        assert dt.min() >= 1e-4 - 1e-12 and dt.max() <= 0.1 + 1e-9
        assert ssm.dt_proj.weight.abs().max() <= 2 ** -0.5


def test_model_first_output_depends_on_last_patch():
    torch.manual_seed(0)
    m = tiny_model(num_classes=0)
    with torch.no_grad():
        m.final_layer.linear.weight.normal_()               # non-zero head, so outputs are not all 0
    m.eval()
    x = torch.randn(1, 3, 16, 16)
    x2 = x.clone()
    x2[..., -4:, -4:] += 1                                  # the last patch
    t = torch.tensor([10])
    assert (m(x, t)[..., :4, :4] - m(x2, t)[..., :4, :4]).abs().max() > 1e-6


def tiny_model(num_classes=0, in_channels=3, learn_sigma=True, image_size=16):
    return DiS.create_model("DiS-T/4", image_size=image_size, in_channels=in_channels, num_classes=num_classes,
                            learn_sigma=learn_sigma)


def conditional_model_and_batch():
    """A tiny class-conditional DiS whose output layer is not zero (so that every parameter gets a gradient),
    and a batch (x, t, y) of two, the same at every call."""
    torch.manual_seed(0)
    m = tiny_model(num_classes=10)
    with torch.no_grad():
        m.final_layer.linear.weight.normal_(std=0.1)
    return m, torch.randn(2, 3, 16, 16), torch.tensor([3, 700]), torch.tensor([1, 2])


PARAMS_32x32x3 = {"S": 28.49, "B": 119.20, "M": 229.45, "L": 404.11, "H": 900.69}
PARAMS_LATENT = {"S": 29.13, "B": 121.16, "M": 231.41, "L": 407.25, "H": 906.97}


@pytest.mark.parametrize("size", list(PARAMS_32x32x3))
def test_parameter_counts_match_official(size):
    with torch.device("meta"):
        a = DiS.DiS_models[f"DiS-{size}/2"](image_size=32, in_channels=3)
        b = DiS.DiS_models[f"DiS-{size}/2"](image_size=32, in_channels=4, num_classes=1000)
    for m, want in ((a, PARAMS_32x32x3[size]), (b, PARAMS_LATENT[size])):
        got = sum(p.numel() for p in m.parameters()) / 1e6
        assert abs(got / want - 1) < 0.005, (size, got, want)


def test_every_registered_model_builds_and_runs_on_meta():
    assert len(DiS.DiS_models) == 13
    for name, build in DiS.DiS_models.items():
        with torch.device("meta"):
            m = build(image_size=8, in_channels=4, num_classes=10)     # few tokens: the token loop is short
            out = m(torch.zeros(2, 4, 8, 8), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long))
        assert out.shape == (2, 8, 8, 8), name


@pytest.mark.parametrize("num_classes,learn_sigma", [(0, True), (10, True), (10, False)])
def test_output_is_zero_at_init_and_has_the_right_shape(num_classes, learn_sigma):
    torch.manual_seed(0)
    m = tiny_model(num_classes, in_channels=3, learn_sigma=learn_sigma)
    y = torch.randint(0, 10, (3,)) if num_classes else None
    out = m(torch.randn(3, 3, 16, 16), torch.randint(0, 1000, (3,)), y)
    assert out.shape == (3, 6 if learn_sigma else 3, 16, 16)
    assert torch.count_nonzero(out) == 0


def test_null_label_only_under_dropout_or_guidance():
    torch.manual_seed(0)
    m = tiny_model(num_classes=10)
    seen = []
    m.label_embed.embedding_table.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].clone()))
    y = torch.arange(10).repeat(20)                                  # 200 labels
    x, t = torch.randn(200, 3, 16, 16), torch.zeros(200, dtype=torch.long)
    m.eval()
    m(x, t, y)
    assert torch.equal(seen[-1], y)                                  # eval: labels untouched
    m.train()
    m(x, t, y)
    dropped = seen[-1] == 10
    assert 0 < dropped.sum() < 60 and torch.equal(seen[-1][~dropped], y[~dropped])  # about 10% dropped
    m.label_embed.dropout_prob = 1.0
    m(x, t, y)
    assert (seen[-1] == 10).all()


def test_grad_checkpoint_gives_the_same_gradients():
    m, x, t, y = conditional_model_and_batch()
    grads = []
    for ckpt in (False, True):
        m.grad_checkpoint = ckpt
        torch.manual_seed(1)                                          # same drop-path and label dropout
        m.zero_grad()
        m(x, t, y).square().sum().backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_flop_counter_matmul_part_matches_torch(monkeypatch):
    from torch.utils.flop_counter import FlopCounterMode
    import bench
    for num_classes in (0, 10):
        m = tiny_model(num_classes=num_classes)
        counted = bench.count_flops(m, batch=2)
        monkeypatch.setattr(DiS, "selective_scan", lambda u, *a, **k: u)   # leave the scan out
        monkeypatch.setattr(DiS, "SCAN_BACKEND", "lean")   # the readable blocks (auto's cpu_block has no Conv1d)
        y = torch.zeros(2, dtype=torch.long) if num_classes else None
        with FlopCounterMode(display=False) as fc:
            m(torch.randn(2, 3, 16, 16), torch.zeros(2, dtype=torch.long), y)
        monkeypatch.undo()
        assert counted["matmul"] == fc.get_total_flops()
        e, L = 2 * m.hidden_size, m.extras + m.num_patches
        assert counted["scan"] == 2 * (m.depth + 1) * 2 * e * L * (7 * 16 + 8)


def test_bad_model_inputs_raise():
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        DiS.create_model("DiS-T/4", image_size=30)
    with pytest.raises(ValueError, match="DiS-S/2"):
        DiS.create_model("DiS-X/2")
    m = tiny_model(num_classes=10)
    t = torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match=r"\(b, 3, 16, 16\)"):
        m(torch.randn(1, 1, 16, 16), t, torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="needs labels"):
        m(torch.randn(1, 3, 16, 16), t)
    with pytest.raises(ValueError, match="takes none"):
        tiny_model(num_classes=0)(torch.randn(1, 3, 16, 16), t, torch.zeros(1, dtype=torch.long))


#################################################################################
#                                   Diffusion                                   #
#################################################################################

def test_schedule_values():
    d = DiS.Diffusion()
    assert d.betas.dtype == d.alphas_cumprod.dtype == torch.float64 and len(d.betas) == 1000
    assert d.betas[0].item() == pytest.approx(1e-4) and d.betas[-1].item() == pytest.approx(0.02)
    assert d.betas[500].item() == pytest.approx(1e-4 + 500 * (0.02 - 1e-4) / 999)
    prod = 1.0
    for i in range(1000):
        prod *= 1 - (1e-4 + i * (0.02 - 1e-4) / 999)
    assert d.alphas_cumprod[-1].item() == pytest.approx(prod, rel=1e-9)
    r = d.respace(10)
    assert r.timestep_map.tolist() == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    torch.testing.assert_close(r.alphas_cumprod, d.alphas_cumprod[r.timestep_map])


@pytest.mark.parametrize("steps", [50, 100, 4000])
def test_schedule_of_any_length_ends_in_noise(steps):
    """DiT's scaling: T steps span betas 1000/T * (1e-4 .. 0.02), so x_T is as close to pure noise as at T = 1000."""
    d, d1000 = DiS.Diffusion(num_timesteps=steps), DiS.Diffusion()
    assert len(d.betas) == steps
    assert d.betas[0].item() == pytest.approx(1e-4 * 1000 / steps)
    assert d.betas[-1].item() == pytest.approx(0.02 * 1000 / steps)
    assert d.betas.sum().item() == pytest.approx(d1000.betas.sum().item(), rel=1e-9)   # the same total noise
    assert d.alphas_cumprod[-1].item() < 1e-4          # x_T is pure noise (unscaled, T = 100 kept 0.36)


def std_normal_cdf_approx(v):
    return 0.5 * (1 + math.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v ** 3)))


@pytest.mark.parametrize("t", [0, 500])
def test_training_loss_against_hand_computation(t):
    d = DiS.Diffusion()
    x0 = torch.tensor([[[[0.5, -1.0], [1.0, 0.2]]]], dtype=torch.float64)      # (1, 1, 2, 2)
    noise = torch.tensor([[[[0.3, -0.7], [1.1, 0.0]]]], dtype=torch.float64)
    eps_hat = torch.tensor([[[[0.1, -0.5], [0.9, 0.4]]]], dtype=torch.float64)
    v = torch.tensor([[[[0.2, -0.6], [1.0, -1.0]]]], dtype=torch.float64)
    model = lambda x, tt, y: torch.cat([eps_hat, v], dim=1)
    loss = d.training_loss(model, x0, t=torch.tensor([t]), noise=noise).item()

    beta = [1e-4 + i * (0.02 - 1e-4) / 999 for i in range(1000)]
    abar = [math.prod(1 - b for b in beta[:i + 1]) for i in range(1000)]
    abar_prev = 1.0 if t == 0 else abar[t - 1]
    post_var = lambda i: beta[i] * (1 - (abar[i - 1] if i else 1.0)) / (1 - abar[i])
    min_log = math.log(post_var(1) if t == 0 else post_var(t))
    max_log = math.log(beta[t])
    mse, vb = 0.0, 0.0
    for x, n, e, vv in zip(x0.flatten().tolist(), noise.flatten().tolist(), eps_hat.flatten().tolist(), v.flatten().tolist()):
        mse += (n - e) ** 2 / 4
        xt = math.sqrt(abar[t]) * x + math.sqrt(1 - abar[t]) * n
        c1 = beta[t] * math.sqrt(abar_prev) / (1 - abar[t])
        c2 = (1 - abar_prev) * math.sqrt(1 - beta[t]) / (1 - abar[t])
        x0_hat = (xt - math.sqrt(1 - abar[t]) * e) / math.sqrt(abar[t])
        mean, true_mean = c1 * x0_hat + c2 * xt, c1 * x + c2 * xt
        frac = (vv + 1) / 2
        log_var = frac * max_log + (1 - frac) * min_log
        if t == 0:
            s = math.exp(-0.5 * log_var)
            if x < -0.999:
                p = std_normal_cdf_approx(s * (x - mean + 1 / 255))
            elif x > 0.999:
                p = 1 - std_normal_cdf_approx(s * (x - mean - 1 / 255))
            else:
                p = std_normal_cdf_approx(s * (x - mean + 1 / 255)) - std_normal_cdf_approx(s * (x - mean - 1 / 255))
            vb += -math.log(max(p, 1e-12)) / math.log(2) / 4
        else:
            true_log_var = min_log
            kl = 0.5 * (-1 + log_var - true_log_var + math.exp(true_log_var - log_var)
                        + (true_mean - mean) ** 2 * math.exp(-log_var))
            vb += kl / math.log(2) / 4
    assert loss == pytest.approx(mse + vb, rel=1e-9)


def test_vlb_trains_only_the_variance():
    d = DiS.Diffusion()
    x0, t = torch.rand(2, 1, 4, 4) * 2 - 1, torch.tensor([3, 600])
    noise = torch.randn_like(x0)
    out = torch.randn(2, 2, 4, 4, requires_grad=True)
    d.training_loss(lambda x, tt, y: out, x0, t=t, noise=noise).backward()
    mse = DiS.mean_flat((noise - out[:, :1]) ** 2).mean()
    g_mse = torch.autograd.grad(mse, out)[0]
    x_t = d.q_sample(x0, t, noise)
    g_vb = torch.autograd.grad(d.vb_terms_bpd(out, x0, x_t, t).mean(), out)[0]
    torch.testing.assert_close(out.grad[:, :1], g_mse[:, :1])          # eps: the MSE's gradient alone
    assert g_vb[:, :1].abs().max() > 0                                 # (the VLB would move eps if not detached)
    torch.testing.assert_close(out.grad[:, 1:], g_vb[:, 1:])           # variance: the VLB's gradient
    assert out.grad[:, 1:].abs().max() > 0


def test_loss_decreases_when_overfitting_one_batch():
    torch.manual_seed(0)
    m = tiny_model(num_classes=0)
    d = DiS.Diffusion()
    x0 = torch.rand(4, 3, 16, 16) * 2 - 1
    t, noise = torch.tensor([50, 300, 600, 900]), torch.randn(4, 3, 16, 16)
    opt = torch.optim.Adam(m.parameters(), lr=2e-3)
    losses = []
    for _ in range(25):
        loss = d.training_loss(m, x0, t=t, noise=noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0]


class AnalyticPredictor:
    """The exact noise predictor when the data set is the single point x0: eps = (x_t - sqrt(abar) x0) / sqrt(1-abar).
    Called with training timesteps, as a DiS model; returns zero variance channels."""
    num_classes = 0

    def __init__(self, x0):
        self.x0, self.abar, self.calls = x0, DiS.Diffusion().alphas_cumprod, []

    def __call__(self, x, t, y):
        self.calls.append(t.clone())
        a = self.abar[t].to(x.dtype).view(-1, 1, 1, 1)
        eps = (x - a.sqrt() * self.x0) / (1 - a).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], dim=1)


@pytest.mark.parametrize("sampler,steps", [("ddim", 50), ("ddpm", 50), ("ddpm", 1000), ("ddim", 2)])
def test_samplers_recover_the_single_data_point(sampler, steps):
    x0 = torch.tensor([0.7, -0.3, 0.1, -0.9], dtype=torch.float64).view(1, 1, 2, 2)
    fn = AnalyticPredictor(x0)
    g = torch.Generator().manual_seed(0)
    x = DiS.Diffusion().sample(fn, (1, 1, 2, 2), steps=steps, sampler=sampler, generator=g)
    torch.testing.assert_close(x.double(), x0, rtol=0, atol=1e-4)
    assert len(fn.calls) == steps                                      # respacing really skips network calls
    used = torch.stack(fn.calls)[:, 0]
    assert used[0] == 999 and used[-1] == 0 and used.max() <= 999     # training timesteps, not indices


def test_sampler_intermediate_states_follow_the_forward_process():
    """With the single-point data set, the exact model also gives the exact variance (v = -1: the posterior's),
    so every DDPM state x_t is distributed as q(x_t | x0) = N(sqrt(abar_t) x0, 1 - abar_t), and DDIM keeps
    (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t) equal to the starting noise at every step."""
    x0 = torch.full((1, 1, 64, 64), 0.4, dtype=torch.float64)            # 4096 independent pixels
    abar = DiS.Diffusion().alphas_cumprod
    seen = []

    def fn(x, t, y):
        seen.append((x.clone(), int(t[0])))
        a = abar[t].view(-1, 1, 1, 1)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return torch.cat([eps, -torch.ones_like(eps)], dim=1)
    DiS.Diffusion().sample(fn, (1, 1, 64, 64), steps=20, sampler="ddpm", generator=torch.Generator().manual_seed(0),
                           device="cpu")
    for x, t in seen[1:]:                                                 # after the first, noise-only state
        mean, var = abar[t].sqrt() * 0.4, 1 - abar[t]
        assert abs(x.mean() - mean) < 5 * (var / 4096) ** 0.5 + 1e-6, t
        assert abs(x.var() / var - 1) < 5 * (2 / 4096) ** 0.5, t
    seen.clear()
    DiS.Diffusion().sample(fn, (1, 1, 64, 64), steps=20, sampler="ddim", generator=torch.Generator().manual_seed(0),
                           device="cpu")
    first = None
    for x, t in seen:
        eps = (x - abar[t].sqrt() * x0) / (1 - abar[t]).sqrt()
        first = eps if first is None else first
        torch.testing.assert_close(eps, first, rtol=1e-5, atol=1e-5)   # x is float32


def test_samplers_shapes_and_reproducibility():
    m = tiny_model(num_classes=0).eval()
    d = DiS.Diffusion()
    for sampler in ("ddpm", "ddim"):
        a = d.sample(m, (2, 3, 16, 16), steps=3, sampler=sampler, generator=torch.Generator().manual_seed(1))
        b = d.sample(m, (2, 3, 16, 16), steps=3, sampler=sampler, generator=torch.Generator().manual_seed(1))
        c = d.sample(m, (2, 3, 16, 16), steps=3, sampler=sampler, generator=torch.Generator().manual_seed(2))
        assert a.shape == (2, 3, 16, 16) and torch.equal(a, b) and not torch.equal(a, c)


def test_sampling_a_model_in_training_mode_samples_it_in_eval_mode():
    """Label dropout and drop-path are for training: sample() runs the model in eval mode (the same samples as
    an eval-mode model from the same generator) and gives every module its mode back."""
    m, _, _, y = conditional_model_and_batch()
    m.drop_path_rate = 0.5
    for block in m.modules():
        if isinstance(block, DiS.Block):
            block.drop_prob = 0.5
    m.label_embed.dropout_prob = 0.5
    d = DiS.Diffusion()
    kw = dict(y=y, steps=3, sampler="ddpm", cfg_scale=2.0)
    expected = d.sample(m.eval(), (2, 3, 16, 16), generator=torch.Generator().manual_seed(1), **kw)
    m.train()
    m.final_layer.eval()   # a mixed state comes back as it was
    got = d.sample(m, (2, 3, 16, 16), generator=torch.Generator().manual_seed(1), **kw)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert m.training and m.label_embed.training and not m.final_layer.training


def test_ddim_at_eta_0_draws_only_its_starting_noise():
    m = tiny_model(num_classes=0).eval()
    g = torch.Generator().manual_seed(3)
    DiS.Diffusion().sample(m, (2, 3, 16, 16), steps=4, sampler="ddim", eta=0.0, generator=g)
    after_start = torch.Generator().manual_seed(3)
    torch.randn((2, 3, 16, 16), generator=after_start)
    assert torch.equal(g.get_state(), after_start.get_state())
    DiS.Diffusion().sample(m, (2, 3, 16, 16), steps=4, sampler="ddim", eta=1.0, generator=g)   # eta > 0 draws
    torch.randn((2, 3, 16, 16), generator=after_start)
    assert not torch.equal(g.get_state(), after_start.get_state())


def test_schedule_tables_move_to_a_device_once_per_dtype(monkeypatch):
    """Sampling reads the schedule tables at every step: each is cast and moved once per device and dtype, never
    as float64 (some devices have none)."""
    m = tiny_model(num_classes=0).eval()
    d = DiS.Diffusion()
    moves = []
    to = torch.Tensor.to

    def counting_to(self, *args, **kwargs):
        if self.dtype == torch.float64 and any(isinstance(a, (str, torch.device)) for a in args):
            raise AssertionError("a float64 table moved to a device")
        if self.ndim == 1 and len(self) in (1000, 5):   # a table of the schedule or of the respaced one
            moves.append(args)
        return to(self, *args, **kwargs)
    monkeypatch.setattr(torch.Tensor, "to", counting_to)
    d.training_loss(m, torch.randn(2, 3, 16, 16))
    d.training_loss(m, torch.randn(2, 3, 16, 16))
    schedule = d.respace(5)
    monkeypatch.setattr(d, "respace", lambda steps: schedule)
    d.sample(m, (2, 3, 16, 16), steps=5, sampler="ddpm")
    moves.clear()
    d.sample(m, (2, 3, 16, 16), steps=5, sampler="ddpm")
    d.training_loss(m, torch.randn(2, 3, 16, 16))
    assert moves == []   # the second time, every table was there already
    assert {dtype for _, _, dtype in [*d._on_device, *schedule._on_device]} == {torch.float32, torch.int64}
    for x in list(d._on_device.values()) + list(schedule._on_device.values()):
        assert x.dtype != torch.float64


def test_guidance_uses_null_label_and_guides_every_channel():
    seen = []

    def fn(x, t, y):                          # "noise" = label value on all 4 channels, variance = +1 / -1
        seen.append(y.clone())
        eps = y.float().view(-1, 1, 1, 1).expand(-1, 4, 2, 2)
        var = torch.where(y == 7, -1.0, 1.0).view(-1, 1, 1, 1).expand(-1, 4, 2, 2)
        return torch.cat([eps, var], 1)
    fn.num_classes = 7
    d = DiS.Diffusion()
    y = torch.tensor([2, 5])
    captured = {}
    orig = DiS.Diffusion.p_mean_variance

    def spy(self, out, x, t, clip=False):
        captured["out"] = out.clone()
        return orig(self, out, x, t, clip)
    DiS.Diffusion.p_mean_variance = spy
    try:
        d.sample(fn, (2, 4, 2, 2), y=y, steps=2, sampler="ddim", cfg_scale=3.0)
    finally:
        DiS.Diffusion.p_mean_variance = orig
    assert seen[0].tolist() == [2, 5, 7, 7]                              # one batch: conditional, then null
    eps = captured["out"][:, :4]
    torch.testing.assert_close(eps[:, :, 0, 0], (7 + 3.0 * (y.float() - 7)).view(-1, 1).expand(-1, 4))
    assert (captured["out"][:, 4:] == 1.0).all()                         # variance from the conditional half
    # unconditional models never go through the guidance path
    seen.clear()
    d.sample(lambda x, t, y: (seen.append(y), torch.zeros(2, 8, 2, 2))[1], (2, 4, 2, 2), steps=2, sampler="ddim")
    assert seen == [None, None]


def test_sample_rejects_bad_input():
    d = DiS.Diffusion()
    m = tiny_model(num_classes=10).eval()
    with pytest.raises(ValueError, match=r"\[0, 9\]"):
        d.sample(m, (1, 3, 16, 16), y=torch.tensor([10]), steps=2)
    with pytest.raises(ValueError, match="needs class labels"):
        d.sample(tiny_model().eval(), (1, 3, 16, 16), steps=2, cfg_scale=2.0)
    with pytest.raises(ValueError, match="unconditional"):
        d.sample(tiny_model().eval(), (1, 3, 16, 16), y=torch.tensor([1]), steps=2)
    with pytest.raises(ValueError, match="sampler"):
        d.sample(m, (1, 3, 16, 16), y=torch.tensor([1]), steps=2, sampler="euler")


#################################################################################
#                          train.py and sample.py, end to end                   #
#################################################################################
# Real data: Fashion-MNIST from Debian's dataset-fashion-mnist package (CI installs it).

def run_script(*args, env=None, ok=True):
    e = {**os.environ, "OMP_NUM_THREADS": "2", **(env or {})}
    r = subprocess.run([sys.executable, *args], cwd=HERE, capture_output=True, text=True, env=e, timeout=600)
    if ok:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


# Runs scripts one after another in one Python process (torch imported once), each as `python script args`
# would (runpy, as __main__), and prints a JSON list of their exit codes and stderr. Modules the scripts import
# stay imported between runs: only for runs that end early (bad inputs).
ONE_PROCESS_DRIVER = """
import contextlib, io, json, runpy, sys, traceback
out = []
for argv in json.loads(sys.argv[1]):
    err, code = io.StringIO(), 0
    sys.argv = list(argv)
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            runpy.run_path(argv[0], run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc(file=err)
            code = 1
    out.append((code, err.getvalue()))
print(json.dumps(out))
"""


def run_scripts_in_one_process(argvs, env=None):
    """[subprocess-like results (returncode, stderr)] of each script run in argvs, all in one process."""
    r = run_script("-c", ONE_PROCESS_DRIVER, json.dumps(argvs), env=env)
    return [types.SimpleNamespace(returncode=code, stderr=err) for code, err in json.loads(r.stdout)]


def expect_user_error(r, *patterns):
    """A bad input ends with one line 'error: ...' and exit code 2: no traceback."""
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), last
    for p in patterns:
        assert p in last, (p, last)


def logged_losses(run_dir):
    with open(os.path.join(run_dir, "log.txt")) as f:
        return {int(line.split()[1]): line.split()[3] for line in f if line.startswith("step ")}


FAST = ["--model", "DiS-T/4", "--global-batch-size", "8", "--num-workers", "0", "--log-every", "1", "--sample-steps", "2"]


@pytest.fixture(scope="session")
def fmnist(tmp_path_factory):
    if not os.path.isdir("/usr/share/datasets/fashion-mnist"):
        if CI:
            pytest.fail("apt-get install dataset-fashion-mnist")
        pytest.skip("needs Debian's dataset-fashion-mnist")
    return str(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def fmnist_run(fmnist, tmp_path_factory):
    """One short training run on Fashion-MNIST: 4 steps, a checkpoint and a preview grid every 2."""
    results = str(tmp_path_factory.mktemp("results"))
    run_script("train.py", "--dataset", "fashion-mnist", "--data-path", fmnist, "--results-dir", results,
               "--max-steps", "4", "--ckpt-every", "2", "--sample-every", "2", *FAST)
    return os.path.join(results, "000-DiS-T-4")


def test_train_on_fashion_mnist_writes_checkpoints_and_grids(fmnist_run):
    assert sorted(os.listdir(os.path.join(fmnist_run, "checkpoints"))) == ["0000002.pt", "0000004.pt"]
    assert sorted(os.listdir(os.path.join(fmnist_run, "samples"))) == ["0000002.png", "0000004.png"]
    ckpt = torch.load(os.path.join(fmnist_run, "checkpoints", "0000004.pt"), weights_only=True)
    assert ckpt["step"] == 4 and ckpt["args"]["model"] == "DiS-T/4" and {"model", "ema", "opt"} <= ckpt.keys()
    assert ckpt["config"]["in_channels"] == 1 and ckpt["config"]["input_size"] == 32
    # the EMA warm-up makes early EMA weights follow the model, not stay at the initial ones
    init = DiS.create_model("DiS-T/4", image_size=32, in_channels=1).final_layer.linear.weight
    assert torch.count_nonzero(init) == 0 and torch.count_nonzero(ckpt["ema"]["final_layer.linear.weight"]) > 0
    from PIL import Image
    with Image.open(os.path.join(fmnist_run, "samples", "0000004.png")) as im:
        assert im.size == (4 * 32 + 5 * 2, 4 * 32 + 5 * 2)           # a 4x4 grid with 2px padding
    assert len(logged_losses(fmnist_run)) == 4
    with open(os.path.join(fmnist_run, "log.txt")) as f:   # which scan ran, and why, comes first
        assert f.readline().strip() == "scan backend: lean (auto: PyTorch on cpu, small blocks token-major)"


def test_resume_continues_the_same_loss_trajectory(fmnist, fmnist_run, tmp_path):
    run = tmp_path / "000-resumed"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(os.path.join(fmnist_run, "checkpoints", "0000002.pt"), run / "checkpoints")
    run_script("train.py", "--resume", str(run / "checkpoints" / "0000002.pt"), "--max-steps", "4", "--num-workers", "0")
    full, resumed = logged_losses(fmnist_run), logged_losses(str(run))
    assert sorted(resumed) == [3, 4]
    assert resumed[3] == full[3] and resumed[4] == full[4]            # bit-exact, as printed to 6 decimals
    a = torch.load(run / "checkpoints" / "0000004.pt", weights_only=True)
    b = torch.load(os.path.join(fmnist_run, "checkpoints", "0000004.pt"), weights_only=True)
    for k in b["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_resume_gives_settings_newer_than_the_checkpoint_their_defaults(fmnist_run, tmp_path):
    import train
    from dis_cli import resume
    ckpt = torch.load(os.path.join(fmnist_run, "checkpoints", "0000002.pt"), weights_only=True)
    del ckpt["args"]["sample_cfg_scale"]   # as written before that flag existed
    (tmp_path / "checkpoints").mkdir()
    torch.save(ckpt, tmp_path / "checkpoints" / "0000002.pt")
    args, given = train.parse_args(["--resume", str(tmp_path / "checkpoints" / "0000002.pt"), "--max-steps", "9"])
    _, _, merged = resume(args, given, train.RESUME_MAY_CHANGE)
    assert merged.sample_cfg_scale == 4.0 and merged.max_steps == 9 and merged.model == "DiS-T/4"


def test_resuming_an_older_checkpoint_starts_a_new_run_folder(fmnist_run, tmp_path):
    """The run already went on to step 4: continuing from step 2 must not mix with it."""
    res = str(tmp_path / "res")
    run_script("train.py", "--resume", os.path.join(fmnist_run, "checkpoints", "0000002.pt"), "--max-steps", "3",
               "--results-dir", res, "--num-workers", "0")
    assert sorted(os.listdir(os.path.join(fmnist_run, "checkpoints"))) == ["0000002.pt", "0000004.pt"]
    assert os.listdir(os.path.join(res, "000-DiS-T-4", "checkpoints")) == ["0000003.pt"]


def test_sample_writes_an_npz_from_the_checkpoint(fmnist_run, tmp_path):
    out = str(tmp_path / "s")
    run_script("sample.py", "--ckpt", os.path.join(fmnist_run, "checkpoints", "0000004.pt"), "--num-samples", "5",
               "--batch-size", "3", "--sampler", "ddim", "--num-sampling-steps", "3", "--out", out)
    import numpy as np
    d = np.load(out + ".npz")
    assert d["arr_0"].shape == (5, 32, 32, 1) and d["arr_0"].dtype == np.uint8
    assert d["labels"].tolist() == [-1] * 5 and os.path.exists(out + ".png")
    r = run_script("sample.py", "--ckpt", os.path.join(fmnist_run, "checkpoints", "0000004.pt"), "--num-samples", "2",
                   "--out", out, ok=False)
    expect_user_error(r, "exists already")                            # never overwrites


def test_readme_fid_folders_from_a_dataset_and_from_samples(fmnist, fmnist_run, tmp_path):
    """The README's FID recipe up to pytorch-fid itself (which downloads its Inception weights): sample.py's .npz and
    the training set as PNG folders, the reference images exactly as train.py reads them."""
    import numpy as np
    from PIL import Image
    npz = str(tmp_path / "s")
    run_script("sample.py", "--ckpt", fmnist_run, "--num-samples", "3", "--sampler", "ddim", "--num-sampling-steps",
               "2", "--out", npz)
    r = run_script("dis_data.py", "--npz", npz + ".npz", "--out", str(tmp_path / "samples_png"))
    assert "wrote 3 images" in r.stdout
    arr = np.load(npz + ".npz")["arr_0"]
    for i in range(3):
        with Image.open(tmp_path / "samples_png" / f"{i:06d}.png") as im:
            assert np.array_equal(np.asarray(im), arr[i, ..., 0])
    run_script("dis_data.py", "--dataset", "fashion-mnist", "--data-path", fmnist, "--num", "5",
               "--out", str(tmp_path / "ref"))
    from dis_data import make_dataset
    ds, _, _ = make_dataset("fashion-mnist", fmnist, 32, False)
    drawn = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:5].tolist()   # at random, seed 0
    assert sorted(os.listdir(tmp_path / "ref")) == [f"{i:06d}.png" for i in range(5)]
    for k, i in enumerate(drawn):
        with Image.open(tmp_path / "ref" / f"{k:06d}.png") as im:   # the training image itself, padded to 32x32
            assert np.array_equal(np.asarray(im), (ds[i][0][0] * 255).round().to(torch.uint8).numpy())
    expect_user_error(run_script("dis_data.py", "--npz", npz + ".npz", "--out", str(tmp_path / "ref"), ok=False),
                      "not empty")                                     # nothing is overwritten
    expect_user_error(run_script("dis_data.py", "--npz", "missing.npz", "--out", str(tmp_path / "new"), ok=False),
                      "does not exist")


def make_pngs(root, classes, n, size=20):
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for c in classes:
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(n):
            a = (torch.rand(size, size + 4, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(a).save(os.path.join(root, c, f"{i}.png"))


def test_folder_dataset_conditional_and_flat(tmp_path):
    make_pngs(str(tmp_path / "imgs"), ["cat", "dog"], 4)
    res = str(tmp_path / "res")
    run_script("train.py", "--dataset", "folder", "--data-path", str(tmp_path / "imgs"), "--image-size", "16",
               "--class-cond", "--results-dir", res, "--max-steps", "2", "--ckpt-every", "2", "--sample-every", "0", *FAST)
    ckpt_path = os.path.join(res, "000-DiS-T-4", "checkpoints", "0000002.pt")
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert ckpt["config"]["num_classes"] == 2 and ckpt["config"]["input_size"] == 16
    out = str(tmp_path / "cond")
    run_script("sample.py", "--ckpt", ckpt_path, "--num-samples", "4", "--sampler", "ddim", "--num-sampling-steps", "2",
               "--class-labels", "1", "--cfg-scale", "2", "--out", out)
    import numpy as np
    d = np.load(out + ".npz")
    assert d["arr_0"].shape == (4, 16, 16, 3) and d["labels"].tolist() == [1, 1, 1, 1]
    r = run_script("sample.py", "--ckpt", ckpt_path, "--class-labels", "2", "--out", str(tmp_path / "x"), ok=False)
    expect_user_error(r, "[0, 1]")
    # a flat folder trains an unconditional model; the next run gets the next numbered folder
    make_pngs(str(tmp_path / "flat"), ["."], 8)
    run_script("train.py", "--dataset", "folder", "--data-path", str(tmp_path / "flat"), "--image-size", "16",
               "--results-dir", res, "--max-steps", "1", "--sample-every", "0", *FAST)
    assert sorted(os.listdir(res)) == ["000-DiS-T-4", "001-DiS-T-4"]
    r = run_script("train.py", "--dataset", "folder", "--data-path", str(tmp_path / "flat"), "--image-size", "16",
                   "--class-cond", "--results-dir", res, "--max-steps", "1", *FAST, ok=False)
    expect_user_error(r, "one subfolder per class")
    r = run_script("train.py", "--dataset", "folder", "--data-path", str(tmp_path / "flat"), "--image-size", "30",
                   "--results-dir", res, *FAST, ok=False)
    expect_user_error(r, "patch size 4")


def test_latents_with_a_tiny_vae(tmp_path):
    diffusers = need("diffusers")
    vae = diffusers.AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, layers_per_block=1,
                                  norm_num_groups=8, sample_size=16)
    vae.save_pretrained(str(tmp_path / "vae"))
    make_pngs(str(tmp_path / "imgs"), ["a", "b"], 4)
    lat, res = str(tmp_path / "lat"), str(tmp_path / "res")
    run_script("encode_latents.py", "--data-path", str(tmp_path / "imgs"), "--latents-path", lat,
               "--image-size", "16", "--vae", str(tmp_path / "vae"), "--num-workers", "0")
    r = run_script("encode_latents.py", "--data-path", str(tmp_path / "imgs"), "--latents-path", lat, ok=False)
    expect_user_error(r, "already holds latents")                              # never overwrites
    shard = torch.load(os.path.join(lat, "shard_00000.pt"), weights_only=True)
    assert shard["latents"].shape == (8, 4, 8, 8) and shard["labels"].tolist() == [0] * 4 + [1] * 4
    run_script("train.py", "--dataset", "latents", "--data-path", lat, "--image-size", "16", "--class-cond",
               "--results-dir", res, "--max-steps", "2", "--ckpt-every", "2", "--sample-every", "2", *FAST)
    ckpt_path = os.path.join(res, "000-DiS-T-4", "checkpoints", "0000002.pt")
    assert torch.load(ckpt_path, weights_only=True)["config"]["in_channels"] == 4
    out = str(tmp_path / "s")
    run_script("sample.py", "--ckpt", ckpt_path, "--num-samples", "2", "--sampler", "ddim", "--num-sampling-steps", "2",
               "--out", out)
    import numpy as np
    assert np.load(out + ".npz")["arr_0"].shape == (2, 16, 16, 3)          # decoded by the VAE
    # without diffusers, only these steps fail, with the pip command
    fake = tmp_path / "nodiffusers" / "diffusers"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('no diffusers here')\n")
    r = run_script("sample.py", "--ckpt", ckpt_path, "--num-samples", "1", "--out", str(tmp_path / "t"),
                   env={"PYTHONPATH": str(tmp_path / "nodiffusers")}, ok=False)
    expect_user_error(r, "pip install diffusers")


def test_ddp_two_cpu_processes_stay_identical(fmnist, tmp_path):
    res = str(tmp_path / "res")
    run_script("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517", "train.py",
               "--dataset", "fashion-mnist", "--data-path", fmnist, "--results-dir", res, "--max-steps", "3",
               "--ckpt-every", "3", "--sample-every", "0", "--device", "cpu", *FAST, env={"OMP_NUM_THREADS": "1"})
    with open(os.path.join(res, "000-DiS-T-4", "log.txt")) as f:
        log = f.read()
    assert "2 process(es)" in log and "replicas identical: True" in log
    assert "shards disjoint: True" in log


def test_bad_inputs_end_with_one_line(fmnist, fmnist_run, tmp_path):
    ckpt = os.path.join(fmnist_run, "checkpoints", "0000004.pt")
    cases = [
        (["train.py", "--dataset", "folder", "--data-path", str(tmp_path / "missing")], ["does not exist"]),
        (["train.py", "--dataset", "folder", "--data-path", str(tmp_path)], ["no images"]),
        (["train.py", "--dataset", "cifar10", "--data-path", str(tmp_path / "c10"), "--results-dir", str(tmp_path / "r")],
         ["cifar10", "cifar-10-python.tar.gz"]),
        (["train.py", "--dataset", "fashion-mnist", "--image-size", "64"], ["--image-size applies to"]),
        (["train.py", "--resume", ckpt, "--model", "DiS-T/2"], ["has --model DiS-T/4", "drop --model"]),
        (["train.py", "--resume", fmnist_run, "--lr", "0.5"], ["has --lr 0.0001", "drop --lr"]),
        (["train.py", "--resume", "auto"], ["no run in", "has a checkpoint"]),
        (["sample.py", "--ckpt", str(tmp_path)], ["folder without checkpoints"]),
        (["train.py", "--dataset", "latents", "--data-path", str(tmp_path)], ["not a latents folder"]),
        (["train.py", "--dataset", "latents", "--data-path", str(tmp_path / "lat")], ["no latent shards"]),
        (["sample.py", "--ckpt", str(tmp_path / "nope.pt")], ["does not exist"]),
        (["sample.py", "--ckpt", ckpt, "--cfg-scale", "2"], ["unconditional"]),
        (["sample.py", "--ckpt", ckpt, "--num-sampling-steps", "1"], ["[2, 1000]"]),
        (["train.py", "--sample-steps", "1"], ["--sample-steps must be at least 2"]),
        (["train.py", "--sample-steps", "1001"], ["--sample-steps", "[2, 1000]"]),
        (["train.py", "--max-steps", "0"], ["--max-steps must be at least 1"]),
        (["train.py", "--dataset", "fashion-mnist", "--data-path", fmnist, "--log-every", "0"], ["--log-every"]),
    ]
    (tmp_path / "lat").mkdir()
    (tmp_path / "lat" / "meta.json").write_text('{"vae": "x", "image_size": 256, "num_classes": 0, "count": 0}')
    (tmp_path / "text.pt").write_text("not a checkpoint")
    cases.append((["sample.py", "--ckpt", str(tmp_path / "text.pt")], ["not a readable checkpoint"]))
    with open(ckpt, "rb") as f:
        (tmp_path / "truncated.pt").write_bytes(f.read()[:5000])
    cases.append((["sample.py", "--ckpt", str(tmp_path / "truncated.pt")], ["not a readable checkpoint"]))
    other = torch.load(ckpt, weights_only=True)
    other["config"]["model"] = "DiS-T/2"
    torch.save(other, tmp_path / "other.pt")
    cases.append((["sample.py", "--ckpt", str(tmp_path / "other.pt")], ["do not fit this model"]))
    other["config"]["model"] = "DiS-Q/2"
    torch.save(other, tmp_path / "unknown.pt")
    cases.append((["sample.py", "--ckpt", str(tmp_path / "unknown.pt")], ["cannot build"]))
    torch.save({"weights": 1}, tmp_path / "foreign.pt")
    cases.append((["sample.py", "--ckpt", str(tmp_path / "foreign.pt")], ["not a DiS checkpoint"]))
    # a fast path that cannot run here (Triton's interpreter off, no mamba-ssm on a CPU)
    for backend, pattern in (("fused", "needs a CUDA device"), ("mamba_ssm", "needs mamba-ssm")):
        cases.append((["sample.py", "--ckpt", ckpt, "--scan-backend", backend, "--device", "cpu"],
                      [f"--scan-backend {backend}", pattern]))
    argvs = [args + ["--results-dir", str(tmp_path / "r")] if args[0] == "train.py" and "--results-dir" not in args
             else args for args, _ in cases]
    # the first case as a real process, the others in one process (a process per case took about two minutes)
    results = [run_script(*argvs[0], ok=False)] + run_scripts_in_one_process(argvs[1:], env={"TRITON_INTERPRET": "0"})
    for r, (_, patterns) in zip(results, cases, strict=True):
        expect_user_error(r, *patterns)


def train_in_process(*argv):
    """train.py's main in this process (for tests that patch what it calls); returns its UserError or None."""
    import dis_cli
    import train
    try:
        train.main(*train.parse_args(list(argv)))
    except dis_cli.UserError as e:
        return e


@pytest.mark.parametrize("what", ["loss", "gradient norm"])
def test_non_finite_values_stop_without_saving(fmnist, tmp_path, monkeypatch, what):
    """A NaN loss, or a finite loss with an infinite gradient, at step 3: nothing is written after step 2."""
    res = str(tmp_path / "res")
    calls = {"n": 0}
    if what == "loss":
        real = DiS.Diffusion.training_loss

        def poisoned(self, *a, **k):
            calls["n"] += 1
            return real(self, *a, **k) * (float("nan") if calls["n"] == 3 else 1.0)
        monkeypatch.setattr(DiS.Diffusion, "training_loss", poisoned)
    else:
        real = torch.nn.utils.clip_grad_norm_

        def poisoned(*a, **k):
            calls["n"] += 1
            norm = real(*a, **k)
            return norm * float("inf") if calls["n"] == 3 else norm
        monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", poisoned)
    err = train_in_process("--dataset", "fashion-mnist", "--data-path", fmnist, "--results-dir", res, "--max-steps",
                           "4", "--ckpt-every", "2", "--sample-every", "0", *FAST)
    assert err is not None and f"the {what} became" in str(err) and "at step 3" in str(err), err
    run = os.path.join(res, "000-DiS-T-4")
    assert os.listdir(os.path.join(run, "checkpoints")) == ["0000002.pt"]
    assert torch.load(os.path.join(run, "checkpoints", "0000002.pt"), weights_only=True)["step"] == 2
    with open(os.path.join(run, "log.txt")) as f:
        assert f.read().strip().splitlines()[-1].startswith(f"error: the {what} became")


def test_ctrl_c_saves_a_checkpoint_then_exits(fmnist, tmp_path):
    """Also: a CPU run projected to take over a day says so after its first steps, and goes on."""
    import signal
    res = str(tmp_path / "res")
    p = subprocess.Popen([sys.executable, "train.py", "--dataset", "fashion-mnist", "--data-path", fmnist,
                          "--results-dir", res, "--epochs", "1400", "--sample-every", "0", *FAST,
                          "--num-workers", "1"],          # a data worker too: it must not break the shutdown
                         cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = os.path.join(res, "000-DiS-T-4", "log.txt")
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(log) and "step 0000007" in open(log).read()):
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-2000:]
    saved = os.listdir(os.path.join(res, "000-DiS-T-4", "checkpoints"))
    assert len(saved) == 1
    step = torch.load(os.path.join(res, "000-DiS-T-4", "checkpoints", saved[0]), weights_only=True)["step"]
    assert 7 <= step < 1000 and saved[0] == f"{step:07d}.pt"
    text = open(log).read()
    assert f"interrupted at step {step}" in text and "done at" not in text
    note = next(line for line in text.splitlines() if line.startswith("note: "))
    assert "days" in note and "CPU quickstart" in note and note[6:] in out       # in log.txt and on the screen


def test_mnist_reads_raw_idx_files_offline(fmnist, tmp_path):
    """--dataset mnist with its raw files in place (Fashion-MNIST's share MNIST's names and format)."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for gz in os.listdir("/usr/share/datasets/fashion-mnist"):
        with gzip.open(os.path.join("/usr/share/datasets/fashion-mnist", gz)) as f:
            (raw / gz[:-3]).write_bytes(f.read())
    res = str(tmp_path / "res")
    run_script("train.py", "--dataset", "mnist", "--data-path", str(tmp_path), "--results-dir", res,
               "--max-steps", "1", "--sample-every", "0", *FAST)
    ckpt = torch.load(os.path.join(res, "000-DiS-T-4", "checkpoints", "0000001.pt"), weights_only=True)
    assert ckpt["config"]["dataset"] == "mnist" and ckpt["config"]["in_channels"] == 1


def test_latent_shards_index_across_shards(tmp_path):
    import dis_data
    lat = torch.arange(5 * 4 * 2 * 2, dtype=torch.float16).view(5, 4, 2, 2)
    torch.save({"latents": lat[:3], "labels": torch.tensor([0, 1, 2])}, tmp_path / "shard_00000.pt")
    torch.save({"latents": lat[3:], "labels": torch.tensor([3, 4])}, tmp_path / "shard_00001.pt")
    ds = dis_data.LatentShards(str(tmp_path))
    assert len(ds) == 5
    for i in range(5):
        x, y = ds[i]
        assert y == i and x.dtype == torch.float32 and torch.equal(x, lat[i].float())


def test_resume_auto_picks_the_run_that_matches_the_flags(fmnist, fmnist_run, tmp_path):
    res = tmp_path / "res"
    shutil.copytree(fmnist_run, res / "000-DiS-T-4")                  # unconditional, step 4, the older run
    run_script("train.py", "--dataset", "fashion-mnist", "--data-path", fmnist, "--results-dir", str(res),
               "--class-cond", "--max-steps", "1", "--sample-every", "0", *FAST)      # 001: the newest run
    r = run_script("train.py", "--resume", "auto", "--no-class-cond", "--results-dir", str(res), "--max-steps", "5")
    old = str(res / "000-DiS-T-4")
    assert f"resuming {old} from {old}/checkpoints/0000004.pt at step 4" in r.stdout
    assert sorted(os.listdir(res / "000-DiS-T-4" / "checkpoints"))[-1] == "0000005.pt"
    assert os.listdir(res / "001-DiS-T-4" / "checkpoints") == ["0000001.pt"]  # the other run is untouched
    r = run_script("train.py", "--resume", "auto", "--results-dir", str(res), "--max-steps", "6")   # no flag: newest
    assert f"from {old}/checkpoints/0000005.pt at step 5" in r.stdout                  # 000 was resumed last
    r = run_script("train.py", "--resume", "auto", "--lr", "0.5", "--results-dir", str(res), ok=False)
    expect_user_error(r, "no run in", "000-DiS-T-4", "has --lr 0.0001, not --lr 0.5")


@pytest.mark.parametrize("num_classes", [10, 0])
def test_preview_grid_guides_class_conditional_models(monkeypatch, tmp_path, num_classes):
    """train.py's preview: classes 0-9, 0-5 in reading order, guided by --sample-cfg-scale; unguided when
    the model is unconditional."""
    import train
    seen = {}
    monkeypatch.setattr(DiS.Diffusion, "sample", lambda self, model, shape, **k: seen.update(k) or torch.zeros(shape))
    args, _ = train.parse_args(["--sample-cfg-scale", "3"])
    config = {"num_classes": num_classes, "in_channels": 1, "input_size": 8, "latents": False}
    train.preview(None, DiS.Diffusion(), config, args, str(tmp_path / "grid.png"), torch.device("cpu"), None)
    assert (tmp_path / "grid.png").exists()
    if num_classes:
        assert seen["cfg_scale"] == 3 and seen["y"].tolist() == list(range(10)) + list(range(6))
    else:
        assert seen["cfg_scale"] == 1.0 and seen["y"] is None


def test_the_scripts_adamw_is_fused_and_equals_the_default_one():
    """dis_cli.adamw (train.py's and bench.py's optimizer) runs PyTorch's fused AdamW on a CPU, and its steps
    equal those of the default for-each AdamW, on train.py's parameter groups (with and without weight decay)."""
    import dis_cli
    import train
    torch.manual_seed(0)
    model = DiS.create_model("DiS-T/4", image_size=16, in_channels=1, num_classes=3)
    twin = DiS.create_model("DiS-T/4", image_size=16, in_channels=1, num_classes=3)
    twin.load_state_dict(model.state_dict())
    start = [p.detach().clone() for p in model.parameters()]
    fused = dis_cli.adamw(train.param_groups(model, 0.1), 1e-3, torch.device("cpu"))
    plain = torch.optim.AdamW(train.param_groups(twin, 0.1), lr=1e-3, weight_decay=0.0)
    assert {g["weight_decay"] for g in fused.param_groups} == {0.0, 0.1}
    assert fused.defaults["fused"] and not plain.defaults["fused"]
    for _ in range(3):
        grads = [torch.randn_like(p) for p in model.parameters()]
        for m, opt in ((model, fused), (twin, plain)):
            for p, g in zip(m.parameters(), grads):
                p.grad = g.clone()
            opt.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    assert all((p - p0).abs().max() > 1e-4 for p, p0 in zip(model.parameters(), start))   # every tensor moved


def test_help_shows_every_default_and_helps_every_flag():
    for script in ("train.py", "sample.py", "encode_latents.py"):
        out = run_script(script, "--help").stdout
        assert "(default: None)" not in out, script
        options = [line.split()[0] for line in out.split("options:")[1].splitlines() if line.strip().startswith("--")]
        assert len(options) > 5, script
    import dis_cli
    import train
    parser = train.build_parser()
    assert all(a.help for a in parser._actions), [a.dest for a in parser._actions if not a.help]
    text = parser.format_help()
    assert isinstance(parser.formatter_class("x"), dis_cli.HelpFormatter)
    for shown in ("(default: 0.0001)", "(default: 100)", "(default: DiS-S/2)", "(default: auto)"):
        assert shown in " ".join(text.split()), shown


def test_ctrl_c_in_sample_py_ends_in_one_line_and_leaves_nothing(fmnist_run, tmp_path):
    import signal
    import threading
    out_dir = tmp_path / "new"
    p = subprocess.Popen([sys.executable, "sample.py", "--ckpt", fmnist_run, "--num-samples", "2", "--num-sampling-steps",
                          "1000", "--out", str(out_dir / "s")], cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    err = []
    reader = threading.Thread(target=lambda: err.extend(iter(lambda: p.stderr.read(1), b"")), daemon=True)
    reader.start()
    deadline = time.time() + 120
    while time.time() < deadline and b"/1000" not in b"".join(err):   # the bar counts sampling steps
        time.sleep(0.1)
    p.send_signal(signal.SIGINT)
    p.wait(timeout=60)
    reader.join(timeout=10)                    # the only reader of stderr (communicate() would race it)
    out = p.stdout.read()
    text = b"".join(err).decode()
    assert p.returncode == 130 and "Traceback" not in text, text[-2000:]
    assert text.strip().splitlines()[-1] == "interrupted"
    assert f"sampling from {fmnist_run}/checkpoints/0000004.pt" in out.decode()   # a run folder: its newest
    assert not out_dir.exists()


def worker_pids(pid):
    """The processes torchrun started, by rank."""
    kids = open(f"/proc/{pid}/task/{pid}/children").read().split()
    ranks = {}
    for k in kids:
        env = dict(v.split("=", 1) for v in open(f"/proc/{k}/environ").read().split("\0") if "=" in v)
        ranks[int(env["RANK"])] = int(k)
    return ranks


def test_ddp_ctrl_c_in_one_process_stops_all_at_the_same_step(fmnist, tmp_path):
    import signal
    res = str(tmp_path / "res")
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29518", "train.py", "--dataset", "fashion-mnist", "--data-path", fmnist, "--results-dir", res,
                          "--max-steps", "1000", "--sample-every", "0", "--device", "cpu", *FAST],
                         cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    log = os.path.join(res, "000-DiS-T-4", "log.txt")
    deadline = time.time() + 180
    while time.time() < deadline and not (os.path.exists(log) and "step 0000002" in open(log).read()):
        time.sleep(0.2)
    os.kill(worker_pids(p.pid)[1], signal.SIGINT)                      # rank 1 only
    p.communicate(timeout=180)
    text = open(log).read()
    stopped = int(text.split("interrupted at step ")[1].split()[0])
    assert 2 <= stopped < 1000 and "replicas identical: True" in text   # both reached the end, in step
    assert os.listdir(os.path.join(res, "000-DiS-T-4", "checkpoints")) == [f"{stopped:07d}.pt"]
