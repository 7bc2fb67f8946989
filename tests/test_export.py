"""export.py and run_exported.py: the ONNX step (and the ExecuTorch program) against eager i3, for every recurrent
mixer, learned positions and RoPE, attention-free stacks, a train.py folder and converted published checkpoints.

References are eager i3 (uncached full forwards, `generate`) and a sampling loop written here from run_exported's
documented algorithm. Exports are slow (about a minute each on two cores), so each folder is exported once."""

import json
import lzma
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from i3 import export
from i3.convert_open_i3 import main as convert
from i3.run_exported import ExportedI3

from conftest import FIXTURES, REPO_ROOT, tiny_config, tiny_model, with_live_states

DECODE_STEPS = 32
# runs a script (argv[1], with the arguments after it) as if torch were not installed: importing it fails, and
# transformers' availability check sees no torch
WITHOUT_TORCH = """
import runpy, sys
sys.modules["torch"] = None
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def save_tiny(folder, **overrides):
    """A tiny model folder with the repo's tokenizer beside it (tests feed ids; export.py wants a tokenizer)."""
    model = with_live_states(tiny_model(**overrides))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(REPO_ROOT, trust_remote_code=True).save_pretrained(folder)
    return folder


def train_tiny(folder, workdir):
    """A 4-step train.py run of a tiny i3 (learned positions) on two Austen openings: its output folder."""
    for name in ("emma", "persuasion"):
        text = lzma.open(REPO_ROOT / "data" / "austen" / f"{name}.txt.xz", "rt", encoding="utf-8").read()[:20_000]
        (workdir / f"{name}.txt").write_text(text)
    tiny_config(position_embedding_type="learned").to_json_file(workdir / "tiny.json")
    args = ["--train_file", workdir / "emma.txt", "--validation_file", workdir / "persuasion.txt", "--model_config",
            workdir / "tiny.json", "--vocab_size", "400", "--tokenizer_cache_dir", workdir / "tokenizers",
            "--block_size", "32", "--per_device_train_batch_size", "4", "--max_train_steps", "4",
            "--num_warmup_steps", "1", "--eval_steps", "4", "--checkpointing_steps", "0", "--sample_prompts", "It is",
            "--max_new_tokens", "4", "--output_dir", folder]
    env = {**os.environ, "HF_HOME": str(workdir / "hf"), "MPLCONFIGDIR": str(workdir / "mpl")}
    subprocess.run([sys.executable, REPO_ROOT / "train.py", *map(str, args)], check=True, capture_output=True, env=env)
    return folder


def convert_fixture(folder, style):
    checkpoint = FIXTURES / "open-i3" / f"open_i3_{style}_style"
    convert(["--checkpoint", f"{checkpoint}.pytorch_model.bin", "--config", f"{checkpoint}.config.json",
             "--vocab", str(FIXTURES / "open-i3" / "chunk_vocab_combined.json"), "--output_dir", str(folder)])
    return folder


# name -> how its model folder is made: every mixer, learned positions and RoPE, an attention-free stack
SOURCES = {
    "trained i3, learned positions": lambda root: train_tiny(root / "trained", root),
    "i3, rope": lambda root: save_tiny(root / "i3-rope"),
    "converted open-i3 (80M style)": lambda root: convert_fixture(root / "80m", "80m"),
    "converted rwkv4 (200M style)": lambda root: convert_fixture(root / "200m", "200m"),
    "attention-free open-i3, low rank (i3-tiny shape)": lambda root: save_tiny(
        root / "tiny-shape", recurrent_mixer="open-i3", layer_types=["linear_attention"] * 2, low_rank=4,
        position_embedding_type="learned"),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each source's (model folder, export folder), exported on first use."""
    root = tmp_path_factory.mktemp("export")
    made = {}

    def get(source):
        if source not in made:
            model_dir = SOURCES[source](root)
            export.main([str(model_dir), str(root / f"{model_dir.name}-onnx")])
            made[source] = model_dir, root / f"{model_dir.name}-onnx"
        return made[source]

    return get


def eager_model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True, dtype=torch.float32).eval()


