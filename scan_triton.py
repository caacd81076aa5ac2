"""
The selective scan as Triton kernels: a drop-in for DiS.selective_scan on CUDA (and, slowly, on CPU
through Triton's interpreter), with the same arguments, layouts and results for real A.

It follows mamba-ssm's CUDA kernels (csrc/selective_scan/selective_scan_fwd_kernel.cuh and
selective_scan_bwd_kernel.cuh): walk the sequence in chunks, keep the state on chip, save one state per
chunk in the forward, and in the backward rerun each chunk from its saved state, last chunk first.
The differences: mamba-ssm gives each (b, d) row a thread block and scans the tokens of a chunk in
parallel, one state index at a time; here one program owns a (BLOCK_D, n) tile of states and steps
through the tokens one at a time, which needs no scan primitive (tl.associative_scan is avoided: its
reverse mode is broken on GPUs, Triton issue 4362).

Layouts (mamba-ssm's selective_scan_fn):
    u, delta, z: (b, d, l)   A: (d, n)   B, C: (b, n, l)   D, delta_bias: (d,)
Inputs may be float32, bfloat16 or float16; everything is computed in float32, the output has u's dtype.

Algorithm, per program = (one batch row b, a block of BLOCK_D channels), state h: (BLOCK_D, n) in registers:
    forward   for each chunk of CHUNK tokens: save h (the state the chunk starts from), then for each token
                  dt = softplus(delta + delta_bias),  h = exp(dt A) h + dt u B,  y = <h, C> + D u,
                  out = y silu(z)
              so the only saved tensor besides the inputs is starts: (b, l / CHUNK, d, n), float32.
    backward  for each chunk, last first: rerun the chunk from its saved start state, writing its CHUNK
              states to a small per-program workspace (b, d / BLOCK_D, CHUNK, BLOCK_D, n), then walk the
              chunk's tokens backwards with the adjoint recurrence (below).

Public API:
    selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, chunk=32)
    triton_scan_usable(u)   True where the kernels can run on u's device
    INTERPRETED             True when the kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1)
and two custom ops, so that torch.compile(fullgraph=True) traces through without a graph break:
    torch.ops.dis_scan.selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk)
        -> (out, starts)
    torch.ops.dis_scan.selective_scan_bwd(g_out, u, delta, A, B, C, D, z, delta_bias, starts, delta_softplus,
        chunk) -> (g_u, g_delta, g_A, g_B, g_C, g_D, g_z, g_delta_bias); the gradients of absent optional
        inputs come back as empty tensors of shape (0,).

Triton runs on the CPU only through its interpreter: set TRITON_INTERPRET=1 before triton is first
imported (by anything: importing torch._dynamo does it) and leave it set; triton.jit reads it when the
kernels below are defined, and triton reads it again at run time.
"""
import os
from typing import Optional

import torch
import triton
import triton.language as tl

__all__ = ["selective_scan_triton", "triton_scan_usable", "INTERPRETED", "CHUNK", "BLOCK_D"]

CHUNK = 32      # tokens per chunk: one saved state each, and the backward workspace holds one chunk
BLOCK_D = 32    # channels per program; a (BLOCK_D, n) float32 state tile stays in registers
NUM_WARPS = 4
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _interpret_flag():
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


# triton.jit chooses between compiled and interpreted kernels when the decorators below run
INTERPRETED = _interpret_flag()


def _interpreter_ready():
    """The interpreter works only if TRITON_INTERPRET=1 was set before triton itself was first imported
    (triton.language's own jit functions, tl.sum among them, are built then; note that importing
    torch._dynamo imports triton) and is still set (triton reads it again while running)."""
    sum_fn = getattr(tl, "sum", None)
    own_ok = not hasattr(sum_fn, "fn") or type(sum_fn).__name__ == "InterpretedFunction"
    return INTERPRETED and _interpret_flag() and own_ok


def triton_scan_usable(u):
    """True when these kernels can run on u: CUDA tensors (compiled kernels), or CPU tensors when Triton's
    interpreter is on (see the module docstring; correct but slow, for tests). Float32/16 and bfloat16 only."""
    if u.dtype not in SUPPORTED_DTYPES:
        return False
    if u.device.type == "cuda" and not INTERPRETED:
        return torch.cuda.is_available()
    return u.device.type in ("cpu", "cuda") and _interpreter_ready()


#################################################################################
#                                   Kernels                                     #
#################################################################################
# Both kernels: grid (b, cdiv(d, BLOCK_D)). Channels past d and state indices past n are masked; their
# A, B, C, u load as 0, so their state stays 0 and they add nothing to any sum. The tokens of a chunk run
# in a loop whose bounds stop at l, so a ragged last chunk needs no token mask.

