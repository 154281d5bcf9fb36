// Sparse causal attention, forward, on the CPU: one compiled pass for the whole pattern of
// `reference.sparse_attention_reference` (causal, a full forward: as many queries as keys).
//
// A row i's keys are three disjoint parts, folded into one online softmax per row (running max m, sum l,
// unnormalised output acc):
//   band    i - w < j <= i            tiles of QT consecutive queries against the keys of their band;
//   sinks   j < s and j <= i - w      the same tiles against the first s keys;
//   routed  s <= j <= i - w, key j kept and valid, in query i's bucket, query i kept:
//           per (batch, query head) the eligible keys are counting-sorted by (bucket, position) and gathered,
//           the eligible queries likewise; a block of <= QT sorted queries of one bucket sees one prefix of
//           its bucket's sorted keys, each query the part of it w before its own position.
//           One task per (batch, query head, bucket), its keys gathered once.
// Scores and p v come from register-blocked micro-kernels (QR = 8 query rows x 32 keys, or x 32 output
// columns; keys transposed so the inner loop runs over keys without a horizontal sum; float through GCC vector
// types so the accumulators stay in registers), over only the 32-key blocks some of the 8 rows sees. exp in
// float is a Cephes-style polynomial the compiler vectorises; double uses std::exp and plain loops (the path
// the tests compare with the reference at 1e-12). The tile sizes were chosen by timing 1,024 and 4,096 tokens
// of SmolLM2's attention shape on 2 cores (QT 16..64, QR 4..16, 16 or 32 keys, 32 or 64 columns).
// Also the angular LSH of `reference.lsh_buckets`, so routing does not cost more than the attention.
// Outputs: o [B, H, T, Dv] normalised (a row with no key at all: 0) and lse [B, H, T] (no key: NEG).
// Threads: OpenMP; linked by soname against the libgomp PyTorch has loaded, so both share one pool.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include <omp.h>

