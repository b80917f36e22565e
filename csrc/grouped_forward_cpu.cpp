// CPU kernel of grouped_lagrangian_forward: a grouped Lagrangian block call in one O(batch) pass.
//
// The Python torch path (fused_lagrangian/formulation.py) is the specification: per-entry signed
// violations e = s * (v - [mean v] - b_k), weights 1 / n_k with n_k the entries of group k in the
// batch, the term sum_e w_e lambda_k e, the fp32 dual violations and the ERROR_* code of
// validation.py.  Groups are found through a hash table sized by the batch, never by the number of
// constraints: at K >> batch the torch path's sort is what this op saves.
#include <ATen/EmptyTensor.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/mul.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>

#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

namespace fused_lagrangian {
namespace {

using ForwardOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

constexpr int32_t kErrorIdsOutOfRange = 1;  // validation.ERROR_IDS_OUT_OF_RANGE
constexpr int32_t kErrorNonfinite = 2;      // validation.ERROR_NONFINITE

// Group id -> dense slot, open addressing (Fibonacci hashing) over storage the thread keeps between calls.
// The capacity is a power of two at least four times the entries, so the table is sized by the batch,
// never by the number of constraints.  At K >> batch every id is new and the table fills to its maximum
// load: at 1/2 the probe loop's unpredictable length cost ~3 ns an entry (measured, batch 4096), at 1/4
// nearly every lookup ends at its first probe.
class GroupSlots {
 public:
  GroupSlots(std::vector<int32_t>& table_storage, std::vector<int64_t>& ids_storage, int64_t num_entries) {
    int shift = 64 - 4;
    uint64_t capacity = 16;
    while (capacity < 4 * static_cast<uint64_t>(num_entries)) capacity <<= 1, --shift;
    table_storage.assign(capacity, -1);
    ids_storage.resize(num_entries);
    // Plain pointers, not the thread-local vectors: every access to a thread_local of a shared library
    // is a call, and the compiler repeats it inside the loop.
    table_ = table_storage.data();
    ids_ = ids_storage.data();
    shift_ = shift;
    mask_ = capacity - 1;
  }
  int32_t slot_of(int64_t id) {
    uint64_t h = (static_cast<uint64_t>(id) * 0x9E3779B97F4A7C15ull) >> shift_;
    int32_t slot;
    while ((slot = table_[h]) >= 0 && ids_[slot] != id) h = (h + 1) & mask_;
    if (slot < 0) {
      slot = size_++;
      ids_[slot] = id;
      table_[h] = slot;
    }
    return slot;
  }
  int32_t size() const { return size_; }

