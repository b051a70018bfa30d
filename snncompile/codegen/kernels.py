"""Kernel sources for a neuron's :class:`~snncompile.dynamics.neuron.StepProgram`.

The per-neuron step bodies (forward: ``x, v -> h, s, v_next``; backward: ``h, gs, gv (, x, v) ->
gx, gv_prev, gu*``) are rendered once per target by :func:`~snncompile.codegen.render.
render_block`. A :class:`KernelTemplate` wraps them in a target's loop structure; the two templates
below are data (format strings), not branches:

* CPU (C): ``#pragma omp parallel for`` over blocks of ``SNN_BLOCK`` contiguous neurons; inside a
  block the time loop runs outside and the neuron loop inside, so per-neuron state stays in a small
  local array, loads/stores are unit-stride and the inner loop vectorizes.
* CUDA: one thread per neuron (``extern "C" __global__``), the time loop inside, coalesced
  accesses across the threads of a warp.

Memory layout everywhere: sequences are contiguous ``[T, N]`` float32; states are ``[S, N]``
float32 (``v`` first, then the extra states; ``[N]`` for single-state neurons: the same memory),
and so are ``v_last``, ``grad_v_last`` and ``grad_v_init``; the array saved for backward
(``h_seq``) is ``[1 + K, T, N]``: ``h``, then the pre-step values of the ``K`` extra states the
backward reads (``StepProgram.saved_states``; ``[T, N]`` when ``K = 0``). The templates loop over
the extra states through per-state format strings, so single-state kernels are the same code as
before states existed. ``uniforms`` is a float32 array of the per-call scalars (``u0, u1,
...``); ``grad_uniforms`` is ``[U, N]`` (per-neuron partial sums over time; the caller reduces
over neurons).
"""

from __future__ import annotations

from dataclasses import dataclass

from snncompile.codegen.render import C_TARGET, CUDA_TARGET, Target, render_block, used_names
from snncompile.dynamics.neuron import NeuronDynamics, StepProgram

# Neurons per OpenMP work item: 4 KiB rows keep the strided [T, N] accesses streaming (hardware
# prefetchers work within pages) while the state array stays in L1. 64 was 2-3x slower at T=64,
# N=65,536; 1024 was best or near-best for both issue shapes (benchmarks/bench_neuron_kernels.py).
SNN_BLOCK = 1024


@dataclass(frozen=True)
class KernelSource:
    """Generated source of one neuron configuration for one target."""

    target: str
    name: str  # symbol prefix: ``{name}_forward`` / ``{name}_backward``
    source: str
    forward_body: str
    backward_body: str
    num_uniforms: int
    backward_needs: tuple[str, ...]
    num_states: int = 1  # rows of the [S, N] state arrays (v first)
    num_saved: int = 1  # rows of the [1 + K, T, N] array saved for backward (h first)


@dataclass(frozen=True)
class KernelTemplate:
    """A target's loop structure around the per-neuron bodies (format strings)."""

    target: Target
    header: str
    forward: str
    backward: str
    uniform_decl: str
    gu_decl: str
    gu_acc: str
    gu_store: str
    load_x_bwd: str
    load_v_bwd: str
    # Per extra state ({name}; {i}: its row in the [S, N] state arrays; {k}: its row in the
    # [1 + K, T, N] saved array, h being row 0). Empty for single-state neurons.
    state_decl: str = ""
    state_init: str = ""
    saved_ptr: str = ""
    load_state: str = ""
    save_state: str = ""
    store_state: str = ""
    state_last: str = ""
    carry_decl: str = ""
    carry_init: str = ""
    load_g: str = ""
    load_saved: str = ""
    prev_saved: str = ""
    store_g: str = ""
    carry_store: str = ""