namespace {

constexpr int QT = 32;   // query rows per tile / routed block
constexpr int QR = 8;    // query rows per micro-kernel call
constexpr int KB = 32;   // keys per micro-kernel call
constexpr int KC = 256;  // keys per chunk (online-softmax step)
constexpr int EW = 32;   // output columns per micro-kernel call
constexpr double NEG = -1e30;

inline float fexp(float x) {
  // exp(x) for x <= 0 (callers subtract the row max); 0 below -87
  const float xc = std::max(x, -87.0f);
  const float tt = xc * 1.44269504088896341f + 12582912.0f;  // round to nearest: 1.5 * 2^23
  const float n = tt - 12582912.0f;
  const float r = xc - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  const float scale = __builtin_bit_cast(float, bits);
  return x < -87.0f ? 0.0f : y * scale;
}

inline double fexp(double x) { return std::exp(x); }

// s[rr * KC + jj] = sum_c q[rr * d + c] * kT[c * ldk + jj], QR rows x KB keys
template <typename T>
inline void scores_block(const T* q, int d, const T* kT, int64_t ldk, T* s) {
  T a[QR][KB] = {};
  for (int c = 0; c < d; ++c) {
    const T* kr = kT + c * ldk;
    for (int rr = 0; rr < QR; ++rr)
      for (int jj = 0; jj < KB; ++jj) a[rr][jj] += q[rr * d + c] * kr[jj];
  }
  for (int rr = 0; rr < QR; ++rr) std::memcpy(s + rr * KC, a[rr], sizeof(a[rr]));
}

// a[rr][e] = sum_{b0 <= jj < b1} p[rr * ps + jj] * v[jj * ldv + e], QR rows x ne (<= EW) columns
template <typename T>
inline void pv_block(const T* p, int ps, int b0, int b1, const T* v, int ldv, int ne, T (*a)[EW]) {
  for (int rr = 0; rr < QR; ++rr)
    for (int e = 0; e < EW; ++e) a[rr][e] = T(0);
  for (int jj = b0; jj < b1; ++jj)
    for (int rr = 0; rr < QR; ++rr)
      for (int e = 0; e < ne; ++e) a[rr][e] += p[rr * ps + jj] * v[jj * ldv + e];
}

// float: GCC vector types (16 lanes: one AVX-512 register, two AVX2 ones), so the accumulators stay in registers
typedef float V16 __attribute__((vector_size(64)));
static_assert(KB == 32 && EW == 32, "the float micro-kernels hold 2 x 16 columns");

inline V16 load16(const float* x) {
  V16 r;
  std::memcpy(&r, x, sizeof(r));
  return r;
}

template <>
inline void scores_block<float>(const float* q, int d, const float* kT, int64_t ldk, float* s) {
  V16 a[QR][2] = {};
  for (int c = 0; c < d; ++c) {
    const V16 k0 = load16(kT + c * ldk), k1 = load16(kT + c * ldk + 16);
#pragma GCC unroll 16
    for (int rr = 0; rr < QR; ++rr) {
      const float qv = q[rr * d + c];
      a[rr][0] += qv * k0;
      a[rr][1] += qv * k1;
    }
  }
  for (int rr = 0; rr < QR; ++rr) std::memcpy(s + rr * KC, a[rr], sizeof(a[rr]));
}

template <>
inline void pv_block<float>(const float* p, int ps, int b0, int b1, const float* v, int ldv, int ne,
                            float (*a)[EW]) {
  if (ne < EW) {
    for (int rr = 0; rr < QR; ++rr)
      for (int e = 0; e < EW; ++e) a[rr][e] = 0.0f;
    for (int jj = b0; jj < b1; ++jj)
      for (int rr = 0; rr < QR; ++rr)
        for (int e = 0; e < ne; ++e) a[rr][e] += p[rr * ps + jj] * v[jj * ldv + e];
    return;
  }
  V16 acc[QR][2] = {};
  for (int jj = b0; jj < b1; ++jj) {
    const V16 v0 = load16(v + jj * ldv), v1 = load16(v + jj * ldv + 16);
#pragma GCC unroll 16
    for (int rr = 0; rr < QR; ++rr) {
      const float pv = p[rr * ps + jj];
      acc[rr][0] += pv * v0;
      acc[rr][1] += pv * v1;
    }
  }
  for (int rr = 0; rr < QR; ++rr) std::memcpy(a[rr], acc[rr], sizeof(acc[rr]));
}

// the keys [b0, b1) that some of rows r0 .. r0 + nr - 1 see (row r sees [a0[r], a1[r])); b1 <= b0: none
inline void rows_keys(const int* a0, const int* a1, int r0, int nr, int nc, int& b0, int& b1) {
  b0 = nc;
  b1 = 0;
  for (int rr = 0; rr < nr; ++rr)
    if (a1[r0 + rr] > a0[r0 + rr]) {
      b0 = std::min(b0, a0[r0 + rr]);
      b1 = std::max(b1, a1[r0 + rr]);
    }
}

// Fold keys [j0, j0 + n) into the running state of nq (<= QT) query rows.
// qs: [QT][d] scaled queries (rows >= nq zero); kT: key c of column j at kT[c * ldk + j], readable up to
// column j0 + n + KB; v: row j at v[j * dv]; row r may see keys lo[r] <= j < hi[r]; bias: per key or null.
// m, l: [QT]; acc: [QT][dv]; s: scratch [QT][KC].
template <typename T>
void attend(const T* qs, int nq, int d, const T* kT, int64_t ldk, const T* v, int dv, int64_t j0, int64_t n,
            const int64_t* lo, const int64_t* hi, const T* bias, T* m, T* l, T* acc, T* s) {
  for (int64_t c0 = 0; c0 < n; c0 += KC) {
    const int64_t jb = j0 + c0;
    const int nc = static_cast<int>(std::min<int64_t>(KC, n - c0));
    int a0[QT], a1[QT];
    for (int r = 0; r < nq; ++r) {
      a0[r] = static_cast<int>(std::clamp<int64_t>(lo[r] - jb, 0, nc));
      a1[r] = static_cast<int>(std::clamp<int64_t>(hi[r] - jb, 0, nc));
    }
    // scores of QR rows x KB keys at a time, over the key blocks some row of the QR rows sees
    for (int r0 = 0; r0 < nq; r0 += QR) {
      const int nr = std::min(QR, nq - r0);
      int b0, b1;
      rows_keys(a0, a1, r0, nr, nc, b0, b1);
      for (int k0 = b0 / KB * KB; k0 < b1; k0 += KB) {
        scores_block(qs + r0 * d, d, kT + jb + k0, ldk, s + r0 * KC + k0);
      }
    }
    // mask, online softmax: s row r becomes p on [a0, a1), the state is rescaled by alpha
    T alpha[QT];
    for (int r = 0; r < nq; ++r) {
      alpha[r] = T(1);
      const int x0 = a0[r], x1 = a1[r];
      if (x1 <= x0) continue;
      T* sr = s + r * KC;
      if (bias) {
        const T* bb = bias + jb;
        for (int jj = x0; jj < x1; ++jj) sr[jj] += bb[jj];
      }
      T mx = static_cast<T>(NEG);
#pragma omp simd reduction(max : mx)
      for (int jj = x0; jj < x1; ++jj) mx = std::max(mx, sr[jj]);
      const T mnew = std::max(m[r], mx);
      if (mnew <= static_cast<T>(NEG / 2)) {  // only masked (padding) keys so far
        a1[r] = a0[r];
        continue;
      }
      T sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int jj = x0; jj < x1; ++jj) {
        const T x = sr[jj];
        const T p = x <= static_cast<T>(NEG / 2) ? T(0) : fexp(x - mnew);
        sr[jj] = p;
        sum += p;
      }
      alpha[r] = fexp(m[r] - mnew);
      m[r] = mnew;
      l[r] = l[r] * alpha[r] + sum;
    }
    // acc = alpha acc + p v, QR rows x EW columns at a time, over the keys some of the rows sees
    for (int r0 = 0; r0 < nq; r0 += QR) {
      const int nr = std::min(QR, nq - r0);
      int b0, b1;
      rows_keys(a0, a1, r0, nr, nc, b0, b1);
      if (b1 <= b0) continue;
      T pr[QR][KC];  // p of the rows, 0 outside each row's keys
      for (int rr = 0; rr < QR; ++rr) {
        const int r = r0 + rr;
        const int x0 = rr < nr ? a0[r] : 0, x1 = rr < nr ? a1[r] : 0;
        for (int jj = b0; jj < b1; ++jj) pr[rr][jj] = (jj >= x0 && jj < x1) ? s[r * KC + jj] : T(0);
      }
      for (int e0 = 0; e0 < dv; e0 += EW) {
        const int ne = std::min(EW, dv - e0);
        T a[QR][EW];
        pv_block(&pr[0][0], KC, b0, b1, v + jb * dv + e0, dv, ne, a);
        for (int rr = 0; rr < nr; ++rr) {
          T* ar = acc + static_cast<int64_t>(r0 + rr) * dv + e0;
          const T al = alpha[r0 + rr];
          for (int e = 0; e < ne; ++e) ar[e] = ar[e] * al + a[rr][e];
        }
      }
    }
  }
}