 private:
  int32_t* table_;
  int64_t* ids_;
  int shift_;
  uint64_t mask_;
  int32_t size_ = 0;
};

// How far ahead of the current entry its multiplier (and bound) are prefetched, and to which level:
// into L2 (locality 1), since an L1 prefetch holds one of the core's few L1 miss buffers until it is
// served and so caps the misses in flight.  Measured on a 2-core EPYC VM at K = 10^7, batch 4096: the
// growth over K = 10^3 is about a third of an L1 prefetch 32 entries ahead.
constexpr int64_t kPrefetchDistance = 64;
constexpr int kPrefetchLocality = 1;

// Outputs come from the CPU allocator directly: at small batches the five allocations through the
// dispatcher (at::empty, at::scalar_tensor) cost about as much as the rest of the kernel.
at::Tensor empty_output(at::IntArrayRef size, at::ScalarType dtype) { return at::detail::empty_cpu(size, dtype); }

template <typename T>
at::Tensor scalar_output(T value, at::ScalarType dtype) {
  at::Tensor scalar = empty_output({}, dtype);
  *scalar.data_ptr<T>() = value;
  return scalar;
}

template <typename T>
T signed_violation(T value, T overall, T bound, double sign) {
  const T centred = value - overall;  // the torch path subtracts the mean first, then the bound
  return sign < 0 ? bound - centred : centred - bound;
}

template <typename T, typename Id>
ForwardOutputs forward_typed(
    const at::Tensor& values, const at::Tensor& ids, const c10::optional<at::Tensor>& dual_values,
    const at::Tensor& multipliers, const c10::optional<at::Tensor>& bounds, double bound, double sign,
    bool to_overall) {
  const int64_t num_samples = values.numel();
  const int64_t num_constraints = multipliers.numel();
  const int64_t per_sample = ids.dim() == 2 ? ids.size(1) : 1;
  const bool multiple = ids.dim() == 2;
  const T* v = values.data_ptr<T>();
  const T* dual = dual_values ? dual_values->data_ptr<T>() : nullptr;
  const Id* raw_ids = ids.data_ptr<Id>();
  const float* lambda = multipliers.data_ptr<float>();
  const float* bound_of = bounds ? bounds->data_ptr<float>() : nullptr;

  int32_t error = 0;
  // Per-call scratch kept by the thread: fresh vectors would page-fault their memory in on every call
  // (and references, taken once: every access to a thread_local of a shared library is a call).
  thread_local std::vector<int64_t> group_scratch, sample_scratch, slot_ids_scratch;
  thread_local std::vector<int32_t> slot_scratch, table_scratch;
  thread_local std::vector<float> gather_scratch;
  thread_local std::vector<T> weight_scratch;
  const int64_t num_memberships = num_samples * per_sample;
  group_scratch.resize(num_memberships);
  if (multiple) sample_scratch.resize(num_memberships);
  int64_t* const entry_group = group_scratch.data();
  int64_t* const entry_sample = sample_scratch.data();
  // Entries: one per (sample, group) membership, in row order; ids are clamped into range (the error
  // code says whether they were), and (B, M) padding (-1) makes no entry.
  const int64_t lowest = multiple ? -1 : 0;
  int64_t num_entries = 0;
  for (int64_t i = 0; i < num_memberships; ++i) {
    int64_t id = static_cast<int64_t>(raw_ids[i]);
    if (id < lowest || id >= num_constraints) {
      error |= kErrorIdsOutOfRange;
      id = id < lowest ? lowest : num_constraints - 1;
    }
    if (id < 0) continue;
    entry_group[num_entries] = id;
    if (multiple) entry_sample[num_entries] = i / per_sample;
    ++num_entries;
  }

  // Sums over the batch in double: at least as accurate as the torch path's cascaded fp32 sums at any B.
  T overall = 0, dual_overall = 0;
  if (to_overall) {
    double sum = 0, dual_sum = 0;
    for (int64_t b = 0; b < num_samples; ++b) sum += v[b];
    overall = static_cast<T>(sum / static_cast<double>(num_samples));
    if (dual) {
      for (int64_t b = 0; b < num_samples; ++b) dual_sum += dual[b];
      dual_overall = static_cast<T>(dual_sum / static_cast<double>(num_samples));
    }
  }

  GroupSlots slots(table_scratch, slot_ids_scratch, num_entries);
  slot_scratch.resize(num_entries);
  weight_scratch.assign(num_entries, T(0));
  int32_t* const slot_of_entry = slot_scratch.data();
  T* const group_weights = weight_scratch.data();  // n_k while counting, then 1 / n_k
  gather_scratch.resize(bound_of ? 2 * num_entries : num_entries);
  float* const entry_lambda = gather_scratch.data();
  float* const entry_bound = bound_of ? entry_lambda + num_entries : nullptr;
  // At K >> batch every multiplier (and bound) read is a cache miss: prefetched a fixed distance ahead,
  // they arrive while the hash table does its work instead of stalling the gather.
  for (int64_t e = 0; e < num_entries; ++e) {
    if (e + kPrefetchDistance < num_entries) {
      const int64_t ahead = entry_group[e + kPrefetchDistance];
      __builtin_prefetch(lambda + ahead, 0, kPrefetchLocality);
      if (bound_of) __builtin_prefetch(bound_of + ahead, 0, kPrefetchLocality);
    }
    const int64_t group = entry_group[e];
    entry_lambda[e] = lambda[group];
    if (bound_of) entry_bound[e] = bound_of[group];
    const int32_t slot = slots.slot_of(group);
    group_weights[slot] += 1;
    slot_of_entry[e] = slot;
  }
  for (int32_t slot = 0; slot < slots.size(); ++slot) group_weights[slot] = T(1) / group_weights[slot];

  at::Tensor entry_ids = empty_output({num_entries}, at::kLong);
  at::Tensor recorded = empty_output({num_entries}, at::kFloat);
  at::Tensor slopes = empty_output({num_samples}, values.scalar_type());
  int64_t* out_ids = entry_ids.data_ptr<int64_t>();
  float* out_recorded = recorded.data_ptr<float>();
  T* out_slopes = slopes.data_ptr<T>();
  for (int64_t b = 0; b < num_samples; ++b) out_slopes[b] = 0;

  double term = 0, coefficient_sum = 0;
  double recorded_sum = 0, primal_sum = 0;  // validation.nonfinite_error: NaN/inf iff an element is
  for (int64_t e = 0; e < num_entries; ++e) {
    const int64_t group = entry_group[e];
    const int64_t sample = multiple ? entry_sample[e] : e;
    const T b = bound_of ? static_cast<T>(entry_bound[e]) : static_cast<T>(bound);
    const T violation = signed_violation<T>(v[sample], overall, b, sign);
    const float dual_violation =
        static_cast<float>(dual ? signed_violation<T>(dual[sample], dual_overall, b, sign) : violation);
    const T coefficient = static_cast<T>(entry_lambda[e]) * group_weights[slot_of_entry[e]];
    term += coefficient * violation;
    coefficient_sum += coefficient;
    out_slopes[sample] += static_cast<T>(sign) * coefficient;
    out_ids[e] = group;
    out_recorded[e] = dual_violation;
    recorded_sum += dual_violation;
    primal_sum += violation;
  }
  if (!std::isfinite(recorded_sum) || (dual && !std::isfinite(primal_sum))) error |= kErrorNonfinite;
  if (to_overall && num_samples > 0) {
    // d e / d v_b also has -s / B through the mean of every sample.
    const T mean_slope = static_cast<T>(sign * coefficient_sum / static_cast<double>(num_samples));
    for (int64_t b = 0; b < num_samples; ++b) out_slopes[b] -= mean_slope;
  }
  return {scalar_output(static_cast<T>(term), values.scalar_type()), slopes, entry_ids, recorded,
          scalar_output(error, at::kInt)};
}

ForwardOutputs grouped_lagrangian_forward_cpu(
    const at::Tensor& values, const at::Tensor& ids, const c10::optional<at::Tensor>& dual_values,
    const at::Tensor& multipliers, const c10::optional<at::Tensor>& bounds, double bound, double sign,
    bool to_overall) {
  TORCH_CHECK(values.dim() == 1 && values.is_floating_point(), "grouped_lagrangian_forward: values must be 1-D float");
  TORCH_CHECK(ids.dim() >= 1 && ids.size(0) == values.size(0) && ids.dim() <= 2,
              "grouped_lagrangian_forward: ids must be (B,) or (B, M)");
  TORCH_CHECK(multipliers.scalar_type() == at::kFloat, "grouped_lagrangian_forward: multipliers must be float32");
  TORCH_CHECK(!bounds || (bounds->scalar_type() == at::kFloat && bounds->numel() == multipliers.numel()),
              "grouped_lagrangian_forward: bounds must be float32, one per constraint");
  // The compute dtype of the torch path: float64 values stay float64, every narrower one is widened to fp32.
  const auto compute = values.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // Only a conversion goes through the dispatcher (to() costs a dispatch even when it has nothing to do).
  const at::Tensor v = (values.scalar_type() == compute ? values : values.to(compute)).contiguous();
  c10::optional<at::Tensor> dual;
  if (dual_values) dual = (dual_values->scalar_type() == compute ? *dual_values : dual_values->to(compute)).contiguous();
  const at::Tensor id = ids.contiguous();
  const at::Tensor lambda = multipliers.contiguous();
  c10::optional<at::Tensor> bound_rows;
  if (bounds) bound_rows = bounds->contiguous();
  const bool ids_are_int32 = id.scalar_type() == at::kInt;
  TORCH_CHECK(ids_are_int32 || id.scalar_type() == at::kLong, "grouped_lagrangian_forward: ids must be int32 or int64");
  if (compute == at::kDouble) {
    return ids_are_int32 ? forward_typed<double, int32_t>(v, id, dual, lambda, bound_rows, bound, sign, to_overall)
                         : forward_typed<double, int64_t>(v, id, dual, lambda, bound_rows, bound, sign, to_overall);
  }
  return ids_are_int32 ? forward_typed<float, int32_t>(v, id, dual, lambda, bound_rows, bound, sign, to_overall)
                       : forward_typed<float, int64_t>(v, id, dual, lambda, bound_rows, bound, sign, to_overall);
}

using ForwardKernel = ForwardOutputs (*)(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                                         const at::Tensor&, const c10::optional<at::Tensor>&, double, double, bool);

// The registered op's kernel for the tensors' device, reached from its Autograd kernel.
ForwardOutputs redispatch_below_autograd(const at::Tensor& values, const at::Tensor& ids,
                                         const c10::optional<at::Tensor>& dual_values, const at::Tensor& multipliers,
                                         const c10::optional<at::Tensor>& bounds, double bound, double sign,
                                         bool to_overall) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fused_lagrangian::grouped_lagrangian_forward", "")
                             .typed<ForwardOutputs(const at::Tensor&, const at::Tensor&,
                                                   const c10::optional<at::Tensor>&, const at::Tensor&,
                                                   const c10::optional<at::Tensor>&, double, double, bool)>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(values, ids, dual_values, multipliers, bounds, bound, sign, to_overall);
}

// Autograd in C++: d term / d values is the kernel's second output, so the backward is one product;
// a Python autograd function (torch.library.register_autograd) costs more than the whole kernel.  The node
// is a plain autograd Node, as builtin ops' are: a torch::autograd::Function adds per-input and per-output
// bookkeeping (~4 us a call, forward and backward, at small batches).  Only the term has a gradient: the
// kernel's other outputs are handed back beside it.
struct GroupedForwardBackward : public torch::autograd::Node {
  GroupedForwardBackward(const at::Tensor& slopes, at::ScalarType values_dtype)
      : slopes_(slopes, /*is_output=*/false), values_dtype_(values_dtype) {}

  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);  // as builtin nodes: release_variables may run concurrently
    if (!grads[0].defined()) return {at::Tensor()};
    at::Tensor grad = at::mul(grads[0], slopes_.unpack());
    return {grad.scalar_type() == values_dtype_ ? grad : grad.to(values_dtype_)};
  }
  std::string name() const override { return "GroupedLagrangianForwardBackward"; }
  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    slopes_.reset_data();
  }

 private:
  torch::autograd::SavedVariable slopes_;
  at::ScalarType values_dtype_;
};

