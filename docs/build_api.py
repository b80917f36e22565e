"""Writes docs/api.md, the API reference, from the public modules' docstrings and signatures.

    python docs/build_api.py            # rewrite docs/api.md
    python docs/build_api.py --check    # exit 1 if docs/api.md differs from a fresh generation

The reference lists, per module, what a user imports: the names in ``__all__`` where the module has one,
else its public functions and classes defined there, in source order; for classes, the public methods and
properties they define themselves (not those inherited from torch.optim.Optimizer).  The test suite runs
``--check`` (tests/test_docs.py), so a docstring change without a regenerated api.md fails CI.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import sys
import textwrap

DOCS = os.path.dirname(os.path.abspath(__file__))
OUTPUT = os.path.join(DOCS, "api.md")
# Module -> the names to document (None: its __all__, else its public functions and classes).  The
# distributed, backends, constraints and conformance modules also hold machinery used internally: only what
# a user calls is listed.  schedules and selection: their classes are exported by (and documented under)
# fused_lagrangian; their module docstrings hold the usage examples.
MODULES = {
    "fused_lagrangian": None,
    "fused_lagrangian.constraints": ("DUAL_DEFAULTS",),
    "fused_lagrangian.schedules": (),
    "fused_lagrangian.selection": ("Iterate",),
    "fused_lagrangian.checkpoint": None,
    "fused_lagrangian.fairness": None,
    "fused_lagrangian.distributed": ("get_optimizer_state_dict", "set_optimizer_state_dict"),
    "fused_lagrangian.backends": ("resolve", "names", "unavailable_reason", "build_status",
                                  "BackendFallbackWarning"),
    "fused_lagrangian.testing.conformance": ("compare_with_reference", "check_found_inf_and_grad_scale",
                                             "check_several_blocks", "case_problem", "flags_covered",
                                             "assert_same_results", "assert_within_ulps"),
}
HEADER = ("# API reference\n\n"
          "Generated from the docstrings by `python docs/build_api.py`; do not edit by hand. The user guide "
          "([guide.md](guide.md)) explains the concepts, [recipes.md](recipes.md) shows them at work.\n")


def _public_members(module, names) -> list[tuple[str, object]]:
    if names is not None:
        return [(name, getattr(module, name)) for name in names]
    if hasattr(module, "__all__"):
        names = [name for name in module.__all__ if not name.startswith("__")]
        return [(name, getattr(module, name)) for name in names]
    members = [(name, value) for name, value in vars(module).items()
               if not name.startswith("_") and (inspect.isfunction(value) or inspect.isclass(value))
               and value.__module__ == module.__name__]
    return sorted(members, key=lambda item: inspect.getsourcelines(item[1])[1])


def _signature(value) -> str:
    try:
        signature = str(inspect.signature(value))
    except (TypeError, ValueError):
        return "(...)"
    return re.sub(r" at 0x[0-9a-f]+", "", signature)  # default values' reprs: no addresses, stable output


def _doc(value) -> str:
    # The object's own docstring: inspect.getdoc would show torch.optim.Optimizer's for state_dict().
    own = value.__doc__ if isinstance(value, (type, property)) or callable(value) else None
    if inspect.isclass(value) and "__doc__" not in vars(value):
        own = None
    return _fenced(inspect.cleandoc(own)) if own else ""


def _fenced(text: str) -> str:
    # Docstrings are plain text with indented examples and formulas, not Markdown: shown verbatim.
    return f"```text\n{text}\n```"


def _class_members(cls) -> list[tuple[str, object]]:
    members = []
    for name, value in vars(cls).items():
        if name.startswith("_") and name != "__call__":
            continue
        if inspect.isfunction(value) or isinstance(value, property):
            members.append((name, value))
    return members


def _describe(qualified: str, value) -> list[str]:
    if inspect.isclass(value):
        bases = ", ".join(base.__qualname__ for base in value.__bases__ if base is not object)
        lines = [f"### class `{qualified}`" + (f" ({bases})" if bases else ""), "",
                 f"```python\n{value.__name__}{_signature(value)}\n```", "", _doc(value), ""]
        for name, member in _class_members(value):
            if isinstance(member, property):
                lines += [f"#### property `{value.__name__}.{name}`", "", _doc(member), ""]
            else:
                lines += [f"#### `{value.__name__}.{name}{_signature(member)}`", "", _doc(member), ""]
        return lines
    if callable(value):
        return [f"### `{qualified}{_signature(value)}`", "", _doc(value), ""]
    return [f"### `{qualified}`", "", f"`{value!r}`", ""]


def generate() -> str:
    import importlib

    lines = [HEADER]
    for module_name, names in MODULES.items():
        module = importlib.import_module(module_name)
        lines += [f"## `{module_name}`", "", _fenced(textwrap.dedent(module.__doc__ or "").strip()), ""]
        for name, value in _public_members(module, names):
            lines += _describe(f"{module_name}.{name}", value)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).rstrip() + "\n"  # undocumented members: no gap


def main() -> int:
    parser = argparse.ArgumentParser(description="Write docs/api.md from the docstrings.")
    parser.add_argument("--check", action="store_true", help="compare with docs/api.md instead of writing it")
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(DOCS))  # this checkout's package, whatever is installed
    text = generate()
    if args.check:
        with open(OUTPUT, encoding="utf-8") as committed:
            if committed.read() != text:
                print("docs/api.md is out of date: run `python docs/build_api.py`", file=sys.stderr)
                return 1
        return 0
    with open(OUTPUT, "w", encoding="utf-8") as output:
        output.write(text)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