// The pattern and shapes of one call. Buckets and keep masks are per query head [B, H, t] (null: one bucket,
// all kept); kvalid [B, t] (null: no padding).
struct Problem {
  const int64_t *qb, *kb;
  const uint8_t *qkeep, *kkeep, *kvalid;
  int64_t B, H, HK, t;
  int d, dv;
  int64_t w, s;
  int threads;
  int64_t kv(int64_t bh) const { return (bh / H) * HK + (bh % H) / (H / HK); }
  bool key_routed(int64_t bh, int64_t j) const {
    return j >= s && (!kvalid || kvalid[(bh / H) * t + j]) && (!kkeep || kkeep[bh * t + j]);
  }
  bool query_routed(int64_t bh, int64_t i) const { return i >= s + w && (!qkeep || qkeep[bh * t + i]); }
};

// x [heads][t][n] -> [heads][n][t + KB] (KB zero columns after, read by the micro-kernels' last block)
template <typename T>
std::vector<T> transposed(const T* x, int64_t heads, int64_t t, int n, int threads) {
  const int64_t ld = t + KB;
  std::vector<T> out(static_cast<size_t>(heads) * n * ld, T(0));
#pragma omp parallel for collapse(2) num_threads(threads) schedule(static)
  for (int64_t hh = 0; hh < heads; ++hh)
    for (int c = 0; c < n; ++c) {
      const T* src = x + hh * t * n + c;
      T* dst = out.data() + (hh * n + c) * ld;
      for (int64_t j = 0; j < t; ++j) dst[j] = src[j * n];
    }
  return out;
}

// per key of each batch row: 0 or NEG (padding), [B][t + KB]; empty when no key is padding
template <typename T>
std::vector<T> key_bias(const Problem& P) {
  std::vector<T> bias;
  if (!P.kvalid) return bias;
  bool padded = false;
  for (int64_t i = 0; i < P.B * P.t; ++i) padded |= !P.kvalid[i];
  if (!padded) return bias;
  bias.assign(P.B * (P.t + KB), static_cast<T>(NEG));
  for (int64_t b = 0; b < P.B; ++b)
    for (int64_t j = 0; j < P.t; ++j) bias[b * (P.t + KB) + j] = P.kvalid[b * P.t + j] ? T(0) : static_cast<T>(NEG);
  return bias;
}

// a tile's rows i0 + r: the sinks they see beyond their band (j < s, j <= i - w) and their band (i - w < j <= i);
// returns the end of the keys the sink rows read
inline int64_t sink_rows(int64_t i0, int nq, int64_t w, int64_t s, int64_t* lo, int64_t* hi) {
  for (int r = 0; r < nq; ++r) {
    lo[r] = 0;
    hi[r] = std::min(s, std::max<int64_t>(0, i0 + r - w + 1));
  }
  return std::min(s, std::max<int64_t>(0, i0 + nq - w));
}

inline int64_t band_rows(int64_t i0, int nq, int64_t w, int64_t* lo, int64_t* hi) {
  for (int r = 0; r < nq; ++r) {
    lo[r] = std::max<int64_t>(0, i0 + r - w + 1);
    hi[r] = i0 + r + 1;
  }
  return std::max<int64_t>(0, i0 - w + 1);
}

// The routed part's order: per (batch, query head) the routed keys and queries counting-sorted by (bucket,
// position). Bucket x of row bh: keys spos[bh * t + koff[bh * (nb + 1) + x] ...], queries likewise.
struct Routing {
  int64_t nb = 1;
  std::vector<int64_t> koff, qoff, spos, qpos;
};

inline Routing route(const Problem& P) {
  Routing R;
  const int64_t BH = P.B * P.H, t = P.t;
  if (P.qb)
    for (int64_t i = 0; i < BH * t; ++i) R.nb = std::max(R.nb, std::max(P.qb[i], P.kb[i]) + 1);
  const int64_t nb = R.nb;
  R.koff.assign(BH * (nb + 1), 0);
  R.qoff.assign(BH * (nb + 1), 0);
  R.spos.resize(BH * t);
  R.qpos.resize(BH * t);
#pragma omp parallel for num_threads(P.threads) schedule(static)
  for (int64_t bh = 0; bh < BH; ++bh) {
    const int64_t* kbh = P.kb ? P.kb + bh * t : nullptr;
    const int64_t* qbh = P.qb ? P.qb + bh * t : nullptr;
    int64_t* ko = R.koff.data() + bh * (nb + 1);
    int64_t* qo = R.qoff.data() + bh * (nb + 1);
    for (int64_t j = 0; j < t; ++j) {
      if (P.key_routed(bh, j)) ++ko[(kbh ? kbh[j] : 0) + 1];
      if (P.query_routed(bh, j)) ++qo[(qbh ? qbh[j] : 0) + 1];
    }
    for (int64_t x = 0; x < nb; ++x) {
      ko[x + 1] += ko[x];
      qo[x + 1] += qo[x];
    }
    std::vector<int64_t> kf(ko, ko + nb), qf(qo, qo + nb);
    for (int64_t j = 0; j < t; ++j) {
      if (P.key_routed(bh, j)) R.spos[bh * t + kf[kbh ? kbh[j] : 0]++] = j;
      if (P.query_routed(bh, j)) R.qpos[bh * t + qf[qbh ? qbh[j] : 0]++] = j;
    }
  }
  return R;
}

