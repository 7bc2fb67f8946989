"""train.py end to end: `accelerate launch` with 1 and 2 CPU processes, exports that load, exact resume after SIGKILL,
held-out text kept out of training, and one-line errors. A tiny model (hidden 32, 2 + 2 layers), 8 steps, offline."""

import json
import lzma
import os
import signal
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from accelerate.utils import write_basic_config

from i3 import train
from i3.tokenization_i3 import split_chunks

from conftest import REPO_ROOT, tiny_config, tiny_model

MARKER = " zqxjv"  # appended to the held-out file only: chunks Austen never writes


class Workspace:
    """A tiny corpus (two novel openings to train on, one held out), a tiny preset and an accelerate config."""

    def __init__(self, root: Path):
        self.root = root
        self.corpus = root / "corpus"
        self.corpus.mkdir()
        for name, size in [("emma", 40_000), ("prideprejudice", 40_000), ("persuasion", 8_000)]:
            text = lzma.open(REPO_ROOT / "data" / "austen" / f"{name}.txt.xz", "rt", encoding="utf-8").read()[:size]
            (self.corpus / f"{name}.txt").write_text(text + (MARKER * 300 if name == "persuasion" else ""))
        self.model_config = root / "tiny.json"
        tiny_config().to_json_file(self.model_config)
        self.accelerate_config = root / "accelerate.yaml"
        write_basic_config(save_location=str(self.accelerate_config))
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(root / "hf"), "MPLCONFIGDIR": str(root / "mpl"),
                    "TOKENIZERS_PARALLELISM": "false"}
        # with --multi_gpu: DDP over gloo (without CPU mode, --multi_gpu starts processes that never connect)
        self.launch_env = {**self.env, "ACCELERATE_USE_CPU": "true"}

    def args(self, output_dir: Path, *extra: str) -> list[str]:
        return [
            "--train_file", str(self.corpus / "emma.txt"), str(self.corpus / "prideprejudice.txt"),
            "--validation_file", str(self.corpus / "persuasion.txt"), "--model_config", str(self.model_config),
            "--vocab_size", "400", "--tokenizer_cache_dir", str(self.root / "tokenizers"), "--block_size", "32",
            "--per_device_train_batch_size", "4", "--max_train_steps", "8", "--num_warmup_steps", "2",
            "--eval_steps", "4", "--checkpointing_steps", "4", "--sample_prompts", "It is", "--max_new_tokens", "8",
            "--output_dir", str(output_dir), *extra,
        ]

    def launch_command(self, args: list[str], processes: int = 1) -> list[str]:
        distributed = ["--multi_gpu"] if processes > 1 else []
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(self.accelerate_config),
                *distributed, "--num_processes", str(processes), str(REPO_ROOT / "train.py"), *args]

    def launch(self, args: list[str], processes: int = 1) -> subprocess.CompletedProcess:
        result = subprocess.run(self.launch_command(args, processes), env=self.launch_env, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
        return result


def settings(argv: list[str]):
    """What train.main checks before it builds anything: the flags, the data mixture and the model config."""
    args = train.parse_args(argv)
    sources = train.data_sources(train.source_flags(args), args.datasets)
    return args, sources, train.model_config(args.model_config, args.config_overrides, args.block_size,
                                             args.separate_documents)


def tokenizer_and_loaders(argv: list[str]):
    """The tokenizer, training loader and held-out loader (with its byte count) of these flags, in this process."""
    args, sources, _ = settings(argv)
    documents, held_out = train.load_corpus(sources, args.streaming, train.chat_renderer(None), 0, None)
    tokenizer = train.build_tokenizer(args.tokenizer_type, documents, args.vocab_size, args.tokenizer_cache_dir)
    return (tokenizer, train.training_loader(documents, tokenizer, args.block_size, 4, False, args.streaming, None, 0),
            *train.evaluation_loader(held_out, tokenizer, args.block_size, 8))


def results(output_dir: Path) -> dict:
    return json.loads((output_dir / "all_results.json").read_text())


def decode_blocks(tokenizer, blocks) -> str:
    return tokenizer.decode([token for block in blocks for token in block["input_ids"]])


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("train"))


