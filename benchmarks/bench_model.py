"""Speed and memory of i3 against a same-shape Llama, measured in one run on the same machine.

    python benchmarks/bench_model.py                 # everything, prints markdown tables
    python benchmarks/bench_model.py --only decode   # one part: scan, train, long, compiled or decode

Parts:
  scan    the i3 selective scan, chunked vs a per-step loop, forward + backward, batch 4 x 1,024 tokens
  train   training-step tokens/s (forward, backward, AdamW) of the root config.json vs a transformers
          LlamaForCausalLM of the same width, depth, heads and vocabulary, with its MLP sized to a comparable
          parameter count; batch 4 x 256 and 2 x 2,048, float32 and bf16 autocast; then the same at 4 x 256 for
          the default Austen preset (configs/i3-austen) and its own matching Llama
  long    training-step tokens/s and peak memory at 1 x 8,192 and 1 x 16,384 tokens, float32 and bf16, both models
          with activation checkpointing (the Llama through SDPA); each measurement in a fresh process, so that its
          peak resident memory is its own
  compiled  training at 4 x 256 and greedy decoding at batch 1 with both models compiled: training compiles each
          decoder layer (as train.py --torch_compile does), decoding compiles the forward with a static cache (as
          transformers' docs do for Llama), then the per-token overhead compiled
  decode  greedy decoding tokens/s and cache bytes after prompts of 256, 1,024 and 4,096 tokens, batch 1 and 8;
          then the per-token overhead of a decode step (the same layout at width 64, where arithmetic is negligible)

Timings alternate between the two models and report medians, so background load hits both alike; compare the
ratios, not the absolute numbers.
"""

import argparse
import multiprocessing
import os
import statistics
import time
from pathlib import Path

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, StaticCache

try:
    from i3.configuration_i3 import I3Config
    from i3.modeling_i3 import I3Cache, I3ForCausalLM, i3_scan_chunked, i3_scan_step
except ModuleNotFoundError as error:  # run from a checkout that was never installed
    raise SystemExit(f"error: {error}; install the repo first: pip install -r requirements-dev.txt") from None

REPO_ROOT = Path(__file__).resolve().parent.parent


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def matching_llama(config: I3Config, target_parameters: int) -> LlamaForCausalLM:
    """A Llama with i3's width, depth, heads and vocabulary, its MLP width chosen to match `target_parameters`."""

    def build(intermediate_size):
        return LlamaConfig(
            vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_attention_heads,
            intermediate_size=intermediate_size, max_position_embeddings=8192, tie_word_embeddings=False,
        )

    with torch.device("meta"):
        base = count_parameters(LlamaForCausalLM(build(64)))
    per_unit = 3 * config.hidden_size * config.num_hidden_layers  # gate, up and down projections
    intermediate = 64 + round((target_parameters - base) / per_unit / 64) * 64
    return LlamaForCausalLM(build(intermediate))


def alternate(timers: dict, repeats: int) -> dict:
    """Run each timer `repeats` times, interleaved, and return the median seconds of each."""
    samples = {name: [] for name in timers}
    for _ in range(repeats):
        for name, timer in timers.items():
            samples[name].append(timer())
    return {name: statistics.median(values) for name, values in samples.items()}


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_scan(config: I3Config, repeats: int):
    """The chunked scan against the same recurrence stepped token by token, forward + backward, at the root
    config's sizes."""
    batch, seq_len, heads, state = 4, 1024, config.recurrent_num_heads, config.state_size
    head_dim = config.expand * config.hidden_size // heads
    generator = torch.Generator().manual_seed(0)
    u = torch.randn(batch, seq_len, heads, head_dim, generator=generator).requires_grad_()
    dt = torch.rand(batch, seq_len, heads, generator=generator).mul(0.1).requires_grad_()
    B = torch.randn(batch, seq_len, state, generator=generator).requires_grad_()
    C = torch.randn(batch, seq_len, state, generator=generator).requires_grad_()
    A_log = torch.zeros(heads).requires_grad_()
    D = torch.ones(heads).requires_grad_()

    def chunked():
        y, _ = i3_scan_chunked(u, dt, -A_log.exp() * dt, B, C, D, chunk_size=config.chunk_size)
        y.sum().backward()

    def loop():
        state_now = u.new_zeros(batch, heads, head_dim, state)
        log_a = -A_log.exp() * dt
        ys = []
        for t in range(seq_len):
            step = slice(t, t + 1)
            y, state_now = i3_scan_step(u[:, step], dt[:, step], log_a[:, step], B[:, step], C[:, step], D,
                                        initial_state=state_now)
            ys.append(y)
        torch.cat(ys, 1).sum().backward()

    seconds = alternate({"chunked": lambda: timed(chunked), "loop": lambda: timed(loop)}, repeats)
    print(f"\n### i3 scan, forward + backward, batch {batch} x {seq_len:,} tokens, {heads} heads x {head_dim}, "
          f"state {state}\n")
    print("| evaluation | seconds | speed-up |\n|---|---|---|")
    print(f"| per-step loop | {seconds['loop']:.3f} | 1.0x |")
    print(f"| chunked ({config.chunk_size}) | {seconds['chunked']:.3f} | {seconds['loop'] / seconds['chunked']:.1f}x |")


