// C++ CPU kernels of the engine's torch ops (kernels/_csrc.py builds and loads this file).
//
// Each function is the CPU implementation of one engine::* op and matches its torch
// reference in kernels/*.py. Inputs are fp32 or bf16 (fp16 too); all math is fp32 and
// the result is cast back to the input dtype. Work is split with at::parallel_for and
// vectorized with at::vec::Vectorized<float> (AVX-512 or AVX2 as the build detected).
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif
#include <cmath>
#include <limits>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kV = Vec::size();

template <typename T>
inline void to_float(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <typename T>
inline void from_float(const float* src, T* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

// bf16 -> fp32 is the 16 bits shifted up (a loop the compiler vectorizes); fp32 -> bf16 rounds to
// nearest even as static_cast does, with ATen's vectorized conversion.
template <>
inline void to_float<c10::BFloat16>(const c10::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  uint32_t* d = reinterpret_cast<uint32_t*>(dst);
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<uint32_t>(s[i]) << 16;
}

template <>
inline void from_float<c10::BFloat16>(const float* src, c10::BFloat16* dst, int64_t n) {
  at::vec::convert(src, dst, n);
}

inline float vsum(const Vec& v) {
  alignas(64) float lanes[kV];
  v.store(lanes);
  float s = 0.f;
  for (int64_t i = 0; i < kV; ++i) s += lanes[i];
  return s;
}

inline float hsum(const float* x, int64_t n) {
  Vec acc(0.f);
  int64_t i = 0;
  for (; i + kV <= n; i += kV) acc = acc + Vec::loadu(x + i);
  float s = vsum(acc);
  for (; i < n; ++i) s += x[i];
  return s;
}

std::vector<int64_t> host_ints(const torch::Tensor& t) {
  auto c = t.to(torch::kCPU, torch::kLong).contiguous();
  return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
}

// ---------------------------------------------------------------------------------------------
// Varlen attention.
//
// q [Tq, Hq, D], k/v [Tk, Hkv, D] (any row/head strides, unit stride along D); sequence i owns
// q rows cu_q[i]:cu_q[i+1] and k/v rows cu_k[i]:cu_k[i+1]. Causal masking is bottom-right
// aligned (query r of Lq sees own keys j <= r + Lk - Lq), so last-token-only batches are plain
// calls with one query per sequence. With a prefix, sequence i first sees every row of its
// prefix segment prefix_index[i] (read in place from prefix_k/prefix_v) and then its own keys.
//
// One task = (sequence, group of KV heads, block of query rows). A short sequence (at most
// kGroupKeys visible keys) takes all its KV heads in one task, so its q/k/v rows are read whole
// and in order (a row of one head is 64-256 bytes at a stride of the full row: read head by
// head, every row is a cache miss the prefetcher does not see coming); a long one gets a task
// per KV head. A task copies its query rows (scaled) and packs the keys it can see into K^T
// panels [D, kPanel] and V [keys, D] fp32, once for all query heads of a KV head (GQA without
// repeating K/V), then runs an online softmax (fp32, blocks of kKeyBlock keys) per query row
// and head, and writes its output rows whole. Scores are kPanel keys per pass (K^T rows), so no
// horizontal sums are needed.
constexpr int64_t kRowBlock = 64;
constexpr int64_t kKeyBlock = 256;
constexpr int64_t kGroupKeys = 256;  // up to this many keys, one task covers all KV heads
constexpr int64_t kTile = 8;  // query rows per micro-kernel tile
constexpr int64_t kPanel = 2 * kV;  // keys per K^T panel
static_assert(kKeyBlock % kPanel == 0, "key blocks are whole panels");

struct AttnTask {
  int64_t seq, g0, g1, r0, r1;
};

constexpr int64_t kAhead = 8;  // keys packed ahead of their prefetch

// Prefetch n head slices of D elements, ``stride`` elements apart.
template <typename T>
inline void prefetch_rows(const T* p, int64_t n, int64_t stride, int64_t D) {
  for (int64_t h = 0; h < n; ++h)
    for (int64_t b = 0; b < D * static_cast<int64_t>(sizeof(T)); b += 64)
      __builtin_prefetch(reinterpret_cast<const char*>(p + h * stride) + b);
}

// The micro-kernel: a[x] (two vectors) += sum_i b[x * bs + i] * (w[i * ws], w[i * ws + kV]) for the
// kTile rows x: two loads of w and kTile broadcasts feed 2 * kTile independent FMA chains per step.
inline void tile_fma(Vec (&a)[kTile][2], const float* b, int64_t bs, const float* w, int64_t ws, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const Vec w0 = Vec::loadu(w + i * ws), w1 = Vec::loadu(w + i * ws + kV);
    for (int64_t x = 0; x < kTile; ++x) {
      const Vec bx(b[x * bs + i]);
      a[x][0] = at::vec::fmadd(bx, w0, a[x][0]);
      a[x][1] = at::vec::fmadd(bx, w1, a[x][1]);
    }
  }
}

inline float vmax(const float* x, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
  if (n >= kV) {
    Vec acc = Vec::loadu(x);
    for (i = kV; i + kV <= n; i += kV) acc = at::vec::maximum(acc, Vec::loadu(x + i));
    alignas(64) float lanes[kV];
    acc.store(lanes);
    for (int64_t j = 0; j < kV; ++j) m = std::max(m, lanes[j]);
  }
  for (; i < n; ++i) m = std::max(m, x[i]);
  return m;
}

template <typename T>
void attention_impl(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, torch::Tensor& out,
                    const std::vector<int64_t>& cq, const std::vector<int64_t>& ck, bool causal, float scale,
                    const torch::Tensor* pk, const torch::Tensor* pv, const std::vector<int64_t>& cp,
                    const std::vector<int64_t>& pidx) {
  const int64_t hq = q.size(1), hkv = k.size(1), D = q.size(2), rep = hq / hkv;
  const int64_t n = static_cast<int64_t>(cq.size()) - 1;
  const T* Q = q.data_ptr<T>();
  const T* K = k.data_ptr<T>();
  const T* V = v.data_ptr<T>();
  T* O = out.data_ptr<T>();
  const int64_t sq0 = q.stride(0), sq1 = q.stride(1), sk0 = k.stride(0), sk1 = k.stride(1);
  const int64_t sv0 = v.stride(0), sv1 = v.stride(1), so0 = out.stride(0), so1 = out.stride(1);
  const T* PK = pk ? pk->data_ptr<T>() : nullptr;
  const T* PV = pv ? pv->data_ptr<T>() : nullptr;
  const int64_t spk0 = pk ? pk->stride(0) : 0, spk1 = pk ? pk->stride(1) : 0;
  const int64_t spv0 = pv ? pv->stride(0) : 0, spv1 = pv ? pv->stride(1) : 0;
  auto keys_of = [&](int64_t i) {
    const int64_t j = pidx.empty() ? -1 : pidx[i];
    return (j >= 0 ? cp[j + 1] - cp[j] : 0) + ck[i + 1] - ck[i];
  };

  // A short sequence is one task with all its rows (its keys are packed once); when there are
  // too few of them to keep every thread busy, one task per KV head instead. A long sequence
  // gets a task per (KV head, block of kRowBlock rows).
  // Long sequences keep all their rows in one task per KV head too (keys packed once per head)
  // when there are enough of those tasks; else blocks of kRowBlock rows.
  int64_t work = 0, short_seqs = 0, long_seqs = 0;
  for (int64_t i = 0; i < n; ++i) {
    work += (cq[i + 1] - cq[i]) * keys_of(i) * D * hq;
    short_seqs += keys_of(i) <= kGroupKeys;
    long_seqs += keys_of(i) > kGroupKeys;
  }
  const int64_t busy = 4 * at::get_num_threads();
  const int64_t short_step = short_seqs < busy ? 1 : hkv;
  const bool long_whole = long_seqs * hkv >= busy;
  std::vector<AttnTask> tasks;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t lq = cq[i + 1] - cq[i];
    const bool is_short = keys_of(i) <= kGroupKeys;
    const int64_t step = is_short ? short_step : 1;
    const int64_t rb = is_short || long_whole ? std::max<int64_t>(lq, 1) : kRowBlock;
    for (int64_t r0 = 0; r0 < lq; r0 += rb)
      for (int64_t g = 0; g < hkv; g += step) tasks.push_back({i, g, g + step, r0, std::min(lq, r0 + rb)});
  }
  // Long sequences first, so the last tasks to finish are short ones.
  std::stable_sort(tasks.begin(), tasks.end(),
                   [&](const AttnTask& a, const AttnTask& b) { return keys_of(a.seq) > keys_of(b.seq); });

  // A small batch (one short text) runs on the calling thread: waking the pool costs more.
  const int64_t grain = work < (int64_t{1} << 20) ? std::max<int64_t>(1, tasks.size()) : 1;
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), grain, [&](int64_t t0, int64_t t1) {
    std::vector<float> kt, vf, ql, ol, qf(kTile * D), o(kTile * D), s(kTile * kKeyBlock);
    for (int64_t t = t0; t < t1; ++t) {
      const AttnTask& task = tasks[t];
      const int64_t i = task.seq, g0 = task.g0, G = task.g1 - task.g0, nh = G * rep;
      const int64_t lq = cq[i + 1] - cq[i], lk = ck[i + 1] - ck[i], rows = task.r1 - task.r0;
      const int64_t j = pidx.empty() ? -1 : pidx[i];
      const int64_t lp = j >= 0 ? cp[j + 1] - cp[j] : 0;
      const int64_t shift = lk - lq;  // bottom-right causal alignment
      // Keys the block's last row can see.
      const int64_t own = causal ? std::max<int64_t>(0, std::min(lk, task.r1 - 1 + shift + 1)) : lk;
      const int64_t nk = lp + own;
      // K^T in panels of kPanel keys: panel p of KV head gg holds [D, kPanel] contiguous, so the
      // score loop streams it (a plain [D, keys] layout has a row stride that aliases in L1).
      const int64_t npan = (nk + kPanel - 1) / kPanel, head_kt = npan * kPanel * D;
      kt.resize(G * head_kt);
      vf.resize(std::max<int64_t>(G * nk, 1) * D);
      if (nk % kPanel) {  // the last panel's unused keys score 0 (masked below), never garbage
        for (int64_t gg = 0; gg < G; ++gg)
          std::fill(kt.data() + gg * head_kt + (npan - 1) * kPanel * D, kt.data() + (gg + 1) * head_kt, 0.f);
      }
      for (int64_t c = 0; c < nk; ++c) {  // rows in order, all heads of a row together
        const T* krow = c < lp ? PK + (cp[j] + c) * spk0 : K + (ck[i] + c - lp) * sk0;
        const T* vrow = c < lp ? PV + (cp[j] + c) * spv0 : V + (ck[i] + c - lp) * sv0;
        if (c + kAhead < nk) {  // the rows kAhead keys on: their lines arrive while these are packed
          const int64_t f = c + kAhead;
          const T* kf = (f < lp ? PK + (cp[j] + f) * spk0 : K + (ck[i] + f - lp) * sk0) + g0 * (f < lp ? spk1 : sk1);
          const T* vf_ = (f < lp ? PV + (cp[j] + f) * spv0 : V + (ck[i] + f - lp) * sv0) + g0 * (f < lp ? spv1 : sv1);
          prefetch_rows(kf, G, f < lp ? spk1 : sk1, D);
          prefetch_rows(vf_, G, f < lp ? spv1 : sv1, D);
        }
        for (int64_t gg = 0; gg < G; ++gg) {
          const T* kr = krow + (g0 + gg) * (c < lp ? spk1 : sk1);
          float* panel = kt.data() + gg * head_kt + (c / kPanel) * kPanel * D + c % kPanel;
          for (int64_t d = 0; d < D; ++d) panel[d * kPanel] = static_cast<float>(kr[d]);
          to_float(vrow + (g0 + gg) * (c < lp ? spv1 : sv1), vf.data() + (gg * nk + c) * D, D);
        }
      }
      // This block's query rows, scaled, [rows, nh, D]; its output rows, same layout.
      ql.resize(rows * nh * D);
      ol.resize(rows * nh * D);
      for (int64_t r = 0; r < rows; ++r) {
        const T* qrow = Q + (cq[i] + task.r0 + r) * sq0 + g0 * rep * sq1;
        if (r + kAhead < rows) prefetch_rows(qrow + kAhead * sq0, nh, sq1, D);
        for (int64_t hh = 0; hh < nh; ++hh) {
          float* dst = ql.data() + (r * nh + hh) * D;
          to_float(qrow + hh * sq1, dst, D);
          for (int64_t d = 0; d < D; ++d) dst[d] *= scale;
        }
      }
      // Query rows in tiles of kTile (one head at a time): the K^T and V loads are shared by
      // the rows of a tile and the FMAs run kTile x 2 independent chains.
      for (int64_t hh = 0; hh < nh; ++hh) {
        const int64_t gg = hh / rep;
        const float* ktg = kt.data() + gg * head_kt;
        const float* vg = vf.data() + gg * nk * D;
        for (int64_t r = 0; r < rows; r += kTile) {
          const int64_t nr = std::min(kTile, rows - r);
          int64_t end[kTile], end_max = 0;
          float m[kTile], l[kTile];
          for (int64_t x = 0; x < kTile; ++x) {
            const int64_t lr = r + std::min(x, nr - 1);  // padding rows repeat the last one
            const int64_t row = task.r0 + lr;
            end[x] = causal ? lp + std::max<int64_t>(0, std::min(lk, row + shift + 1)) : nk;
            end_max = std::max(end_max, end[x]);
            std::copy_n(ql.data() + (lr * nh + hh) * D, D, qf.data() + x * D);
            m[x] = -std::numeric_limits<float>::infinity();
            l[x] = 0.f;
          }
          std::fill(o.begin(), o.end(), 0.f);
          for (int64_t b0 = 0; b0 < end_max; b0 += kKeyBlock) {
            const int64_t nb = std::min(kKeyBlock, end_max - b0);
            // s[x][c] = q_x . k[b0 + c]: kTile rows x one panel (2 vectors of keys) per pass over D
            const int64_t nbv = (nb + kPanel - 1) / kPanel * kPanel;
            for (int64_t c = 0; c < nbv; c += kPanel) {
              Vec a[kTile][2];
              for (int64_t x = 0; x < kTile; ++x) a[x][0] = a[x][1] = Vec(0.f);
              // b0 + c is a multiple of kPanel: the panel's row d holds its keys' element d
              tile_fma(a, qf.data(), D, ktg + (b0 + c) * D, kPanel, D);
              for (int64_t x = 0; x < kTile; ++x) {
                a[x][0].store(s.data() + x * kKeyBlock + c);
                a[x][1].store(s.data() + x * kKeyBlock + c + kV);
              }
            }
            // online softmax per row; keys at or past a row's end get p = 0
            for (int64_t x = 0; x < kTile; ++x) {
              float* si = s.data() + x * kKeyBlock;
              const int64_t vis = std::max<int64_t>(0, std::min(nb, end[x] - b0));
              const float m_new = std::max(m[x], vmax(si, vis));
              if (vis == 0 || m_new == -std::numeric_limits<float>::infinity()) {
                std::fill(si, si + nbv, 0.f);
                continue;
              }
              if (m[x] != -std::numeric_limits<float>::infinity()) {  // rescale what earlier blocks summed
                const float alpha = std::exp(m[x] - m_new);
                if (alpha != 1.f) {
                  const Vec av(alpha);
                  int64_t d = 0;
                  for (; d + kV <= D; d += kV) (Vec::loadu(o.data() + x * D + d) * av).store(o.data() + x * D + d);
                  for (; d < D; ++d) o[x * D + d] *= alpha;
                }
                l[x] *= alpha;
              }
              m[x] = m_new;
              const Vec mv(m_new);
              int64_t c = 0;
              for (; c + kV <= vis; c += kV) (Vec::loadu(si + c) - mv).exp_u20().store(si + c);
              for (; c < vis; ++c) si[c] = std::exp(si[c] - m_new);
              std::fill(si + vis, si + nbv, 0.f);
              l[x] += hsum(si, vis);
            }
            // o[x] += sum_c p[x][c] v[b0 + c]: kTile rows x 2 vectors of D per pass over the keys
            int64_t d = 0;
            for (; d + 2 * kV <= D; d += 2 * kV) {
              Vec a[kTile][2];
              for (int64_t x = 0; x < kTile; ++x) {
                a[x][0] = Vec::loadu(o.data() + x * D + d);
                a[x][1] = Vec::loadu(o.data() + x * D + d + kV);
              }
              tile_fma(a, s.data(), kKeyBlock, vg + b0 * D + d, D, nb);
              for (int64_t x = 0; x < kTile; ++x) {
                a[x][0].store(o.data() + x * D + d);
                a[x][1].store(o.data() + x * D + d + kV);
              }
            }
            for (; d < D; ++d) {
              for (int64_t c = 0; c < nb; ++c) {
                const float vx = vg[(b0 + c) * D + d];
                for (int64_t x = 0; x < kTile; ++x) o[x * D + d] += s[x * kKeyBlock + c] * vx;
              }
            }
          }
          for (int64_t x = 0; x < nr; ++x) {
            float* dst = ol.data() + ((r + x) * nh + hh) * D;
            const float inv = l[x] > 0.f ? 1.f / l[x] : 0.f;  // no visible key: zeros
            for (int64_t d = 0; d < D; ++d) dst[d] = o[x * D + d] * inv;
          }
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        T* orow = O + (cq[i] + task.r0 + r) * so0 + g0 * rep * so1;
        for (int64_t hh = 0; hh < nh; ++hh) from_float(ol.data() + (r * nh + hh) * D, orow + hh * so1, D);
      }
    }
  });
}

