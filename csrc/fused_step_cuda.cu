// CUDA kernel of fused_step: the whole step in one launch (device code in fused_step_cuda_kernel.cuh).
//
// Thread blocks [0, primal_chunks) update one chunk of one parameter tensor each (a table of tensor
// descriptors, like torch's multi_tensor_apply); the next ones scatter one chunk of one constraint
// block's samples into a hash table in global memory (atomicCAS on the id, atomicAdd of the value
// and the count), sized by the batch, never by the number of constraints.  The last thread block to
// finish (an atomic ticket) projects the touched multipliers, writes the statistics, advances the
// step counts and clears the table for the next step.  Step counts, grad_scale and found_inf are
// read on the device: no host sync.  The hyperparameters (lr, betas, dual_lr, ...) travel in the
// descriptor table when their tensors are on the CPU, and are read from their own tensors when those
// are on the device (capturable steps; HparamsPlacement in the kernel's header), so that the bias
// corrections, lr and dual_lr of a CUDA graph replay are the current ones, never the captured ones.
//
// The descriptor table is uploaded from pinned memory with an asynchronous copy, and only when it
// changed since the previous call on the device: in a steady loop (same tensors, same
// hyperparameters or device-resident ones) a step is the kernel alone, which is what CUDA-graph
// capture after a warm-up step records.  The table and the workspace are per device: steps on
// different streams of one device must not overlap.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstring>
#include <initializer_list>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "fused_step.h"
#include "fused_step_cuda_kernel.cuh"
#include "step_math.h"

namespace fused_lagrangian {
namespace {

using namespace cuda_kernel;

// Per device: the hash table (kept empty between steps by the finishing block), the ticket counter,
// and the last uploaded descriptor table with its pinned source, kept alive for graph replays.
struct DeviceCache {
  at::Tensor table_ids, table_sums, table_counts, finished_blocks;
  std::vector<uint8_t> uploaded_bytes;
  at::Tensor uploaded_host, uploaded_device;
  // Whether a CUDA graph captured a launch that uses the current workspace (upload).  A graph's
  // replays keep reading the buffers it captured, so once replaced they are held, never freed: freed,
  // their memory would go to other tensors (the pinned source of an upload, to other host copies).
  bool workspace_captured = false, upload_captured = false;
  std::vector<at::Tensor> held_for_graphs;
};

// Called before the cache's buffers ``buffers`` are replaced.
void release(DeviceCache& cache, std::initializer_list<at::Tensor> buffers, bool& captured) {
  if (captured) {
    for (const at::Tensor& buffer : buffers) {
      if (buffer.defined()) cache.held_for_graphs.push_back(buffer);
    }
  }
  captured = false;
}

// Steps from several host threads take turns: they share the per-device cache.
std::mutex& cache_mutex() {
  static std::mutex mutex;
  return mutex;
}

DeviceCache& cache_for(c10::Device device) {
  static std::unordered_map<int, DeviceCache> caches;
  return caches[device.index()];
}

void ensure_workspace(DeviceCache& cache, int64_t capacity, c10::Device device) {
  const auto on_device = at::TensorOptions().device(device);
  if (!cache.finished_blocks.defined()) {
    cache.finished_blocks = at::zeros({1}, on_device.dtype(at::kInt));
  }
  if (cache.table_ids.defined() && cache.table_ids.numel() >= capacity) return;
  const int64_t grown = std::max<int64_t>(capacity, 2 * (cache.table_ids.defined() ? cache.table_ids.numel() : 0));
  release(cache, {cache.table_ids, cache.table_sums, cache.table_counts}, cache.workspace_captured);
  cache.table_ids = at::full({grown}, -1, on_device.dtype(at::kLong));  // kEmptySlot
  cache.table_sums = at::zeros({grown}, on_device.dtype(at::kFloat));
  cache.table_counts = at::zeros({grown}, on_device.dtype(at::kFloat));
}

const uint8_t* upload(DeviceCache& cache, const HostTable& h, c10::Device device) {
  if (cache.uploaded_device.defined() && cache.uploaded_bytes == h.bytes) {
    return cache.uploaded_device.const_data_ptr<uint8_t>();
  }
  const int64_t size = static_cast<int64_t>(h.bytes.size());
  at::Tensor host = at::empty({size}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr<uint8_t>(), h.bytes.data(), h.bytes.size());
  at::Tensor on_device = at::empty({size}, at::TensorOptions().dtype(at::kByte).device(device));
  on_device.copy_(host, /*non_blocking=*/true);
  release(cache, {cache.uploaded_host, cache.uploaded_device}, cache.upload_captured);
  cache.uploaded_bytes = h.bytes;
  cache.uploaded_host = host;
  cache.uploaded_device = on_device;
  return on_device.const_data_ptr<uint8_t>();
}

ScalarArgument scalar_argument(const std::optional<at::Tensor>& t) {
  if (!t.has_value()) return {nullptr, 0.0f, false};
  if (t->device().is_cpu()) return {nullptr, t->item<float>(), true};
  return {t->const_data_ptr<float>(), 0.0f, true};
}

c10::Device step_device(const StepArguments& a) {
  if (a.num_tensors() > 0) return a.params[0].device();
  TORCH_CHECK(a.num_blocks() > 0, "fused_step: nothing to update");
  return a.multipliers[0].device();
}

at::Tensor fused_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                           at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList steps,
                           const at::Tensor& primal_hparams, c10::ArrayRef<int64_t> primal_flags,
                           int64_t algorithm, at::TensorList multipliers, at::TensorList dual_states,
                           at::TensorList ids, at::TensorList violations, const at::Tensor& dual_hparams,
                           c10::ArrayRef<int64_t> dual_flags, const std::optional<at::Tensor>& grad_scale,
                           const std::optional<at::Tensor>& found_inf) {
  const StepArguments args =
      make_step_arguments(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, primal_hparams, primal_flags,
                          algorithm, multipliers, dual_states, ids, violations, dual_hparams, dual_flags, grad_scale,
                          found_inf);
  const c10::Device device = step_device(args);
  check_step_arguments(args, device);
  const c10::cuda::CUDAGuard guard(device);
  at::Tensor stats = at::empty({args.num_blocks(), kStatsColumns}, at::TensorOptions().dtype(at::kFloat).device(device));

  const HostTable h = describe(args, {primal_hparams.is_cpu(), dual_hparams.is_cpu()});
  const std::lock_guard<std::mutex> lock(cache_mutex());
  DeviceCache& cache = cache_for(device);
  ensure_workspace(cache, h.table_capacity, device);
  const KernelArguments k =
      kernel_arguments(h, args, upload(cache, h, device), scalar_argument(grad_scale), scalar_argument(found_inf),
                       cache.table_ids, cache.table_sums, cache.table_counts, cache.finished_blocks, stats);
  const int64_t grid = h.num_thread_blocks();
  TORCH_CHECK(grid < (1ll << 31), "fused_step: too many chunks for one launch");
  fused_step_kernel<<<static_cast<unsigned int>(grid), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(k);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) {
    cache.workspace_captured = cache.upload_captured = true;  // a graph now replays this launch
  }
  bump_versions(args);
  return stats;
}

}  // namespace
}  // namespace fused_lagrangian

TORCH_LIBRARY_IMPL(fused_lagrangian, CUDA, m) {
  m.impl("fused_step", &fused_lagrangian::fused_step_cuda);
}
