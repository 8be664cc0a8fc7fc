/* One direction of one LSTM layer at reduced precision: in bf16, weights and the matmul operands
 * (x_t, h_{t-1}) rounded to bfloat16, every product accumulated in fp32; with ENGINE_INT8, int8
 * weights and u8 activations (the int8 engine's comment below). The cell state c, the gates and
 * the outputs are fp32 either way. Linked into model.so (compile --precision bf16 or int8) and
 * called from a TIR PrimFunc by T.call_extern; the parallel work runs on TVM's own thread pool
 * (TVMBackendParallelLaunch).
 *
 * Two bf16 engines compute a tile's gates; both read the same packed weights (pack.py):
 *  - AMX (TDPBF16PS): a tile of 16 batch rows x 16 units per gate, k in blocks of 32;
 *  - AVX-512 BF16 (VDPBF16PS): a register tile of up to 6 batch rows x 16 units x 4 gates.
 * Weight layout, for unit block u (16 units), k pair kp (k = 2kp, 2kp+1), gate g (ONNX order
 * i, o, f, c), unit j: w[((u * KP + kp) * 4 + g) * 32 + 2j + s] = W[g*H + 16u + j, 2kp + s], zero
 * past H units and past K. A 16-kp slice of one gate is an AMX B tile with a 256-byte stride, and
 * one kp of one gate is a VDPBF16PS operand: the engines share it.
 *
 * Invariants: the bf16 copies of x and h are zero in their padding (rows past B, k past I or H),
 * so padded products add exact zeros; a row's inactive steps (t >= its length) keep h and c, and
 * write zeros to y at position t, which covers positions len..T-1 in either direction.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

typedef struct { void *sync_handle; int32_t num_task; } TVMParallelGroupEnv;
typedef int (*FTVMParallelLambda)(int task_id, TVMParallelGroupEnv *penv, void *cdata);
extern int TVMBackendParallelLaunch(FTVMParallelLambda flambda, void *cdata, int num_task);
extern int TVMBackendParallelBarrier(int task_id, TVMParallelGroupEnv *penv);
/* In model.so, thread_pool.c's launch and barrier, which run the work on the calling thread alone
 * while another thread holds a core; weak, so the kernel also loads on its own (host_library). */
extern int lstm_export_launch(FTVMParallelLambda flambda, void *cdata, int num_task) __attribute__((weak));
extern int lstm_export_barrier(int task_id, TVMParallelGroupEnv *penv) __attribute__((weak));
#define BARRIER(task, penv) (lstm_export_barrier ? lstm_export_barrier : TVMBackendParallelBarrier)(task, penv)

#define TGT __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#define TGT_AMX __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,amx-tile,amx-bf16")))
#define TGT8 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vnni")))
#define TGT_AMX8 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,amx-tile,amx-int8")))

enum { HAS_STATE = 1, HAS_PEEP = 2, HAS_LENS = 4, REVERSE = 8, ENGINE_AMX = 16, SPLIT_BATCH = 32, PROJECT_FIRST = 64, MODE_AUTO = 128,
       ENGINE_INT8 = 256 /* int8 weights, VPDPBUSD: see the int8 engine below */ };
/* MODE_AUTO (shapes unknown at compile time): the mode, and AVX-512 BF16 instead of AMX for one
 * step of a few rows, by engine.derived's rule; one core's L2 in KB in flags' bits 16 and up */
enum { MR = 6 }; /* AVX-512 BF16 register tile rows: 24 accumulators + 4 weights + 1 broadcast */
enum { MR8 = 3 }; /* int8 tile rows: 12 int32 + 12 fp32 accumulators + 4 weights + 1 broadcast */

typedef struct {
  const float *x, *bias, *p, *h0, *c0;
  const uint16_t *w, *r;
  const int32_t *lens;
  float *y, *hn, *cn;
  int64_t T, B, I, H, flags;
  int64_t IK, HK, UB, HP, BP; /* k padded to 32; unit blocks; units padded to 16; rows padded to 16 */
  int64_t XB;                 /* rows of a step in xs: BP fused (a step's tile reads its own rows), B projected first */
  uint16_t *xs;               /* (T, XB, IK) + 16 rows, bf16 of x in step order: row b of step t is x at its time index */
  float *xp;                  /* PROJECT_FIRST: (T*B + 16, UB, 4, 16) x_t @ W of every step, bias not added */
  uint16_t *hb[2];            /* (BP, HK) bf16 of h, double-buffered across steps */
  float *h, *c;               /* (BP, HP) fp32 state */
  float *xscale;              /* ENGINE_INT8: (T*XB + 16) the scale of each row of xs (xs, hb hold u8 then) */
  float hscale;               /* ENGINE_INT8: h's scale, max(1, |h0|) / 127 for the whole call (|h| < 1 after) */
  int threads;
  int failed;
} job_t;

static int64_t ceil_to(int64_t a, int64_t m) { return (a + m - 1) / m * m; }