torch::Tensor varlen_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor cu_seqlens_q,
                               torch::Tensor cu_seqlens_k, bool causal, double scale,
                               c10::optional<torch::Tensor> prefix_k, c10::optional<torch::Tensor> prefix_v,
                               c10::optional<torch::Tensor> cu_seqlens_p, c10::optional<torch::Tensor> prefix_index) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "q, k, v must be [T, H, D]");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "q, k, v dtypes differ");
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(2) == q.size(2), "k, v must be [Tk, Hkv, D]");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "Hq must be a multiple of Hkv");
  auto unit = [](const torch::Tensor& t) { return t.stride(2) == 1 ? t : t.contiguous(); };
  q = unit(q);
  k = unit(k);
  v = unit(v);
  auto out = torch::empty(q.sizes(), q.options());
  const auto cq = host_ints(cu_seqlens_q), ck = host_ints(cu_seqlens_k);
  TORCH_CHECK(cq.size() == ck.size(), "cu_seqlens_q and cu_seqlens_k must have the same length");
  std::vector<int64_t> cp, pidx;
  torch::Tensor pk, pv;
  const bool has_prefix = prefix_index.has_value();
  if (has_prefix) {
    TORCH_CHECK(prefix_k.has_value() && prefix_v.has_value() && cu_seqlens_p.has_value(),
                "prefix_index needs prefix_k, prefix_v and cu_seqlens_p");
    pk = unit(*prefix_k);
    pv = unit(*prefix_v);
    TORCH_CHECK(pk.scalar_type() == q.scalar_type() && pv.scalar_type() == q.scalar_type(), "prefix dtype");
    TORCH_CHECK(pk.size(1) == k.size(1) && pk.size(2) == k.size(2) && pk.sizes() == pv.sizes(),
                "prefix_k/prefix_v must be [total_p, Hkv, D]");
    cp = host_ints(*cu_seqlens_p);
    pidx = host_ints(*prefix_index);
    TORCH_CHECK(pidx.size() + 1 == cq.size(), "prefix_index needs one entry per sequence");
  }
  if (q.numel() == 0 || cq.size() < 2) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "varlen_attention", [&] {
    attention_impl<scalar_t>(q, k, v, out, cq, ck, causal, static_cast<float>(scale), has_prefix ? &pk : nullptr,
                             has_prefix ? &pv : nullptr, cp, pidx);
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// Row-wise fused ops: rows split over threads, each row in fp32.
// Rows per chunk: about 256k elements, so a small batch (one text) runs on the calling thread:
// waking the other threads for a few microseconds of work costs tens of microseconds.
inline int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, 262144 / std::max<int64_t>(cols, 1)); }

