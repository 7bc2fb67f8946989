"""Reference outputs for the vLLM tests, computed by i3's own transformers model in the repo's main environment.

    python serving/tests/make_references.py OUTPUT_DIR [--trained]

vLLM pins an older transformers than i3's modeling code needs, so the vLLM tests cannot run i3's `generate`
themselves: they run this script with the main environment's python (I3_REFERENCE_PYTHON) and compare against what it
writes. For every variant (mixer x positions, plus low-rank / gated / tied heads; attention head size 32, the smallest vLLM's CPU attention takes) it saves a tiny random model with
the repo's tokenizer files (`save_pretrained`, as train.py does), and in `references.json` each prompt's greedy tokens
from `generate` (one prompt at a time) and their log-softmax. `--trained` also trains a tiny model with train.py for
a few steps and writes the same references for it.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

os.environ["HF_HUB_OFFLINE"] = "1"
REPO_ROOT = Path(__file__).resolve().parents[2]
PROMPT_LENGTHS = [1, 2, 3, 5, 8, 13, 31, 64, 100, 150, 200, 255, 256, 257, 299, 300]  # 16 prompts, 1 to 300 tokens
NEW_TOKENS = 12
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, recurrent_num_heads=4, state_size=8,
            chunk_size=8, max_position_embeddings=512, initializer_range=0.2,
            layer_types=["linear_attention", "linear_attention", "full_attention", "full_attention"])
VARIANTS = {
    "i3-rope": dict(recurrent_mixer="i3", position_embedding_type="rope", conv_kernel=4),
    "i3-learned": dict(recurrent_mixer="i3", position_embedding_type="learned", low_rank=8, gated_mlp=True,
                       hidden_act="silu", tie_word_embeddings=True, lm_head_bias=True),
    "open-i3-rope": dict(recurrent_mixer="open-i3", position_embedding_type="rope", lm_head_bias=True),
    "open-i3-learned": dict(recurrent_mixer="open-i3", position_embedding_type="learned", attention_bias=True),
    "rwkv4-rope": dict(recurrent_mixer="rwkv4", position_embedding_type="rope"),
    "rwkv4-learned": dict(recurrent_mixer="rwkv4", position_embedding_type="learned", lm_head_bias=True),
}


def with_live_states(model):
    """Recurrent weights large enough that the states matter to the logits (at the published inits a state is ~1e-7
    and a wrong one would hide behind the skip paths)."""
    from i3.modeling_i3 import I3LtiMixer, I3RecurrentMixer, I3WkvChannelMix, I3WkvTimeMix

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, I3RecurrentMixer):
                module.dt_bias.zero_()
                module.A_log.zero_()
                module.D.fill_(0.1)
                module.token_shift.uniform_(0, 1)
            elif isinstance(module, I3LtiMixer):
                module.w_mix.uniform_(0.2, 0.9)
                module.A.normal_(0, 0.5 / module.A.shape[0] ** 0.5)
                module.B.normal_(0, 0.3)
                module.C.normal_(0, 0.3)
                module.D.normal_(0, 1)
            elif isinstance(module, (I3WkvTimeMix, I3WkvChannelMix)):
                for name, parameter in module.named_parameters(recurse=False):
                    if name.startswith("token_shift"):
                        parameter.uniform_(0, 1)
    return model


def build_variant(folder: Path, fields: dict, seed: int):
    from i3.configuration_i3 import I3Config
    from i3.modeling_i3 import I3ForCausalLM
    from i3.tokenization_i3 import I3Tokenizer

    tokenizer = I3Tokenizer.from_pretrained(REPO_ROOT)
    torch.manual_seed(seed)
    config = I3Config(vocab_size=len(tokenizer), **{**TINY, **fields})
    model = with_live_states(I3ForCausalLM(config)).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def prompts(vocab_size: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(4, vocab_size, (length,), generator=generator).tolist() for length in PROMPT_LENGTHS]


def shared_prefix_prompts(vocab_size: int, seed: int) -> list[list[int]]:
    """Four prompts with the same first 280 tokens and different tails, for prefix caching."""
    generator = torch.Generator().manual_seed(seed + 1000)
    prefix = torch.randint(4, vocab_size, (280,), generator=generator).tolist()
    return [prefix + torch.randint(4, vocab_size, (tail,), generator=generator).tolist() for tail in (5, 9, 14, 20)]


@torch.no_grad()
def greedy_references(model, prompt_ids: list[list[int]]) -> list[dict]:
    """Each prompt alone through `generate` (greedy, EOS not stopping), and the log-softmax of each chosen token."""
    references = []
    for ids in prompt_ids:
        out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                             pad_token_id=1, output_logits=True, return_dict_in_generate=True)
        tokens = out.sequences[0, len(ids):].tolist()
        logprobs = [torch.log_softmax(step[0].float(), -1)[token].item() for step, token in zip(out.logits, tokens)]
        assert len(tokens) == NEW_TOKENS
        references.append({"prompt": ids, "tokens": tokens, "logprobs": logprobs})
    return references


def train_tiny(folder: Path, workdir: Path):
    """train.py for a few steps on two Austen openings: a small trained i3 with its own tokenizer."""
    import lzma

    corpus = workdir / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for name, size in [("emma", 60_000), ("persuasion", 10_000)]:
        text = lzma.open(REPO_ROOT / "data" / "austen" / f"{name}.txt.xz", "rt", encoding="utf-8").read()[:size]
        (corpus / f"{name}.txt").write_text(text)
    config_file = workdir / "tiny.json"
    config_file.write_text(json.dumps({**TINY, "initializer_range": 0.02, "recurrent_mixer": "i3"}))
    env = {**os.environ, "HF_HOME": str(workdir / "hf"), "MPLCONFIGDIR": str(workdir / "mpl"),
           "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run([sys.executable, str(REPO_ROOT / "train.py"), "--train_file", str(corpus / "emma.txt"),
                    "--validation_file", str(corpus / "persuasion.txt"), "--model_config", str(config_file),
                    "--vocab_size", "400", "--tokenizer_cache_dir", str(workdir / "tokenizers"), "--block_size", "64",
                    "--per_device_train_batch_size", "8", "--max_train_steps", "30", "--num_warmup_steps", "3",
                    "--eval_steps", "30", "--checkpointing_steps", "1000", "--sample_prompts", "It is",
                    "--max_new_tokens", "4", "--output_dir", str(folder)],
                   env=env, check=True, capture_output=True, text=True)


def trained_references(output_dir: Path) -> dict:
    """The trained model's greedy references for token prompts, text prompts and one chat, with decoded texts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = output_dir / "trained"
    train_tiny(folder, output_dir / "train-work")
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    texts = ["It is a truth universally acknowledged", "Emma Woodhouse, handsome, clever, and rich",
             "She was", "The Miss Steeles", "Mr. Knightley, a sensible man about seven or eight-and-thirty",
             "Her father", "I do not", "What a"] * 2
    texts = [text + suffix for text, suffix in zip(texts, [""] * 8 + [" and", " when", " that", " of", " in", " to",
                                                                          ",", "!"])]
    chat = [{"role": "user", "content": "How do you do?"}]
    chat_ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
    text_references = greedy_references(model, [tokenizer(text)["input_ids"] for text in texts])
    chat_reference = greedy_references(model, [list(chat_ids)])[0]
    for reference in [*text_references, chat_reference]:
        reference["text"] = tokenizer.decode(reference["tokens"])
    for reference, text in zip(text_references, texts):
        reference["prompt_text"] = text
    chat_reference["messages"] = chat
    return {"texts": text_references, "chat": chat_reference}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--trained", action="store_true", help="also train a tiny model with train.py")
    args = parser.parse_args()
    references = {}
    for seed, (name, fields) in enumerate(VARIANTS.items()):
        model = build_variant(args.output_dir / name, fields, seed)
        vocab_size = model.config.vocab_size
        references[name] = {"prompts": greedy_references(model, prompts(vocab_size, seed)),
                            "shared_prefix": greedy_references(model, shared_prefix_prompts(vocab_size, seed))}
    if args.trained:
        references["trained"] = trained_references(args.output_dir)
    (args.output_dir / "references.json").write_text(json.dumps(references))


if __name__ == "__main__":
    main()