/* ---- fp32 activations: exp by 2^n * p(r), |r| <= ln2/2; relative error ~1e-7, far below bf16's */
static inline TGT __m512 exp_ps(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(87.0f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
  __m512 q = _mm512_set1_ps(1.0f / 720);
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.0f / 120));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.0f / 24));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.0f / 6));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(0.5f));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.0f));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(q, n);
}
static inline TGT __m512 sigmoid_ps(__m512 x) {
  return _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_add_ps(_mm512_set1_ps(1.0f), exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), x))));
}
static inline TGT __m512 tanh_ps(__m512 x) { /* 2 sigmoid(2x) - 1 */
  return _mm512_fmsub_ps(_mm512_set1_ps(2.0f), sigmoid_ps(_mm512_add_ps(x, x)), _mm512_set1_ps(1.0f));
}

/* int8: round(v * inv) + 128 as 16 unsigned bytes (|v * inv| <= 127 by the scale's choice) */
static inline TGT __m128i quantize_u8(__m512 v, float inv) {
  __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(v, _mm512_set1_ps(inv))); /* round to nearest even */
  return _mm512_cvtusepi32_epi8(_mm512_add_epi32(q, _mm512_set1_epi32(128)));
}

static inline int64_t len_of(const job_t *j, int64_t b) {
  if (!(j->flags & HAS_LENS)) return j->T;
  int64_t n = j->lens[b];
  return n < 0 ? 0 : n > j->T ? j->T : n;
}
static inline int64_t time_of(const job_t *j, int64_t t, int64_t len) {
  return (j->flags & REVERSE) ? len - 1 - t : t;
}

/* The cell update of row b, unit block u, step t, from its four fp32 gate sums (bias not added). */
static inline TGT void update(job_t *j, int64_t b, int64_t u, int64_t t, __m512 gi, __m512 go, __m512 gf, __m512 gc,
                              const uint16_t *hcur, uint16_t *hnext) {
  int64_t H = j->H, HP = j->HP, len = len_of(j, b), col = 16 * u;
  int64_t width = H - col < 16 ? H - col : 16;
  __mmask16 m = (__mmask16)((1u << width) - 1);
  float *c = j->c + b * HP + col, *h = j->h + b * HP + col;
  int int8 = (j->flags & ENGINE_INT8) != 0;
  if (t >= len) { /* finished: state held, zeros at y[t] */
    if (int8) memcpy((uint8_t *)hnext + b * j->HK + col, (const uint8_t *)hcur + b * j->HK + col, 16);
    else _mm256_storeu_si256((__m256i *)(hnext + b * j->HK + col), _mm256_loadu_si256((const __m256i *)(hcur + b * j->HK + col)));
    _mm512_mask_storeu_ps(j->y + (t * j->B + b) * H + col, m, _mm512_setzero_ps());
    return;
  }
  const float *bias = j->bias + 4 * col; /* packed as [u][g][16] */
  gi = _mm512_add_ps(gi, _mm512_loadu_ps(bias));
  go = _mm512_add_ps(go, _mm512_loadu_ps(bias + 16));
  gf = _mm512_add_ps(gf, _mm512_loadu_ps(bias + 32));
  gc = _mm512_add_ps(gc, _mm512_loadu_ps(bias + 48));
  __m512 cp = _mm512_loadu_ps(c);
  if (j->flags & HAS_PEEP) {
    gi = _mm512_fmadd_ps(_mm512_loadu_ps(j->p + col), cp, gi);
    gf = _mm512_fmadd_ps(_mm512_loadu_ps(j->p + 2 * HP + col), cp, gf);
  }
  __m512 cn = _mm512_fmadd_ps(sigmoid_ps(gf), cp, _mm512_mul_ps(sigmoid_ps(gi), tanh_ps(gc)));
  if (j->flags & HAS_PEEP) go = _mm512_fmadd_ps(_mm512_loadu_ps(j->p + HP + col), cn, go);
  __m512 hv = _mm512_maskz_mov_ps(m, _mm512_mul_ps(sigmoid_ps(go), tanh_ps(cn))); /* padded units stay 0 */
  cn = _mm512_maskz_mov_ps(m, cn);
  _mm512_storeu_ps(c, cn);
  _mm512_storeu_ps(h, hv);
  if (int8) _mm_storeu_si128((__m128i *)((uint8_t *)hnext + b * j->HK + col), quantize_u8(hv, 1.0f / j->hscale));
  else _mm256_storeu_si256((__m256i *)(hnext + b * j->HK + col), (__m256i)_mm512_cvtneps_pbh(hv));
  _mm512_mask_storeu_ps(j->y + (time_of(j, t, len) * j->B + b) * H + col, m, hv);
}

