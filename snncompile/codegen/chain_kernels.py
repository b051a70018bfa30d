"""Kernel sources of a fused *chain*: per-channel prologue -> neuron -> pooling, in one pass.

A chain is what :mod:`snncompile.passes.fuse_chains` merges around a multi-step neuron on
``[T, N, C, H, W]``: an optional per-channel affine map of the input (a batchnorm in training or
in inference, a per-channel scale), an optional residual input added before the neuron, the
neuron, and an optional pooling of its spikes (or a residual added to them)::

    x   = PROLOGUE(xin, a_c, b_c) (+ r)         # e.g. xin * a_c + b_c  (batchnorm: a = w/std)
    h, s, v, *w = neuron step(v, *w, x)         # the neuron's own generated step body
    out = POOL(s over K x K windows, stride S, padding PD)  # max = OR, avg = count / K^2
        or s + e                                # 'sum': SEW ResNet's ADD

Everything is data: the prologue is an expression from :data:`PROLOGUES` (rendered by
:func:`~snncompile.codegen.render.render_block`, its backward derived by
:func:`~snncompile.dynamics.expr.grad`), the neuron's forward and backward bodies are the ones
of :mod:`snncompile.codegen.kernels`, and the pooling loops are format strings from
:data:`POOLS`. The C template :data:`_C_CHAIN` wraps them; one work item is a group of ``GP``
consecutive ``(n, c)`` planes (``GP * H * W`` neurons contiguous in memory at each step, their
channels' ``a_c`` / ``b_c`` expanded per neuron once per item), with the time loop inside. The
neuron loop runs over the whole group (so small planes, ResNet's 4x4 ... 1x1, still get long
vectorizable loops); window poolings loop over the group's planes; every sum is per plane in the
same order whatever ``GP`` is, so results do not depend on the grouping (bit for bit).

States: the kernels carry every state of the neuron (``v``, then the extra states ``w`` of its
:class:`~snncompile.dynamics.neuron.NeuronDynamics`, e.g. Izhikevich's adaptation current) as
rows of the same layout as the neuron's own kernels: last values out as ``[S, N * C * H * W]``,
initial values in as one pointer per state (``NULL``: a fresh state, filled in the kernel with
its ``s_fill`` value), the carried gradients of the last states in and those of the initial
states out as ``[S, N * C * H * W]``. The per-state lines are format strings
(:data:`CHAIN_STATE`), so a neuron with only ``v`` gets the same code as before states existed.

Backward: only the input ``xin`` (and ``r``) are kept from the forward; the backward recomputes
``h`` and ``s`` of a plane for all steps into a per-thread buffer (``T * H * W`` floats; also
``v``, ``x`` and the extra states' pre-step values when the neuron's gradient reads them), routes
the pooled gradient (max: added to the first in-bounds position of the window holding its
maximum, outputs in row-major order, as PyTorch's ``max_pool2d`` backward does, so no float
indices are stored; avg: ``g / K^2`` everywhere), runs the neuron's BPTT step over every state,
and writes the gradient of the neuron input ``x``, optionally that of ``xin`` (the prologue's
derivative), and per-plane float64 sums ``sum(gx)``, ``sum(gx * xin)`` and of the parameter
gradients (over the plane in 8 lanes added in lane order, a fixed order on every ISA). Max pooling
with windows that tile the plane routes its gradient with straight-line selects
(:func:`tiled_max_backward`), which vectorize. Each step prefetches the planes its next step reads
(and, in the backward's reverse pass, writes): a work item's planes lie a whole step apart, beyond
the hardware prefetchers' page. The training batchnorm's own statistics and backward are two more
kernels here (:data:`_C_BN`), each one call with no torch ops around it: the statistics (per-plane
float64 ``sum(x)`` and ``sum(x^2)``, per-channel mean, variance, ``invstd``, ``a_c``, ``b_c`` and
the running-statistics update), and the backward (per-channel sums of the chain backward's
per-plane sums, the coefficients, ``gxin = (gy - mean(gy) - (xin - mean) * k) * (w * invstd)``, the
weight / bias / uniforms' gradients); ``{name}_reduce`` gives the per-channel sums when there is no
training batchnorm.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from snncompile.codegen.kernels import (
    _C_HEADER,
    MATH_SOURCE,
    SNN_BLOCK,
    _comment_text,
    backward_body,
    forward_body,
)
from snncompile.codegen.render import C_TARGET, render_block
from snncompile.dynamics.expr import Expr, grad, var
from snncompile.dynamics.neuron import NeuronDynamics

XIN = var("xin")
CA = var("ca_c")
CB = var("cb_c")

#: The per-channel maps a chain applies before the neuron, as expressions of the input ``xin``
#: and the channel's ``ca_c`` / ``cb_c``. ``'affine'`` is a batchnorm (``a = w * invstd``,
#: ``b = bias - mean * a``, PyTorch's own order), ``'scale'`` a per-channel scale.
PROLOGUES: dict[str, Expr] = {
    "none": XIN,
    "affine": XIN * CA + CB,
    "scale": XIN * CA,
}


@dataclass(frozen=True)
class PoolCode:
    """A pooling kind: its forward window loop and its gradient routing (C format strings)."""

    forward: str
    backward: str


_WINDOW = """\
            for (int64_t oh = 0; oh < OH; ++oh)
                for (int64_t ow = 0; ow < OW; ++ow) {{
                    const float *restrict w0 = {src} + (oh * K) * W + ow * K;
{inner}
                }}
