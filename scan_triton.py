"""
DiS's optional Triton kernels (CUDA; on a CPU only through Triton's interpreter, for tests). DiS.py imports
this file only when DiS.SCAN_BACKEND asks for it, so DiS.py copied alone never needs it. Four parts:

  1. the selective scan: a drop-in for DiS.selective_scan (SCAN_BACKEND "triton"), and a token-major entry
     point that can also walk the sequence backwards and add its result to another tensor
  2. the depthwise causal conv + bias + SiLU of a Mamba mixer, token-major, with both directions of the
     bidirectional mixer in one kernel (the backward direction as an anti-causal conv, no flips)
  3. the residual add + drop-path + RMSNorm at the start of each block, in one kernel
  4. bimamba_inner_fn: the whole bidirectional mixer from these kernels and ordinary matmuls (mamba-ssm's
     mamba_inner_fn is the model), which with part 3 is SCAN_BACKEND "fused" (DiS.fused_block)
Each kernel is a torch.library custom op with a fake implementation and its autograd, so that
torch.compile(fullgraph=True) traces a whole training step without a graph break.

Public API:
    selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, chunk=256)
        (b, d, l) layout, DiS.selective_scan's signature
    selective_scan_triton_tm(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                             reverse=False, add=None, A_is_log=False, chunk=256, delta_proj=None)
        (b, l, d) layout; returns a new contiguous (b, l, d) tensor; with delta_proj (d, dt_rank), delta is
        dt_proj's low-rank input and the op projects it (in the forward and again in the backward)
    causal_conv1d_triton(x, weight, bias=None, reverse=False, activation=True)            x: (b, l, d)
    causal_conv1d_bidir_triton(x, weight_f, bias_f, weight_b, bias_b, activation=True) -> (u_f, u_b)
    add_rms_norm_triton(hidden, residual, weight, eps, scale=None, out_dtype=None) -> (normed, residual_out)
    bimamba_inner_fn(hidden, in_proj_weight, out_proj_weight, forward_params, backward_params)
    triton_scan_usable(u)   True where the kernels can run on u's device
    INTERPRETED             True when the kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1)
Custom ops (namespace dis_scan): selective_scan_fwd/bwd, causal_conv1d_fwd/bwd, causal_conv1d_bidir_fwd/bwd,
add_rms_norm_fwd/bwd; the gradients of absent optional inputs come back as empty tensors of shape (0,).
Every kernel reads its inputs through their strides: the token-major views the mixer makes (x and z as the
halves of in_proj's output, B and C as column slices of x_proj's output) are never copied.

The scan. It follows mamba-ssm's CUDA kernels (csrc/selective_scan/selective_scan_fwd_kernel.cuh and
selective_scan_bwd_kernel.cuh): walk the sequence in chunks, keep the state on chip, save one state per
chunk in the forward, and in the backward rerun each chunk from its saved state, last chunk first.
The differences: mamba-ssm gives each (b, d) row a thread block and scans the tokens of a chunk in
parallel, one state index at a time; here one program owns a (BLOCK_D, n) tile of states and steps
through the tokens one at a time, which needs no scan primitive (tl.associative_scan is avoided: its
reverse mode is broken on GPUs, Triton issue 4362).

Layouts. The kernels address every activation through its three strides, (batch, token, channel) for
u, delta, z, add, out and their gradients and (batch, token, state) for B, C, so one kernel serves
    token-major    u, delta, z, add: (b, l, d)   B, C: (b, l, n)    selective_scan_triton_tm
    mamba-ssm's    u, delta, z:      (b, d, l)   B, C: (b, n, l)    selective_scan_triton
    both           A: (d, n)   D, delta_bias: (d,)
and any strided view without a copy: u and z as the halves of one (b, l, 2d) projection, B and C as column
slices of one (b, l, dt_rank + 2n) tensor, the zero strides of an expanded gradient (from out.sum()).
Token-major with unit channel stride is the fast case: the BLOCK_D channels a program reads for one token
are contiguous in memory. The (b, d, l) entry point runs the same kernels on transposed views and returns
a (b, d, l) view of a contiguous (b, l, d) result (not contiguous itself; its transpose is).
Inputs may be float32, bfloat16 or float16, mixed; everything is computed in float32, the output has u's
dtype and each gradient its input's dtype.

Algorithm, per program = (one batch row b, a block of BLOCK_D channels), state h: (BLOCK_D, n) in registers,
one warp (SCAN_NUM_WARPS): the (BLOCK_D, n) tile spread over more warps costs a cross-warp exchange for every
sum over states or channels, on every step. Step s = 0 .. l-1 handles token t = s, or t = l-1-s when reverse
(the scan of the flipped sequence, written at the original positions: flip(scan(flip(inputs))) along l);
chunks are chunks of CHUNK steps, pieces are pieces of SUB_CHUNK steps of a chunk. Every step loads the next
step's inputs before it computes its own, and exp(dt A) is one exp2 of dt (A log2(e)).
    forward   for each chunk: save h (the state the chunk starts from), then for each step's token t
                  dt = softplus(delta + delta_bias),  h = exp(dt A) h + dt u B,  y = <h, C> + D u,
                  out = add + y silu(z)            (add, z, D, delta_bias optional; softplus if asked)
              so the only saved tensor besides the inputs is starts: (b, l / CHUNK, d, n), float32.
    backward  for each chunk, last first: rerun the chunk from its saved start state, keeping each step's dt
              and the state each piece starts from; then for each piece, last first, rerun the piece from its
              start, writing its states and exp(dt A) to a small per-program workspace
              (b, d / BLOCK_D, 2 SUB_CHUNK, BLOCK_D, n), and walk the piece's steps backwards with the
              adjoint recurrence (below). Sparse saved states cost one more rerun of each chunk (the first),
              and the workspace stays a piece. add's gradient is g_out itself and needs no kernel.
The scan's ops take token_major (False: mamba-ssm's (b, d, l) layout, whose outputs and gradients are
transposed views of new (b, l, d) / (b, l, n) tensors) and A_is_log (A holds Mamba's A_log; the kernels use
A = -exp(A_log), so the mixer needs no kernels of its own for it).

Triton runs on the CPU only through its interpreter: set TRITON_INTERPRET=1 before triton is first
imported (by anything: importing torch._dynamo does it) and leave it set; triton.jit reads it when the
kernels below are defined, and triton reads it again at run time.
"""
import functools
import os
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

__all__ = ["selective_scan_triton", "selective_scan_triton_tm", "causal_conv1d_triton", "causal_conv1d_bidir_triton",
           "add_rms_norm_triton", "bimamba_inner_fn", "triton_scan_usable", "INTERPRETED", "CHUNK", "BLOCK_D"]

CHUNK = 256     # steps per chunk: one saved state each (the backward reruns a chunk to recover its states)
SUB_CHUNK = 32  # steps per piece of a chunk that the backward reruns again, keeping its states: the workspace
BLOCK_D = 32    # channels per program; a (BLOCK_D, n) float32 state tile stays in registers
SCAN_NUM_WARPS = 1
NUM_WARPS = 4
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CONV_BLOCK_L = 32   # tokens per program (fewer for short sequences)
CONV_BLOCK_D = 64   # channels per program (fewer for narrow d): 128 bytes of a bf16 row, one cache line
CONV_STREAM_BLOCK_C = 32   # channels per program of the streamed conv backward: one per thread of one warp
NORM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)   # hidden's and normed's dtypes
NORM_MAX_D = 1 << 16    # a whole row stays on chip as one BLOCK_D tile (Triton caps a tile at 2**20 items)


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


def _on_its_device(fn):
    """fn run with its first tensor's CUDA device as the current one: Triton launches on the current device,
    so a model on cuda:1 works without torch.cuda.set_device."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        x = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if x is None or x.device.type != "cuda":
            return fn(*args, **kwargs)
        with torch.cuda.device(x.device):
            return fn(*args, **kwargs)
    return run


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
# A, B, C, u load as 0, so their state stays 0 and they add nothing to any sum. The steps of a chunk run
# in a loop whose bounds stop at l, so a ragged last chunk needs no token mask. Every offset that grows with
# b, l or d is int64: b * l * d can pass 2**31.

@triton.jit
def _softplus(x):
    # log1p(e^x) by Kahan's trick, log(w) * e / (w - 1) with w = 1 + e: log(1 + e^x) alone keeps only a few
    # bits of e^x once it is far below 1 (x near -15); e itself once w rounds to 1; x itself past 20
    e = tl.exp(tl.minimum(x, 20.0))
    w = 1.0 + e
    tiny = w == 1.0
    return tl.where(x > 20.0, x, tl.where(tiny, e, tl.log(w) * (e / tl.where(tiny, 1.0, w - 1.0))))


@triton.jit
def _token(s, seqlen, REVERSE: tl.constexpr):
    """The token that step s handles, as int64 (it multiplies a token stride)."""
    t = s
    if REVERSE:
        t = seqlen - 1 - s
    return t.to(tl.int64)


@triton.jit
def _at_token0(ptr, pid_b, stride_b, r, stride_r):
    """Pointers to token 0 of batch row pid_b at indices r (channels or state indices) of a strided tensor."""
    return ptr + pid_b * stride_b + r.to(tl.int64) * stride_r


@triton.jit
def _load_channel_params(A_ptr, D_ptr, bias_ptr, rd, rn, md, mdn, dstate, HAS_D: tl.constexpr,
                         HAS_BIAS: tl.constexpr, A_IS_LOG: tl.constexpr, BLOCK_D: tl.constexpr):
    """A * log2(e) (BLOCK_D, BLOCK_N), D and delta_bias (BLOCK_D,) of this program's channels, in float32 (0 if
    absent). A_IS_LOG: the tensor holds Mamba's parameter A_log, and A = -exp(A_log) (no separate kernels for it).
    A comes pre-scaled so that exp(dt A) is one exp2 (a single MUFU.EX2), not exp's scaling and range checks."""
    A = tl.load(A_ptr + rd[:, None] * dstate + rn[None, :], mask=mdn, other=0.0).to(tl.float32)
    if A_IS_LOG:
        A = tl.where(mdn, -tl.exp(A), 0.0)
    Dv = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + rd, mask=md, other=0.0).to(tl.float32)
    bias = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rd, mask=md, other=0.0).to(tl.float32)
    return A * LOG2E, Dv, bias


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp2(-x * LOG2E))


@triton.jit
def _dt(pre, SOFTPLUS: tl.constexpr):
    """dt from pre = delta + delta_bias."""
    if SOFTPLUS:
        return _softplus(pre)
    return pre


@triton.jit
def _next_token(s, seqlen, REVERSE: tl.constexpr):
    """The token of step s + 1, or of step s at the last step: the inputs fetched ahead are always in range."""
    return _token(tl.minimum(s + 1, seqlen - 1), seqlen, REVERSE)


