// Per-element primal updates and per-constraint dual updates of fused_step, shared by the CPU and
// CUDA kernels.  The operations and their order follow backends/reference.py (which follows
// torch.optim's single-tensor SGD / Adam) so that every backend agrees with it to a few ulps: each
// torch op is one rounding, and where torch's vectorised CPU kernels use a fused multiply-add
// (add with alpha, lerp, and addcmul once GCC contracts its
// vector intrinsics) so does FL_FMA.  The sources are built without FP contraction, so no other
// operation is fused.
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define FL_INLINE __host__ __device__ __forceinline__
#else
#define FL_INLINE inline __attribute__((always_inline))
#endif

#if defined(__CUDA_ARCH__)
#define FL_FMA(a, b, c) __fmaf_rn(a, b, c)
#else
#define FL_FMA(a, b, c) std::fma(a, b, c)
#endif

namespace fused_lagrangian {

// Mirrors of contract.py (tests/test_contract.py parses them and checks they agree).
constexpr int kPrimalHparams = 5;
constexpr int kDualHparams = 8;
constexpr int kStatsColumns = 3;

// contract.PrimalSlot / DualSlot: where each hyperparameter sits in a tensor's (block's) values.
namespace primal_slot {
constexpr int kLr = 0, kBeta1 = 1, kBeta2 = 2, kEps = 3, kWeightDecay = 4;
}  // namespace primal_slot
namespace dual_slot {
constexpr int kLr = 0, kKp = 1, kKi = 2, kNu = 3, kDamping = 4, kLower = 5, kUpper = 6, kDecay = 7;
}  // namespace dual_slot

enum Algorithm : int64_t { kSgd = 0, kAdam = 1 };

enum PrimalFlag : int64_t {
  kAmsgrad = 1,
  kMaximize = 2,
  kNesterov = 4,
  kDecoupledWeightDecay = 8,
  kFirstMomentumStep = 16,
};

enum DualFlag : int64_t { kMean = 1, kNupi = 2, kRestart = 4, kFrozen = 8, kRunning = 16 };

// An entry of ids that is no sample (contract.py): ignored by the dual update.
constexpr int64_t kPaddingId = -1;

// torch.maximum and clamp propagate NaN; std::fmax / fminf do not.
FL_INLINE float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }
FL_INLINE float nan_clamp(float x, float lower, float upper) {
  if (x != x) return x;
  const float at_least_lower = x < lower ? lower : x;
  return at_least_lower > upper ? upper : at_least_lower;
}

// Scalars of one Adam tensor for one step, each rounded to float as torch rounds a Python scalar
// operand of a float tensor op.  Built on the host (CPU) or per thread block (CUDA) from the step.
struct AdamCoefficients {
  float grad_sign;               // -1 with maximize: negation is exact, like -grad
  float weight_decay;            // L2 form: grad + weight_decay * param
  float decay_factor;            // decoupled form: param * (1 - lr * weight_decay)
  float lerp_weight_or_minus;    // exp_avg.lerp_(grad, w): w when w < 0.5, else w - 1 (torch's two forms)
  bool lerp_from_exp_avg;        // which end the lerp starts from
  float beta2;
  float one_minus_beta2;
  float bias_correction2_sqrt;
  float eps;
  float step_size;               // -lr / bias_correction1
};

FL_INLINE AdamCoefficients adam_coefficients(const double* hp, bool maximize, double step) {
  using namespace primal_slot;
  const double lr = hp[kLr], beta1 = hp[kBeta1], beta2 = hp[kBeta2], eps = hp[kEps], weight_decay = hp[kWeightDecay];
  const double lerp_weight = 1.0 - beta1;
  const bool small_weight = std::fabs(static_cast<float>(lerp_weight)) < 0.5f;
  AdamCoefficients c;
  c.grad_sign = maximize ? -1.0f : 1.0f;
  c.weight_decay = static_cast<float>(weight_decay);
  c.decay_factor = static_cast<float>(1.0 - lr * weight_decay);
  c.lerp_weight_or_minus = small_weight ? static_cast<float>(lerp_weight) : static_cast<float>(lerp_weight) - 1.0f;
  c.lerp_from_exp_avg = small_weight;
  c.beta2 = static_cast<float>(beta2);
  c.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  c.bias_correction2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(beta2, step)));
  c.eps = static_cast<float>(eps);
  c.step_size = static_cast<float>(-lr / (1.0 - std::pow(beta1, step)));
  return c;
}

// Which optional terms an update has.  The CPU kernel instantiates these as compile-time constants
// (one vectorised loop per combination); the CUDA kernel passes them at run time (uniform branches).
struct AdamOptions {
  bool amsgrad, l2_weight_decay, decoupled_weight_decay;
};

FL_INLINE void adam_update(float& param, float grad, float& exp_avg, float& exp_avg_sq, float& max_exp_avg_sq,
                           const AdamCoefficients& c, AdamOptions o) {
  grad = grad * c.grad_sign;
  if (o.decoupled_weight_decay) param = param * c.decay_factor;
  if (o.l2_weight_decay) grad = FL_FMA(param, c.weight_decay, grad);
  // torch's lerp: start + w * (end - start) for small w, end - (1 - w) * (end - start) otherwise.
  exp_avg = FL_FMA(c.lerp_weight_or_minus, grad - exp_avg, c.lerp_from_exp_avg ? exp_avg : grad);
  exp_avg_sq = exp_avg_sq * c.beta2;
  exp_avg_sq = FL_FMA(c.one_minus_beta2 * grad, grad, exp_avg_sq);
  float second_moment = exp_avg_sq;
  if (o.amsgrad) {
    max_exp_avg_sq = nan_max(max_exp_avg_sq, exp_avg_sq);
    second_moment = max_exp_avg_sq;
  }
  const float denom = std::sqrt(second_moment) / c.bias_correction2_sqrt + c.eps;
  param = param + c.step_size * exp_avg / denom;
}

