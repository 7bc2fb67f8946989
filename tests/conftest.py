"""Shared test set-up: offline Hub, the repo importable as the package `i3`, tiny configs and models."""

import os
import sys
import types
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"

# The model files use relative imports (transformers copies them into a package), so tests import them the same way.
if "i3" not in sys.modules:
    package = types.ModuleType("i3")
    package.__path__ = [str(REPO_ROOT)]
    sys.modules["i3"] = package

from i3.configuration_i3 import I3Config  # noqa: E402
from i3.modeling_i3 import I3ForCausalLM  # noqa: E402


def hub_cache_snapshot(hub_cache: Path, repo_id: str, revision: str = "0" * 40) -> Path:
    """The folder a Hub download of `repo_id` occupies under `hub_cache` (refs/main points at it), so that the repo
    loads by id offline; the caller fills it."""
    repo_dir = hub_cache / f"models--{repo_id.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(revision)
    return repo_dir / "snapshots" / revision


def fresh_process_env(tmp_path: Path) -> dict:
    """Environment for a new Python that sees nothing of this one: offline, its own HF home, Hub and modules caches
    under `tmp_path`, and no PYTHONPATH into the repo."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "home"),
            "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}


def tiny_config(**overrides) -> I3Config:
    """A 2 recurrent + 2 attention i3 small enough for exhaustive checks on a CPU."""
    fields = dict(
        vocab_size=99,
        hidden_size=32,
        intermediate_size=64,
        layer_types=["linear_attention", "linear_attention", "full_attention", "full_attention"],
        num_attention_heads=4,
        recurrent_num_heads=4,
        state_size=8,
        chunk_size=4,
        max_position_embeddings=512,
    )
    fields.update(overrides)
    return I3Config(**fields)


def tiny_model(seed: int = 0, **overrides) -> I3ForCausalLM:
    torch.manual_seed(seed)
    return I3ForCausalLM(tiny_config(**overrides)).eval()


@pytest.fixture
def model():
    return tiny_model()
