"""Associative recall: can the model look up a value it saw once, many tokens back? Multi-query associative recall
(MQAR; Zoology, Arora et al. 2023, arXiv:2312.04927) at equal parameters and equal CPU time.

    python benchmarks/bench_recall.py                 # i3, attention-free i3 and Llama over the pairs x lengths grid
    python benchmarks/bench_recall.py --placements    # where the attention layers go: 0, 1, 2 on top, interleaved
    python benchmarks/bench_recall.py --report        # print the tables of the results already measured

A sequence is `pairs` key-value pairs (distinct keys out of 191; values out of 64, drawn with repetition so that
each value's embedding trains often enough within a CPU budget), then every key once more in a random order at random
even offsets of a filler region, each followed by its value; only those answer positions are scored (loss and
accuracy), so the model must recall each value from the context. Every step draws fresh sequences from the run's
seed; accuracy is measured on a fixed held-out set of 16,384 tokens.

The models are small (width 64, 4 layers, vocabulary 256): i3 with the Austen preset's design and its layout shrunk
to 2 recurrent layers under 2 attention layers, the attention-free i3 (4 recurrent layers), and a transformers Llama
of the same width, depth, heads and parameter count. Each trains with train.py's optimizer recipe (AdamW, weight decay
on matrices, clipping) and bench_quality's CPU-time schedule for --budget CPU seconds. Held-out accuracy is checked
every tenth of the budget; its CPU time counts against the budget (every model pays it alike) but not in the
reported compute to reach 99%, which is the training CPU seconds at the first check at or above 99%.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from bench_model import count_parameters, matching_llama
from bench_quality import cpu_time_schedule, recipe
from resumable import pending, read_results, run_and_record

try:
    from i3.configuration_i3 import I3Config
    from i3.modeling_i3 import I3ForCausalLM
    from i3.train import decayed_parameter_names, parameter_groups
except ModuleNotFoundError as error:  # run from a checkout that was never installed
    raise SystemExit(f"error: {error}; install the repo first: pip install -r requirements-dev.txt") from None

REPO_ROOT = Path(__file__).resolve().parent.parent

VOCAB_SIZE = 256
FILLER = 0
FIRST_KEY, FIRST_VALUE = 1, 192  # keys 1-191 (enough for 128 distinct pairs), values 192-255
HELD_OUT_TOKENS = 16_384
CHECKS = 10  # held-out accuracy checks per run
TARGET_ACCURACY = 0.99

RECURRENT, ATTENTION = "linear_attention", "full_attention"
LAYOUTS = {"R": RECURRENT, "A": ATTENTION}
COMPARISON = {"i3": {"layout": "RRAA"}, "i3, attention-free": {"layout": "RRRR"}, "Llama": {"llama": True}}
PLACEMENTS = {  # i3 layouts of 4 layers: how many attention layers, and where
    "i3, attention-free (RRRR)": {"layout": "RRRR"},
    "1 attention on top (RRRA)": {"layout": "RRRA"},
    "2 attention on top (RRAA)": {"layout": "RRAA"},
    "interleaved (RARA)": {"layout": "RARA"},
    "1 attention at the bottom (ARRR)": {"layout": "ARRR"},
    "Llama": {"llama": True},
}
GRID = {256: [8, 16, 32, 64], 1024: [8, 32, 64, 128]}  # sequence length -> key-value pairs (4 x pairs <= length)


def recall_batch(size: int, seq_len: int, pairs: int, generator: torch.Generator) -> dict:
    """`size` MQAR sequences: `input_ids` (size, seq_len), and `labels` equal to the input at the answer positions
    (the value after each queried key) and -100 elsewhere, in the transformers convention (the model shifts them)."""
    slots = (seq_len - 2 * pairs) // 2  # (key, value) places in the query region
    if slots < pairs:
        raise ValueError(f"{pairs} pairs need a sequence of at least {4 * pairs} tokens, not {seq_len}")
    keys = torch.rand(size, FIRST_VALUE - FIRST_KEY, generator=generator).argsort(1)[:, :pairs] + FIRST_KEY
    values = torch.randint(FIRST_VALUE, VOCAB_SIZE, (size, pairs), generator=generator)
    input_ids = torch.full((size, seq_len), FILLER)
    input_ids[:, 0 : 2 * pairs : 2], input_ids[:, 1 : 2 * pairs : 2] = keys, values
    query_order = torch.rand(size, pairs, generator=generator).argsort(1)
    query_slots = torch.rand(size, slots, generator=generator).argsort(1)[:, :pairs]
    key_positions = 2 * pairs + 2 * query_slots
    input_ids.scatter_(1, key_positions, keys.gather(1, query_order))
    input_ids.scatter_(1, key_positions + 1, values.gather(1, query_order))
    labels = torch.full_like(input_ids, -100).scatter_(1, key_positions + 1, values.gather(1, query_order))
    return {"input_ids": input_ids, "labels": labels}


def recall_config(layout: str, width: int, seq_len: int) -> I3Config:
    """The Austen preset's i3 design at `width`, with one layer per letter of `layout` (R recurrent, A attention)."""
    config = I3Config.from_pretrained(REPO_ROOT / "configs" / "i3-austen")
    config.update({"vocab_size": VOCAB_SIZE, "hidden_size": width, "intermediate_size": 4 * width,
                   "layer_types": [LAYOUTS[letter] for letter in layout], "num_hidden_layers": len(layout),
                   "max_position_embeddings": max(seq_len, config.max_position_embeddings)})
    config.validate_architecture()
    return config


