"""Decoding speed and memory of i3 on ONNX Runtime, against eager i3 (`generate`) and a same-size Llama exported the
same way, measured in one run on the same machine, the same prompts and the same thread count.

    python benchmarks/bench_export.py                                  # root config.json and configs/i3-austen
    python benchmarks/bench_export.py --configs configs/i3-austen --lengths 256 1024 --batches 1 --new_tokens 16

For each config (randomly initialised: speed does not depend on the weights):
  decode    greedy tokens/s at batch 1 and 8 after 256, 1,024 and 4,096 tokens of past. The past is random tensors of
            the right shapes (keys and values of that length, recurrent states), so no long prefill is timed; eager
            i3 decodes with `generate` from an `I3Cache` holding the same tensors;
  prefill   time to first token of a 1,024-token prompt at batch 1 (the prefill and one argmax);
  memory    bytes of recurrent states + keys and values after each length (what a server keeps per batch);
  profile   ONNX Runtime's profiler over i3 decode steps after the longest past: time per operator type.
Timings alternate between the engines and report medians, so background load hits all alike; compare ratios.
"""

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import DynamicCache

from bench_model import REPO_ROOT, alternate, count_parameters, matching_llama

from i3 import export
from i3.configuration_i3 import I3Config
from i3.modeling_i3 import I3Cache, I3ForCausalLM
from i3.run_exported import EMPTY_STATES_FILE, EXPORT_CONFIG_FILE, ONNX_FILE, ExportedI3


class LlamaStep(nn.Module):
    """The Llama counterpart of `export.I3Step`: its keys and values as inputs and outputs, the same names."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.names = [(layer, name) for layer in range(model.config.num_hidden_layers) for name in ("key", "value")]

    def forward(self, input_ids, position_ids, attention_mask, *past):
        cache = export.fill_cache(DynamicCache(config=self.model.config), self.names, past)
        logits = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache).logits
        return (logits, *export.cache_contents(cache, self.names))


def export_llama(model, folder: Path) -> Path:
    """The Llama step exported by export.py's own `save_onnx`, with what `ExportedI3` reads beside it."""
    step = LlamaStep(model).eval()
    config = model.config
    shape = (1, config.num_attention_heads, 0, config.hidden_size // config.num_attention_heads)
    empty = {f"past.{layer}.{name}": np.zeros(shape, np.float32) for layer, name in step.names}
    np.savez(folder / EMPTY_STATES_FILE, **empty)
    (folder / EXPORT_CONFIG_FILE).write_text(json.dumps({"past_names": list(empty), "pad_token_id": 0,
                                                         "eos_token_id": None, "max_length": None}))
    batch, length = 2, 5
    inputs = (torch.randint(0, config.vocab_size, (batch, length)), torch.arange(length)[None].expand(batch, -1),
              torch.ones(batch, length, dtype=torch.long), *(torch.from_numpy(e).expand(batch, -1, -1, -1).clone()
                                                             for e in empty.values()))
    export.save_onnx(step, inputs, step.names, folder / ONNX_FILE)
    return folder


def random_past(runtime: ExportedI3, batch: int, length: int) -> dict[str, np.ndarray]:
    """Random states of the shapes a `length`-token past has: keys and values of that length, recurrent states."""
    rng, past = np.random.default_rng(length), {}
    for name, empty in runtime.empty_past(batch).items():
        shape = (*empty.shape[:2], length, *empty.shape[3:]) if name.endswith((".key", ".value")) else empty.shape
        past[name] = rng.standard_normal(shape, dtype=np.float32) * 0.1
    return past


def past_bytes(past: dict[str, np.ndarray]) -> int:
    return sum(state.nbytes for state in past.values())


def ort_decode_timer(runtime: ExportedI3, batch: int, length: int, new_tokens: int):
    """Seconds per token of greedy decoding on ONNX Runtime after a random `length`-token past."""
    past = random_past(runtime, batch, length)
    logits = np.zeros((batch, 1), np.float32)  # the first token's logits: their argmax, token 0, starts decoding
    mask, positions = np.ones((batch, length), np.int64), np.full((batch, 1), length - 1, np.int64)

    def timer():
        start = time.perf_counter()
        runtime.decode(logits, past, mask, positions, new_tokens, eos_token_id=None)
        return (time.perf_counter() - start) / new_tokens

    return timer


def eager_decode_timer(model: I3ForCausalLM, runtime: ExportedI3, batch: int, length: int, new_tokens: int):
    """Seconds per token of eager `generate` (greedy) from an `I3Cache` holding the same random past."""
    names = [(int(name.split(".")[1]), name.split(".")[2]) for name in runtime.config["past_names"]]
    past = [torch.from_numpy(state) for state in random_past(runtime, batch, length).values()]
    ids = torch.randint(4, model.config.vocab_size, (batch, length + 1))

    @torch.inference_mode()
    def timer():
        cache = export.fill_cache(I3Cache(model.config), names, past)
        cache.seen_tokens = length
        start = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), cache=cache, max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
        return (time.perf_counter() - start) / new_tokens

    return timer