/* ---- AVX-512 BF16 engine: rows [b0, b0+NR) of unit block u at step t */
static inline __attribute__((always_inline)) TGT void dot_tile(job_t *j, int64_t t, int64_t b0, int NR, int64_t u,
                                                                const uint16_t *hcur, uint16_t *hnext) {
  __m512 acc[MR][4];
  int pf = (j->flags & PROJECT_FIRST) != 0;
  for (int r = 0; r < NR; r++)
    for (int g = 0; g < 4; g++)
      acc[r][g] = pf ? _mm512_loadu_ps(j->xp + ((t * j->B + b0 + r) * j->UB + u) * 64 + 16 * g) : _mm512_setzero_ps();
  for (int part = pf; part < 2; part++) { /* x_t @ W, then h @ R */
    int64_t KP = (part ? j->HK : j->IK) / 2, stride = part ? j->HK : j->IK;
    const uint16_t *wt = (part ? j->r : j->w) + u * KP * 128;
    const uint16_t *a = part ? hcur + b0 * stride : j->xs + (t * j->XB + b0) * stride;
    if (part && t == 0 && !(j->flags & HAS_STATE)) break; /* h0 = 0: nothing to add */
    for (int64_t kp = 0; kp < KP; kp++, wt += 128) {
      __m512bh w0 = (__m512bh)_mm512_loadu_si512(wt), w1 = (__m512bh)_mm512_loadu_si512(wt + 32);
      __m512bh w2 = (__m512bh)_mm512_loadu_si512(wt + 64), w3 = (__m512bh)_mm512_loadu_si512(wt + 96);
      for (int r = 0; r < NR; r++) {
        __m512bh v = (__m512bh)_mm512_set1_epi32(*(const int32_t *)(a + r * stride + 2 * kp));
        acc[r][0] = _mm512_dpbf16_ps(acc[r][0], v, w0);
        acc[r][1] = _mm512_dpbf16_ps(acc[r][1], v, w1);
        acc[r][2] = _mm512_dpbf16_ps(acc[r][2], v, w2);
        acc[r][3] = _mm512_dpbf16_ps(acc[r][3], v, w3);
      }
    }
  }
  for (int r = 0; r < NR; r++) update(j, b0 + r, u, t, acc[r][0], acc[r][1], acc[r][2], acc[r][3], hcur, hnext);
}

/* PROJECT_FIRST: rows [r0, r0+NR) of the T*B rows of x times unit block u of W, into xp */
static inline __attribute__((always_inline)) TGT void dot_proj_tile(job_t *j, int64_t r0, int NR, int64_t u) {
  __m512 acc[MR][4];
  for (int r = 0; r < NR; r++)
    for (int g = 0; g < 4; g++) acc[r][g] = _mm512_setzero_ps();
  int64_t KP = j->IK / 2;
  const uint16_t *wt = j->w + u * KP * 128, *a = j->xs + r0 * j->IK;
  for (int64_t kp = 0; kp < KP; kp++, wt += 128) {
    __m512bh w0 = (__m512bh)_mm512_loadu_si512(wt), w1 = (__m512bh)_mm512_loadu_si512(wt + 32);
    __m512bh w2 = (__m512bh)_mm512_loadu_si512(wt + 64), w3 = (__m512bh)_mm512_loadu_si512(wt + 96);
    for (int r = 0; r < NR; r++) {
      __m512bh v = (__m512bh)_mm512_set1_epi32(*(const int32_t *)(a + r * j->IK + 2 * kp));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], v, w0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], v, w1);
      acc[r][2] = _mm512_dpbf16_ps(acc[r][2], v, w2);
      acc[r][3] = _mm512_dpbf16_ps(acc[r][3], v, w3);
    }
  }
  for (int r = 0; r < NR; r++)
    for (int g = 0; g < 4; g++) _mm512_storeu_ps(j->xp + ((r0 + r) * j->UB + u) * 64 + 16 * g, acc[r][g]);
}

static TGT void dot_proj(job_t *j, int64_t r0, int64_t u) {
  int64_t left = j->T * j->B - r0;
  switch (left >= MR ? MR : left) {
    case 6: dot_proj_tile(j, r0, 6, u); break;
    case 5: dot_proj_tile(j, r0, 5, u); break;
    case 4: dot_proj_tile(j, r0, 4, u); break;
    case 3: dot_proj_tile(j, r0, 3, u); break;
    case 2: dot_proj_tile(j, r0, 2, u); break;
    case 1: dot_proj_tile(j, r0, 1, u); break;
    default: break;
  }
}

static TGT void dot_rows(job_t *j, int64_t t, int64_t b0, int64_t b1, int64_t u, const uint16_t *hcur, uint16_t *hnext) {
  int64_t b = b0;
  for (; b + MR <= b1; b += MR) dot_tile(j, t, b, MR, u, hcur, hnext);
  switch (b1 - b) {
    case 5: dot_tile(j, t, b, 5, u, hcur, hnext); break;
    case 4: dot_tile(j, t, b, 4, u, hcur, hnext); break;
    case 3: dot_tile(j, t, b, 3, u, hcur, hnext); break;
    case 2: dot_tile(j, t, b, 2, u, hcur, hnext); break;
    case 1: dot_tile(j, t, b, 1, u, hcur, hnext); break;
    default: break;
  }
}

/* ---- int8 engine (ENGINE_INT8, VPDPBUSD): weights int8 per output unit and gate, scaled by
 * max|row| / 127, packed like the bf16 ones with four k per 32-bit lane (64 bytes per k quad and
 * gate), then the scales (float) and 128 x each column's sum (int32) for that unit block layout.
 * Activations are u8 = round(v / scale) + 128: x per row of each step (scale max|row| / 127), h with
 * one scale for the call (hscale). A product sum is (sum(u8 * w) - 128 * colsum) * scale_a * scale_w,
 * exact in int32 before the scales. */
typedef struct { const int8_t *q; const float *scale; const int32_t *csum128; int64_t K; } w8_t;