// One routed task: bucket x of row bh. Its key positions (ascending) kp[0, nk) and query positions qp[a0, a1)
// (ascending); false when no query of it sees a key (its first key lies within w of its last query, or after).
struct Task {
  const int64_t *kp, *qp;
  int64_t nk, a0, a1;
};

inline bool routed_task(const Problem& P, const Routing& R, int64_t bh, int64_t x, Task& tk) {
  const int64_t* ko = R.koff.data() + bh * (R.nb + 1);
  const int64_t* qo = R.qoff.data() + bh * (R.nb + 1);
  tk.kp = R.spos.data() + bh * P.t + ko[x];
  tk.qp = R.qpos.data() + bh * P.t;
  tk.nk = ko[x + 1] - ko[x];
  tk.a0 = qo[x];
  tk.a1 = qo[x + 1];
  return tk.nk > 0 && tk.a1 > tk.a0 && tk.kp[0] <= tk.qp[tk.a1 - 1] - P.w;
}

// gather keys kp[0, nk) of x [t][n]: rows -> rows [nk][n] (if non-null), transposed -> [n][nk + KB] (if non-null)
template <typename T>
void gather(const T* x, const int64_t* kp, int64_t nk, int n, std::vector<T>* rows, std::vector<T>* cols) {
  if (rows) rows->resize(static_cast<size_t>(nk) * n);
  if (cols) cols->assign(static_cast<size_t>(n) * (nk + KB), T(0));
  for (int64_t a = 0; a < nk; ++a) {
    const T* src = x + kp[a] * n;
    if (rows) std::memcpy(rows->data() + a * n, src, sizeof(T) * n);
    if (cols)
      for (int c = 0; c < n; ++c) (*cols)[c * (nk + KB) + a] = src[c];
  }
}

template <typename T>
struct Scratch {
  std::vector<T> qs, m, l, acc, s;
  std::vector<int64_t> lo, hi, rows;
  Scratch(int d, int dv)
      : qs(QT * d), m(QT), l(QT), acc(QT * dv), s(QT * KC), lo(QT), hi(QT), rows(QT) {}
};