@triton.jit
def _scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, add_ptr,   # inputs (absent ones: any pointer)
    out_ptr, starts_ptr,                                                      # outputs
    dim, dstate, seqlen, n_chunks,
    su_b, su_l, su_d, sdt_b, sdt_l, sdt_d, sz_b, sz_l, sz_d,                  # (batch, token, channel) strides
    sadd_b, sadd_l, sadd_d, so_b, so_l, so_d,
    sB_b, sB_l, sB_n, sC_b, sC_l, sC_n,                                       # (batch, token, state) strides
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ADD: tl.constexpr,
    SOFTPLUS: tl.constexpr, REVERSE: tl.constexpr, A_IS_LOG: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    rd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)               # channels   (BLOCK_D,)
    rn = tl.arange(0, BLOCK_N)                                            # state idx  (BLOCK_N,)
    md, mn = rd < dim, rn < dstate
    mdn = md[:, None] & mn[None, :]

    A2, Dv, bias = _load_channel_params(A_ptr, D_ptr, bias_ptr, rd, rn, md, mdn, dstate, HAS_D, HAS_BIAS, A_IS_LOG,
                                        BLOCK_D)

    u0 = _at_token0(u_ptr, pid_b, su_b, rd, su_d)
    dt0 = _at_token0(delta_ptr, pid_b, sdt_b, rd, sdt_d)
    z0 = _at_token0(z_ptr, pid_b, sz_b, rd, sz_d)
    add0 = _at_token0(add_ptr, pid_b, sadd_b, rd, sadd_d)
    out0 = _at_token0(out_ptr, pid_b, so_b, rd, so_d)
    B0 = _at_token0(B_ptr, pid_b, sB_b, rn, sB_n)
    C0 = _at_token0(C_ptr, pid_b, sC_b, rn, sC_n)
    st = starts_ptr + pid_b * n_chunks * dim * dstate + rd[:, None] * dstate + rn[None, :]

    # pointers move one step per step (DIR tokens); each step loads the next step's inputs before it computes its
    # own, so the loads' latency hides behind the arithmetic (past the last step they are masked off)
    DIR: tl.constexpr = -1 if REVERSE else 1
    t = _token(0, seqlen, REVERSE)
    pu, pdt, pz, padd, pout = u0 + t * su_l, dt0 + t * sdt_l, z0 + t * sz_l, add0 + t * sadd_l, out0 + t * so_l
    pB, pC = B0 + t * sB_l, C0 + t * sC_l
    u_n = tl.load(pu, mask=md, other=0.0)
    pre_n = tl.load(pdt, mask=md, other=0.0)
    B_n = tl.load(pB, mask=mn, other=0.0)
    C_n = tl.load(pC, mask=mn, other=0.0)
    z_n = tl.load(pz, mask=md & HAS_Z, other=0.0)
    add_n = tl.load(padd, mask=md & HAS_ADD, other=0.0)
    h = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    for c in range(n_chunks):
        tl.store(st + c * dim * dstate, h, mask=mdn)   # the state this chunk starts from
        s0 = c * CHUNK
        for s in range(s0, tl.minimum(s0 + CHUNK, seqlen)):
            u, pre, Bt, Ct, zt, at = (u_n.to(tl.float32), pre_n.to(tl.float32) + bias, B_n.to(tl.float32),
                                      C_n.to(tl.float32), z_n.to(tl.float32), add_n.to(tl.float32))
            more = s + 1 < seqlen
            pu, pdt, pz, padd = pu + DIR * su_l, pdt + DIR * sdt_l, pz + DIR * sz_l, padd + DIR * sadd_l
            pB, pC = pB + DIR * sB_l, pC + DIR * sC_l
            u_n = tl.load(pu, mask=md & more, other=0.0)
            pre_n = tl.load(pdt, mask=md & more, other=0.0)
            B_n = tl.load(pB, mask=mn & more, other=0.0)
            C_n = tl.load(pC, mask=mn & more, other=0.0)
            z_n = tl.load(pz, mask=md & more & HAS_Z, other=0.0)
            add_n = tl.load(padd, mask=md & more & HAS_ADD, other=0.0)
            dt = _dt(pre, SOFTPLUS)
            h = tl.exp2(dt[:, None] * A2) * h + (dt * u)[:, None] * Bt[None, :]
            y = tl.sum(h * Ct[None, :], axis=1) + Dv * u
            if HAS_Z:
                y = y * zt * _sigmoid(zt)
            if HAS_ADD:   # summed in float32: a bf16 output is rounded once, not twice
                y += at
            tl.store(pout, y.to(out_ptr.dtype.element_ty), mask=md)
            pout += DIR * so_l


# Gradients. With pre_t = delta_t + delta_bias, dt_t = softplus(pre_t), the forward is
#     h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t,   y_t = <h_t, C_t> + D u_t,   out_t = add_t + y_t silu(z_t),
# where t counts steps: t-1 is the token handled one step earlier (the next token in the sequence when
# reverse). The backward, step by step from the last, computes (kernel variable in brackets):
#   g_add_t = g_out_t                                                 (in autograd, not in the kernel)
#   g_y_t  = g_out_t silu(z_t)                                                       [g_y]
#   g_z_t  = g_out_t y_t silu'(z_t),  silu'(z) = sig(z) (1 + z (1 - sig(z)))         [g_z, stored]
#   g_h_t  = g_y_t C_t + exp(dt_{t+1} A) g_h_{t+1}     (the adjoint recurrence)       [g_h]
#            the second term is carried from step t+1, across chunk borders too       [g_next]
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
    ws_ptr, ws0_ptr, wsdt_ptr,                      # workspace: a piece's states, the pieces' starts, a chunk's dt
    gu_ptr, gdelta_ptr, gz_ptr,                                       # written once each
    gA_ptr, gB_ptr, gC_ptr, gD_ptr, gbias_ptr,                        # float32, zeroed, atomic adds
    dim, dstate, seqlen, n_chunks,
    sg_b, sg_l, sg_d, su_b, su_l, su_d, sdt_b, sdt_l, sdt_d, sz_b, sz_l, sz_d,   # (batch, token, channel)
    sgu_b, sgu_l, sgu_d, sgdt_b, sgdt_l, sgdt_d, sgz_b, sgz_l, sgz_d,
    sB_b, sB_l, sB_n, sC_b, sC_l, sC_n, sgB_b, sgB_l, sgB_n, sgC_b, sgC_l, sgC_n,  # (batch, token, state)
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    REVERSE: tl.constexpr, A_IS_LOG: tl.constexpr, CHUNK: tl.constexpr, SUB: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    rd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    rn = tl.arange(0, BLOCK_N)
    md, mn = rd < dim, rn < dstate
    mdn = md[:, None] & mn[None, :]

    A2, Dv, bias = _load_channel_params(A_ptr, D_ptr, bias_ptr, rd, rn, md, mdn, dstate, HAS_D, HAS_BIAS, A_IS_LOG,
                                        BLOCK_D)

    g0 = _at_token0(gout_ptr, pid_b, sg_b, rd, sg_d)
    u0 = _at_token0(u_ptr, pid_b, su_b, rd, su_d)
    dt0 = _at_token0(delta_ptr, pid_b, sdt_b, rd, sdt_d)
    z0 = _at_token0(z_ptr, pid_b, sz_b, rd, sz_d)
    gu0 = _at_token0(gu_ptr, pid_b, sgu_b, rd, sgu_d)
    gdt0 = _at_token0(gdelta_ptr, pid_b, sgdt_b, rd, sgdt_d)
    gz0 = _at_token0(gz_ptr, pid_b, sgz_b, rd, sgz_d)
    B0 = _at_token0(B_ptr, pid_b, sB_b, rn, sB_n)
    C0 = _at_token0(C_ptr, pid_b, sC_b, rn, sC_n)
    gB0 = _at_token0(gB_ptr, pid_b, sgB_b, rn, sgB_n)
    gC0 = _at_token0(gC_ptr, pid_b, sgC_b, rn, sgC_n)
    st = starts_ptr + pid_b * n_chunks * dim * dstate + rd[:, None] * dstate + rn[None, :]
    # this program's private workspace, padded to whole tiles so that it needs no mask: a piece's states and
    # their exp(dt A), the state each piece of the chunk starts from, the chunk's dt
    prog = pid_b * tl.num_programs(1) + pid_d
    tile = tl.arange(0, BLOCK_D)[:, None] * BLOCK_N + rn[None, :]
    ws = ws_ptr + prog * (2 * SUB * BLOCK_D * BLOCK_N) + tile   # the piece's states, then their exp(dt A)
    ws0 = ws0_ptr + prog * (tl.cdiv(CHUNK, SUB) * BLOCK_D * BLOCK_N) + tile
    wsdt = wsdt_ptr + prog * (CHUNK * BLOCK_D) + tl.arange(0, BLOCK_D)

    # pointers move one step per step (DIR tokens, backwards in the adjoint walk), and each step fetches the
    # inputs of the step it hands over to before it computes its own (as in the forward)
    DIR: tl.constexpr = -1 if REVERSE else 1
    t = _token(seqlen - 1, seqlen, REVERSE)
    pg, pu, pdt, pz, pB, pC = g0 + t * sg_l, u0 + t * su_l, dt0 + t * sdt_l, z0 + t * sz_l, B0 + t * sB_l, C0 + t * sC_l
    pgu, pgdt, pgz, pgB, pgC = gu0 + t * sgu_l, gdt0 + t * sgdt_l, gz0 + t * sgz_l, gB0 + t * sgB_l, gC0 + t * sgC_l
    g_n = tl.load(pg, mask=md, other=0.0)
    u_n = tl.load(pu, mask=md, other=0.0)
    pre_n = tl.load(pdt, mask=md, other=0.0)
    B_n = tl.load(pB, mask=mn, other=0.0)
    C_n = tl.load(pC, mask=mn, other=0.0)
    z_n = tl.load(pz, mask=md & HAS_Z, other=0.0)

    g_next = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)   # exp(dt_{t+1} A) g_h_{t+1}
    gA_acc = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    gD_acc = tl.zeros((BLOCK_D,), tl.float32)
    gbias_acc = tl.zeros((BLOCK_D,), tl.float32)
    for cc in range(n_chunks):
        c = n_chunks - 1 - cc
        s0 = c * CHUNK
        s1 = tl.minimum(s0 + CHUNK, seqlen)
        n_sub = tl.cdiv(s1 - s0, SUB)
        # 0. rerun the chunk from its saved start state: keep the state each piece of SUB steps starts from,
        #    and each step's dt (the softplus is computed once per step)
        h = tl.load(st + c * dim * dstate, mask=mdn, other=0.0)
        tl.debug_barrier()   # every thread has read the previous chunk's workspace before it is overwritten
        t = _token(s0, seqlen, REVERSE)
        ru, rdt, rB = u0 + t * su_l, dt0 + t * sdt_l, B0 + t * sB_l
        ru_n = tl.load(ru, mask=md, other=0.0)
        rpre_n = tl.load(rdt, mask=md, other=0.0)
        rB_n = tl.load(rB, mask=mn, other=0.0)
        wdt = wsdt
        for j in range(n_sub):
            tl.store(ws0 + j * (BLOCK_D * BLOCK_N), h)
            for s in range(s0 + j * SUB, tl.minimum(s0 + (j + 1) * SUB, s1)):
                u, pre, Bt = ru_n.to(tl.float32), rpre_n.to(tl.float32) + bias, rB_n.to(tl.float32)
                more = s + 1 < s1
                ru, rdt, rB = ru + DIR * su_l, rdt + DIR * sdt_l, rB + DIR * sB_l
                ru_n = tl.load(ru, mask=md & more, other=0.0)
                rpre_n = tl.load(rdt, mask=md & more, other=0.0)
                rB_n = tl.load(rB, mask=mn & more, other=0.0)
                dt = _dt(pre, SOFTPLUS)
                h = tl.exp2(dt[:, None] * A2) * h + (dt * u)[:, None] * Bt[None, :]
                tl.store(wdt, dt)
                wdt += BLOCK_D
        for jj in range(n_sub):   # the pieces, last first
            j = n_sub - 1 - jj
            ss0 = s0 + j * SUB
            ss1 = tl.minimum(ss0 + SUB, s1)
            # 1. rerun the piece from its start state, keeping its states in the workspace
            tl.debug_barrier()   # the previous piece's states are read before they are overwritten
            h = tl.load(ws0 + j * (BLOCK_D * BLOCK_N))
            t = _token(ss0, seqlen, REVERSE)
            ru, rB = u0 + t * su_l, B0 + t * sB_l
            ru_n = tl.load(ru, mask=md, other=0.0)
            rB_n = tl.load(rB, mask=mn, other=0.0)
            w, wdt = ws, wsdt + (ss0 - s0) * BLOCK_D
            for s in range(ss0, ss1):
                u, Bt = ru_n.to(tl.float32), rB_n.to(tl.float32)
                more = s + 1 < ss1
                ru, rB = ru + DIR * su_l, rB + DIR * sB_l
                ru_n = tl.load(ru, mask=md & more, other=0.0)
                rB_n = tl.load(rB, mask=mn & more, other=0.0)
                dt = tl.load(wdt)
                dA = tl.exp2(dt[:, None] * A2)
                h = dA * h + (dt * u)[:, None] * Bt[None, :]
                tl.store(w, h)
                tl.store(w + SUB * BLOCK_D * BLOCK_N, dA)
                w, wdt = w + BLOCK_D * BLOCK_N, wdt + BLOCK_D
            tl.debug_barrier()   # the states are written before any thread reads them back
            # 2. walk the piece's steps backwards: the adjoint recurrence and the local gradients (comment above)
            for i in range(ss1 - ss0):
                s = ss1 - 1 - i
                g_y, u, pre, Bt, Ct, zt = (g_n.to(tl.float32), u_n.to(tl.float32), pre_n.to(tl.float32) + bias,
                                           B_n.to(tl.float32), C_n.to(tl.float32), z_n.to(tl.float32))
                sig_pre = _sigmoid(pre)   # softplus' (computed one channel per thread, before the sums)
                more = s > 0
                pg, pu, pdt, pz = pg - DIR * sg_l, pu - DIR * su_l, pdt - DIR * sdt_l, pz - DIR * sz_l
                pB, pC = pB - DIR * sB_l, pC - DIR * sC_l
                g_n = tl.load(pg, mask=md & more, other=0.0)
                u_n = tl.load(pu, mask=md & more, other=0.0)
                pre_n = tl.load(pdt, mask=md & more, other=0.0)
                B_n = tl.load(pB, mask=mn & more, other=0.0)
                C_n = tl.load(pC, mask=mn & more, other=0.0)
                z_n = tl.load(pz, mask=md & more & HAS_Z, other=0.0)
                w, wdt = w - BLOCK_D * BLOCK_N, wdt - BLOCK_D
                h = tl.load(w)                                                       # h_t
                dA = tl.load(w + SUB * BLOCK_D * BLOCK_N)
                dt = tl.load(wdt)
                if HAS_Z:
                    sig = _sigmoid(zt)
                    y = tl.sum(h * Ct[None, :], axis=1) + Dv * u
                    g_z = g_y * y * sig * (1.0 + zt * (1.0 - sig))
                    tl.store(pgz, g_z.to(gz_ptr.dtype.element_ty), mask=md)
                    g_y = g_y * zt * sig
                gD_acc += g_y * u
                g_h = g_y[:, None] * Ct[None, :] + g_next
                g_next = dA * g_h
                dtu = dt * u
                g_dtA = g_h * (h - dtu[:, None] * Bt[None, :])
                gA_acc += g_dtA * dt[:, None]
                g_dtu = tl.sum(g_h * Bt[None, :], axis=1)
                g_u = g_dtu * dt + g_y * Dv
                g_pre = tl.sum(g_dtA * A2, axis=1) * LN2 + g_dtu * u
                if SOFTPLUS:
                    g_pre = g_pre * sig_pre
                gbias_acc += g_pre
                tl.store(pgu, g_u.to(gu_ptr.dtype.element_ty), mask=md)
                tl.store(pgdt, g_pre.to(gdelta_ptr.dtype.element_ty), mask=md)
                gB_t = tl.sum(g_h * dtu[:, None], axis=0)
                gC_t = tl.sum(h * g_y[:, None], axis=0)
                tl.atomic_add(pgB, gB_t, mask=mn, sem="relaxed")
                tl.atomic_add(pgC, gC_t, mask=mn, sem="relaxed")
                pgu, pgdt, pgz = pgu - DIR * sgu_l, pgdt - DIR * sgdt_l, pgz - DIR * sgz_l
                pgB, pgC = pgB - DIR * sgB_l, pgC - DIR * sgC_l
    A = A2 * LN2
    if A_IS_LOG:   # dA / dA_log = -exp(A_log) = A
        gA_acc = gA_acc * A
    tl.atomic_add(gA_ptr + rd[:, None] * dstate + rn[None, :], gA_acc, mask=mdn, sem="relaxed")
    if HAS_D:
        tl.atomic_add(gD_ptr + rd, gD_acc, mask=md, sem="relaxed")
    if HAS_BIAS:
        tl.atomic_add(gbias_ptr + rd, gbias_acc, mask=md, sem="relaxed")