def bench_decode(model, runtimes: dict, lengths, batches, new_tokens: int, repeats: int):
    print(f"\n#### Greedy decoding after a past of L tokens, {new_tokens} new tokens, float32\n")
    print("| batch | L | eager i3 tok/s | i3 ORT tok/s | Llama ORT tok/s | i3 ORT / eager | i3 ORT / Llama ORT "
          "| i3 state+KV | Llama KV | memory i3 / Llama |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for batch in batches:
        for length in lengths:
            timers = {"eager": eager_decode_timer(model, runtimes["i3"], batch, length, new_tokens),
                      "i3": ort_decode_timer(runtimes["i3"], batch, length, new_tokens),
                      "Llama": ort_decode_timer(runtimes["Llama"], batch, length, new_tokens)}
            rate = {name: batch / seconds for name, seconds in alternate(timers, repeats).items()}
            memory = {name: past_bytes(random_past(runtimes[name], batch, length + new_tokens))
                      for name in ("i3", "Llama")}
            print(f"| {batch} | {length:,} | {rate['eager']:.1f} | {rate['i3']:.1f} | {rate['Llama']:.1f} "
                  f"| {rate['i3'] / rate['eager']:.2f}x | {rate['i3'] / rate['Llama']:.2f}x "
                  f"| {memory['i3'] / 2**20:.2f} MiB | {memory['Llama'] / 2**20:.2f} MiB "
                  f"| {memory['i3'] / memory['Llama']:.2f}x |", flush=True)


def bench_first_token(model, runtimes: dict, prompt_length: int, repeats: int):
    """Time to first token: the prefill of one prompt and its argmax."""
    prompt = torch.randint(4, model.config.vocab_size, (1, prompt_length), generator=torch.Generator().manual_seed(1))

    def ort_timer(runtime):
        return lambda: timed(lambda: runtime.generate([prompt[0].tolist()], 1, eos_token_id=None))

    @torch.inference_mode()
    def eager_timer():
        return timed(lambda: model.generate(prompt, max_new_tokens=1, do_sample=False, eos_token_id=None,
                                            pad_token_id=0))

    seconds = alternate({"eager": eager_timer, "i3": ort_timer(runtimes["i3"]),
                         "Llama": ort_timer(runtimes["Llama"])}, repeats)
    print(f"\n#### Time to first token, {prompt_length:,}-token prompt, batch 1\n")
    print("| eager i3 | i3 ORT | Llama ORT |\n|---|---|---|")
    print(f"| {seconds['eager']:.2f} s | {seconds['i3']:.2f} s | {seconds['Llama']:.2f} s |", flush=True)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def profile_decode(folder: Path, threads: int, length: int, new_tokens: int):
    """ONNX Runtime's profiler over i3 decode steps after a `length`-token past: the share of each operator type."""
    runtime = ExportedI3(folder, threads, profile_prefix=str(folder / "profile"))
    ort_decode_timer(runtime, 1, length, new_tokens)()
    events = json.loads(Path(runtime.session.end_profiling()).read_text())
    per_op = Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_op[event["args"]["op_name"]] += event["dur"]
    total = sum(per_op.values())
    print(f"\n#### ONNX Runtime profile, i3 decode at batch 1 after {length:,} tokens ({new_tokens} steps)\n")
    print("| operator | share of kernel time |\n|---|---|")
    for op, microseconds in per_op.most_common(10):
        print(f"| {op} | {microseconds / total:.0%} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["configs/i3-austen", "."], help="i3 config folders")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--prompt_length", type=int, default=1024, help="time to first token (0: skip)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, onnxruntime {__import__('onnxruntime').__version__}, {args.threads} threads")
    for config_dir in args.configs:
        torch.manual_seed(0)
        model = I3ForCausalLM(I3Config.from_pretrained(REPO_ROOT / config_dir)).eval()
        llama = matching_llama(model.config, count_parameters(model)).eval()
        print(f"\n### {config_dir}: i3 {count_parameters(model):,} parameters, Llama {count_parameters(llama):,} "
              f"(intermediate {llama.config.intermediate_size})")
        with tempfile.TemporaryDirectory() as root:
            root = Path(root)
            (root / "Llama-onnx").mkdir()
            model.save_pretrained(root / "i3")
            export.write_runtime_files(export.load_model(root / "i3"), root / "i3-onnx")
            export_llama(llama, root / "Llama-onnx")
            runtimes = {"i3": ExportedI3(root / "i3-onnx", args.threads),
                        "Llama": ExportedI3(root / "Llama-onnx", args.threads)}
            bench_decode(model, runtimes, args.lengths, args.batches, args.new_tokens, args.repeats)
            if args.prompt_length:
                bench_first_token(model, runtimes, args.prompt_length, args.repeats)
            profile_decode(root / "i3-onnx", args.threads, max(args.lengths), args.new_tokens)


if __name__ == "__main__":
    sys.exit(main())
