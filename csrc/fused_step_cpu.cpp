// CPU kernel of fused_step: one OpenMP parallel region whose work items are the constraint blocks
// and fixed-size chunks of every parameter tensor (multi_tensor_apply style).  Each chunk runs a
// loop specialised at compile time for its dtype and options, which GCC vectorises (-O3
// -fno-math-errno); each block reduces its samples through a hash table sized by the batch, so the
// cost never depends on the number of constraints.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "fused_step.h"
#include "step_math.h"

namespace fused_lagrangian {
namespace {

// The chunk loops are compiled twice, for x86-64 and for x86-64-v3 (AVX2 + FMA, Haswell and later),
// and the loader picks by CPU features: FL_FMA needs the hardware instruction to be fast (the
// baseline clone calls libm's fmaf).  GCC 12 is the first to clone for an ISA level.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && __GNUC__ >= 12
#define FL_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FL_CPU_CLONES
#endif

// Elements per work item: large enough to amortise scheduling, small enough to balance two threads
// over a handful of tensors.
constexpr int64_t kChunkElements = 1 << 15;
// Below this many elements in total the step runs on the calling thread.
constexpr int64_t kParallelThreshold = 1 << 16;

struct PrimalEntry {
  void* param;
  const void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  void* max_exp_avg_sq;
  at::ScalarType dtype;
  AdamOptions adam_options;
  AdamCoefficients adam;
  SgdOptions sgd_options;
  SgdCoefficients sgd;
};

struct DualEntry {
  float* multipliers;
  DualStateRows state;
  const void* ids;
  bool ids_are_int32;
  const float* violations;
  int64_t num_samples;
  int64_t num_constraints;
  DualCoefficients coefficients;
  float* stats_row;
};

struct WorkItem {
  int64_t tensor;
  int64_t begin, end;
};

// ------------------------------------------------------------------------------------------------
// Primal chunks

template <typename T>
FL_INLINE float widen(T value) {
  return static_cast<float>(value);
}

// The reference unscales the gradient in its own dtype (grad * inv_scale), then widens it.
template <typename T>
FL_INLINE float unscaled_grad(T grad, float inv_scale) {
  return static_cast<float>(static_cast<T>(static_cast<float>(grad) * inv_scale));
}

template <typename T, bool kAmsgrad, bool kL2, bool kDecoupled>
FL_CPU_CLONES void adam_chunk(const PrimalEntry& e, int64_t begin, int64_t end, float inv_scale) {
  constexpr AdamOptions options{kAmsgrad, kL2, kDecoupled};
  T* __restrict__ param = static_cast<T*>(e.param);
  const T* __restrict__ grad = static_cast<const T*>(e.grad);
  T* __restrict__ exp_avg = static_cast<T*>(e.exp_avg);
  T* __restrict__ exp_avg_sq = static_cast<T*>(e.exp_avg_sq);
  T* __restrict__ max_exp_avg_sq = static_cast<T*>(e.max_exp_avg_sq);
  const AdamCoefficients c = e.adam;
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    float p = widen(param[i]), m = widen(exp_avg[i]), v = widen(exp_avg_sq[i]);
    float v_max = kAmsgrad ? widen(max_exp_avg_sq[i]) : 0.0f;
    adam_update(p, unscaled_grad(grad[i], inv_scale), m, v, v_max, c, options);
    param[i] = static_cast<T>(p);
    exp_avg[i] = static_cast<T>(m);
    exp_avg_sq[i] = static_cast<T>(v);
    if (kAmsgrad) max_exp_avg_sq[i] = static_cast<T>(v_max);
  }
}

template <typename T, bool kWeightDecay, bool kMomentum, bool kFirstStep, bool kNesterov>
FL_CPU_CLONES void sgd_chunk(const PrimalEntry& e, int64_t begin, int64_t end, float inv_scale) {
  constexpr SgdOptions options{kWeightDecay, kMomentum, kFirstStep, kNesterov};
  T* __restrict__ param = static_cast<T*>(e.param);
  const T* __restrict__ grad = static_cast<const T*>(e.grad);
  T* __restrict__ buffer = static_cast<T*>(e.exp_avg);
  const SgdCoefficients c = e.sgd;
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    float p = widen(param[i]);
    float b = (kMomentum && !kFirstStep) ? widen(buffer[i]) : 0.0f;
    sgd_update(p, unscaled_grad(grad[i], inv_scale), b, c, options);
    param[i] = static_cast<T>(p);
    if (kMomentum) buffer[i] = static_cast<T>(b);
  }
}