@triton.jit
def _softplus(x):
    # log(1 + e^x) without overflow for large x and without rounding to 0 for very negative x
    return tl.where(x > 20.0, x, tl.where(x < -15.0, tl.exp(x), tl.log(1.0 + tl.exp(x))))


@triton.jit
def _load_channel_params(A_ptr, D_ptr, bias_ptr, rd, rn, md, mdn, dstate, HAS_D: tl.constexpr,
                         HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr):
    """A (BLOCK_D, BLOCK_N), D and delta_bias (BLOCK_D,) of this program's channels, in float32 (0 if absent)."""
    A = tl.load(A_ptr + rd[:, None] * dstate + rn[None, :], mask=mdn, other=0.0).to(tl.float32)
    Dv = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + rd, mask=md, other=0.0).to(tl.float32)
    bias = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rd, mask=md, other=0.0).to(tl.float32)
    return A, Dv, bias


@triton.jit
def _token_inputs(u_ptr, delta_ptr, B_ptr, row, col, t, bias, md, mn, SOFTPLUS: tl.constexpr):
    """Token t's u and dt = softplus(delta + delta_bias), (BLOCK_D,), and B_t, (BLOCK_N,), in float32."""
    u = tl.load(u_ptr + row + t, mask=md, other=0.0).to(tl.float32)
    dt = tl.load(delta_ptr + row + t, mask=md, other=0.0).to(tl.float32) + bias
    if SOFTPLUS:
        dt = _softplus(dt)
    Bt = tl.load(B_ptr + col + t, mask=mn, other=0.0).to(tl.float32)
    return u, dt, Bt


@triton.jit
def _scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr,     # inputs (absent ones: any pointer)
    out_ptr, starts_ptr,                                              # outputs
    dim, dstate, seqlen, n_chunks,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)      # int64 offsets: b * d * l can pass 2**31
    rd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)               # channels   (BLOCK_D,)
    rn = tl.arange(0, BLOCK_N)                                            # state idx  (BLOCK_N,)
    md, mn = rd < dim, rn < dstate
    mdn = md[:, None] & mn[None, :]

    A, Dv, bias = _load_channel_params(A_ptr, D_ptr, bias_ptr, rd, rn, md, mdn, dstate, HAS_D, HAS_BIAS, BLOCK_D)

    row = pid_b * dim * seqlen + rd * seqlen          # offset of (b, d, 0) in u, delta, z, out
    col = pid_b * dstate * seqlen + rn * seqlen       # offset of (b, n, 0) in B, C
    st = starts_ptr + pid_b * n_chunks * dim * dstate + rd[:, None] * dstate + rn[None, :]

    h = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    for c in range(n_chunks):
        tl.store(st + c * dim * dstate, h, mask=mdn)   # the state this chunk starts from
        t0 = c * CHUNK
        t1 = tl.minimum(t0 + CHUNK, seqlen)
        for t in range(t0, t1):
            u, dt, Bt = _token_inputs(u_ptr, delta_ptr, B_ptr, row, col, t, bias, md, mn, SOFTPLUS)
            Ct = tl.load(C_ptr + col + t, mask=mn, other=0.0).to(tl.float32)
            h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * Bt[None, :]
            y = tl.sum(h * Ct[None, :], axis=1) + Dv * u
            if HAS_Z:
                zt = tl.load(z_ptr + row + t, mask=md, other=0.0).to(tl.float32)
                y = y * zt / (1.0 + tl.exp(-zt))
            tl.store(out_ptr + row + t, y.to(out_ptr.dtype.element_ty), mask=md)


