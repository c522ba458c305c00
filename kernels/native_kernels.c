/* C kernels of the `native` dispatch backend (CPU): kernels/native_backend.py compiles this file
 * on first use (cc -O3 -march=native -shared) and calls it through ctypes with raw pointers to
 * contiguous tensors, so no torch headers and no build step are involved.
 *
 * Why not torch ops: on the 2-core development machine a row gather (index_select) runs at about
 * 70% of a copy of the same bytes. Two things cost it: the destination lines are read before they
 * are written (read-for-ownership), and each 4 KiB row starts a new page, so the hardware
 * prefetcher restarts per row. Here permute walks the kept assignments in request order, reading
 * token rows nearly in sequence and writing each to its buffer row with non-temporal stores
 * (no read-for-ownership; the caller enables them only for buffers larger than the cache).
 *
 * Every function splits its rows over `threads` POSIX threads (the caller passes torch's thread
 * count) and returns nothing: the caller has checked every index against the tensors' shapes
 * (a Dispatch is validated when it is built).
 *
 * Shape letters: T tokens, D hidden, N kept assignments, M buffer rows.
 */
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX__)
#include <immintrin.h>
#define MOE_STREAM 1
#endif

#define MOE_MAX_THREADS 256

/* ---- threads ---------------------------------------------------------------------------- */

typedef void (*range_fn)(const void *args, int64_t lo, int64_t hi);

typedef struct {
  range_fn fn;
  const void *args;
  int64_t lo, hi;
} part_t;

static void *run_part(void *p) {
  const part_t *part = (const part_t *)p;
  part->fn(part->args, part->lo, part->hi);
#ifdef MOE_STREAM
  _mm_sfence(); /* streaming stores are weakly ordered: publish them before the join */
#endif
  return NULL;
}

/* fn(args, lo, hi) over [0, n) in `threads` contiguous parts; part 0 runs on the caller. */
static void parallel(range_fn fn, const void *args, int64_t n, int threads) {
  pthread_t th[MOE_MAX_THREADS];
  part_t parts[MOE_MAX_THREADS];
  int started[MOE_MAX_THREADS];
  if (threads > MOE_MAX_THREADS) threads = MOE_MAX_THREADS;
  if (threads > n) threads = (int)n;
  if (threads < 1) threads = 1;
  for (int i = 0; i < threads; ++i) {
    parts[i].fn = fn;
    parts[i].args = args;
    parts[i].lo = n * i / threads;
    parts[i].hi = n * (i + 1) / threads;
    started[i] = i > 0 && pthread_create(&th[i], NULL, run_part, &parts[i]) == 0;
  }
  run_part(&parts[0]);
  for (int i = 1; i < threads; ++i) {
    if (started[i])
      pthread_join(th[i], NULL);
    else
      run_part(&parts[i]); /* no thread could be started: run that part here */
  }
}

/* ---- rows ------------------------------------------------------------------------------- */

/* Copy `bytes` bytes; stream: non-temporal 32-byte stores (dst 32-byte aligned, bytes % 32 == 0). */
static inline void put_bytes(char *dst, const char *src, int64_t bytes, int stream) {
#ifdef MOE_STREAM
  if (stream) {
    for (int64_t j = 0; j < bytes; j += 32)
      _mm256_stream_si256((__m256i *)(dst + j), _mm256_loadu_si256((const __m256i *)(src + j)));
    return;
  }
#endif
  (void)stream;
  memcpy(dst, src, (size_t)bytes);
}

static inline void zero_bytes(char *dst, int64_t bytes, int stream) {
#ifdef MOE_STREAM
  if (stream) {
    const __m256i z = _mm256_setzero_si256();
    for (int64_t j = 0; j < bytes; j += 32) _mm256_stream_si256((__m256i *)(dst + j), z);
    return;
  }
#endif
  (void)stream;
  memset(dst, 0, (size_t)bytes);
}

/* 1 when streaming stores may be used for rows of `bytes` bytes starting at `base`. */
static int can_stream(const void *base, int64_t bytes) {
#ifdef MOE_STREAM
  return ((uintptr_t)base % 32 == 0) && bytes % 32 == 0;
#else
  (void)base;
  (void)bytes;
  return 0;
#endif
}

/* ---- positions: each request's rank among the earlier requests to its expert --------------- */

/* rank_R[i] = number of j < i with expert_R[j] == expert_R[i]; counts_E[e] = requests to e.
 * One pass in priority order (a counting rank, no sort); ids are checked by the caller. */
void moe_positions(const int64_t *expert_R, int64_t r, int64_t e, int64_t *rank_R, int64_t *counts_E) {
  memset(counts_E, 0, (size_t)e * sizeof(int64_t));
  for (int64_t i = 0; i < r; ++i) rank_R[i] = counts_E[expert_R[i]]++;
}

/* ---- permute: dst[dst_row[i]] = src[src_row[i]] ------------------------------------------ */

typedef struct {
  char *dst;
  const char *src;
  const int64_t *src_row, *dst_row;
  int64_t bytes;
  int stream;
} scatter_args;

static void scatter_range(const void *a, int64_t lo, int64_t hi) {
  const scatter_args *s = (const scatter_args *)a;
  for (int64_t i = lo; i < hi; ++i)
    put_bytes(s->dst + s->dst_row[i] * s->bytes, s->src + s->src_row[i] * s->bytes, s->bytes, s->stream);
}