#################################################################################
#                          Launchers and custom ops                             #
#################################################################################
# The ops work on token-major views: with token_major=False (mamba-ssm's layout) they swap the last two
# dims of every activation on the way in, and of every new activation-shaped tensor on the way out.

def _blocks(d, n):
    """BLOCK_D (smaller for narrow d, so tiny tests do less padded work) and BLOCK_N (n padded to 2^k)."""
    return min(BLOCK_D, triton.next_power_of_2(d)), triton.next_power_of_2(max(n, 1))


def _tm(x, token_major):
    """x as a token-major view: a (b, d, l) or (b, n, l) tensor with its last two dims swapped (no copy)."""
    return x if token_major or x is None else x.transpose(1, 2)


def _strides(*xs):
    """The kernels' stride arguments, three per tensor (zeros for an absent one: the kernel never reads it)."""
    return [s for x in xs for s in (x.stride() if x is not None else (0, 0, 0))]


def _new_like(like, dtype):
    """A new contiguous tensor shaped like `like`, in dtype: every op (scan, conv, norm) allocates its outputs
    with it, so that the fake ops agree with the real ones on strides."""
    return torch.empty(like.shape, dtype=dtype, device=like.device)


def _new(x, like):
    """_new_like(like, x's dtype), or None for x None (the scan's optional inputs)."""
    return None if x is None else _new_like(like, x.dtype)


def _fwd_outputs(u, A, chunk):
    """out: (b, l, d) in u's dtype and starts: (b, n_chunks, d, n) float32, for a token-major u."""
    b, l, d = u.shape
    n_chunks = (l + chunk - 1) // chunk
    return _new(u, u), u.new_empty(b, n_chunks, d, A.shape[1], dtype=torch.float32)


def _bwd_result(token_major, u, g_u, g_delta, g_A, g_B, g_C, g_D, g_z, g_bias):
    """The bwd op's outputs: activation gradients back in the caller's layout, absent ones as shape (0,)."""
    grads = (_tm(g_u, token_major), _tm(g_delta, token_major), g_A, _tm(g_B, token_major),
             _tm(g_C, token_major), g_D, _tm(g_z, token_major), g_bias)
    return tuple(g if g is not None else u.new_empty(0) for g in grads)


@torch.library.custom_op("dis_scan::selective_scan_fwd", mutates_args=())
@_on_its_device
def _scan_fwd(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
              D: Optional[torch.Tensor], z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor],
              delta_softplus: bool, chunk: int, reverse: bool = False, add: Optional[torch.Tensor] = None,
              token_major: bool = False, A_is_log: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    u, delta, B, C, z, add = (_tm(x, token_major) for x in (u, delta, B, C, z, add))
    A, D, delta_bias = (x.contiguous() if x is not None else None for x in (A, D, delta_bias))
    b, l, d = u.shape
    n = A.shape[1]
    out, starts = _fwd_outputs(u, A, chunk)
    if out.numel() > 0:
        block_d, block_n = _blocks(d, n)
        _scan_fwd_kernel[(b, triton.cdiv(d, block_d))](
            u, delta, A, B, C, *(x if x is not None else u for x in (D, z, delta_bias, add)), out, starts,
            d, n, l, starts.shape[1], *_strides(u, delta, z, add, out, B, C),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, HAS_ADD=add is not None,
            SOFTPLUS=delta_softplus, REVERSE=reverse, A_IS_LOG=A_is_log, CHUNK=chunk, BLOCK_D=block_d,
            BLOCK_N=block_n, num_warps=SCAN_NUM_WARPS)
    return _tm(out, token_major), starts


@_scan_fwd.register_fake
def _scan_fwd_fake(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk, reverse=False, add=None,
                   token_major=False, A_is_log=False):
    out, starts = _fwd_outputs(_tm(u, token_major), A, chunk)
    return _tm(out, token_major), starts


@torch.library.custom_op("dis_scan::selective_scan_bwd", mutates_args=())
@_on_its_device
def _scan_bwd(g_out: torch.Tensor, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
              C: torch.Tensor, D: Optional[torch.Tensor], z: Optional[torch.Tensor],
              delta_bias: Optional[torch.Tensor], starts: torch.Tensor, delta_softplus: bool, chunk: int,
              reverse: bool = False, token_major: bool = False, A_is_log: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                         torch.Tensor, torch.Tensor]:
    g_out, u, delta, B, C, z = (_tm(x, token_major) for x in (g_out, u, delta, B, C, z))
    A, D, delta_bias, starts = (x.contiguous() if x is not None else None for x in (A, D, delta_bias, starts))
    b, l, d = u.shape
    n = A.shape[1]
    f32 = dict(dtype=torch.float32, device=u.device)
    g_u, g_delta, g_z = _new(u, u), _new(delta, u), _new(z, u)
    g_A, g_B, g_C = torch.zeros(d, n, **f32), torch.zeros(b, l, n, **f32), torch.zeros(b, l, n, **f32)
    g_D, g_bias = torch.zeros(d, **f32), torch.zeros(d, **f32)
    if u.numel() > 0:
        block_d, block_n = _blocks(d, n)
        grid = (b, triton.cdiv(d, block_d))
        sub = min(SUB_CHUNK, chunk)
        tile = block_d * block_n
        ws = torch.empty(b * grid[1] * 2 * sub * tile, **f32)                  # a piece's h and exp(dt A)
        ws0 = torch.empty(b * grid[1] * triton.cdiv(chunk, sub) * tile, **f32)  # the pieces' start states
        ws_dt = torch.empty(b * grid[1] * chunk * block_d, **f32)
        _scan_bwd_kernel[grid](
            g_out, u, delta, A, B, C, *(x if x is not None else u for x in (D, z, delta_bias)), starts, ws, ws0, ws_dt,
            g_u, g_delta, g_z if z is not None else g_u, g_A, g_B, g_C, g_D, g_bias,
            d, n, l, starts.shape[1], *_strides(g_out, u, delta, z, g_u, g_delta, g_z, B, C, g_B, g_C),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
            REVERSE=reverse, A_IS_LOG=A_is_log, CHUNK=chunk, SUB=sub, BLOCK_D=block_d, BLOCK_N=block_n,
            num_warps=SCAN_NUM_WARPS)
    cast = lambda g, x: g.to(x.dtype) if x is not None else None
    return _bwd_result(token_major, u, g_u, g_delta, g_A.to(A.dtype), g_B.to(B.dtype), g_C.to(C.dtype),
                       cast(g_D, D), g_z, cast(g_bias, delta_bias))


@_scan_bwd.register_fake
def _scan_bwd_fake(g_out, u, delta, A, B, C, D, z, delta_bias, starts, delta_softplus, chunk, reverse=False,
                   token_major=False, A_is_log=False):
    u, B = _tm(u, token_major), _tm(B, token_major)
    return _bwd_result(token_major, u, _new(u, u), _new(delta, u), _new(A, A), _new(B, B), _new(C, B),
                       _new(D, D), _new(z, u), _new(delta_bias, delta_bias))


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk, reverse, add, token_major, A_is_log = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, output[1])   # add is not needed
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)   # no zero gradient of starts' size; g_out is None when out is unused
    ctx.flags = (delta_softplus, chunk, reverse, token_major, A_is_log)
    ctx.add_dtype = add.dtype if add is not None else None


def _backward(ctx, g_out, _g_starts):
    grads = [None] * 14
    if g_out is None:
        return tuple(grads)
    if any(ctx.needs_input_grad[:8]):
        saved = ctx.saved_tensors
        g = torch.ops.dis_scan.selective_scan_bwd(g_out, *saved, *ctx.flags)
        grads[:8] = [gi if x is not None else None for gi, x in zip(g, saved[:8])]
    if ctx.add_dtype is not None:
        grads[11] = g_out.to(ctx.add_dtype)   # out = add + ...: g_out itself when the dtypes agree
    return tuple(grads)


_scan_fwd.register_autograd(_backward, setup_context=_setup_context)