# Own transcendental functions (see the comment inside): shared by the C and CUDA headers, which
# define SNN_FN and the float <-> int bit casts snn_f2i / snn_i2f.
MATH_SOURCE = r"""
/* Transcendental functions from correctly rounded IEEE operations only (+ - * /, comparisons,
   selects, integer bit operations): the same bits in a SIMD loop body, its scalar remainder,
   for any -march and on the GPU. Range reduction + polynomial, within ~2 ulp of the exact value;
   coefficients are least-squares fits in double precision rounded to float. */
SNN_FN float snn_expf(float x)
{
    /* exp(x) = 2^k exp(r), k = round(x / ln 2), r = x - k ln 2 (k * LN2_HI is exact) */
    float xc = x > 88.8f ? 88.8f : x;
    xc = xc < -104.0f ? -104.0f : xc;
    /* adding 1.5 * 2^23 rounds to an integer, which then sits in the low mantissa bits */
    const float big = xc * 1.44269504f + 12582912.0f;
    const float kf = big - 12582912.0f;
    const float r = (xc - kf * 0.693145752f) - kf * 1.42860677e-6f;
    const float q = 0.5f + r * (0.166665763f + r * (0.0416664667f + r * (0.00836317521f
                    + r * 0.00139336439f)));
    const float p = 1.0f + (r + (r * r) * q);
    const int k = snn_f2i(big) - 0x4b400000; /* (garbage for NaN, whose p is NaN anyway) */
    const int k1 = k >> 1;
    /* two power-of-two factors keep both normal; the last product rounds once (subnormals) */
    const float s1 = snn_i2f((int)((unsigned)(k1 + 127) << 23));
    const float s2 = snn_i2f((int)((unsigned)(k - k1 + 127) << 23));
    return (p * s1) * s2;
}

SNN_FN float snn_logf(float x)
{
    /* x = 2^e m, m in [sqrt(1/2), sqrt(2)); log(m) = 2 atanh(s), s = (m - 1) / (m + 1) */
    const int tiny = x < 1.17549435e-38f;
    const float xs = tiny ? x * 8388608.0f : x;
    const int t = snn_f2i(xs) - 0x3f3504f3;
    const float ef = (float)((t >> 23) - (tiny ? 23 : 0));
    const float m = snn_i2f((t & 0x007fffff) + 0x3f3504f3);
    const float f = m - 1.0f;
    const float s = f / (2.0f + f);
    const float z = s * s;
    const float rz = z * (0.666666667f + z * (0.4f + z * (0.285714286f + z * (0.222222222f
                     + z * 0.181818182f))));
    float y = ef * 0.693145752f + ((s + s) + (s * rz + ef * 1.42860677e-6f));
    y = (x == 0.0f) ? -(1.0f / 0.0f) : y;
    y = (x < 0.0f) ? (0.0f / 0.0f) : y;
    y = (x == (1.0f / 0.0f)) ? x : y;
    return (x == x) ? y : x;
}

SNN_FN float snn_tanhf(float x)
{
    const float a = fabsf(x);
    const float z = a * a;
    const float small = a + (a * z) * (-0.333333343f + z * (0.133333251f + z * (-0.0539647453f
                        + z * (0.021818867f + z * (-0.00852790754f + z * 0.00252847001f)))));
    const float big = 1.0f - 2.0f / (snn_expf(a + a) + 1.0f);
    return copysignf(a < 0.55f ? small : big, x);
}

SNN_FN float snn_atanf(float x)
{
    /* |x| > 1: pi/2 - atan(1/|x|); t > tan(pi/8): pi/4 + atan((t - 1) / (t + 1)) */
    const float a = fabsf(x);
    const int inv = a > 1.0f;
    const float t = inv ? 1.0f / a : a;
    const int mid = t > 0.414213562f;
    const float u = mid ? (t - 1.0f) / (t + 1.0f) : t;
    const float z = u * u;
    float p = u + (u * z) * (-0.333333343f + z * (0.199999779f + z * (-0.142841756f
              + z * (0.11071752f + z * (-0.0862724856f + z * 0.0505412258f)))));
    p = mid ? 0.785398163f + p : p;
    p = inv ? 1.57079633f - p : p;
    return copysignf(p, x);
}

SNN_FN float snn_erfc_tail(float a)
{
    /* erfc(a) for a >= 0.84375: exp(-a^2) R(a); a^2 split in an exact head and a tail */
    const float ac = a > 10.1f ? 10.1f : a;
    const float d = ac - 1.671875f;
    const float lo = 0.295556039f + d * (-0.140113622f + d * (0.0613036044f + d * (-0.0250811018f
                     + d * (0.00968545116f + d * (-0.00355524942f + d * (0.00124791707f
                     + d * (-0.000420010474f + d * (0.000134309914f + d * (-4.24472491e-05f
                     + d * (1.54401350e-05f + d * -4.36318442e-06f))))))))));
    const float t = 1.0f / ac;
    const float hi = t * (0.564189434f + t * (8.31680791e-06f + t * (-0.28233555f
                     + t * (0.00400390942f + t * (0.38062799f + t * (0.301410615f
                     + t * (-2.49408317f + t * (4.41953421f + t * (-3.76288033f
                     + t * 1.33851123f)))))))));
    const float ah = snn_i2f(snn_f2i(ac) & ~0xfff);
    const float e = snn_expf(-(ah * ah)) * snn_expf((ah - ac) * (ah + ac));
    return e * (ac < 2.5f ? lo : hi);
}

SNN_FN float snn_erf_small(float x)
{
    /* erf(x) for |x| < 0.84375: x P(x^2) */
    const float z = x * x;
    return x * (1.12837923f + z * (-0.376126379f + z * (0.112837523f + z * (-0.0268627927f
                + z * (0.00521018589f + z * (-0.000825593481f + z * 8.89343064e-05f))))));
}

SNN_FN float snn_erff(float x)
{
    const float a = fabsf(x);
    const float big = copysignf(1.0f - snn_erfc_tail(a), x);
    return a < 0.84375f ? snn_erf_small(x) : big;
}

SNN_FN float snn_erfcf(float x)
{
    const float a = fabsf(x);
    const float tail = snn_erfc_tail(a);
    const float big = x > 0.0f ? tail : 2.0f - tail;
    return a < 0.84375f ? 1.0f - snn_erf_small(x) : big;
}
"""