struct SgdCoefficients {
  float grad_sign, weight_decay, momentum, one_minus_dampening, minus_lr;
};

FL_INLINE SgdCoefficients sgd_coefficients(const double* hp, bool maximize) {
  using namespace primal_slot;
  const double lr = hp[kLr], momentum = hp[kBeta1], dampening = hp[kBeta2], weight_decay = hp[kWeightDecay];
  return {maximize ? -1.0f : 1.0f, static_cast<float>(weight_decay), static_cast<float>(momentum),
          static_cast<float>(1.0 - dampening), static_cast<float>(-lr)};
}

struct SgdOptions {
  bool weight_decay, momentum, first_momentum_step, nesterov;
};

FL_INLINE void sgd_update(float& param, float grad, float& momentum_buffer, const SgdCoefficients& c, SgdOptions o) {
  float direction = grad * c.grad_sign;
  if (o.weight_decay) direction = FL_FMA(param, c.weight_decay, direction);
  if (o.momentum) {
    momentum_buffer = o.first_momentum_step
                          ? direction
                          : FL_FMA(direction, c.one_minus_dampening, momentum_buffer * c.momentum);
    direction = o.nesterov ? FL_FMA(momentum_buffer, c.momentum, direction) : momentum_buffer;
  }
  param = FL_FMA(direction, c.minus_lr, param);
}

// One block's dual hyperparameters, as floats (the reference multiplies fp32 tensors by them).
struct DualCoefficients {
  float lr, kp, ki, nu, one_minus_nu, damping, lower, upper, decay;
  bool mean, nupi, restart, frozen, running, equality;
};

// A block's dual state (contract.py: rows chosen by the flags, each num_constraints long) as pointers
// to its rows, null for the rows it does not have.  FROZEN blocks read none.
struct DualStateRows {
  float* smoothed_errors;
  float* running_sums;
  float* running_counts;
};

FL_INLINE DualStateRows dual_state_pointers(float* state, int64_t num_constraints, int64_t flags) {
  DualStateRows rows{nullptr, nullptr, nullptr};
  if (flags & kFrozen) return rows;
  const bool nupi = flags & kNupi;
  if (nupi) rows.smoothed_errors = state;
  if (flags & kRunning) {
    rows.running_sums = state + (nupi ? num_constraints : 0);
    rows.running_counts = rows.running_sums + num_constraints;
  }
  return rows;
}

FL_INLINE DualCoefficients dual_coefficients(const double* hp, int64_t flags) {
  using namespace dual_slot;
  DualCoefficients c;
  c.lr = static_cast<float>(hp[kLr]);
  c.kp = static_cast<float>(hp[kKp]);
  c.ki = static_cast<float>(hp[kKi]);
  c.nu = static_cast<float>(hp[kNu]);
  c.one_minus_nu = static_cast<float>(1.0 - hp[kNu]);
  c.damping = static_cast<float>(hp[kDamping]);
  c.lower = static_cast<float>(hp[kLower]);
  c.upper = static_cast<float>(hp[kUpper]);
  c.decay = static_cast<float>(hp[kDecay]);
  c.mean = flags & kMean;
  c.nupi = flags & kNupi;
  c.restart = flags & kRestart;
  c.frozen = flags & kFrozen;
  c.running = (flags & kRunning) && !c.frozen;
  c.equality = hp[kLower] < 0;
  return c;
}

// Updates touched constraint k from the sum and count of its samples; returns its violation measure
// for the statistics: max(g, 0) for inequality blocks, |g| for equality blocks.
FL_INLINE float dual_update(float violation_sum, float sample_count, float& multiplier, const DualStateRows& state,
                            int64_t k, const DualCoefficients& c) {
  float g;
  if (c.running) {
    const float running_sum = c.decay * state.running_sums[k] + violation_sum;
    const float running_count = c.decay * state.running_counts[k] + sample_count;
    state.running_sums[k] = running_sum;
    state.running_counts[k] = running_count;
    g = running_sum / running_count;
  } else {
    g = c.mean ? violation_sum / sample_count : violation_sum;
  }
  if (!c.frozen) {
    float direction = g;
    if (c.nupi) {
      float* smoothed_error = state.smoothed_errors + k;
      const float xi = *smoothed_error;
      const float xi_new = c.nu * xi + c.one_minus_nu * g;
      direction = c.ki * g + c.kp * (xi_new - xi);
      *smoothed_error = xi_new;
    }
    float lambda = nan_clamp(multiplier + c.lr * (direction - c.damping * multiplier), c.lower, c.upper);
    if (c.restart && g <= 0.0f) lambda = 0.0f;
    multiplier = lambda;
  }
  if (c.equality) return std::fabs(g);
  return g != g ? g : (g > 0.0f ? g : 0.0f);
}

}  // namespace fused_lagrangian
