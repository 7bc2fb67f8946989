"""Serving throughput of i3 in vLLM against the same-size Llama in vLLM and against i3's own batched `generate`.

    python benchmarks/bench_serving.py --serving-python .venv-serving/bin/python            # the full grid
    python benchmarks/bench_serving.py --serving-python ... --concurrency 16 --prompt-lengths 256   # a part

Run it with the repo's main environment (it builds the models with i3's code and runs i3's `generate`); the vLLM runs
go to the serving environment's python (serving/requirements.txt). Models: the Austen preset (configs/i3-austen) at
random init, and a transformers Llama of the same width, depth, heads and vocabulary with its MLP sized to the same
parameter count (bench_model.matching_llama), both saved with `save_pretrained`. Every measurement runs in a fresh
process on 2 CPU threads, float32, with N requests of P random prompt tokens and 128 new tokens each (EOS ignored;
--new-tokens changes it):

  vllm      `vllm.LLM.generate` of all N prompts submitted together (continuous batching, chunked prefill; eager, no
            torch.compile, for both models: the i3 plugin has no compiled path)
  generate  i3's `generate` on the N prompts as one batch (greedy; the batch has no padding: equal lengths)

Output tokens/s = N * new tokens / wall time from submission to the last token; time to first token is the mean over
requests (vLLM's request metrics; for `generate`, the time of a one-token `generate` on the whole batch, when every
request gets its first token); peak memory is the process's peak resident set.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
THREADS = 2


def prompts(count: int, length: int, vocab_size: int) -> list[list[int]]:
    import torch

    generator = torch.Generator().manual_seed(length)
    return torch.randint(4, vocab_size, (count, length), generator=generator).tolist()


def peak_memory_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- one measurement, in its own process ---


def kv_cache_bytes(model: str, tokens: int) -> int:
    """The KV pool the N requests need (float32 keys and values of every attention layer), plus room for recurrent
    states and block rounding, so that each model's peak memory shows what its cache costs."""
    config = json.loads((Path(model) / "config.json").read_text())
    attention_layers = config.get("layer_types", ["full_attention"] * config["num_hidden_layers"]).count(
        "full_attention")
    return int(1.25 * tokens * attention_layers * 2 * config["hidden_size"] * 4) + (128 << 20)


def measure_vllm(model: str, count: int, length: int, new_tokens: int) -> dict:
    """N prompts submitted together to `vllm.LLM` (engine and worker in this process, so its peak memory counts;
    prefix caching off: the prompts share nothing)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    # both models use RoPE, so max_position_embeddings (1,024 in the Austen preset) is no limit to their length
    os.environ["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, trust_remote_code=True, dtype="float32", enforce_eager=True,
              max_model_len=length + new_tokens, max_num_seqs=count, enable_prefix_caching=False,
              kv_cache_memory_bytes=kv_cache_bytes(model, count * (length + new_tokens)),
              distributed_executor_backend="uni", disable_log_stats=False, seed=0)
    vocab_size = llm.llm_engine.model_config.get_vocab_size()
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    llm.generate([{"prompt_token_ids": [5] * 8}], params, use_tqdm=False)  # warm-up
    requests = [{"prompt_token_ids": ids} for ids in prompts(count, length, vocab_size)]
    start = time.perf_counter()
    outputs = llm.generate(requests, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    assert all(len(output.outputs[0].token_ids) == new_tokens for output in outputs)
    first_token = [output.metrics.first_token_latency for output in outputs]
    return {"tokens_per_second": count * new_tokens / seconds, "seconds": seconds,
            "ttft_seconds": sum(first_token) / len(first_token), "peak_mib": peak_memory_mib()}


def measure_generate(model: str, count: int, length: int, new_tokens: int) -> dict:
    """i3's own `generate` on the N prompts as one batch."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(THREADS)
    llm = AutoModelForCausalLM.from_pretrained(model, trust_remote_code=True, dtype=torch.float32).eval()
    ids = torch.tensor(prompts(count, length, llm.config.vocab_size))
    settings = dict(do_sample=False, eos_token_id=None, pad_token_id=1)
    with torch.no_grad():
        llm.generate(ids[:1, :8], max_new_tokens=2, **settings)  # warm-up
        start = time.perf_counter()
        llm.generate(ids, max_new_tokens=1, **settings)
        first_token = time.perf_counter() - start
        start = time.perf_counter()
        out = llm.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **settings)
        seconds = time.perf_counter() - start
    assert out.shape[1] == length + new_tokens
    return {"tokens_per_second": count * new_tokens / seconds, "seconds": seconds, "ttft_seconds": first_token,
            "peak_mib": peak_memory_mib()}


