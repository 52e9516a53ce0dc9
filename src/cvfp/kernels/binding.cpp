// Torch binding of scan.cu: checks the tensors, allocates outputs and scratch, launches on the
// current stream. Compiled by the host compiler (scan.cu needs only the CUDA runtime).

#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

extern "C" int cvfp_scan_plan(int D, int L, int wbytes, int device, int res_rows_cap, int* G, int* KS, int* rmax,
                              int* res_rows, int* smem_bytes, int* per_lane, const char** why);
extern "C" int cvfp_scan_launch(const float* emb, const float* prev, const float* init, float* out_c, float* out_x,
                                const void* W, int wbytes, const float* bias, const float* gc, const float* bc,
                                const float* gx, const float* bx, float* ubuf, float* stats, unsigned* counter,
                                int* error, long long N, int C, int E, int L, float eps_c, float eps_x, float mix,
                                float one_minus_mix, int mix_mode, int skip_matvec, int barrier_mode,
                                long long timeout_ns, int device, int res_rows_cap, int stats_mode, void* stream,
                                const char** why);
extern "C" int cvfp_barrier_bench(unsigned* counter, int* error, long long* out, int iters, int mode, int ctas,
                                  int threads, long long timeout_ns, void* stream);
extern "C" const char* cvfp_scan_error_string(int code);

