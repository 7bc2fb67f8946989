"""Shared test set-up: offline Hub, tiny configs and models, helpers the test files share.

The repo is the package `i3` (`pip install -e .`, in requirements-dev.txt), imported as `i3.modeling_i3` and so on.
Nothing here imports transformers at module level: the Hub client reads HF_HUB_OFFLINE when it is first imported,
which is by the test files, after this runs."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # tests use only the repo's files and what they build
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"


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


FRESH_PROCESS_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
    ids = torch.load(sys.argv[2])
    with torch.no_grad():
        torch.save({"logits": model(ids).logits, "class": type(model).__name__}, sys.argv[3])
    """
)


def load_in_fresh_process(tmp_path, name_or_path, ids):
    """Load with AutoModelForCausalLM in a new Python started in an unrelated directory, with `tmp_path / "hub"` as
    its Hub cache; return its logits."""
    workdir = tmp_path / "elsewhere"
    workdir.mkdir(exist_ok=True)
    torch.save(ids, workdir / "ids.pt")
    (workdir / "load.py").write_text(FRESH_PROCESS_SCRIPT)
    subprocess.run([sys.executable, "load.py", str(name_or_path), "ids.pt", "out.pt"], cwd=workdir,
                   env=fresh_process_env(tmp_path), check=True, capture_output=True, text=True)
    result = torch.load(workdir / "out.pt")
    assert result["class"] == "I3ForCausalLM"
    return result["logits"]


def tiny_config(**overrides):
    """A 2 recurrent + 2 attention i3 small enough for exhaustive checks on a CPU."""
    from i3.configuration_i3 import I3Config

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


def tiny_model(seed: int = 0, **overrides):
    from i3.modeling_i3 import I3ForCausalLM

    torch.manual_seed(seed)
    return I3ForCausalLM(tiny_config(**overrides)).eval()


def with_live_states(model):
    """`model` with its `i3` SSM states carrying weight. At the default init dt is small and u, B, C are near zero,
    so a state is ~1e-7 and a wrong one hides behind the `D u` skip; here the state matters as much as the input."""
    from i3.modeling_i3 import I3RecurrentMixer

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, I3RecurrentMixer):
                module.in_proj.weight.normal_(0, 0.5)
                module.x_proj.weight.normal_(0, 0.5)
                module.dt_bias.zero_()
                module.A_log.zero_()
                module.D.fill_(0.1)
    return model


@pytest.fixture
def model():
    return tiny_model()
