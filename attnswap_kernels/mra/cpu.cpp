// MRA attention's core on the CPU, forward and backward: the same result as `reference.mra_naive` given the
// padded inputs, the block statistics and the selection (`mra_attention` computes those in PyTorch).
//
// One item per (batch, query head, query block, tile of <= QT of its rows). Its rows fold into one online
// softmax: each run of consecutive selected key blocks (one range of keys; causal rows up to their own position,
// padding keys masked), then, for approx "full", the block means of the allowed blocks that are not selected
// (score q . kbar_J * scale + log n_J, value vbar_J; causal: blocks J <= the query block). The backward
// recomputes p from the forward's log-sum-exp and writes dk, dv, dkbar, dvbar into one buffer per thread,
// summed at the end. The attention core is `../cpu_attend.h`.
// Outputs: o [B, H, nq, Dv] (a row with no key: 0) and lse [B, H, nq] (no key: NEG).
#include <omp.h>

#include "../cpu_attend.h"

namespace {

// Shapes of one call. q [B, H, nq = nbq * bs, d]; k, v [B, HK, nk = nbk * bs, .]; kbar, vbar [B, HK, nbk, .];
// logn [B, nbk] (-inf: an empty block); sel [B, HS, nbq, nbk]; kvalid [B, nk]. Query block I sits at block
// i0 + I of the keys.
template <typename T>
struct Mra {
  const T* logn;
  const uint8_t *sel, *kvalid;
  int64_t B, H, HK, HS, nbq, nbk, i0;
  int bs, d, dv;
  bool causal, full;
  int threads;
  int64_t nq() const { return nbq * bs; }
  int64_t nk() const { return nbk * bs; }
  int64_t kv(int64_t bh) const { return (bh / H) * HK + (bh % H) / (H / HK); }
  const uint8_t* sel_row(int64_t bh, int64_t I) const {
    return sel + (((bh / H) * HS + (bh % H) / (H / HS)) * nbq + I) * nbk;
  }
  int64_t tiles() const { return (bs + QT - 1) / QT; }
  // the block-mean keys query block I reads: their count and per-key bias (log n_J, NEG where not read)
  int64_t virtual_keys(int64_t bh, int64_t I, std::vector<T>& bias) const {
    const int64_t n = full ? (causal ? std::min(nbk, i0 + I + 1) : nbk) : 0;
    const uint8_t* s = sel_row(bh, I);
    const T* ln = logn + (bh / H) * nbk;
    bias.assign(nbk + KB, static_cast<T>(NEG));
    for (int64_t J = 0; J < n; ++J)
      if (!s[J] && std::isfinite(ln[J])) bias[J] = ln[J];
    return n;
  }
  // f(J0, J1) for each run [J0, J1) of consecutive selected key blocks in a query block's selection row s
  template <typename F>
  void for_each_run(const uint8_t* s, F&& f) const {
    for (int64_t J = 0; J < nbk;) {
      if (!s[J]) {
        ++J;
        continue;
      }
      const int64_t J0 = J;
      while (J < nbk && s[J]) ++J;
      f(J0, J);
    }
  }
  // f(bh, I, bk, r0, pos0, n) for each work item, shared among the threads of the enclosing parallel region: query
  // head bh (its key head bk), query block I, the tile's first row r0 in the block's head (absolute position pos0)
  // and its n <= QT rows
  template <typename F>
  void for_each_tile(F&& f) const {
#pragma omp for collapse(3) schedule(dynamic, 2)
    for (int64_t bh = 0; bh < B * H; ++bh)
      for (int64_t I = 0; I < nbq; ++I)
        for (int64_t tile = 0; tile < tiles(); ++tile) {
          const int64_t r0 = I * bs + tile * QT;
          f(bh, I, kv(bh), r0, i0 * bs + r0, static_cast<int>(std::min<int64_t>(QT, bs - tile * QT)));
        }
  }
  // exact key blocks [J0, J1) for the tile's rows (absolute positions pos0 + r): keys [J0 bs, J1 bs), causal up
  // to the row's position
  void exact_rows(int64_t J0, int64_t J1, int64_t pos0, int nq_, int64_t* lo, int64_t* hi) const {
    for (int r = 0; r < nq_; ++r) {
      lo[r] = J0 * bs;
      hi[r] = causal ? std::min(J1 * bs, pos0 + r + 1) : J1 * bs;
    }
  }
};

template <typename T>
std::vector<T> padding_bias(const uint8_t* kvalid, int64_t B, int64_t nk) {
  std::vector<T> bias;
  bool padded = false;
  for (int64_t i = 0; i < B * nk; ++i) padded |= !kvalid[i];
  if (!padded) return bias;
  bias.assign(B * (nk + KB), static_cast<T>(NEG));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < nk; ++j) bias[b * (nk + KB) + j] = kvalid[b * nk + j] ? T(0) : static_cast<T>(NEG);
  return bias;
}