template <typename T>
int forward(const T* q, const T* k, const T* v, const Problem& P, double scale_d, T* o, T* lse) {
  const T scale = static_cast<T>(scale_d);
  const int64_t t = P.t, BH = P.B * P.H, ldk = t + KB;
  const int d = P.d, dv = P.dv;
  const std::vector<T> kT = transposed(k, P.B * P.HK, t, d, P.threads);
  const std::vector<T> bias = key_bias<T>(P);
  std::vector<T> mrow(BH * t, static_cast<T>(NEG)), lrow(BH * t, T(0));

  // band and sinks, tiles of QT consecutive queries
  const int64_t tiles = (t + QT - 1) / QT;
#pragma omp parallel num_threads(P.threads)
  {
    Scratch<T> sc(d, dv);
#pragma omp for collapse(2) schedule(dynamic, 4)
    for (int64_t bh = 0; bh < BH; ++bh)
      for (int64_t tile = 0; tile < tiles; ++tile) {
        const int64_t bk = P.kv(bh), i0 = tile * QT;
        const int nq = static_cast<int>(std::min(t, i0 + QT) - i0);
        std::fill(sc.qs.begin(), sc.qs.end(), T(0));
        for (int r = 0; r < nq; ++r)
          for (int c = 0; c < d; ++c) sc.qs[r * d + c] = q[(bh * t + i0 + r) * d + c] * scale;
        std::fill(sc.m.begin(), sc.m.end(), static_cast<T>(NEG));
        std::fill(sc.l.begin(), sc.l.end(), T(0));
        std::fill(sc.acc.begin(), sc.acc.end(), T(0));
        const T* kt = kT.data() + bk * d * ldk;
        const T* vv = v + bk * t * dv;
        const T* bb = bias.empty() ? nullptr : bias.data() + (bh / P.H) * (t + KB);
        const int64_t sink_hi = sink_rows(i0, nq, P.w, P.s, sc.lo.data(), sc.hi.data());
        if (sink_hi > 0)
          attend(sc.qs.data(), nq, d, kt, ldk, vv, dv, 0, sink_hi, sc.lo.data(), sc.hi.data(), bb, sc.m.data(),
                 sc.l.data(), sc.acc.data(), sc.s.data());
        const int64_t j0 = band_rows(i0, nq, P.w, sc.lo.data(), sc.hi.data());
        attend(sc.qs.data(), nq, d, kt, ldk, vv, dv, j0, i0 + nq - j0, sc.lo.data(), sc.hi.data(), bb, sc.m.data(),
               sc.l.data(), sc.acc.data(), sc.s.data());
        for (int r = 0; r < nq; ++r) {
          mrow[bh * t + i0 + r] = sc.m[r];
          lrow[bh * t + i0 + r] = sc.l[r];
          std::memcpy(o + (bh * t + i0 + r) * dv, sc.acc.data() + r * dv, sizeof(T) * dv);
        }
      }
  }

  // routed: one task per (batch, query head, bucket), its keys gathered once, its queries in blocks of <= QT
  if (t > P.w + P.s) {
    const Routing R = route(P);
#pragma omp parallel num_threads(P.threads)
    {
      Scratch<T> sc(d, dv);
      std::vector<T> kts, vs;
      Task tk;
#pragma omp for schedule(dynamic, 1)
      for (int64_t task = 0; task < BH * R.nb; ++task) {
        const int64_t bh = task / R.nb, bk = P.kv(bh);
        if (!routed_task(P, R, bh, task % R.nb, tk)) continue;
        gather(k + bk * t * d, tk.kp, tk.nk, d, static_cast<std::vector<T>*>(nullptr), &kts);
        gather(v + bk * t * dv, tk.kp, tk.nk, dv, &vs, static_cast<std::vector<T>*>(nullptr));
        for (int64_t a0 = tk.a0; a0 < tk.a1; a0 += QT) {
          const int nq = static_cast<int>(std::min<int64_t>(QT, tk.a1 - a0));
          std::fill(sc.qs.begin() + nq * d, sc.qs.end(), T(0));
          int64_t kmax = 0;
          for (int r = 0; r < nq; ++r) {
            const int64_t i = tk.qp[a0 + r], row = bh * t + i;
            sc.rows[r] = row;
            for (int c = 0; c < d; ++c) sc.qs[r * d + c] = q[row * d + c] * scale;
            sc.lo[r] = 0;
            sc.hi[r] = std::upper_bound(tk.kp, tk.kp + tk.nk, i - P.w) - tk.kp;
            kmax = std::max(kmax, sc.hi[r]);
            sc.m[r] = mrow[row];
            sc.l[r] = lrow[row];
            std::memcpy(sc.acc.data() + r * dv, o + row * dv, sizeof(T) * dv);
          }
          if (kmax == 0) continue;
          attend(sc.qs.data(), nq, d, kts.data(), tk.nk + KB, vs.data(), dv, 0, kmax, sc.lo.data(), sc.hi.data(),
                 static_cast<const T*>(nullptr), sc.m.data(), sc.l.data(), sc.acc.data(), sc.s.data());
          for (int r = 0; r < nq; ++r) {
            const int64_t row = sc.rows[r];
            mrow[row] = sc.m[r];
            lrow[row] = sc.l[r];
            std::memcpy(o + row * dv, sc.acc.data() + r * dv, sizeof(T) * dv);
          }
        }
      }
    }
  }

#pragma omp parallel for num_threads(P.threads) schedule(static)
  for (int64_t row = 0; row < BH * t; ++row) {
    T* orow = o + row * dv;
    if (lrow[row] > T(0)) {
      const T inv = T(1) / lrow[row];
      for (int e = 0; e < dv; ++e) orow[e] *= inv;
      lse[row] = mrow[row] + std::log(lrow[row]);
    } else {
      for (int e = 0; e < dv; ++e) orow[e] = T(0);
      lse[row] = static_cast<T>(NEG);
    }
  }
  return 0;
}

// Backward: the gradients of keys [j0, j0 + n) for nq (<= QT) rows, from recomputed scores and the forward's
// lse: p = exp(s - lse), ds = p (do v^T - di) with di = do . o;  dq += ds k (unscaled here), dk += ds^T qs,
// dv += p^T do. qs [QT][d] scaled queries and dos [QT][dv] (rows >= nq zero); kT / vT transposed keys / values
// (column j, leading dimensions ldk / ldv), krows: key j at krows[j * d]; row r may see lo[r] <= j < hi[r];
// dq [QT][d]; dk, dvv: key j at dk[j * d], dvv[j * dv].
template <typename T>
struct Grad {
  std::vector<T> qs, dos, dq, lse, di, s, p, dp, pt, dst;
  std::vector<int64_t> lo, hi, rows;
  Grad(int d, int dv)
      : qs(QT * d), dos(QT * dv), dq(QT * d), lse(QT), di(QT), s(QT * KC), p(QT * KC), dp(QT * KC),
        pt((KC + QR) * QT), dst((KC + QR) * QT), lo(QT), hi(QT), rows(QT) {}
};

