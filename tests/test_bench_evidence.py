"""The evidence benchmarks on tiny sizes: the MQAR sequences and their answer-only loss, the position-bucket scores
against a direct computation, and a short end-to-end run of each benchmark with its resumption."""

import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.data import DataLoader
from transformers import default_data_collator

from i3.tokenization_i3 import build_tokenizer
from i3.train import encode_documents, evaluate, evaluation_windows

from conftest import REPO_ROOT, tiny_model

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import bench_length  # the benchmarks are scripts, importable from their folder
import bench_recall


@pytest.mark.parametrize("seq_len, pairs", [(16, 4), (65, 8), (256, 64)])
def test_recall_batch_asks_every_key_once_and_labels_only_its_value(seq_len, pairs):
    batch = bench_recall.recall_batch(5, seq_len, pairs, torch.Generator().manual_seed(seq_len))
    input_ids, labels = batch["input_ids"], batch["labels"]
    assert input_ids.shape == labels.shape == (5, seq_len)
    for ids, row_labels in zip(input_ids.tolist(), labels.tolist()):
        keys, values = ids[0 : 2 * pairs : 2], ids[1 : 2 * pairs : 2]
        assert len(set(keys)) == pairs and all(bench_recall.FIRST_KEY <= key < bench_recall.FIRST_VALUE for key in keys)
        assert all(bench_recall.FIRST_VALUE <= value < bench_recall.VOCAB_SIZE for value in values)
        answers = [t for t, label in enumerate(row_labels) if label != -100]
        assert len(answers) == pairs and min(answers) > 2 * pairs
        value_of = dict(zip(keys, values))
        assert sorted(ids[t - 1] for t in answers) == sorted(keys)  # every key asked once
        assert all(row_labels[t] == ids[t] == value_of[ids[t - 1]] for t in answers)
        asked = {t - 1 for t in answers} | set(answers)
        assert all(ids[t] == bench_recall.FILLER for t in range(2 * pairs, seq_len) if t not in asked)


def test_recall_batch_refuses_pairs_that_do_not_fit():
    with pytest.raises(ValueError, match="at least 64 tokens"):
        bench_recall.recall_batch(1, 63, 16, torch.Generator())


def test_recall_loss_and_accuracy_count_only_the_answers():
    model = tiny_model(vocab_size=bench_recall.VOCAB_SIZE)
    batch = bench_recall.recall_batch(3, 32, 4, torch.Generator().manual_seed(0))
    logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
    answers = batch["labels"][:, 1:]
    scored = answers != -100
    expected = F.cross_entropy(logits[scored], answers[scored])
    torch.testing.assert_close(model(**batch).loss, expected)
    right = (logits.argmax(-1)[scored] == answers[scored]).float().mean().item()
    assert bench_recall.recall_accuracy(model, batch, rows_at_once=2) == pytest.approx(right)


def test_recall_llama_matches_the_default_i3_in_parameters():
    """Within the 64-unit steps of the Llama's MLP (about 10% of these models)."""
    i3 = bench_recall.build_recall_model(bench_recall.COMPARISON["i3"], 64, 256)
    llama = bench_recall.build_recall_model(bench_recall.COMPARISON["Llama"], 64, 256)
    assert (llama.config.hidden_size, llama.config.num_hidden_layers) == (64, 4)
    assert bench_recall.count_parameters(llama) == pytest.approx(bench_recall.count_parameters(i3), rel=0.1)


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["It was the best of times, it was the worst of times.\n" * 20, "Où est la gare? Ça va. 東京\n" * 5]
    return build_tokenizer("chunk", texts, 300)


def test_bucket_scores_equal_a_direct_computation(tokenizer, monkeypatch):
    monkeypatch.setattr(bench_length, "WINDOW", 40)
    monkeypatch.setattr(bench_length, "BUCKETS", [(0, 8), (8, 20), (20, 40)])
    documents = ["It was the best of times. Où est la gare?\n" * 4, "it was the worst\n", "東京 times\n" * 6]
    held_out = bench_length.held_out_buckets(tokenizer, {"text": documents}, 10_000)
    model = tiny_model(vocab_size=len(tokenizer))
    sizes = bench_length.token_bytes(tokenizer)

    windows = evaluation_windows(encode_documents(tokenizer, documents), 40, tokenizer.eos_token_id)
    input_ids = torch.tensor([window["input_ids"] for window in windows])
    labels = torch.tensor([window["labels"] for window in windows])
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits[:, :-1]
    nll = F.cross_entropy(logits.transpose(1, 2), labels[:, 1:].clamp(min=0), reduction="none")
    positions = torch.arange(1, 40).expand_as(nll)
    scored = labels[:, 1:] != -100
    assert sum(held_out[f"text {low}-{high}"]["bytes"] for low, high in bench_length.BUCKETS) == sum(
        len(document.encode("utf-8")) for document in documents)
    for low, high in bench_length.BUCKETS:
        entry = held_out[f"text {low}-{high}"]
        in_bucket = scored & (positions >= low) & (positions < high)
        assert entry["bytes"] == sizes[labels[:, 1:][in_bucket]].sum()
        loader = DataLoader(entry["windows"][bench_length.TRAINING_BLOCK], batch_size=2,
                            collate_fn=default_data_collator)
        bits_per_byte = evaluate(model, loader, Accelerator(cpu=True), entry["bytes"])["bits_per_byte"]
        assert bits_per_byte == pytest.approx(nll[in_bucket].sum().item() / math.log(2) / entry["bytes"], rel=1e-5)


def run_main(module, monkeypatch, arguments: list[str]) -> list[dict]:
    """`module.main()` with `arguments`; returns the results file's lines."""
    monkeypatch.setattr(sys, "argv", [module.__file__, *arguments])
    module.main()
    results = arguments[arguments.index("--results") + 1]
    with open(results) as file:
        return [json.loads(line) for line in file]


def test_recall_benchmark_runs_records_and_resumes(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench_recall, "HELD_OUT_TOKENS", 256)
    monkeypatch.setattr(bench_recall, "CHECKS", 2)
    arguments = ["--budget", "1", "--width", "32", "--seq_lens", "32", "--pairs", "4", "--tokens_per_step", "128",
                 "--results", str(tmp_path / "recall.jsonl")]
    results = run_main(bench_recall, monkeypatch, arguments)
    assert [r["model"] for r in results] == list(bench_recall.COMPARISON)
    for result in results:
        assert result["steps"] >= 1 and 0 <= result["accuracy"] <= 1
        assert result["curve"][-1]["accuracy"] == result["accuracy"]
    assert "| Llama |" in capsys.readouterr().out
    assert run_main(bench_recall, monkeypatch, arguments) == results  # finished runs are not run again


def test_length_benchmark_runs_records_and_resumes(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench_length, "TRAINING_BLOCK", 64)
    monkeypatch.setattr(bench_length, "WINDOW", 128)
    monkeypatch.setattr(bench_length, "BUCKETS", [(0, 16), (16, 32), (32, 64), (64, 128)])
    arguments = ["--budget", "1", "--eval_bytes", "2000", "--results", str(tmp_path / "length.jsonl")]
    results = run_main(bench_length, monkeypatch, arguments)
    assert [r["model"] for r in results] == list(bench_length.COMPARISON)
    names = {f"{text} {low}-{high}" for text in bench_length.TEXTS for low, high in bench_length.BUCKETS}
    assert all(names <= set(r["bits_per_byte"]) and r["block"] == 64 for r in results)
    assert "| 64-128 / 16-32 |" in capsys.readouterr().out
    assert run_main(bench_length, monkeypatch, arguments) == results