def _check(name, u, delta, A, B, C, D, z, delta_bias, add, chunk, token_major, delta_proj=None):
    layout = "(b, l, d)" if token_major else "(b, d, l)"
    if u.ndim != 3 or A.ndim != 2:
        raise ValueError(f"{name}: u must be {layout} and A (d, n), got {tuple(u.shape)} and {tuple(A.shape)}")
    if delta_proj is not None and (not isinstance(delta_proj, torch.Tensor) or delta_proj.ndim != 2):
        raise ValueError(f"{name}: delta_proj must be a (d, dt_rank) tensor")
    b, l, d = _tm(u, token_major).shape
    n = A.shape[1]
    act, bc = ((b, l, d), (b, l, n)) if token_major else ((b, d, l), (b, n, l))
    low = (b, l, delta_proj.shape[1]) if delta_proj is not None else act
    expected = {"u": (u, act), "delta": (delta, low), "A": (A, (d, n)), "B": (B, bc), "C": (C, bc),
                "D": (D, (d,)), "z": (z, act), "delta_bias": (delta_bias, (d,)), "add": (add, act),
                "delta_proj": (delta_proj, (d, low[-1]))}
    for what, (t, shape) in expected.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {what} must be a tensor, got {type(t).__name__}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}: {what} has shape {tuple(t.shape)}, expected {shape}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name}: {what} is {t.dtype}; supported: float32, bfloat16, float16 "
                            f"(complex A is not supported)")
        if t.device != u.device:
            raise ValueError(f"{name}: {what} is on {t.device}, u on {u.device}")
    if chunk < 1:
        raise ValueError(f"{name}: chunk must be >= 1, got {chunk}")


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          chunk=CHUNK):
    """The selective scan with DiS.selective_scan's (and mamba-ssm's selective_scan_fn's) signature and
    (b, d, l) layout, run by the Triton kernels above; differentiable in every tensor argument. Returns a
    (b, d, l) view of a new contiguous (b, l, d) tensor.
    chunk: tokens per saved state (memory b * d * n * l / chunk floats) and per backward rerun."""
    _check("selective_scan_triton", u, delta, A, B, C, D, z, delta_bias, None, chunk, token_major=False)
    out, _ = torch.ops.dis_scan.selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias,
                                                   bool(delta_softplus), int(chunk))
    return out


def selective_scan_triton_tm(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                             reverse=False, add=None, A_is_log=False, chunk=CHUNK, delta_proj=None):
    """The selective scan on token-major tensors, any strides: u, delta, z, add: (b, l, d), B, C: (b, l, n),
    A: (d, n), D, delta_bias: (d,). reverse scans from the last token to the first (flip, scan, flip back);
    add, if given, is added to the result inside the kernel; A_is_log: A holds Mamba's A_log, and the kernels
    use A = -exp(A_log) (its gradient is A_log's). delta_proj (d, dt_rank), if given: delta is the low-rank
    (b, l, dt_rank) input of dt_proj, projected here (delta @ delta_proj^T in delta's dtype) and again in the
    backward, so that autograd keeps the low-rank part instead of a (b, l, d) tensor.
    Returns a new contiguous (b, l, d) tensor in u's dtype; differentiable in every tensor argument."""
    _check("selective_scan_triton_tm", u, delta, A, B, C, D, z, delta_bias, add, chunk, True, delta_proj)
    flags = (bool(delta_softplus), int(chunk), bool(reverse), True, bool(A_is_log))
    if delta_proj is not None:
        return _LowRankDeltaScan.apply(u, delta, delta_proj, A, B, C, D, z, delta_bias, add, *flags)
    out, _ = torch.ops.dis_scan.selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, *flags[:3], add,
                                                   *flags[3:])
    return out


class _LowRankDeltaScan(torch.autograd.Function):
    """The scan of delta = delta_low @ delta_proj^T (dt_proj), token-major: the projection runs as an ordinary
    matmul before the scan op and again in the backward, so that autograd keeps the low-rank (b, l, dt_rank)
    input instead of the (b, l, d) delta. W is cast to delta_low's dtype, as autocast casts both, so the
    recomputed delta equals the forward's with or without autocast."""

    @staticmethod
    def forward(ctx, u, delta_low, delta_proj, A, B, C, D, z, delta_bias, add, delta_softplus, chunk, reverse,
                token_major, A_is_log):
        delta = F.linear(delta_low, delta_proj.to(delta_low.dtype))                  # (b, l, d)
        out, starts = torch.ops.dis_scan.selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                                            chunk, reverse, add, token_major, A_is_log)
        ctx.save_for_backward(u, delta_low, delta_proj, A, B, C, D, z, delta_bias, starts)
        ctx.flags = (delta_softplus, chunk, reverse, token_major, A_is_log)
        ctx.add_dtype = add.dtype if add is not None else None
        return out

    @staticmethod
    def backward(ctx, g_out):
        u, delta_low, delta_proj, A, B, C, D, z, delta_bias, starts = ctx.saved_tensors
        W = delta_proj.to(delta_low.dtype)
        delta = F.linear(delta_low, W)                                               # recomputed
        g = torch.ops.dis_scan.selective_scan_bwd(g_out, u, delta, A, B, C, D, z, delta_bias, starts, *ctx.flags)
        g_u, g_delta, g_A, g_B, g_C, g_D, g_z, g_bias = (gi if x is not None else None for gi, x in
                                                          zip(g, (u, delta, A, B, C, D, z, delta_bias)))
        g_low = g_delta @ W                                                          # (b, l, dt_rank)
        g_proj = (g_delta.flatten(0, 1).t() @ delta_low.flatten(0, 1)).to(delta_proj.dtype)   # (d, dt_rank)
        g_add = g_out.to(ctx.add_dtype) if ctx.add_dtype is not None else None
        return g_u, g_low, g_proj, g_A, g_B, g_C, g_D, g_z, g_bias, g_add, None, None, None, None, None


#################################################################################
#                                 Conv kernels                                  #
#################################################################################
# A depthwise conv1d + bias (+ SiLU) of token-major x (b, l, d), in one or two directions:
#   causal  (DIR = -1)   pre_t = bias + sum_k weight[:, k] x_{t-(W-1)+k}
#   reverse (DIR = +1)   pre_t = bias + sum_k weight[:, k] x_{t+(W-1)-k}   (the causal conv of the flipped
#                                                                          sequence, flipped back)
# so tap k of token t reads token t + DIR (W-1-k). A bidirectional mixer sends the SAME x through a causal
# conv with the forward direction's (weight_f, bias_f) and a reverse conv with the backward direction's
# (weight_b, bias_b). The kernels take both directions, each switched on by a constexpr (CAUSAL: the _f
# tensors, ANTI: the _b tensors), so one launch serves the pair: the forward reads each x tile once for both
# outputs, and the backward adds both directions' g_x in registers and writes it once (two launches would
# read x twice and write two partial g_x, which an autograd add then reads back to write their sum). A single
# direction is the same kernel with the other switched off; an absent direction's pointers are any tensor,
# never accessed.
# Both kernels: grid (cdiv(l, BLOCK_L), b, cdiv(d, BLOCK_C)) (the token blocks on axis 0, which has no
# 65535 limit); a program owns a (BLOCK_L, BLOCK_C) tile of (token, channel) outputs. The W-1 halo tokens
# of a direction come from the neighbouring tiles' rows (loaded again by each program, mostly from cache).
# Tokens outside [0, l) and channels past d load as 0. Offsets are int64: b * l * d (and a strided view's
# l * stride) can pass 2**31.