template <typename T>
void attend_bwd(Grad<T>& g, int nq, int d, int dv, const T* kT, int64_t ldk, const T* krows, const T* vT,
                int64_t ldv, int64_t j0, int64_t n, const T* bias, T* dk, T* dvv) {
  for (int64_t c0 = 0; c0 < n; c0 += KC) {
    const int64_t jb = j0 + c0;
    const int nc = static_cast<int>(std::min<int64_t>(KC, n - c0));
    int a0[QT], a1[QT], k0, k1;
    for (int r = 0; r < nq; ++r) {
      a0[r] = static_cast<int>(std::clamp<int64_t>(g.lo[r] - jb, 0, nc));
      a1[r] = static_cast<int>(std::clamp<int64_t>(g.hi[r] - jb, 0, nc));
    }
    rows_keys(a0, a1, 0, nq, nc, k0, k1);
    if (k1 <= k0) continue;
    // scores and do v^T of the key blocks some row of each QR rows sees
    for (int r0 = 0; r0 < nq; r0 += QR) {
      int b0, b1;
      rows_keys(a0, a1, r0, std::min(QR, nq - r0), nc, b0, b1);
      for (int kb = b0 / KB * KB; kb < b1; kb += KB) {
        scores_block(g.qs.data() + r0 * d, d, kT + jb + kb, ldk, g.s.data() + r0 * KC + kb);
        scores_block(g.dos.data() + r0 * dv, dv, vT + jb + kb, ldv, g.dp.data() + r0 * KC + kb);
      }
    }
    // p and ds on each row's keys, 0 elsewhere (rows up to the next multiple of QR: 0)
    const int nqr = (nq + QR - 1) / QR * QR;
    for (int r = 0; r < nqr; ++r) {
      T* pr = g.p.data() + r * KC;
      T* sr = g.s.data() + r * KC;  // becomes ds
      const int x0 = r < nq ? a0[r] : 0, x1 = r < nq ? a1[r] : 0;
      const T lr = r < nq ? g.lse[r] : T(0), dr = r < nq ? g.di[r] : T(0);
      const T* dpr = g.dp.data() + r * KC;
      const T* bb = bias ? bias + jb : nullptr;
      for (int jj = 0; jj < nc; ++jj) {
        T pv = T(0);
        if (jj >= x0 && jj < x1 && (!bb || bb[jj] > static_cast<T>(NEG / 2))) pv = fexp(sr[jj] - lr);
        pr[jj] = pv;
        sr[jj] = pv * (dpr[jj] - dr);
      }
    }
    // dq += ds k over the keys each QR rows see
    for (int r0 = 0; r0 < nq; r0 += QR) {
      int b0, b1;
      rows_keys(a0, a1, r0, std::min(QR, nq - r0), nc, b0, b1);
      if (b1 <= b0) continue;
      for (int e0 = 0; e0 < d; e0 += EW) {
        const int ne = std::min(EW, d - e0);
        T a[QR][EW];
        pv_block(g.s.data() + r0 * KC, KC, b0, b1, krows + jb * d + e0, d, ne, a);
        for (int rr = 0; rr < QR; ++rr)
          for (int e = 0; e < ne; ++e) g.dq[(r0 + rr) * d + e0 + e] += a[rr][e];
      }
    }
    // dk += ds^T qs, dv += p^T do over the keys some row sees
    const int kr1 = (k1 - k0 + QR - 1) / QR * QR + k0;
    for (int jj = k0; jj < kr1; ++jj)
      for (int r = 0; r < QT; ++r) {
        const bool in = jj < nc && r < nq;
        g.pt[jj * QT + r] = in ? g.p[r * KC + jj] : T(0);
        g.dst[jj * QT + r] = in ? g.s[r * KC + jj] : T(0);
      }
    for (int kk = k0; kk < k1; kk += QR) {
      const int nk = std::min(QR, k1 - kk);
      for (int e0 = 0; e0 < d; e0 += EW) {
        const int ne = std::min(EW, d - e0);
        T a[QR][EW];
        pv_block(g.dst.data() + kk * QT, QT, 0, nq, g.qs.data() + e0, d, ne, a);
        for (int rr = 0; rr < nk; ++rr)
          for (int e = 0; e < ne; ++e) dk[(jb + kk + rr) * d + e0 + e] += a[rr][e];
      }
      for (int e0 = 0; e0 < dv; e0 += EW) {
        const int ne = std::min(EW, dv - e0);
        T a[QR][EW];
        pv_block(g.pt.data() + kk * QT, QT, 0, nq, g.dos.data() + e0, dv, ne, a);
        for (int rr = 0; rr < nk; ++rr)
          for (int e = 0; e < ne; ++e) dvv[(jb + kk + rr) * dv + e0 + e] += a[rr][e];
      }
    }
  }
}

// a row's gradient inputs into g (row r of the block): scaled q, do, lse, di = do . o; a row with no key
// (lse NEG: padding only) gets an empty key range
template <typename T>
void load_row(Grad<T>& g, int r, int64_t row, const T* q, const T* o, const T* lse, const T* dout, int d, int dv,
              T scale) {
  for (int c = 0; c < d; ++c) g.qs[r * d + c] = q[row * d + c] * scale;
  T di = 0;
  for (int e = 0; e < dv; ++e) {
    g.dos[r * dv + e] = dout[row * dv + e];
    di += dout[row * dv + e] * o[row * dv + e];
  }
  g.di[r] = di;
  g.lse[r] = lse[row];
  std::fill(g.dq.begin() + r * d, g.dq.begin() + (r + 1) * d, T(0));
}