# --- the grid, from the main environment ---


def build_models(folder: Path) -> dict[str, Path]:
    """The Austen preset at random init and its parameter-matched Llama, saved; returns {name: folder}."""
    import torch
    from bench_model import count_parameters, matching_llama

    from i3.configuration_i3 import I3Config
    from i3.modeling_i3 import I3ForCausalLM
    from i3.tokenization_i3 import I3Tokenizer

    torch.manual_seed(0)
    config = I3Config.from_pretrained(REPO_ROOT / "configs" / "i3-austen")
    i3 = I3ForCausalLM(config)
    llama = matching_llama(config, count_parameters(i3))
    tokenizer = I3Tokenizer.from_pretrained(REPO_ROOT)
    folders = {"i3": folder / "i3-austen", "llama": folder / "llama-austen"}
    for name, model in (("i3", i3), ("llama", llama)):
        model.save_pretrained(folders[name])
        tokenizer.save_pretrained(folders[name])
    print(f"i3 (configs/i3-austen) {count_parameters(i3):,} parameters; Llama {count_parameters(llama):,} "
          f"(intermediate_size {llama.config.intermediate_size})", flush=True)
    return folders


def run_measurement(python: str, system: str, model: Path, count: int, length: int, new_tokens: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "HF_HUB_OFFLINE": "1"}
    command = [python, str(Path(__file__).resolve()), "--measure", system, "--model", str(model),
               "--concurrency", str(count), "--prompt-lengths", str(length), "--new-tokens", str(new_tokens)]
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{system} {model.name} N={count} P={length} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serving-python", help="python of the serving environment (with vllm and vllm_i3)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 64], help="requests submitted together")
    parser.add_argument("--prompt-lengths", type=int, nargs="+", default=[256, 1024], help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated per request")
    parser.add_argument("--work-dir", type=Path, default=Path("out/bench_serving"), help="where models are saved")
    parser.add_argument("--measure", choices=["vllm", "generate"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.measure:  # a child process: one measurement, printed as the last line
        measure = measure_vllm if args.measure == "vllm" else measure_generate
        print(json.dumps(measure(args.model, args.concurrency[0], args.prompt_lengths[0], args.new_tokens)))
        return
    if not args.serving_python:
        parser.error("--serving-python is required: the python of the environment built from serving/requirements.txt")
    folders = build_models(args.work_dir)
    print("| requests | prompt | system | output tokens/s | time to first token | peak memory |\n|---|---|---|---|---|---|")
    for length in args.prompt_lengths:
        for count in args.concurrency:
            grid = (count, length, args.new_tokens)
            runs = {"i3 in vLLM": run_measurement(args.serving_python, "vllm", folders["i3"], *grid),
                    "Llama in vLLM": run_measurement(args.serving_python, "vllm", folders["llama"], *grid),
                    "i3 generate": run_measurement(sys.executable, "generate", folders["i3"], *grid)}
            for system, run in runs.items():
                print(f"| {count} | {length:,} | {system} | {run['tokens_per_second']:.1f} | "
                      f"{run['ttft_seconds']:.2f} s | {run['peak_mib']:,.0f} MiB |", flush=True)
            vllm_i3, vllm_llama, own = (run["tokens_per_second"] for run in runs.values())
            print(f"| | | i3 vLLM / Llama vLLM {vllm_i3 / vllm_llama:.2f}x, i3 vLLM / i3 generate "
                  f"{vllm_i3 / own:.2f}x | | | |", flush=True)


if __name__ == "__main__":
    main()