static inline w8_t w8_of(const job_t *j, int part) {
  int64_t K = part ? j->HK : j->IK;
  const int8_t *q = (const int8_t *)(part ? (const void *)j->r : (const void *)j->w);
  w8_t w = {q, (const float *)(q + j->UB * K * 64), (const int32_t *)(q + j->UB * K * 64 + j->UB * 256), K};
  return w;
}

/* acc[r][g] += rows [b0, b0+NR) of `a` (u8, row stride w.K, row scale ascale[r]) times unit block u */
static inline __attribute__((always_inline)) TGT8 void dot8_part(w8_t w, const uint8_t *a, const float *ascale,
                                                                 int NR, int64_t u, __m512 acc[MR8][4]) {
  __m512i ai[MR8][4];
  for (int r = 0; r < NR; r++)
    for (int g = 0; g < 4; g++) ai[r][g] = _mm512_setzero_si512();
  const int8_t *wt = w.q + u * (w.K / 4) * 256;
  for (int64_t kq = 0; kq < w.K / 4; kq++, wt += 256) {
    __m512i w0 = _mm512_loadu_si512(wt), w1 = _mm512_loadu_si512(wt + 64);
    __m512i w2 = _mm512_loadu_si512(wt + 128), w3 = _mm512_loadu_si512(wt + 192);
    for (int r = 0; r < NR; r++) {
      __m512i v = _mm512_set1_epi32(*(const int32_t *)(a + r * w.K + 4 * kq));
      ai[r][0] = _mm512_dpbusd_epi32(ai[r][0], v, w0);
      ai[r][1] = _mm512_dpbusd_epi32(ai[r][1], v, w1);
      ai[r][2] = _mm512_dpbusd_epi32(ai[r][2], v, w2);
      ai[r][3] = _mm512_dpbusd_epi32(ai[r][3], v, w3);
    }
  }
  for (int g = 0; g < 4; g++) {
    __m512i c128 = _mm512_loadu_si512(w.csum128 + u * 64 + 16 * g);
    __m512 ws = _mm512_loadu_ps(w.scale + u * 64 + 16 * g);
    for (int r = 0; r < NR; r++)
      acc[r][g] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(ai[r][g], c128)),
                                  _mm512_mul_ps(ws, _mm512_set1_ps(ascale[r])), acc[r][g]);
  }
}

static inline __attribute__((always_inline)) TGT8 void dot8_tile(job_t *j, int64_t t, int64_t b0, int NR, int64_t u,
                                                                  const uint16_t *hcur, uint16_t *hnext) {
  __m512 acc[MR8][4];
  float ascale[MR8];
  int pf = (j->flags & PROJECT_FIRST) != 0;
  for (int r = 0; r < NR; r++)
    for (int g = 0; g < 4; g++)
      acc[r][g] = pf ? _mm512_loadu_ps(j->xp + ((t * j->B + b0 + r) * j->UB + u) * 64 + 16 * g) : _mm512_setzero_ps();
  if (!pf) {
    for (int r = 0; r < NR; r++) ascale[r] = j->xscale[t * j->XB + b0 + r];
    dot8_part(w8_of(j, 0), (const uint8_t *)j->xs + (t * j->XB + b0) * j->IK, ascale, NR, u, acc);
  }
  if (t > 0 || (j->flags & HAS_STATE)) {
    for (int r = 0; r < NR; r++) ascale[r] = j->hscale;
    dot8_part(w8_of(j, 1), (const uint8_t *)hcur + b0 * j->HK, ascale, NR, u, acc);
  }
  for (int r = 0; r < NR; r++) update(j, b0 + r, u, t, acc[r][0], acc[r][1], acc[r][2], acc[r][3], hcur, hnext);
}

static TGT8 void dot8_rows(job_t *j, int64_t t, int64_t b0, int64_t b1, int64_t u, const uint16_t *hcur,
                           uint16_t *hnext) {
  int64_t b = b0;
  for (; b + MR8 <= b1; b += MR8) dot8_tile(j, t, b, MR8, u, hcur, hnext);
  if (b1 - b == 2) dot8_tile(j, t, b, 2, u, hcur, hnext);
  else if (b1 - b == 1) dot8_tile(j, t, b, 1, u, hcur, hnext);
}

/* PROJECT_FIRST: rows [r0, r0+NR) of the T*B rows of x times unit block u of W, into xp */
static TGT8 void dot8_proj(job_t *j, int64_t r0, int64_t u) {
  int64_t left = j->T * j->B - r0;
  int NR = left >= MR8 ? MR8 : (int)left;
  __m512 acc[MR8][4];
  float ascale[MR8];
  for (int r = 0; r < MR8; r++) {
    for (int g = 0; g < 4; g++) acc[r][g] = _mm512_setzero_ps();
    ascale[r] = r < NR ? j->xscale[r0 + r] : 0.0f;
  }
  const uint8_t *a = (const uint8_t *)j->xs + r0 * j->IK;
  if (NR == 3) dot8_part(w8_of(j, 0), a, ascale, 3, u, acc);
  else if (NR == 2) dot8_part(w8_of(j, 0), a, ascale, 2, u, acc);
  else dot8_part(w8_of(j, 0), a, ascale, 1, u, acc);
  for (int r = 0; r < NR; r++)
    for (int g = 0; g < 4; g++) _mm512_storeu_ps(j->xp + ((r0 + r) * j->UB + u) * 64 + 16 * g, acc[r][g]);
}