template <typename T>
int backward(const T* q, const T* k, const T* v, const T* o, const T* lse, const T* dout, const Problem& P,
             double scale_d, T* dq, T* dk, T* dv_out) {
  const T scale = static_cast<T>(scale_d);
  const int64_t t = P.t, BH = P.B * P.H, BK = P.B * P.HK, ld = t + KB;
  const int d = P.d, dv = P.dv;
  const std::vector<T> kT = transposed(k, BK, t, d, P.threads), vT = transposed(v, BK, t, dv, P.threads);
  const std::vector<T> bias = key_bias<T>(P);
  const int nt = std::max(1, P.threads);
  // per-thread dk, dv (several query heads and tasks write one key), summed at the end
  std::vector<T> dkt(static_cast<size_t>(nt) * BK * t * d, T(0)), dvt(static_cast<size_t>(nt) * BK * t * dv, T(0));
  const int64_t tiles = (t + QT - 1) / QT;
  const Routing R = t > P.w + P.s ? route(P) : Routing();
  const int64_t tasks = t > P.w + P.s ? BH * R.nb : 0;
#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num();
    T* dkm = dkt.data() + static_cast<size_t>(tid) * BK * t * d;
    T* dvm = dvt.data() + static_cast<size_t>(tid) * BK * t * dv;
    Grad<T> g(d, dv);
#pragma omp for collapse(2) schedule(dynamic, 4)
    for (int64_t bh = 0; bh < BH; ++bh)
      for (int64_t tile = 0; tile < tiles; ++tile) {
        const int64_t bk = P.kv(bh), i0 = tile * QT;
        const int nq = static_cast<int>(std::min(t, i0 + QT) - i0);
        std::fill(g.qs.begin(), g.qs.end(), T(0));
        std::fill(g.dos.begin(), g.dos.end(), T(0));
        for (int r = 0; r < nq; ++r) load_row(g, r, bh * t + i0 + r, q, o, lse, dout, d, dv, scale);
        const T* bb = bias.empty() ? nullptr : bias.data() + (bh / P.H) * (t + KB);
        const T *kt = kT.data() + bk * d * ld, *vt = vT.data() + bk * dv * ld, *kr = k + bk * t * d;
        const int64_t sink_hi = sink_rows(i0, nq, P.w, P.s, g.lo.data(), g.hi.data());
        for (int r = 0; r < nq; ++r)
          if (g.lse[r] <= static_cast<T>(NEG / 2)) g.hi[r] = g.lo[r];
        if (sink_hi > 0)
          attend_bwd(g, nq, d, dv, kt, ld, kr, vt, ld, 0, sink_hi, bb, dkm + bk * t * d, dvm + bk * t * dv);
        const int64_t j0 = band_rows(i0, nq, P.w, g.lo.data(), g.hi.data());
        for (int r = 0; r < nq; ++r)
          if (g.lse[r] <= static_cast<T>(NEG / 2)) g.hi[r] = g.lo[r];
        attend_bwd(g, nq, d, dv, kt, ld, kr, vt, ld, j0, i0 + nq - j0, bb, dkm + bk * t * d, dvm + bk * t * dv);
        for (int r = 0; r < nq; ++r)
          for (int c = 0; c < d; ++c) dq[(bh * t + i0 + r) * d + c] = g.dq[r * d + c] * scale;
      }

    std::vector<T> krs, kts, vts, dks, dvs;
    Task tk;
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t bh = task / R.nb, bk = P.kv(bh);
      if (!routed_task(P, R, bh, task % R.nb, tk)) continue;
      gather(k + bk * t * d, tk.kp, tk.nk, d, &krs, &kts);
      gather(v + bk * t * dv, tk.kp, tk.nk, dv, static_cast<std::vector<T>*>(nullptr), &vts);
      dks.assign(static_cast<size_t>(tk.nk + QR) * d, T(0));
      dvs.assign(static_cast<size_t>(tk.nk + QR) * dv, T(0));
      for (int64_t a0 = tk.a0; a0 < tk.a1; a0 += QT) {
        const int nq = static_cast<int>(std::min<int64_t>(QT, tk.a1 - a0));
        std::fill(g.qs.begin() + nq * d, g.qs.end(), T(0));
        std::fill(g.dos.begin() + nq * dv, g.dos.end(), T(0));
        int64_t kmax = 0;
        for (int r = 0; r < nq; ++r) {
          const int64_t i = tk.qp[a0 + r], row = bh * t + i;
          g.rows[r] = row;
          load_row(g, r, row, q, o, lse, dout, d, dv, scale);
          g.lo[r] = 0;
          g.hi[r] = g.lse[r] <= static_cast<T>(NEG / 2) ? 0 : std::upper_bound(tk.kp, tk.kp + tk.nk, i - P.w) - tk.kp;
          kmax = std::max(kmax, g.hi[r]);
        }
        if (kmax == 0) continue;
        attend_bwd(g, nq, d, dv, kts.data(), tk.nk + KB, krs.data(), vts.data(), tk.nk + KB, 0, kmax,
                   static_cast<const T*>(nullptr), dks.data(), dvs.data());
        for (int r = 0; r < nq; ++r)
          for (int c = 0; c < d; ++c) dq[g.rows[r] * d + c] += g.dq[r * d + c] * scale;
      }
      for (int64_t a = 0; a < tk.nk; ++a) {
        T* dkr = dkm + (bk * t + tk.kp[a]) * d;
        T* dvr = dvm + (bk * t + tk.kp[a]) * dv;
        for (int c = 0; c < d; ++c) dkr[c] += dks[a * d + c];
        for (int e = 0; e < dv; ++e) dvr[e] += dvs[a * dv + e];
      }
    }

