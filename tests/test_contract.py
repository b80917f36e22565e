"""contract.py is the one description of fused_step: the C++ sources (csrc/*.h, *.cpp, *.cuh and the CUDA
emulation), and the Triton kernels' copies of its flag bits, hyperparameter slots and argument names agree."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from fused_lagrangian import contract
from fused_lagrangian.backends import reference
from fused_lagrangian.contract import (DUAL_HPARAMS, PRIMAL_HPARAMS, STATS_COLUMNS, Algorithm, DualFlag, DualSlot,
                                       FusedStepArguments, PrimalFlag, PrimalSlot)

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
TRITON_KERNELS = ROOT / "fused_lagrangian" / "backends" / "triton_kernels.py"


def _snake(cpp_name: str) -> str:
    """kDecoupledWeightDecay -> DECOUPLED_WEIGHT_DECAY."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", cpp_name[1:]).upper()


def _cpp_constants(block: str) -> dict[str, int]:
    return {_snake(name): int(value) for name, value in re.findall(r"\b(k[A-Z]\w*)\s*=\s*(\d+)", block)}


def _cpp_source() -> str:
    return "\n".join(path.read_text() for path in sorted(CSRC.glob("*")) if path.suffix in (".h", ".cpp", ".cuh", ".cu"))


def _cpp_enum(name: str) -> dict[str, int]:
    match = re.search(rf"enum {name}\s*:\s*\w+\s*\{{([^}}]*)\}}", _cpp_source())
    assert match, f"enum {name} not found in csrc/"
    return _cpp_constants(match.group(1))


def _cpp_namespace(name: str) -> dict[str, int]:
    match = re.search(rf"namespace {name}\s*\{{(.*?)\}}", _cpp_source(), re.S)
    assert match, f"namespace {name} not found in csrc/"
    return _cpp_constants(match.group(1))


def _members(enum_class) -> dict[str, int]:
    return {member.name: int(member.value) for member in enum_class}


@pytest.mark.parametrize("cpp_enum, python_enum", [("Algorithm", Algorithm), ("PrimalFlag", PrimalFlag),
                                                   ("DualFlag", DualFlag)])
def test_cpp_flag_values_agree(cpp_enum, python_enum):
    assert _cpp_enum(cpp_enum) == _members(python_enum)


@pytest.mark.parametrize("namespace, slots", [("primal_slot", PrimalSlot), ("dual_slot", DualSlot)])
def test_cpp_hyperparameter_slots_agree(namespace, slots):
    assert _cpp_namespace(namespace) == _members(slots)


def test_cpp_padding_id_agrees():
    assert re.search(r"constexpr int64_t kPaddingId = (-?\d+);", (CSRC / "step_math.h").read_text()).group(1) == \
        str(contract.PADDING_ID)


def test_cpp_sizes_agree():
    sizes = {name: int(value) for name, value in
             re.findall(r"constexpr int (k\w+) = (\d+);", (CSRC / "step_math.h").read_text())}
    assert sizes["kPrimalHparams"] == PRIMAL_HPARAMS == len(PrimalSlot)
    assert sizes["kDualHparams"] == DUAL_HPARAMS == len(DualSlot)
    assert sizes["kStatsColumns"] == STATS_COLUMNS


def test_operator_schema_spells_the_argument_layout():
    header = re.sub(r'"\s*\\?\n\s*"', "", (CSRC / "fused_step.h").read_text())
    schema = re.search(r'#define FUSED_STEP_SCHEMA_ARGUMENTS\s*\\?\s*"\((.*?)\) -> Tensor"', header, re.S)
    assert schema, "no FUSED_STEP_SCHEMA_ARGUMENTS in csrc/fused_step.h"
    names = [argument.split("=")[0].split()[-1] for argument in schema.group(1).split(",")]
    assert names == list(FusedStepArguments._fields)
    assert "Tensor primal_hparams" in schema.group(1) and "Tensor dual_hparams" in schema.group(1)


@pytest.mark.parametrize("source", [CSRC / "fused_step.cpp", ROOT / "tests" / "backends" / "cuda_emulation.cpp"])
def test_operator_declarations_use_the_schema(source):
    declarations = re.findall(r'm\.def\("(\w+)"\s*(\w*)', source.read_text())
    assert declarations, f"no operator declared in {source}"
    for name, schema in declarations:
        if name.startswith("fused_step"):
            assert schema == "FUSED_STEP_SCHEMA_ARGUMENTS", f"{source.name}: {name} has a schema of its own"


def test_python_backends_take_the_argument_layout():
    from fused_lagrangian.backends import native, triton_backend

    for function in (reference.fused_step, native.fused_step, triton_backend.fused_step):
        assert list(inspect.signature(function).parameters) == list(FusedStepArguments._fields), function


def _triton_constants() -> dict[str, int]:
    text = TRITON_KERNELS.read_text()
    return {name: int(value) for name, value in
            re.findall(r"^(\w+): tl\.constexpr = tl\.constexpr\((\d+)\)", text, re.M)}


def test_triton_copies_agree():
    constants = _triton_constants()
    for flags in (PrimalFlag, DualFlag):
        for name, value in _members(flags).items():
            assert constants[name] == value, name
    assert constants["ADAM"] == Algorithm.ADAM
    for prefix, slots in (("P_", PrimalSlot), ("D_", DualSlot)):
        for name, value in _members(slots).items():
            assert constants[prefix + name] == value, prefix + name


def test_hparams_tensor_keeps_tensor_entries_as_data():
    import torch

    lr = torch.tensor(0.5)
    table = contract.hparams_tensor([lr, 0.9, 0.999, 1e-8, 0.0] * 2)
    assert table.dtype == torch.float64 and table.tolist() == [0.5, 0.9, 0.999, 1e-8, 0.0] * 2
    lr.fill_(0.25)  # a scheduler
    assert contract.hparams_tensor([lr, 0.9])[PrimalSlot.LR] == 0.25


def test_is_dense_means_contiguous_in_some_order_of_the_dimensions():
    import torch

    x = torch.zeros(2, 3, 4, 5)
    assert contract.is_dense(x) and contract.is_dense(x.transpose(1, 3))
    assert contract.is_dense(x.to(memory_format=torch.channels_last))
    assert contract.is_dense(torch.zeros(6).as_strided((2, 1, 3), (1, 7, 2)))  # a size-1 dimension's stride is unused
    assert not contract.is_dense(x[:, :, ::2])  # gaps
    assert not contract.is_dense(torch.zeros(4, 1).expand(4, 3))  # overlap