template <typename T>
int forward(const T* q, const T* k, const T* v, const T* kbar, const T* vbar, const Mra<T>& M, double scale_d, T* o,
            T* lse) {
  const T scale = static_cast<T>(scale_d);
  const int64_t BK = M.B * M.HK, nq = M.nq(), nk = M.nk(), ldk = nk + KB, ldb = M.nbk + KB;
  const int d = M.d, dv = M.dv, bs = M.bs;
  const std::vector<T> kT = transposed(k, BK, nk, d, M.threads), kbT = transposed(kbar, BK, M.nbk, d, M.threads);
  const std::vector<T> pad = padding_bias<T>(M.kvalid, M.B, nk);
#pragma omp parallel num_threads(M.threads)
  {
    Scratch<T> sc(d, dv);
    std::vector<T> vbias;
    M.for_each_tile([&](int64_t bh, int64_t I, int64_t bk, int64_t r0, int64_t pos0, int nq_) {
      sc.start(q + (bh * nq + r0) * d, nq_, d, scale);
      const T* pb = pad.empty() ? nullptr : pad.data() + (bh / M.H) * (nk + KB);
      M.for_each_run(M.sel_row(bh, I), [&](int64_t J, int64_t J1) {
        M.exact_rows(J, J1, pos0, nq_, sc.lo.data(), sc.hi.data());
        attend(sc.qs.data(), nq_, d, kT.data() + bk * d * ldk, ldk, v + bk * nk * dv, dv, J * bs, (J1 - J) * bs,
               sc.lo.data(), sc.hi.data(), pb, sc.m.data(), sc.l.data(), sc.acc.data(), sc.s.data());
      });
      const int64_t nv = M.virtual_keys(bh, I, vbias);
      if (nv > 0) {
        std::fill(sc.lo.begin(), sc.lo.end(), 0);
        std::fill(sc.hi.begin(), sc.hi.end(), nv);
        attend(sc.qs.data(), nq_, d, kbT.data() + bk * d * ldb, ldb, vbar + bk * M.nbk * dv, dv, 0, nv,
               sc.lo.data(), sc.hi.data(), vbias.data(), sc.m.data(), sc.l.data(), sc.acc.data(), sc.s.data());
      }
      for (int r = 0; r < nq_; ++r) {
        const int64_t row = bh * nq + r0 + r;
        T* orow = o + row * dv;
        if (sc.l[r] > T(0)) {
          const T inv = T(1) / sc.l[r];
          for (int e = 0; e < dv; ++e) orow[e] = sc.acc[r * dv + e] * inv;
          lse[row] = sc.m[r] + std::log(sc.l[r]);
        } else {
          for (int e = 0; e < dv; ++e) orow[e] = T(0);
          lse[row] = static_cast<T>(NEG);
        }
      }
    });
  }
  return 0;
}