"""

_MAX_WINDOW = """\
            for (int64_t oh = 0; oh < OH; ++oh) {{
                const int64_t h0 = oh * S - PD;
                /* PD == 0 (a constant): every window is in bounds, the bounds fold to K */
                const int64_t hs = PD == 0 || h0 >= 0 ? h0 : 0;
                const int64_t he = PD == 0 || h0 + K < H ? h0 + K : H;
                for (int64_t ow = 0; ow < OW; ++ow) {{
                    const int64_t w0 = ow * S - PD;
                    const int64_t ws = PD == 0 || w0 >= 0 ? w0 : 0;
                    const int64_t we = PD == 0 || w0 + K < W ? w0 + K : W;
                    int64_t arg = hs * W + ws;
                    float m = st[arg];
                    for (int64_t ih = hs; ih < he; ++ih)
                        for (int64_t iw = ws; iw < we; ++iw) {{
                            const float e = st[ih * W + iw];
                            if (e > m) {{ m = e; arg = ih * W + iw; }}
                        }}
                    {store}
                }}
            }}
"""

#: Pooling after the neuron (the loops read the step's spikes ``st`` and write the pooled
#: ``ot``; the backward reads ``gt`` and fills ``gsb``). ``K``, ``S`` and ``PD`` (window,
#: stride, padding) are compile-time constants of the kernel; avg pooling has ``S == K``,
#: ``PD == 0``.
POOLS: dict[str, PoolCode] = {
    "none": PoolCode(
        forward="            for (int64_t j = 0; j < HW; ++j) ot[j] = st[j];\n",
        backward="            for (int64_t j = 0; j < HW; ++j) gsb[j] = gt[j];\n",
    ),
    # No pooling, the spikes times a per-channel scale ``eb_c`` (ann2snn's VoltageScale after
    # the neuron): ``out = s * eb_c``, ``gs = g * eb_c`` (PyTorch's products).
    "scale": PoolCode(
        forward="            for (int64_t j = 0; j < HW; ++j) ot[j] = st[j] * ebE[j];\n",
        backward="            for (int64_t j = 0; j < HW; ++j) gsb[j] = gt[j] * ebE[j];\n",
    ),
    # No pooling, the spikes plus a residual ``e`` (SEW ResNet's ADD): ``out = s + e``; the
    # spikes' gradient is the output's (and so is ``e``'s, which the caller passes on).
    "sum": PoolCode(
        forward="            for (int64_t j = 0; j < HW; ++j) ot[j] = st[j] + et[j];\n",
        backward="            for (int64_t j = 0; j < HW; ++j) gsb[j] = gt[j];\n",
    ),
    # PyTorch's max_pool2d: padded positions never win (they are -inf), and the window's
    # maximum is the first in row-major order over its in-bounds part (strict >). The gradient
    # of each output is added to that position, outputs in row-major order (as PyTorch's CPU
    # backward accumulates them), so overlapping windows (K > S) sum the same way.
    "max": PoolCode(
        forward=_MAX_WINDOW.format(
            store="ot[oh * OW + ow] = m;",
        ),
        backward="""\
            for (int64_t j = 0; j < HW; ++j) gsb[j] = 0.0f;
"""
        + _MAX_WINDOW.format(store="gsb[arg] += gt[oh * OW + ow];"),
    ),
    # PyTorch's avg_pool2d (no padding): the float sum in row-major order, then / K^2.
    "avg": PoolCode(
        forward=_WINDOW.format(
            src="st",
            inner="""\
                    float acc = 0.0f;
                    for (int64_t kh = 0; kh < K; ++kh)
                        for (int64_t kw = 0; kw < K; ++kw) acc += w0[kh * W + kw];
                    ot[oh * OW + ow] = acc / (float)(K * K);""",
        ),
        backward="""\
            for (int64_t j = 0; j < HW; ++j) gsb[j] = 0.0f;
"""
        + _WINDOW.format(
            src="st",
            inner="""\
                    const float g = gt[oh * OW + ow] / (float)(K * K);
                    for (int64_t kh = 0; kh < K; ++kh)
                        for (int64_t kw = 0; kw < K; ++kw) gsb[(oh * K) * W + ow * K
                                                               + kh * W + kw] = g;""",
        ),
    ),
}


def tiled_max_backward(k: int) -> str:
    """The max pooling's gradient routing for windows that tile the plane (``stride == k``, no
    padding), as straight-line selects a vectorizer turns into SIMD code (C, inside the
    per-plane loop of :data:`_POOL_BWD_PLANE`).

    The window's ``k * k`` spikes ``e0 ... e{k*k-1}`` in row-major order give the running
    maxima ``m_i = e_i > m_(i-1) ? e_i : m_(i-1)`` (strict ``>``, as the generic loop); ``e_i``
    holds the first maximum when it beat ``m_(i-1)`` and no later element beat its
    predecessor's maximum, so the output gradient ``0 + g`` (the generic loop's add to a zeroed
    slot, the same bits) goes there and ``0`` everywhere else. Rows and columns no window
    covers (floor mode) get 0.
    """
    n = k * k
    ind = " " * 20
    lines = [
        "            for (int64_t oh = 0; oh < OH; ++oh) {",
        "                const int64_t r0 = oh * K * W;",
        "                for (int64_t ow = 0; ow < OW; ++ow) {",
    ]
    pos = [f"r0 + {i // k} * W + ow * K + {i % k}" for i in range(n)]
    lines += [f"{ind}const float e{i} = st[{pos[i]}];" for i in range(n)]
    lines.append(f"{ind}const float m0 = e0;")
    for i in range(1, n - 1):
        lines.append(f"{ind}const float m{i} = e{i} > m{i - 1} ? e{i} : m{i - 1};")
    lines.append(f"{ind}const float c{n - 1} = 0.0f + gt[oh * OW + ow];")
    for i in range(n - 1, 0, -1):
        hit = f"e{i} > m{i - 1}"
        lines.append(f"{ind}gsb[{pos[i]}] = {hit} ? c{i} : 0.0f;")
        lines.append(f"{ind}const float c{i - 1} = {hit} ? 0.0f : c{i};")
    lines.append(f"{ind}gsb[{pos[0]}] = c0;")
    lines += [
        "                }",
        "                for (int64_t r = 0; r < K; ++r)",
        "                    for (int64_t iw = OW * K; iw < W; ++iw) gsb[r0 + r * W + iw] = 0.0f;",
        "            }",
        "            for (int64_t j = OH * K * W; j < HW; ++j) gsb[j] = 0.0f;",
    ]
    return "\n".join(lines) + "\n"


_C_CHAIN_HEADER = """\
#include <stdlib.h>
#include <string.h>
#if defined(__AVX__)
/* 8 float64 / float32 lanes (GCC and Clang vector extensions): the statistics' lane sums */
typedef double snn_v8d __attribute__((vector_size(64)));
typedef float snn_v8f __attribute__((vector_size(32)));
#endif
"""

_C_CHAIN = """\
/* The start of one work item, planes p0 .. p0 + np - 1 of HW neurons: the per-channel
   coefficients expanded per neuron (caE[0:LM], then cbE and ebE, LM apart) and the initial
   value of each of the neuron's {nst} states (v first; rows LM apart in s0): state i's
   s_init[i] ([P * HW]), or s_fill[i] everywhere for a fresh state (s_init[i] NULL). */
