// Host-side view of fused_step's arguments (layout: fused_lagrangian/contract.py) and the checks
// both device kernels run before they touch any memory.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <optional>

#include "step_math.h"

namespace fused_lagrangian {

struct StepArguments {
  at::TensorList params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps;
  c10::ArrayRef<double> primal_hparams;
  c10::ArrayRef<int64_t> primal_flags;
  int64_t algorithm;
  at::TensorList multipliers, dual_states, ids, violations;
  c10::ArrayRef<double> dual_hparams;
  c10::ArrayRef<int64_t> dual_flags;
  const std::optional<at::Tensor>& grad_scale;
  const std::optional<at::Tensor>& found_inf;

  int64_t num_tensors() const { return static_cast<int64_t>(params.size()); }
  int64_t num_blocks() const { return static_cast<int64_t>(multipliers.size()); }
  bool is_adam() const { return algorithm == kAdam; }
  // The optional state a tensor (block) has, given its flags and hyperparameters.
  bool has_momentum_buffer(int64_t tensor) const {
    return !is_adam() && primal_hparams[tensor * kPrimalHparams + primal_slot::kBeta1] != 0.0;  // momentum
  }
  bool has_max_exp_avg_sq(int64_t tensor) const { return is_adam() && (primal_flags[tensor] & kAmsgrad); }
  // Rows of the block's dual state the step reads (contract.py): 0 for FROZEN blocks.
  int64_t dual_state_rows(int64_t block) const {
    const int64_t flags = dual_flags[block];
    if (flags & kFrozen) return 0;
    return ((flags & kNupi) ? 1 : 0) + ((flags & kRunning) ? 2 : 0);
  }
};

// Hyperparameters travel as 1-D float64 CPU tensors (contract.py): a scheduler's tensor lr is stacked
// into them without a host read, so a compiled step does not recompile when it changes.  Checked here.
inline c10::ArrayRef<double> host_hparams(const at::Tensor& hparams, const char* what) {
  TORCH_CHECK(hparams.device().is_cpu() && hparams.scalar_type() == at::kDouble && hparams.dim() == 1 &&
                  hparams.is_contiguous(),
              "fused_step: ", what, " must be a contiguous 1-D float64 CPU tensor");
  return c10::ArrayRef<double>(hparams.const_data_ptr<double>(), hparams.numel());
}

// Throws (TORCH_CHECK) on any inconsistency: list lengths, dtypes, sizes, strides, devices.  Ids are
// the kernels' business: the CPU kernel range-checks them, the CUDA kernel skips those out of range
// (raising would need a host sync; the constraint blocks validate ids when they record them).
void check_step_arguments(const StepArguments& args, c10::Device device);

// Bumps the version counter of every tensor the step updates, as torch's in-place ops do, so that
// autograd notices a parameter saved for backward and then stepped.  The dispatcher does not do it
// for a custom op's mutable arguments.
void bump_versions(const StepArguments& args);

// Parameter tensors may be strided (channels_last) as long as every tensor of an entry shares the
// parameter's dense layout: the update is elementwise, so it walks the storage in memory order.
bool shares_dense_layout(const at::Tensor& tensor, const at::Tensor& param);

}  // namespace fused_lagrangian
