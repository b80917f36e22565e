// The operator's schema, declared once; fused_step_cpu.cpp and fused_step_cuda.cu register kernels.
#include "fused_step.h"

#include <torch/library.h>

#include "step_math.h"

namespace fused_lagrangian {

bool shares_dense_layout(const at::Tensor& tensor, const at::Tensor& param) {
  return tensor.sizes().equals(param.sizes()) && tensor.strides().equals(param.strides());
}

namespace {

bool is_supported_param_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf;
}

void check_on(const at::Tensor& tensor, c10::Device device, const char* what, int64_t index) {
  TORCH_CHECK(tensor.device() == device, "fused_step: ", what, "[", index, "] is on ", tensor.device(),
              " but the step runs on ", device);
}

void check_state(const at::Tensor& state, const at::Tensor& param, c10::Device device, const char* what,
                 int64_t index) {
  check_on(state, device, what, index);
  TORCH_CHECK(state.scalar_type() == param.scalar_type(), "fused_step: ", what, "[", index, "] has dtype ",
              state.scalar_type(), ", its parameter ", param.scalar_type());
  TORCH_CHECK(shares_dense_layout(state, param), "fused_step: ", what, "[", index,
              "] must have its parameter's shape and strides");
}

// contract.py's hyperparameter tensor: 1-D contiguous float64, ``values_per_entry`` values for each of
// ``entries``, on the CPU (read on the host) or on the step's device (read by the kernel).
void check_hparams(const at::Tensor& hparams, int64_t entries, int64_t values_per_entry, c10::Device device,
                   const char* what, const char* entry) {
  TORCH_CHECK(hparams.scalar_type() == at::kDouble && hparams.dim() == 1 && hparams.is_contiguous(),
              "fused_step: ", what, " must be a contiguous 1-D float64 tensor");
  TORCH_CHECK(hparams.numel() == entries * values_per_entry, "fused_step: ", what, " needs ", values_per_entry,
              " values per ", entry, " (", entries * values_per_entry, "), got ", hparams.numel());
  TORCH_CHECK(hparams.device().is_cpu() || hparams.device() == device, "fused_step: ", what, " is on ",
              hparams.device(), "; it must be on the CPU or on the step's device ", device);
}

void check_primal(const StepArguments& a, c10::Device device) {
  const int64_t n = a.num_tensors();
  TORCH_CHECK(a.algorithm == kSgd || a.algorithm == kAdam, "fused_step: unknown algorithm ", a.algorithm);
  TORCH_CHECK(static_cast<int64_t>(a.grads.size()) == n && static_cast<int64_t>(a.exp_avgs.size()) == n,
              "fused_step: params, grads and exp_avgs must have one entry per tensor");
  TORCH_CHECK(static_cast<int64_t>(a.primal_flags.size()) == n, "fused_step: primal_flags needs one per tensor");
  check_hparams(a.primal_hparams, n, kPrimalHparams, device, "primal_hparams", "tensor");
  // Whether an SGD tensor has a momentum buffer is decided on the host (capturable steps are Adam's).
  TORCH_CHECK(a.is_adam() || a.primal_hparams.device().is_cpu(),
              "fused_step: SGD takes its primal_hparams on the CPU");
  if (a.is_adam()) {
    TORCH_CHECK(static_cast<int64_t>(a.exp_avg_sqs.size()) == n &&
                    static_cast<int64_t>(a.max_exp_avg_sqs.size()) == n && static_cast<int64_t>(a.steps.size()) == n,
                "fused_step: Adam needs exp_avg_sqs, max_exp_avg_sqs and steps for every tensor");
  }
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& param = a.params[i];
    check_on(param, device, "params", i);
    TORCH_CHECK(is_supported_param_dtype(param.scalar_type()), "fused_step: params[", i, "] has dtype ",
                param.scalar_type(), "; supported: float32, bfloat16, float16");
    TORCH_CHECK(param.is_non_overlapping_and_dense(), "fused_step: params[", i,
                "] must be dense (contiguous or a permutation of it)");
    check_state(a.grads[i], param, device, "grads", i);
    if (a.is_adam()) {
      check_state(a.exp_avgs[i], param, device, "exp_avgs", i);
      check_state(a.exp_avg_sqs[i], param, device, "exp_avg_sqs", i);
      if (a.has_max_exp_avg_sq(i)) check_state(a.max_exp_avg_sqs[i], param, device, "max_exp_avg_sqs", i);
      const at::Tensor& step = a.steps[i];
      check_on(step, device, "steps", i);
      TORCH_CHECK(step.numel() == 1 && step.scalar_type() == at::kFloat, "fused_step: steps[", i,
                  "] must be a one-element float32 tensor");
    } else if (a.has_momentum_buffer(i)) {
      check_state(a.exp_avgs[i], param, device, "exp_avgs (momentum buffer)", i);
    }
  }
}

