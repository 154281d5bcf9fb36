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
// The attention core (micro-kernels, online softmax, its backward) is `../cpu_attend.h`.
// Also the angular LSH of `reference.lsh_buckets`, so routing does not cost more than the attention.
// Outputs: o [B, H, T, Dv] normalised (a row with no key at all: 0) and lse [B, H, T] (no key: NEG).
// Threads: OpenMP; linked by soname against the libgomp PyTorch has loaded, so both share one pool.
#include <omp.h>

#include "../cpu_attend.h"

namespace {

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
        sc.start(q + (bh * t + i0) * d, nq, d, scale);
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
        load_rows(g, nq, bh * t + i0, q, o, lse, dout, d, dv, scale);
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
