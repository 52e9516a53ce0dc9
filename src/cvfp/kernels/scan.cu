// Persistent cooperative exact-scan kernel for the CVFP step (SPEC section 2).
//
// One launch runs the whole stream c_t = F(c_{t-1}, x_t). F is L CVFPLayers:
//   z = [c; x] (D = C + E);  u = z + ReLU(W z + b);  c = mix(LN_c(u[:C])), x = mix(LN_x(u[C:]))
// with mix(y) = y (m = 1), u (m = 0), (1 - m) u + m y otherwise.
//
// Work split: G cooperative CTAs (one per SM). CTA b owns the rows [b D / G, (b + 1) D / G) of
// every layer's W (at most RMAX rows). Each warp owns one (row, column split) item of the
// CTA's rows and keeps it for the whole stream. Every CTA holds the full z (D floats) in
// shared memory and recomputes both LayerNorms itself, so one grid barrier per layer suffices:
//   matvec on its rows -> u rows + (mean, M2) of its rows to global -> grid barrier ->
//   read all of u and the G partial statistics (one L2 round trip) -> Chan-combine ->
//   normalise into z -> next layer.
// Weights: as many of the CTA's rows as fit stay in shared memory for the whole stream
// (70 of 72 rows for bf16 at 6 x 1536 x 1536, 35 for fp32); the others are re-read from global
// memory (L2) every token, into registers, one layer ahead, so that the load hides behind the barrier.
// Arithmetic and accumulation are fp32; weights are fp32 or bf16 (template parameter).
//
// Measured on one H200 (benchmarks/H200.md): 51.9 us/token at 6 x 768 with stats_mode 0, of
// which 1.05 us per grid barrier and 5.3 us per layer in the merge of the partial statistics
// (a hot spot: every warp read them). stats_mode 1 (warp 0 merges; the default since): 35.5
// us/token in a second run, where mode 0 ran at 54.8, with the same bits as mode 0.
//
// This file needs only the CUDA runtime; the torch binding is binding.cpp.

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <stdint.h>