@pytest.fixture(scope="module")
def single_run(workspace) -> Path:
    output_dir = workspace.root / "single"
    workspace.launch(workspace.args(output_dir))
    return output_dir


@pytest.fixture
def in_process_cache(workspace, monkeypatch):
    """Runs train.py's functions in this process with the datasets cache in the workspace, not the home folder."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(workspace.root / "hf" / "datasets"))


def test_one_process_run_writes_a_hub_ready_folder(single_run):
    """One launched process exports safetensors, config and tokenizer with auto_map, the code files, a generation
    config, a loss plot and a model card carrying the held-out bits per byte."""
    files = {path.name for path in single_run.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer_config.json", "README.md",
            "loss.png", "configuration_i3.py", "modeling_i3.py", "tokenization_i3.py"} <= files
    assert "AutoModelForCausalLM" in json.loads((single_run / "config.json").read_text())["auto_map"]
    assert "AutoTokenizer" in json.loads((single_run / "tokenizer_config.json").read_text())["auto_map"]
    metrics = results(single_run)
    card = (single_run / "README.md").read_text()
    assert f"{metrics['bits_per_byte']:.4f}" in card and "loss.png" in card and "custom_code" in card
    assert metrics["train_tokens"] == 8 * 4 * 32 and 0 < metrics["bits_per_byte"] < 10


def test_export_loads_in_a_text_generation_pipeline(workspace, single_run):
    """A fresh process loads the export with `pipeline("text-generation", trust_remote_code=True)`: greedy text and
    chat replies decoded from the cache equal the argmax loop over uncached full forwards, and so does sampling with a
    seed (`generate(use_cache=False)`)."""
    code = (
        "import torch\n"
        "from transformers import pipeline\n"
        f"generator = pipeline('text-generation', model={str(single_run)!r}, trust_remote_code=True)\n"
        "model, tokenizer = generator.model, generator.tokenizer\n"
        "ids = tokenizer('It is a truth', return_tensors='pt').input_ids\n"
        "reference = ids\n"
        "with torch.no_grad():\n"
        "    for _ in range(12):\n"
        "        next_id = model(reference, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)\n"
        "        reference = torch.cat([reference, next_id], dim=1)\n"
        "        if next_id.item() == tokenizer.eos_token_id:\n"
        "            break\n"
        "text = generator('It is a truth', max_new_tokens=12, do_sample=False)[0]['generated_text']\n"
        "expected = tokenizer.decode(reference[0, ids.shape[1]:], skip_special_tokens=True)\n"
        "assert text == 'It is a truth' + expected, (text, reference)\n"
        "reply = generator([{'role': 'user', 'content': 'Hello'}], max_new_tokens=6, do_sample=False)\n"
        "assert reply[0]['generated_text'][-1]['role'] == 'assistant'\n"
        "sampled = []\n"
        "for use_cache in (True, False):\n"
        "    torch.manual_seed(0)\n"
        "    sampled.append(model.generate(ids, do_sample=True, top_k=50, max_new_tokens=12, use_cache=use_cache))\n"
        "assert torch.equal(*sampled), sampled\n"
        "print('GENERATED', repr(text))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], env=workspace.env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "GENERATED 'It is a truth" in result.stdout


def test_two_processes_see_the_same_global_batches(workspace, single_run):
    """Two DDP CPU processes with half the per-device batch train on the same global batches as one process, so they
    end at the same losses (and the log shows that two processes really ran)."""
    output_dir = workspace.root / "two"
    result = workspace.launch(workspace.args(output_dir, "--per_device_train_batch_size", "2"), processes=2)
    assert "2 process(es)" in result.stderr
    one, two = results(single_run), results(output_dir)
    assert two["train_tokens"] == one["train_tokens"]
    for key in ("train_loss", "eval_loss", "bits_per_byte"):
        assert two[key] == pytest.approx(one[key], rel=1e-4), key


def test_killed_run_resumes_to_the_same_final_loss(workspace, single_run):
    """A run SIGKILLed right after a checkpoint and resumed from "latest" ends with exactly the losses of a run that
    was never interrupted (same weights, optimizer, schedule, data order)."""
    output_dir = workspace.root / "killed"
    args = workspace.args(output_dir, "--checkpointing_steps", "2")
    process = subprocess.Popen(workspace.launch_command(args), env=workspace.launch_env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    for line in process.stdout:
        if "checkpoint" in line and "step_2" in line:
            os.killpg(process.pid, signal.SIGKILL)
            break
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert (output_dir / "checkpoints" / "step_2").is_dir() and not (output_dir / "model.safetensors").exists()

    workspace.launch(args + ["--resume_from_checkpoint", "latest"])
    resumed, uninterrupted = results(output_dir), results(single_run)
    for key in ("train_loss", "eval_loss", "bits_per_byte", "train_tokens"):
        assert resumed[key] == uninterrupted[key], key


def test_partial_checkpoint_is_never_latest(tmp_path):
    """A save interrupted mid-write leaves only a hidden partial folder, so "latest" is the newest complete one."""
    (tmp_path / "step_2").mkdir()
    (tmp_path / "step_10").mkdir()
    (tmp_path / ".partial-step_12").mkdir()
    assert train.latest_checkpoint(tmp_path) == tmp_path / "step_10"
    assert train.latest_checkpoint(tmp_path / "missing") is None


def test_held_out_text_reaches_neither_training_nor_the_vocabulary(workspace, in_process_cache):
    """The held-out file's text is in no training block and shaped no vocabulary entry, though it is evaluated (a
    vocabulary built with it would have learned its repeated marker)."""
    tokenizer, train_loader, eval_loader, eval_bytes = tokenizer_and_loaders(workspace.args(workspace.root / "unused"))
    training_text = decode_blocks(tokenizer, train_loader.dataset.with_format(None))
    scored = [label for window in eval_loader.dataset for label in window["labels"][1:] if label != -100]
    held_out_text = tokenizer.decode(scored)
    held_out_file = (workspace.corpus / "persuasion.txt").read_text()
    assert MARKER not in training_text and "Emma Woodhouse" in training_text
    assert held_out_text == held_out_file and held_out_file[:300] not in training_text
    assert eval_bytes == len(held_out_file.encode())
    texts = [(workspace.corpus / f"{name}.txt").read_text() for name in ("emma", "prideprejudice", "persuasion")]
    marker_chunks = set(split_chunks(held_out_file)) - set(split_chunks(texts[0] + texts[1]))
    assert marker_chunks and not marker_chunks & set(tokenizer.get_vocab())
    with_held_out = train.build_tokenizer("chunk", texts, 400, workspace.root / "tokenizers")
    assert marker_chunks & set(with_held_out.get_vocab())


def test_every_held_out_token_is_scored_once():
    """Evaluation windows overlap by one token, so each text token is a label exactly once; the EOS separators are
    in the inputs but never scored (bits per byte counts exactly the text's bytes)."""
    documents = [list(range(10, 27)) + [3], list(range(30, 35)) + [3]]
    windows = train.evaluation_windows(documents, block_size=8, eos_id=3)
    scored = [label for window in windows for label in window["labels"][1:] if label != -100]
    assert scored == [*documents[0][:-1], *documents[1][:-1]]
    inputs = [token for window in windows for token in window["input_ids"][1:]]
    assert inputs[: len(documents[0]) + len(documents[1])] == [*documents[0], *documents[1]]
    assert all(len(window["input_ids"]) == 8 for window in windows)


def test_chat_messages_are_rendered_with_the_chat_template(workspace, in_process_cache, tmp_path):
    """A --messages_column is rendered with the tokenizer's chat template into the same text apply_chat_template gives,
    then ends with the end-of-text token like any document."""
    conversations = [["Hello", "Hi"], ["How are you doing?", "Very well, thanks."]] * 50
    rows = [{"messages": [{"role": role, "content": text} for role, text in zip(["user", "assistant"], turns)]}
            for turns in conversations]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    tokenizer, train_loader, eval_loader, _ = tokenizer_and_loaders([
        "--train_file", str(tmp_path / "chat.jsonl"), "--messages_column", "messages", "--vocab_size", "290",
        "--tokenizer_cache_dir", str(tmp_path), "--block_size", "16", "--model_config", str(workspace.model_config),
        "--output_dir", str(tmp_path / "out")])
    stream = decode_blocks(tokenizer, train_loader.dataset.with_format(None))
    first = tokenizer.apply_chat_template(rows[0]["messages"], tokenize=False) + tokenizer.eos_token
    assert stream.startswith(first) and first.startswith("User: Hello\nAssistant: Hi")
    assert eval_loader is None


def test_two_sources_stream_interleaved_with_their_probabilities(workspace, in_process_cache, tmp_path):
    """Two dataset folders, loaded by name as Hub datasets are, each with its own text column, are streamed and mixed
    by probability for training, while both validation splits are evaluated and never trained on."""
    for name, column, size in [("stories", "story", 300), ("facts", "text", 300)]:
        (tmp_path / name).mkdir()
        for split in ("train", "validation"):
            lines = [json.dumps({column: f"{name} {split} {i}."}) + "\n" for i in range(size if split == "train" else 3)]
            (tmp_path / name / f"{split}.jsonl").write_text("".join(lines))
    mixture = [{"dataset_name": str(tmp_path / "stories"), "text_column": "story", "probability": 0.8},
               {"dataset_name": str(tmp_path / "facts"), "probability": 0.2}]
    tokenizer, train_loader, eval_loader, _ = tokenizer_and_loaders([
        "--datasets", json.dumps(mixture), "--streaming", "--vocab_size", "300", "--tokenizer_cache_dir", str(tmp_path),
        "--block_size", "16", "--model_config", str(workspace.model_config), "--output_dir", str(tmp_path / "out")])
    blocks = [block for block, _ in zip(train_loader.dataset.with_format(None), range(60))]
    training_text = decode_blocks(tokenizer, blocks)
    assert training_text.count("stories train") > 2 * training_text.count("facts train") > 0
    assert "validation" not in training_text
    scored = [label for window in eval_loader.dataset for label in window["labels"][1:] if label != -100]
    assert "stories validation 2." in tokenizer.decode(scored) and "facts validation 0." in tokenizer.decode(scored)


def test_recipes_parse_with_their_hub_mixture_and_flags_win():
    """The published recipes name existing presets and a weighted Hub mixture, and command-line flags override them."""
    args, sources, _ = settings(["--config", str(REPO_ROOT / "recipes" / "i3-80m.yaml"), "--learning_rate", "1e-3",
                                 "--output_dir", "unused"])
    assert args.learning_rate == 1e-3 and args.max_train_steps == 5000 and args.vocab_size == 35560
    assert [s["dataset_name"] for s in sources] == [
        "roneneldan/TinyStories", "starhopp3r/TinyChat", "agentlans/high-quality-english-sentences"]
    assert sum(s["probability"] for s in sources) == pytest.approx(1.0)
    args, sources, config = settings(["--config", str(REPO_ROOT / "recipes" / "i3-200m.yaml"), "--output_dir", "unused"])
    assert args.tokenizer_type == "bpe" and config.recurrent_mixer == "rwkv4" and len(sources) == 4


def test_missing_files_name_the_argument(tmp_path):
    """A missing data file, preset or recipe stops in one line that names the argument."""
    for flag in ("--train_file", "--model_config", "--config"):
        with pytest.raises(SystemExit) as stop:
            train.parse_args([flag, str(tmp_path / "absent.txt"), "--output_dir", str(tmp_path)])
        assert str(stop.value.code).startswith(f"error: {flag} ") and "no such file" in str(stop.value.code)


def test_block_size_above_learned_positions_is_refused(workspace, tmp_path):
    """A --block_size past a learned-position model's max_position_embeddings is refused before any data is read."""
    learned = tmp_path / "learned.json"
    tiny_config(position_embedding_type="learned", max_position_embeddings=16).to_json_file(learned)
    with pytest.raises(SystemExit) as stop:
        settings(["--model_config", str(learned), "--block_size", "32", "--output_dir", str(tmp_path)])
    assert str(stop.value.code).startswith("error: --block_size 32 is above the model's learned positions")


def test_unreachable_hub_dataset_offline_names_the_argument(workspace, in_process_cache, tmp_path):
    """A Hub dataset that cannot be reached offline stops in one line naming --dataset_name and the offline mode."""
    _, sources, _ = settings(["--dataset_name", "i3-tests/no-such-dataset", "--output_dir", str(tmp_path)])
    with pytest.raises(SystemExit) as stop:
        train.load_documents(sources[0], "train", streaming=False, render_chat=None)
    message = str(stop.value.code)
    assert message.startswith("error: --dataset_name 'i3-tests/no-such-dataset' could not be loaded")
    assert "HF_HUB_OFFLINE" in message and "\n" not in message


def test_non_finite_loss_stops_before_the_update(workspace):
    """A NaN loss stops the run with a message naming the step, before any weight update or export."""
    output_dir = workspace.root / "diverged"
    command = [sys.executable, str(REPO_ROOT / "train.py"),
               *workspace.args(output_dir, "--config_overrides", "initializer_range=1e30")]
    result = subprocess.run(command, env=workspace.env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("error: loss is nan at step 1")
    assert not (output_dir / "model.safetensors").exists()


def test_unknown_column_fails_in_one_line_and_keeps_earlier_output(workspace, single_run):
    """An unknown --text_column exits non-zero with one line naming it and its dataset's columns, and the earlier
    run's export and checkpoints in the same --output_dir are left untouched."""
    before = {path: path.stat().st_mtime_ns for path in single_run.rglob("*")}
    command = [sys.executable, str(REPO_ROOT / "train.py"),
               *workspace.args(single_run, "--text_column", "foo", "--resume_from_checkpoint", "latest")]
    result = subprocess.run(command, env=workspace.env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("error: --text_column 'foo' not in dataset columns ['text']")
    assert {path: path.stat().st_mtime_ns for path in single_run.rglob("*")} == before


def launched_log(result: subprocess.CompletedProcess) -> str:
    return result.stdout + result.stderr


@pytest.mark.parametrize("setting, threads", [(None, "all"), ("OMP_NUM_THREADS", 1), ("--num_cpu_threads_per_process", 1)])
def test_one_cpu_process_uses_every_core_unless_told(workspace, setting, threads):
    """`accelerate launch train.py` gives its one CPU process every core (and says so); a thread count the user sets
    through OMP_NUM_THREADS or --num_cpu_threads_per_process wins."""
    args = workspace.args(workspace.root / f"threads-{setting}", "--max_train_steps", "1", "--eval_steps", "0",
                          "--checkpointing_steps", "0")
    command, env = workspace.launch_command(args), dict(workspace.launch_env)
    if setting == "OMP_NUM_THREADS":
        env["OMP_NUM_THREADS"] = "1"
    elif setting:
        command.insert(command.index("--num_processes"), "--num_cpu_threads_per_process=1")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, launched_log(result)[-3000:]
    cores = len(os.sched_getaffinity(0))
    expected = f"with {cores} thread(s) each (all {cores} cores" if threads == "all" else "with 1 thread(s) each (as set"
    assert expected in launched_log(result)


def test_accumulated_micro_batches_give_the_large_batch_update(workspace):
    """2 accumulated micro-batches of 4 blocks give the weights one batch of 8 gives, to float tolerance."""
    from safetensors.torch import load_file

    weights = []
    for batch, accumulation in ((8, 1), (4, 2)):
        output_dir = workspace.root / f"accumulate-{batch}x{accumulation}"
        workspace.launch(workspace.args(output_dir, "--per_device_train_batch_size", str(batch),
                                        "--gradient_accumulation_steps", str(accumulation), "--max_train_steps", "2",
                                        "--eval_steps", "0", "--checkpointing_steps", "0"))
        weights.append(load_file(output_dir / "model.safetensors"))
        assert results(output_dir)["train_tokens"] == 2 * 8 * 32
    for name, tensor in weights[0].items():
        torch.testing.assert_close(weights[1][name], tensor, atol=2e-6, rtol=1e-5, msg=name)


def test_resumed_across_an_epoch_end_equals_uninterrupted(workspace, tmp_path):
    """On data of 5 micro-batches an epoch, with 2 accumulated a step, every step still sums 2 micro-batches (step 3
    spans two epochs, none is cut short), and a run killed after step 2 and resumed ends with the uninterrupted run's
    losses."""
    short = tmp_path / "short.txt"
    short.write_text((workspace.corpus / "emma.txt").read_text()[:1_200])

    def args(output_dir, *extra):
        return workspace.args(output_dir, "--train_file", str(short), "--per_device_train_batch_size", "4",
                              "--gradient_accumulation_steps", "2", "--max_train_steps", "5", "--eval_steps", "0",
                              "--checkpointing_steps", "2", *extra)

    uninterrupted = tmp_path / "uninterrupted"
    workspace.launch(args(uninterrupted))
    assert results(uninterrupted)["train_tokens"] == 5 * 2 * 4 * 32
    killed = tmp_path / "killed"
    process = subprocess.Popen(workspace.launch_command(args(killed)), env=workspace.launch_env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    for line in process.stdout:
        if "checkpoint" in line and "step_2" in line:
            os.killpg(process.pid, signal.SIGKILL)
            break
    process.wait(timeout=60)
    workspace.launch(args(killed, "--resume_from_checkpoint", "latest"))
    for key in ("train_loss", "eval_loss", "bits_per_byte", "train_tokens"):
        assert results(killed)[key] == results(uninterrupted)[key], key


@pytest.mark.parametrize("flags, message", [
    (["--learning_rate", "-1"], "error: --learning_rate -1.0: must be a positive number"),
    (["--per_device_train_batch_size", "0"], "error: --per_device_train_batch_size 0: must be a positive integer"),
    (["--gradient_accumulation_steps", "0"], "error: --gradient_accumulation_steps 0: must be a positive integer"),
    (["--max_train_steps", "-5"], "error: --max_train_steps -5: must be a positive integer"),
    (["--block_size", "1"], "error: --block_size 1: must be at least 2 tokens"),
    (["--min_lr_rate", "1.5"], "error: --min_lr_rate 1.5: must be between 0 and 1"),
    (["--vocab_size", "100"], "error: --vocab_size 100: must be at least 260"),
    (["--config_overrides", "hidden_size=30"], "error: --config_overrides 'hidden_size=30': `hidden_size` (30) must"),
])
def test_bad_numbers_and_overrides_stop_in_one_line(workspace, tmp_path, flags, message):
    """Out-of-range numbers and overrides the model cannot be built from stop in one line naming the flag, before
    anything is read or written."""
    with pytest.raises(SystemExit) as stop:
        settings(workspace.args(tmp_path / "out", *flags))
    assert str(stop.value.code).startswith(message) and "\n" not in str(stop.value.code)
    assert not (tmp_path / "out").exists()


def test_missing_tokenizer_names_the_argument(tmp_path):
    """A --tokenizer_name that is neither a folder nor a loadable Hub id stops in one line naming it."""
    with pytest.raises(SystemExit) as stop:
        train.load_tokenizer(str(tmp_path / "no-such-tokenizer"))
    message = str(stop.value.code)
    assert message.startswith(f"error: --tokenizer_name {str(tmp_path / 'no-such-tokenizer')!r} could not be loaded")
    assert "\n" not in message


def test_accelerate_configs_for_sharded_engines_load():
    """The shipped FSDP2, FSDP1 and DeepSpeed configs load through Accelerate's own reader with the settings train.py
    relies on (I3DecoderLayer as the shard unit, original parameters for FSDP1, 16-bit gathering for ZeRO-3)."""
    from accelerate.commands.config.config_args import load_config_from_file

    folder = REPO_ROOT / "configs" / "accelerate"
    for name in ("fsdp2", "fsdp1"):
        fsdp = load_config_from_file(str(folder / f"{name}.yaml")).fsdp_config
        assert fsdp["fsdp_version"] == int(name[-1]) and fsdp["fsdp_transformer_layer_cls_to_wrap"] == "I3DecoderLayer"
    assert load_config_from_file(str(folder / "fsdp1.yaml")).fsdp_config["fsdp_use_orig_params"] is True
    for stage in (2, 3):
        deepspeed = load_config_from_file(str(folder / f"deepspeed-zero{stage}.yaml")).deepspeed_config
        assert deepspeed["zero_stage"] == stage
    assert load_config_from_file(str(folder / "deepspeed-zero3.yaml")).deepspeed_config["zero3_save_16bit_model"]


def test_optimizer_groups_survive_wrapping():
    """Weight decay reaches exactly the linear and conv weight matrices, also when the parameters are named inside
    DDP, FSDP1 or activation-checkpoint wrappers, and never an embedding or a head tied to it."""
    model = tiny_model(tie_word_embeddings=True)
    decayed = train.decayed_parameter_names(model)
    expected = {name for name, parameter in model.named_parameters() if parameter.dim() >= 2} - {
        "model.embed_tokens.weight"}
    assert decayed == expected
    assert train.unwrapped_name("module._fsdp_wrapped_module.model.layers.0._fsdp_wrapped_module."
                                "_checkpoint_wrapped_module.linear_attn.in_proj.weight") == \
        "model.layers.0.linear_attn.in_proj.weight"
    decay_group, plain_group = train.parameter_groups(model, decayed, weight_decay=0.1)
    assert decay_group["weight_decay"] == 0.1 and plain_group["weight_decay"] == 0
    assert {id(p) for p in decay_group["params"]} == {id(p) for n, p in model.named_parameters() if n in expected}


def test_compiled_run_compiles_each_layer_kind_once(workspace):
    """`--torch_compile` compiles one graph per layer kind (recurrent, attention) at the first step; evaluations and
    samples at other shapes and in no-grad mode recompile nothing, and the run exports as usual."""
    output_dir = workspace.root / "compiled"
    args = workspace.args(output_dir, "--torch_compile", "--max_train_steps", "4", "--eval_steps", "2",
                          "--checkpointing_steps", "0")
    env = {**workspace.launch_env, "TORCH_LOGS": "recompiles"}
    result = subprocess.run(workspace.launch_command(args), env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, launched_log(result)[-3000:]
    recompiles = [line for line in launched_log(result).splitlines() if "Recompiling function" in line]
    assert len(recompiles) == 1 and "forward" in recompiles[0], recompiles  # the second layer kind, nothing else
    assert "first step, compilation included" in launched_log(result)
    assert results(output_dir)["step"] == 4 and (output_dir / "model.safetensors").exists()


def test_separated_documents_get_restarting_positions(workspace, tmp_path):
    """--separate_documents gives every block position ids that restart at the block and after each end-of-text
    token (so the model keeps packed documents apart), and is refused for a published mixer that cannot."""
    blocks = train.group_texts({"input_ids": [[5, 6, 3], [7, 8, 9, 10, 3], [11, 3]]}, block_size=4, eos_id=3)
    assert blocks["input_ids"] == [[5, 6, 3, 7], [8, 9, 10, 3]]
    assert blocks["position_ids"] == [[0, 1, 2, 0], [0, 1, 2, 3]]
    assert "position_ids" not in train.group_texts({"input_ids": [[5, 6, 3]]}, block_size=2)
    published = tmp_path / "open.json"
    tiny_config(recurrent_mixer="open-i3").to_json_file(published)
    with pytest.raises(SystemExit, match="--separate_documents needs the i3 recurrent mixer"):
        settings(workspace.args(tmp_path / "out", "--model_config", str(published), "--separate_documents"))


@pytest.mark.parametrize("script", ["train.py", "convert_open_i3.py", "benchmarks/bench_model.py",
                                    "benchmarks/bench_quality.py", "benchmarks/bench_tokenizer.py"])
def test_scripts_run_from_a_checkout_that_was_never_installed_say_how_to_install(script, tmp_path):
    """Without `pip install` the package `i3` is missing: every script stops with one line that gives the command, and
    no traceback. (Lines before it may come from other packages' imports: with executorch installed, transformers
    imports torchao, which logs its unloadable CUDA extensions.)"""
    path = REPO_ROOT / script  # run as `python path` runs it (its folder first on sys.path), with `i3` unimportable
    blocked = (f"import sys, runpy; sys.modules['i3'] = None; sys.path.insert(0, {str(path.parent)!r}); "
               f"runpy.run_path({str(path)!r}, run_name='x')")
    result = subprocess.run([sys.executable, "-c", blocked], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: No module named 'i3")
    assert last_line.endswith("install the repo first: pip install -r requirements-dev.txt")