static void {name}_group_start(const float *restrict ca, const float *restrict cb,
                               const float *restrict eb, const float *const *s_init,
                               const float *restrict s_fill, int64_t p0, int64_t np,
                               int64_t C, int64_t HW, int64_t LM, float *restrict caE,
                               float *restrict s0)
{{
    float *restrict cbE = caE + LM, *restrict ebE = caE + 2 * LM;
    for (int64_t q = 0; q < np; ++q) {{
        const int64_t c = (p0 + q) % C;
        const float a = ca ? ca[c] : 1.0f, b = cb ? cb[c] : 0.0f, e = eb ? eb[c] : 1.0f;
        for (int64_t j = 0; j < HW; ++j) {{
            caE[q * HW + j] = a; cbE[q * HW + j] = b; ebE[q * HW + j] = e;
        }}
    }}
    const int64_t L = np * HW;
    for (int64_t i = 0; i < {nst}; ++i) {{
        float *restrict d = s0 + i * LM;
        if (s_init[i]) memcpy(d, s_init[i] + p0 * HW, sizeof(float) * L);
        else for (int64_t j = 0; j < L; ++j) d[j] = s_fill[i];
    }}
}}

/* The hardware prefetchers stop at page boundaries, and a work item reads and writes its
   planes one step (P * HW floats) apart: each step asks for the planes its next step reads
   (SNN_PREFETCH: L floats at x, when x is not NULL; one cache line per 64 bytes) and writes
   (SNN_PREFETCH_W: the lines are fetched for writing, so the stores do not wait for them)
   while it computes this one. Macros, as GCC takes a function holding only prefetches for a
   pure one and drops its calls. */
#define SNN_PREFETCH_RW(x, L, RW) \\
    do {{ \\
        const float *snn_pf = (x); \\
        if (snn_pf) \\
            for (int64_t snn_j = 0; snn_j < (L); snn_j += 16) \\
                __builtin_prefetch(snn_pf + snn_j, RW, 3); \\
    }} while (0)
#define SNN_PREFETCH(x, L) SNN_PREFETCH_RW(x, L, 0)
#define SNN_PREFETCH_W(x, L) SNN_PREFETCH_RW(x, L, 1)

/* The inputs of the next step of work item g (or the first step of the next item): the
   offset of their planes in a [T, P, HW] sequence, or -1 after the last item. */
static inline int64_t {name}_next_off(int64_t t, int64_t T, int64_t g, int64_t NG, int64_t P,
                                      int64_t p0, int64_t GP, int64_t HW)
{{
    if (t + 1 < T) return ((t + 1) * P + p0) * HW;
    return g + 1 < NG ? (p0 + GP) * HW : -1;
}}

void {name}_forward(const float *restrict xin_seq, const float *restrict r_seq,
                    const float *restrict e_seq, const float *const *s_init,
                    const float *restrict s_fill, const float *restrict uniforms,
                    const float *restrict ca, const float *restrict cb,
                    const float *restrict eb,
                    float *restrict out_seq, float *restrict s_last,
                    int64_t T, int64_t NB, int64_t C, int64_t H, int64_t W, int64_t GP,
                    int32_t num_threads)
{{
    (void)r_seq; (void)e_seq;
{uniforms}
    const int64_t HW = H * W, P = NB * C, NG = (P + GP - 1) / GP;
    const int64_t K = {k}, S = {s}, PD = {pd};
    const int64_t OH = (H + 2 * PD - K) / S + 1, OW = (W + 2 * PD - K) / S + 1, OHW = OH * OW;
    (void)S; (void)PD; (void)OHW;
#pragma omp parallel num_threads(num_threads) if (num_threads > 1)
    {{
    const int64_t LM = GP * HW;
    float *v_state = (float *)malloc(sizeof(float) * {nst} * LM);
{state_ptrs}    float *stg = (float *)malloc(sizeof(float) * LM);
    float *caE = (float *)malloc(sizeof(float) * 3 * LM);
    float *cbE = caE + LM, *ebE = caE + 2 * LM;
#pragma omp for schedule(static)
    for (int64_t g = 0; g < NG; ++g) {{
        const int64_t p0 = g * GP, np = P - p0 < GP ? P - p0 : GP, L = np * HW;
        {name}_group_start(ca, cb, eb, s_init, s_fill, p0, np, C, HW, LM, caE, v_state);
        for (int64_t t = 0; t < T; ++t) {{
            const int64_t off = (t * P + p0) * HW;
            const float *restrict xt = xin_seq + off;
            const float *restrict rt = r_seq ? r_seq + off : xt;
            (void)rt;
            const int64_t nx = {name}_next_off(t, T, g, NG, P, p0, GP, HW);
            SNN_PREFETCH(nx < 0 ? NULL : xin_seq + nx, L);
            SNN_PREFETCH(nx < 0 || !r_seq ? NULL : r_seq + nx, L);
            for (int64_t j = 0; j < L; ++j) {{
                const float v = v_state[j];
{load_states}                const float xin = xt[j];
                const float ca_c = caE[j], cb_c = cbE[j];
                (void)ca_c; (void)cb_c;
{prologue}
{body}
                stg[j] = s;
                v_state[j] = v_next;
{store_states}            }}
{pool_forward}
        }}
        for (int64_t i = 0; i < {nst}; ++i)
            memcpy(s_last + i * P * HW + p0 * HW, v_state + i * LM, sizeof(float) * L);
    }}
    free(v_state);
    free(stg);
    free(caE);
    }}
}}