// Calls f with std::bool_constant<flag>, turning a run-time flag into a template argument.
template <typename F>
void with_constant(bool flag, F&& f) {
  if (flag) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

template <typename T>
void primal_chunk(const PrimalEntry& e, bool adam, int64_t begin, int64_t end, float inv_scale) {
  if (adam) {
    const AdamOptions o = e.adam_options;
    with_constant(o.amsgrad, [&](auto ams) {
      with_constant(o.l2_weight_decay, [&](auto l2) {
        with_constant(o.decoupled_weight_decay, [&](auto decoupled) {
          adam_chunk<T, ams(), l2(), decoupled()>(e, begin, end, inv_scale);
        });
      });
    });
    return;
  }
  const SgdOptions o = e.sgd_options;
  with_constant(o.weight_decay, [&](auto wd) {
    with_constant(o.momentum, [&](auto momentum) {
      with_constant(o.first_momentum_step, [&](auto first) {
        with_constant(o.nesterov, [&](auto nesterov) {
          sgd_chunk<T, wd(), momentum(), first(), nesterov()>(e, begin, end, inv_scale);
        });
      });
    });
  });
}

void run_primal_chunk(const PrimalEntry& e, bool adam, int64_t begin, int64_t end, float inv_scale) {
  switch (e.dtype) {
    case at::kFloat:
      return primal_chunk<float>(e, adam, begin, end, inv_scale);
    case at::kBFloat16:
      return primal_chunk<c10::BFloat16>(e, adam, begin, end, inv_scale);
    case at::kHalf:
      return primal_chunk<c10::Half>(e, adam, begin, end, inv_scale);
    default:
      break;  // rejected by check_step_arguments
  }
}

// ------------------------------------------------------------------------------------------------
// Dual blocks

// Groups one block's samples by constraint id: open addressing with linear probing, in a table sized
// by how many distinct ids the batch can hold (the fewer of samples and constraints), so its cost
// never grows with the number of constraints.  Reused across steps by each thread.
class TouchedConstraints {
 public:
  // One touched constraint: its id, the sum of its samples and their number, on one cache line.
  struct Slot {
    int64_t id;
    float sum;
    float count;
  };

  template <typename Id>
  void gather(const Id* __restrict__ ids, const float* __restrict__ violations, int64_t num_samples,
              int64_t num_constraints) {
    reset(std::min(num_samples, num_constraints));
    int32_t* __restrict__ table = table_.data();
    Slot* __restrict__ slots = slots_.data();
    const uint64_t mask = mask_;
    int32_t size = 0;
    // Samples are added in order, so each constraint's sum has the same rounding as index_add_.
    for (int64_t i = 0; i < num_samples; ++i) {
      const int64_t id = static_cast<int64_t>(ids[i]);
      if (id == kPaddingId) continue;
      if (i + kTablePrefetchDistance < num_samples) {
        __builtin_prefetch(table + (hash(static_cast<int64_t>(ids[i + kTablePrefetchDistance])) & mask), 1, 3);
      }
      uint64_t h = hash(id) & mask;
      int32_t entry;
      while ((entry = table[h]) != 0 && slots[entry - 1].id != id) h = (h + 1) & mask;
      if (entry == 0) {
        slots[size] = {id, 0.0f, 0.0f};
        entry = ++size;
        table[h] = entry;
      }
      Slot& slot = slots[entry - 1];
      slot.sum += violations[i];
      slot.count += 1.0f;
    }
    size_ = size;
  }

  int64_t size() const { return size_; }
  const Slot* slots() const { return slots_.data(); }

 private:
  // How many samples ahead the gather loop pulls the table entry it will probe into the cache.
  static constexpr int64_t kTablePrefetchDistance = 16;

  static uint64_t hash(int64_t id) { return (static_cast<uint64_t>(id) * 0x9E3779B97F4A7C15ull) >> 20; }

  // A load factor of at most 1/4 keeps probe runs short, so the probe loop's branch rarely
  // mispredicts even when the samples hit the same few constraints over and over.
  void reset(int64_t max_distinct) {
    int64_t capacity = 16;
    while (capacity < 4 * max_distinct) capacity *= 2;
    table_.assign(capacity, 0);
    mask_ = static_cast<uint64_t>(capacity - 1);
    if (static_cast<int64_t>(slots_.size()) < max_distinct) slots_.resize(max_distinct);
    size_ = 0;
  }

  std::vector<int32_t> table_;  // 1 + the slot of the id hashed here; 0 when free
  std::vector<Slot> slots_;
  int64_t size_ = 0;
  uint64_t mask_ = 0;
};

// How many touched constraints ahead the update loop prefetches multipliers (and smoothed errors):
// enough misses in flight to overlap their latency, and their page walks when the arrays are large.
constexpr int64_t kStatePrefetchDistance = 16;

void run_dual_block(const DualEntry& b) {
  thread_local TouchedConstraints touched;
  if (b.ids_are_int32) {
    touched.gather(static_cast<const int32_t*>(b.ids), b.violations, b.num_samples, b.num_constraints);
  } else {
    touched.gather(static_cast<const int64_t*>(b.ids), b.violations, b.num_samples, b.num_constraints);
  }
  const TouchedConstraints::Slot* slots = touched.slots();
  const int64_t num_touched = touched.size();
  float* const multipliers = b.multipliers;
  const DualStateRows& state = b.state;
  float max_measure = 0.0f, num_positive = 0.0f;
  for (int64_t s = 0; s < num_touched; ++s) {
    if (s + kStatePrefetchDistance < num_touched) {
      const int64_t ahead = slots[s + kStatePrefetchDistance].id;
      __builtin_prefetch(multipliers + ahead, 1, 3);
      for (float* row : {state.smoothed_errors, state.running_sums, state.running_counts}) {
        if (row) __builtin_prefetch(row + ahead, 1, 3);
      }
    }
    const int64_t k = slots[s].id;
    const float measure = dual_update(slots[s].sum, slots[s].count, multipliers[k], state, k, b.coefficients);
    max_measure = s == 0 ? measure : nan_max(max_measure, measure);
    num_positive += measure > 0.0f ? 1.0f : 0.0f;
  }
  b.stats_row[0] = static_cast<float>(num_touched);
  b.stats_row[1] = max_measure;
  b.stats_row[2] = num_positive;
}

// ------------------------------------------------------------------------------------------------
// The operator

template <typename Id>
void check_ids_in_range(const at::Tensor& ids, int64_t num_constraints, int64_t block) {
  const Id* data = ids.const_data_ptr<Id>();
  const int64_t n = ids.numel();
  // One unsigned comparison catches negative ids too, and keeps the loop vectorisable.
  const uint64_t limit = static_cast<uint64_t>(num_constraints);
  int64_t out_of_range = 0;
#pragma omp simd reduction(+ : out_of_range)
  for (int64_t i = 0; i < n; ++i) {
    const int64_t id = static_cast<int64_t>(data[i]);
    out_of_range += (static_cast<uint64_t>(id) >= limit) & (id != kPaddingId);
  }
  TORCH_CHECK(out_of_range == 0, "fused_step: ids[", block, "] has ", out_of_range,
              " id(s) outside [0, ", num_constraints, ") that are not padding (-1)");
}

std::vector<PrimalEntry> primal_entries(const StepArguments& a) {
  std::vector<PrimalEntry> entries(a.num_tensors());
  for (int64_t i = 0; i < a.num_tensors(); ++i) {
    PrimalEntry& e = entries[i];
    const int64_t flags = a.primal_flags[i];
    const double* hp = a.host_primal_hparams(i);
    e.param = a.params[i].data_ptr();
    e.grad = a.grads[i].const_data_ptr();
    e.exp_avg = a.exp_avgs[i].numel() ? a.exp_avgs[i].data_ptr() : nullptr;
    e.dtype = a.params[i].scalar_type();
    const bool maximize = flags & kMaximize;
    if (a.is_adam()) {
      e.exp_avg_sq = a.exp_avg_sqs[i].data_ptr();
      e.max_exp_avg_sq = a.has_max_exp_avg_sq(i) ? a.max_exp_avg_sqs[i].data_ptr() : nullptr;
      // The step count advances first: bias corrections use the new value, as torch.optim does.
      float* step = a.steps[i].data_ptr<float>();
      *step += 1.0f;
      const bool decay = hp[primal_slot::kWeightDecay] != 0.0;
      e.adam_options = {a.has_max_exp_avg_sq(i), decay && !(flags & kDecoupledWeightDecay),
                        decay && (flags & kDecoupledWeightDecay)};
      e.adam = adam_coefficients(hp, maximize, static_cast<double>(*step));
    } else {
      e.sgd_options = {hp[primal_slot::kWeightDecay] != 0.0, a.has_momentum_buffer(i), bool(flags & kFirstMomentumStep),
                       bool(flags & kNesterov)};
      e.sgd = sgd_coefficients(hp, maximize);
    }
  }
  return entries;
}

std::vector<WorkItem> chunk_tensors(at::TensorList params) {
  std::vector<WorkItem> items;
  for (int64_t i = 0; i < static_cast<int64_t>(params.size()); ++i) {
    const int64_t n = params[i].numel();
    for (int64_t begin = 0; begin < n; begin += kChunkElements) {
      items.push_back({i, begin, std::min(n, begin + kChunkElements)});
    }
  }
  return items;
}

at::Tensor fused_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
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
  check_step_arguments(args, c10::Device(c10::kCPU));
  for (int64_t j = 0; j < args.num_blocks(); ++j) {
    if (ids[j].scalar_type() == at::kInt) {
      check_ids_in_range<int32_t>(ids[j], multipliers[j].numel(), j);
    } else {
      check_ids_in_range<int64_t>(ids[j], multipliers[j].numel(), j);
    }
  }
  at::Tensor stats = at::zeros({args.num_blocks(), kStatsColumns}, at::TensorOptions().dtype(at::kFloat));
  bump_versions(args);
  if (found_inf.has_value() && found_inf->item<float>() != 0.0f) return stats;
  const float inv_scale =
      grad_scale.has_value() ? static_cast<float>(1.0 / static_cast<double>(grad_scale->item<float>())) : 1.0f;

  const std::vector<PrimalEntry> primal = primal_entries(args);
  std::vector<DualEntry> dual;
  int64_t total_work = 0;
  for (int64_t j = 0; j < args.num_blocks(); ++j) {
    const int64_t n = ids[j].numel();
    total_work += n;
    if (n == 0) continue;  // an untouched block keeps its zero statistics
    dual.push_back({multipliers[j].data_ptr<float>(),
                    dual_state_pointers(args.dual_state_rows(j) ? dual_states[j].data_ptr<float>() : nullptr,
                                        multipliers[j].numel(), dual_flags[j]),
                    ids[j].const_data_ptr(), ids[j].scalar_type() == at::kInt,
                    violations[j].const_data_ptr<float>(), n, multipliers[j].numel(),
                    dual_coefficients(args.host_dual_hparams(j), dual_flags[j]),
                    stats.data_ptr<float>() + j * kStatsColumns});
  }
  const std::vector<WorkItem> chunks = chunk_tensors(params);
  for (const at::Tensor& p : params) total_work += p.numel();

  // Blocks come first so that a thread picks each up early and the chunks even out the finish.
  const int64_t num_dual = static_cast<int64_t>(dual.size());
  const int64_t num_items = num_dual + static_cast<int64_t>(chunks.size());
  const bool adam = args.is_adam();
  const int num_threads = total_work < kParallelThreshold || at::in_parallel_region() ? 1 : at::get_num_threads();
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
  for (int64_t item = 0; item < num_items; ++item) {
    if (item < num_dual) {
      run_dual_block(dual[item]);
    } else {
      const WorkItem& w = chunks[item - num_dual];
      run_primal_chunk(primal[w.tensor], adam, w.begin, w.end, inv_scale);
    }
  }
  return stats;
}

}  // namespace
}  // namespace fused_lagrangian

TORCH_LIBRARY_IMPL(fused_lagrangian, CPU, m) {
  m.impl("fused_step", &fused_lagrangian::fused_step_cpu);
}
