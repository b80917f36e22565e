"""The user guide stays true: its API reference is current and its recipes run.

Recipes are the code blocks of docs/recipes.md that start with ``# recipe: <name>``; each test runs the
block as written, on its small in-memory data, and checks what the guide says about it (for Lightning
and the Hugging Face Trainer: that resuming from a checkpoint restores the multipliers).
"""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
RECIPES = ROOT / "docs" / "recipes.md"


def recipe(name: str) -> dict:
    """Runs the recipe block ``name`` and returns its namespace."""
    blocks = re.findall(r"```python\n(# recipe: ([\w-]+)\n.*?)```", RECIPES.read_text(encoding="utf-8"), re.S)
    sources = [source for source, block_name in blocks if block_name == name]
    assert len(sources) == 1, f"docs/recipes.md has {len(sources)} blocks named {name!r}"
    namespace: dict = {"__name__": f"recipe_{name.replace('-', '_')}"}
    exec(compile(sources[0], f"docs/recipes.md:{name}", "exec"), namespace)  # noqa: S102 - our own docs
    return namespace


def test_api_reference_matches_the_docstrings():
    result = subprocess.run([sys.executable, str(ROOT / "docs" / "build_api.py"), "--check"], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr


def test_readme_links_the_guide():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for page in ("docs/guide.md", "docs/recipes.md", "docs/api.md"):
        assert page in readme and (ROOT / page).exists()


def test_fairness_recipe_meets_the_parity_bound(capsys):
    namespace = recipe("fairness")
    metrics = namespace["metrics"]
    assert metrics["max_violation"] <= 0.02 and metrics["accuracy"] > 0.6, metrics
    assert "parity gap" in capsys.readouterr().out


def test_lightning_recipe_resumes_with_the_multipliers(tmp_path):
    pytest.importorskip("lightning")
    namespace = recipe("lightning")
    model, trainer = namespace["train"](max_steps=20, checkpoint_dir=str(tmp_path / "first"))
    checkpoint, = (tmp_path / "first").rglob("*.ckpt")
    saved = torch.load(checkpoint, weights_only=False)["optimizer_states"][0]["constraints"]
    assert any(block["multipliers"].abs().sum() > 0 for block in saved.values()), "nothing to restore"

    resumed, _ = namespace["train"](max_steps=20, checkpoint_dir=str(tmp_path / "second"), resume_from=str(checkpoint))
    for block, trained in zip(resumed.parity.blocks, model.parity.blocks):
        torch.testing.assert_close(block.multipliers, saved[block.name]["multipliers"], rtol=0, atol=0)
        torch.testing.assert_close(block.multipliers, trained.multipliers, rtol=0, atol=0)


def test_hugging_face_trainer_recipe_resumes_with_the_multipliers(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    namespace = recipe("hf-trainer")
    parity, _ = namespace["train"](max_steps=16, output_dir=str(tmp_path / "first"))
    checkpoint = tmp_path / "first" / "checkpoint-16"
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)["constraints"]
    assert any(block["multipliers"].abs().sum() > 0 for block in saved.values()), "nothing to restore"

    resumed, _ = namespace["train"](max_steps=16, output_dir=str(tmp_path / "second"), resume_from=str(checkpoint))
    for block, trained in zip(resumed.blocks, parity.blocks):
        torch.testing.assert_close(block.multipliers, saved[block.name]["multipliers"], rtol=0, atol=0)
        torch.testing.assert_close(block.multipliers, trained.multipliers, rtol=0, atol=0)