/* Row i of the n pairs copies src row src_row[i] to dst row dst_row[i] (rows of row_bytes bytes).
 * dst_row must not repeat (threads write disjoint rows). */
void moe_scatter_rows(void *dst, const void *src, const int64_t *src_row, const int64_t *dst_row, int64_t n,
                      int64_t row_bytes, int threads, int stream) {
  scatter_args s = {(char *)dst, (const char *)src, src_row, dst_row, row_bytes,
                    stream && can_stream(dst, row_bytes)};
  parallel(scatter_range, &s, n, threads);
}

/* ---- combine: out[t] = sum over t's kept assignments, in priority order, of w * y[row] ------- */

/* Token-major lists by a stable counting sort of token_N: token t's assignments are entries
 * ptr[t] .. ptr[t+1]-1 of rows (their row_N) and w (their w_N), in ascending index, i.e.
 * priority, order. ptr has t + 1 entries. */
void moe_csr_by_token(const int64_t *token_N, const int64_t *row_N, const float *w_N, int64_t n, int64_t t,
                      int64_t *ptr, int64_t *rows, float *w) {
  memset(ptr, 0, (size_t)(t + 1) * sizeof(int64_t));
  for (int64_t i = 0; i < n; ++i) ptr[token_N[i] + 1] += 1;
  for (int64_t i = 0; i < t; ++i) ptr[i + 1] += ptr[i];
  /* ptr[tok] is token tok's next free entry; afterwards it is its end, i.e. the next one's start. */
  for (int64_t i = 0; i < n; ++i) {
    int64_t at = ptr[token_N[i]]++;
    rows[at] = row_N[i];
    w[at] = w_N[i];
  }
  memmove(ptr + 1, ptr, (size_t)t * sizeof(int64_t));
  ptr[0] = 0;
}

typedef struct {
  float *out;
  const float *y;
  const int64_t *ptr, *rows;
  const float *w;
  int64_t d;
  int stream;
} gsum_args;

typedef float v8f __attribute__((vector_size(32))); /* GCC/clang vector extension, any target */

static inline v8f load8(const float *p) {
  v8f v;
  memcpy(&v, p, sizeof v);
  return v;
}

static inline void put8(float *dst, v8f v, int stream) {
#ifdef MOE_STREAM
  if (stream) {
    _mm256_stream_ps(dst, (__m256)v);
    return;
  }
#endif
  (void)stream;
  memcpy(dst, &v, sizeof v);
}

/* Rows of one token summed per pass; a token with more kept rows takes more passes. */
#define MOE_GROUP 16

/* o[0:d] (+)= sum of w[q] * rows[q][0:d] for q < cnt; first: write, else add to o. */
static inline void gsum_token(float *restrict o, const float *const *restrict rows, const float *restrict w,
                              int64_t cnt, int64_t d, int first, int stream) {
  const int64_t d8 = d - d % 8;
  for (int64_t j = 0; j < d8; j += 8) {
    v8f acc = first ? w[0] * load8(rows[0] + j) : load8(o + j) + w[0] * load8(rows[0] + j);
    for (int64_t q = 1; q < cnt; ++q) acc += w[q] * load8(rows[q] + j);
    put8(o + j, acc, stream);
  }
  for (int64_t j = d8; j < d; ++j) {
    float acc = first ? w[0] * rows[0][j] : o[j] + w[0] * rows[0][j];
    for (int64_t q = 1; q < cnt; ++q) acc += w[q] * rows[q][j];
    o[j] = acc;
  }
}

static void gsum_range(const void *a, int64_t lo, int64_t hi) {
  const gsum_args *g = (const gsum_args *)a;
  const int64_t d = g->d;
  const float *rows[MOE_GROUP];
  float w[MOE_GROUP];
  for (int64_t t = lo; t < hi; ++t) {
    float *o = g->out + t * d;
    const int64_t b = g->ptr[t], e = g->ptr[t + 1];
    if (b == e) {
      zero_bytes((char *)o, d * (int64_t)sizeof(float), g->stream);
      continue;
    }
    /* Pointers and gates in locals: the compiler cannot keep them in registers across stores
     * through o otherwise (o might alias the index arrays, as far as it knows). */
    for (int64_t q0 = b; q0 < e; q0 += MOE_GROUP) {
      const int64_t cnt = e - q0 < MOE_GROUP ? e - q0 : MOE_GROUP;
      for (int64_t q = 0; q < cnt; ++q) {
        rows[q] = g->y + g->rows[q0 + q] * d;
        w[q] = g->w[q0 + q];
      }
      /* The order of the sum is priority order: later groups add to what earlier ones wrote. */
      gsum_token(o, rows, w, cnt, d, q0 == b, g->stream && e - b <= MOE_GROUP);
    }
  }
}

/* out [t, d] float32 from y [*, d] float32 and the lists of moe_csr_by_token; a token without
 * kept assignments gets zeros. Products and sums in float32, in priority order (no FMA: the
 * file is compiled with -ffp-contract=off), as torch's embedding_bag with per-sample weights. */
void moe_gather_sum_f32(float *out, const float *y, const int64_t *ptr, const int64_t *rows, const float *w,
                        int64_t t, int64_t d, int threads, int stream) {
  gsum_args g = {out, y, ptr, rows, w, d, stream && can_stream(out, d * (int64_t)sizeof(float))};
  parallel(gsum_range, &g, t, threads);
}
