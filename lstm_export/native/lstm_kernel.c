/* The from-scratch LSTM's time loop and its derivative: one layer, one direction, per call.
 *
 * Row-major throughout. The work is split by hidden units over `nt` threads of the process's
 * OpenMP pool (torch's libgomp, when torch is loaded first), thread k owning units
 * [split[k], split[k+1]). Gate columns are in "blocked" order, so that each thread's columns are
 * one contiguous run: thread k's run starts at column 4 * split[k] and holds its units' i, f, g, o
 * in that order, n_k = split[k+1] - split[k] wide each. The caller permutes W_ih, W_hh and the
 * biases into this order, and the gradients back.
 *
 * Forward step: G[t] (B, 4H) holds the input projection; each thread adds h_{t-1} @ W_hh^T on its
 * own columns, then runs the cell on them; one barrier per step (h is double-buffered, so a thread
 * may write h_t while another still reads h_{t-1}). Backward step: the cell's derivative on each
 * thread's units, a barrier (the GEMM reads every thread's dG[t]), then dh += dG[t] @ W_hh on each
 * thread's units, which the same thread's next step reads.
 *
 * Row b is active at step t iff t < lens[b] (lens NULL: every row is): an inactive row keeps its
 * state, emits zeros and passes its gradients through, as a padded step of a packed sequence does;
 * a reverse pass thus starts each row at its own last step, from the initial state. A length of 0
 * leaves the initial state as the final one and emits zeros.
 *
 * GEMMs: float32 steps use the packed micro-kernel below (weights packed once per call, a register
 * tile of up to MR rows x 2 vectors); float64 steps, and the large GEMMs outside the loops
 * (parallel_gemm_*), call the caller's BLAS (cblas_?gemm, LP64 or ILP64), passed as a pointer, one
 * call per thread. set_threads (OpenBLAS's openblas_set_num_threads_local, or NULL) makes those
 * calls single-threaded for the duration, so the BLAS's own pool never competes with the OpenMP
 * one. The kernel links against nothing but libgomp and libm.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };
typedef void (*sgemm32_t)(int, int, int, int32_t, int32_t, int32_t, float, const float *, int32_t,
                          const float *, int32_t, float, float *, int32_t);
typedef void (*sgemm64_t)(int, int, int, int64_t, int64_t, int64_t, float, const float *, int64_t,
                          const float *, int64_t, float, float *, int64_t);
typedef void (*dgemm32_t)(int, int, int, int32_t, int32_t, int32_t, double, const double *, int32_t,
                          const double *, int32_t, double, double *, int32_t);
typedef void (*dgemm64_t)(int, int, int, int64_t, int64_t, int64_t, double, const double *, int64_t,
                          const double *, int64_t, double, double *, int64_t);
typedef int (*set_threads_t)(int);

/* The caller's BLAS. */
typedef struct {
    void *sgemm, *dgemm, *set_threads;
    int ilp64;
} blas_t;

static int blas_single(const blas_t *blas) {
    return blas->set_threads != NULL ? ((set_threads_t)blas->set_threads)(1) : 0;
}

static void blas_restore(const blas_t *blas, int old) {
    if (blas->set_threads != NULL) ((set_threads_t)blas->set_threads)(old);
}

/* C (M, N; ldc) = beta C + op(A) @ op(B); op transposes where ta / tb is set (A then is (K, M; lda)). */
#define BLAS_GEMM(R, S, FN, T32, T64)                                                                       \
    static void blas_##S(const blas_t *blas, int ta, int tb, int64_t M, int64_t N, int64_t K, const R *A,  \
                         int64_t lda, const R *B, int64_t ldb, R beta, R *C, int64_t ldc) {                 \
        if (M == 0 || N == 0) return;                                                                       \
        const int a = ta ? TRANS : NO_TRANS, b = tb ? TRANS : NO_TRANS;                                     \
        if (blas->ilp64)                                                                                    \
            ((T64)blas->FN)(ROW_MAJOR, a, b, M, N, K, (R)1, A, lda, B, ldb, beta, C, ldc);                  \
        else                                                                                                \
            ((T32)blas->FN)(ROW_MAJOR, a, b, (int32_t)M, (int32_t)N, (int32_t)K, (R)1, A, (int32_t)lda, B, \
                            (int32_t)ldb, beta, C, (int32_t)ldc);                                           \
    }                                                                                                       \
    /* The same GEMM split by columns of C over nt threads, each calling the BLAS single-threaded. */      \
    void parallel_gemm_##S(const blas_t *blas, int nt, int ta, int tb, int64_t M, int64_t N, int64_t K,    \
                           const R *A, int64_t lda, const R *B, int64_t ldb, R beta, R *C, int64_t ldc) {   \
        int64_t chunk = (N + nt - 1) / nt;                                                                  \
        chunk = (chunk + 15) / 16 * 16;                                                                     \
        const int old = blas_single(blas);                                                                  \
        _Pragma("omp parallel num_threads(nt)")                                                             \
        {                                                                                                   \
            const int64_t n0 = omp_get_thread_num() * chunk, n1 = n0 + chunk < N ? n0 + chunk : N;         \
            if (n0 < n1)                                                                                    \
                blas_##S(blas, ta, tb, M, n1 - n0, K, A, lda, tb ? B + n0 * ldb : B + n0, ldb, beta, C + n0, \
                         ldc);                                                                              \
        }                                                                                                   \
        blas_restore(blas, old);                                                                            \
    }