torch::Tensor rows_of(const torch::Tensor& x) {
  auto x2 = x.reshape({-1, x.size(-1)});
  return x2.stride(1) == 1 ? x2 : x2.contiguous();
}

// out = norm(x [+ residual]) * (offset + w); returns (out, x + residual or empty)
std::vector<torch::Tensor> rms_norm(torch::Tensor x, c10::optional<torch::Tensor> residual, torch::Tensor weight,
                                    double eps, double offset) {
  const int64_t H = x.size(-1);
  TORCH_CHECK(weight.numel() == H, "weight size != hidden size");
  auto x2 = rows_of(x);
  const int64_t rows = x2.size(0);
  auto out = torch::empty({rows, H}, x.options());
  torch::Tensor r2, sum;
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type(), "residual");
    r2 = rows_of(*residual);
    sum = torch::empty({rows, H}, x.options());
  }
  auto w = weight.to(torch::kFloat).contiguous();
  const float* W = w.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    const scalar_t* X = x2.data_ptr<scalar_t>();
    const scalar_t* R = r2.defined() ? r2.data_ptr<scalar_t>() : nullptr;
    scalar_t* Y = out.data_ptr<scalar_t>();
    scalar_t* S = sum.defined() ? sum.data_ptr<scalar_t>() : nullptr;
    const int64_t sx = x2.stride(0), sr = R ? r2.stride(0) : 0;
    at::parallel_for(0, rows, row_grain(H), [&](int64_t a, int64_t b) {
      std::vector<float> buf(H), tmp(H);
      for (int64_t i = a; i < b; ++i) {
        to_float(X + i * sx, buf.data(), H);
        if (R) {
          to_float(R + i * sr, tmp.data(), H);
          // the sum is rounded to the input dtype first, as the reference does
          for (int64_t c = 0; c < H; ++c) {
            const scalar_t z = static_cast<scalar_t>(buf[c] + tmp[c]);
            S[i * H + c] = z;
            buf[c] = static_cast<float>(z);
          }
        }
        Vec acc(0.f);
        int64_t c = 0;
        for (; c + kV <= H; c += kV) {
          const Vec xv = Vec::loadu(buf.data() + c);
          acc = at::vec::fmadd(xv, xv, acc);
        }
        float ss = vsum(acc);
        for (; c < H; ++c) ss += buf[c] * buf[c];
        const float rstd = 1.f / std::sqrt(ss / H + static_cast<float>(eps));
        const float off = static_cast<float>(offset);
        for (c = 0; c < H; ++c) tmp[c] = buf[c] * rstd * (W[c] + off);
        from_float(tmp.data(), Y + i * H, H);
      }
    });
  });
  out = out.view(x.sizes());
  if (sum.defined()) return {out, sum.view(x.sizes())};
  return {out, torch::Tensor()};
}

