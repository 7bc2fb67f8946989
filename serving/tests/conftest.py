"""Set-up of the vLLM tests: offline, vLLM in this process, and the references from i3's own model.

These tests run in the serving environment (serving/requirements.txt), which cannot import i3's modeling code (it
needs a newer transformers than vLLM allows). The references come from make_references.py, run once per session with
the main environment's python, named by I3_REFERENCE_PYTHON (.ci/run passes the first CI environment's)."""

import json
import os
import subprocess
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
# the engine core and the model worker in this process: an engine starts in seconds instead of a minute
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MAKE_REFERENCES = Path(__file__).resolve().parent / "make_references.py"


@pytest.fixture(scope="session")
def references(tmp_path_factory) -> tuple[Path, dict]:
    """(folder of the model folders, references.json) written by i3's own model in the main environment."""
    python = os.environ.get("I3_REFERENCE_PYTHON")
    if not python:
        pytest.fail("Set I3_REFERENCE_PYTHON to the python of an environment with the repo installed "
                    "(pip install -e . -r requirements.txt): it computes the references with i3's own model.")
    folder = Path(os.environ.get("I3_REFERENCE_DIR") or tmp_path_factory.mktemp("references"))
    if not (folder / "references.json").exists():  # I3_REFERENCE_DIR lets a rerun reuse them
        result = subprocess.run([python, str(MAKE_REFERENCES), str(folder), "--trained"], capture_output=True,
                                text=True)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return folder, json.loads((folder / "references.json").read_text())


def make_engine(model: Path, **overrides):
    """A small `vllm.LLM` for a tiny model: float32 (as the references), eager, few KV blocks, chunked prefill in
    chunks of 128 tokens (so longer prompts are split and share steps with other requests)."""
    from vllm import LLM

    settings = dict(model=str(model), trust_remote_code=True, dtype="float32", enforce_eager=True, max_model_len=512,
                    max_num_seqs=16, max_num_batched_tokens=128, kv_cache_memory_bytes=64 << 20, seed=0,
                    distributed_executor_backend="uni")
    return LLM(**{**settings, **overrides})