BLAS_GEMM(float, f32, sgemm, sgemm32_t, sgemm64_t)
BLAS_GEMM(double, f64, dgemm, dgemm32_t, dgemm64_t)

/* ---- The packed float32 micro-kernel: C (M, N) += A (M, K) @ B, B packed in panels of NR columns,
 * each (K, NR) contiguous and zero-padded past N. VL: the widest vector the build targets. */
#if defined(__AVX512F__)
#define VL 16
#elif defined(__AVX__)
#define VL 8
#else
#define VL 4
#endif
#define NR (2 * VL)
#ifndef MR
#if VL == 16
#define MR 8 /* 16 accumulators of AVX-512's 32 registers */
#else
#define MR 6 /* 12 of AVX2's 16 */
#endif
#endif
typedef float vf __attribute__((vector_size(VL * sizeof(float))));

static inline vf vload(const float *p) {
    vf v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void vstore(float *p, vf v) { memcpy(p, &v, sizeof v); }

int64_t panel_width(void) { return NR; }

/* Packs columns [0, N) of B (K, N; ldb) into ceil(N / NR) panels at P. */
void pack_panels(int64_t K, int64_t N, const float *B, int64_t ldb, float *P) {
    for (int64_t p = 0; p * NR < N; ++p)
        for (int64_t k = 0; k < K; ++k)
            for (int64_t j = 0; j < NR; ++j) {
                const int64_t n = p * NR + j;
                P[(p * K + k) * NR + j] = n < N ? B[k * ldb + n] : 0.0f;
            }
}

#define TILE(M)                                                                                             \
    static void tile_##M(int64_t K, const float *A, int64_t lda, const float *P, float *C, int64_t ldc,    \
                         int64_t nc, int add) {                                                             \
        vf acc[M][2];                                                                                       \
        for (int r = 0; r < M; ++r) acc[r][0] = acc[r][1] = (vf){0};                                        \
        for (int64_t k = 0; k < K; ++k) {                                                                   \
            const vf w0 = vload(P + k * NR), w1 = vload(P + k * NR + VL);                                   \
            for (int r = 0; r < M; ++r) {                                                                   \
                const float a = A[r * lda + k];                                                             \
                acc[r][0] += a * w0;                                                                        \
                acc[r][1] += a * w1;                                                                        \
            }                                                                                               \
        }                                                                                                   \
        for (int r = 0; r < M; ++r) {                                                                       \
            if (nc == NR && add) {                                                                          \
                vstore(C + r * ldc, vload(C + r * ldc) + acc[r][0]);                                        \
                vstore(C + r * ldc + VL, vload(C + r * ldc + VL) + acc[r][1]);                              \
            } else if (nc == NR) {                                                                          \
                vstore(C + r * ldc, acc[r][0]);                                                             \
                vstore(C + r * ldc + VL, acc[r][1]);                                                        \
            } else {                                                                                        \
                float t[NR];                                                                                \
                vstore(t, acc[r][0]);                                                                       \
                vstore(t + VL, acc[r][1]);                                                                  \
                for (int64_t j = 0; j < nc; ++j) C[r * ldc + j] = (add ? C[r * ldc + j] : 0.0f) + t[j];    \
            }                                                                                               \
        }                                                                                                   \
    }
TILE(1)
TILE(2)
TILE(3)
TILE(4)
TILE(5)
TILE(6)
TILE(7)
TILE(8)
TILE(9)
TILE(10)
TILE(11)
TILE(12)
typedef void (*tile_t)(int64_t, const float *, int64_t, const float *, float *, int64_t, int64_t, int);
static const tile_t tiles[13] = {0,      tile_1, tile_2, tile_3,  tile_4,  tile_5, tile_6,
                                 tile_7, tile_8, tile_9, tile_10, tile_11, tile_12};