// out = LayerNorm(x [+ residual]) * w + b, fp32 statistics (two passes over the row)
torch::Tensor layer_norm(torch::Tensor x, c10::optional<torch::Tensor> residual, torch::Tensor weight,
                         torch::Tensor bias, double eps) {
  const int64_t H = x.size(-1);
  TORCH_CHECK(weight.numel() == H && bias.numel() == H, "weight/bias size != hidden size");
  auto x2 = rows_of(x);
  const int64_t rows = x2.size(0);
  auto out = torch::empty({rows, H}, x.options());
  torch::Tensor r2;
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type(), "residual");
    r2 = rows_of(*residual);
  }
  auto w = weight.to(torch::kFloat).contiguous(), bb = bias.to(torch::kFloat).contiguous();
  const float* W = w.data_ptr<float>();
  const float* B = bb.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "layer_norm", [&] {
    const scalar_t* X = x2.data_ptr<scalar_t>();
    const scalar_t* R = r2.defined() ? r2.data_ptr<scalar_t>() : nullptr;
    scalar_t* Y = out.data_ptr<scalar_t>();
    const int64_t sx = x2.stride(0), sr = R ? r2.stride(0) : 0;
    at::parallel_for(0, rows, row_grain(H), [&](int64_t a, int64_t b) {
      std::vector<float> buf(H), tmp(H);
      for (int64_t i = a; i < b; ++i) {
        to_float(X + i * sx, buf.data(), H);
        if (R) {
          to_float(R + i * sr, tmp.data(), H);
          for (int64_t c = 0; c < H; ++c) buf[c] = static_cast<float>(static_cast<scalar_t>(buf[c] + tmp[c]));
        }
        const float mean = hsum(buf.data(), H) / H;
        Vec acc(0.f);
        const Vec mv(mean);
        int64_t c = 0;
        for (; c + kV <= H; c += kV) {
          const Vec dv = Vec::loadu(buf.data() + c) - mv;
          acc = at::vec::fmadd(dv, dv, acc);
        }
        float var = vsum(acc);
        for (; c < H; ++c) var += (buf[c] - mean) * (buf[c] - mean);
        const float rstd = 1.f / std::sqrt(var / H + static_cast<float>(eps));
        c = 0;
        const Vec rv(rstd);
        for (; c + kV <= H; c += kV) {
          const Vec y = (Vec::loadu(buf.data() + c) - mv) * rv;
          at::vec::fmadd(y, Vec::loadu(W + c), Vec::loadu(B + c)).store(tmp.data() + c);
        }
        for (; c < H; ++c) tmp[c] = (buf[c] - mean) * rstd * W[c] + B[c];
        from_float(tmp.data(), Y + i * H, H);
      }
    });
  });
  return out.view(x.sizes());
}

