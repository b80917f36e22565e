"""Seeded random drop-in cases: an optimizer, its options and param groups, parameters of random dtypes
and layouts (a parameter listed twice now and then), gradients of other layouts, constraint blocks fed
ids of any layout, and GradScaler-style steps (``grad_scale`` / ``found_inf`` set as GradScaler sets them).

``run_case(seed, backend)`` plays one case on the backend, the reference and torch.optim, from the same
initial values, and compares after every step: the backend with the reference (parameters, state,
multipliers, dual state), and both with torch.optim (parameters and state; blocks feed the
dual update only, through ``observe``, so the primal trajectory is torch.optim's).  float64 and complex
tensors must agree bitwise, fp32 within 1e-6, bf16 within one rounding.
"""

from __future__ import annotations

import dataclasses
import random
import warnings
from typing import Optional

import torch
from torch import Tensor

from fused_lagrangian import LagrangianAdam, LagrangianAdamW, LagrangianSGD

OPTIMIZERS = {"SGD": (LagrangianSGD, torch.optim.SGD), "Adam": (LagrangianAdam, torch.optim.Adam),
              "AdamW": (LagrangianAdamW, torch.optim.AdamW)}
SHAPES = [(3,), (2, 3), (1, 4), (4, 1), (2, 3, 2, 2), (2, 1, 3), (1, 1)]
STEPS = 3


@dataclasses.dataclass
class Case:
    seed: int
    kind: str
    groups: list[dict]  # per group: options, and "tensors": indices into params (repeats allowed)
    params: list[Tensor]  # initial values
    layouts: list[str]
    grads: list[list[tuple[Tensor, str]]]  # per step, per parameter: values and layout
    blocks: list[dict]  # add_constraint kwargs
    observations: list[list[Optional[tuple[Tensor, Optional[Tensor], str]]]]  # per step, per block
    scaling: list[Optional[tuple[float, bool]]]  # per step: (grad scale, found_inf) or None
    relayout: Optional[tuple[int, str]]  # before step 1: (parameter, layout) its data moves to, state left as is

    def describe(self) -> str:
        return (f"seed {self.seed}: {self.kind} groups={[{k: v for k, v in g.items()} for g in self.groups]} "
                f"params={[(tuple(p.shape), str(p.dtype), layout) for p, layout in zip(self.params, self.layouts)]} "
                f"blocks={self.blocks} scaling={self.scaling} relayout={self.relayout}")


def draw(seed: int) -> Case:
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    kind = rng.choice(list(OPTIMIZERS))
    num_params = rng.randint(1, 3)
    params, layouts = [], []
    for _ in range(num_params):
        shape = rng.choice(SHAPES)
        dtype = rng.choices([torch.float32, torch.float64, torch.bfloat16, torch.complex64], [0.55, 0.25, 0.1, 0.1])[0]
        params.append(torch.randn(shape, generator=generator, dtype=dtype))
        layouts.append(rng.choice(_layouts_for(shape)))
    indices = list(range(num_params))
    split = rng.randint(1, num_params) if rng.random() < 0.3 else num_params
    groups = [dict(_options(rng, kind), tensors=indices[:split])]
    if split < num_params:
        groups.append(dict(_options(rng, kind), tensors=indices[split:]))
    if rng.random() < 0.1:  # a parameter listed twice in its group (torch.optim warns and updates it twice)
        group = rng.choice(groups)
        group["tensors"] = group["tensors"] + [rng.choice(group["tensors"])]
    grads = [[(torch.randn(p.shape, generator=generator, dtype=p.dtype), rng.choice(_layouts_for(p.shape)))
              for p in params] for _ in range(STEPS)]
    blocks = [_block(rng, index) for index in range(rng.choice([0, 0, 1, 1, 2]))]
    observations = [[_observation(rng, generator, block) for block in blocks] for _ in range(STEPS)]
    scaled = rng.random() < 0.3
    scaling = [(2.0 ** rng.randint(0, 10), rng.random() < 0.3) if scaled else None for _ in range(STEPS)]
    relayout = None
    if rng.random() < 0.15:  # as model.to(memory_format=...) does once state exists
        index = rng.randrange(num_params)
        relayout = (index, rng.choice(_layouts_for(params[index].shape)))
    return Case(seed, kind, groups, params, layouts, grads, blocks, observations, scaling, relayout)


def _layouts_for(shape: tuple) -> list[str]:
    layouts = ["contiguous", "gapped"]
    if len(shape) >= 2:
        layouts.append("transposed")
    if 1 in shape:
        layouts.append("size1_strides")
    if len(shape) == 4:
        layouts.append("channels_last")
    return layouts


