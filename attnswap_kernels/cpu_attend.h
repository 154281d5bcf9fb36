// The compiled CPU attention core shared by attnswap's CPU kernels (sparse_attn/cpu.cpp, mra/cpu.cpp): online-
// softmax attention of a tile of up to QT query rows over a contiguous range of keys, each row seeing its own
// interval of them, forward (`attend`) and backward (`attend_bwd`), with the register-blocked micro-kernels
// under them.
//
// Scores and p v come from register-blocked micro-kernels (QR = 8 query rows x 32 keys, or x 32 output
// columns; keys transposed so the inner loop runs over keys without a horizontal sum; float through GCC vector
// types so the accumulators stay in registers), over only the 32-key blocks some of the 8 rows sees. exp in
// float is a Cephes-style polynomial the compiler vectorises; double uses std::exp and plain loops (the path
// the tests compare with the references at 1e-12). The tile sizes were chosen by timing 1,024 and 4,096 tokens
// of SmolLM2's attention shape on 2 cores (QT 16..64, QR 4..16, 16 or 32 keys, 32 or 64 columns).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

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

// max of x[0, n) (NEG for n = 0): 16 independent lanes, so the compiler emits vector max instructions (a max
// reduction written as one accumulator stays scalar)
template <typename T>
inline T row_max(const T* x, int n) {
  T lane[16];
  for (int e = 0; e < 16; ++e) lane[e] = static_cast<T>(NEG);
  int j = 0;
  for (; j + 16 <= n; j += 16)
    for (int e = 0; e < 16; ++e) lane[e] = lane[e] > x[j + e] ? lane[e] : x[j + e];
  for (; j < n; ++j) lane[0] = lane[0] > x[j] ? lane[0] : x[j];
  T m = lane[0];
  for (int e = 1; e < 16; ++e) m = m > lane[e] ? m : lane[e];
  return m;
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
      const T mx = row_max(sr + x0, x1 - x0);
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

template <typename T>
struct Scratch {
  std::vector<T> qs, m, l, acc, s;
  std::vector<int64_t> lo, hi, rows;
  Scratch(int d, int dv)
      : qs(QT * d), m(QT), l(QT), acc(QT * dv), s(QT * KC), lo(QT), hi(QT), rows(QT) {}
  // a tile of n consecutive query rows from q (times scale; rows >= n zero) and an empty online softmax
  void start(const T* q, int n, int d, T scale) {
    std::fill(qs.begin(), qs.end(), T(0));
    for (int i = 0; i < n * d; ++i) qs[i] = q[i] * scale;
    std::fill(m.begin(), m.end(), static_cast<T>(NEG));
    std::fill(l.begin(), l.end(), T(0));
    std::fill(acc.begin(), acc.end(), T(0));
  }
};

// Backward: the gradients of keys [j0, j0 + n) for nq (<= QT) rows, from recomputed scores and the forward's
// lse: p = exp(s + bias - lse), ds = p (do v^T - di) with di = do . o;  dq += ds k (unscaled here), dk += ds^T qs,
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
        if (jj >= x0 && jj < x1 && (!bb || bb[jj] > static_cast<T>(NEG / 2))) pv = fexp(sr[jj] + (bb ? bb[jj] : T(0)) - lr);
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

// the backward's tile of nq consecutive rows from row0 (rows >= nq zero)
template <typename T>
void load_rows(Grad<T>& g, int nq, int64_t row0, const T* q, const T* o, const T* lse, const T* dout, int d, int dv,
               T scale) {
  std::fill(g.qs.begin(), g.qs.end(), T(0));
  std::fill(g.dos.begin(), g.dos.end(), T(0));
  for (int r = 0; r < nq; ++r) load_row(g, r, row0 + r, q, o, lse, dout, d, dv, scale);
}

}  // namespace