// gate_up [..., 2I] = [gate | up] -> silu(gate) * up [..., I]
torch::Tensor swiglu(torch::Tensor gate_up) {
  const int64_t I2 = gate_up.size(-1);
  TORCH_CHECK(I2 % 2 == 0, "gate_up's last dim must be even");
  const int64_t I = I2 / 2;
  auto x2 = rows_of(gate_up);
  const int64_t rows = x2.size(0);
  auto sizes = gate_up.sizes().vec();
  sizes.back() = I;
  auto out = torch::empty({rows, I}, gate_up.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate_up.scalar_type(), "swiglu", [&] {
    const scalar_t* X = x2.data_ptr<scalar_t>();
    scalar_t* Y = out.data_ptr<scalar_t>();
    const int64_t sx = x2.stride(0);
    at::parallel_for(0, rows, row_grain(I2), [&](int64_t a, int64_t b) {
      std::vector<float> g(I), u(I);
      for (int64_t i = a; i < b; ++i) {
        to_float(X + i * sx, g.data(), I);
        to_float(X + i * sx + I, u.data(), I);
        int64_t c = 0;
        const Vec one(1.f);
        for (; c + kV <= I; c += kV) {
          const Vec gv = Vec::loadu(g.data() + c);
          (gv / (one + gv.neg().exp_u20()) * Vec::loadu(u.data() + c)).store(g.data() + c);
        }
        for (; c < I; ++c) g[c] = g[c] / (1.f + std::exp(-g[c])) * u[c];
        from_float(g.data(), Y + i * I, I);
      }
    });
  });
  return out.view(sizes);
}