/* ---- AMX engine: rows [16 rb, 16 rb + 16) of unit block u at step t; tmm0-3 the gates, tmm4 x or
 * h, tmm5-7 weights. `scratch` holds the four 16x16 fp32 gate tiles for the update. */
typedef struct { uint8_t palette, start; uint8_t reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; } tilecfg_t;

/* A constant in memory, not a local: GCC 12 drops the stores into a local config as dead, since
 * _tile_loadconfig's asm does not say it reads all 64 bytes. */
static const tilecfg_t TILES = {1, 0, {0}, {64, 64, 64, 64, 64, 64, 64, 64}, {16, 16, 16, 16, 16, 16, 16, 16}};

static TGT_AMX void amx_config(void) { _tile_loadconfig(&TILES); }

static TGT_AMX void amx_release(void) { _tile_release(); }

/* PROJECT_FIRST: rows [16 rb, 16 rb + 16) of the T*B rows of x times unit block u of W, into xp */
static TGT_AMX void amx_proj(job_t *j, int64_t rb, int64_t u) {
  _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
  const uint16_t *wt = j->w + u * (j->IK / 2) * 128, *a = j->xs + rb * 16 * j->IK;
  for (int64_t kb = 0; kb < j->IK / 32; kb++) {
    const uint16_t *wk = wt + kb * 16 * 128;
    _tile_loadd(4, a + kb * 32, j->IK * 2);
    _tile_loadd(5, wk, 256);
    _tile_dpbf16ps(0, 4, 5);
    _tile_loadd(6, wk + 32, 256);
    _tile_dpbf16ps(1, 4, 6);
    _tile_loadd(7, wk + 64, 256);
    _tile_dpbf16ps(2, 4, 7);
    _tile_loadd(5, wk + 96, 256);
    _tile_dpbf16ps(3, 4, 5);
  }
  float *xp = j->xp + (rb * 16 * j->UB + u) * 64;
  _tile_stored(0, xp, j->UB * 256); _tile_stored(1, xp + 16, j->UB * 256);
  _tile_stored(2, xp + 32, j->UB * 256); _tile_stored(3, xp + 48, j->UB * 256);
}

static TGT_AMX void amx_tile(job_t *j, int64_t t, int64_t rb, int64_t u, const uint16_t *hcur, uint16_t *hnext,
                             float *scratch) {
  int pf = (j->flags & PROJECT_FIRST) != 0;
  if (pf) { /* rows past B read later steps' rows (or xp's 16 spare rows): loaded, never used */
    const float *xp = j->xp + ((t * j->B + rb * 16) * j->UB + u) * 64;
    _tile_loadd(0, xp, j->UB * 256); _tile_loadd(1, xp + 16, j->UB * 256);
    _tile_loadd(2, xp + 32, j->UB * 256); _tile_loadd(3, xp + 48, j->UB * 256);
  } else {
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
  }
  for (int part = pf; part < 2; part++) {
    int64_t K = part ? j->HK : j->IK;
    if (part && t == 0 && !(j->flags & HAS_STATE)) break;
    const uint16_t *wt = (part ? j->r : j->w) + u * (K / 2) * 128;
    const uint16_t *a = part ? hcur + rb * 16 * K : j->xs + (t * j->XB + rb * 16) * K;
    for (int64_t kb = 0; kb < K / 32; kb++) {
      const uint16_t *wk = wt + kb * 16 * 128; /* 16 k pairs x 4 gates x 32 bf16 */
      _tile_loadd(4, a + kb * 32, K * 2);
      _tile_loadd(5, wk, 256);
      _tile_dpbf16ps(0, 4, 5);
      _tile_loadd(6, wk + 32, 256);
      _tile_dpbf16ps(1, 4, 6);
      _tile_loadd(7, wk + 64, 256);
      _tile_dpbf16ps(2, 4, 7);
      _tile_loadd(5, wk + 96, 256);
      _tile_dpbf16ps(3, 4, 5);
    }
  }
  _tile_stored(0, scratch, 64); _tile_stored(1, scratch + 256, 64);
  _tile_stored(2, scratch + 512, 64); _tile_stored(3, scratch + 768, 64);
  int64_t rows = j->B - rb * 16 < 16 ? j->B - rb * 16 : 16;
  for (int64_t r = 0; r < rows; r++)
    update(j, rb * 16 + r, u, t, _mm512_load_ps(scratch + 16 * r), _mm512_load_ps(scratch + 256 + 16 * r),
           _mm512_load_ps(scratch + 512 + 16 * r), _mm512_load_ps(scratch + 768 + 16 * r), hcur, hnext);
}

/* ---- AMX int8 (ENGINE_INT8 | ENGINE_AMX, the fused splits): TDPBUSD on the int8 layout, whose 16
 * k quads of one gate are a B tile (256-byte stride); K is padded to 64 for it. The x part and the
 * h part have different activation scales, so each is summed in int32 tiles, stored, and scaled
 * into the fp32 gates in `scratch` (4 x 256 floats, then 4 x 256 int32) before the update. */
