"""fused_lagrangian: constrained deep learning with drop-in torch optimizers.

    opt = LagrangianAdam(model.parameters(), lr=1e-3)
    fair = opt.add_constraint("parity", kind="grouped", num_constraints=K, bound=0.05, dual_lr=1e-2)
    loss = task_loss + fair(rates, ids=group_ids)
    loss.backward(); opt.step(); opt.zero_grad()
"""

from .constraints import ConstraintBlock, ConstraintInputError, ConstraintSpec
from .functional import fused_step
from .optim import LagrangianAdam, LagrangianAdamW, LagrangianOptimizer, LagrangianSGD
from .schedules import DualLearningRates
from .selection import BestIterate, ParameterAverage

__version__ = "0.1.0"

__all__ = [
    "BestIterate",
    "DualLearningRates",
    "ParameterAverage",
    "ConstraintBlock",
    "ConstraintInputError",
    "ConstraintSpec",
    "LagrangianAdam",
    "LagrangianAdamW",
    "LagrangianOptimizer",
    "LagrangianSGD",
    "fused_step",
    "__version__",
]