// hidden [T, H] packed, cu_seqlens [n + 1] -> mean over each sequence's rows [n, H] fp32,
// L2-normalised when asked
torch::Tensor mean_pool(torch::Tensor hidden, torch::Tensor cu_seqlens, bool normalize) {
  TORCH_CHECK(hidden.dim() == 2, "hidden must be [T, H]");
  const int64_t H = hidden.size(1);
  auto h = hidden.stride(1) == 1 ? hidden : hidden.contiguous();
  const auto cu = host_ints(cu_seqlens);
  const int64_t n = static_cast<int64_t>(cu.size()) - 1;
  auto out = torch::empty({std::max<int64_t>(n, 0), H}, hidden.options().dtype(torch::kFloat));
  float* Y = out.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "mean_pool", [&] {
    const scalar_t* X = h.data_ptr<scalar_t>();
    const int64_t sh = h.stride(0);
    at::parallel_for(0, n, 1, [&](int64_t a, int64_t b) {
      std::vector<float> row(H);
      for (int64_t i = a; i < b; ++i) {
        float* y = Y + i * H;
        std::fill(y, y + H, 0.f);
        for (int64_t t = cu[i]; t < cu[i + 1]; ++t) {
          to_float(X + t * sh, row.data(), H);
          for (int64_t c = 0; c < H; ++c) y[c] += row[c];
        }
        const float inv = 1.f / std::max<float>(1.f, static_cast<float>(cu[i + 1] - cu[i]));
        float ss = 0.f;
        for (int64_t c = 0; c < H; ++c) {
          y[c] *= inv;
          ss += y[c] * y[c];
        }
        if (normalize) {
          const float s = 1.f / std::max(std::sqrt(ss), 1e-12f);
          for (int64_t c = 0; c < H; ++c) y[c] *= s;
        }
      }
    });
  });
  return out;
}

}  // namespace