/* Rows in tiles of MR, the last two split evenly when the remainder is small (8 rows: 4 + 4, not
 * 6 + 2: a 2-row tile has too few accumulators to hide the FMA latency). */
static int64_t tile_rows(int64_t m, int64_t M) {
    const int64_t left = M - m;
    if (left <= MR) return left;
    if (left < 2 * MR && left % MR != 0 && left % MR <= 3) return (left + 1) / 2;
    return MR;
}

/* C (M, N; ldc) (+)= A (M, K; lda) @ the panels P (N a multiple of NR but for the last panel);
 * add = 0 overwrites C. */
static void packed_gemm(int64_t M, int64_t N, int64_t K, const float *A, int64_t lda, const float *P, float *C,
                        int64_t ldc, int add) {
    for (int64_t p = 0; p * NR < N; ++p) {
        const int64_t nc = N - p * NR < NR ? N - p * NR : NR;
        for (int64_t m = 0, mr; m < M; m += mr) {
            mr = tile_rows(m, M);
            tiles[mr](K, A + m * lda, lda, P + p * K * NR, C + m * ldc + p * NR, ldc, nc, add);
        }
    }
}

/* C (M, N) = A (M, K) @ B, B packed by pack_panels. The panels are split over nt threads (or the
 * rows, when there are fewer panels than threads); each thread walks its rows in chunks of about
 * 256 KB of A, which stay in L2 while every panel passes over them. */
void parallel_packed_gemm(int nt, int64_t M, int64_t N, int64_t K, const float *A, int64_t lda, const float *P,
                          float *C, int64_t ldc) {
    const int64_t panels = (N + NR - 1) / NR;
    int64_t chunk = (256 * 1024 / (int64_t)sizeof(float)) / (K > 0 ? K : 1);
    chunk = chunk < MR ? MR : chunk / MR * MR;
    _Pragma("omp parallel num_threads(nt)") {
        const int k = omp_get_thread_num(), n = omp_get_num_threads();
        const int by_rows = panels < n;
        const int64_t p0 = by_rows ? 0 : panels * k / n, p1 = by_rows ? panels : panels * (k + 1) / n;
        const int64_t m0 = by_rows ? M * k / n : 0, m1 = by_rows ? M * (k + 1) / n : M;
        const int64_t n0 = p0 * NR, n1 = p1 * NR < N ? p1 * NR : N;
        for (int64_t m = m0; m < m1 && n0 < n1; m += chunk) {
            const int64_t rows = m1 - m < chunk ? m1 - m : chunk;
            packed_gemm(rows, n1 - n0, K, A + m * lda, lda, P + p0 * K * NR, C + m * ldc + n0, ldc, 0);
        }
    }
}

/* One step's GEMM on a thread's columns [col, col + N) of the weights W (K, ldw), packed as panels
 * (float32; col a multiple of NR) or plain (float64, through the BLAS). */
static void step_gemm_f32(const blas_t *blas, int64_t M, int64_t N, int64_t K, const float *A, int64_t lda,
                          const float *W, int64_t col, int64_t ldw, float *C, int64_t ldc) {
    (void)blas;
    (void)ldw;
    packed_gemm(M, N, K, A, lda, W + (col / NR) * K * NR, C + col, ldc, 1);
}

static void step_gemm_f64(const blas_t *blas, int64_t M, int64_t N, int64_t K, const double *A, int64_t lda,
                          const double *W, int64_t col, int64_t ldw, double *C, int64_t ldc) {
    blas_f64(blas, 0, 0, M, N, K, A, lda, W + col, ldw, 1.0, C + col, ldc);
}

/* ---- Activations. float32: vectorizable, no libm call inside the loops (build with
 * -fno-trapping-math so the selects stay branch-free): exp by Cody-Waite range reduction and
 * Cephes' degree-6 polynomial (about 1 ulp on the clamped range, which keeps 2^n a normal float),
 * sigmoid from it, tanh from it outside |x| < 0.625 and Cephes' odd polynomial inside (no
 * cancellation near 0). float64: libm. */
