// The device code of fused_step's CUDA kernel and the host code that describes a call to it (the
// descriptor table).  fused_step_cuda.cu launches it; tests/backends/cuda_emulation.cpp runs the same
// code on the CPU (threads for a block, blocks one after another) so that its logic is tested where
// there is no GPU.  See fused_step_cuda.cu for the design.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "fused_step.h"
#include "step_math.h"

namespace fused_lagrangian {
namespace cuda_kernel {

// Threads per block; the CPU emulation of this kernel in the tests uses fewer.
#ifndef FL_CUDA_THREADS
#define FL_CUDA_THREADS 512
#endif
constexpr int kThreads = FL_CUDA_THREADS;
constexpr int64_t kChunkElements = 16 * 1024;
constexpr int64_t kChunkSamples = 4 * kThreads;
constexpr unsigned long long kEmptySlot = ~0ull;

enum DtypeCode : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

struct TensorDescriptor {
  void* param;
  const void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  void* max_exp_avg_sq;
  float* step;
  int64_t numel;
  int64_t flags;
  int32_t dtype;
  int32_t has_momentum_buffer;
};

struct BlockDescriptor {
  float* multipliers;
  DualStateRows state;
  const void* ids;
  const float* violations;
  int64_t num_samples;
  int64_t num_constraints;
  int64_t table_offset;
  int64_t table_capacity;
  int64_t flags;
  int32_t ids_are_int32;
};

// Where each section of the uploaded descriptor table starts (bytes).  The hyperparameter sections
// are empty when the kernel reads them from their tensors (HparamsPlacement).
struct TableLayout {
  int64_t tensors, blocks, tensor_chunk_starts, block_chunk_starts, primal_hparams, dual_hparams, bytes;
};

// Where the kernel reads the hyperparameters (contract.py's float64 values, kPrimalHparams per tensor,
// kDualHparams per block): copies in the descriptor table, read on the host and uploaded with it when
// they change; or their own tensors in device memory.  The second is how capturable steps run: the
// table then stays the same from step to step, and a CUDA graph replay reads the values the tensors
// hold when it runs (a scheduler's lr written in place), like the step counts and found_inf.
struct HparamsPlacement {
  bool primal_in_table, dual_in_table;
};

// Optional scalar tensors: a device pointer, or the value of a CPU tensor read on the host.
struct ScalarArgument {
  const float* device_value;
  float host_value;
  bool present;
};

struct KernelArguments {
  const uint8_t* table;
  TableLayout layout;
  const double* primal_hparams;
  const double* dual_hparams;
  int32_t num_tensors, num_blocks;
  int64_t primal_chunks, sample_chunks;
  bool adam;
  ScalarArgument grad_scale, found_inf;
  unsigned long long* table_ids;
  float* table_sums;
  float* table_counts;
  unsigned int* finished_blocks;
  float* stats;
};

template <typename T>
__device__ const T* section(const KernelArguments& a, int64_t offset) {
  return reinterpret_cast<const T*>(a.table + offset);
}

__device__ float read_scalar(const ScalarArgument& s, float absent) {
  if (!s.present) return absent;
  return s.device_value ? *s.device_value : s.host_value;
}

// The last index i with starts[i] <= chunk: which tensor (block) a chunk belongs to.
__device__ int32_t owner_of(const int64_t* starts, int32_t count, int64_t chunk) {
  int32_t lo = 0, hi = count - 1;
  while (lo < hi) {
    const int32_t mid = (lo + hi + 1) / 2;
    if (starts[mid] <= chunk) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// ------------------------------------------------------------------------------------------------
// Primal chunks

template <typename T>
__device__ void update_chunk(const TensorDescriptor& t, const double* hparams, int64_t begin, int64_t end, bool adam,
                             const AdamCoefficients& ac, const SgdCoefficients& sc, float inv_scale) {
  T* param = static_cast<T*>(t.param);
  const T* grad = static_cast<const T*>(t.grad);
  T* exp_avg = static_cast<T*>(t.exp_avg);
  T* exp_avg_sq = static_cast<T*>(t.exp_avg_sq);
  T* max_exp_avg_sq = static_cast<T*>(t.max_exp_avg_sq);
  const bool decay = hparams[primal_slot::kWeightDecay] != 0.0;
  const AdamOptions adam_options{(t.flags & kAmsgrad) != 0, decay && !(t.flags & kDecoupledWeightDecay),
                                 decay && (t.flags & kDecoupledWeightDecay)};
  const SgdOptions sgd_options{decay, t.has_momentum_buffer != 0, (t.flags & kFirstMomentumStep) != 0,
                               (t.flags & kNesterov) != 0};
#pragma unroll 4
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    // The reference unscales the gradient in its own dtype, then widens it.
    const float g = static_cast<float>(static_cast<T>(static_cast<float>(grad[i]) * inv_scale));
    float p = static_cast<float>(param[i]);
    if (adam) {
      float m = static_cast<float>(exp_avg[i]), v = static_cast<float>(exp_avg_sq[i]);
      float v_max = adam_options.amsgrad ? static_cast<float>(max_exp_avg_sq[i]) : 0.0f;
      adam_update(p, g, m, v, v_max, ac, adam_options);
      exp_avg[i] = static_cast<T>(m);
      exp_avg_sq[i] = static_cast<T>(v);
      if (adam_options.amsgrad) max_exp_avg_sq[i] = static_cast<T>(v_max);
    } else {
      float b = (sgd_options.momentum && !sgd_options.first_momentum_step) ? static_cast<float>(exp_avg[i]) : 0.0f;
      sgd_update(p, g, b, sc, sgd_options);
      if (sgd_options.momentum) exp_avg[i] = static_cast<T>(b);
    }
    param[i] = static_cast<T>(p);
  }
}

__device__ void primal_chunk(const KernelArguments& a, int64_t chunk, float inv_scale) {
  __shared__ AdamCoefficients adam_coefficients_shared;
  __shared__ SgdCoefficients sgd_coefficients_shared;
  const int32_t tensor = owner_of(section<int64_t>(a, a.layout.tensor_chunk_starts), a.num_tensors, chunk);
  const TensorDescriptor& t = section<TensorDescriptor>(a, a.layout.tensors)[tensor];
  const double* hparams = a.primal_hparams + tensor * kPrimalHparams;
  const int64_t begin = (chunk - section<int64_t>(a, a.layout.tensor_chunk_starts)[tensor]) * kChunkElements;
  const int64_t end = min(t.numel, begin + kChunkElements);
  if (threadIdx.x == 0) {
    const bool maximize = t.flags & kMaximize;
    // Every block reads the old count; the finishing block stores the new one.
    if (a.adam) adam_coefficients_shared = adam_coefficients(hparams, maximize, static_cast<double>(*t.step + 1.0f));
    else sgd_coefficients_shared = sgd_coefficients(hparams, maximize);
  }
  __syncthreads();
  const AdamCoefficients ac = adam_coefficients_shared;
  const SgdCoefficients sc = sgd_coefficients_shared;
  switch (t.dtype) {
    case kFloat32: update_chunk<float>(t, hparams, begin, end, a.adam, ac, sc, inv_scale); break;
    case kBFloat16: update_chunk<c10::BFloat16>(t, hparams, begin, end, a.adam, ac, sc, inv_scale); break;
    default: update_chunk<c10::Half>(t, hparams, begin, end, a.adam, ac, sc, inv_scale); break;
  }
}

// ------------------------------------------------------------------------------------------------
// Constraint samples: scatter into the block's hash table

__device__ void scatter_chunk(const KernelArguments& a, int64_t chunk) {
  const int64_t* starts = section<int64_t>(a, a.layout.block_chunk_starts);
  const int32_t block = owner_of(starts, a.num_blocks, chunk);
  const BlockDescriptor& b = section<BlockDescriptor>(a, a.layout.blocks)[block];
  const int64_t begin = (chunk - starts[block]) * kChunkSamples;
  const int64_t end = min(b.num_samples, begin + kChunkSamples);
  const unsigned long long mask = static_cast<unsigned long long>(b.table_capacity - 1);
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const int64_t id = b.ids_are_int32 ? static_cast<int64_t>(static_cast<const int32_t*>(b.ids)[i])
                                       : static_cast<const int64_t*>(b.ids)[i];
    // Padding (kPaddingId) is no sample; other ids out of range are rejected by the Python layer, and
    // skipped here so that nothing is written out of bounds.
    if (id < 0 || id >= b.num_constraints) continue;
    const unsigned long long key = static_cast<unsigned long long>(id);
    unsigned long long slot = (key * 0x9E3779B97F4A7C15ull) >> 20;
    while (true) {
      slot &= mask;
      const unsigned long long previous = atomicCAS(a.table_ids + b.table_offset + slot, kEmptySlot, key);
      if (previous == kEmptySlot || previous == key) break;
      ++slot;
    }
    atomicAdd(a.table_sums + b.table_offset + slot, b.violations[i]);
    atomicAdd(a.table_counts + b.table_offset + slot, 1.0f);
  }
}

// ------------------------------------------------------------------------------------------------
// Finalisation by the last block: touched multipliers, statistics, step counts, table reset

__device__ void finalize(const KernelArguments& a, bool skipped) {
  __shared__ int touched, positive, max_measure_bits;
  const BlockDescriptor* blocks = section<BlockDescriptor>(a, a.layout.blocks);
  for (int32_t j = 0; j < a.num_blocks; ++j) {
    const BlockDescriptor& b = blocks[j];
    if (threadIdx.x == 0) touched = positive = max_measure_bits = 0;
    __syncthreads();
    const DualCoefficients c = dual_coefficients(a.dual_hparams + j * kDualHparams, b.flags);
    for (int64_t s = threadIdx.x; s < b.table_capacity; s += blockDim.x) {
      const int64_t slot = b.table_offset + s;
      const unsigned long long key = __ldcg(a.table_ids + slot);
      if (key == kEmptySlot) continue;
      const float measure = dual_update(__ldcg(a.table_sums + slot), __ldcg(a.table_counts + slot),
                                        b.multipliers[key], b.state, static_cast<int64_t>(key), c);
      a.table_ids[slot] = kEmptySlot;
      a.table_sums[slot] = 0.0f;
      a.table_counts[slot] = 0.0f;
      atomicAdd(&touched, 1);
      if (measure > 0.0f) atomicAdd(&positive, 1);
      // Measures are >= 0 (or NaN, whose bits exceed every finite float's): int order is float order.
      atomicMax(&max_measure_bits, __float_as_int(measure));
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      float* row = a.stats + j * kStatsColumns;
      row[0] = static_cast<float>(touched);
      row[1] = __int_as_float(max_measure_bits);
      row[2] = static_cast<float>(positive);
    }
    __syncthreads();
  }
  if (a.adam && !skipped) {
    const TensorDescriptor* tensors = section<TensorDescriptor>(a, a.layout.tensors);
    for (int32_t i = threadIdx.x; i < a.num_tensors; i += blockDim.x) *tensors[i].step += 1.0f;
  }
  if (threadIdx.x == 0) *a.finished_blocks = 0;
}

__global__ void __launch_bounds__(kThreads) fused_step_kernel(KernelArguments a) {
  __shared__ bool skipped, last;
  if (threadIdx.x == 0) skipped = read_scalar(a.found_inf, 0.0f) != 0.0f;
  __syncthreads();
  if (!skipped) {
    const float inv_scale = static_cast<float>(1.0 / static_cast<double>(read_scalar(a.grad_scale, 1.0f)));
    const int64_t chunk = blockIdx.x;
    if (chunk < a.primal_chunks) {
      primal_chunk(a, chunk, inv_scale);
    } else if (chunk - a.primal_chunks < a.sample_chunks) {  // the grid has one spare block when both are 0
      scatter_chunk(a, chunk - a.primal_chunks);
    }
  }
  // Last-block-done: publish this block's writes, then take a ticket.
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(a.finished_blocks, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  finalize(a, skipped);
}

// ------------------------------------------------------------------------------------------------
// Host side: the descriptor table

inline int32_t dtype_code(at::ScalarType dtype) {
  return dtype == at::kFloat ? kFloat32 : (dtype == at::kBFloat16 ? kBFloat16 : kFloat16);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int64_t table_capacity_for(int64_t num_samples) {
  if (num_samples == 0) return 0;
  int64_t capacity = 16;
  while (capacity < 2 * num_samples) capacity *= 2;
  return capacity;
}

inline int64_t align(int64_t offset) { return (offset + 15) / 16 * 16; }

struct HostTable {
  std::vector<uint8_t> bytes;
  TableLayout layout;
  HparamsPlacement hparams;
  int64_t primal_chunks = 0, sample_chunks = 0, table_capacity = 0;

  // At least one thread block: the finishing block also writes the statistics of empty blocks.
  int64_t num_thread_blocks() const { return std::max<int64_t>(1, primal_chunks + sample_chunks); }
};

inline HostTable describe(const StepArguments& a, HparamsPlacement placement) {
  const int64_t n = a.num_tensors(), m = a.num_blocks();
  const int64_t primal_values = placement.primal_in_table ? n * kPrimalHparams : 0;
  const int64_t dual_values = placement.dual_in_table ? m * kDualHparams : 0;
  HostTable h;
  h.hparams = placement;
  h.layout.tensors = 0;
  h.layout.blocks = align(n * sizeof(TensorDescriptor));
  h.layout.tensor_chunk_starts = align(h.layout.blocks + m * sizeof(BlockDescriptor));
  h.layout.block_chunk_starts = align(h.layout.tensor_chunk_starts + n * sizeof(int64_t));
  h.layout.primal_hparams = align(h.layout.block_chunk_starts + m * sizeof(int64_t));
  h.layout.dual_hparams = align(h.layout.primal_hparams + primal_values * sizeof(double));
  h.layout.bytes = align(h.layout.dual_hparams + dual_values * sizeof(double));
  h.bytes.assign(h.layout.bytes, 0);
  if (primal_values) {
    std::memcpy(h.bytes.data() + h.layout.primal_hparams, a.host_primal_hparams(0), primal_values * sizeof(double));
  }
  if (dual_values) {
    std::memcpy(h.bytes.data() + h.layout.dual_hparams, a.host_dual_hparams(0), dual_values * sizeof(double));
  }
  auto* tensors = reinterpret_cast<TensorDescriptor*>(h.bytes.data() + h.layout.tensors);
  auto* blocks = reinterpret_cast<BlockDescriptor*>(h.bytes.data() + h.layout.blocks);
  auto* tensor_starts = reinterpret_cast<int64_t*>(h.bytes.data() + h.layout.tensor_chunk_starts);
  auto* block_starts = reinterpret_cast<int64_t*>(h.bytes.data() + h.layout.block_chunk_starts);
  for (int64_t i = 0; i < n; ++i) {
    TensorDescriptor& t = tensors[i];
    t.param = a.params[i].data_ptr();
    t.grad = a.grads[i].const_data_ptr();
    t.exp_avg = a.exp_avgs[i].numel() ? a.exp_avgs[i].data_ptr() : nullptr;
    t.exp_avg_sq = a.is_adam() ? a.exp_avg_sqs[i].data_ptr() : nullptr;
    t.max_exp_avg_sq = a.has_max_exp_avg_sq(i) ? a.max_exp_avg_sqs[i].data_ptr() : nullptr;
    t.step = a.is_adam() ? a.steps[i].data_ptr<float>() : nullptr;
    t.numel = a.params[i].numel();
    t.flags = a.primal_flags[i];
    t.dtype = dtype_code(a.params[i].scalar_type());
    t.has_momentum_buffer = a.has_momentum_buffer(i);
    tensor_starts[i] = h.primal_chunks;
    h.primal_chunks += ceil_div(t.numel, kChunkElements);
  }
  for (int64_t j = 0; j < m; ++j) {
    BlockDescriptor& b = blocks[j];
    b.multipliers = a.multipliers[j].data_ptr<float>();
    b.state = dual_state_pointers(a.dual_state_rows(j) ? a.dual_states[j].data_ptr<float>() : nullptr,
                                  a.multipliers[j].numel(), a.dual_flags[j]);
    b.ids = a.ids[j].const_data_ptr();
    b.ids_are_int32 = a.ids[j].scalar_type() == at::kInt;
    b.violations = a.violations[j].const_data_ptr<float>();
    b.num_samples = a.ids[j].numel();
    b.num_constraints = a.multipliers[j].numel();
    b.table_offset = h.table_capacity;
    b.table_capacity = table_capacity_for(b.num_samples);
    b.flags = a.dual_flags[j];
    block_starts[j] = h.sample_chunks;
    h.sample_chunks += ceil_div(b.num_samples, kChunkSamples);
    h.table_capacity += b.table_capacity;
  }
  return h;
}

// Everything the kernel reads, for the step ``h`` describes: its descriptor table where the kernel can
// read it, the hyperparameters (in that table, or their tensors, as ``h`` places them), the optional
// scalars, the workspace (touched-id table, its sums and counts, the finishing ticket) and the
// statistics to write.  The CUDA launcher and the CPU emulation of the tests share it.
inline KernelArguments kernel_arguments(const HostTable& h, const StepArguments& a, const uint8_t* table,
                                        ScalarArgument grad_scale, ScalarArgument found_inf,
                                        const at::Tensor& table_ids, const at::Tensor& table_sums,
                                        const at::Tensor& table_counts, const at::Tensor& finished_blocks,
                                        const at::Tensor& stats) {
  KernelArguments k;
  k.table = table;
  k.layout = h.layout;
  k.primal_hparams = h.hparams.primal_in_table ? reinterpret_cast<const double*>(table + h.layout.primal_hparams)
                                               : a.primal_hparams.const_data_ptr<double>();
  k.dual_hparams = h.hparams.dual_in_table ? reinterpret_cast<const double*>(table + h.layout.dual_hparams)
                                           : a.dual_hparams.const_data_ptr<double>();
  k.num_tensors = static_cast<int32_t>(a.num_tensors());
  k.num_blocks = static_cast<int32_t>(a.num_blocks());
  k.primal_chunks = h.primal_chunks;
  k.sample_chunks = h.sample_chunks;
  k.adam = a.is_adam();
  k.grad_scale = grad_scale;
  k.found_inf = found_inf;
  k.table_ids = reinterpret_cast<unsigned long long*>(table_ids.data_ptr<int64_t>());
  k.table_sums = table_sums.data_ptr<float>();
  k.table_counts = table_counts.data_ptr<float>();
  k.finished_blocks = reinterpret_cast<unsigned int*>(finished_blocks.data_ptr<int32_t>());
  k.stats = stats.data_ptr<float>();
  return k;
}

}  // namespace cuda_kernel
}  // namespace fused_lagrangian