def compile_layers(model: torch.nn.Module) -> torch.nn.Module:
    """Regional compilation, as train.py --torch_compile does: each decoder layer compiled in place. Both models'
    layers enter through transformers' one `GradientCheckpointingLayer.__call__`, whose compiled variants (three
    layer kinds, two precisions) count against one recompile limit: raise it past dynamo's default of 8."""
    torch._dynamo.config.recompile_limit = 64
    for layer in model.model.layers:
        layer.compile()
    return model


def training_step(model, optimizer, ids, precision: str):
    """Forward, backward and an AdamW step, in float32 or under bf16 autocast."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss = model(ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def bench_train(models: dict, repeats: int, batch: int, seq_len: int, title: str):
    """Training-step throughput: forward, backward and an AdamW step, in float32 and under bf16 autocast."""
    vocab = min(model.config.vocab_size for model in models.values())
    ids = torch.randint(4, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    print(f"\n### Training step, {title}, batch {batch} x {seq_len:,} tokens (tokens/s, higher is better)\n")
    print("| precision | i3 | Llama | i3 / Llama |\n|---|---|---|---|")
    for precision in ("fp32", "bf16"):
        timers = {}
        for name, model in models.items():
            model.train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

            def step(model=model, optimizer=optimizer, precision=precision):
                training_step(model, optimizer, ids, precision)

            step()  # warm-up: allocations, optimizer state, compilation
            timers[name] = lambda step=step: timed(step)
        seconds = alternate(timers, repeats)
        rates = {name: batch * seq_len / s for name, s in seconds.items()}
        print(f"| {precision} | {rates['i3']:.0f} | {rates['Llama']:.0f} | {rates['i3'] / rates['Llama']:.2f}x |")


def build_model(name: str, config: I3Config) -> torch.nn.Module:
    """i3 from `config`, or the Llama matched to its parameter count (counted on the meta device), seed 0."""
    if name == "Llama":
        with torch.device("meta"):
            target = count_parameters(I3ForCausalLM(config))
        torch.manual_seed(0)
        return matching_llama(config, target)
    torch.manual_seed(0)
    return I3ForCausalLM(config)


def resident_kib(field: str) -> int:
    """A field of /proc/self/status in KiB: VmRSS (resident now) or VmHWM (peak since the last reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def long_training_step(name: str, config_dict: dict, seq_len: int, precision: str, threads: int) -> tuple:
    """One training step of 1 x `seq_len` tokens with activation checkpointing, in this (fresh) process: seconds, and
    the peak resident memory the step adds to the weights and the optimizer state (allocated by a short warm-up step).
    glibc returns large blocks to the system on free (see `bench_long`), so the peak is what the step held at once."""
    torch.set_num_threads(threads)
    model = build_model(name, I3Config.from_dict(config_dict)).train()
    model.activation_checkpointing_enable()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(4, config_dict["vocab_size"], (1, seq_len), generator=torch.Generator().manual_seed(0))
    training_step(model, optimizer, ids[:, :256], precision)
    before = resident_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the present resident size
    seconds = timed(lambda: training_step(model, optimizer, ids, precision))
    return seconds, (resident_kib("VmHWM") - before) * 1024


def bench_long(config: I3Config, repeats: int, threads: int):
    """Long-context training rows. Each step runs in a fresh process (the Llama and i3 alternating), with glibc told
    to map every block above 64 KiB on its own, so that freed activations leave the resident set and its peak is the
    step's own."""
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # read by glibc when each spawned process starts
    context = multiprocessing.get_context("spawn")
    print(f"\n### Long-context training step, root config, batch 1, activation checkpointing in both "
          f"(tokens/s, higher is better; peak memory the step adds to weights and optimizer state)\n")
    print("| tokens | precision | i3 tokens/s | Llama tokens/s | i3 / Llama | i3 peak | Llama peak | memory i3 / Llama |")
    print("|---|---|---|---|---|---|---|---|")
    for seq_len in (8192, 16384):
        for precision in ("fp32", "bf16"):
            runs = {"i3": [], "Llama": []}
            for _ in range(repeats):
                for name in runs:
                    with context.Pool(1) as pool:
                        runs[name].append(pool.apply(long_training_step,
                                                     (name, config.to_dict(), seq_len, precision, threads)))
            rate = {name: seq_len / statistics.median(s for s, _ in r) for name, r in runs.items()}
            peak = {name: max(m for _, m in r) for name, r in runs.items()}
            print(f"| {seq_len:,} | {precision} | {rate['i3']:.0f} | {rate['Llama']:.0f} | "
                  f"{rate['i3'] / rate['Llama']:.2f}x | {peak['i3'] / 2**30:.2f} GiB | {peak['Llama'] / 2**30:.2f} GiB "
                  f"| {peak['i3'] / peak['Llama']:.2f}x |", flush=True)


def cache_bytes(cache) -> int:
    """Bytes held by every key, value and recurrent state tensor of the cache (an i3 or a transformers one)."""
    total = 0
    for layer in cache.layers:
        tensors = [getattr(layer, "keys", None), getattr(layer, "values", None)]
        tensors += list(getattr(layer, "states", {}).values())
        total += sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
    return total


def new_cache(model, max_cache_len: int | None = None):
    """The model's own cache: dynamic, or static (fixed buffers updated in place) when `max_cache_len` is given."""
    if isinstance(model, I3ForCausalLM):
        return I3Cache(model.config, max_cache_len=max_cache_len)
    if max_cache_len is None:
        return DynamicCache(config=model.config)
    return StaticCache(config=model.config, max_cache_len=max_cache_len)


@torch.inference_mode()
def decode(model, prompt: torch.Tensor, new_tokens: int, step=None) -> tuple[float, int]:
    """Prefill `prompt`, then greedy-decode `new_tokens` one at a time; returns decode seconds and cache bytes.
    With `step` (a compiled forward), the cache is static and the prefill runs eagerly, the decode steps through it."""
    batch, prompt_len = prompt.shape
    cache = new_cache(model, None if step is None else prompt_len + new_tokens)
    step = step or model
    logits = model(prompt, cache=cache, use_cache=True).logits[:, -1]
    memory = cache_bytes(cache)
    start = time.perf_counter()
    for position in range(prompt_len, prompt_len + new_tokens):
        next_token = logits.argmax(-1, keepdim=True)
        position_ids = torch.full((batch, 1), position)
        logits = step(next_token, position_ids=position_ids, cache=cache, use_cache=True).logits[:, -1]
    return time.perf_counter() - start, memory


def compiled_forward(model):
    """The forward compiled whole, one static graph per shape, as transformers' docs compile Llama for a static
    cache (its mode="reduce-overhead" is CUDA graphs, which a CPU has not)."""
    return torch.compile(model.forward, fullgraph=True, dynamic=False)


def bench_decode(models: dict, repeats: int, batch: int, new_tokens: int = 32, compiled: bool = False):
    steps = {name: compiled_forward(model.eval()) if compiled else None for name, model in models.items()}
    how = "both compiled, static caches" if compiled else "eager"
    print(f"\n### Greedy decoding after a prompt, batch {batch}, {new_tokens} new tokens, float32, {how}\n")
    print("| prompt | i3 tokens/s | Llama tokens/s | speed i3 / Llama | i3 cache | Llama cache | memory i3 / Llama |")
    print("|---|---|---|---|---|---|---|")
    for prompt_len in (256, 1024, 4096):
        prompt = torch.randint(4, 32000, (batch, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
        results = {name: [] for name in models}
        if compiled:  # compile each model's decode step at this shape, untimed
            for name, model in models.items():
                decode(model, prompt, new_tokens, steps[name])
        for _ in range(repeats):
            for name, model in models.items():
                results[name].append(decode(model.eval(), prompt, new_tokens, steps[name]))
        rate = {name: batch * new_tokens / statistics.median(s for s, _ in runs) for name, runs in results.items()}
        memory = {name: runs[0][1] for name, runs in results.items()}
        print(f"| {prompt_len:,} | {rate['i3']:.1f} | {rate['Llama']:.1f} | {rate['i3'] / rate['Llama']:.2f}x "
              f"| {memory['i3'] / 2**20:.1f} MiB | {memory['Llama'] / 2**20:.1f} MiB "
              f"| {memory['i3'] / memory['Llama']:.2f}x |")


def bench_overhead(config: I3Config, repeats: int, new_tokens: int = 64, compiled: bool = False):
    """Per-token cost of a decode step when the arithmetic is negligible: the root layout (same depth and layer types)
    at width 64 and vocabulary 512, batch 1. What is left is framework and Python time per token."""
    small = I3Config.from_dict({**config.to_dict(), "hidden_size": 64, "intermediate_size": 256, "vocab_size": 512,
                                "num_attention_heads": 4, "recurrent_num_heads": 4})
    i3 = I3ForCausalLM(small).eval()
    models = {"i3": i3, "Llama": matching_llama(small, count_parameters(i3)).eval()}
    prompt = torch.randint(4, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    steps = {name: compiled_forward(model) if compiled else None for name, model in models.items()}
    for name, model in models.items():  # warm-up (and compilation)
        decode(model, prompt, new_tokens, steps[name])
    seconds = alternate({name: lambda name=name, model=model: decode(model, prompt, new_tokens, steps[name])[0]
                         for name, model in models.items()}, repeats)
    per_token = {name: 1e3 * s / new_tokens for name, s in seconds.items()}
    how = "both compiled, static caches" if compiled else "eager"
    print(f"\n### Per-token overhead of a decode step: the root layout ({small.num_hidden_layers} layers) at width 64, "
          f"batch 1, {how} (ms per token, lower is better)\n")
    print("| i3 | Llama | i3 / Llama |\n|---|---|---|")
    print(f"| {per_token['i3']:.2f} | {per_token['Llama']:.2f} | {per_token['i3'] / per_token['Llama']:.2f}x |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["scan", "train", "long", "compiled", "decode"], help="run one part only")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions per model (median reported)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice, one per core); on a "
                                                    "shared machine 1 thread is the stable measurement")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    config = I3Config.from_pretrained(REPO_ROOT)
    i3 = I3ForCausalLM(config)
    llama = matching_llama(config, count_parameters(i3))
    models = {"i3": i3, "Llama": llama}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"i3 (root config.json): {count_parameters(i3):,} parameters; Llama (intermediate "
          f"{llama.config.intermediate_size}): {count_parameters(llama):,} parameters")
    if args.only in (None, "scan"):
        bench_scan(config, args.repeats)
    if args.only in (None, "train"):
        bench_train(models, args.repeats, 4, 256, "root config")
        bench_train(models, args.repeats, 2, 2048, "root config")
        austen = I3ForCausalLM(I3Config.from_pretrained(REPO_ROOT / "configs" / "i3-austen"))
        austen_llama = matching_llama(austen.config, count_parameters(austen))
        print(f"\nAusten preset: i3 {count_parameters(austen):,} parameters, Llama {count_parameters(austen_llama):,}")
        bench_train({"i3": austen, "Llama": austen_llama}, args.repeats, 4, 256, "Austen preset")
    if args.only in (None, "long"):
        bench_long(config, 1, torch.get_num_threads())  # one step each: a step is minutes at these lengths
    if args.only in (None, "decode"):
        for batch in (1, 8):
            bench_decode(models, args.repeats, batch)
        bench_overhead(config, args.repeats)
    if args.only in (None, "compiled"):
        bench_decode(models, args.repeats, 1, compiled=True)
        bench_overhead(config, args.repeats, compiled=True)
        bench_train({name: compile_layers(model) for name, model in models.items()}, args.repeats, 4, 256,
                    "root config, every decoder layer compiled in both")


if __name__ == "__main__":
    main()