void {name}_backward(const float *restrict gout_seq, const float *restrict grad_s_last,
                     const float *restrict xin_seq, const float *restrict r_seq,
                     const float *const *s_init, const float *restrict s_fill,
                     const float *restrict uniforms,
                     const float *restrict ca, const float *restrict cb,
                     const float *restrict eb, float *restrict gx_seq, float *restrict gxin_seq,
                     float *restrict grad_s_init, double *restrict psum,
                     int64_t T, int64_t NB, int64_t C, int64_t H, int64_t W, int64_t GP,
                     int32_t num_threads)
{{
    (void)r_seq;
{uniforms}
    const int64_t HW = H * W, P = NB * C, NS = 2 + {nu}, NG = (P + GP - 1) / GP;
    const int64_t K = {k}, S = {s}, PD = {pd};
    const int64_t OH = (H + 2 * PD - K) / S + 1, OW = (W + 2 * PD - K) / S + 1, OHW = OH * OW;
    (void)S; (void)PD; (void)OHW;
#pragma omp parallel num_threads(num_threads) if (num_threads > 1)
    {{
    const int64_t LM = GP * HW;
    float *hb = (float *)malloc(sizeof(float) * T * LM);
    float *sb = (float *)malloc(sizeof(float) * T * LM);
    float *vb = {need_v} ? (float *)malloc(sizeof(float) * T * LM) : NULL;
    float *xb = {need_x} ? (float *)malloc(sizeof(float) * T * LM) : NULL;
    /* the states while h is recomputed (v_state, then the extra states LM apart), the
       pre-step values of the extra states the backward reads, the carried gradients */
    float *v_state = (float *)malloc(sizeof(float) * {nst} * LM);
{state_ptrs}{saved_decl}    float *carry = (float *)malloc(sizeof(float) * {nst} * LM);
{carry_ptrs}    float *gsg = (float *)malloc(sizeof(float) * LM);
    double *acc = (double *)malloc(sizeof(double) * NS * LM);
    float *caE = (float *)malloc(sizeof(float) * 3 * LM);
    float *cbE = caE + LM, *ebE = caE + 2 * LM;
#pragma omp for schedule(static)
    for (int64_t g = 0; g < NG; ++g) {{
        const int64_t p0 = g * GP, np = P - p0 < GP ? P - p0 : GP, L = np * HW;
        {name}_group_start(ca, cb, eb, s_init, s_fill, p0, np, C, HW, LM, caE, v_state);
        /* recompute h (and s, v, x and the extra states when needed) of these planes */
        for (int64_t t = 0; t < T; ++t) {{
            const int64_t off = (t * P + p0) * HW;
            const float *restrict xt = xin_seq + off;
            const float *restrict rt = r_seq ? r_seq + off : xt;
            (void)rt;
            const int64_t nx = {name}_next_off(t, T, g, NG, P, p0, GP, HW);
            SNN_PREFETCH(nx < 0 ? NULL : xin_seq + nx, L);
            SNN_PREFETCH(nx < 0 || !r_seq ? NULL : r_seq + nx, L);
            /* and this step's output gradient, which the reverse pass below reads */
            SNN_PREFETCH(gout_seq + (t * P + p0) * OHW, np * OHW);
            for (int64_t j = 0; j < L; ++j) {{
                const float v = v_state[j];
{load_states}                const float xin = xt[j];
                const float ca_c = caE[j], cb_c = cbE[j];
                (void)ca_c; (void)cb_c;
{prologue}
{body}
                hb[t * L + j] = h;
                sb[t * L + j] = s;
                if (vb) vb[t * L + j] = v;
                if (xb) xb[t * L + j] = x;
{save_states}                v_state[j] = v_next;
{store_states}            }}
        }}
        for (int64_t i = 0; i < {nst}; ++i)
            for (int64_t j = 0; j < L; ++j)
                carry[i * LM + j] = grad_s_last ? grad_s_last[i * P * HW + p0 * HW + j] : 0.0f;
        for (int64_t j = 0; j < NS * L; ++j) acc[j] = 0.0;
        for (int64_t t = T - 1; t >= 0; --t) {{
            const int64_t off = (t * P + p0) * HW;
            /* the gradient planes this step writes (when it is the first) and the next one */
            if (t == T - 1) {{
                SNN_PREFETCH_W(gx_seq + off, L);
                SNN_PREFETCH_W(gxin_seq ? gxin_seq + off : NULL, L);
            }}
            if (t > 0) {{
                SNN_PREFETCH_W(gx_seq + off - P * HW, L);
                SNN_PREFETCH_W(gxin_seq ? gxin_seq + off - P * HW : NULL, L);
            }}
            /* the next work item's inputs of this step, which its recomputation reads first:
               spread over this pass instead of arriving all at once */
            if (g + 1 < NG) {{
                const int64_t nq = P - p0 - GP < GP ? P - p0 - GP : GP;
                SNN_PREFETCH(xin_seq + off + GP * HW, nq * HW);
                SNN_PREFETCH(r_seq ? r_seq + off + GP * HW : NULL, nq * HW);
                SNN_PREFETCH(gout_seq + (t * P + p0 + GP) * OHW, nq * OHW);
            }}
{pool_backward}
            for (int64_t j = 0; j < L; ++j) {{
                const float h = hb[t * L + j];
                const float gs = gsg[j];
                const float gv = carry[j];
{load_g}                const float ca_c = caE[j], cb_c = cbE[j];
                (void)ca_c; (void)cb_c;
{load_x}{load_v}{load_saved}{bwd_body}
                carry[j] = gv_prev;
{store_g}                const float xin = xin_seq[off + j];
                gx_seq[off + j] = gx;
                if (gxin_seq) {{
{prologue_bwd}
                    gxin_seq[off + j] = gxin;
                }}
                acc[j] += (double)gx;
                acc[L + j] += (double)gx * (double)xin;
{gu_acc}
            }}
        }}
        if (grad_s_init)
            for (int64_t i = 0; i < {nst}; ++i)
                memcpy(grad_s_init + i * P * HW + p0 * HW, carry + i * LM, sizeof(float) * L);
        /* per plane: 8 lane sums (lane l takes j = l mod 8) added in lane order, then the
           rest: a fixed order that vectorizes (one serial chain of HW adds does not) */
        for (int64_t q = 0; q < np; ++q)
            for (int64_t k = 0; k < NS; ++k) {{
                const double *restrict a = acc + k * L + q * HW;
                const int64_t J = HW - HW % 8;
                double lane[8] = {{0.0}};
                for (int64_t j = 0; j < J; j += 8)
                    for (int l = 0; l < 8; ++l) lane[l] += a[j + l];
                double sum = 0.0;
                for (int l = 0; l < 8; ++l) sum += lane[l];
                for (int64_t j = J; j < HW; ++j) sum += a[j];
                psum[(p0 + q) * NS + k] = sum;
            }}
    }}
    free(hb); free(sb); free(vb); free(xb); free(v_state); free(carry); free(gsg); free(acc);
    free(caE);
{saved_free}    }}
}}