template <ForwardKernel kernel>
ForwardOutputs forward_with_autograd(const at::Tensor& values, const at::Tensor& ids,
                                     const c10::optional<at::Tensor>& dual_values, const at::Tensor& multipliers,
                                     const c10::optional<at::Tensor>& bounds, double bound, double sign,
                                     bool to_overall) {
  ForwardOutputs outputs;
  {
    at::AutoGradMode no_grad(false);  // the kernel's own conversions (values.to) record nothing
    outputs = kernel(values, ids, dual_values, multipliers, bounds, bound, sign, to_overall);
  }
  if (torch::autograd::compute_requires_grad(values)) {
    auto node = c10::make_intrusive<GroupedForwardBackward>(std::get<1>(outputs), values.scalar_type());
    node->set_next_edges(torch::autograd::collect_next_edges(values));
    torch::autograd::set_history(std::get<0>(outputs), node);
  }
  return outputs;
}

}  // namespace
}  // namespace fused_lagrangian

TORCH_LIBRARY_IMPL(fused_lagrangian, CPU, m) {
  m.impl("grouped_lagrangian_forward", &fused_lagrangian::grouped_lagrangian_forward_cpu);
}

TORCH_LIBRARY_IMPL(fused_lagrangian, Autograd, m) {
  m.impl("grouped_lagrangian_forward",
         &fused_lagrangian::forward_with_autograd<&fused_lagrangian::redispatch_below_autograd>);
}

// Eager calls on CPU tensors (fused_lagrangian/ops/grouped_forward.py): the same kernel and autograd
// node through a pybind11 function instead of torch.ops, whose generic path converts every argument
// against the schema and dispatches twice (Autograd, then CPU): ~2 us more a call (6.9 against 4.4 us
// at B=100, 1 thread).  Traced and compiled calls keep the registered op.  Handed to Python through ctypes
// (the library is loaded with torch.ops.load_library, not imported), as a new reference.
extern "C" __attribute__((visibility("default"))) PyObject* fused_lagrangian_grouped_forward_cpu_binding() {
  namespace py = pybind11;
  return py::cpp_function(&fused_lagrangian::forward_with_autograd<&fused_lagrangian::grouped_lagrangian_forward_cpu>,
                          py::name("grouped_lagrangian_forward"), py::call_guard<py::gil_scoped_release>())
      .release()
      .ptr();
}