// ---- int8 linear: per-row activation quantization around torch._int_mm (kernels/int8_linear.py) ----
//
// quantize_rows: x fp32 [T, K] (times inv_smooth [K]) -> q int8 [T, K], scale [T], zero int32 [T], with
// x ~ scale * (q - zero), the range [min(x, 0), max(x, 0)] over 256 levels. One row at a time, so a
// row's codes never depend on the other rows of the batch. ``as_uint8``: the codes as uint8 q + 128 (the
// bit pattern of q with its sign bit flipped, what oneDNN's u8s8 GEMM takes) and zero + 128 with them.
std::vector<torch::Tensor> quantize_rows(const torch::Tensor& x, const c10::optional<torch::Tensor>& inv_smooth,
                                         bool as_uint8) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat, "quantize_rows: x must be fp32 [T, K]");
  auto xc = x.contiguous();
  const int64_t T = xc.size(0), K = xc.size(1);
  torch::Tensor is;
  if (inv_smooth.has_value()) {
    is = inv_smooth->to(torch::kFloat).contiguous();
    TORCH_CHECK(is.numel() == K, "quantize_rows: inv_smooth size != K");
  }
  auto q = torch::empty({T, K}, xc.options().dtype(as_uint8 ? torch::kByte : torch::kChar));
  auto scale = torch::empty({T}, xc.options());
  auto zero = torch::empty({T}, xc.options().dtype(torch::kInt));
  const float* X = xc.data_ptr<float>();
  const float* IS = is.defined() ? is.data_ptr<float>() : nullptr;
  int8_t* Q = static_cast<int8_t*>(q.data_ptr());
  const int8_t flip = as_uint8 ? static_cast<int8_t>(0x80) : 0;  // q ^ 0x80 == q + 128 as uint8
  float* S = scale.data_ptr<float>();
  int32_t* Z = zero.data_ptr<int32_t>();
  at::parallel_for(0, T, row_grain(K), [&](int64_t a, int64_t b) {
    std::vector<float> buf(K);
    for (int64_t t = a; t < b; ++t) {
      const float* xr = X + t * K;
      float* v = buf.data();
      if (IS) {
        for (int64_t k = 0; k < K; ++k) v[k] = xr[k] * IS[k];
      } else {
        std::copy(xr, xr + K, v);
      }
      Vec vlo(0.f), vhi(0.f);
      int64_t k = 0;
      for (; k + kV <= K; k += kV) {
        const Vec x8 = Vec::loadu(v + k);
        vlo = at::vec::minimum(vlo, x8);
        vhi = at::vec::maximum(vhi, x8);
      }
      alignas(64) float lanes_lo[kV], lanes_hi[kV];
      vlo.store(lanes_lo);
      vhi.store(lanes_hi);
      float lo = 0.f, hi = 0.f;
      for (int64_t i = 0; i < kV; ++i) {
        lo = std::min(lo, lanes_lo[i]);
        hi = std::max(hi, lanes_hi[i]);
      }
      for (; k < K; ++k) {
        lo = std::min(lo, v[k]);
        hi = std::max(hi, v[k]);
      }
      const float sc = std::max((hi - lo) / 255.0f, 1e-12f);
      const float z = std::nearbyint(-lo / sc) - 128.0f;
      int8_t* qr = Q + t * K;
      k = 0;
#if defined(CPU_CAPABILITY_AVX512)
      // 16 codes at a time: x / sc rounded half to even (the default rounding mode, as torch.round),
      // plus the zero point, narrowed with signed saturation (the clamp to [-128, 127]); |x / sc| <= 255.
      const __m512 vs = _mm512_set1_ps(sc);
      const __m512i vzi = _mm512_set1_epi32(static_cast<int32_t>(z));
      const __m128i vflip = _mm_set1_epi8(flip);
      for (; k + 16 <= K; k += 16) {
        const __m512i r = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_div_ps(_mm512_loadu_ps(v + k), vs)), vzi);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(qr + k), _mm_xor_si128(_mm512_cvtsepi32_epi8(r), vflip));
      }
#endif
      for (; k < K; ++k) {
        const float r = std::nearbyint(v[k] / sc) + z;
        qr[k] = static_cast<int8_t>(static_cast<int8_t>(std::min(127.0f, std::max(-128.0f, r))) ^ flip);
      }
      S[t] = sc;
      Z[t] = static_cast<int32_t>(z) + (as_uint8 ? 128 : 0);
    }
  });
  return {q, scale, zero};
}