# Gradients. With pre_t = delta_t + delta_bias, dt_t = softplus(pre_t), the forward is
#     h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t,   y_t = <h_t, C_t> + D u_t,   out_t = y_t silu(z_t),
# and the backward, token by token from the last, computes (kernel variable in brackets):
#   g_y_t  = g_out_t silu(z_t)                                                       [g_y]
#   g_z_t  = g_out_t y_t silu'(z_t),  silu'(z) = sig(z) (1 + z (1 - sig(z)))         [g_z, stored]
#   g_h_t  = g_y_t C_t + exp(dt_{t+1} A) g_h_{t+1}     (the adjoint recurrence)       [g_h]
#            the second term is carried from token t+1, across chunk borders too      [g_next]
#   g_D    = sum_{b,t} g_y_t u_t                                                      [gD_acc, atomic]
#   g_C_t  = sum_d g_y_t h_t                                                          [gC_t, atomic]
#   g_B_t  = sum_d g_h_t dt_t u_t                                                     [gB_t, atomic]
#   with P_t = g_h_t * exp(dt_t A) h_{t-1} = g_h_t * (h_t - dt_t u_t B_t)  (no shifted states needed)
#                                                                                     [g_dtA]
#   g_A    = sum_{b,t} dt_t P_t                                                       [gA_acc, atomic]
#   g_(dt u)_t = <g_h_t, B_t>                                                         [g_dtu]
#   g_u_t  = dt_t g_(dt u)_t + D g_y_t                                                [g_u, stored]
#   g_dt_t = <P_t, A> + u_t g_(dt u)_t                                  [g_pre, before softplus']
#   g_delta_t = g_dt_t sigmoid(pre_t)  (softplus' = sigmoid; g_dt_t without softplus) [g_pre, stored]
#   g_delta_bias = sum_{b,t} g_delta_t                                                [gbias_acc, atomic]
# B, C, A, D and delta_bias are shared by many programs: each sums its own part in registers and adds it
# with tl.atomic_add into a float32 buffer, cast to the input's dtype afterwards.

@triton.jit
def _scan_bwd_kernel(
    gout_ptr, u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, starts_ptr,   # inputs
    ws_ptr,                                                           # workspace: one chunk of states
    gu_ptr, gdelta_ptr, gz_ptr,                                       # (b, d, l), written once each
    gA_ptr, gB_ptr, gC_ptr, gD_ptr, gbias_ptr,                        # float32, zeroed, atomic adds
    dim, dstate, seqlen, n_chunks,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    rd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    rn = tl.arange(0, BLOCK_N)
    md, mn = rd < dim, rn < dstate
    mdn = md[:, None] & mn[None, :]

    A, Dv, bias = _load_channel_params(A_ptr, D_ptr, bias_ptr, rd, rn, md, mdn, dstate, HAS_D, HAS_BIAS, BLOCK_D)

    row = pid_b * dim * seqlen + rd * seqlen
    col = pid_b * dstate * seqlen + rn * seqlen
    st = starts_ptr + pid_b * n_chunks * dim * dstate + rd[:, None] * dstate + rn[None, :]
    # this program's private workspace, padded to whole tiles so that it needs no mask
    ws = (ws_ptr + (pid_b * tl.num_programs(1) + pid_d) * (CHUNK * BLOCK_D * BLOCK_N)
          + tl.arange(0, BLOCK_D)[:, None] * BLOCK_N + rn[None, :])

    g_next = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)   # exp(dt_{t+1} A) g_h_{t+1}
    gA_acc = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    gD_acc = tl.zeros((BLOCK_D,), tl.float32)
    gbias_acc = tl.zeros((BLOCK_D,), tl.float32)
    for cc in range(n_chunks):
        c = n_chunks - 1 - cc
        t0 = c * CHUNK
        t1 = tl.minimum(t0 + CHUNK, seqlen)
        # 1. rerun the chunk from its saved start state, keeping its states in the workspace
        h = tl.load(st + c * dim * dstate, mask=mdn, other=0.0)
        tl.debug_barrier()   # every thread has read the previous chunk's workspace before it is overwritten
        for t in range(t0, t1):
            u, dt, Bt = _token_inputs(u_ptr, delta_ptr, B_ptr, row, col, t, bias, md, mn, SOFTPLUS)
            h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * Bt[None, :]
            tl.store(ws + (t - t0) * (BLOCK_D * BLOCK_N), h)
        tl.debug_barrier()   # the states are written before any thread reads them back
        # 2. walk the chunk backwards: the adjoint recurrence and the local gradients (comment above)
        for i in range(t1 - t0):
            t = t1 - 1 - i
            h = tl.load(ws + (t - t0) * (BLOCK_D * BLOCK_N))                     # h_t
            u = tl.load(u_ptr + row + t, mask=md, other=0.0).to(tl.float32)
            pre = tl.load(delta_ptr + row + t, mask=md, other=0.0).to(tl.float32) + bias
            dt = pre
            if SOFTPLUS:
                dt = _softplus(pre)
            Bt = tl.load(B_ptr + col + t, mask=mn, other=0.0).to(tl.float32)
            Ct = tl.load(C_ptr + col + t, mask=mn, other=0.0).to(tl.float32)
            g_y = tl.load(gout_ptr + row + t, mask=md, other=0.0).to(tl.float32)
            if HAS_Z:
                zt = tl.load(z_ptr + row + t, mask=md, other=0.0).to(tl.float32)
                sig = 1.0 / (1.0 + tl.exp(-zt))
                y = tl.sum(h * Ct[None, :], axis=1) + Dv * u
                g_z = g_y * y * sig * (1.0 + zt * (1.0 - sig))
                tl.store(gz_ptr + row + t, g_z.to(gz_ptr.dtype.element_ty), mask=md)
                g_y = g_y * zt * sig
            gD_acc += g_y * u
            g_h = g_y[:, None] * Ct[None, :] + g_next
            g_next = tl.exp(dt[:, None] * A) * g_h
            dtu = dt * u
            g_dtA = g_h * (h - dtu[:, None] * Bt[None, :])
            gA_acc += g_dtA * dt[:, None]
            g_dtu = tl.sum(g_h * Bt[None, :], axis=1)
            g_u = g_dtu * dt + g_y * Dv
            g_pre = tl.sum(g_dtA * A, axis=1) + g_dtu * u
            if SOFTPLUS:
                g_pre = g_pre / (1.0 + tl.exp(-pre))
            g_pre = tl.where(md, g_pre, 0.0)
            gbias_acc += g_pre
            tl.store(gu_ptr + row + t, g_u.to(gu_ptr.dtype.element_ty), mask=md)
            tl.store(gdelta_ptr + row + t, g_pre.to(gdelta_ptr.dtype.element_ty), mask=md)
            gB_t = tl.sum(g_h * dtu[:, None], axis=0)
            gC_t = tl.sum(h * g_y[:, None], axis=0)
            tl.atomic_add(gB_ptr + col + t, gB_t, mask=mn, sem="relaxed")
            tl.atomic_add(gC_ptr + col + t, gC_t, mask=mn, sem="relaxed")
    tl.atomic_add(gA_ptr + rd[:, None] * dstate + rn[None, :], gA_acc, mask=mdn, sem="relaxed")
    if HAS_D:
        tl.atomic_add(gD_ptr + rd, gD_acc, mask=md, sem="relaxed")
    if HAS_BIAS:
        tl.atomic_add(gbias_ptr + rd, gbias_acc, mask=md, sem="relaxed")