namespace {

void check_f32(const torch::Tensor& t, const char* name, at::Device dev) {
  TORCH_CHECK(t.device() == dev, name, " must be on ", dev, ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == torch::kFloat32, name, " must be float32");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

pybind11::dict plan(int64_t D, int64_t L, int64_t wbytes, int64_t device, int64_t res_rows_cap) {
  int G = 0, KS = 0, rmax = 0, res = 0, smem = 0, per_lane = 0;
  const char* why = "";
  int rc = cvfp_scan_plan(static_cast<int>(D), static_cast<int>(L), static_cast<int>(wbytes), static_cast<int>(device),
                          static_cast<int>(res_rows_cap), &G, &KS, &rmax, &res, &smem, &per_lane, &why);
  pybind11::dict out;
  out["ok"] = rc == 0;
  out["reason"] = rc == 0 ? std::string() : std::string(why) + " (" + cvfp_scan_error_string(rc) + ")";
  out["ctas"] = G; out["col_splits"] = KS; out["rows_per_cta"] = rmax; out["resident_rows_per_cta"] = res;
  out["smem_bytes"] = smem; out["vectors_per_lane"] = per_lane; out["threads"] = 768;
  return out;
}

// emb (N, E); prev (N, C) or empty (teacher-forced when given); init (C) or empty; W (L, D, D) float32 or
// bfloat16; bias (L, D); gc, bc (L, C); gx, bx (L, E). Returns (contexts (N, C), token_out (N, E) or
// empty, error flag (1,) int32: nonzero when a grid barrier timed out).
std::vector<torch::Tensor> scan(torch::Tensor emb, torch::Tensor prev, torch::Tensor init, torch::Tensor W,
                                torch::Tensor bias, torch::Tensor gc, torch::Tensor bc, torch::Tensor gx,
                                torch::Tensor bx, double eps_c, double eps_x, double mix, bool with_token_out,
                                int64_t skip_matvec, int64_t res_rows_cap, double timeout_s, int64_t barrier_mode,
                                int64_t stats_mode) {
  TORCH_CHECK(emb.is_cuda(), "emb must be a CUDA tensor");
  const at::Device dev = emb.device();
  const c10::cuda::CUDAGuard guard(dev);
  check_f32(emb, "emb", dev);
  TORCH_CHECK(emb.dim() == 2, "emb must be (N, E)");
  const int64_t N = emb.size(0), E = emb.size(1);
  TORCH_CHECK(W.dim() == 3 && W.size(1) == W.size(2), "W must be (L, D, D)");
  TORCH_CHECK(W.device() == dev && W.is_contiguous(), "W must be contiguous on ", dev);
  TORCH_CHECK(W.scalar_type() == torch::kFloat32 || W.scalar_type() == torch::kBFloat16, "W must be float32 or bfloat16");
  const int64_t L = W.size(0), D = W.size(1), C = D - E;
  TORCH_CHECK(C > 0, "W's width must exceed embed_dim");
  TORCH_CHECK(C % 4 == 0 && E % 4 == 0, "context_dim and embed_dim must be multiples of 4");
  check_f32(bias, "bias", dev); check_f32(gc, "gc", dev); check_f32(bc, "bc", dev);
  check_f32(gx, "gx", dev); check_f32(bx, "bx", dev);
  TORCH_CHECK(bias.numel() == L * D && gc.numel() == L * C && bc.numel() == L * C && gx.numel() == L * E &&
              bx.numel() == L * E, "layer parameter shapes do not match W");
  const bool teacher = prev.numel() > 0;
  if (teacher) { check_f32(prev, "prev", dev); TORCH_CHECK(prev.numel() == N * C, "prev must be (N, C)"); }
  const bool has_init = init.numel() > 0;
  if (has_init) { check_f32(init, "init", dev); TORCH_CHECK(init.numel() == C, "init must have C elements"); }

  auto f32 = emb.options();
  torch::Tensor out_c = torch::empty({N, C}, f32);
  torch::Tensor out_x = with_token_out ? torch::empty({N, E}, f32) : torch::empty({0}, f32);
  if (N == 0) return {out_c, out_x, torch::zeros({1}, f32.dtype(torch::kInt32))};
  const int wbytes = W.scalar_type() == torch::kFloat32 ? 4 : 2;
  int G = 0, KS = 0, rmax = 0, res = 0, smem = 0, per_lane = 0;
  const char* why = "";
  int rc = cvfp_scan_plan(static_cast<int>(D), static_cast<int>(L), wbytes, dev.index(), static_cast<int>(res_rows_cap),
                          &G, &KS, &rmax, &res, &smem, &per_lane, &why);
  TORCH_CHECK(rc == 0, "cvfp scan kernel: ", why, " (", cvfp_scan_error_string(rc), ")");
  torch::Tensor ubuf = torch::empty({2 * D}, f32);
  torch::Tensor stats = torch::empty({2 * G * 4}, f32);
  torch::Tensor flags = torch::zeros({2}, f32.dtype(torch::kInt32));  // [counter, error]
  const int mix_mode = mix == 1.0 ? 1 : (mix > 0.0 ? 2 : 0);  // as CVFPLayer.forward branches
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev.index()).stream();
  rc = cvfp_scan_launch(emb.data_ptr<float>(), teacher ? prev.data_ptr<float>() : nullptr,
                        has_init ? init.data_ptr<float>() : nullptr, out_c.data_ptr<float>(),
                        with_token_out ? out_x.data_ptr<float>() : nullptr, W.data_ptr(), wbytes,
                        bias.data_ptr<float>(), gc.data_ptr<float>(), bc.data_ptr<float>(), gx.data_ptr<float>(),
                        bx.data_ptr<float>(), ubuf.data_ptr<float>(), stats.data_ptr<float>(),
                        reinterpret_cast<unsigned*>(flags.data_ptr<int>()), flags.data_ptr<int>() + 1, N,
                        static_cast<int>(C), static_cast<int>(E), static_cast<int>(L), static_cast<float>(eps_c),
                        static_cast<float>(eps_x), static_cast<float>(mix), static_cast<float>(1.0 - mix), mix_mode,
                        static_cast<int>(skip_matvec), static_cast<int>(barrier_mode),
                        static_cast<long long>(timeout_s * 1e9), dev.index(),
                        static_cast<int>(res_rows_cap), static_cast<int>(stats_mode), stream, &why);
  TORCH_CHECK(rc == 0, "cvfp scan kernel: ", why, " (", cvfp_scan_error_string(rc), ")");
  return {out_c, out_x, flags.narrow(0, 1, 1)};
}

// `iters` grid barriers of `mode` (-1: __syncthreads only) on `ctas` x `threads`:
// returns (cycles, ns, error) measured by CTA 0 over the loop.
std::vector<int64_t> barrier_bench(int64_t iters, int64_t mode, int64_t ctas, int64_t threads, int64_t device) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  auto opts = torch::TensorOptions().device(torch::kCUDA, device);
  torch::Tensor flags = torch::zeros({2}, opts.dtype(torch::kInt32));
  torch::Tensor out = torch::zeros({2}, opts.dtype(torch::kInt64));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).stream();
  int rc = cvfp_barrier_bench(reinterpret_cast<unsigned*>(flags.data_ptr<int>()), flags.data_ptr<int>() + 1,
                              reinterpret_cast<long long*>(out.data_ptr<int64_t>()), static_cast<int>(iters), static_cast<int>(mode),
                              static_cast<int>(ctas), static_cast<int>(threads), 10000000000LL, stream);
  TORCH_CHECK(rc == 0, "barrier bench: ", cvfp_scan_error_string(rc));
  auto host = out.cpu();
  return {host[0].item<int64_t>(), host[1].item<int64_t>(), flags[1].item<int>()};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("plan", &plan, "launch plan of the scan kernel for (D, L, weight bytes, device, resident-row cap)");
  m.def("scan", &scan, "persistent exact scan (see scan.cu)");
  m.def("barrier_bench", &barrier_bench, "grid-barrier microbenchmark: (cycles, ns, error)");
}