namespace cvfp_scan {

constexpr int NWARPS = 24;          // 768 threads: 85 registers a thread at one CTA per SM
constexpr int NTHREADS = NWARPS * 32;
constexpr int MAXPF = 6;            // 16-byte weight vectors per lane per item (registers)
constexpr int MAXG = 160;           // CTAs at most (per-CTA LayerNorm group counts live in shared memory)
constexpr int EPT = 3;              // z elements per thread in the normalise step (D <= 2304)
constexpr int REDP = 32;            // floats reserved for the cross-warp partial sums

struct Params {
  const float* emb;     // N x E
  const float* prev;    // N x C (teacher-forced: row t is the context fed at token t) or null
  const float* init;    // C (c_{-1}); ignored when prev is set
  float* out_c;         // N x C
  float* out_x;         // N x E or null
  const void* W;        // L x D x D, row-major (out, in), float or bf16
  const float* bias;    // L x D
  const float* gc;      // L x C
  const float* bc;      // L x C
  const float* gx;      // L x E
  const float* bx;      // L x E
  float* ubuf;          // 2 x D
  float* stats;         // 2 x G x 4
  unsigned* counter;    // 1, zero at launch
  int* error;           // 1, zero at launch
  long long N;
  int C, E, D, L;
  int KS;               // column splits per row
  int rmax;             // rows per CTA at most
  int res_rows;         // weight rows resident in shared memory per CTA (over all layers)
  float eps_c, eps_x, mix, one_minus_mix;
  int mix_mode;         // 0: no LayerNorm, 1: LayerNorm only, 2: blend
  int skip_matvec;      // diagnostics (wrong results, timing only), bits: 1 = no matvec (h := b), 2 = no
                        // Chan merge (mean 0, rstd 1), 4 = no grid barrier
  int barrier_mode;     // 0: red.release + ld.acquire poll; 1: __threadfence + atomicAdd, volatile poll,
                        // __threadfence (cooperative groups' pattern); 2: as 0 but reading %globaltimer at
                        // every barrier (the first version); 3: fence.acq_rel + red.relaxed, ld.relaxed poll, fence
  long long timeout_ns; // a barrier waiting longer than this aborts the launch (error = 1)
  int stats_mode;       // 0: every warp merges the G partial statistics itself (H200: 51.9 us/token, 54.8 in
                        // the second run); 1: warp 0 merges and broadcasts through shared memory, and the
                        // pre-barrier __syncthreads becomes a __syncwarp (second H200 run: 35.5 us/token,
                        // predicted ~21; bit-equal to mode 0 over 65,536 tokens; the default in fused.py)
};

__device__ __forceinline__ unsigned ld_acquire(const unsigned* p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void red_release_add(unsigned* p, unsigned v) {
  asm volatile("red.release.gpu.global.add.u32 [%0], %1;" :: "l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ long long globaltimer() {
  long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(s), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;" ::: "memory"); }

__device__ __forceinline__ unsigned ld_relaxed(const unsigned* p) {
  unsigned v;
  asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void red_relaxed_add(unsigned* p, unsigned v) {
  asm volatile("red.relaxed.gpu.global.add.u32 [%0], %1;" :: "l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ void fence_acq_rel() { asm volatile("fence.acq_rel.gpu;" ::: "memory"); }

__device__ __forceinline__ unsigned ld_volatile(const unsigned* p) {
  unsigned v;
  asm volatile("ld.volatile.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// Grid barrier, called by thread 0 of every CTA between two __syncthreads(). `target` is the
// counter value once every CTA has arrived (monotonic, compared wrap-safe). A wait longer
// than timeout_ns sets *error and returns true (the caller aborts). The timer is read only
// after 2^14 polls, so a normal barrier never touches %globaltimer.
__device__ __forceinline__ bool grid_arrive_wait(unsigned* counter, unsigned target, int mode, long long timeout_ns,
                                                 int* error) {
  if (mode == 1) {
    __threadfence();
    atomicAdd(counter, 1u);
  } else if (mode == 3) {
    fence_acq_rel();
    red_relaxed_add(counter, 1u);
  } else {
    red_release_add(counter, 1u);
  }
  long long t0 = (mode == 2) ? globaltimer() : 0;
  unsigned spins = 0;
  for (;;) {
    const unsigned v = (mode == 1) ? ld_volatile(counter) : (mode == 3 ? ld_relaxed(counter) : ld_acquire(counter));
    if (static_cast<int>(v - target) >= 0) break;
    ++spins;
    if (mode == 2) {
      if ((spins & 255u) == 0u && globaltimer() - t0 > timeout_ns) { atomicExch(error, 1); return true; }
    } else if ((spins & 16383u) == 0u) {
      const long long now = globaltimer();
      if (t0 == 0) t0 = now;
      else if (now - t0 > timeout_ns) { atomicExch(error, 1); return true; }
    }
  }
  if (mode == 1) __threadfence();
  if (mode == 3) fence_acq_rel();
  return false;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Chan et al.: merge (n, mean, M2) of two disjoint groups; `a` is always the lower-indexed
// group, so every lane and every CTA merges in the same order and gets the same bits.
__device__ __forceinline__ void chan_merge(float& na, float& ma, float& Ma, float nb, float mb, float Mb) {
  if (nb == 0.f) return;
  if (na == 0.f) { na = nb; ma = mb; Ma = Mb; return; }
  float n = na + nb;
  float d = mb - ma;
  float f = __fdividef(nb, n);
  ma = ma + d * f;
  Ma = Ma + Mb + d * d * na * f;
  na = n;
}

template <typename WT> struct VecOf;
template <> struct VecOf<float> { static constexpr int N = 4; };
template <> struct VecOf<__nv_bfloat16> { static constexpr int N = 8; };

// dot of one 16-byte weight vector with VecOf<WT>::N floats of z (shared memory, 16-byte aligned)
template <typename WT>
__device__ __forceinline__ float dot16(const uint4& w, const float* z, float acc) {
  if constexpr (sizeof(WT) == 4) {
    float4 zz = *reinterpret_cast<const float4*>(z);
    acc = fmaf(__uint_as_float(w.x), zz.x, acc);
    acc = fmaf(__uint_as_float(w.y), zz.y, acc);
    acc = fmaf(__uint_as_float(w.z), zz.z, acc);
    acc = fmaf(__uint_as_float(w.w), zz.w, acc);
  } else {
    float4 z0 = *reinterpret_cast<const float4*>(z);
    float4 z1 = *reinterpret_cast<const float4*>(z + 4);
    // bf16 -> fp32 is a 16-bit shift: low half first in memory
    acc = fmaf(__uint_as_float(w.x << 16), z0.x, acc);
    acc = fmaf(__uint_as_float(w.x & 0xffff0000u), z0.y, acc);
    acc = fmaf(__uint_as_float(w.y << 16), z0.z, acc);
    acc = fmaf(__uint_as_float(w.y & 0xffff0000u), z0.w, acc);
    acc = fmaf(__uint_as_float(w.z << 16), z1.x, acc);
    acc = fmaf(__uint_as_float(w.z & 0xffff0000u), z1.y, acc);
    acc = fmaf(__uint_as_float(w.w << 16), z1.z, acc);
    acc = fmaf(__uint_as_float(w.w & 0xffff0000u), z1.w, acc);
  }
  return acc;
}

__device__ __forceinline__ int row_start(int b, int D, int G) {
  return static_cast<int>((static_cast<long long>(b) * D) / G);
}

template <typename WT>
__global__ void __launch_bounds__(NTHREADS, 1) scan_kernel(const Params p) {
  constexpr int VEC = VecOf<WT>::N;
  extern __shared__ __align__(16) float smem[];
  __shared__ int s_abort;
  __shared__ float s_stat[4];

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int G = gridDim.x;
  const int b = blockIdx.x;
  const int C = p.C, E = p.E, D = p.D, L = p.L;
  const int DV = D / VEC;  // 16-byte vectors per row
  const int r0 = row_start(b, D, G);
  const int R = row_start(b + 1, D, G) - r0;

  float* z = smem;                 // D
  float* nxt = smem + D;           // D: staging of the next token's [prev; x]
  float* red = smem + 2 * D;       // REDP
  float2* cnt = reinterpret_cast<float2*>(smem + 2 * D + REDP);  // G: (c, x) elements of each CTA's rows
  uint4* wsm = reinterpret_cast<uint4*>(smem + 2 * D + REDP + 2 * ((G + 1) & ~1));  // res_rows x DV

  const uint4* Wg = reinterpret_cast<const uint4*>(p.W);
  const int base_q = p.res_rows / L;
  const int extra_q = p.res_rows % L;
  // resident iff local row i < quota(l); slot(l, i) = l * base_q + min(l, extra_q) + i
#define QUOTA(l) (base_q + ((l) < extra_q ? 1 : 0))
#define SLOT(l, i) ((l) * base_q + min((l), extra_q) + (i))

  if (tid == 0) s_abort = 0;

  // resident weight rows -> shared memory, once
  for (int l = 0; l < L; ++l) {
    const int q = min(QUOTA(l), R);
    for (int idx = tid; idx < q * DV; idx += NTHREADS) {
      const int i = idx / DV, v = idx - i * DV;
      wsm[static_cast<long long>(SLOT(l, i)) * DV + v] =
          __ldg(Wg + (static_cast<long long>(l) * D + r0 + i) * DV + v);
    }
  }
  for (int bb = tid; bb < G; bb += NTHREADS) {
    const int a0 = row_start(bb, D, G), a1 = row_start(bb + 1, D, G);
    cnt[bb] = make_float2(static_cast<float>(max(0, min(a1, C) - a0)), static_cast<float>(max(0, a1 - max(a0, C))));
  }
  // z = [c_{-1}; x_0]
  for (int j = tid; j < D; j += NTHREADS) {
    float v;
    if (j < C) v = p.prev ? p.prev[j] : (p.init ? p.init[j] : 0.f);
    else v = p.emb[j - C];
    z[j] = v;
  }

  // this warp's item: local row wi, column split ws, 16-byte vectors [vs, ve)
  const int wi = warp / p.KS;
  const int ws = warp - wi * p.KS;
  const bool active = (warp < p.rmax * p.KS) && (wi < R);
  const int vs = static_cast<int>((static_cast<long long>(ws) * DV) / p.KS);
  const int ve = static_cast<int>((static_cast<long long>(ws + 1) * DV) / p.KS);

  uint4 pf[MAXPF];
#pragma unroll
  for (int k = 0; k < MAXPF; ++k) pf[k] = make_uint4(0u, 0u, 0u, 0u);
  auto prefetch = [&](int l) {
    if (active && !(p.skip_matvec & 1) && wi >= QUOTA(l)) {
      const uint4* src = Wg + (static_cast<long long>(l) * D + r0 + wi) * DV;
#pragma unroll
      for (int k = 0; k < MAXPF; ++k) {
        const int v = vs + lane + 32 * k;
        if (v < ve) pf[k] = __ldcg(src + v);
      }
    }
  };
  prefetch(0);

  // warp 0, lane i < R: this CTA's row r0 + i; bias one layer ahead
  float bias_next = (warp == 0 && lane < R) ? __ldg(p.bias + r0 + lane) : 0.f;

  unsigned target = 0;
  int par = 0;
  const bool teacher = p.prev != nullptr;
  __syncthreads();

  for (long long t = 0; t < p.N; ++t) {
    // stage the next token's inputs (cp.async, 16 bytes per thread), consumed in the last layer
    if (t + 1 < p.N) {
      const int nx4 = E / 4;
      const int nc4 = teacher ? C / 4 : 0;
      for (int q = tid; q < nx4 + nc4; q += NTHREADS) {
        if (q < nc4) cp_async16(nxt + 4 * q, p.prev + (t + 1) * C + 4 * q);
        else cp_async16(nxt + C + 4 * (q - nc4), p.emb + (t + 1) * E + 4 * (q - nc4));
      }
    }
    cp_async_commit();

    for (int l = 0; l < L; ++l) {
      // ---- matvec on this CTA's rows of layer l
      if (active) {
        float acc = 0.f;
        if (!(p.skip_matvec & 1)) {
          if (wi < QUOTA(l)) {
            const uint4* src = wsm + static_cast<long long>(SLOT(l, wi)) * DV;
#pragma unroll
            for (int k = 0; k < MAXPF; ++k) {
              const int v = vs + lane + 32 * k;
              if (v < ve) acc = dot16<WT>(src[v], z + v * VEC, acc);
            }
          } else {
#pragma unroll
            for (int k = 0; k < MAXPF; ++k) {
              const int v = vs + lane + 32 * k;
              if (v < ve) acc = dot16<WT>(pf[k], z + v * VEC, acc);
            }
          }
        }
        acc = warp_sum(acc);
        if (lane == 0) red[warp] = acc;
      }
      __syncthreads();
      const int ln = (l + 1 == L) ? 0 : l + 1;
      prefetch(ln);  // next layer's streamed rows: in flight during the barrier

      // ---- warp 0: bias, ReLU, residual; u rows and their statistics to global
      if (warp == 0) {
        const bool has = lane < R;
        const int r = r0 + lane;
        float u = 0.f;
        if (has) {
          float h = bias_next;
          for (int s = 0; s < p.KS; ++s) h += red[lane * p.KS + s];
          u = z[r] + fmaxf(h, 0.f);
          __stcg(p.ubuf + par * D + r, u);
        }
        bias_next = has ? __ldg(p.bias + static_cast<long long>(ln) * D + r) : 0.f;
        const bool inc = has && r < C;
        const bool inx = has && r >= C;
        const float ncnt = warp_sum(inc ? 1.f : 0.f);
        const float nxcnt = warp_sum(inx ? 1.f : 0.f);
        const float sc = warp_sum(inc ? u : 0.f);
        const float sx = warp_sum(inx ? u : 0.f);
        const float mc = ncnt > 0.f ? sc / ncnt : 0.f;
        const float mx = nxcnt > 0.f ? sx / nxcnt : 0.f;
        const float dc = inc ? u - mc : 0.f;
        const float dx = inx ? u - mx : 0.f;
        const float Mc = warp_sum(dc * dc);
        const float Mx = warp_sum(dx * dx);
        if (lane == 0) __stcg(reinterpret_cast<float4*>(p.stats) + par * G + b, make_float4(mc, Mc, mx, Mx));
      }
      // this thread's LayerNorm parameters for layer l (latency hidden by the barrier)
      float gam[EPT], bet[EPT];
#pragma unroll
      for (int k = 0; k < EPT; ++k) {
        const int j = tid + k * NTHREADS;
        gam[k] = 1.f; bet[k] = 0.f;
        if (j < D && p.mix_mode != 0) {
          if (j < C) { gam[k] = __ldg(p.gc + l * C + j); bet[k] = __ldg(p.bc + l * C + j); }
          else { gam[k] = __ldg(p.gx + l * E + (j - C)); bet[k] = __ldg(p.bx + l * E + (j - C)); }
        }
      }
      if (l == L - 1) cp_async_wait_all();

      // ---- grid barrier (monotonic counter, wrap-safe compare). Only warp 0 wrote what the release must
      // cover; stats_mode 1 orders those stores before thread 0's release by a warp barrier alone (the
      // other warps wait at the __syncthreads below).
      if (p.stats_mode == 0) __syncthreads();
      else __syncwarp();
      target += static_cast<unsigned>(G);
      if (tid == 0 && !(p.skip_matvec & 4) && grid_arrive_wait(p.counter, target, p.barrier_mode, p.timeout_ns, p.error))
        s_abort = 1;
      __syncthreads();
      if (s_abort) return;

      // ---- all of u and the G partial statistics (L2, bypassing L1)
      float uv[EPT];
#pragma unroll
      for (int k = 0; k < EPT; ++k) {
        const int j = tid + k * NTHREADS;
        uv[k] = (j < D) ? __ldcg(p.ubuf + par * D + j) : 0.f;
      }
      // LayerNorm statistics. stats_mode 0: every warp reads the G partials and merges them; on the H200 that
      // made 128 SMs x 24 warps read the same 2 KB of L2, 5.3 us per layer. stats_mode 1: warp 0 alone reads
      // and merges, and broadcasts the result through shared memory (one more __syncthreads).
      float mean_c = 0.f, rstd_c = 1.f, mean_x = 0.f, rstd_x = 1.f;
      if (p.mix_mode != 0 && !(p.skip_matvec & 2)) {
        if (p.stats_mode == 0 || warp == 0) {
          float nA = 0.f, mA = 0.f, MA = 0.f, nB = 0.f, mB = 0.f, MB = 0.f;
          constexpr int PERL = MAXG / 32;
          float4 st[PERL];
#pragma unroll
          for (int m = 0; m < PERL; ++m) {  // all loads first, then the merges
            const int bb = lane + 32 * m;
            st[m] = (bb < G) ? __ldcg(reinterpret_cast<const float4*>(p.stats) + par * G + bb) : make_float4(0.f, 0.f, 0.f, 0.f);
          }
#pragma unroll
          for (int m = 0; m < PERL; ++m) {
            const int bb = lane + 32 * m;
            if (bb < G) {
              const float2 n2 = cnt[bb];
              chan_merge(nA, mA, MA, n2.x, st[m].x, st[m].y);
              chan_merge(nB, mB, MB, n2.y, st[m].z, st[m].w);
            }
          }
          // lane i held CTAs i, i + 32, ...: merge lanes in index order (lower lane is `a`)
#pragma unroll
          for (int o = 1; o < 32; o <<= 1) {
            const float onA = __shfl_xor_sync(0xffffffffu, nA, o);
            const float omA = __shfl_xor_sync(0xffffffffu, mA, o);
            const float oMA = __shfl_xor_sync(0xffffffffu, MA, o);
            const float onB = __shfl_xor_sync(0xffffffffu, nB, o);
            const float omB = __shfl_xor_sync(0xffffffffu, mB, o);
            const float oMB = __shfl_xor_sync(0xffffffffu, MB, o);
            if (lane & o) {  // the other lane is the lower group
              float tn = onA, tm = omA, tM = oMA;
              chan_merge(tn, tm, tM, nA, mA, MA);
              nA = tn; mA = tm; MA = tM;
              tn = onB; tm = omB; tM = oMB;
              chan_merge(tn, tm, tM, nB, mB, MB);
              nB = tn; mB = tm; MB = tM;
            } else {
              chan_merge(nA, mA, MA, onA, omA, oMA);
              chan_merge(nB, mB, MB, onB, omB, oMB);
            }
          }
          mean_c = mA; rstd_c = rsqrtf(MA / static_cast<float>(C) + p.eps_c);
          mean_x = mB; rstd_x = rsqrtf(MB / static_cast<float>(E) + p.eps_x);
          if (p.stats_mode != 0 && lane == 0) {
            s_stat[0] = mean_c; s_stat[1] = rstd_c; s_stat[2] = mean_x; s_stat[3] = rstd_x;
          }
        }
        if (p.stats_mode != 0) {
          __syncthreads();
          mean_c = s_stat[0]; rstd_c = s_stat[1]; mean_x = s_stat[2]; rstd_x = s_stat[3];
        }
      }

      // ---- normalise into z (and the outputs after the last layer)
      const bool last = (l == L - 1);
#pragma unroll
      for (int k = 0; k < EPT; ++k) {
        const int j = tid + k * NTHREADS;
        if (j < D) {
          const float u = uv[k];
          float y = u;
          if (p.mix_mode != 0) {
            const bool isc = j < C;
            const float nrm = (u - (isc ? mean_c : mean_x)) * (isc ? rstd_c : rstd_x) * gam[k] + bet[k];
            y = (p.mix_mode == 1) ? nrm : (p.one_minus_mix * u + p.mix * nrm);
          }
          if (last) {
            if (b == 0) {
              if (j < C) p.out_c[t * C + j] = y;
              else if (p.out_x) p.out_x[t * E + (j - C)] = y;
            }
            if (t + 1 < p.N) z[j] = (j < C && !teacher) ? y : nxt[j];
          } else {
            z[j] = y;
          }
        }
      }
      par ^= 1;
      __syncthreads();
    }
  }
#undef QUOTA
#undef SLOT
}

// Barrier microbenchmark: `iters` grid barriers of `mode` and nothing else (plus the same
// __syncthreads pair). CTA 0 thread 0 writes (clock64 cycles, globaltimer ns) over the loop,
// which also gives the SM clock under this load.
__global__ void barrier_bench_kernel(unsigned* counter, int* error, long long* out, int iters, int mode,
                                     long long timeout_ns) {
  __shared__ int s_abort;
  if (threadIdx.x == 0) s_abort = 0;
  __syncthreads();
  long long c0 = 0, g0 = 0;
  if (blockIdx.x == 0 && threadIdx.x == 0) { c0 = clock64(); g0 = globaltimer(); }
  unsigned target = 0;
  for (int i = 0; i < iters; ++i) {
    __syncthreads();
    target += gridDim.x;
    if (mode >= 0 && threadIdx.x == 0 && grid_arrive_wait(counter, target, mode, timeout_ns, error)) s_abort = 1;
    __syncthreads();
    if (s_abort) return;
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) { out[0] = clock64() - c0; out[1] = globaltimer() - g0; }
}

// ------------------------------------------------------------------ host side

struct Plan {
  int G, KS, rmax, res_rows, smem_bytes, per_lane;
};

static cudaError_t make_plan(int D, int L, int wbytes, int device, int res_rows_cap, Plan* out, const char** why) {
  cudaDeviceProp prop;
  cudaError_t e = cudaGetDeviceProperties(&prop, device);
  if (e != cudaSuccess) return e;
  const int vec = 16 / wbytes;
  if (D % vec != 0) { *why = "context_dim + embed_dim must be a multiple of 16 bytes of weights"; return cudaErrorInvalidValue; }
  const int nsm = prop.multiProcessorCount;
  const int rmax = (D + nsm - 1) / nsm;
  if (rmax > NWARPS) { *why = "too many rows per SM for one warp each (D > 24 x SMs)"; return cudaErrorInvalidValue; }
  const int G = (D + rmax - 1) / rmax;
  int KS = NWARPS / rmax;
  if (KS < 1) KS = 1;
  const int DV = D / vec;
  const int per_split = (DV + KS - 1) / KS;
  const int per_lane = (per_split + 31) / 32;
  if (per_lane > MAXPF) { *why = "rows too long for the register prefetch (raise MAXPF)"; return cudaErrorInvalidValue; }
  if (D > EPT * NTHREADS) { *why = "D > 2304 not supported (raise EPT)"; return cudaErrorInvalidValue; }
  const int fixed = (2 * D + REDP + 2 * ((G + 1) & ~1)) * 4;
  if (G > MAXG) { *why = "too many CTAs (raise MAXG)"; return cudaErrorInvalidValue; }
  const int optin = static_cast<int>(prop.sharedMemPerBlockOptin) - 1024;  // static smem + slack
  int res = (optin - fixed) / (DV * 16);
  if (res < 0) res = 0;
  if (res > L * rmax) res = L * rmax;
  if (res_rows_cap >= 0 && res > res_rows_cap) res = res_rows_cap;
  out->G = G; out->KS = KS; out->rmax = rmax; out->res_rows = res; out->per_lane = per_lane;
  out->smem_bytes = fixed + res * DV * 16;
  return cudaSuccess;
}

template <typename WT>
static cudaError_t launch_t(Params& p, const Plan& plan, cudaStream_t stream, const char** why) {
  auto kern = scan_kernel<WT>;
  cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, plan.smem_bytes);
  if (e != cudaSuccess) { *why = "cudaFuncSetAttribute(max dynamic shared memory)"; return e; }
  int per_sm = 0;
  e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kern, NTHREADS, plan.smem_bytes);
  if (e != cudaSuccess) { *why = "occupancy query"; return e; }
  int dev = 0; cudaGetDevice(&dev);
  int nsm = 0; cudaDeviceGetAttribute(&nsm, cudaDevAttrMultiProcessorCount, dev);
  if (per_sm * nsm < plan.G) { *why = "the grid cannot be co-resident (cooperative launch)"; return cudaErrorCooperativeLaunchTooLarge; }
  p.KS = plan.KS; p.rmax = plan.rmax; p.res_rows = plan.res_rows;
  void* args[] = {&p};
  e = cudaLaunchCooperativeKernel(reinterpret_cast<void*>(kern), dim3(plan.G), dim3(NTHREADS), args,
                                  static_cast<size_t>(plan.smem_bytes), stream);
  if (e != cudaSuccess) { *why = "cudaLaunchCooperativeKernel"; return e; }
  e = cudaGetLastError();
  if (e != cudaSuccess) *why = "kernel launch";
  return e;
}

}  // namespace cvfp_scan

// C entry points used by binding.cpp
extern "C" int cvfp_scan_plan(int D, int L, int wbytes, int device, int res_rows_cap, int* G, int* KS, int* rmax,
                              int* res_rows, int* smem_bytes, int* per_lane, const char** why) {
  cvfp_scan::Plan plan;
  *why = "";
  cudaError_t e = cvfp_scan::make_plan(D, L, wbytes, device, res_rows_cap, &plan, why);
  if (e != cudaSuccess) return static_cast<int>(e);
  *G = plan.G; *KS = plan.KS; *rmax = plan.rmax; *res_rows = plan.res_rows; *smem_bytes = plan.smem_bytes;
  *per_lane = plan.per_lane;
  return 0;
}

extern "C" int cvfp_scan_launch(const float* emb, const float* prev, const float* init, float* out_c, float* out_x,
                                const void* W, int wbytes, const float* bias, const float* gc, const float* bc,
                                const float* gx, const float* bx, float* ubuf, float* stats, unsigned* counter,
                                int* error, long long N, int C, int E, int L, float eps_c, float eps_x, float mix,
                                float one_minus_mix, int mix_mode, int skip_matvec, int barrier_mode,
                                long long timeout_ns, int device, int res_rows_cap, int stats_mode, void* stream,
                                const char** why) {
  using namespace cvfp_scan;
  *why = "";
  const int D = C + E;
  Plan plan;
  cudaError_t e = make_plan(D, L, wbytes, device, res_rows_cap, &plan, why);
  if (e != cudaSuccess) return static_cast<int>(e);
  Params p;
  p.emb = emb; p.prev = prev; p.init = init; p.out_c = out_c; p.out_x = out_x; p.W = W; p.bias = bias;
  p.gc = gc; p.bc = bc; p.gx = gx; p.bx = bx; p.ubuf = ubuf; p.stats = stats; p.counter = counter; p.error = error;
  p.N = N; p.C = C; p.E = E; p.D = D; p.L = L; p.eps_c = eps_c; p.eps_x = eps_x; p.mix = mix;
  p.one_minus_mix = one_minus_mix; p.mix_mode = mix_mode; p.skip_matvec = skip_matvec; p.timeout_ns = timeout_ns;
  p.barrier_mode = barrier_mode;
  p.stats_mode = stats_mode;
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  if (wbytes == 4) e = launch_t<float>(p, plan, s, why);
  else if (wbytes == 2) e = launch_t<__nv_bfloat16>(p, plan, s, why);
  else { *why = "weights must be float32 or bfloat16"; return static_cast<int>(cudaErrorInvalidValue); }
  return static_cast<int>(e);
}

extern "C" const char* cvfp_scan_error_string(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}

extern "C" int cvfp_barrier_bench(unsigned* counter, int* error, long long* out, int iters, int mode, int ctas,
                                  int threads, long long timeout_ns, void* stream) {
  void* args[] = {&counter, &error, &out, &iters, &mode, &timeout_ns};
  cudaError_t e = cudaLaunchCooperativeKernel(reinterpret_cast<void*>(cvfp_scan::barrier_bench_kernel), dim3(ctas),
                                              dim3(threads), args, 0, reinterpret_cast<cudaStream_t>(stream));
  if (e != cudaSuccess) return static_cast<int>(e);
  return static_cast<int>(cudaGetLastError());
}