#################################################################################
#                          Launchers and custom ops                             #
#################################################################################

def _blocks(d, n):
    """BLOCK_D (smaller for narrow d, so tiny tests do less padded work) and BLOCK_N (n padded to 2^k)."""
    return min(BLOCK_D, triton.next_power_of_2(d)), triton.next_power_of_2(max(n, 1))


def _empty(x):
    """A new contiguous tensor shaped like x (the fake and the real ops must agree on strides)."""
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _none_grad(u):
    return u.new_empty(0)


@torch.library.custom_op("dis_scan::selective_scan_fwd", mutates_args=())
def _scan_fwd(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
              D: Optional[torch.Tensor], z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor],
              delta_softplus: bool, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    u, delta, A, B, C = (x.contiguous() for x in (u, delta, A, B, C))
    D, z, delta_bias = (x.contiguous() if x is not None else None for x in (D, z, delta_bias))
    b, d, l = u.shape
    n = A.shape[1]
    n_chunks = triton.cdiv(l, chunk)
    out = _empty(u)
    starts = u.new_empty(b, n_chunks, d, n, dtype=torch.float32)
    if out.numel() == 0:
        return out, starts
    block_d, block_n = _blocks(d, n)
    _scan_fwd_kernel[(b, triton.cdiv(d, block_d))](
        u, delta, A, B, C, D if D is not None else u, z if z is not None else u,
        delta_bias if delta_bias is not None else u, out, starts,
        d, n, l, n_chunks,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
        CHUNK=chunk, BLOCK_D=block_d, BLOCK_N=block_n, num_warps=NUM_WARPS)
    return out, starts


@_scan_fwd.register_fake
def _scan_fwd_fake(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk):
    b, d, l = u.shape
    n_chunks = (l + chunk - 1) // chunk
    return _empty(u), u.new_empty(b, n_chunks, d, A.shape[1], dtype=torch.float32)


