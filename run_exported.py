"""Generate text with an i3 model exported by export.py, on ONNX Runtime: no PyTorch, only onnxruntime, numpy and the
tokenizer (tokenizers + transformers, which import without torch).

    python run_exported.py OUTPUT_DIR --prompt "It is a truth" --max_new_tokens 32
    python run_exported.py OUTPUT_DIR --prompt "Hello" --chat --temperature 0.8 --top_k 50 --top_p 0.9 --seed 0
    python run_exported.py OUTPUT_DIR --messages chat.json        # a JSON list of {"role", "content"} messages

Greedy unless --temperature is given. Several --prompt flags make one left-padded batch; each continuation is printed
alone, one per line.

Sampling (what `sample_next_tokens` does to each row's next-token logits, in float64, rows in order):
  1. divide the logits by the temperature;
  2. top-k: drop (set to -inf) every logit below the k-th largest (ties with it stay);
  3. top-p: sort the kept logits ascending (stable), softmax them, and drop the tokens whose cumulative probability
     is <= 1 - p, always keeping the most likely one;
  4. softmax what is left, draw u = rng.random() from `numpy.random.default_rng(seed)`, and take the first token
     whose cumulative probability exceeds u times the total.
One generator serves the whole batch, so a seed fixes every row's draws.
"""

import argparse
import functools
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from transformers import AutoTokenizer

ONNX_FILE = "model.onnx"  # the names export.py writes
EMPTY_STATES_FILE = "empty_states.npz"
EXPORT_CONFIG_FILE = "export_config.json"