"""

#: How a pooling's loops are placed in the group of planes: elementwise ones run once over the
#: group's ``L`` neurons (``HW`` shadowed by ``L``), window ones once per plane ``q``.
_POOL_FWD_GROUP = """\
            {{
                const int64_t HW = L;
                const float *restrict st = stg;
                float *restrict ot = out_seq + off;
                const float *restrict et = e_seq ? e_seq + off : st;
                (void)et;
{code}            }}
"""
_POOL_FWD_PLANE = """\
            for (int64_t q = 0; q < np; ++q) {{
                const float *restrict st = stg + q * HW;
                float *restrict ot = out_seq + (t * P + p0 + q) * OHW;
{code}            }}
"""
_POOL_BWD_GROUP = """\
            {{
                const int64_t HW = L;
                const float *restrict gt = gout_seq + off;
                float *restrict gsb = gsg;
{code}            }}
"""
_POOL_BWD_PLANE = """\
            for (int64_t q = 0; q < np; ++q) {{
                const float *restrict st = sb + t * L + q * HW;
                const float *restrict gt = gout_seq + (t * P + p0 + q) * OHW;
                float *restrict gsb = gsg + q * HW;
{code}            }}
"""


def _indent(code: str, n: int = 4) -> str:
    return "".join(" " * n + line if line.strip() else line for line in code.splitlines(True))


_C_BN = """\
/* Training batchnorm statistics of x [M, C, HW] (planes p = m * C + c), in two parts that
   bn_stats runs in one call and time chunks run chunk by chunk (the same float64 adds in the
   same order, so the same bits):
   bn_partial adds, per channel and over m in order, the per-plane float64 sum(x) and sum(x^2)
   (computed in parallel, 8 lanes per plane) to acc [C][2] (acc[2c] sums, acc[2c + 1] squares).
   bn_finish turns acc over n samples per channel into mean = s / n,
   var = max(q / n - mean^2, 0) (float64), then PyTorch's float32 order:
   invstd = 1 / sqrt((float)var + eps), a = w * invstd, b = bias - mean * a. The running
   statistics (when running_mean is not NULL) are updated as nn.BatchNorm2d does:
   num_batches_tracked += 1, f = momentum (or 1 / num_batches_tracked when momentum < 0),
   running = f * stat + (1 - f) * running in float64 with the unbiased n / (n - 1) variance.
   out: [4][C] float32 rows a, b, mean, invstd. */
void {name}_bn_partial(const float *restrict x, int64_t M, int64_t C, int64_t HW,
                       double *restrict acc, int32_t num_threads)
{{
    const int64_t P = M * C;
    double *sums = (double *)malloc(sizeof(double) * 2 * P);
#pragma omp parallel for num_threads(num_threads) schedule(static) if (num_threads > 1)
    for (int64_t p = 0; p < P; ++p) {{
        const float *restrict xp = x + p * HW;
        /* 8 partial sums (lane k takes j = k mod 8), then added in lane order: a fixed
           order the compiler vectorizes on any vector width, so every CPU gets these bits.
           With AVX the lanes are one vector of GCC / Clang's vector extension (GCC leaves the
           loop below nearly scalar there); the same adds, lane by lane. */
#if defined(__AVX__)
        snn_v8d sl = {{0.0}}, ql = {{0.0}};
        int64_t j = 0;
        for (; j + 8 <= HW; j += 8) {{
            snn_v8f f;
            memcpy(&f, xp + j, sizeof f);
            const snn_v8d e = __builtin_convertvector(f, snn_v8d);
            sl += e;
            ql += e * e;
        }}
#else
        double sl[8] = {{0.0}}, ql[8] = {{0.0}};
        int64_t j = 0;
        for (; j + 8 <= HW; j += 8)
            for (int k = 0; k < 8; ++k) {{
                const double e = (double)xp[j + k];
                sl[k] += e;
                ql[k] += e * e;
            }}
#endif
        double s = 0.0, q = 0.0;
        for (int k = 0; k < 8; ++k) {{
            s += sl[k];
            q += ql[k];
        }}
        for (; j < HW; ++j) {{
            const double e = (double)xp[j];
            s += e;
            q += e * e;
        }}
        sums[2 * p] = s;
        sums[2 * p + 1] = q;
    }}
    for (int64_t c = 0; c < C; ++c) {{
        double s = acc[2 * c], q = acc[2 * c + 1];
        for (int64_t m = 0; m < M; ++m) {{
            s += sums[2 * (m * C + c)];
            q += sums[2 * (m * C + c) + 1];
        }}
        acc[2 * c] = s;
        acc[2 * c + 1] = q;
    }}
    free(sums);
}}