static TGT_AMX8 void amx8_tile(job_t *j, int64_t t, int64_t rb, int64_t u, const uint16_t *hcur, uint16_t *hnext,
                               float *scratch) {
  int32_t *ci = (int32_t *)(scratch + 1024);
  int64_t rows = j->B - rb * 16 < 16 ? j->B - rb * 16 : 16;
  memset(scratch, 0, 4096);
  for (int part = 0; part < 2; part++) {
    if (part && t == 0 && !(j->flags & HAS_STATE)) break;
    w8_t w = w8_of(j, part);
    const uint8_t *a = part ? (const uint8_t *)hcur + rb * 16 * w.K : (const uint8_t *)j->xs + (t * j->XB + rb * 16) * w.K;
    const int8_t *wt = w.q + u * (w.K / 4) * 256;
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    for (int64_t kb = 0; kb < w.K / 64; kb++) {
      const int8_t *wk = wt + kb * 16 * 256; /* 16 k quads x 4 gates x 64 bytes */
      _tile_loadd(4, a + kb * 64, w.K);
      _tile_loadd(5, wk, 256);
      _tile_dpbusd(0, 4, 5);
      _tile_loadd(6, wk + 64, 256);
      _tile_dpbusd(1, 4, 6);
      _tile_loadd(7, wk + 128, 256);
      _tile_dpbusd(2, 4, 7);
      _tile_loadd(5, wk + 192, 256);
      _tile_dpbusd(3, 4, 5);
    }
    _tile_stored(0, ci, 64); _tile_stored(1, ci + 256, 64); _tile_stored(2, ci + 512, 64); _tile_stored(3, ci + 768, 64);
    for (int g = 0; g < 4; g++) {
      __m512i c128 = _mm512_loadu_si512(w.csum128 + u * 64 + 16 * g);
      __m512 ws = _mm512_loadu_ps(w.scale + u * 64 + 16 * g);
      for (int64_t r = 0; r < rows; r++) {
        float as = part ? j->hscale : j->xscale[t * j->XB + rb * 16 + r];
        __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_load_si512(ci + 256 * g + 16 * r), c128));
        float *dst = scratch + 256 * g + 16 * r;
        _mm512_store_ps(dst, _mm512_fmadd_ps(v, _mm512_mul_ps(ws, _mm512_set1_ps(as)), _mm512_load_ps(dst)));
      }
    }
  }
  for (int64_t r = 0; r < rows; r++)
    update(j, rb * 16 + r, u, t, _mm512_load_ps(scratch + 16 * r), _mm512_load_ps(scratch + 256 + 16 * r),
           _mm512_load_ps(scratch + 512 + 16 * r), _mm512_load_ps(scratch + 768 + 16 * r), hcur, hnext);
}

/* ---- the whole sequence, one parallel launch */
/* int8: one row of x as u8 with its scale max|x| / 127 (a zero row: scale 0, every byte 128) */
static TGT void quantize_row(const job_t *j, const float *src, uint8_t *dst, float *scale) {
  __m512 mx = _mm512_setzero_ps();
  for (int64_t k = 0; k < j->I; k += 16) {
    __mmask16 m = (__mmask16)((1u << (j->I - k < 16 ? j->I - k : 16)) - 1);
    mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_maskz_loadu_ps(m, src + k)));
  }
  float top = _mm512_reduce_max_ps(mx);
  *scale = top / 127.0f;
  float inv = top > 0 ? 127.0f / top : 0.0f;
  memset(dst, 128, j->IK);
  for (int64_t k = 0; k < j->I; k += 16) {
    __mmask16 m = (__mmask16)((1u << (j->I - k < 16 ? j->I - k : 16)) - 1);
    _mm_mask_storeu_epi8(dst + k, m, quantize_u8(_mm512_maskz_loadu_ps(m, src + k), inv));
  }
}