_C_HEADER = """\
/* Generated by snncompile.codegen for neuron {desc} */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#define SNN_BLOCK {block}
#ifndef SNN_MATH_DEFINED
#define SNN_MATH_DEFINED
#define SNN_FN static inline
typedef union {{ float f; int i; }} snn_bits_t;
static inline int snn_f2i(float f) {{ snn_bits_t b; b.f = f; return b.i; }}
static inline float snn_i2f(int i) {{ snn_bits_t b; b.i = i; return b.f; }}
{math}
#endif
"""

_C_FORWARD = """\
void {name}_forward(const float *restrict x_seq, const float *restrict v_init,
                    const float *restrict uniforms, float *restrict spike_seq,
                    float *restrict h_seq, float *restrict v_seq, float *restrict v_last,
                    int64_t T, int64_t N, int32_t num_threads)
{{
{uniforms}
    const int64_t n_blocks = (N + SNN_BLOCK - 1) / SNN_BLOCK;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (num_threads > 1)
    for (int64_t b = 0; b < n_blocks; ++b) {{
        const int64_t n0 = b * SNN_BLOCK;
        const int64_t nb = (N - n0 < SNN_BLOCK) ? (N - n0) : SNN_BLOCK;
        float v_state[SNN_BLOCK];
{state_decl}        for (int64_t j = 0; j < nb; ++j) v_state[j] = v_init[n0 + j];
{state_init}        for (int64_t t = 0; t < T; ++t) {{
            const int64_t off = t * N + n0;
            const float *restrict xt = x_seq + off;
            float *restrict st = spike_seq + off;
            if (h_seq) {{
                float *restrict ht = h_seq + off;
{saved_ptrs}                for (int64_t j = 0; j < nb; ++j) {{
                    const float v = v_state[j];
                    const float x = xt[j];
{load_states}{body}
                    st[j] = s;
                    ht[j] = h;
{save_states}                    v_state[j] = v_next;
{store_states}                }}
            }} else {{
                for (int64_t j = 0; j < nb; ++j) {{
                    const float v = v_state[j];
                    const float x = xt[j];
{load_states}{body}
                    st[j] = s;
                    v_state[j] = v_next;
{store_states}                }}
            }}
            if (v_seq) for (int64_t j = 0; j < nb; ++j) v_seq[off + j] = v_state[j];
        }}
        for (int64_t j = 0; j < nb; ++j) v_last[n0 + j] = v_state[j];
{state_last}    }}
}}
"""