def random_ids(batch, length, vocab, seed=0):
    return torch.randint(4, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def prefill_and_decode(run_step, past: list, ids: np.ndarray, prefill: int = 6) -> np.ndarray:
    """Logits (b, t, vocab) of `ids` fed as one `prefill`-token step, then one token per step, each step continuing
    from the past the previous one returned. `run_step(ids, positions, length so far, past)` -> [logits, *past]."""
    pieces = []
    for start, end in [(0, prefill)] + [(t, t + 1) for t in range(prefill, ids.shape[1])]:
        positions = np.broadcast_to(np.arange(start, end), (len(ids), end - start)).copy()
        logits, *past = run_step(ids[:, start:end], positions, end, past)
        pieces.append(np.asarray(logits))
    return np.concatenate(pieces, axis=1)


def eager_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids), use_cache=False).logits.numpy()


@pytest.mark.parametrize("source", SOURCES)
def test_prefill_then_decode_steps_give_the_eager_logits(exported, source):
    """A 6-token prefill, then 32 single-token steps fed back through the graph's past (fewer where learned
    positions end sooner), give the logits of one uncached eager forward within 1e-4, for a batch of 2."""
    model_dir, onnx_dir = exported(source)
    model, runtime = eager_model(model_dir), ExportedI3(onnx_dir)
    ids = random_ids(2, min(6 + DECODE_STEPS, runtime.config["max_length"] or 10**6), model.config.vocab_size).numpy()

    def run_step(step_ids, positions, length, past):
        return runtime.session.run(None, {"input_ids": step_ids, "position_ids": positions,
                                          "attention_mask": np.ones((len(step_ids), length), np.int64),
                                          **dict(zip(runtime.config["past_names"], past))})

    logits = prefill_and_decode(run_step, list(runtime.empty_past(2).values()), ids)
    np.testing.assert_allclose(logits, eager_logits(model, ids), atol=1e-4, rtol=1e-4)


def test_executorch_program_gives_the_eager_logits(exported, tmp_path):
    """The same step as an ExecuTorch program (XNNPACK, batch 1), run by ExecuTorch's Python runtime: a prefill and 32
    decode steps give the eager logits within 1e-4."""
    from executorch.runtime import Runtime

    model_dir, _ = exported("i3, rope")
    model = export.load_model(model_dir)
    export.export_executorch(model, tmp_path / "model.pte", max_tokens=64)
    method = Runtime.get().load_program(tmp_path / "model.pte").load_method("forward")
    ids = random_ids(1, 6 + DECODE_STEPS, model.config.vocab_size).numpy()

    def run_step(step_ids, positions, length, past):
        inputs = [torch.from_numpy(step_ids), torch.from_numpy(positions), None, *past]  # no attention mask
        logits, *past = (output.clone() for output in method.execute(inputs))  # outputs live in planned memory
        return [logits.numpy(), *past]

    logits = prefill_and_decode(run_step, export.empty_states(model, 1), ids)
    np.testing.assert_allclose(logits, eager_logits(model, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("source", SOURCES)
def test_left_padded_batch_decodes_as_each_prompt_alone(exported, source):
    """Prompts of 3, 7 and 10 tokens, left-padded into one batch on ONNX Runtime, greedily continue exactly as eager
    `generate` continues each prompt alone."""
    model_dir, onnx_dir = exported(source)
    model, runtime = eager_model(model_dir), ExportedI3(onnx_dir)
    new_tokens = min(12, (runtime.config["max_length"] or 10**6) - 10)
    prompts = [random_ids(1, length, model.config.vocab_size, seed=length)[0].tolist() for length in (3, 7, 10)]
    batched = runtime.generate(prompts, new_tokens, eos_token_id=None)
    for prompt, continuation in zip(prompts, batched):
        alone = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                               pad_token_id=runtime.config["pad_token_id"])
        assert continuation == alone[0, len(prompt):].tolist()


def test_greedy_text_of_the_command_equals_generate(exported):
    """`python run_exported.py FOLDER --prompt TEXT` prints, for a train.py folder, the text that eager `generate`
    decodes (greedy, stopping at EOS), in a process where torch cannot be imported."""
    model_dir, onnx_dir = exported("trained i3, learned positions")
    model, tokenizer = eager_model(model_dir), AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
    prompt = "It is a truth universally acknowledged"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=20, do_sample=False)
    expected = tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True)
    result = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, REPO_ROOT / "run_exported.py", onnx_dir,
                             "--prompt", prompt, "--max_new_tokens", "20"], capture_output=True, text=True, check=True)
    assert result.stdout == expected + "\n"