static TGT void prepare_rows(job_t *j, int64_t b0, int64_t b1) {
  /* the state buffers and the step-ordered bf16 (int8: u8 and scales) x of rows [b0, b1) (rows past
   * B: zeros) */
  int64_t HP = j->HP;
  int int8 = (j->flags & ENGINE_INT8) != 0;
  for (int64_t b = b0; b < b1; b++) {
    for (int64_t k = 0; k < HP; k += 16) {
      __m512 h = _mm512_setzero_ps(), c = _mm512_setzero_ps();
      if ((j->flags & HAS_STATE) && b < j->B) {
        __mmask16 m = (__mmask16)((1u << (j->H - k < 16 ? j->H - k : 16)) - 1);
        h = _mm512_maskz_loadu_ps(m, j->h0 + b * j->H + k);
        c = _mm512_maskz_loadu_ps(m, j->c0 + b * j->H + k);
      }
      _mm512_storeu_ps(j->h + b * HP + k, h);
      _mm512_storeu_ps(j->c + b * HP + k, c);
    }
    if (int8) { /* u8 rows of HK bytes; 128 is 0 */
      memset((uint8_t *)j->hb[0] + b * j->HK, 128, j->HK);
      memset((uint8_t *)j->hb[1] + b * j->HK, 128, j->HK);
    } else {
      memset(j->hb[0] + b * j->HK, 0, j->HK * 2);
      memset(j->hb[1] + b * j->HK, 0, j->HK * 2);
    }
    for (int64_t k = 0; k < j->H; k += 16) {
      __m512 h = _mm512_loadu_ps(j->h + b * HP + k);
      if (int8) _mm_storeu_si128((__m128i *)((uint8_t *)j->hb[0] + b * j->HK + k), quantize_u8(h, 1.0f / j->hscale));
      else _mm256_storeu_si256((__m256i *)(j->hb[0] + b * j->HK + k), (__m256i)_mm512_cvtneps_pbh(h));
    }
    if (b >= j->XB) continue; /* projected first: no padding rows between steps */
    int64_t len = b < j->B ? len_of(j, b) : 0;
    for (int64_t t = 0; t < j->T; t++) {
      if (int8) { /* u8 rows of IK bytes */
        uint8_t *d8 = (uint8_t *)j->xs + (t * j->XB + b) * j->IK;
        if (t < len) quantize_row(j, j->x + (time_of(j, t, len) * j->B + b) * j->I, d8, j->xscale + t * j->XB + b);
        else { memset(d8, 128, j->IK); j->xscale[t * j->XB + b] = 0.0f; }
        continue;
      }
      uint16_t *dst = j->xs + (t * j->XB + b) * j->IK;
      memset(dst, 0, j->IK * 2);
      if (t >= len) continue;
      const float *src = j->x + (time_of(j, t, len) * j->B + b) * j->I;
      for (int64_t k = 0; k < j->I; k += 16) {
        __mmask16 m = (__mmask16)((1u << (j->I - k < 16 ? j->I - k : 16)) - 1);
        __m256bh v = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, src + k));
        _mm256_mask_storeu_epi16(dst + k, m, (__m256i)v);
      }
    }
  }
}

static TGT int layer_task(int task, TVMParallelGroupEnv *penv, void *cdata) {
  job_t *j = (job_t *)cdata;
  int n = penv->num_task;
  int amx = (j->flags & ENGINE_AMX) != 0, int8 = (j->flags & ENGINE_INT8) != 0;
  float scratch[2048] __attribute__((aligned(64))); /* AMX: the gate tiles (and AMX int8's int32 tiles) */
  if (amx) amx_config();
  /* this task's rows (batch split: whole row groups of 16 for AMX, else of 1) or unit blocks */
  int64_t group = amx ? 16 : 1, groups = (amx ? j->BP : j->B) / group;
  int64_t g0 = groups * task / n, g1 = groups * (task + 1) / n;
  int64_t u0 = j->UB * task / n, u1 = j->UB * (task + 1) / n;
  int batch = (j->flags & SPLIT_BATCH) != 0;
  int64_t rows = j->BP, p0 = rows * task / n, p1 = rows * (task + 1) / n;
  if (batch) { p0 = g0 * group; p1 = task == n - 1 ? j->BP : g1 * group; }
  prepare_rows(j, p0, p1);
  if (!batch) BARRIER(task, penv);
  if (j->flags & PROJECT_FIRST) { /* (unit split only) every step's x_t @ W, items shared out */
    int64_t tile = amx ? 16 : int8 ? MR8 : MR, nr = (j->T * j->B + tile - 1) / tile, items = nr * j->UB;
    for (int64_t it = items * task / n; it < items * (task + 1) / n; it++) {
      int64_t u = it / nr, rb = it % nr; /* unit-block-major: a block's W stays in cache */
      if (amx) amx_proj(j, rb, u); else if (int8) dot8_proj(j, rb * MR8, u); else dot_proj(j, rb * MR, u);
    }
    BARRIER(task, penv);
  }
  for (int64_t t = 0; t < j->T; t++) {
    const uint16_t *hcur = j->hb[t & 1];
    uint16_t *hnext = j->hb[(t + 1) & 1];
    int64_t ua = batch ? 0 : u0, ue = batch ? j->UB : u1;
    for (int64_t u = ua; u < ue; u++) {
      if (amx) {
        int64_t ra = batch ? g0 : 0, re = batch ? g1 : j->BP / 16;
        for (int64_t rb = ra; rb < re; rb++)
          if (rb * 16 < j->B) {
            if (int8) amx8_tile(j, t, rb, u, hcur, hnext, scratch);
            else amx_tile(j, t, rb, u, hcur, hnext, scratch);
          }
      } else {
        int64_t ba = batch ? g0 : 0, be = batch ? g1 : j->B;
        if (int8) dot8_rows(j, t, ba, be, u, hcur, hnext); else dot_rows(j, t, ba, be, u, hcur, hnext);
      }
    }
    if (!batch) BARRIER(task, penv);
  }
  if (amx) amx_release();
  /* final state: each task writes the rows it prepared (every row's h and c are current here) */
  for (int64_t b = p0; b < p1 && b < j->B; b++) {
    memcpy(j->hn + b * j->H, j->h + b * j->HP, j->H * 4);
    memcpy(j->cn + b * j->H, j->c + b * j->HP, j->H * 4);
  }
  return 0;
}

/* 0: the process may use AMX (Linux asks each process to request the tile data state once). */
static int amx_permitted(void) {
  static int state = -1; /* -1 not asked; 0 yes; 1 no */
  if (state < 0) state = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0 ? 0 : 1;
  return state;
}