_C_BACKWARD = """\
void {name}_backward(const float *restrict grad_spike_seq, const float *restrict grad_v_seq,
                     const float *restrict grad_v_last, const float *restrict h_seq,
                     const float *restrict x_seq, const float *restrict v_init,
                     const float *restrict uniforms, float *restrict grad_x_seq,
                     float *restrict grad_v_init, float *restrict grad_uniforms,
                     int64_t T, int64_t N, int32_t num_threads)
{{
    (void)x_seq; (void)v_init; (void)grad_uniforms;
{uniforms}
    const int64_t n_blocks = (N + SNN_BLOCK - 1) / SNN_BLOCK;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (num_threads > 1)
    for (int64_t b = 0; b < n_blocks; ++b) {{
        const int64_t n0 = b * SNN_BLOCK;
        const int64_t nb = (N - n0 < SNN_BLOCK) ? (N - n0) : SNN_BLOCK;
        float carry[SNN_BLOCK];
{carry_decl}{gu_decl}
        for (int64_t j = 0; j < nb; ++j) carry[j] = grad_v_last ? grad_v_last[n0 + j] : 0.0f;
{carry_init}        for (int64_t t = T - 1; t >= 0; --t) {{
            const int64_t off = t * N + n0;
            if (grad_v_seq) for (int64_t j = 0; j < nb; ++j) carry[j] += grad_v_seq[off + j];
            for (int64_t j = 0; j < nb; ++j) {{
                const float h = h_seq[off + j];
                const float gs = grad_spike_seq[off + j];
                const float gv = carry[j];
{load_g}{load_x}{load_saved}{load_v}{body}
                grad_x_seq[off + j] = gx;
                carry[j] = gv_prev;
{store_g}{gu_acc}
            }}
        }}
        for (int64_t j = 0; j < nb; ++j) grad_v_init[n0 + j] = carry[j];
{carry_store}{gu_store}
    }}
}}
"""

C_TEMPLATE = KernelTemplate(
    target=C_TARGET,
    header=_C_HEADER,
    forward=_C_FORWARD,
    backward=_C_BACKWARD,
    uniform_decl="    const float u{i} = uniforms[{i}];",
    gu_decl="        float gu_acc{i}[SNN_BLOCK];\n"
    "        for (int64_t j = 0; j < nb; ++j) gu_acc{i}[j] = 0.0f;",
    gu_acc="                gu_acc{i}[j] += gu{i};",
    gu_store="        for (int64_t j = 0; j < nb; ++j)\n"
    "            grad_uniforms[{i} * N + n0 + j] = gu_acc{i}[j];",
    load_x_bwd="                const float x = x_seq[off + j];\n",
    load_v_bwd="                float v;\n"
    "                if (t > 0) {{\n"
    "                    const float h_prev = h_seq[off - N + j];\n"
    "{recompute}\n"
    "                    v = v_rec;\n"
    "                }} else {{\n"
    "                    v = v_init[n0 + j];\n"
    "                }}\n",
    state_decl="        float st_{name}[SNN_BLOCK];\n",
    state_init="        for (int64_t j = 0; j < nb; ++j)\n"
    "            st_{name}[j] = v_init[{i} * N + n0 + j];\n",
    saved_ptr="                float *restrict sv_{name} = h_seq + {k} * T * N + off;\n",
    load_state="                    const float {name} = st_{name}[j];\n",
    save_state="                    sv_{name}[j] = {name};\n",
    store_state="                    st_{name}[j] = {name}_next;\n",
    state_last="        for (int64_t j = 0; j < nb; ++j)\n"
    "            v_last[{i} * N + n0 + j] = st_{name}[j];\n",
    carry_decl="        float carry_{name}[SNN_BLOCK];\n",
    carry_init="        for (int64_t j = 0; j < nb; ++j)\n"
    "            carry_{name}[j] = grad_v_last ? grad_v_last[{i} * N + n0 + j] : 0.0f;\n",
    load_g="                const float g_{name} = carry_{name}[j];\n",
    load_saved="                const float {name} = h_seq[{k} * T * N + off + j];\n",
    prev_saved="                    const float {name}_prev = h_seq[{k} * T * N + off - N + j];\n",
    store_g="                carry_{name}[j] = g_{name}_prev;\n",
    carry_store="        for (int64_t j = 0; j < nb; ++j)\n"
    "            grad_v_init[{i} * N + n0 + j] = carry_{name}[j];\n",
)

_CUDA_HEADER = """\
/* Generated by snncompile.codegen for neuron {desc} (compile with --fmad=false) */
#ifndef SNN_MATH_DEFINED
#define SNN_MATH_DEFINED
#define SNN_FN static __device__ __forceinline__
#define snn_f2i __float_as_int
#define snn_i2f __int_as_float
{math}
#endif
"""