def with_layout(values: Tensor, layout: str) -> Tensor:
    """A tensor equal to ``values`` with the named memory layout (sharing no memory with ``values``)."""
    if layout == "contiguous":
        return values.clone()
    if layout == "channels_last":
        return values.clone().contiguous(memory_format=torch.channels_last)
    if layout == "transposed":
        return values.transpose(-1, -2).clone(memory_format=torch.contiguous_format).transpose(-1, -2)
    if layout == "gapped":  # every other element of the last dimension of a bigger tensor
        big = torch.zeros(*values.shape[:-1], 2 * values.shape[-1], dtype=values.dtype)
        big[..., ::2] = values
        return big[..., ::2]
    if layout == "size1_strides":
        dense = values.clone()
        strides = [7 if size == 1 else stride for size, stride in zip(dense.shape, dense.stride())]
        return dense.as_strided(dense.shape, strides)
    raise AssertionError(layout)


def _options(rng: random.Random, kind: str) -> dict:
    maximize = rng.random() < 0.2
    lr_as_tensor = rng.random() < 0.1  # a tensor lr, as schedulers that fill_ it use
    options = _sgd_or_adam_options(rng, kind, maximize)
    if lr_as_tensor:
        options["lr"] = torch.tensor(options["lr"])
    return options


def _sgd_or_adam_options(rng: random.Random, kind: str, maximize: bool) -> dict:
    if kind == "SGD":
        momentum = rng.choice([0.0, 0.9, 0.5])
        dampening = rng.choice([0.0, 0.3]) if momentum else 0.0
        return dict(lr=rng.choice([0.1, 0.01]), momentum=momentum, dampening=dampening,
                    nesterov=bool(momentum and not dampening and rng.random() < 0.4),
                    weight_decay=rng.choice([0.0, 1e-2]), maximize=maximize)
    options = dict(lr=rng.choice([1e-2, 1e-3]), betas=rng.choice([(0.9, 0.999), (0.8, 0.99)]),
                   eps=rng.choice([1e-8, 1e-6]), weight_decay=rng.choice([0.0, 1e-2]),
                   amsgrad=rng.random() < 0.3, maximize=maximize)
    if kind == "Adam":
        options["decoupled_weight_decay"] = rng.random() < 0.3
    return options


def _block(rng: random.Random, index: int) -> dict:
    kind = rng.choice(["dense", "indexed", "grouped"])
    sense = rng.choice(["<=", ">=", "=="])
    options = dict(name=f"b{index}", kind=kind, num_constraints=rng.randint(1, 6), sense=sense,
                   dual_lr=rng.choice([0.1, 0.5]), dual_rule=rng.choice(["ascent", "nupi"]),
                   ordering="dual_first" if rng.random() < 0.15 else "simultaneous")
    if options["dual_rule"] == "nupi":
        options.update(kp=rng.choice([0.0, 1.0]), nu=rng.choice([0.0, 0.5]))
    if rng.random() < 0.3:
        options["max_multiplier"] = 0.3
    if rng.random() < 0.2:
        options["damping"] = 0.5
    if sense != "==" and rng.random() < 0.2:
        options["restart_on_feasible"] = True
    if kind == "grouped" and rng.random() < 0.3:
        options["to_overall"] = True
    return options


def _observation(rng: random.Random, generator: torch.Generator, block: dict):
    if rng.random() < 0.2:
        return None  # not observed this step
    k = block["num_constraints"]
    if block["kind"] == "dense":
        return torch.randn(k, generator=generator), None, "dense"
    batch = rng.randint(1, 6)
    table = torch.randint(0, k, (batch, 2), generator=generator)
    return torch.randn(batch, generator=generator), table, rng.choice(["contiguous", "strided", "expanded", "int32"])


def _ids(table: Tensor, layout: str) -> Tensor:
    if layout == "contiguous":
        return table[:, 1].contiguous()
    if layout == "strided":
        return table[:, 1]
    if layout == "expanded":
        return table[:1, 1].expand(table.shape[0])
    return table.int()[:, 1]


# --------------------------------------------------------------------------------------------------
# Playing a case


def _build(case: Case, backend: Optional[str]):
    """(params, optimizer, blocks): ours on ``backend``, or torch.optim when backend is None."""
    params = [with_layout(p, layout).requires_grad_() for p, layout in zip(case.params, case.layouts)]
    groups = [dict({k: v for k, v in group.items() if k != "tensors"}, params=[params[i] for i in group["tensors"]])
              for group in case.groups]
    ours_cls, torch_cls = OPTIMIZERS[case.kind]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*duplicate parameters.*")
        if backend is None:
            return params, torch_cls(groups), []
        optimizer = ours_cls(groups, backend=backend)
    blocks = [optimizer.add_constraint(**options) for options in case.blocks]
    return params, optimizer, blocks