/* Returns 0, or -1 when scratch memory cannot be had (TVM turns a nonzero extern result into an
 * error). flags: HAS_STATE, HAS_PEEP, HAS_LENS, REVERSE, ENGINE_AMX, SPLIT_BATCH; AMX without the
 * OS's permission runs the AVX-512 BF16 engine (same products, another summation order). */
int lstm_export_bf16_layer(const float *x, const uint16_t *w, const uint16_t *r, const float *bias, const float *p,
                           const float *h0, const float *c0, const int32_t *lens, float *y, float *hn, float *cn,
                           int64_t T, int64_t B, int64_t I, int64_t H, int64_t flags, int64_t threads) {
  job_t j;
  memset(&j, 0, sizeof j);
  j.x = x; j.w = w; j.r = r; j.bias = bias; j.p = p; j.h0 = h0; j.c0 = c0; j.lens = lens;
  j.y = y; j.hn = hn; j.cn = cn; j.T = T; j.B = B; j.I = I; j.H = H; j.flags = flags;
  if ((flags & ENGINE_AMX) && amx_permitted() != 0) j.flags &= ~ENGINE_AMX;
  int64_t kq = (flags & ENGINE_INT8) ? 64 : 32; /* an AMX int8 tile row holds 64 k */
  j.IK = ceil_to(I, kq); j.HK = ceil_to(H, kq); j.HP = ceil_to(H, 16); j.UB = j.HP / 16; j.BP = ceil_to(B, 16);
  if (B == 0) return 0;
  if (T == 0) { /* no step: the state as it came */
    for (int64_t b = 0; b < B; b++)
      for (int64_t k = 0; k < H; k++) {
        hn[b * H + k] = (flags & HAS_STATE) ? h0[b * H + k] : 0.0f;
        cn[b * H + k] = (flags & HAS_STATE) ? c0[b * H + k] : 0.0f;
      }
    return 0;
  }
  if (flags & MODE_AUTO) { /* engine.derived, the same rule */
    j.flags &= ~(SPLIT_BATCH | PROJECT_FIRST);
    if (B < 16 && T > 1) j.flags |= PROJECT_FIRST;
    if (B < 16 && T == 1) j.flags &= ~ENGINE_AMX; /* one step of a few rows: AMX's 16-row tiles are padding */
    else if ((j.IK + j.HK) * 4 * j.HP * 2 <= (flags >> 16) * 1024) j.flags |= SPLIT_BATCH;
  }
  if (j.flags & PROJECT_FIRST) j.flags &= ~SPLIT_BATCH;
  if ((j.flags & PROJECT_FIRST) && (j.flags & ENGINE_INT8)) j.flags &= ~ENGINE_AMX; /* no AMX int8 projection */
  j.XB = (j.flags & PROJECT_FIRST) ? B : j.BP;
  size_t xs = (size_t)(T * j.XB + 16) * j.IK * 2, hb = (size_t)j.BP * j.HK * 2, st = (size_t)j.BP * j.HP * 4;
  size_t xp = (j.flags & PROJECT_FIRST) ? (size_t)(T * B + 16) * j.HP * 16 : 0;
  size_t xsc = (j.flags & ENGINE_INT8) ? (size_t)(T * j.XB + 16) * 4 : 0;
  char *mem = aligned_alloc(64, ceil_to(xs, 64) + 2 * ceil_to(hb, 64) + 2 * ceil_to(st, 64) + ceil_to(xp, 64) +
                                    ceil_to(xsc, 64));
  if (!mem) return -1;
  if (xsc) {
    j.xscale = (float *)(mem + ceil_to(xs, 64) + 2 * ceil_to(hb, 64) + 2 * ceil_to(st, 64) + ceil_to(xp, 64));
    float top = 1.0f; /* |h| < 1 after the first step; h0 may be larger */
    if (flags & HAS_STATE)
      for (int64_t k = 0; k < B * H; k++) top = h0[k] > top ? h0[k] : -h0[k] > top ? -h0[k] : top;
    j.hscale = top / 127.0f;
  }
  memset(mem + T * j.XB * j.IK * 2, 0, 16 * j.IK * 2); /* the spare rows a last AMX tile reads */
  if (xp) j.xp = (float *)(mem + ceil_to(xs, 64) + 2 * ceil_to(hb, 64) + 2 * ceil_to(st, 64));
  j.xs = (uint16_t *)mem;
  j.hb[0] = (uint16_t *)(mem + ceil_to(xs, 64));
  j.hb[1] = (uint16_t *)(mem + ceil_to(xs, 64) + ceil_to(hb, 64));
  j.h = (float *)(mem + ceil_to(xs, 64) + 2 * ceil_to(hb, 64));
  j.c = (float *)(mem + ceil_to(xs, 64) + 2 * ceil_to(hb, 64) + ceil_to(st, 64));
  int n = (int)(threads > 0 ? threads : 1);
  int64_t units = (j.flags & SPLIT_BATCH) ? ((j.flags & ENGINE_AMX) ? j.BP / 16 : B) : j.UB;
  if (n > units) n = (int)units;
  if (n < 1) n = 1;
  int rc = (lstm_export_launch ? lstm_export_launch : TVMBackendParallelLaunch)(layer_task, &j, n);
  free(mem);
  return rc;
}