static inline float exp_f32(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    const float n = floorf(x * 1.44269504088896341f + 0.5f);
    const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

static inline float sigmoid_f32(float x) { return 1.0f / (1.0f + exp_f32(-x)); }

static inline float tanh_f32(float x) {
    const float z = x * x;
    const float small =
        ((((-5.70498872745e-3f * z + 2.06390887954e-2f) * z - 5.37397155531e-2f) * z + 1.33314422036e-1f) * z -
         3.33332819422e-1f) * z * x + x;
    const float large = 1.0f - 2.0f / (exp_f32(2.0f * x) + 1.0f);
    return fabsf(x) < 0.625f ? small : large;
}

static inline double sigmoid_f64(double x) { return 1.0 / (1.0 + exp(-x)); }
static inline double tanh_f64(double x) { return tanh(x); }

/* ---- The cell on n units of one row. g: the row's run of 4n gate columns (i, f, g, o),
 * pre-activations in, activations out; c: the cell state, in and out; h, y: the new state and the
 * emitted output; tc: tanh(c_t). Its derivative: g the activations, cp c_{t-1}, tc tanh(c_t), dy
 * the output's gradient, dh and dc the state's; out: d the pre-activations' gradients, dc that of
 * c_{t-1}, and dh zeroed for the GEMM to fill with that of h_{t-1}. */
#define CELL(R, S)                                                                                          \
    static void cell_forward_##S(int64_t n, R *restrict g, const R *restrict bias, R *restrict c,          \
                                 R *restrict h, R *restrict y, R *restrict tc) {                            \
        _Pragma("omp simd") for (int64_t j = 0; j < n; ++j) {                                               \
            const R i = sigmoid_##S(g[j] + bias[j]), f = sigmoid_##S(g[n + j] + bias[n + j]);               \
            const R gg = tanh_##S(g[2 * n + j] + bias[2 * n + j]), o = sigmoid_##S(g[3 * n + j] + bias[3 * n + j]); \
            const R cn = f * c[j] + i * gg, th = tanh_##S(cn), hn = o * th;                                 \
            g[j] = i;                                                                                       \
            g[n + j] = f;                                                                                   \
            g[2 * n + j] = gg;                                                                              \
            g[3 * n + j] = o;                                                                               \
            c[j] = cn;                                                                                      \
            h[j] = hn;                                                                                      \
            y[j] = hn;                                                                                      \
            tc[j] = th;                                                                                     \
        }                                                                                                   \
    }                                                                                                       \
    static void cell_backward_##S(int64_t n, const R *restrict g, const R *restrict cp,                    \
                                  const R *restrict tc, const R *restrict dy, R *restrict dh,              \
                                  R *restrict dc, R *restrict d, R *restrict db) {                          \
        _Pragma("omp simd") for (int64_t j = 0; j < n; ++j) {                                               \
            const R i = g[j], f = g[n + j], gg = g[2 * n + j], o = g[3 * n + j], th = tc[j];                \
            const R dhj = dh[j] + dy[j];                                                                    \
            const R dcj = dc[j] + dhj * o * ((R)1 - th * th);                                               \
            const R di = dcj * gg * i * ((R)1 - i), df = dcj * cp[j] * f * ((R)1 - f);                      \
            const R dg = dcj * i * ((R)1 - gg * gg), dO = dhj * th * o * ((R)1 - o);                        \
            d[j] = di;                                                                                      \
            d[n + j] = df;                                                                                  \
            d[2 * n + j] = dg;                                                                              \
            d[3 * n + j] = dO;                                                                              \
            db[j] += di;                                                                                    \
            db[n + j] += df;                                                                                \
            db[2 * n + j] += dg;                                                                            \
            db[3 * n + j] += dO;                                                                            \
            dc[j] = dcj * f;                                                                                \
            dh[j] = 0;                                                                                      \
        }                                                                                                   \
    }

CELL(float, f32)
CELL(double, f64)

/* ---- The time loops.
 * Forward. G (T, B, 4H): projections in, activations out (blocked order); w_hh_t: W_hh^T (H, 4H) in
 * blocked column order (float32: packed by pack_panels); h, c (B, H): the initial state in, the
 * final one out; hbuf (2, B, H): scratch; y (T, B, H); tc (T, B, H): tanh(c_t) of each step
 * (scratch when not recording); hp, cp (T, B, H): h_{t-1} and c_{t-1} of each step, or NULL.
 * Backward. G, cp, tc: the forward's records; dy (T, B, H), zeros where the output has no gradient;
 * w_hh: W_hh (4H, H), rows in blocked order (float32: packed); dh, dc (B, H): gradients of the final
 * state in, of the initial state out; dG (T, B, 4H): gradients of the gate pre-activations out
 * (blocked order; 0 on inactive rows, whose dh and dc pass through to the step before). */