void check_dual(const StepArguments& a, c10::Device device) {
  const int64_t m = a.num_blocks();
  TORCH_CHECK(static_cast<int64_t>(a.dual_states.size()) == m && static_cast<int64_t>(a.ids.size()) == m &&
                  static_cast<int64_t>(a.violations.size()) == m,
              "fused_step: multipliers, dual_states, ids and violations must have one entry per block");
  TORCH_CHECK(static_cast<int64_t>(a.dual_flags.size()) == m, "fused_step: dual_flags needs one per block");
  check_hparams(a.dual_hparams, m, kDualHparams, device, "dual_hparams", "block");
  for (int64_t j = 0; j < m; ++j) {
    const at::Tensor& lam = a.multipliers[j];
    check_on(lam, device, "multipliers", j);
    TORCH_CHECK(lam.dim() == 1 && lam.scalar_type() == at::kFloat && lam.is_contiguous(),
                "fused_step: multipliers[", j, "] must be a contiguous 1-D float32 tensor");
    if (const int64_t rows = a.dual_state_rows(j)) {
      const at::Tensor& state = a.dual_states[j];
      check_on(state, device, "dual_states", j);
      TORCH_CHECK(state.scalar_type() == at::kFloat && state.is_contiguous() && state.numel() == rows * lam.numel(),
                  "fused_step: dual_states[", j, "] must be a contiguous float32 tensor of ", rows, " x ",
                  lam.numel(), " elements (one row each for the nuPI and running-estimate state its flags ask for)");
    }
    const at::Tensor& ids = a.ids[j];
    const at::Tensor& violations = a.violations[j];
    check_on(ids, device, "ids", j);
    check_on(violations, device, "violations", j);
    TORCH_CHECK((ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt) && ids.is_contiguous() &&
                    ids.dim() == 1,
                "fused_step: ids[", j, "] must be a contiguous 1-D int64 or int32 tensor");
    TORCH_CHECK(violations.scalar_type() == at::kFloat && violations.is_contiguous() &&
                    violations.numel() == ids.numel(),
                "fused_step: violations[", j, "] must be a contiguous float32 tensor with one value per id");
  }
}

void check_scalar(const std::optional<at::Tensor>& scalar, c10::Device device, const char* what) {
  if (!scalar.has_value()) return;
  TORCH_CHECK(scalar->numel() == 1 && scalar->scalar_type() == at::kFloat, "fused_step: ", what,
              " must be a one-element float32 tensor");
  TORCH_CHECK(scalar->device() == device || scalar->device().is_cpu(), "fused_step: ", what, " is on ",
              scalar->device(), " but the step runs on ", device);
}

void bump(at::TensorList tensors) {
  for (const at::Tensor& t : tensors) {
    if (t.defined() && !t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
  }
}

}  // namespace

void bump_versions(const StepArguments& args) {
  for (at::TensorList list : {args.params, args.exp_avgs, args.exp_avg_sqs, args.max_exp_avg_sqs, args.steps,
                              args.multipliers, args.dual_states}) {
    bump(list);
  }
}

void check_step_arguments(const StepArguments& args, c10::Device device) {
  check_primal(args, device);
  check_dual(args, device);
  check_scalar(args.grad_scale, device, "grad_scale");
  check_scalar(args.found_inf, device, "found_inf");
}

}  // namespace fused_lagrangian

TORCH_LIBRARY(fused_lagrangian, m) {
  m.def("fused_step" FUSED_STEP_SCHEMA_ARGUMENTS);
  // A grouped Lagrangian block call's forward (formulation.py is its specification): (term, d term / d
  // values, entry ids, fp32 dual violations, error code).  Its kernels, Autograd's included, are in
  // grouped_forward_cpu.cpp.
  m.def(
      "grouped_lagrangian_forward(Tensor values, Tensor ids, Tensor? dual_values, Tensor multipliers, "
      "Tensor? bounds, float bound, float sign, bool to_overall) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

// The step is not differentiable (optimizers run it under no_grad): autograd passes it straight to
// the device kernel instead of running its generic fallback, which costs tens of microseconds a call.
TORCH_LIBRARY_IMPL(fused_lagrangian, Autograd, m) {
  m.impl("fused_step", torch::CppFunction::makeFallthrough());
}