def reference_sampling_loop(model, prompt, steps, seed, temperature, top_k, top_p):
    """run_exported's sampling algorithm, written out here over uncached eager logits: temperature, top-k (ties with
    the k-th stay), top-p over the stably sorted kept tokens, then one uniform draw per token by inverse CDF."""
    rng, ids = np.random.default_rng(seed), list(prompt)
    for _ in range(steps):
        with torch.no_grad():
            logits = model(torch.tensor([ids]), use_cache=False).logits[0, -1].double().numpy()
        scores = logits / temperature
        kth_largest = sorted(scores, reverse=True)[top_k - 1]
        scores[scores < kth_largest] = -np.inf
        order = np.argsort(scores, kind="stable")
        probabilities = np.exp(scores[order] - scores[order][-1])
        mass_below = np.cumsum(probabilities / probabilities.sum())
        for position, token in enumerate(order[:-1]):
            if mass_below[position] <= 1 - top_p:
                scores[token] = -np.inf
        weights = np.exp(scores - scores.max())
        threshold, total = rng.random() * weights.sum(), 0.0
        for token, weight in enumerate(weights):
            total += weight
            if total > threshold:
                break
        ids.append(token)
    return ids[len(prompt):]


@pytest.mark.parametrize("source", ["i3, rope", "converted rwkv4 (200M style)"])
def test_seeded_sampling_is_the_reference_loop(exported, source):
    """Temperature 0.8, top-k 20 and top-p 0.9 with seed 5 draw on ONNX Runtime the tokens that the reference loop
    draws from eager logits with the same seed."""
    model_dir, onnx_dir = exported(source)
    model, runtime = eager_model(model_dir), ExportedI3(onnx_dir)
    prompt = random_ids(1, 5, model.config.vocab_size)[0].tolist()
    sampled = runtime.generate([prompt], 16, temperature=0.8, top_k=20, top_p=0.9, seed=5, eos_token_id=None)
    assert sampled[0] == reference_sampling_loop(model, prompt, 16, 5, 0.8, 20, 0.9)


def test_chat_messages_go_through_the_chat_template(exported, tmp_path):
    """`--messages FILE` continues the chat template's rendering of the messages, as eager `generate` does."""
    model_dir, onnx_dir = exported("trained i3, learned positions")
    model, tokenizer = eager_model(model_dir), AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
    messages = [{"role": "user", "content": "Who is Emma?"}]
    (tmp_path / "chat.json").write_text(json.dumps(messages))
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    generated = model.generate(ids["input_ids"], max_new_tokens=8, do_sample=False)
    expected = tokenizer.decode(generated[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    result = subprocess.run([sys.executable, REPO_ROOT / "run_exported.py", onnx_dir, "--messages",
                             tmp_path / "chat.json", "--max_new_tokens", "8"], capture_output=True, text=True,
                            check=True)
    assert result.stdout == expected + "\n"


def test_what_cannot_run_is_refused_in_one_line(exported, tmp_path):
    """The runtime refuses a generation longer than the learned positions (the graph cannot); export.py refuses a
    folder that is not an i3 model, and an ExecuTorch program of a published mixer, in one line each."""
    model_dir, onnx_dir = exported("converted open-i3 (80M style)")
    runtime = ExportedI3(onnx_dir)
    with pytest.raises(ValueError, match="learned positions"):
        runtime.generate([[5, 6, 7]], runtime.config["max_length"])
    (tmp_path / "not-i3").mkdir()
    (tmp_path / "not-i3" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    for folder, flags, reason in [(tmp_path / "not-i3", [], "model_type 'gpt2'"),
                                  (model_dir, ["--executorch"], "takes the i3 mixer, not 'open-i3'")]:
        result = subprocess.run([sys.executable, REPO_ROOT / "export.py", folder, tmp_path / "out", *flags],
                                capture_output=True, text=True)
        last_line = result.stderr.splitlines()[-1]
        assert result.returncode != 0 and last_line.startswith("export.py: cannot export") and reason in last_line
