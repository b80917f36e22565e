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
  // contract.py's float64 hyperparameter tensors: on the CPU (values read on the host), or on a CUDA
  // step's device, where the kernel reads them itself (capturable steps: a CUDA graph replays with the
  // values they hold at replay time).  Checked by check_step_arguments.
  const at::Tensor& primal_hparams;
  c10::ArrayRef<int64_t> primal_flags;
  int64_t algorithm;
  at::TensorList multipliers, dual_states, ids, violations;
  const at::Tensor& dual_hparams;
  c10::ArrayRef<int64_t> dual_flags;
  const std::optional<at::Tensor>& grad_scale;
  const std::optional<at::Tensor>& found_inf;

  int64_t num_tensors() const { return static_cast<int64_t>(params.size()); }
  int64_t num_blocks() const { return static_cast<int64_t>(multipliers.size()); }
  bool is_adam() const { return algorithm == kAdam; }
  // A tensor's (block's) hyperparameters, read on the host: only for hparams tensors on the CPU.
  const double* host_primal_hparams(int64_t tensor) const {
    return host_values(primal_hparams, "primal_hparams") + tensor * kPrimalHparams;
  }
  const double* host_dual_hparams(int64_t block) const {
    return host_values(dual_hparams, "dual_hparams") + block * kDualHparams;
  }
  // The optional state a tensor (block) has, given its flags and hyperparameters.  SGD's momentum is
  // read on the host: SGD takes its primal_hparams on the CPU (checked).
  bool has_momentum_buffer(int64_t tensor) const {
    return !is_adam() && host_primal_hparams(tensor)[primal_slot::kBeta1] != 0.0;  // momentum
  }
  bool has_max_exp_avg_sq(int64_t tensor) const { return is_adam() && (primal_flags[tensor] & kAmsgrad); }
  // Rows of the block's dual state the step reads (contract.py): 0 for FROZEN blocks.
  int64_t dual_state_rows(int64_t block) const {
    const int64_t flags = dual_flags[block];
    if (flags & kFrozen) return 0;
    return ((flags & kNupi) ? 1 : 0) + ((flags & kRunning) ? 2 : 0);
  }

 private:
  static const double* host_values(const at::Tensor& hparams, const char* what) {
    TORCH_CHECK(hparams.device().is_cpu(), "fused_step: ", what, " are read on the host here, but are on ",
                hparams.device());
    return hparams.const_data_ptr<double>();
  }
};

// The operator's arguments, in schema order, as one StepArguments: how every kernel entry point (and
// the tests' CUDA emulation) takes them.  The result refers to the arguments: it lives within the call.
inline StepArguments make_step_arguments(
    at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
    at::TensorList max_exp_avg_sqs, at::TensorList steps, const at::Tensor& primal_hparams,
    c10::ArrayRef<int64_t> primal_flags, int64_t algorithm, at::TensorList multipliers, at::TensorList dual_states,
    at::TensorList ids, at::TensorList violations, const at::Tensor& dual_hparams, c10::ArrayRef<int64_t> dual_flags,
    const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  return StepArguments{params,       grads,        exp_avgs,    exp_avg_sqs, max_exp_avg_sqs, steps,
                       primal_hparams, primal_flags, algorithm,   multipliers, dual_states,     ids,
                       violations,   dual_hparams, dual_flags,  grad_scale,  found_inf};
}

// The operator's schema after its name: fused_step.cpp declares the operator with it, the tests' CUDA
// emulation its stand-ins (tests/test_contract.py checks that it spells contract.py's argument layout).
#define FUSED_STEP_SCHEMA_ARGUMENTS                                                                        \
  "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "               \
  "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] steps, Tensor primal_hparams, int[] primal_flags, "         \
  "int algorithm, Tensor(f!)[] multipliers, Tensor(g!)[] dual_states, Tensor[] ids, Tensor[] violations, " \
  "Tensor dual_hparams, int[] dual_flags, Tensor? grad_scale=None, Tensor? found_inf=None) -> Tensor"

// Throws (TORCH_CHECK) on any inconsistency: list lengths, dtypes, sizes, strides, devices (the
// hyperparameter tensors may be on the CPU or on ``device``).  Ids are the kernels' business: the CPU
// kernel range-checks them, the CUDA kernel skips those out of range (raising would need a host sync;
// the constraint blocks validate ids when they record them).
void check_step_arguments(const StepArguments& args, c10::Device device);

// Bumps the version counter of every tensor the step updates, as torch's in-place ops do, so that
// autograd notices a parameter saved for backward and then stepped.  The dispatcher does not do it
// for a custom op's mutable arguments.
void bump_versions(const StepArguments& args);

// Parameter tensors may be strided (channels_last) as long as every tensor of an entry shares the
// parameter's dense layout: the update is elementwise, so it walks the storage in memory order.
bool shares_dense_layout(const at::Tensor& tensor, const at::Tensor& param);

}  // namespace fused_lagrangian