void {name}_bn_finish(const double *restrict acc, double n, int64_t C,
                      const float *restrict weight, const float *restrict bias, double eps,
                      double momentum, float *restrict running_mean,
                      float *restrict running_var, int64_t *restrict num_batches,
                      float *restrict out)
{{
    double f = momentum;
    if (running_mean && num_batches) {{
        *num_batches += 1;
        if (momentum < 0.0) f = 1.0 / (double)(*num_batches);
    }}
    const double unb = n / (n - 1.0 > 1.0 ? n - 1.0 : 1.0);
    for (int64_t c = 0; c < C; ++c) {{
        const double mean = acc[2 * c] / n;
        double var = acc[2 * c + 1] / n - mean * mean;
        if (var < 0.0) var = 0.0;
        const float mean32 = (float)mean;
        const float invstd = 1.0f / sqrtf((float)var + (float)eps);
        const float a = weight ? weight[c] * invstd : invstd;
        const float b = bias ? bias[c] - mean32 * a : -mean32 * a;
        out[c] = a;
        out[C + c] = b;
        out[2 * C + c] = mean32;
        out[3 * C + c] = invstd;
        if (running_mean) {{
            running_mean[c] = (float)((double)running_mean[c] * (1.0 - f) + mean * f);
            running_var[c] = (float)((double)running_var[c] * (1.0 - f) + var * unb * f);
        }}
    }}
}}

void {name}_bn_stats(const float *restrict x, int64_t M, int64_t C, int64_t HW,
                     const float *restrict weight, const float *restrict bias, double eps,
                     double momentum, float *restrict running_mean,
                     float *restrict running_var, int64_t *restrict num_batches,
                     float *restrict out, int32_t num_threads)
{{
    double *acc = (double *)calloc(2 * C, sizeof(double));
    {name}_bn_partial(x, M, C, HW, acc, num_threads);
    {name}_bn_finish(acc, (double)(M * HW), C, weight, bias, eps, momentum, running_mean,
                     running_var, num_batches, out);
    free(acc);
}}

/* Per-channel float64 sums of the backward's per-plane sums psum [NB * C][NS] (over n in
   order): chan[c][k]. Then g_a[c] = sum(gx * xin), g_b[c] = sum(gx) and the uniforms'
   gradients g_u[i] = sum over channels of chan[c][2 + i] (each NULL when not wanted). */
static void {name}_channel_sums(const double *restrict psum, int64_t NB, int64_t C,
                                int64_t NS, double *restrict chan)
{{
    for (int64_t c = 0; c < C; ++c)
        for (int64_t k = 0; k < NS; ++k) {{
            double s = 0.0;
            for (int64_t n = 0; n < NB; ++n) s += psum[(n * C + c) * NS + k];
            chan[c * NS + k] = s;
        }}
}}

static void {name}_uniform_grads(const double *restrict chan, int64_t C, int64_t NS,
                                 float *restrict g_u)
{{
    if (!g_u) return;
    for (int64_t i = 0; i + 2 < NS; ++i) {{
        double s = 0.0;
        for (int64_t c = 0; c < C; ++c) s += chan[c * NS + 2 + i];
        g_u[i] = (float)s;
    }}
}}

void {name}_reduce(const double *restrict psum, int64_t NB, int64_t C, int64_t NS,
                   float *restrict g_a, float *restrict g_b, float *restrict g_u)
{{
    double *chan = (double *)malloc(sizeof(double) * C * NS);
    {name}_channel_sums(psum, NB, C, NS, chan);
    for (int64_t c = 0; c < C; ++c) {{
        if (g_a) g_a[c] = (float)chan[c * NS + 1];
        if (g_b) g_b[c] = (float)chan[c * NS];
    }}
    {name}_uniform_grads(chan, C, NS, g_u);
    free(chan);
}}

/* Training batchnorm backward over [M, C, HW] from the chain backward's per-plane sums
   psum [NB * C][NS] (sum(gy), sum(gy * xin), ...) and the forward's float32 mean / invstd:
   per channel (float64) dot = sum(gy * (x - mean)) = sum(gy * x) - mean * sum(gy),
   k = dot * invstd^2 / n, then float32 (mean, k, sum(gy) / n, w * invstd) for PyTorch's
   gxin = (gy - mean(gy) - (xin - mean) * k) * (w * invstd); g_w = dot * invstd,
   g_bias = sum(gy), g_u the uniforms' gradients (each NULL when not wanted). */