def build_recall_model(spec: dict, width: int, seq_len: int) -> torch.nn.Module:
    """The i3 a spec's layout describes, or the Llama matched to the default layout (RRAA)."""
    layout = COMPARISON["i3"]["layout"] if spec.get("llama") else spec["layout"]
    i3 = I3ForCausalLM(recall_config(layout, width, seq_len))
    return matching_llama(i3.config, count_parameters(i3)) if spec.get("llama") else i3


@torch.no_grad()
def recall_accuracy(model, batch: dict, rows_at_once: int = 16) -> float:
    """Share of answer positions whose most likely token is the right value."""
    model.eval()
    right = total = 0
    for start in range(0, len(batch["input_ids"]), rows_at_once):
        rows = slice(start, start + rows_at_once)
        predicted = model(input_ids=batch["input_ids"][rows]).logits[:, :-1].argmax(-1)
        answers = batch["labels"][rows, 1:]
        scored = answers != -100
        right += (predicted[scored] == answers[scored]).sum().item()
        total += scored.sum().item()
    model.train()
    return right / total


def recall_step(model, batch: dict, optimizer, scheduler) -> float:
    """train.py's step with the loss on the answer positions only (its `training_step` scores every token)."""
    loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), recipe().max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    return loss.item()


def train_recall(job: dict, threads: int) -> dict:
    """Train one model on fresh MQAR sequences for `budget` CPU seconds, checking held-out accuracy as it goes."""
    torch.set_num_threads(threads)
    torch.manual_seed(job["seed"])
    model = build_recall_model(job["spec"], job["width"], job["seq_len"])
    model.train()
    optimizer = torch.optim.AdamW(parameter_groups(model, decayed_parameter_names(model), recipe().weight_decay),
                                  lr=job["learning_rate"])
    sequences = torch.Generator().manual_seed(job["seed"])
    held_out = recall_batch(HELD_OUT_TOKENS // job["seq_len"], job["seq_len"], job["pairs"],
                            torch.Generator().manual_seed(2**31 - 1 - job["seed"]))
    batch_size = max(1, job["tokens_per_step"] // job["seq_len"])
    steps, checking_seconds, curve = 0, 0.0, []
    start = time.process_time()
    scheduler = cpu_time_schedule(optimizer, job["budget"], start)
    while (spent := time.process_time() - start) < job["budget"]:
        loss = recall_step(model, recall_batch(batch_size, job["seq_len"], job["pairs"], sequences), optimizer,
                           scheduler)
        steps += 1
        if spent >= job["budget"] * (len(curve) + 1) / CHECKS or time.process_time() - start >= job["budget"]:
            check_start = time.process_time()
            accuracy = recall_accuracy(model, held_out)
            curve.append({"training_cpu_seconds": check_start - start - checking_seconds, "steps": steps,
                          "accuracy": accuracy, "loss": loss})
            checking_seconds += time.process_time() - check_start
    reached = next((point["training_cpu_seconds"] for point in curve if point["accuracy"] >= TARGET_ACCURACY), None)
    return {**{key: job[key] for key in ("model", "seq_len", "pairs", "seed", "budget", "width")},
            "parameters": count_parameters(model), "steps": steps, "accuracy": curve[-1]["accuracy"],
            "best_accuracy": max(point["accuracy"] for point in curve), "cpu_seconds_to_99": reached, "curve": curve}


# --- reports ---


def cell(runs: list[dict]) -> str:
    """Mean final accuracy over seeds, and the mean training CPU seconds to 99% where every seed got there."""
    accuracy = statistics.mean(run["accuracy"] for run in runs)
    reached = [run["cpu_seconds_to_99"] for run in runs]
    to_target = f" ({statistics.mean(reached):.0f} s)" if None not in reached else ""
    return f"{accuracy:.3f}{to_target}"


def report(results: list[dict], models: list[str], grid: dict[int, list[int]], title: str):
    for seq_len, all_pairs in grid.items():
        runs = {(model, pairs): [r for r in results if r["model"] == model and r["seq_len"] == seq_len
                                 and r["pairs"] == pairs] for model in models for pairs in all_pairs}
        if not any(runs.values()):
            continue
        seeds = max(len(model_runs) for model_runs in runs.values())
        budget = next(r["budget"] for model_runs in runs.values() for r in model_runs)
        print(f"\n### {title}: sequence length {seq_len:,}, {budget:.0f} CPU seconds, {seeds} seed(s); held-out "
              f"accuracy on the answers (training CPU seconds to reach 99%, where every seed reached it)\n")
        print("| model | parameters | " + " | ".join(f"{pairs} pairs" for pairs in all_pairs) + " |")
        print("|---" * (2 + len(all_pairs)) + "|")
        for model in models:
            model_runs = [r for pairs in all_pairs for r in runs[model, pairs]]
            if model_runs:
                print(f"| {model} | {model_runs[0]['parameters'] / 1e6:.2f}M | "
                      + " | ".join(cell(runs[model, pairs]) if runs[model, pairs] else "-" for pairs in all_pairs)
                      + " |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--placements", action="store_true", help="compare attention placements instead")
    parser.add_argument("--budget", type=float, default=120.0, help="CPU seconds per run")
    parser.add_argument("--seq_lens", type=int, nargs="+", help=f"sequence lengths (default: {list(GRID)})")
    parser.add_argument("--pairs", type=int, nargs="+", help="key-value pairs (default: per length, as in GRID)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--models", nargs="+", help="only these models / layouts (default: all)")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=1e-2, help="peak of the schedule (train.py: 2e-3, "
                        "too slow for recall within minutes)")
    parser.add_argument("--tokens_per_step", type=int, default=2048)
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--results", help="JSON lines, one per finished run (default: out/bench_recall.jsonl, "
                                           "placements out/bench_recall_placements.jsonl)")
    parser.add_argument("--report", action="store_true", help="only print the tables of the results file")
    args = parser.parse_args()
    models_grid = PLACEMENTS if args.placements else COMPARISON
    models = args.models or list(models_grid)
    if unknown := sorted(set(models) - set(models_grid)):
        parser.error(f"--models {unknown}: choose from {list(models_grid)}")
    grid = {seq_len: args.pairs or GRID.get(seq_len, [8]) for seq_len in args.seq_lens or GRID}
    grid = {seq_len: [pairs for pairs in all_pairs if 4 * pairs <= seq_len] for seq_len, all_pairs in grid.items()}

    path = Path(args.results or f"out/bench_recall{'_placements' if args.placements else ''}.jsonl")
    results = read_results(path)
    keys = ("model", "seq_len", "pairs", "seed", "budget", "width")
    jobs = pending([{"model": model, "spec": models_grid[model], "seq_len": seq_len, "pairs": pairs, "seed": seed,
                     "budget": args.budget, "width": args.width, "learning_rate": args.learning_rate,
                     "tokens_per_step": args.tokens_per_step}
                    for seed in args.seeds for seq_len, all_pairs in grid.items() for pairs in all_pairs
                    for model in models], results, keys)
    if jobs and not args.report:
        print(f"torch {torch.__version__}: {len(jobs)} run(s), {args.jobs} at a time with {args.threads} thread(s) "
              "each", file=sys.stderr)
        results += run_and_record(
            jobs, train_recall, (args.threads,), path, args.jobs,
            lambda r: f"{r['model']}, length {r['seq_len']}, {r['pairs']} pairs, seed {r['seed']}: {r['steps']} "
                      f"steps, accuracy {r['accuracy']:.3f}, 99% at {r['cpu_seconds_to_99']} CPU s")
    chosen = [r for r in results if r["budget"] == args.budget and r["width"] == args.width]
    report(chosen, models, grid, "Placements" if args.placements else "Associative recall")


if __name__ == "__main__":
    main()