def _play_step(case: Case, step: int, params, optimizer, blocks, is_torch: bool) -> None:
    scaling = case.scaling[step]
    if step == 1 and case.relayout is not None:
        index, layout = case.relayout
        with torch.no_grad():
            params[index].data = with_layout(params[index].detach(), layout)
    for p, (values, layout) in zip(params, case.grads[step]):
        if scaling is not None and not is_torch:
            values = values * scaling[0]
        p.grad = with_layout(values, layout)
    for block, observation in zip(blocks, case.observations[step]):
        if observation is not None:
            values, table, layout = observation
            block.observe(values, ids=None if table is None else _ids(table, layout))
    if is_torch:
        if scaling is None or not scaling[1]:
            optimizer.step()  # (GradScaler would have unscaled the gradients: scales are powers of two)
        return
    if scaling is not None:
        optimizer.grad_scale = torch.full((1,), scaling[0])
        optimizer.found_inf = torch.full((), float(scaling[1]))
    optimizer.step()
    if scaling is not None:
        del optimizer.grad_scale, optimizer.found_inf


def run_case(seed: int, backend: str) -> None:
    """Case ``seed`` on ``backend``, on the reference (unless that is the backend) and on torch.optim."""
    case = draw(seed)
    runs = {name: _build(case, name) for name in dict.fromkeys(["reference", backend])}
    torch_params, torch_optimizer, _ = _build(case, None)
    for step in range(STEPS):
        for params, optimizer, blocks in runs.values():
            _play_step(case, step, params, optimizer, blocks, is_torch=False)
        _play_step(case, step, torch_params, torch_optimizer, [], is_torch=True)
        reference = runs["reference"]
        for name, run in runs.items():
            where = f"{case.describe()}\nstep {step}, backend {name}"
            if name != "reference":
                _compare_runs(run, reference, where + " vs reference")
            _compare_params(run[0], torch_params, run[1], torch_optimizer, where + " vs torch.optim",
                            exact=not any(isinstance(group["lr"], Tensor) for group in case.groups))


def _tolerance(dtype: torch.dtype, exact: bool = True) -> tuple[float, float]:
    """(atol, rtol): bitwise where the exact path runs, 1e-6 for fp32 math, one rounding for bf16."""
    if dtype in (torch.float64, torch.complex64, torch.complex128):
        # Not exact against torch.optim with a tensor lr: torch computes lr * weight_decay and lr / bias
        # correction in the lr tensor's dtype (float32), the package reads lr as a Python float.
        return (0.0, 0.0) if exact else (1e-8, 1e-6)
    if dtype == torch.bfloat16:
        return 1e-6, torch.finfo(torch.bfloat16).eps
    return 1e-6, 0.0


def _assert_close(actual: Tensor, expected: Tensor, where: str, exact: bool = True) -> None:
    atol, rtol = _tolerance(expected.dtype, exact)
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, where
    if atol == 0 and rtol == 0:
        assert torch.equal(actual, expected), f"{where}: not bitwise equal, max diff {(actual - expected).abs().max()}"
    else:
        torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{where}: {m}")


def _compare_runs(run, reference, where: str) -> None:
    params, optimizer, blocks = run
    reference_params, reference_optimizer, reference_blocks = reference
    for i, (p, q) in enumerate(zip(params, reference_params)):
        _assert_close(p.detach(), q.detach(), f"{where}: param {i}")
        for key, value in reference_optimizer.state[q].items():
            _assert_close(optimizer.state[p][key], value, f"{where}: param {i} state {key}")
    for block, reference_block in zip(blocks, reference_blocks):
        _assert_close(block.multipliers, reference_block.multipliers, f"{where}: block {block.name} multipliers")
        _assert_close(block.dual_state, reference_block.dual_state, f"{where}: block {block.name} dual state")


def _compare_params(params, torch_params, optimizer, torch_optimizer, where: str, exact: bool) -> None:
    for i, (p, q) in enumerate(zip(params, torch_params)):
        if p.dtype == torch.bfloat16:
            continue  # torch.optim computes bf16 in bf16, the package in fp32 (as torch's fused kernels)
        _assert_close(p.detach(), q.detach(), f"{where}: param {i}", exact)
        for key, value in torch_optimizer.state[q].items():
            if isinstance(value, Tensor):
                _assert_close(optimizer.state[p][key], value, f"{where}: param {i} state {key}", exact)