_CUDA_FORWARD = """\
extern "C" __global__ void {name}_forward(
    const float *__restrict__ x_seq, const float *__restrict__ v_init,
    const float *__restrict__ uniforms, float *__restrict__ spike_seq,
    float *__restrict__ h_seq, float *__restrict__ v_seq, float *__restrict__ v_last,
    const long long T, const long long N)
{{
    const long long n = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N) return;
{uniforms}
    float v_state = v_init[n];
{state_init}    for (long long t = 0; t < T; ++t) {{
        const long long off = t * N + n;
        {{
                    const float v = v_state;
                    const float x = x_seq[off];
{load_states}{body}
                    spike_seq[off] = s;
                    if (h_seq) h_seq[off] = h;
{save_states}                    v_state = v_next;
{store_states}        }}
        if (v_seq) v_seq[off] = v_state;
    }}
    v_last[n] = v_state;
{state_last}}}
"""

_CUDA_BACKWARD = """\
extern "C" __global__ void {name}_backward(
    const float *__restrict__ grad_spike_seq, const float *__restrict__ grad_v_seq,
    const float *__restrict__ grad_v_last, const float *__restrict__ h_seq,
    const float *__restrict__ x_seq, const float *__restrict__ v_init,
    const float *__restrict__ uniforms, float *__restrict__ grad_x_seq,
    float *__restrict__ grad_v_init, float *__restrict__ grad_uniforms,
    const long long T, const long long N)
{{
    const long long n = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N) return;
{uniforms}
    float carry = grad_v_last ? grad_v_last[n] : 0.0f;
{carry_init}{gu_decl}
    for (long long t = T - 1; t >= 0; --t) {{
        const long long off = t * N + n;
        const long long j = 0;
        (void)j;
        if (grad_v_seq) carry += grad_v_seq[off];
        {{
                const float h = h_seq[off];
                const float gs = grad_spike_seq[off];
                const float gv = carry;
{load_g}{load_x}{load_saved}{load_v}{body}
                grad_x_seq[off] = gx;
                carry = gv_prev;
{store_g}{gu_acc}
        }}
    }}
    grad_v_init[n] = carry;
{carry_store}{gu_store}
}}
"""

CUDA_TEMPLATE = KernelTemplate(
    target=CUDA_TARGET,
    header=_CUDA_HEADER,
    forward=_CUDA_FORWARD,
    backward=_CUDA_BACKWARD,
    uniform_decl="    const float u{i} = uniforms[{i}];",
    gu_decl="    float gu_acc{i} = 0.0f;",
    gu_acc="                gu_acc{i} += gu{i};",
    gu_store="    grad_uniforms[{i} * N + n] = gu_acc{i};",
    load_x_bwd="                const float x = x_seq[off];\n",
    load_v_bwd="                float v;\n"
    "                if (t > 0) {{\n"
    "                    const float h_prev = h_seq[off - N];\n"
    "{recompute}\n"
    "                    v = v_rec;\n"
    "                }} else {{\n"
    "                    v = v_init[n];\n"
    "                }}\n",
    state_init="    float st_{name} = v_init[{i} * N + n];\n",
    load_state="                    const float {name} = st_{name};\n",
    save_state="                    if (h_seq) h_seq[{k} * T * N + off] = {name};\n",
    store_state="                    st_{name} = {name}_next;\n",
    state_last="    v_last[{i} * N + n] = st_{name};\n",
    carry_init="    float carry_{name} = grad_v_last ? grad_v_last[{i} * N + n] : 0.0f;\n",
    load_g="                const float g_{name} = carry_{name};\n",
    load_saved="                const float {name} = h_seq[{k} * T * N + off];\n",
    prev_saved="                    const float {name}_prev = h_seq[{k} * T * N + off - N];\n",
    store_g="                carry_{name} = g_{name}_prev;\n",
    carry_store="    grad_v_init[{i} * N + n] = carry_{name};\n",
)

TEMPLATES: dict[str, KernelTemplate] = {"c": C_TEMPLATE, "cuda": CUDA_TEMPLATE}

_BODY_INDENT = " " * 20
_BWD_INDENT = " " * 16


def forward_body(program: StepProgram, target: Target) -> str:
    """The per-neuron forward step.

    Reads ``v``, ``x``, the extra states and ``u*``; declares ``h``, ``s``, ``v_next`` and
    ``<state>_next`` for each extra state.
    """
    charge = render_block(target, {"h": program.h}, prefix="c", indent=_BODY_INDENT)
    outputs = {"s": program.spike, "v_next": program.v_next}
    outputs.update(
        {f"{n}_next": e for n, e in zip(program.extra_states, program.state_next, strict=True)}
    )
    fire = render_block(target, outputs, prefix="f", indent=_BODY_INDENT)
    return charge + "\n" + fire


