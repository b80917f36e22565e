// Runs the CUDA kernel's source (csrc/fused_step_cuda_kernel.cuh) on the CPU: each thread block is a
// group of std::threads sharing a barrier for __syncthreads and function-local statics for
// __shared__ memory, blocks run one after another, atomics are GCC builtins.  It checks the kernel's
// logic (descriptor table, chunk ownership, hash-table scatter, last-block finalisation, statistics,
// step counts, table reset) against the reference where there is no GPU; it cannot check what only a
// GPU shows (its memory model under contention, timing).  Registered as
// fused_lagrangian_emulated::fused_step with the contract's schema.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <barrier>
#include <cstring>
#include <thread>
#include <vector>

// ---- CUDA built-ins, emulated -------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct Dim3 {
  unsigned int x = 0;
};
thread_local Dim3 threadIdx, blockIdx, blockDim, gridDim;
thread_local std::barrier<>* block_barrier = nullptr;

inline void __syncthreads() { block_barrier->arrive_and_wait(); }
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

template <typename T>
T __ldcg(const T* address) {
  T value;
  __atomic_load(address, &value, __ATOMIC_SEQ_CST);
  return value;
}

inline unsigned long long atomicCAS(unsigned long long* address, unsigned long long expected,
                                    unsigned long long desired) {
  __atomic_compare_exchange_n(address, &expected, desired, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return expected;
}
inline int atomicAdd(int* address, int value) { return __atomic_fetch_add(address, value, __ATOMIC_SEQ_CST); }
inline unsigned int atomicAdd(unsigned int* address, unsigned int value) {
  return __atomic_fetch_add(address, value, __ATOMIC_SEQ_CST);
}
inline float atomicAdd(float* address, float value) {
  float old = __ldcg(address), updated;
  do {
    updated = old + value;
  } while (!__atomic_compare_exchange(address, &old, &updated, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));
  return old;
}
inline int atomicMax(int* address, int value) {
  int old = __ldcg(address);
  while (old < value && !__atomic_compare_exchange_n(address, &old, value, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
  }
  return old;
}
inline int __float_as_int(float value) {
  int bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}
inline float __int_as_float(int bits) {
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}
using std::min;

// Few threads per block: the same strided loops and barriers, affordable as std::threads.
#define FL_CUDA_THREADS 8
#include "fused_step_cuda_kernel.cuh"

namespace fused_lagrangian {
namespace {

using namespace cuda_kernel;

void launch(unsigned int grid, const KernelArguments& arguments) {
  for (unsigned int block = 0; block < grid; ++block) {
    std::barrier<> barrier(kThreads);
    std::vector<std::thread> threads;
    for (int thread = 0; thread < kThreads; ++thread) {
      threads.emplace_back([&, thread] {
        threadIdx.x = thread;
        blockIdx.x = block;
        blockDim.x = kThreads;
        gridDim.x = grid;
        block_barrier = &barrier;
        fused_step_kernel(arguments);
      });
    }
    for (std::thread& t : threads) t.join();
  }
}

// Kept across calls like the device's workspace, so that the tests see whether each step leaves
// the hash table empty for the next one.
struct Workspace {
  at::Tensor ids, sums, counts, finished_blocks;
};

Workspace& workspace_instance() {
  static Workspace* workspace = new Workspace();  // never destroyed: no tensor freed at exit
  return *workspace;
}

ScalarArgument scalar_argument(const std::optional<at::Tensor>& t) {
  if (!t.has_value()) return {nullptr, 0.0f, false};
  return {t->const_data_ptr<float>(), 0.0f, true};
}

at::Tensor emulated_fused_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                               at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList steps,
                               const at::Tensor& primal_hparams, c10::ArrayRef<int64_t> primal_flags,
                               int64_t algorithm, at::TensorList multipliers, at::TensorList dual_states,
                               at::TensorList ids, at::TensorList violations, const at::Tensor& dual_hparams,
                               c10::ArrayRef<int64_t> dual_flags, const std::optional<at::Tensor>& grad_scale,
                               const std::optional<at::Tensor>& found_inf) {
  const StepArguments args{params,
                           grads,
                           exp_avgs,
                           exp_avg_sqs,
                           max_exp_avg_sqs,
                           steps,
                           host_hparams(primal_hparams, "primal_hparams"),
                           primal_flags,
                           algorithm,
                           multipliers,
                           dual_states,
                           ids,
                           violations,
                           host_hparams(dual_hparams, "dual_hparams"),
                           dual_flags,
                           grad_scale,
                           found_inf};
  const HostTable h = describe(args);
  Workspace& workspace = workspace_instance();
  if (!workspace.ids.defined() || workspace.ids.numel() < h.table_capacity) {
    workspace.ids = at::full({std::max<int64_t>(h.table_capacity, 1)}, -1, at::kLong);
    workspace.sums = at::zeros({std::max<int64_t>(h.table_capacity, 1)}, at::kFloat);
    workspace.counts = at::zeros({std::max<int64_t>(h.table_capacity, 1)}, at::kFloat);
    workspace.finished_blocks = at::zeros({1}, at::kInt);
  }
  at::Tensor stats = at::empty({args.num_blocks(), kStatsColumns}, at::kFloat);
  const KernelArguments k =
      kernel_arguments(h, args, h.bytes.data(), scalar_argument(grad_scale), scalar_argument(found_inf),
                       workspace.ids, workspace.sums, workspace.counts, workspace.finished_blocks, stats);
  launch(static_cast<unsigned int>(h.num_thread_blocks()), k);
  return stats;
}

// The workspace as the kernel must leave it: every slot free, every sum and count zero, no ticket.
bool emulated_workspace_is_clean() {
  const Workspace& workspace = workspace_instance();
  return !workspace.ids.defined() ||
         (workspace.ids.eq(-1).all().item<bool>() && workspace.sums.eq(0).all().item<bool>() &&
          workspace.counts.eq(0).all().item<bool>() && workspace.finished_blocks.item<int>() == 0);
}

}  // namespace
}  // namespace fused_lagrangian

TORCH_LIBRARY(fused_lagrangian_emulated, m) {
  m.def(
      "fused_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] steps, Tensor primal_hparams, int[] primal_flags, "
      "int algorithm, Tensor(f!)[] multipliers, Tensor(g!)[] dual_states, Tensor[] ids, Tensor[] violations, "
      "Tensor dual_hparams, int[] dual_flags, Tensor? grad_scale=None, Tensor? found_inf=None) -> Tensor");
  m.def("workspace_is_clean() -> bool", &fused_lagrangian::emulated_workspace_is_clean);
}

TORCH_LIBRARY_IMPL(fused_lagrangian_emulated, CPU, m) {
  m.impl("fused_step", &fused_lagrangian::emulated_fused_step);
}