def sample_next_tokens(logits: np.ndarray, rng: np.random.Generator | None, temperature: float = 1.0,
                       top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """(b, vocab) logits -> (b,) next tokens: the argmax without `rng`, else the draw described in the module
    docstring."""
    if rng is None:
        return logits.argmax(-1)
    tokens = []
    for row in logits.astype(np.float64):
        scores = row / temperature
        if 0 < top_k < scores.size:
            scores = np.where(scores < np.sort(scores)[-top_k], -np.inf, scores)
        if top_p < 1.0:
            order = np.argsort(scores, kind="stable")
            probabilities = softmax(scores[order])
            dropped = np.cumsum(probabilities) <= 1 - top_p
            dropped[-1] = False
            scores[order[dropped]] = -np.inf
        cumulative = np.cumsum(softmax(scores))
        tokens.append(min(int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right")),
                          scores.size - 1))
    return np.array(tokens, dtype=np.int64)


def softmax(scores: np.ndarray) -> np.ndarray:
    exponentials = np.exp(scores - scores.max())
    return exponentials / exponentials.sum()


def left_pad(prompts: list[list[int]], pad_token_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> (ids, attention mask), each (b, longest), padded on the left (the recurrent layers skip padded
    steps, and every row's next token sits in the last column)."""
    width = max(len(prompt) for prompt in prompts)
    ids = np.full((len(prompts), width), pad_token_id, dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    return ids, mask


class ExportedI3:
    """An exported i3 model on ONNX Runtime: `step` runs the graph, `generate` decodes."""

    def __init__(self, folder: str | Path, threads: int | None = None, profile_prefix: str | None = None):
        folder = Path(folder)
        self.config = json.loads((folder / EXPORT_CONFIG_FILE).read_text())
        with np.load(folder / EMPTY_STATES_FILE) as empty:
            self.empty = {name: empty[name] for name in self.config["past_names"]}
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        if profile_prefix:
            options.enable_profiling = True
            options.profile_file_prefix = profile_prefix
        self.session = ort.InferenceSession(str(folder / ONNX_FILE), options, providers=["CPUExecutionProvider"])
        self.folder = folder

    @functools.cached_property
    def tokenizer(self):
        return AutoTokenizer.from_pretrained(self.folder, trust_remote_code=True)

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        """The past of `batch` new sequences: every state at its empty value, keys and values of length 0."""
        return {name: np.repeat(state, batch, axis=0) for name, state in self.empty.items()}

    def step(self, input_ids, position_ids, attention_mask, past):
        """One graph run: (b, vocab) logits of each row's last token, and the new past."""
        outputs = self.session.run(None, {"input_ids": input_ids, "position_ids": position_ids,
                                          "attention_mask": attention_mask, **past})
        return outputs[0][:, -1], dict(zip(self.config["past_names"], outputs[1:]))

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None, eos_token_id: int | None = -1) -> list[list[int]]:
        """The new tokens of each prompt (a list of token ids): greedy at temperature 0, else sampled; a row stops
        after its end-of-sequence token (`eos_token_id` -1: the model's own, None: never)."""
        self.check_length(max(len(prompt) for prompt in prompts) + max_new_tokens)
        ids, mask = left_pad(prompts, self.config["pad_token_id"])
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
        logits, past = self.step(ids, positions, mask, self.empty_past(len(prompts)))
        return self.decode(logits, past, mask, positions[:, -1:], max_new_tokens, temperature, top_k, top_p, seed,
                           eos_token_id)

    def decode(self, logits, past, mask, last_positions, max_new_tokens: int, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, seed: int | None = None, eos_token_id: int | None = -1):
        """Continue from the `logits` (b, vocab) and `past` of a prefill whose mask is `mask` (b, length) and whose
        last positions are `last_positions` (b, 1): see `generate`."""
        if eos_token_id == -1:
            eos_token_id = self.config["eos_token_id"]
        rng = np.random.default_rng(seed) if temperature > 0 else None
        generated, finished = [], np.zeros(len(logits), dtype=bool)
        positions = last_positions
        for _ in range(max_new_tokens):
            tokens = np.where(finished, self.config["pad_token_id"],
                              sample_next_tokens(logits, rng, temperature, top_k, top_p))
            generated.append(tokens)
            if eos_token_id is not None:
                finished |= tokens == eos_token_id
            if finished.all() or len(generated) == max_new_tokens:
                break
            mask = np.concatenate([mask, np.ones((len(logits), 1), dtype=np.int64)], axis=1)
            positions = positions + 1
            logits, past = self.step(tokens[:, None], positions, mask, past)
        return [cut_after_eos(row, eos_token_id) for row in np.stack(generated, axis=1).tolist()]

    def check_length(self, length: int):
        """Learned positions end at `max_position_embeddings`; the graph itself cannot refuse past it."""
        limit = self.config["max_length"]
        if limit is not None and length > limit:
            raise ValueError(f"{length} tokens (prompt + new) pass this model's {limit} learned positions.")


def cut_after_eos(tokens: list[int], eos_token_id: int | None) -> list[int]:
    return tokens[: tokens.index(eos_token_id) + 1] if eos_token_id in tokens else tokens


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="a folder written by export.py")
    parser.add_argument("--prompt", action="append", help="text to continue; repeat for a batch")
    parser.add_argument("--chat", action="store_true", help="each prompt is a user message, through the chat template")
    parser.add_argument("--messages", help="a JSON file (or JSON text) holding a list of chat messages")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top_k", type=int, default=0, help="0 = off")
    parser.add_argument("--top_p", type=float, default=1.0, help="1 = off")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (default: all cores)")
    args = parser.parse_args(argv)
    if not args.prompt and not args.messages:
        parser.error("give --prompt TEXT or --messages FILE")
    if (args.top_k or args.top_p < 1.0) and args.temperature <= 0:
        parser.error("--top_k and --top_p sample: give --temperature too")
    return args


def prompt_texts(args, tokenizer) -> list[str]:
    """The texts to continue: plain prompts, or chat messages rendered by the tokenizer's chat template."""
    if args.messages:
        source = Path(args.messages)
        conversations = [json.loads(source.read_text() if source.is_file() else args.messages)]
    elif args.chat:
        conversations = [[{"role": "user", "content": prompt}] for prompt in args.prompt]
    else:
        return args.prompt
    return [tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            for messages in conversations]


def main(argv=None):
    args = parse_args(argv)
    model = ExportedI3(args.folder, args.threads)
    chat = bool(args.messages or args.chat)
    prompts = [model.tokenizer.encode(text, add_special_tokens=not chat) for text in prompt_texts(args, model.tokenizer)]
    generated = model.generate(prompts, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    for tokens in generated:
        print(model.tokenizer.decode(tokens, skip_special_tokens=True))


if __name__ == "__main__":
    sys.exit(main())