void {name}_bn_backward(const float *restrict gy, const float *restrict xin_seq,
                        const double *restrict psum, const float *restrict mean32,
                        const float *restrict invstd32, const float *restrict weight,
                        float *restrict gx, float *restrict g_w, float *restrict g_bias,
                        float *restrict g_u, int64_t M, int64_t NB, int64_t C, int64_t HW,
                        int64_t NS, int32_t num_threads)
{{
    double *chan = (double *)malloc(sizeof(double) * C * NS);
    float *k = (float *)malloc(sizeof(float) * 4 * C);
    {name}_channel_sums(psum, NB, C, NS, chan);
    {name}_uniform_grads(chan, C, NS, g_u);
    const double n = (double)(M * HW);
    for (int64_t c = 0; c < C; ++c) {{
        const double s_g = chan[c * NS], s_gx = chan[c * NS + 1];
        const double mean = (double)mean32[c], inv = (double)invstd32[c];
        const double dot = s_gx - mean * s_g;
        const double w = weight ? (double)weight[c] : 1.0;
        k[4 * c] = (float)mean;
        k[4 * c + 1] = (float)(dot * inv * inv / n);
        k[4 * c + 2] = (float)(s_g / n);
        k[4 * c + 3] = (float)(w * inv);
        if (g_w) g_w[c] = (float)(dot * inv);
        if (g_bias) g_bias[c] = (float)s_g;
    }}
    const int64_t P = M * C;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (num_threads > 1)
    for (int64_t p = 0; p < P; ++p) {{
        const int64_t c = p % C;
        const float mean_c = k[4 * c], k_c = k[4 * c + 1];
        const float gmean_c = k[4 * c + 2], winv_c = k[4 * c + 3];
        const int64_t off = p * HW;
        for (int64_t j = 0; j < HW; ++j) {{
            const float g = gy[off + j];
            const float xin = xin_seq[off + j];
{bn_bwd}
            gx[off + j] = gxin;
        }}
    }}
    free(chan);
    free(k);
}}
"""

#: The training batchnorm's input gradient (PyTorch's formula and order), per element.
BN_BACKWARD: Expr = (var("g") - var("gmean_c") - (XIN - var("mean_c")) * var("k_c")) * var("winv_c")


@dataclass(frozen=True)
class ChainStateCode:
    """How the chain template carries one extra state of the neuron (C format strings of
    ``{name}``, the state's name, and ``{i}``, its row in the ``[S, P * HW]`` state arrays,
    ``v`` being row 0). ``saved_*`` apply to the states the neuron's backward reads
    (``StepProgram.backward_needs``), which the backward keeps per step while recomputing."""

    state_ptr: str  # its per-thread state row (forward, and the backward's recomputation)
    load_state: str  # its pre-step value in the neuron loop
    store_state: str  # its next value, after the step
    carry_ptr: str  # its per-thread row of carried gradients (backward)
    load_g: str  # the gradient of its next value
    store_g: str  # the gradient of its pre-step value, carried to the step before
    saved_decl: str  # its per-step pre-step values ([T, L] per thread)
    save_state: str
    load_saved: str
    saved_free: str


#: The per-state lines of :data:`_C_CHAIN` (the same table shape as the neuron's own kernels,
#: :class:`~snncompile.codegen.kernels.KernelTemplate`): a single-state neuron gets none.
CHAIN_STATE = ChainStateCode(
    state_ptr="    float *st_{name} = v_state + {i} * LM;\n",
    load_state="                const float {name} = st_{name}[j];\n",
    store_state="                st_{name}[j] = {name}_next;\n",
    carry_ptr="    float *carry_{name} = carry + {i} * LM;\n",
    load_g="                const float g_{name} = carry_{name}[j];\n",
    store_g="                carry_{name}[j] = g_{name}_prev;\n",
    saved_decl="    float *sv_{name} = (float *)malloc(sizeof(float) * T * LM);\n",
    save_state="                sv_{name}[t * L + j] = {name};\n",
    load_saved="                const float {name} = sv_{name}[t * L + j];\n",
    saved_free="    free(sv_{name});\n",
)

#: Names the chain kernels' neuron loops declare or read besides the neuron kernels' own
#: (:data:`~snncompile.dynamics.neuron.RESERVED_NAMES`); a state may not take one (nor the name
#: of another state's row, :func:`chain_name_clash`).
CHAIN_LOCALS = frozenset(
    {
        "xin", "ca_c", "cb_c", "caE", "cbE", "ebE", "stg", "rt", "et", "ot", "gt", "gsb", "gsg",
        "hb", "sb", "vb", "xb", "acc", "psum", "L", "LM", "HW", "P", "NS", "NG", "NB", "C",
        "H", "W", "GP", "K", "S", "PD", "OH", "OW", "OHW", "p0", "np", "g", "q", "k", "gxin",
        "xin_seq", "r_seq", "e_seq", "s_init", "s_fill", "s_last", "out_seq", "grad_s_last",
        "grad_s_init", "gx_seq", "gxin_seq", "ca", "cb", "eb", "v_state", "carry",
    }
)  # fmt: skip
_CHAIN_TEMPS = re.compile(r"^[qzw]\d+$")  # the prologue's and the batchnorm's temporaries


def chain_name_clash(dynamics: NeuronDynamics) -> str | None:
    """The first extra state of ``dynamics`` whose name the chain kernels use for something
    else (a local of their loops, a temporary, another state's row), or None."""
    extra = [s.name for s in dynamics.states]
    rows = {f"{p}_{n}" for n in extra for p in ("st", "carry", "sv", "g")}
    for n in extra:
        if n in CHAIN_LOCALS or n in rows or _CHAIN_TEMPS.match(n):
            return n
    return None


@dataclass(frozen=True)
class ChainSource:
    """Generated C source of one chain configuration."""

    name: str
    source: str
    num_uniforms: int
    prologue: str
    pool: str
    state_names: tuple[str, ...] = ("v",)  # the neuron's states, rows of the state arrays

    @property
    def num_states(self) -> int:
        """How many states (``v`` and the extra ones) the kernels carry per neuron."""
        return len(self.state_names)


def generate_chain(
    dynamics: NeuronDynamics,
    prologue: str,
    pool: str,
    residual: bool,
    window: tuple[int, int, int] = (1, 1, 0),
) -> ChainSource:
    """The C source of the chain ``prologue -> (+ r) -> dynamics -> pool``.

    ``prologue`` is a key of :data:`PROLOGUES`, ``pool`` one of :data:`POOLS`; with
    ``residual`` the residual input ``r`` is added to the prologue's output before the charge.
    ``window`` is the pooling's ``(kernel, stride, padding)`` (square), built into the source.
    """
    k, stride, pad = window
    if pool in ("none", "sum", "scale") and window != (1, 1, 0):
        raise ValueError(f"generate_chain: no pooling takes window (1, 1, 0), not {window}")
    if pool == "avg" and (stride != k or pad != 0):
        raise ValueError(
            f"generate_chain: avg pooling needs stride == kernel and no padding, not {window}"
        )
    if k < 1 or stride < 1 or not 0 <= pad <= k // 2:
        raise ValueError(f"generate_chain: bad pooling window (kernel, stride, pad) {window}")
    if prologue not in PROLOGUES:
        raise ValueError(
            f"generate_chain: unknown prologue {prologue!r}; known: {sorted(PROLOGUES)}"
        )
    if pool not in POOLS:
        raise ValueError(f"generate_chain: unknown pool {pool!r}; known: {sorted(POOLS)}")
    program = dynamics.step_program()
    pro = PROLOGUES[prologue]
    x_expr = pro + var("r") if residual else pro
    ind = " " * 16
    pro_fwd = render_block(C_TARGET, {"x": x_expr}, names={"r": "rt[j]"}, prefix="q", indent=ind)
    g_pro = grad({x_expr: var("gx")}, [XIN])[XIN]
    pro_bwd = render_block(C_TARGET, {"gxin": g_pro}, prefix="z", indent=ind + "    ")
    nu = program.num_uniforms
    uniforms = "\n".join(f"    const float u{i} = uniforms[{i}];" for i in range(nu))
    need_x = "x" in program.backward_needs
    need_v = "v" in program.backward_needs
    load_x = f"{ind}const float x = xb[t * L + j];\n" if need_x else ""
    load_v = f"{ind}const float v = vb[t * L + j];\n" if need_v else ""
    gu_acc = "\n".join(f"{ind}acc[{2 + i} * L + j] += (double)gu{i};" for i in range(nu))
    clash = chain_name_clash(dynamics)
    if clash is not None:
        raise ValueError(
            f"generate_chain: the state {clash!r} of {dynamics.name} has a name the chain "
            "kernels use for one of their own variables"
        )
    extra = list(enumerate(program.extra_states, start=1))
    read = set(program.backward_needs)

    def per_state(fmt: str, saved_only: bool = False) -> str:
        return "".join(fmt.format(name=n, i=i) for i, n in extra if not saved_only or n in read)

    tag = f"{prologue}_{pool}{'_res' if residual else ''}"
    if pool in ("max", "avg"):
        tag += f"_k{k}s{stride}p{pad}"
    name = f"snnc_{dynamics.name}_{tag}_{dynamics.key()}"
    body = forward_body(program, C_TARGET)
    if pool in ("max", "avg"):
        pool_fwd = _POOL_FWD_PLANE.format(code=_indent(POOLS[pool].forward))
        code = POOLS[pool].backward
        if pool == "max" and stride == k and pad == 0:  # windows tile the plane: SIMD routing
            code = tiled_max_backward(k)
        pool_bwd = _POOL_BWD_PLANE.format(code=_indent(code))
    else:
        pool_fwd = _POOL_FWD_GROUP.format(code=_indent(POOLS[pool].forward))
        pool_bwd = _POOL_BWD_GROUP.format(code=_indent(POOLS[pool].backward))
    bn_bwd = render_block(
        C_TARGET, {"gxin": BN_BACKWARD}, names={"g": "g"}, prefix="w", indent=" " * 12
    )
    source = "\n".join(
        [
            _C_HEADER.format(
                desc=_comment_text(dynamics.describe()) + f" chain {tag}",
                block=SNN_BLOCK,
                math=MATH_SOURCE,
            ),
            _C_CHAIN_HEADER,
            _C_CHAIN.format(
                name=name,
                k=k,
                s=stride,
                pd=pad,
                uniforms=uniforms,
                prologue=pro_fwd,
                body=body,
                pool_forward=pool_fwd,
                pool_backward=pool_bwd,
                nu=nu,
                need_x=int(need_x),
                need_v=int(need_v),
                load_x=load_x,
                load_v=load_v,
                bwd_body=backward_body(program, C_TARGET),
                prologue_bwd=pro_bwd,
                gu_acc=gu_acc,
                nst=program.num_states,
                state_ptrs=per_state(CHAIN_STATE.state_ptr),
                load_states=per_state(CHAIN_STATE.load_state),
                store_states=per_state(CHAIN_STATE.store_state),
                carry_ptrs=per_state(CHAIN_STATE.carry_ptr),
                load_g=per_state(CHAIN_STATE.load_g),
                store_g=per_state(CHAIN_STATE.store_g),
                saved_decl=per_state(CHAIN_STATE.saved_decl, saved_only=True),
                save_states=per_state(CHAIN_STATE.save_state, saved_only=True),
                load_saved=per_state(CHAIN_STATE.load_saved, saved_only=True),
                saved_free=per_state(CHAIN_STATE.saved_free, saved_only=True),
            ),
            _C_BN.format(name=name, bn_bwd=bn_bwd),
        ]
    )
    return ChainSource(
        name=name, source=source, num_uniforms=nu, prologue=prologue, pool=pool,
        state_names=program.state_names,
    )  # fmt: skip