#pragma omp for schedule(static)
    for (int64_t i = 0; i < BK * t; ++i) {
      for (int c = 0; c < d; ++c) {
        T x = 0;
        for (int th = 0; th < nt; ++th) x += dkt[(static_cast<size_t>(th) * BK * t + i) * d + c];
        dk[i * d + c] = x;
      }
      for (int e = 0; e < dv; ++e) {
        T x = 0;
        for (int th = 0; th < nt; ++th) x += dvt[(static_cast<size_t>(th) * BK * t + i) * dv + e];
        dv_out[i * dv + e] = x;
      }
    }
  }
  return 0;
}

// Angular LSH (`reference.lsh_buckets`): x [B, HX, T, D] float32 hashed for H query heads (head h reads x head
// h / (H / HX)) with the rotations R [H, D, r]; out [B, H, T] = argmax over [xR, -xR] (the first maximum; + before
// - on a tie, as the reference).
// bucket of one row's projections p[0, r): the first maximum of [p, -p]
inline int64_t lsh_pick(const float* p, int r) {
  int hi = 0, lo = 0;
  for (int j = 1; j < r; ++j) {
    if (p[j] > p[hi]) hi = j;
    if (p[j] < p[lo]) lo = j;
  }
  return p[hi] >= -p[lo] ? hi : lo + r;
}

// r = KB projections (64 buckets): the scores micro-kernel, QR rows at a time
void lsh_rows_kb(const float* x, const float* rot, int d, int64_t n, int64_t* out) {
  std::vector<float> xs(QR * d), p(QR * KC);
  for (int64_t i0 = 0; i0 < n; i0 += QR) {
    const int nr = static_cast<int>(std::min<int64_t>(QR, n - i0));
    std::fill(xs.begin(), xs.end(), 0.0f);
    std::memcpy(xs.data(), x + i0 * d, sizeof(float) * nr * d);
    scores_block(xs.data(), d, rot, KB, p.data());
    for (int rr = 0; rr < nr; ++rr) out[i0 + rr] = lsh_pick(p.data() + rr * KC, KB);
  }
}

void lsh_rows_any(const float* x, const float* rot, int d, int r, int64_t n, int64_t* out) {
  std::vector<float> p(r);
  for (int64_t i = 0; i < n; ++i) {
    std::fill(p.begin(), p.end(), 0.0f);
    for (int c = 0; c < d; ++c)
      for (int j = 0; j < r; ++j) p[j] += x[i * d + c] * rot[c * r + j];
    out[i] = lsh_pick(p.data(), r);
  }
}

}  // namespace

extern "C" {

// the C entry points, one pair per dtype: attnswap_sparse_{fwd,bwd}_{f32,f64}
#define ATTNSWAP_SPARSE_ENTRIES(T, SUFFIX)                                                                      \
  int attnswap_sparse_fwd_##SUFFIX(const T* q, const T* k, const T* v, const int64_t* qb, const int64_t* kb,  \
                                   const uint8_t* qkeep, const uint8_t* kkeep, const uint8_t* kvalid,          \
                                   int64_t B, int64_t H, int64_t HK, int64_t t, int d, int dv, int64_t w,      \
                                   int64_t s, double scale, int threads, T* o, T* lse) {                       \
    const Problem P{qb, kb, qkeep, kkeep, kvalid, B, H, HK, t, d, dv, w, s, threads};                          \
    return forward<T>(q, k, v, P, scale, o, lse);                                                              \
  }                                                                                                            \
  int attnswap_sparse_bwd_##SUFFIX(const T* q, const T* k, const T* v, const T* o, const T* lse,               \
                                   const T* dout, const int64_t* qb, const int64_t* kb, const uint8_t* qkeep,  \
                                   const uint8_t* kkeep, const uint8_t* kvalid, int64_t B, int64_t H,          \
                                   int64_t HK, int64_t t, int d, int dv, int64_t w, int64_t s, double scale,   \
                                   int threads, T* dq, T* dk, T* dvv) {                                        \
    const Problem P{qb, kb, qkeep, kkeep, kvalid, B, H, HK, t, d, dv, w, s, threads};                          \
    return backward<T>(q, k, v, o, lse, dout, P, scale, dq, dk, dvv);                                          \
  }

ATTNSWAP_SPARSE_ENTRIES(float, f32)
ATTNSWAP_SPARSE_ENTRIES(double, f64)

int attnswap_lsh_f32(const float* x, const float* rot, int64_t B, int64_t H, int64_t HX, int64_t t, int d, int r,
                     int threads, int64_t* out) {
  const int64_t group = H / HX, rows = 64, blocks = (t + rows - 1) / rows;
#pragma omp parallel for collapse(2) num_threads(threads) schedule(static)
  for (int64_t bh = 0; bh < B * H; ++bh)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t b = bh / H, h = bh % H, i0 = blk * rows, n = std::min(rows, t - i0);
      const float* xs = x + ((b * HX + h / group) * t + i0) * d;
      const float* rh = rot + h * d * r;
      int64_t* os = out + bh * t + i0;
      if (r == KB)
        lsh_rows_kb(xs, rh, d, n, os);
      else
        lsh_rows_any(xs, rh, d, r, n, os);
    }
  return 0;
}
}