// dequantize_rows: y fp32 [T, N] = act((acc - zero * w_sum) * scale * w_scale + bias); act 0 none,
// 1 GELU (erf), 2 GELU (tanh). It matches the torch reference to float rounding (the compiler may fuse
// the multiply-adds); each row is computed alone, so a row's result never depends on its batch. ``acc``
// int32, or fp32 holding the int32 sums as oneDNN's u8s8 GEMM writes them (exact below 2^24). ``out_bf16``:
// y written as bf16 instead (each row computed in fp32, then rounded as torch's cast rounds), for a bf16
// GEMM that reads it: no fp32 tensor written, no separate cast.
torch::Tensor dequantize_rows(const torch::Tensor& acc, const torch::Tensor& scale, const torch::Tensor& zero,
                              const torch::Tensor& w_sum, const torch::Tensor& w_scale,
                              const c10::optional<torch::Tensor>& bias, int64_t act, bool out_bf16) {
  TORCH_CHECK(acc.dim() == 2 && (acc.scalar_type() == torch::kInt || acc.scalar_type() == torch::kFloat),
              "dequantize_rows: acc must be int32 or fp32 [T, N]");
  const bool facc = acc.scalar_type() == torch::kFloat;
  auto ac = acc.contiguous();
  const int64_t T = ac.size(0), N = ac.size(1);
  auto sc = scale.contiguous(), zc = zero.to(torch::kInt).contiguous();
  auto ws = w_sum.to(torch::kInt).contiguous(), wsc = w_scale.to(torch::kFloat).contiguous();
  TORCH_CHECK(sc.numel() == T && zc.numel() == T && ws.numel() == N && wsc.numel() == N, "dequantize_rows: sizes");
  torch::Tensor bb;
  if (bias.has_value()) {
    bb = bias->to(torch::kFloat).contiguous();
    TORCH_CHECK(bb.numel() == N, "dequantize_rows: bias size != N");
  }
  auto y = torch::empty({T, N}, ac.options().dtype(out_bf16 ? torch::kBFloat16 : torch::kFloat));
  const int32_t* A = facc ? nullptr : ac.data_ptr<int32_t>();
  const float* AF = facc ? ac.data_ptr<float>() : nullptr;
  const float* S = sc.data_ptr<float>();
  const int32_t* Z = zc.data_ptr<int32_t>();
  const int32_t* WS = ws.data_ptr<int32_t>();
  const float* WSC = wsc.data_ptr<float>();
  const float* B = bb.defined() ? bb.data_ptr<float>() : nullptr;
  float* Y = out_bf16 ? nullptr : y.data_ptr<float>();
  uint16_t* YB = out_bf16 ? reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()) : nullptr;
  at::parallel_for(0, T, row_grain(N), [&](int64_t a, int64_t b) {
    std::vector<float> row(out_bf16 ? N : 0);  // bf16 output: each row in fp32 here first
    for (int64_t t = a; t < b; ++t) {
      const int32_t* ar = facc ? nullptr : A + t * N;
      const float* afr = facc ? AF + t * N : nullptr;
      float* yr = out_bf16 ? row.data() : Y + t * N;
      const int32_t z = Z[t];
      const float s = S[t];
      int64_t n = 0;
#if defined(CPU_CAPABILITY_AVX512)
      // int32 -> fp32 with both scales and the bias, 16 columns at a time (the activation is a second
      // pass over the row, still in cache: measured faster than one loop doing both).
      const __m512i vz = _mm512_set1_epi32(z);
      const Vec vs(s);
      for (; n + 16 <= N; n += 16) {
        const __m512i zw = _mm512_mullo_epi32(vz, _mm512_loadu_si512(WS + n));
        const __m512 d = facc ? _mm512_sub_ps(_mm512_loadu_ps(afr + n), _mm512_cvtepi32_ps(zw))
                              : _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_loadu_si512(ar + n), zw));
        Vec v = Vec(d) * vs * Vec::loadu(WSC + n);
        if (B) v = v + Vec::loadu(B + n);
        v.store(yr + n);
      }
#endif
      for (; n < N; ++n) {
        const float d = facc ? afr[n] - static_cast<float>(z * WS[n]) : static_cast<float>(ar[n] - z * WS[n]);
        float v = d * s * WSC[n];
        yr[n] = B ? v + B[n] : v;
      }
      if (act == 1 || act == 2) {
        const Vec half(0.5f), one(1.0f), rsqrt2(0.70710678118654752f), k0(0.7978845608028654f), k1(0.044715f);
        n = 0;
        for (; n + kV <= N; n += kV) {
          const Vec v = Vec::loadu(yr + n);
          const Vec inner = act == 1 ? (v * rsqrt2).erf() : (k0 * (v + k1 * v * v * v)).tanh();
          (half * v * (one + inner)).store(yr + n);
        }
        for (; n < N; ++n) {
          const float v = yr[n];
          const float inner = act == 1 ? std::erf(v * 0.70710678118654752f)
                                       : std::tanh(0.7978845608028654f * (v + 0.044715f * v * v * v));
          yr[n] = 0.5f * v * (1.0f + inner);
        }
      }
      if (out_bf16) {  // rounded to nearest even, NaN to 0xffff: the bits of torch's fp32 -> bf16 cast
        uint16_t* br = YB + t * N;
        n = 0;
#if defined(CPU_CAPABILITY_AVX512)
        const __m512i one = _mm512_set1_epi32(1), half = _mm512_set1_epi32(0x7fff), qnan = _mm512_set1_epi32(0xffff);
        for (; n + 16 <= N; n += 16) {
          const __m512 v = _mm512_loadu_ps(yr + n);
          const __m512i u = _mm512_castps_si512(v);
          const __m512i bias16 = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(u, 16), one), half);
          __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, bias16), 16);
          r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), qnan);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(br + n), _mm512_cvtepi32_epi16(r));
        }
#endif
        for (; n < N; ++n) br[n] = std::isnan(yr[n]) ? uint16_t(0xffff) : at::BFloat16(yr[n]).x;
      }
    }
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("varlen_attention", &varlen_attention, "packed varlen attention (causal/bidirectional, GQA, prefix)");
  m.def("rms_norm", &rms_norm, "RMSNorm with an optional fused residual add");
  m.def("layer_norm", &layer_norm, "LayerNorm with an optional fused residual add");
  m.def("swiglu", &swiglu, "silu(gate) * up");
  m.def("mean_pool", &mean_pool, "mean pooling over packed sequences, optionally L2-normalised");
  m.def("quantize_rows", &quantize_rows, "int8 codes, scale and zero point of each row (asymmetric, 0 in range)",
        py::arg("x"), py::arg("inv_smooth"), py::arg("as_uint8") = false);
  m.def("dequantize_rows", &dequantize_rows, "fp32 (or bf16) rows from an int8 GEMM's int32 result (+ bias, GELU)",
        py::arg("acc"), py::arg("scale"), py::arg("zero"), py::arg("w_sum"), py::arg("w_scale"), py::arg("bias"),
        py::arg("act"), py::arg("out_bf16") = false);
  m.def("num_threads", []() { return at::get_num_threads(); });
  m.def("vec_size", []() { return kV; });
}