template <typename T>
int backward(const T* q, const T* k, const T* v, const T* kbar, const T* vbar, const T* o, const T* lse,
             const T* dout, const Mra<T>& M, double scale_d, T* dq, T* dk, T* dv_out, T* dkbar, T* dvbar) {
  const T scale = static_cast<T>(scale_d);
  const int64_t BK = M.B * M.HK, nq = M.nq(), nk = M.nk(), nbk = M.nbk;
  const int64_t ldk = nk + KB, ldb = nbk + KB;
  const int d = M.d, dv = M.dv, bs = M.bs;
  const std::vector<T> kT = transposed(k, BK, nk, d, M.threads), vT = transposed(v, BK, nk, dv, M.threads);
  const std::vector<T> kbT = transposed(kbar, BK, nbk, d, M.threads), vbT = transposed(vbar, BK, nbk, dv, M.threads);
  const std::vector<T> pad = padding_bias<T>(M.kvalid, M.B, nk);
  const int nt = std::max(1, M.threads);
  const size_t per_k = BK * nk, per_b = BK * nbk;
  std::vector<T> gk(nt * per_k * d, T(0)), gv(nt * per_k * dv, T(0)), gkb(nt * per_b * d, T(0)),
      gvb(nt * per_b * dv, T(0));
#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num();
    Grad<T> g(d, dv);
    std::vector<T> vbias;
    M.for_each_tile([&](int64_t bh, int64_t I, int64_t bk, int64_t r0, int64_t pos0, int nq_) {
      load_rows(g, nq_, bh * nq + r0, q, o, lse, dout, d, dv, scale);
      auto no_key_rows = [&]() {  // a row with no key at all (lse NEG) has no gradient
        for (int r = 0; r < nq_; ++r)
          if (g.lse[r] <= static_cast<T>(NEG / 2)) g.hi[r] = g.lo[r];
      };
      const T* pb = pad.empty() ? nullptr : pad.data() + (bh / M.H) * (nk + KB);
      M.for_each_run(M.sel_row(bh, I), [&](int64_t J, int64_t J1) {
        M.exact_rows(J, J1, pos0, nq_, g.lo.data(), g.hi.data());
        no_key_rows();
        attend_bwd(g, nq_, d, dv, kT.data() + bk * d * ldk, ldk, k + bk * nk * d, vT.data() + bk * dv * ldk, ldk,
                   J * bs, (J1 - J) * bs, pb, gk.data() + (tid * per_k + bk * nk) * d,
                   gv.data() + (tid * per_k + bk * nk) * dv);
      });
      const int64_t nv = M.virtual_keys(bh, I, vbias);
      if (nv > 0) {
        std::fill(g.lo.begin(), g.lo.end(), 0);
        std::fill(g.hi.begin(), g.hi.end(), nv);
        no_key_rows();
        attend_bwd(g, nq_, d, dv, kbT.data() + bk * d * ldb, ldb, kbar + bk * nbk * d, vbT.data() + bk * dv * ldb,
                   ldb, 0, nv, vbias.data(), gkb.data() + (tid * per_b + bk * nbk) * d,
                   gvb.data() + (tid * per_b + bk * nbk) * dv);
      }
      for (int r = 0; r < nq_; ++r)
        for (int c = 0; c < d; ++c) dq[(bh * nq + r0 + r) * d + c] = g.dq[r * d + c] * scale;
    });
    auto reduce = [&](const std::vector<T>& buf, size_t per, int n, T* out) {
#pragma omp for schedule(static)
      for (size_t i = 0; i < per * n; ++i) {
        T x = 0;
        for (int th = 0; th < nt; ++th) x += buf[th * per * n + i];
        out[i] = x;
      }
    };
    reduce(gk, per_k, d, dk);
    reduce(gv, per_k, dv, dv_out);
    reduce(gkb, per_b, d, dkbar);
    reduce(gvb, per_b, dv, dvbar);
  }
  return 0;
}

}  // namespace

extern "C" {

// the C entry points, one pair per dtype: attnswap_mra_{fwd,bwd}_{f32,f64}
#define ATTNSWAP_MRA_ENTRIES(T, SUFFIX)                                                                          \
  int attnswap_mra_fwd_##SUFFIX(const T* q, const T* k, const T* v, const T* kbar, const T* vbar, const T* logn, \
                                const uint8_t* sel, const uint8_t* kvalid, int64_t B, int64_t H, int64_t HK,     \
                                int64_t HS, int64_t nbq, int64_t nbk, int64_t i0, int bs, int d, int dv,         \
                                int causal, int full, double scale, int threads, T* o, T* lse) {                 \
    const Mra<T> M{logn, sel, kvalid, B, H, HK, HS, nbq, nbk, i0, bs, d, dv, causal != 0, full != 0, threads};   \
    return forward<T>(q, k, v, kbar, vbar, M, scale, o, lse);                                                    \
  }                                                                                                              \
  int attnswap_mra_bwd_##SUFFIX(const T* q, const T* k, const T* v, const T* kbar, const T* vbar, const T* logn, \
                                const uint8_t* sel, const uint8_t* kvalid, int64_t B, int64_t H, int64_t HK,     \
                                int64_t HS, int64_t nbq, int64_t nbk, int64_t i0, int bs, int d, int dv,         \
                                int causal, int full, double scale, int threads, const T* o, const T* lse,       \
                                const T* dout, T* dq, T* dk, T* dvv, T* dkbar, T* dvbar) {                       \
    const Mra<T> M{logn, sel, kvalid, B, H, HK, HS, nbq, nbk, i0, bs, d, dv, causal != 0, full != 0, threads};   \
    return backward<T>(q, k, v, kbar, vbar, o, lse, dout, M, scale, dq, dk, dvv, dkbar, dvbar);                  \
  }

ATTNSWAP_MRA_ENTRIES(float, f32)
ATTNSWAP_MRA_ENTRIES(double, f64)
}