@triton.jit
def _conv_load(ptr, row, pos, col, mc, seqlen, stride_l):
    """The (BLOCK_L, BLOCK_C) tile at tokens pos (int64) and channel offsets col, in float32; 0 outside."""
    mt = (pos >= 0) & (pos < seqlen)
    return tl.load(ptr + row + pos[:, None] * stride_l + col[None, :], mask=mt[:, None] & mc[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def _conv_tap(w_ptr, w_col, k, sw_k, mc):
    """weight[:, k] at channel offsets w_col in float32, as a (1, BLOCK_C) row that broadcasts over tokens."""
    return tl.load(w_ptr + w_col + k * sw_k, mask=mc, other=0.0).to(tl.float32)[None, :]


@triton.jit
def _conv_bias(b_ptr, rc, sb_d, mc, HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr):
    """bias at channels rc in float32 (BLOCK_C,); 0 without a bias."""
    bias = tl.zeros((BLOCK_C,), tl.float32)
    if HAS_BIAS:
        bias = tl.load(b_ptr + rc * sb_d, mask=mc, other=0.0).to(tl.float32)
    return bias


@triton.jit
def _conv_store(out_ptr, offs, mask, pre, ACT: tl.constexpr):
    """out = silu(pre) (or pre), in out's dtype."""
    out = pre
    if ACT:
        out = pre / (1.0 + tl.exp(-pre))
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _conv_fwd_kernel(
    x_ptr, sx_b, sx_l, sx_d, seqlen, dim,
    uf_ptr, wf_ptr, swf_d, swf_k, bf_ptr, sbf_d,        # causal direction: out (contiguous), weight, bias
    ub_ptr, wb_ptr, swb_d, swb_k, bb_ptr, sbb_d,        # reverse direction
    CAUSAL: tl.constexpr, ANTI: tl.constexpr, W_F: tl.constexpr, W_B: tl.constexpr,   # an absent one's W: 1
    HAS_BF: tl.constexpr, HAS_BB: tl.constexpr, ACT: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_b = tl.program_id(1).to(tl.int64)
    rt = (tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)).to(tl.int64)     # tokens   (BLOCK_L,)
    rc = (tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)     # channels (BLOCK_C,)
    mc = rc < dim
    x_row, x_col = pid_b * sx_b, rc * sx_d
    pre_f = tl.zeros((BLOCK_L, BLOCK_C), tl.float32) + _conv_bias(bf_ptr, rc, sbf_d, mc, HAS_BF, BLOCK_C)[None, :]
    pre_b = tl.zeros((BLOCK_L, BLOCK_C), tl.float32) + _conv_bias(bb_ptr, rc, sbb_d, mc, HAS_BB, BLOCK_C)[None, :]
    # x shifted by s tokens, s = -(W_F-1) .. W_B-1, feeds the causal tap W_F-1+s (s <= 0) and the reverse tap
    # W_B-1-s (s >= 0): each shifted tile is loaded once, and the unshifted one (s = 0) serves both directions.
    # An absent direction's W is 1, so the loop covers only the shifts the present directions read.
    for s in tl.static_range(1 - W_F, W_B):
        xs = _conv_load(x_ptr, x_row, rt + s, x_col, mc, seqlen, sx_l)
        if CAUSAL and s <= 0:
            pre_f += _conv_tap(wf_ptr, rc * swf_d, W_F - 1 + s, swf_k, mc) * xs
        if ANTI and s >= 0:
            pre_b += _conv_tap(wb_ptr, rc * swb_d, W_B - 1 - s, swb_k, mc) * xs
    offs = pid_b * seqlen * dim + rt[:, None] * dim + rc[None, :]               # the outputs are contiguous
    mask = (rt < seqlen)[:, None] & mc[None, :]
    if CAUSAL:
        _conv_store(uf_ptr, offs, mask, pre_f, ACT)
    if ANTI:
        _conv_store(ub_ptr, offs, mask, pre_b, ACT)


# Gradients of one direction, with g_pre_t = g_out_t silu'(pre_t), silu'(p) = sig(p) (1 + p (1 - sig(p))):
#   g_x_s      = sum_k weight[:, k] g_pre_{s - DIR (W-1-k)}     (the transposed conv: the other direction)
#   g_weight_k = sum_{b,t} g_pre_t x_{t + DIR (W-1-k)}           g_bias = sum_{b,t} g_pre_t
# and with both directions g_x is the sum of the two g_x_s (x feeds both), the causal one reading g_pre_f at
# s .. s+W_F-1, the reverse one g_pre_b at s-(W_B-1) .. s; each direction keeps its own g_weight, g_bias.
# pre is recomputed from x rather than saved by the forward: that saves a (b, l, d) tensor per direction,
# and the op saves only x, the weights and the biases. g_x_s needs g_pre at the W tokens s - DIR (W-1-k); a
# program recomputes them tap by tap (W shifted tiles, W loads of x each: cheap, cached re-reads of a
# memory-bound op's input) rather than exchanging halos through a workspace. The tap W-1 is the program's
# own tokens: its g_pre also gives the program's partial sums of g_weight and g_bias (over its BLOCK_L
# tokens), added with tl.atomic_add into float32 (d, W) and (d,) buffers, cast to the parameters' dtypes
# afterwards. A direction without an upstream gradient (its output unused by the loss) is switched off: its
# g_pre is 0, it adds nothing to g_x, and its g_weight, g_bias stay 0.

@triton.jit
def _conv_pre(x_ptr, w_ptr, x_row, pos, x_col, w_col, mc, bias, seqlen, sx_l, sw_k,
              W: tl.constexpr, DIR: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
    """One direction's pre at tokens pos: bias + sum_k weight[:, k] x_{pos + DIR (W-1-k)}, float32."""
    pre = tl.zeros((BLOCK_L, BLOCK_C), tl.float32) + bias[None, :]
    for k in tl.static_range(W):
        pre += _conv_tap(w_ptr, w_col, k, sw_k, mc) * _conv_load(x_ptr, x_row, pos + DIR * (W - 1 - k), x_col,
                                                                 mc, seqlen, sx_l)
    return pre


@triton.jit
def _conv_g_pre(g_ptr, x_ptr, w_ptr, g_row, x_row, pos, g_col, x_col, w_col, mc, bias, seqlen, sg_l, sx_l,
                sw_k, W: tl.constexpr, DIR: tl.constexpr, ACT: tl.constexpr,
                BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
    """g_pre at tokens pos: g_out silu'(pre), with pre recomputed from x; 0 outside [0, l)."""
    g = _conv_load(g_ptr, g_row, pos, g_col, mc, seqlen, sg_l)
    if ACT:
        pre = _conv_pre(x_ptr, w_ptr, x_row, pos, x_col, w_col, mc, bias, seqlen, sx_l, sw_k,
                        W, DIR, BLOCK_L, BLOCK_C)
        sig = 1.0 / (1.0 + tl.exp(-pre))
        g = g * sig * (1.0 + pre * (1.0 - sig))
    return g


@triton.jit
def _conv_bwd_dir(g_ptr, sg_b, sg_l, sg_d, x_ptr, x_row, x_col, sx_l, w_ptr, sw_d, sw_k, b_ptr, sb_d,
                  gw_ptr, gb_ptr, pid_b, rt, rc, mc, seqlen, W: tl.constexpr, DIR: tl.constexpr,
                  HAS_BIAS: tl.constexpr, ACT: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
    """One direction's share of g_x on the program's tile, float32; adds its partial g_weight, g_bias sums."""
    bias = _conv_bias(b_ptr, rc, sb_d, mc, HAS_BIAS, BLOCK_C)
    g_row, g_col, w_col = pid_b * sg_b, rc * sg_d, rc * sw_d

    # own tokens (tap W-1, shift 0): g_pre, the partial sums of g_bias and g_weight
    g_pre = _conv_g_pre(g_ptr, x_ptr, w_ptr, g_row, x_row, rt, g_col, x_col, w_col, mc, bias, seqlen, sg_l,
                        sx_l, sw_k, W, DIR, ACT, BLOCK_L, BLOCK_C)     # 0 at tokens past l
    if HAS_BIAS:
        tl.atomic_add(gb_ptr + rc, tl.sum(g_pre, axis=0), mask=mc, sem="relaxed")
    for k in tl.static_range(W):
        xk = _conv_load(x_ptr, x_row, rt + DIR * (W - 1 - k), x_col, mc, seqlen, sx_l)
        tl.atomic_add(gw_ptr + rc * W + k, tl.sum(g_pre * xk, axis=0), mask=mc, sem="relaxed")
    g_x = _conv_tap(w_ptr, w_col, W - 1, sw_k, mc) * g_pre

    # the other taps: g_pre at the shifted tokens, recomputed
    for k in tl.static_range(W - 1):
        g_x += _conv_tap(w_ptr, w_col, k, sw_k, mc) * _conv_g_pre(
            g_ptr, x_ptr, w_ptr, g_row, x_row, rt - DIR * (W - 1 - k), g_col, x_col, w_col, mc, bias, seqlen,
            sg_l, sx_l, sw_k, W, DIR, ACT, BLOCK_L, BLOCK_C)
    return g_x


@triton.jit
def _conv_bwd_kernel(
    x_ptr, sx_b, sx_l, sx_d, seqlen, dim, gx_ptr,                                  # g_x: (b, l, d) contiguous
    gf_ptr, sgf_b, sgf_l, sgf_d, wf_ptr, swf_d, swf_k, bf_ptr, sbf_d, gwf_ptr, gbf_ptr,   # causal direction
    gb_ptr, sgb_b, sgb_l, sgb_d, wb_ptr, swb_d, swb_k, bb_ptr, sbb_d, gwb_ptr, gbb_ptr,   # reverse direction
    CAUSAL: tl.constexpr, ANTI: tl.constexpr, W_F: tl.constexpr, W_B: tl.constexpr,
    HAS_BF: tl.constexpr, HAS_BB: tl.constexpr, ACT: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # per direction: g_out (strided), weight, bias, and the zeroed float32 g_weight (d, W), g_bias (d,) buffers
    pid_b = tl.program_id(1).to(tl.int64)
    rt = (tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)).to(tl.int64)
    rc = (tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    mc = rc < dim
    x_row, x_col = pid_b * sx_b, rc * sx_d
    g_x = tl.zeros((BLOCK_L, BLOCK_C), tl.float32)
    if CAUSAL:
        g_x += _conv_bwd_dir(gf_ptr, sgf_b, sgf_l, sgf_d, x_ptr, x_row, x_col, sx_l, wf_ptr, swf_d, swf_k,
                             bf_ptr, sbf_d, gwf_ptr, gbf_ptr, pid_b, rt, rc, mc, seqlen,
                             W_F, -1, HAS_BF, ACT, BLOCK_L, BLOCK_C)
    if ANTI:
        g_x += _conv_bwd_dir(gb_ptr, sgb_b, sgb_l, sgb_d, x_ptr, x_row, x_col, sx_l, wb_ptr, swb_d, swb_k,
                             bb_ptr, sbb_d, gwb_ptr, gbb_ptr, pid_b, rt, rc, mc, seqlen,
                             W_B, 1, HAS_BB, ACT, BLOCK_L, BLOCK_C)
    offs = pid_b * seqlen * dim + rt[:, None] * dim + rc[None, :]
    tl.store(gx_ptr + offs, g_x.to(gx_ptr.dtype.element_ty), mask=(rt < seqlen)[:, None] & mc[None, :])


# Widths up to STREAM_MAX_W (DiS's d_conv is 4) take streamed kernels: a program owns one batch row and
# BLOCK_C channels (one per thread) and walks the tokens once, keeping the last STREAM_MAX_W x rows (and in
# the backward g_pre_f and g_pre_b values) in registers, so every x and g_out row is loaded once and every
# g_pre computed once (the tiled backward above recomputes g_pre at W shifted tiles, each from W loads of x,
# and reduces g_weight across threads on every tile; here g_weight and g_bias are per-channel sums in
# registers, added once at the end). The tiled kernels serve wider convs.
# With taps written by distance, wf_j = weight_f[:, W_F-1-j] (the weight of x_{t-j} in pre_f_t) and
# wb_j = weight_b[:, W_B-1-j] (of x_{t+j} in pre_b_t), 0 for j >= W, step i (i = 0 .. l+2) takes token i in:
#   pre_f_i     = bias_f + sum_j wf_j x_{i-j}         g_pre_f_i = g_f_i silu'(pre_f_i)
#   pre_b_{i-3} = bias_b + sum_j wb_j x_{i-3+j}       g_pre_b_{i-3} = g_b_{i-3} silu'(pre_b_{i-3})
#   g_x_{i-3}   = sum_j wf_j g_pre_f_{i-3+j} + sum_j wb_j g_pre_b_{i-3-j}
#   g_wf_j += g_pre_f_i x_{i-j},   g_wb_j += g_pre_b_{i-3} x_{i-3+j}
# (x, g_out and g_pre are 0 outside [0, l); the windows start as 0.)
STREAM_MAX_W = 4


@triton.jit
def _tap_by_distance(w_ptr, w_col, sw_k, mc, W: tl.constexpr, J: tl.constexpr, BLOCK_C: tl.constexpr):
    """The weight of the input J tokens away, weight[:, W-1-J] (float32, (BLOCK_C,)); 0 for J >= W."""
    if J < W:
        return tl.load(w_ptr + w_col + (W - 1 - J) * sw_k, mask=mc, other=0.0).to(tl.float32)
    return tl.zeros((BLOCK_C,), tl.float32)


@triton.jit
def _g_pre(g, pre, ACT: tl.constexpr):
    """g_out silu'(pre) (g_out itself without the activation)."""
    if ACT:
        sig = 1.0 / (1.0 + tl.exp2(-pre * LOG2E))
        g = g * sig * (1.0 + pre * (1.0 - sig))
    return g


@triton.jit
def _add_tap_grads(gw_ptr, rc, mc, W: tl.constexpr, g0, g1, g2, g3):
    """Adds the per-distance sums g_j to g_weight[:, W-1-j] of a contiguous (d, W) float32 buffer."""
    tl.atomic_add(gw_ptr + rc * W + (W - 1), g0, mask=mc, sem="relaxed")
    if W > 1:
        tl.atomic_add(gw_ptr + rc * W + (W - 2), g1, mask=mc, sem="relaxed")
    if W > 2:
        tl.atomic_add(gw_ptr + rc * W + (W - 3), g2, mask=mc, sem="relaxed")
    if W > 3:
        tl.atomic_add(gw_ptr + rc * W + (W - 4), g3, mask=mc, sem="relaxed")


@triton.jit
def _stream_params(w_ptr, sw_d, sw_k, b_ptr, sb_d, rc, mc, W: tl.constexpr, HAS_BIAS: tl.constexpr,
                   BLOCK_C: tl.constexpr):
    """One direction's four taps by distance (0 for taps past W) and its bias, for the streamed kernels."""
    w_col = rc * sw_d
    w0 = _tap_by_distance(w_ptr, w_col, sw_k, mc, W, 0, BLOCK_C)
    w1 = _tap_by_distance(w_ptr, w_col, sw_k, mc, W, 1, BLOCK_C)
    w2 = _tap_by_distance(w_ptr, w_col, sw_k, mc, W, 2, BLOCK_C)
    w3 = _tap_by_distance(w_ptr, w_col, sw_k, mc, W, 3, BLOCK_C)
    return w0, w1, w2, w3, _conv_bias(b_ptr, rc, sb_d, mc, HAS_BIAS, BLOCK_C)


@triton.jit
def _conv_fwd_stream_kernel(
    x_ptr, sx_b, sx_l, sx_d, seqlen, dim,
    uf_ptr, wf_ptr, swf_d, swf_k, bf_ptr, sbf_d,        # causal direction: out (contiguous), weight, bias
    ub_ptr, wb_ptr, swb_d, swb_k, bb_ptr, sbb_d,        # reverse direction
    CAUSAL: tl.constexpr, ANTI: tl.constexpr, W_F: tl.constexpr, W_B: tl.constexpr,
    HAS_BF: tl.constexpr, HAS_BB: tl.constexpr, ACT: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # the forward of the streamed walk: step i stores u_f_i and u_b_{i-3}, each x row loaded once
    pid_b = tl.program_id(0).to(tl.int64)
    rc = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    mc = rc < dim
    wf0, wf1, wf2, wf3, bias_f = _stream_params(wf_ptr, swf_d, swf_k, bf_ptr, sbf_d, rc, mc, W_F, HAS_BF, BLOCK_C)
    wb0, wb1, wb2, wb3, bias_b = _stream_params(wb_ptr, swb_d, swb_k, bb_ptr, sbb_d, rc, mc, W_B, HAS_BB, BLOCK_C)
    px = x_ptr + pid_b * sx_b + rc * sx_d                        # token i
    puf = uf_ptr + pid_b * seqlen * dim + rc                     # token i
    pub = ub_ptr + pid_b * seqlen * dim + rc - 3 * dim           # token i - 3
    zero = tl.zeros((BLOCK_C,), tl.float32)
    x1, x2, x3 = zero, zero, zero            # x_{i-1}, x_{i-2}, x_{i-3}
    for i in range(0, seqlen + 3):
        x0 = tl.load(px, mask=mc & (i < seqlen), other=0.0).to(tl.float32)
        if CAUSAL:
            _conv_store(puf, 0, mc & (i < seqlen), bias_f + wf0 * x0 + wf1 * x1 + wf2 * x2 + wf3 * x3, ACT)
        if ANTI:
            _conv_store(pub, 0, mc & (i >= 3), bias_b + wb0 * x3 + wb1 * x2 + wb2 * x1 + wb3 * x0, ACT)
        x1, x2, x3 = x0, x1, x2
        px, puf, pub = px + sx_l, puf + dim, pub + dim


@triton.jit
def _conv_bwd_stream_kernel(
    x_ptr, sx_b, sx_l, sx_d, seqlen, dim, gx_ptr,                                  # g_x: (b, l, d) contiguous
    gf_ptr, sgf_b, sgf_l, sgf_d, wf_ptr, swf_d, swf_k, bf_ptr, sbf_d, gwf_ptr, gbf_ptr,   # causal direction
    gb_ptr, sgb_b, sgb_l, sgb_d, wb_ptr, swb_d, swb_k, bb_ptr, sbb_d, gwb_ptr, gbb_ptr,   # reverse direction
    CAUSAL: tl.constexpr, ANTI: tl.constexpr, W_F: tl.constexpr, W_B: tl.constexpr,
    HAS_BF: tl.constexpr, HAS_BB: tl.constexpr, ACT: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    rc = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    mc = rc < dim
    wf0, wf1, wf2, wf3, bias_f = _stream_params(wf_ptr, swf_d, swf_k, bf_ptr, sbf_d, rc, mc, W_F, HAS_BF, BLOCK_C)
    wb0, wb1, wb2, wb3, bias_b = _stream_params(wb_ptr, swb_d, swb_k, bb_ptr, sbb_d, rc, mc, W_B, HAS_BB, BLOCK_C)
    px = x_ptr + pid_b * sx_b + rc * sx_d                        # token i
    pgf = gf_ptr + pid_b * sgf_b + rc * sgf_d                    # token i
    pgb = gb_ptr + pid_b * sgb_b + rc * sgb_d - 3 * sgb_l        # token i - 3
    pgx = gx_ptr + pid_b * seqlen * dim + rc - 3 * dim           # token i - 3

    zero = tl.zeros((BLOCK_C,), tl.float32)
    x1, x2, x3 = zero, zero, zero            # x_{i-1}, x_{i-2}, x_{i-3}
    gf1, gf2, gf3 = zero, zero, zero         # g_pre_f at i-1, i-2, i-3
    gb1, gb2, gb3 = zero, zero, zero         # g_pre_b at i-4, i-5, i-6
    gwf0, gwf1, gwf2, gwf3, gbias_f = zero, zero, zero, zero, zero
    gwb0, gwb1, gwb2, gwb3, gbias_b = zero, zero, zero, zero, zero
    for i in range(0, seqlen + 3):
        x0 = tl.load(px, mask=mc & (i < seqlen), other=0.0).to(tl.float32)
        g_x = zero
        gpf = zero
        gpb = zero
        if CAUSAL:
            pre_f = bias_f + wf0 * x0 + wf1 * x1 + wf2 * x2 + wf3 * x3
            gpf = _g_pre(tl.load(pgf, mask=mc & (i < seqlen), other=0.0).to(tl.float32), pre_f, ACT)
            g_x = wf0 * gf3 + wf1 * gf2 + wf2 * gf1 + wf3 * gpf
            gwf0, gwf1, gwf2, gwf3 = gwf0 + gpf * x0, gwf1 + gpf * x1, gwf2 + gpf * x2, gwf3 + gpf * x3
            gbias_f += gpf
        if ANTI:
            pre_b = bias_b + wb0 * x3 + wb1 * x2 + wb2 * x1 + wb3 * x0
            gpb = _g_pre(tl.load(pgb, mask=mc & (i >= 3) & (i < seqlen + 3), other=0.0).to(tl.float32), pre_b, ACT)
            g_x += wb0 * gpb + wb1 * gb1 + wb2 * gb2 + wb3 * gb3
            gwb0, gwb1, gwb2, gwb3 = gwb0 + gpb * x3, gwb1 + gpb * x2, gwb2 + gpb * x1, gwb3 + gpb * x0
            gbias_b += gpb
        tl.store(pgx, g_x.to(gx_ptr.dtype.element_ty), mask=mc & (i >= 3))
        x1, x2, x3 = x0, x1, x2
        gf1, gf2, gf3 = gpf, gf1, gf2
        gb1, gb2, gb3 = gpb, gb1, gb2
        px, pgf, pgb, pgx = px + sx_l, pgf + sgf_l, pgb + sgb_l, pgx + dim
    if CAUSAL:
        _add_tap_grads(gwf_ptr, rc, mc, W_F, gwf0, gwf1, gwf2, gwf3)
        if HAS_BF:
            tl.atomic_add(gbf_ptr + rc, gbias_f, mask=mc, sem="relaxed")
    if ANTI:
        _add_tap_grads(gwb_ptr, rc, mc, W_B, gwb0, gwb1, gwb2, gwb3)
        if HAS_BB:
            tl.atomic_add(gbb_ptr + rc, gbias_b, mask=mc, sem="relaxed")


#################################################################################
#                       Conv launchers and custom ops                           #
#################################################################################

def _conv_grid(b, l, d, backward=False):
    """Grid and block sizes (BLOCK_L, BLOCK_C): smaller for short or narrow inputs. The backward takes half
    the forward's tokens per program: it holds more values per token (compiled for sm_90 by Triton 3.8, a
    full-size backward tile spilled registers)."""
    block_l = min(CONV_BLOCK_L // 2 if backward else CONV_BLOCK_L, triton.next_power_of_2(l))
    block_c = min(CONV_BLOCK_D, triton.next_power_of_2(d))
    return (triton.cdiv(l, block_l), b, triton.cdiv(d, block_c)), block_l, block_c


def _conv_arg(t, ndim, stand_in):
    """A tensor kernel argument followed by its first ndim strides (0 for an output, contiguous by
    construction); an absent tensor (None) as stand_in, never accessed, with zero strides."""
    return (t,) + t.stride()[:ndim] if t is not None else (stand_in,) + (0,) * ndim


def _conv_width(weight):
    return weight.shape[1] if weight is not None else 1


@_on_its_device
def _conv_fwd_impl(x, weight_f, bias_f, weight_b, bias_b, activation):
    """(u_f, u_b): the causal conv of x with (weight_f, bias_f) and the reverse one with (weight_b, bias_b),
    in one launch; a direction whose weight is None is skipped, and its output is None."""
    b, l, d = x.shape
    u_f, u_b = (_new(x, x) if w is not None else None for w in (weight_f, weight_b))
    if x.numel() > 0 and max(_conv_width(weight_f), _conv_width(weight_b)) <= STREAM_MAX_W:
        block_c = min(CONV_STREAM_BLOCK_C, triton.next_power_of_2(d))
        _conv_fwd_stream_kernel[(b, triton.cdiv(d, block_c))](
            x, *x.stride(), l, d,
            *_conv_arg(u_f, 0, x), *_conv_arg(weight_f, 2, x), *_conv_arg(bias_f, 1, x),
            *_conv_arg(u_b, 0, x), *_conv_arg(weight_b, 2, x), *_conv_arg(bias_b, 1, x),
            CAUSAL=weight_f is not None, ANTI=weight_b is not None,
            W_F=_conv_width(weight_f), W_B=_conv_width(weight_b),
            HAS_BF=bias_f is not None, HAS_BB=bias_b is not None, ACT=activation,
            BLOCK_C=block_c, num_warps=max(1, block_c // 32))
    elif x.numel() > 0:
        grid, block_l, block_c = _conv_grid(b, l, d)
        _conv_fwd_kernel[grid](
            x, *x.stride(), l, d,
            *_conv_arg(u_f, 0, x), *_conv_arg(weight_f, 2, x), *_conv_arg(bias_f, 1, x),
            *_conv_arg(u_b, 0, x), *_conv_arg(weight_b, 2, x), *_conv_arg(bias_b, 1, x),
            CAUSAL=weight_f is not None, ANTI=weight_b is not None,
            W_F=_conv_width(weight_f), W_B=_conv_width(weight_b),
            HAS_BF=bias_f is not None, HAS_BB=bias_b is not None, ACT=activation,
            BLOCK_L=block_l, BLOCK_C=block_c, num_warps=NUM_WARPS)
    return u_f, u_b


@_on_its_device
def _conv_bwd_impl(g_u_f, g_u_b, x, weight_f, bias_f, weight_b, bias_b, activation):
    """The gradients (g_x, g_weight_f, g_bias_f, g_weight_b, g_bias_b) of _conv_fwd_impl's outputs for the
    upstream g_u_f, g_u_b. A direction whose gradient is None adds nothing (its g_weight, g_bias are 0); one
    whose weight is None is absent (g_weight None); an absent bias's gradient is a (0,)-shaped tensor."""
    b, l, d = x.shape
    g_x = _new(x, x)
    g_wf, g_bf, g_wb, g_bb = (torch.zeros(t.shape, dtype=torch.float32, device=x.device) if t is not None
                              else None for t in (weight_f, bias_f, weight_b, bias_b))
    if x.numel() > 0 and max(_conv_width(weight_f), _conv_width(weight_b)) <= STREAM_MAX_W:
        block_c = min(CONV_STREAM_BLOCK_C, triton.next_power_of_2(d))
        _conv_bwd_stream_kernel[(b, triton.cdiv(d, block_c))](
            x, *x.stride(), l, d, g_x,
            *_conv_arg(g_u_f, 3, x), *_conv_arg(weight_f, 2, x), *_conv_arg(bias_f, 1, x),
            *_conv_arg(g_wf, 0, x), *_conv_arg(g_bf, 0, x),
            *_conv_arg(g_u_b, 3, x), *_conv_arg(weight_b, 2, x), *_conv_arg(bias_b, 1, x),
            *_conv_arg(g_wb, 0, x), *_conv_arg(g_bb, 0, x),
            CAUSAL=g_u_f is not None, ANTI=g_u_b is not None,
            W_F=_conv_width(weight_f), W_B=_conv_width(weight_b),
            HAS_BF=bias_f is not None, HAS_BB=bias_b is not None, ACT=activation,
            BLOCK_C=block_c, num_warps=max(1, block_c // 32))
    elif x.numel() > 0:
        grid, block_l, block_c = _conv_grid(b, l, d, backward=True)
        _conv_bwd_kernel[grid](
            x, *x.stride(), l, d, g_x,
            *_conv_arg(g_u_f, 3, x), *_conv_arg(weight_f, 2, x), *_conv_arg(bias_f, 1, x),
            *_conv_arg(g_wf, 0, x), *_conv_arg(g_bf, 0, x),
            *_conv_arg(g_u_b, 3, x), *_conv_arg(weight_b, 2, x), *_conv_arg(bias_b, 1, x),
            *_conv_arg(g_wb, 0, x), *_conv_arg(g_bb, 0, x),
            CAUSAL=g_u_f is not None, ANTI=g_u_b is not None,
            W_F=_conv_width(weight_f), W_B=_conv_width(weight_b),
            HAS_BF=bias_f is not None, HAS_BB=bias_b is not None, ACT=activation,
            BLOCK_L=block_l, BLOCK_C=block_c, num_warps=NUM_WARPS)
    cast = lambda g, p, absent: g.to(p.dtype) if p is not None else absent      # noqa: E731
    return (g_x, cast(g_wf, weight_f, None), cast(g_bf, bias_f, x.new_empty(0)),
            cast(g_wb, weight_b, None), cast(g_bb, bias_b, x.new_empty(0)))


def _one_dir(reverse, weight, bias):
    """A single direction's (weight, bias) in its place among (weight_f, bias_f, weight_b, bias_b)."""
    return (None, None, weight, bias) if reverse else (weight, bias, None, None)


@torch.library.custom_op("dis_scan::causal_conv1d_fwd", mutates_args=())
def _conv_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], reverse: bool,
              activation: bool) -> torch.Tensor:
    u_f, u_b = _conv_fwd_impl(x, *_one_dir(reverse, weight, bias), activation)
    return u_b if reverse else u_f


@_conv_fwd.register_fake
def _conv_fwd_fake(x, weight, bias, reverse, activation):
    return _new(x, x)


@torch.library.custom_op("dis_scan::causal_conv1d_bwd", mutates_args=())
def _conv_bwd(g_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
              reverse: bool, activation: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g_u = (None, g_out) if reverse else (g_out, None)
    g_x, g_wf, g_bf, g_wb, g_bb = _conv_bwd_impl(*g_u, x, *_one_dir(reverse, weight, bias), activation)
    return (g_x, g_wb, g_bb) if reverse else (g_x, g_wf, g_bf)


@_conv_bwd.register_fake
def _conv_bwd_fake(g_out, x, weight, bias, reverse, activation):
    return _new(x, x), _new(weight, weight), _new(bias, bias) if bias is not None else x.new_empty(0)


def _conv_setup_context(ctx, inputs, output):
    x, weight, bias, reverse, activation = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.reverse, ctx.activation = reverse, activation


def _conv_backward(ctx, g_out):
    x, weight, bias = ctx.saved_tensors
    g_x, g_w, g_b = torch.ops.dis_scan.causal_conv1d_bwd(g_out, x, weight, bias, ctx.reverse, ctx.activation)
    return g_x, g_w, g_b if bias is not None else None, None, None


_conv_fwd.register_autograd(_conv_backward, setup_context=_conv_setup_context)


@torch.library.custom_op("dis_scan::causal_conv1d_bidir_fwd", mutates_args=())
def _conv_bidir_fwd(x: torch.Tensor, weight_f: torch.Tensor, bias_f: Optional[torch.Tensor],
                    weight_b: torch.Tensor, bias_b: Optional[torch.Tensor],
                    activation: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _conv_fwd_impl(x, weight_f, bias_f, weight_b, bias_b, activation)


@_conv_bidir_fwd.register_fake
def _conv_bidir_fwd_fake(x, weight_f, bias_f, weight_b, bias_b, activation):
    return _new(x, x), _new(x, x)


@torch.library.custom_op("dis_scan::causal_conv1d_bidir_bwd", mutates_args=())
def _conv_bidir_bwd(g_u_f: Optional[torch.Tensor], g_u_b: Optional[torch.Tensor], x: torch.Tensor,
                    weight_f: torch.Tensor, bias_f: Optional[torch.Tensor], weight_b: torch.Tensor,
                    bias_b: Optional[torch.Tensor], activation: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _conv_bwd_impl(g_u_f, g_u_b, x, weight_f, bias_f, weight_b, bias_b, activation)


@_conv_bidir_bwd.register_fake
def _conv_bidir_bwd_fake(g_u_f, g_u_b, x, weight_f, bias_f, weight_b, bias_b, activation):
    return (_new(x, x), _new(weight_f, weight_f), _new(bias_f, bias_f) if bias_f is not None else x.new_empty(0),
            _new(weight_b, weight_b), _new(bias_b, bias_b) if bias_b is not None else x.new_empty(0))


def _conv_bidir_setup_context(ctx, inputs, output):
    x, weight_f, bias_f, weight_b, bias_b, activation = inputs
    ctx.save_for_backward(x, weight_f, bias_f, weight_b, bias_b)
    ctx.activation = activation
    # a loss that uses only one of u_f, u_b sends None for the other: the backward skips that direction
    # rather than reading a materialised (b, l, d) tensor of zeros
    ctx.set_materialize_grads(False)


def _conv_bidir_backward(ctx, g_u_f, g_u_b):
    x, weight_f, bias_f, weight_b, bias_b = ctx.saved_tensors
    g_x, g_wf, g_bf, g_wb, g_bb = torch.ops.dis_scan.causal_conv1d_bidir_bwd(
        g_u_f, g_u_b, x, weight_f, bias_f, weight_b, bias_b, ctx.activation)
    return (g_x, g_wf, g_bf if bias_f is not None else None, g_wb, g_bb if bias_b is not None else None,
            None)


_conv_bidir_fwd.register_autograd(_conv_bidir_backward, setup_context=_conv_bidir_setup_context)


def _conv_check(x, weight, bias, name="causal_conv1d_triton", suffix=""):
    """weight as (d, w); one clear error per problem. suffix names the direction's tensors (weight_f, ...)."""
    if not isinstance(x, torch.Tensor) or x.ndim != 3:
        raise ValueError(f"{name}: x must be a (b, l, d) tensor, got shape {tuple(getattr(x, 'shape', ()))}")
    d = x.shape[2]
    if weight.ndim == 3 and weight.shape[1] == 1:
        weight = weight[:, 0]
    if weight.ndim != 2 or weight.shape[0] != d or weight.shape[1] < 1:
        raise ValueError(f"{name}: weight{suffix} must be (d, w) or (d, 1, w) with d = {d} and w >= 1, "
                         f"got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (d,):
        raise ValueError(f"{name}: bias{suffix} has shape {tuple(bias.shape)}, expected ({d},)")
    for what, t in (("x", x), ("weight" + suffix, weight), ("bias" + suffix, bias)):
        if t is not None and t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name}: {what} is {t.dtype}; supported: float32, bfloat16, float16")
        if t is not None and t.device != x.device:
            raise ValueError(f"{name}: {what} is on {t.device}, x on {x.device}")
    if x.device.type == "cpu" and not _interpreter_ready():
        raise ValueError(f"{name}: x is on the CPU, where Triton runs only in its interpreter: set "
                         f"TRITON_INTERPRET=1 before triton is first imported")
    if x.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name}: x is on {x.device}; the kernels run on CUDA (or the CPU interpreter)")
    return weight


def causal_conv1d_triton(x, weight, bias=None, reverse=False, activation=True):
    """Depthwise causal (reverse=False) or anti-causal (reverse=True) conv1d + bias, then SiLU if activation,
    on token-major x (b, l, d) of any strides; weight (d, w) or (d, 1, w), bias (d,) or None.
    Returns a new contiguous (b, l, d) tensor in x's dtype; differentiable in x, weight and bias."""
    weight = _conv_check(x, weight, bias)
    return torch.ops.dis_scan.causal_conv1d_fwd(x, weight, bias, bool(reverse), bool(activation))


def causal_conv1d_bidir_triton(x, weight_f, bias_f, weight_b, bias_b, activation=True):
    """Both convs of a bidirectional mixer in one launch: (u_f, u_b) = (causal_conv1d_triton(x, weight_f, bias_f),
    causal_conv1d_triton(x, weight_b, bias_b, reverse=True)), with the same arguments' rules (the two widths
    may differ), and one backward launch that writes x's gradient once."""
    name = "causal_conv1d_bidir_triton"
    weight_f = _conv_check(x, weight_f, bias_f, name, "_f")
    weight_b = _conv_check(x, weight_b, bias_b, name, "_b")
    return torch.ops.dis_scan.causal_conv1d_bidir_fwd(x, weight_f, bias_f, weight_b, bias_b, bool(activation))


#################################################################################
#                        Add + RMSNorm kernels                                  #
#################################################################################
# These kernels replace the start of DiS.Block.forward:
#
#     residual = hidden.float() if residual is None else residual + drop_path(hidden, prob, training).float()
#     normed = nn.RMSNorm(d, eps)(residual.to(norm.weight.dtype))      # float32 weight, float32 math
#
# with one kernel that reads hidden and residual once and writes the float32 stream and the normed rows:
#
#     residual_out = residual + scale[b] * hidden          (float32; residual None: scale[b] * hidden)
#     normed       = residual_out * rsqrt(mean_d(residual_out^2) + eps) * weight     (stored in out_dtype)
#
# scale is drop-path's per-sample factor keep[b] / (1 - prob), 0 or 1 / (1 - prob), drawn by the caller
# (None: 1). Everything is computed in float32 and only the stored normed is rounded, as the readable path
# does (its RMSNorm runs in float32 on the float32 stream; autocast casts the result at the mixer's Linear).
# The readable drop_path multiplies in hidden's dtype first; here the product is float32, slightly closer.
#
# Layouts: hidden (b, l, d) float32 / bfloat16 / float16, residual (b, l, d) float32 or None, weight (d,)
# float32, scale (b,) float32 or None. hidden and residual may have any strides over b and l; their last
# dimension should have unit stride (otherwise the op copies it to a contiguous tensor first). The outputs
# are new contiguous tensors.
#
# Backward, per row with x = residual_out, rstd = rsqrt(mean(x^2) + eps), xhat = x * rstd, gy = g_normed:
#     g_weight  = sum over rows of gy * xhat
#     g_x       = rstd * (gy * weight - xhat * mean_d(gy * weight * xhat))       (RMSNorm's backward)
#     g_total   = g_x + g_residual_out                  (the stream also flows on to the next block)
#     g_residual = g_total (float32),   g_hidden = scale[b] * g_total (hidden's dtype)
# rstd is recomputed from the saved residual_out (the row is loaded anyway), so the forward saves nothing
# beyond the stream it returns. g_weight: each backward program sums its rows in registers and writes one
# partial row; torch sums the partials (deterministic, unlike atomics, and with no contention on d floats).
#
# One row = one token (b, l) with its d channels; BLOCK_D = next_power_of_2(d) and a column mask. Masked
# columns load as 0, so they add nothing to the sums of squares or to any gradient. Row offsets are int64:
# b * l * d can pass 2**31.

@triton.jit
def _add_rms_norm_fwd_kernel(
    h_ptr, res_ptr, w_ptr, scale_ptr,                 # inputs (absent ones: any pointer)
    out_ptr, resout_ptr,                              # outputs, contiguous (b, l, d)
    seqlen, dim, h_sb, h_sl, r_sb, r_sl, eps,
    HAS_RES: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)               # one program per row
    bi = row // seqlen
    li = row - bi * seqlen
    cols = tl.arange(0, BLOCK_D)
    mask = cols < dim
    x = tl.load(h_ptr + bi * h_sb + li * h_sl + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        x = x * tl.load(scale_ptr + bi)
    if HAS_RES:
        x += tl.load(res_ptr + bi * r_sb + li * r_sl + cols, mask=mask, other=0.0)
    tl.store(resout_ptr + row * dim + cols, x, mask=mask)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / dim + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    y = x * rstd * w                                  # RMSNorm's order: normalize, then the weight
    tl.store(out_ptr + row * dim + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _add_rms_norm_bwd_kernel(
    gy_ptr, gres_ptr, x_ptr, w_ptr, scale_ptr,        # inputs: g_normed, g_residual_out, residual_out, ...
    gh_ptr, gr_ptr, gw_ptr,                           # outputs: g_hidden, g_residual (b, l, d), partials (P, d)
    n_rows, seqlen, dim, rows_per_prog, gy_sb, gy_sl, gr_sb, gr_sl, eps,
    HAS_GRES: tl.constexpr, HAS_SCALE: tl.constexpr, WRITE_GRES: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Each program owns rows_per_prog consecutive rows and sums its share of g_weight in registers; rows
    # past n_rows (the last program's tail) are masked out whole, so they add nothing.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < dim
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0)
    gw_acc = tl.zeros((BLOCK_D,), tl.float32)
    first = pid.to(tl.int64) * rows_per_prog
    for i in range(0, rows_per_prog):
        row = first + i
        mask = cmask & (row < n_rows)
        bi = row // seqlen
        li = row - bi * seqlen
        x = tl.load(x_ptr + row * dim + cols, mask=mask, other=0.0)
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) / dim + eps)    # recomputed exactly as in the forward
        xhat = x * rstd
        gy = tl.load(gy_ptr + bi * gy_sb + li * gy_sl + cols, mask=mask, other=0.0).to(tl.float32)
        gw_acc += gy * xhat
        gxhat = gy * w
        gx = (gxhat - xhat * (tl.sum(gxhat * xhat, axis=0) / dim)) * rstd
        if HAS_GRES:
            gx += tl.load(gres_ptr + bi * gr_sb + li * gr_sl + cols, mask=mask, other=0.0).to(tl.float32)
        if WRITE_GRES:
            tl.store(gr_ptr + row * dim + cols, gx, mask=mask)
        if HAS_SCALE:
            gx = gx * tl.load(scale_ptr + bi, mask=row < n_rows, other=0.0)
        tl.store(gh_ptr + row * dim + cols, gx.to(gh_ptr.dtype.element_ty), mask=mask)
    tl.store(gw_ptr + pid * dim + cols, gw_acc, mask=cmask)


#################################################################################
#                          Launchers and custom ops                             #
#################################################################################

def _norm_launch_params(d):
    """BLOCK_D (d padded to 2^k) and num_warps: about 4 floats per thread, 1 to 8 warps."""
    block_d = triton.next_power_of_2(d)
    return block_d, min(max(block_d // 128, 1), 8)


def _norm_bwd_programs(device, n_rows):
    """Backward programs: a few per SM on CUDA, enough to fill the GPU while each still sums many rows of
    g_weight (fewer partial rows to add up); a handful on the CPU interpreter, which runs them one by one."""
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 4
    return max(1, min(n_rows, target))


def _unit_last_stride(x):
    """x itself when its channels are adjacent in memory (any b, l strides are fine), else a contiguous copy.
    A size-1 last dimension is never strided, whatever its stride says."""
    if x is None or x.shape[-1] == 1 or x.stride(-1) == 1:
        return x
    return x.contiguous()


@torch.library.custom_op("dis_scan::add_rms_norm_fwd", mutates_args=())
@_on_its_device
def _add_rms_norm_fwd(hidden: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor,
                      scale: Optional[torch.Tensor], eps: float, out_dtype: Optional[torch.dtype]
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    hidden, residual = _unit_last_stride(hidden), _unit_last_stride(residual)
    weight = weight.contiguous()
    scale = scale.contiguous() if scale is not None else None
    b, l, d = hidden.shape
    normed = _new_like(hidden, out_dtype if out_dtype is not None else hidden.dtype)
    residual_out = _new_like(hidden, torch.float32)
    if normed.numel() == 0:
        return normed, residual_out
    block_d, num_warps = _norm_launch_params(d)
    res = residual if residual is not None else hidden
    _add_rms_norm_fwd_kernel[(b * l,)](
        hidden, res, weight, scale if scale is not None else weight, normed, residual_out,
        l, d, hidden.stride(0), hidden.stride(1), res.stride(0), res.stride(1), float(eps),
        HAS_RES=residual is not None, HAS_SCALE=scale is not None, BLOCK_D=block_d, num_warps=num_warps)
    return normed, residual_out


@_add_rms_norm_fwd.register_fake
def _add_rms_norm_fwd_fake(hidden, residual, weight, scale, eps, out_dtype):
    return (_new_like(hidden, out_dtype if out_dtype is not None else hidden.dtype),
            _new_like(hidden, torch.float32))


@torch.library.custom_op("dis_scan::add_rms_norm_bwd", mutates_args=())
@_on_its_device
def _add_rms_norm_bwd(g_normed: torch.Tensor, g_residual_out: Optional[torch.Tensor], residual_out: torch.Tensor,
                      weight: torch.Tensor, scale: Optional[torch.Tensor], eps: float, hidden_dtype: torch.dtype,
                      need_g_residual: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # incoming gradients may be expanded with zero strides (e.g. from out.sum()): the b, l strides are passed
    # to the kernel as they are, a non-unit channel stride costs a copy
    g_normed, g_residual_out = _unit_last_stride(g_normed), _unit_last_stride(g_residual_out)
    residual_out, weight = residual_out.contiguous(), weight.contiguous()
    scale = scale.contiguous() if scale is not None else None
    b, l, d = residual_out.shape
    n_rows = b * l
    g_hidden = _new_like(residual_out, hidden_dtype)
    g_residual = _new_like(residual_out, torch.float32) if need_g_residual else residual_out.new_empty(0)
    if n_rows == 0:
        return g_hidden, g_residual, torch.zeros_like(weight, dtype=torch.float32)
    block_d, num_warps = _norm_launch_params(d)
    programs = _norm_bwd_programs(residual_out.device, n_rows)
    rows_per_prog = triton.cdiv(n_rows, programs)
    programs = triton.cdiv(n_rows, rows_per_prog)     # no program left without rows
    partial = torch.empty(programs, d, dtype=torch.float32, device=residual_out.device)
    gres = g_residual_out if g_residual_out is not None else g_normed
    _add_rms_norm_bwd_kernel[(programs,)](
        g_normed, gres, residual_out, weight, scale if scale is not None else weight,
        g_hidden, g_residual if need_g_residual else g_hidden, partial,
        n_rows, l, d, rows_per_prog, g_normed.stride(0), g_normed.stride(1), gres.stride(0), gres.stride(1),
        float(eps),
        HAS_GRES=g_residual_out is not None, HAS_SCALE=scale is not None, WRITE_GRES=need_g_residual,
        BLOCK_D=block_d, num_warps=num_warps)
    return g_hidden, g_residual, partial.sum(0)


@_add_rms_norm_bwd.register_fake
def _add_rms_norm_bwd_fake(g_normed, g_residual_out, residual_out, weight, scale, eps, hidden_dtype,
                           need_g_residual):
    g_residual = _new_like(residual_out, torch.float32) if need_g_residual else residual_out.new_empty(0)
    return (_new_like(residual_out, hidden_dtype), g_residual,
            _new_like(weight, torch.float32))


def _norm_setup_context(ctx, inputs, output):
    hidden, residual, weight, scale, eps, out_dtype = inputs
    # residual_out is the stream the caller keeps anyway; hidden and residual themselves are not needed
    ctx.save_for_backward(output[1], weight, scale)
    ctx.eps, ctx.hidden_dtype, ctx.has_residual = eps, hidden.dtype, residual is not None


def _norm_backward(ctx, g_normed, g_residual_out):
    residual_out, weight, scale = ctx.saved_tensors
    if g_normed is None:   # only when autograd does not materialize unused outputs' gradients as zeros
        g_normed = torch.zeros_like(residual_out)
    need_g_residual = ctx.has_residual and ctx.needs_input_grad[1]
    g_hidden, g_residual, g_weight = torch.ops.dis_scan.add_rms_norm_bwd(
        g_normed, g_residual_out, residual_out, weight, scale, ctx.eps, ctx.hidden_dtype, need_g_residual)
    # scale (drop-path's factor) is a random draw, not a parameter: no gradient
    return g_hidden, g_residual if need_g_residual else None, g_weight, None, None, None


_add_rms_norm_fwd.register_autograd(_norm_backward, setup_context=_norm_setup_context)


def _check_norm(hidden, residual, weight, scale, out_dtype):
    name = "add_rms_norm_triton"
    if not isinstance(hidden, torch.Tensor) or hidden.ndim != 3:
        raise ValueError(f"{name}: hidden must be a (b, l, d) tensor, got "
                         f"{tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__}")
    b, l, d = hidden.shape
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"{name}: weight must be a (d,) tensor, got {type(weight).__name__}")
    if hidden.dtype not in NORM_DTYPES:
        raise TypeError(f"{name}: hidden is {hidden.dtype}; supported: float32, bfloat16, float16")
    if not 1 <= d <= NORM_MAX_D:
        raise ValueError(f"{name}: d = {d} is outside [1, {NORM_MAX_D}] (a whole row is one on-chip tile)")
    expected = {"residual": (residual, (b, l, d)), "weight": (weight, (d,)), "scale": (scale, (b,))}
    for arg, (t, shape) in expected.items():
        if t is None:
            continue
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}: {arg} has shape {tuple(t.shape)}, expected {shape}")
        if t.dtype != torch.float32:   # the stream, RMSNorm's weight and drop-path's factors are float32
            raise TypeError(f"{name}: {arg} is {t.dtype}, expected torch.float32")
        if t.device != hidden.device:
            raise ValueError(f"{name}: {arg} is on {t.device}, hidden on {hidden.device}")
    if out_dtype is not None and out_dtype not in NORM_DTYPES:
        raise TypeError(f"{name}: out_dtype is {out_dtype}; supported: float32, bfloat16, float16")


def add_rms_norm_triton(hidden, residual, weight, eps, scale=None, out_dtype=None):
    """residual_out = residual + scale[:, None, None] * hidden (float32; residual None: the scaled hidden), and
    normed = RMSNorm(residual_out) * weight computed in float32 and stored in out_dtype (default: hidden's
    dtype; pass the autocast dtype under autocast). Returns (normed, residual_out), both new (b, l, d) tensors;
    differentiable in hidden, residual and weight. eps None means nn.RMSNorm's default, float32's epsilon."""
    _check_norm(hidden, residual, weight, scale, out_dtype)
    eps = torch.finfo(torch.float32).eps if eps is None else float(eps)
    return torch.ops.dis_scan.add_rms_norm_fwd(hidden, residual, weight, scale, eps, out_dtype)


#################################################################################
#                      The fused bidirectional mixer                            #
#################################################################################
# mamba_simple.Mamba's mamba_inner_fn, for DiS's two directions: the readable BiMamba.forward with the same
# parameters, computed token-major from start to end. in_proj's output (b, l, 2 d_inner) is never transposed:
# x and z are views of it; the conv and the scan read them through their strides; x_proj's output holds delta's
# low-rank part, B and C side by side, and the scan reads B and C as strided views of it. The backward
# direction needs no flips: an anti-causal conv and a scan that walks the tokens from last to first compute
# exactly flip(direction(flip(x))), and its scan adds its result into the forward direction's output.
# Each kernel is its own autograd-aware op, so the matmuls stay ordinary (autocast puts them in bf16) and
# torch.compile sees the whole block. Under bf16 autocast one rounding differs from the readable path: there
# nn.Conv1d runs in bf16 with bf16 weights, here the conv sums in float32 with the float32 weights.

def bimamba_inner_fn(hidden, in_proj_weight, out_proj_weight, forward_params, backward_params):
    """DiS's bidirectional mixer, DiS.BiMamba.forward's result. hidden: (b, l, d); each *_params is one
    direction's (conv weight (d_inner, 1, d_conv), conv bias, x_proj weight, dt_proj weight, dt_proj bias, A_log, D)."""
    xz = F.linear(hidden, in_proj_weight)                                             # (b, l, 2 d_inner)
    x, z = xz.chunk(2, dim=-1)                                                        # (b, l, d_inner) views
    us = causal_conv1d_bidir_triton(x, *forward_params[:2], *backward_params[:2])     # 2 x (b, l, d_inner), SiLU'd
    y = None
    for params, u, reverse in ((forward_params, us[0], False), (backward_params, us[1], True)):
        _, _, x_proj_weight, dt_proj_weight, dt_proj_bias, A_log, D = params
        dt_rank, n = dt_proj_weight.shape[1], A_log.shape[1]
        x_dbl = F.linear(u, x_proj_weight)                                            # (b, l, dt_rank + 2n)
        delta_low, B, C = x_dbl.split([dt_rank, n, n], dim=-1)   # views; one cat joins their gradients
        # dt_proj runs with the scan, which recomputes the (b, l, d_inner) delta in its backward
        y = selective_scan_triton_tm(u, delta_low, A_log, B, C, D, z, dt_proj_bias, delta_softplus=True,
                                     reverse=reverse, add=y, A_is_log=True,
                                     delta_proj=dt_proj_weight)                            # (b, l, d_inner)
    return F.linear(y, out_proj_weight)                                               # (b, l, d)
