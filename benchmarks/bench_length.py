"""Length generalisation: trained on blocks of 1,024 tokens, how well does each model predict tokens with 1,024 to
4,096 tokens of context before them?

    python benchmarks/bench_length.py             # i3 (Austen preset), attention-free i3, matched Llama
    python benchmarks/bench_length.py --report    # print the tables of the results already measured

Each model is trained exactly as in bench_quality (its `run`: same data, recipe and CPU-time schedule) at block
1,024, then scored on windows of 4,096 tokens over the held-out texts (Persuasion, the chatterbot dialogues). A token's
position is the number of tokens before it in its window; bits per byte are given per position bucket (0-256,
256-1,024, 1,024-2,048, 2,048-4,096): the NLL of the bucket's tokens / ln 2 / the UTF-8 bytes those tokens stand for.
Beyond 1,024 the attention layers meet RoPE angles never seen in training; the recurrent layers only meet a longer
run of their own recurrence. Results go to --results as JSON lines (finished runs are skipped on a restart).
"""

import argparse
import statistics
import sys
from pathlib import Path

import torch
from bench_quality import COMPARISON, first_bytes, out_of_domain_texts, prepare_data, recipe, run
from resumable import pending, read_results, run_and_record

try:
    from i3.tokenization_i3 import BYTE_TOKENS
    from i3.train import data_sources, encode_documents, evaluation_windows, load_corpus, source_flags
except ModuleNotFoundError as error:  # run from a checkout that was never installed
    raise SystemExit(f"error: {error}; install the repo first: pip install -r requirements-dev.txt") from None

TRAINING_BLOCK = 1024
WINDOW = 4096
BUCKETS = [(0, 256), (256, 1024), (1024, 2048), (2048, 4096)]
TEXTS = ["Persuasion", "dialogues"]


def bucket_name(text: str, bucket: tuple[int, int]) -> str:
    return f"{text} {bucket[0]}-{bucket[1]}"


def token_bytes(tokenizer) -> torch.Tensor:
    """UTF-8 bytes each token id stands for: a chunk its characters', a byte token one, a special token none."""
    sizes = torch.zeros(len(tokenizer), dtype=torch.long)
    special, byte_tokens = set(tokenizer.all_special_tokens), set(BYTE_TOKENS)
    for token, index in tokenizer.get_vocab().items():
        sizes[index] = 0 if token in special else 1 if token in byte_tokens else len(token.encode("utf-8"))
    return sizes


def bucket_windows(windows: list[dict], bucket: tuple[int, int]) -> list[dict]:
    """The windows with only the labels at positions inside `bucket` kept (the model predicts label t from the t
    tokens before it; label 0, a window's overlap with the one before, is never scored)."""
    low, high = max(bucket[0], 1), bucket[1]
    return [{"input_ids": window["input_ids"],
             "labels": [-100 if not low <= t < high else label for t, label in enumerate(window["labels"])]}
            for window in windows]


def scored_bytes(windows: list[dict], sizes: torch.Tensor) -> int:
    labels = torch.tensor([window["labels"] for window in windows])
    return int(sizes[labels.clamp(min=0)][labels != -100].sum())


def held_out_buckets(tokenizer, documents: dict[str, list[str]], eval_bytes: int) -> dict:
    """For each text and bucket, what bench_quality's `run` scores: its `WINDOW`-token windows (filed under the
    training block, the size `run` looks up) with only the bucket's labels, and the bytes of the bucket's tokens."""
    sizes = token_bytes(tokenizer)
    held_out = {}
    for text, text_documents in documents.items():
        encoded = encode_documents(tokenizer, first_bytes(text_documents, eval_bytes))
        windows = evaluation_windows(encoded, WINDOW, tokenizer.eos_token_id)
        for bucket in BUCKETS:
            in_bucket = bucket_windows(windows, bucket)
            held_out[bucket_name(text, bucket)] = {"bytes": scored_bytes(in_bucket, sizes),
                                                   "windows": {TRAINING_BLOCK: in_bucket}}
    return held_out


def held_out_documents() -> dict[str, list[str]]:
    """Persuasion (the held-out novel of train.py's default data) and the chatterbot dialogues."""
    _, held_out = load_corpus(data_sources(source_flags(recipe()), None), streaming=False, render_chat=None, seed=0,
                              max_eval_documents=None)
    return {"Persuasion": [row["text"] for documents in held_out for row in documents],
            "dialogues": out_of_domain_texts()["dialogues"]}


# --- report ---


def report(results: list[dict], budget: float):
    runs = {model: [r for r in results if r["model"] == model and r["budget"] == budget] for model in COMPARISON}
    if not runs.get("Llama"):
        return
    for text in TEXTS:
        names = [bucket_name(text, bucket) for bucket in BUCKETS]
        means = {model: [statistics.mean(r["bits_per_byte"][name] for r in model_runs) for name in names]
                 for model, model_runs in runs.items() if model_runs}
        print(f"\n### {text}: bits per byte by position in a {WINDOW:,}-token window, trained at block "
              f"{TRAINING_BLOCK:,} for {budget:.0f} CPU seconds, {len(runs['Llama'])} seed(s) (lower is better)\n")
        headers = [f"{low:,}-{high:,}" for low, high in BUCKETS]
        print("| model | " + " | ".join(headers) + f" | {headers[-1]} / {headers[1]} |")
        print("|---" * (2 + len(BUCKETS)) + "|")
        for model, scores in means.items():
            print(f"| {model} | " + " | ".join(f"{score:.3f}" for score in scores)
                  + f" | {scores[-1] / scores[1]:.3f} |")
        for model, scores in means.items():
            if model != "Llama":
                print(f"| {model} / Llama | " + " | ".join(f"{score / llama:.3f}" for score, llama
                                                          in zip(scores, means["Llama"])) + " | |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=240.0, help="CPU seconds of training per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--models", nargs="+", help=f"only these models (default: all of {list(COMPARISON)})")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--eval_bytes", type=int, default=100_000, help="UTF-8 bytes scored of each held-out text")
    parser.add_argument("--results", default="out/bench_length.jsonl", help="JSON lines, one per finished run")
    parser.add_argument("--report", action="store_true", help="only print the tables of the results file")
    args = parser.parse_args()
    models = args.models or list(COMPARISON)
    if unknown := sorted(set(models) - set(COMPARISON)):
        parser.error(f"--models {unknown}: choose from {list(COMPARISON)}")

    path = Path(args.results)
    results = read_results(path)
    jobs = pending([{"model": model, "spec": COMPARISON[model], "block": TRAINING_BLOCK, "seed": seed,
                     "budget": args.budget} for seed in args.seeds for model in models],
                   results, ("model", "block", "seed", "budget"))
    if jobs and not args.report:
        print(f"torch {torch.__version__}: {len(jobs)} run(s), {args.jobs} at a time with {args.threads} thread(s) "
              "each; preparing data", file=sys.stderr)
        tokenizer, training, _ = prepare_data([TRAINING_BLOCK], args.eval_bytes)
        held_out = held_out_buckets(tokenizer, held_out_documents(), args.eval_bytes)
        results += run_and_record(jobs, run, (tokenizer, training[TRAINING_BLOCK], held_out, args.threads), path,
                                  args.jobs, lambda r: f"{r['model']}, seed {r['seed']}: {r['steps']} steps, "
                                                       f"{r['bits_per_byte']}")
    report(results, args.budget)


if __name__ == "__main__":
    main()