def backward_body(program: StepProgram, target: Target) -> str:
    """The per-neuron backward step: reads ``h``, ``gs``, ``gv``, ``g_<state>`` (and ``x``,
    ``v``, saved states if needed); declares ``gx``, ``gv_prev``, ``g_<state>_prev`` and
    ``gu0, gu1, ...``."""
    outputs = {"gx": program.grad_x, "gv_prev": program.grad_v}
    outputs.update(
        {f"g_{n}_prev": g for n, g in zip(program.extra_states, program.grad_states, strict=True)}
    )
    outputs.update({f"gu{i}": g for i, g in enumerate(program.grad_uniforms)})
    return render_block(target, outputs, prefix="b", indent=_BWD_INDENT)


def saved_shape(source: KernelSource, T: int, N: int) -> tuple[int, ...]:
    """Shape of the array a kernel saves for backward: ``[T, N]`` (``h``) or ``[1 + K, T, N]``."""
    return (T, N) if source.num_saved == 1 else (source.num_saved, T, N)


def _comment_text(text: str) -> str:
    """``text`` made safe inside a ``/* ... */`` comment (one line, no comment terminator)."""
    return " ".join(text.split()).replace("*/", "* /")


def generate(dynamics: NeuronDynamics, target: str = "c") -> KernelSource:
    """Generate the forward and backward kernel source of ``dynamics`` for ``target``."""
    template = TEMPLATES[target]
    program = dynamics.step_program()
    name = f"snn_{dynamics.name}_{dynamics.key()}"
    fwd_body = forward_body(program, template.target)
    bwd_body = backward_body(program, template.target)
    nu = program.num_uniforms
    uniforms = "\n".join(template.uniform_decl.format(i=i) for i in range(nu))
    gu_decl, gu_acc, gu_store = (
        "\n".join(t.format(i=i) for i in range(nu))
        for t in (template.gu_decl, template.gu_acc, template.gu_store)
    )
    load_x = template.load_x_bwd if "x" in program.backward_needs else ""
    extra = [(i, n) for i, n in enumerate(program.extra_states, start=1)]
    saved = {n: k for k, n in enumerate(program.saved_states, start=1)}

    def per_state(fmt: str, only: dict[str, int] | None = None) -> str:
        return "".join(
            fmt.format(name=n, i=i, k=saved.get(n, 0))
            for i, n in extra
            if only is None or n in only
        )

    direct = {n: saved[n] for n in program.backward_needs if n in saved}
    load_v = ""
    if "v" in program.backward_needs:
        recompute = render_block(
            template.target,
            {"v_rec": program.v_from_h_prev},
            prefix="r",
            indent=" " * 20,
        )
        used = {n: saved[n] for n in saved if f"{n}_prev" in used_names([program.v_from_h_prev])}
        recompute = per_state(template.prev_saved, used) + recompute
        load_v = template.load_v_bwd.format(recompute=recompute)
    source = "\n".join(
        [
            template.header.format(
                desc=_comment_text(dynamics.describe()), block=SNN_BLOCK, math=MATH_SOURCE
            ),
            template.forward.format(
                name=name,
                uniforms=uniforms,
                body=fwd_body,
                state_decl=per_state(template.state_decl),
                state_init=per_state(template.state_init),
                saved_ptrs=per_state(template.saved_ptr, saved),
                load_states=per_state(template.load_state),
                save_states=per_state(template.save_state, saved),
                store_states=per_state(template.store_state),
                state_last=per_state(template.state_last),
            ),
            template.backward.format(
                name=name,
                uniforms=uniforms,
                body=bwd_body,
                gu_decl=gu_decl,
                gu_acc=gu_acc,
                gu_store=gu_store,
                load_x=load_x,
                load_v=load_v,
                carry_decl=per_state(template.carry_decl),
                carry_init=per_state(template.carry_init),
                load_g=per_state(template.load_g),
                load_saved=per_state(template.load_saved, direct),
                store_g=per_state(template.store_g),
                carry_store=per_state(template.carry_store),
            ),
        ]
    )
    return KernelSource(
        target=target,
        name=name,
        source=source,
        forward_body=fwd_body,
        backward_body=bwd_body,
        num_uniforms=nu,
        backward_needs=program.backward_needs,
        num_states=program.num_states,
        num_saved=program.num_saved,
    )
