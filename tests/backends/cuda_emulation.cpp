// Runs the CUDA kernel's source (csrc/fused_step_cuda_kernel.cuh) on the CPU: each thread block is a
// group of std::threads sharing a barrier for __syncthreads and function-local statics for
// __shared__ memory, blocks run one after another, atomics are GCC builtins.  It checks the kernel's
// logic (descriptor table, chunk ownership, hash-table scatter, last-block finalisation, statistics,
// step counts, table reset) against the reference where there is no GPU; it cannot check what only a
// GPU shows (its memory model under contention, timing).  Registered as fused_lagrangian_emulated::
// fused_step (hyperparameters copied into the descriptor table, as for CPU hparams tensors) and
// fused_step_hparams_on_device (the kernel reads the hparams tensors, as for device ones), both with
// the contract's schema, and replay(): the last launch again, as a CUDA graph replay runs it.
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
// the hash table empty for the next one; and the last launch, for replay().
struct Workspace {
  at::Tensor ids, sums, counts, finished_blocks;
  HostTable last_table;
  KernelArguments last_launch;
  at::Tensor last_stats;
};

Workspace& workspace_instance() {
  static Workspace* workspace = new Workspace();  // never destroyed: no tensor freed at exit
  return *workspace;
}

ScalarArgument scalar_argument(const std::optional<at::Tensor>& t) {
  if (!t.has_value()) return {nullptr, 0.0f, false};
  return {t->const_data_ptr<float>(), 0.0f, true};
}

unsigned int grid_of(const HostTable& h) { return static_cast<unsigned int>(h.num_thread_blocks()); }

// fused_step_cuda.cu's launcher less its argument checks (fused_step.cpp, not built in here), with the
// hyperparameters placed as ``placement`` says (the launcher places them by their tensors' device,
// and every tensor here is on the CPU).
at::Tensor emulated_launch(const StepArguments& args, HparamsPlacement placement) {
  Workspace& workspace = workspace_instance();
  workspace.last_table = describe(args, placement);
  const HostTable& h = workspace.last_table;
  if (!workspace.ids.defined() || workspace.ids.numel() < h.table_capacity) {
    workspace.ids = at::full({std::max<int64_t>(h.table_capacity, 1)}, -1, at::kLong);
    workspace.sums = at::zeros({std::max<int64_t>(h.table_capacity, 1)}, at::kFloat);
    workspace.counts = at::zeros({std::max<int64_t>(h.table_capacity, 1)}, at::kFloat);
    workspace.finished_blocks = at::zeros({1}, at::kInt);
  }
  workspace.last_stats = at::empty({args.num_blocks(), kStatsColumns}, at::kFloat);
  workspace.last_launch = kernel_arguments(h, args, h.bytes.data(), scalar_argument(args.grad_scale),
                                           scalar_argument(args.found_inf), workspace.ids, workspace.sums,
                                           workspace.counts, workspace.finished_blocks, workspace.last_stats);
  launch(grid_of(h), workspace.last_launch);
  return workspace.last_stats;
}

// The launcher's way for hyperparameter tensors on the CPU: copied into the descriptor table.
at::Tensor emulated_fused_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                               at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList steps,
                               const at::Tensor& primal_hparams, c10::ArrayRef<int64_t> primal_flags,
                               int64_t algorithm, at::TensorList multipliers, at::TensorList dual_states,
                               at::TensorList ids, at::TensorList violations, const at::Tensor& dual_hparams,
                               c10::ArrayRef<int64_t> dual_flags, const std::optional<at::Tensor>& grad_scale,
                               const std::optional<at::Tensor>& found_inf) {
  return emulated_launch(
      make_step_arguments(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, primal_hparams, primal_flags,
                          algorithm, multipliers, dual_states, ids, violations, dual_hparams, dual_flags, grad_scale,
                          found_inf),
      {true, true});
}

// The launcher's way for hyperparameter tensors on the device (capturable steps): the kernel reads them.
at::Tensor emulated_fused_step_hparams_on_device(
    at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
    at::TensorList max_exp_avg_sqs, at::TensorList steps, const at::Tensor& primal_hparams,
    c10::ArrayRef<int64_t> primal_flags, int64_t algorithm, at::TensorList multipliers, at::TensorList dual_states,
    at::TensorList ids, at::TensorList violations, const at::Tensor& dual_hparams, c10::ArrayRef<int64_t> dual_flags,
    const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  return emulated_launch(
      make_step_arguments(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, primal_hparams, primal_flags,
                          algorithm, multipliers, dual_states, ids, violations, dual_hparams, dual_flags, grad_scale,
                          found_inf),
      {false, false});
}

// The last call's launch again, as a CUDA graph replays a captured step: the same descriptor table,
// workspace and statistics tensor, whatever the arguments' tensors hold now.
at::Tensor emulated_replay() {
  Workspace& workspace = workspace_instance();
  TORCH_CHECK(workspace.last_stats.defined(), "replay: no launch to replay");
  launch(grid_of(workspace.last_table), workspace.last_launch);
  return workspace.last_stats;
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
  m.def("fused_step" FUSED_STEP_SCHEMA_ARGUMENTS);
  m.def("fused_step_hparams_on_device" FUSED_STEP_SCHEMA_ARGUMENTS);
  m.def("replay() -> Tensor", &fused_lagrangian::emulated_replay);
  m.def("workspace_is_clean() -> bool", &fused_lagrangian::emulated_workspace_is_clean);
}

TORCH_LIBRARY_IMPL(fused_lagrangian_emulated, CPU, m) {
  m.impl("fused_step", &fused_lagrangian::emulated_fused_step);
  m.impl("fused_step_hparams_on_device", &fused_lagrangian::emulated_fused_step_hparams_on_device);
}