#define LOOPS(R, S)                                                                                         \
    void lstm_forward_##S(const blas_t *blas, int nt, const int64_t *split, int64_t T, int64_t B, int64_t H, \
                          const int64_t *lens, int reverse, R *G, const R *bias, const R *w_hh_t, R *h, R *c, \
                          R *hbuf, R *y,                                                                    \
                          R *tc, R *hp, R *cp) {                                                            \
        const int64_t H4 = 4 * H;                                                                           \
        memcpy(hbuf, h, (size_t)(B * H) * sizeof(R));                                                       \
        const int old = blas_single(blas);                                                                  \
        _Pragma("omp parallel num_threads(nt)") {                                                           \
            const int k = omp_get_thread_num();                                                             \
            const int64_t s = split[k], n = split[k + 1] - split[k];                                        \
            for (int64_t step = 0; step < T; ++step) {                                                      \
                const int64_t t = reverse ? T - 1 - step : step;                                            \
                const R *h_prev = hbuf + (step % 2) * B * H;                                                \
                R *h_next = hbuf + ((step + 1) % 2) * B * H, *g_t = G + t * B * H4;                         \
                step_gemm_##S(blas, B, 4 * n, H, h_prev, H, w_hh_t, 4 * s, H4, g_t, H4);                    \
                for (int64_t b = 0; b < B; ++b) {                                                           \
                    const int64_t r = (t * B + b) * H + s, u = b * H + s;                                   \
                    if (hp != NULL) {                                                                       \
                        memcpy(hp + r, h_prev + u, (size_t)n * sizeof(R));                                  \
                        memcpy(cp + r, c + u, (size_t)n * sizeof(R));                                       \
                    }                                                                                       \
                    if (lens != NULL && t >= lens[b]) { /* padded: the state stays, the output is 0 */      \
                        memcpy(h_next + u, h_prev + u, (size_t)n * sizeof(R));                              \
                        memset(y + r, 0, (size_t)n * sizeof(R));                                            \
                        memset(tc + r, 0, (size_t)n * sizeof(R));                                           \
                        continue;                                                                           \
                    }                                                                                       \
                    cell_forward_##S(n, g_t + b * H4 + 4 * s, bias + 4 * s, c + u, h_next + u, y + r, tc + r);            \
                }                                                                                           \
                _Pragma("omp barrier")                                                                      \
            }                                                                                               \
        }                                                                                                   \
        blas_restore(blas, old);                                                                            \
        memcpy(h, hbuf + (T % 2) * B * H, (size_t)(B * H) * sizeof(R));                                     \
    }                                                                                                       \
    void lstm_backward_##S(const blas_t *blas, int nt, const int64_t *split, int64_t T, int64_t B, int64_t H, \
                           const int64_t *lens, int reverse, const R *G, const R *cp, const R *tc, const R *dy, \
                           const R *w_hh, R *dh, R *dc, R *dG, R *db) {                                     \
        const int64_t H4 = 4 * H;                                                                           \
        const int old = blas_single(blas);                                                                  \
        _Pragma("omp parallel num_threads(nt)") {                                                           \
            const int k = omp_get_thread_num();                                                             \
            const int64_t s = split[k], n = split[k + 1] - split[k];                                        \
            for (int64_t step = T - 1; step >= 0; --step) {                                                 \
                const int64_t t = reverse ? T - 1 - step : step;                                            \
                R *dg_t = dG + t * B * H4;                                                                  \
                for (int64_t b = 0; b < B; ++b) {                                                           \
                    const int64_t r = (t * B + b) * H + s, u = b * H + s, q = b * H4 + 4 * s;               \
                    if (lens != NULL && t >= lens[b]) {                                                     \
                        memset(dg_t + q, 0, (size_t)(4 * n) * sizeof(R));                                   \
                        continue;                                                                           \
                    }                                                                                       \
                    cell_backward_##S(n, G + t * B * H4 + q, cp + r, tc + r, dy + r, dh + u, dc + u, dg_t + q,    \
                                      db + 4 * s);                                                          \
                }                                                                                           \
                _Pragma("omp barrier")                                                                      \
                step_gemm_##S(blas, B, n, H4, dg_t, H4, w_hh, s, H, dh, H);                                 \
            }                                                                                               \
        }                                                                                                   \
        blas_restore(blas, old);                                                                            \
    }

LOOPS(float, f32)
LOOPS(double, f64)
