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

// a[rr][e] = sum_{b0 <= jj < b1} p[rr * KC + jj] * v[jj * dv + e], QR rows x ne (<= EW) columns
template <typename T>
inline void pv_block(const T* p, int b0, int b1, const T* v, int dv, int ne, T (*a)[EW]) {
  for (int rr = 0; rr < QR; ++rr)
    for (int e = 0; e < EW; ++e) a[rr][e] = T(0);
  for (int jj = b0; jj < b1; ++jj)
    for (int rr = 0; rr < QR; ++rr)
      for (int e = 0; e < ne; ++e) a[rr][e] += p[rr * KC + jj] * v[jj * dv + e];
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
inline void pv_block<float>(const float* p, int b0, int b1, const float* v, int dv, int ne, float (*a)[EW]) {
  if (ne < EW) {
    for (int rr = 0; rr < QR; ++rr)
      for (int e = 0; e < EW; ++e) a[rr][e] = 0.0f;
    for (int jj = b0; jj < b1; ++jj)
      for (int rr = 0; rr < QR; ++rr)
        for (int e = 0; e < ne; ++e) a[rr][e] += p[rr * KC + jj] * v[jj * dv + e];
    return;
  }
  V16 acc[QR][2] = {};
  for (int jj = b0; jj < b1; ++jj) {
    const V16 v0 = load16(v + jj * dv), v1 = load16(v + jj * dv + 16);
#pragma GCC unroll 16
    for (int rr = 0; rr < QR; ++rr) {
      const float pv = p[rr * KC + jj];
      acc[rr][0] += pv * v0;
      acc[rr][1] += pv * v1;
    }
  }
  for (int rr = 0; rr < QR; ++rr) std::memcpy(a[rr], acc[rr], sizeof(acc[rr]));
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
      int b0 = nc, b1 = 0;
      for (int rr = 0; rr < nr; ++rr)
        if (a1[r0 + rr] > a0[r0 + rr]) {
          b0 = std::min(b0, a0[r0 + rr]);
          b1 = std::max(b1, a1[r0 + rr]);
        }
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
      int b0 = nc, b1 = 0;
      for (int rr = 0; rr < nr; ++rr)
        if (a1[r0 + rr] > a0[r0 + rr]) {
          b0 = std::min(b0, a0[r0 + rr]);
          b1 = std::max(b1, a1[r0 + rr]);
        }
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
        pv_block(&pr[0][0], b0, b1, v + jb * dv + e0, dv, ne, a);
        for (int rr = 0; rr < nr; ++rr) {
          T* ar = acc + static_cast<int64_t>(r0 + rr) * dv + e0;
          const T al = alpha[r0 + rr];
          for (int e = 0; e < ne; ++e) ar[e] = ar[e] * al + a[rr][e];
        }
      }
    }
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
int forward(const T* q, const T* k, const T* v, const int64_t* qb, const int64_t* kb, const uint8_t* qkeep,
            const uint8_t* kkeep, const uint8_t* kvalid, int64_t B, int64_t H, int64_t HK, int64_t t, int d, int dv,
            int64_t w, int64_t s, double scale_d, int threads, T* o, T* lse) {
  const T scale = static_cast<T>(scale_d);
  const int64_t group = H / HK, ldk = t + KB, BH = B * H;
  std::vector<T> kT(static_cast<size_t>(B * HK) * d * ldk, T(0));  // keys transposed, KC zero columns after
  std::vector<T> mrow(BH * t, static_cast<T>(NEG)), lrow(BH * t, T(0));
  std::vector<T> bias;  // per key of each batch row: 0 or NEG (padding), only when some key is padding
  bool padded = false;
  if (kvalid) {
    for (int64_t i = 0; i < B * t; ++i) padded |= !kvalid[i];
    if (padded) {
      bias.resize(B * (t + KB), static_cast<T>(NEG));
      for (int64_t b = 0; b < B; ++b)
        for (int64_t j = 0; j < t; ++j) bias[b * (t + KB) + j] = kvalid[b * t + j] ? T(0) : static_cast<T>(NEG);
    }
  }

#pragma omp parallel num_threads(threads)
  {
    Scratch<T> sc(d, dv);
#pragma omp for collapse(2) schedule(static)
    for (int64_t bk = 0; bk < B * HK; ++bk)
      for (int c = 0; c < d; ++c) {
        const T* src = k + bk * t * d + c;
        T* dst = kT.data() + (bk * d + c) * ldk;
        for (int64_t j = 0; j < t; ++j) dst[j] = src[j * d];
      }

    // band and sinks, tiles of QT consecutive queries
    const int64_t tiles = (t + QT - 1) / QT;
#pragma omp for collapse(2) schedule(dynamic, 4)
    for (int64_t bh = 0; bh < BH; ++bh)
      for (int64_t tile = 0; tile < tiles; ++tile) {
        const int64_t b = bh / H, bk = b * HK + (bh % H) / group;
        const int64_t i0 = tile * QT, i1 = std::min(t, i0 + QT);
        const int nq = static_cast<int>(i1 - i0);
        std::fill(sc.qs.begin(), sc.qs.end(), T(0));
        for (int r = 0; r < nq; ++r)
          for (int c = 0; c < d; ++c) sc.qs[r * d + c] = q[(bh * t + i0 + r) * d + c] * scale;
        std::fill(sc.m.begin(), sc.m.end(), static_cast<T>(NEG));
        std::fill(sc.l.begin(), sc.l.end(), T(0));
        std::fill(sc.acc.begin(), sc.acc.end(), T(0));
        const T* kt = kT.data() + bk * d * ldk;
        const T* vv = v + bk * t * dv;
        const T* bb = padded ? bias.data() + b * (t + KB) : nullptr;
        // sinks first (their own keys, disjoint from the band row by row)
        const int64_t sink_hi = std::min(s, std::max<int64_t>(0, i1 - w));
        if (sink_hi > 0) {
          for (int r = 0; r < nq; ++r) {
            sc.lo[r] = 0;
            sc.hi[r] = std::min(s, std::max<int64_t>(0, i0 + r - w + 1));
          }
          attend(sc.qs.data(), nq, d, kt, ldk, vv, dv, 0, sink_hi, sc.lo.data(), sc.hi.data(), bb, sc.m.data(),
                 sc.l.data(), sc.acc.data(), sc.s.data());
        }
        const int64_t j0 = std::max<int64_t>(0, i0 - w + 1);
        for (int r = 0; r < nq; ++r) {
          sc.lo[r] = std::max<int64_t>(0, i0 + r - w + 1);
          sc.hi[r] = i0 + r + 1;
        }
        attend(sc.qs.data(), nq, d, kt, ldk, vv, dv, j0, i1 - j0, sc.lo.data(), sc.hi.data(), bb, sc.m.data(),
               sc.l.data(), sc.acc.data(), sc.s.data());
        for (int r = 0; r < nq; ++r) {
          mrow[bh * t + i0 + r] = sc.m[r];
          lrow[bh * t + i0 + r] = sc.l[r];
          std::memcpy(o + (bh * t + i0 + r) * dv, sc.acc.data() + r * dv, sizeof(T) * dv);
        }
      }
  }

  // routed: per (batch, query head) the eligible keys and queries counting-sorted by (bucket, position); then
  // one task per (batch, query head, bucket): its keys gathered once, its queries in blocks of <= QT
  if (t > w + s) {
    int64_t nb = 1;
    if (qb)
      for (int64_t i = 0; i < BH * t; ++i) nb = std::max(nb, std::max(qb[i], kb[i]) + 1);
    std::vector<int64_t> koff(BH * (nb + 1), 0), qoff(BH * (nb + 1), 0), spos(BH * t), qpos(BH * t);
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
      for (int64_t bh = 0; bh < BH; ++bh) {
        const int64_t b = bh / H;
        const int64_t* kbh = kb ? kb + bh * t : nullptr;
        const int64_t* qbh = qb ? qb + bh * t : nullptr;
        int64_t* ko = koff.data() + bh * (nb + 1);
        int64_t* qo = qoff.data() + bh * (nb + 1);
        auto key_ok = [&](int64_t j) {
          return j >= s && (!kvalid || kvalid[b * t + j]) && (!kkeep || kkeep[bh * t + j]);
        };
        auto query_ok = [&](int64_t i) { return i >= s + w && (!qkeep || qkeep[bh * t + i]); };
        for (int64_t j = 0; j < t; ++j) {
          if (key_ok(j)) ++ko[(kbh ? kbh[j] : 0) + 1];
          if (query_ok(j)) ++qo[(qbh ? qbh[j] : 0) + 1];
        }
        for (int64_t x = 0; x < nb; ++x) {
          ko[x + 1] += ko[x];
          qo[x + 1] += qo[x];
        }
        std::vector<int64_t> kf(ko, ko + nb), qf(qo, qo + nb);
        for (int64_t j = 0; j < t; ++j) {
          if (key_ok(j)) spos[bh * t + kf[kbh ? kbh[j] : 0]++] = j;
          if (query_ok(j)) qpos[bh * t + qf[qbh ? qbh[j] : 0]++] = j;
        }
      }
      Scratch<T> sc(d, dv);
      std::vector<T> kts, vs;
#pragma omp for schedule(dynamic, 1)
      for (int64_t task = 0; task < BH * nb; ++task) {
        const int64_t bh = task / nb, x = task % nb;
        const int64_t b = bh / H, bk = b * HK + (bh % H) / group;
        const int64_t* ko = koff.data() + bh * (nb + 1);
        const int64_t* qo = qoff.data() + bh * (nb + 1);
        const int64_t nk = ko[x + 1] - ko[x];
        if (nk == 0 || qo[x + 1] == qo[x]) continue;
        const int64_t* kp = spos.data() + bh * t + ko[x];  // this bucket's key positions, ascending
        const int64_t* qp = qpos.data() + bh * t;
        // no query of the bucket sees a key: its first key lies within w of (or after) its last query
        if (kp[0] > qp[qo[x + 1] - 1] - w) continue;
        const int64_t ldks = nk + KB;
        kts.assign(static_cast<size_t>(d) * ldks, T(0));
        vs.resize(static_cast<size_t>(nk) * dv);
        const T* kk = k + bk * t * d;
        const T* vv = v + bk * t * dv;
        for (int64_t a = 0; a < nk; ++a) {
          const int64_t j = kp[a];
          for (int c = 0; c < d; ++c) kts[c * ldks + a] = kk[j * d + c];
          std::memcpy(vs.data() + a * dv, vv + j * dv, sizeof(T) * dv);
        }
        for (int64_t a0 = qo[x]; a0 < qo[x + 1]; a0 += QT) {
          const int nq = static_cast<int>(std::min<int64_t>(QT, qo[x + 1] - a0));
          std::fill(sc.qs.begin() + nq * d, sc.qs.end(), T(0));
          int64_t kmax = 0;
          for (int r = 0; r < nq; ++r) {
            const int64_t i = qp[a0 + r], row = bh * t + i;
            sc.rows[r] = row;
            for (int c = 0; c < d; ++c) sc.qs[r * d + c] = q[row * d + c] * scale;
            sc.lo[r] = 0;
            sc.hi[r] = std::upper_bound(kp, kp + nk, i - w) - kp;
            kmax = std::max(kmax, sc.hi[r]);
            sc.m[r] = mrow[row];
            sc.l[r] = lrow[row];
            std::memcpy(sc.acc.data() + r * dv, o + row * dv, sizeof(T) * dv);
          }
          if (kmax == 0) continue;
          attend(sc.qs.data(), nq, d, kts.data(), ldks, vs.data(), dv, 0, kmax, sc.lo.data(), sc.hi.data(),
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

#pragma omp parallel for num_threads(threads) schedule(static)
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

// Angular LSH (`reference.lsh_buckets`): x [B, HX, T, D] float32 hashed for H query heads (head h reads x head
// h / (H / HX)) with the rotations R [H, D, r]; out [B, H, T] = argmax over [xR, -xR] (the first maximum; + before
// - on a tie, as the reference).
template <int R>
void lsh_rows(const float* x, const float* rot, int d, int64_t n, int64_t* out) {
  for (int64_t i = 0; i < n; ++i) {
    float p[R] = {};
    const float* xi = x + i * d;
    for (int c = 0; c < d; ++c) {
      const float xc = xi[c];
#pragma omp simd
      for (int j = 0; j < R; ++j) p[j] += xc * rot[c * R + j];
    }
    int hi = 0, lo = 0;
    for (int j = 1; j < R; ++j) {
      if (p[j] > p[hi]) hi = j;
      if (p[j] < p[lo]) lo = j;
    }
    out[i] = p[hi] >= -p[lo] ? hi : lo + R;
  }
}

void lsh_rows_any(const float* x, const float* rot, int d, int r, int64_t n, int64_t* out) {
  std::vector<float> p(r);
  for (int64_t i = 0; i < n; ++i) {
    std::fill(p.begin(), p.end(), 0.0f);
    for (int c = 0; c < d; ++c)
      for (int j = 0; j < r; ++j) p[j] += x[i * d + c] * rot[c * r + j];
    int hi = 0, lo = 0;
    for (int j = 1; j < r; ++j) {
      if (p[j] > p[hi]) hi = j;
      if (p[j] < p[lo]) lo = j;
    }
    out[i] = p[hi] >= -p[lo] ? hi : lo + r;
  }
}

}  // namespace

extern "C" {

int attnswap_sparse_fwd_f32(const float* q, const float* k, const float* v, const int64_t* qb, const int64_t* kb,
                            const uint8_t* qkeep, const uint8_t* kkeep, const uint8_t* kvalid, int64_t B, int64_t H,
                            int64_t HK, int64_t t, int d, int dv, int64_t w, int64_t s, double scale, int threads,
                            float* o, float* lse) {
  return forward<float>(q, k, v, qb, kb, qkeep, kkeep, kvalid, B, H, HK, t, d, dv, w, s, scale, threads, o, lse);
}

int attnswap_sparse_fwd_f64(const double* q, const double* k, const double* v, const int64_t* qb, const int64_t* kb,
                            const uint8_t* qkeep, const uint8_t* kkeep, const uint8_t* kvalid, int64_t B, int64_t H,
                            int64_t HK, int64_t t, int d, int dv, int64_t w, int64_t s, double scale, int threads,
                            double* o, double* lse) {
  return forward<double>(q, k, v, qb, kb, qkeep, kkeep, kvalid, B, H, HK, t, d, dv, w, s, scale, threads, o, lse);
}

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
      switch (r) {
        case 1: lsh_rows<1>(xs, rh, d, n, os); break;
        case 2: lsh_rows<2>(xs, rh, d, n, os); break;
        case 4: lsh_rows<4>(xs, rh, d, n, os); break;
        case 8: lsh_rows<8>(xs, rh, d, n, os); break;
        case 16: lsh_rows<16>(xs, rh, d, n, os); break;
        case 32: lsh_rows<32>(xs, rh, d, n, os); break;
        case 64: lsh_rows<64>(xs, rh, d, n, os); break;
        default: lsh_rows_any(xs, rh, d, r, n, os);
      }
    }
  return 0;
}
}