@torch.library.custom_op("dis_scan::selective_scan_bwd", mutates_args=())
def _scan_bwd(g_out: torch.Tensor, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
              C: torch.Tensor, D: Optional[torch.Tensor], z: Optional[torch.Tensor],
              delta_bias: Optional[torch.Tensor], starts: torch.Tensor, delta_softplus: bool, chunk: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                         torch.Tensor, torch.Tensor]:
    # the incoming gradient may be an expanded tensor with zero strides (e.g. from out.sum())
    g_out, u, delta, A, B, C, starts = (x.contiguous() for x in (g_out, u, delta, A, B, C, starts))
    D, z, delta_bias = (x.contiguous() if x is not None else None for x in (D, z, delta_bias))
    b, d, l = u.shape
    n = A.shape[1]
    f32 = dict(dtype=torch.float32, device=u.device)
    g_u, g_delta = _empty(u), _empty(delta)
    g_z = _empty(z) if z is not None else _none_grad(u)
    g_A, g_B, g_C = torch.zeros(d, n, **f32), torch.zeros(b, n, l, **f32), torch.zeros(b, n, l, **f32)
    g_D, g_bias = torch.zeros(d, **f32), torch.zeros(d, **f32)
    if u.numel() > 0:
        block_d, block_n = _blocks(d, n)
        grid = (b, triton.cdiv(d, block_d))
        ws = torch.empty(b * grid[1] * chunk * block_d * block_n, **f32)
        _scan_bwd_kernel[grid](
            g_out, u, delta, A, B, C, D if D is not None else u, z if z is not None else u,
            delta_bias if delta_bias is not None else u, starts, ws,
            g_u, g_delta, g_z, g_A, g_B, g_C, g_D, g_bias,
            d, n, l, starts.shape[1],
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            SOFTPLUS=delta_softplus, CHUNK=chunk, BLOCK_D=block_d, BLOCK_N=block_n, num_warps=NUM_WARPS)
    return (g_u, g_delta, g_A.to(A.dtype), g_B.to(B.dtype), g_C.to(C.dtype),
            g_D.to(D.dtype) if D is not None else _none_grad(u), g_z,
            g_bias.to(delta_bias.dtype) if delta_bias is not None else _none_grad(u))


@_scan_bwd.register_fake
def _scan_bwd_fake(g_out, u, delta, A, B, C, D, z, delta_bias, starts, delta_softplus, chunk):
    opt = lambda x: _empty(x) if x is not None else _none_grad(u)
    return _empty(u), _empty(delta), _empty(A), _empty(B), _empty(C), opt(D), opt(z), opt(delta_bias)


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.delta_softplus, ctx.chunk = delta_softplus, chunk


def _backward(ctx, g_out, _g_starts):
    u, delta, A, B, C, D, z, delta_bias, starts = ctx.saved_tensors
    g = torch.ops.dis_scan.selective_scan_bwd(g_out, u, delta, A, B, C, D, z, delta_bias, starts,
                                              ctx.delta_softplus, ctx.chunk)
    g_u, g_delta, g_A, g_B, g_C, g_D, g_z, g_bias = g
    return (g_u, g_delta, g_A, g_B, g_C, g_D if D is not None else None, g_z if z is not None else None,
            g_bias if delta_bias is not None else None, None, None)


_scan_fwd.register_autograd(_backward, setup_context=_setup_context)


def _check(u, delta, A, B, C, D, z, delta_bias, chunk):
    if u.ndim != 3 or A.ndim != 2:
        raise ValueError(f"selective_scan_triton: u must be (b, d, l) and A (d, n), got {tuple(u.shape)} "
                         f"and {tuple(A.shape)}")
    b, d, l = u.shape
    n = A.shape[1]
    expected = {"delta": (delta, (b, d, l)), "A": (A, (d, n)), "B": (B, (b, n, l)), "C": (C, (b, n, l)),
                "D": (D, (d,)), "z": (z, (b, d, l)), "delta_bias": (delta_bias, (d,))}
    for name, (t, shape) in expected.items():
        if t is None:
            continue
        if tuple(t.shape) != shape:
            raise ValueError(f"selective_scan_triton: {name} has shape {tuple(t.shape)}, expected {shape}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"selective_scan_triton: {name} is {t.dtype}; supported: float32, bfloat16, "
                            f"float16 (complex A is not supported)")
        if t.device != u.device:
            raise ValueError(f"selective_scan_triton: {name} is on {t.device}, u on {u.device}")
    if u.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"selective_scan_triton: u is {u.dtype}; supported: float32, bfloat16, float16")
    if chunk < 1:
        raise ValueError(f"selective_scan_triton: chunk must be >= 1, got {chunk}")


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          chunk=CHUNK):
    """The selective scan with DiS.selective_scan's (and mamba-ssm's selective_scan_fn's) signature,
    run by the Triton kernels above; differentiable in every tensor argument.
    chunk: tokens per saved state (memory b * d * n * l / chunk floats) and per backward rerun."""
    _check(u, delta, A, B, C, D, z, delta_bias, chunk)
    out, _ = torch.ops.dis_scan.selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias,
                                                   bool(delta_softplus), int(chunk))
    return out
