"""Generation through transformers' real clients (generate's modes, pipeline, streamer, TRL, lm-evaluation-harness),
each checked against an independent reference: full forwards without a cache, hand-written argmax and sampling
loops, log-prob sums. Every layout runs: the three recurrent mixers under attention, and all-recurrent stacks (the
published small presets have no attention layer)."""

import copy
import json

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, TextStreamer, pipeline

from i3.modeling_i3 import I3Cache

from conftest import REPO_ROOT, tiny_model

LAYOUTS = {
    "i3": dict(),
    "open-i3": dict(recurrent_mixer="open-i3", position_embedding_type="learned"),
    "rwkv4": dict(recurrent_mixer="rwkv4", position_embedding_type="learned"),
    "all-recurrent i3": dict(layer_types=["linear_attention"] * 3, position_embedding_type="learned"),
    "all-recurrent open-i3": dict(recurrent_mixer="open-i3", layer_types=["linear_attention"] * 2, low_rank=4,
                                  position_embedding_type="learned"),  # the i3-12m / i3-22m / i3-tiny shape
}
GREEDY = dict(do_sample=False, eos_token_id=None, pad_token_id=1)
# speculative decoding: `generate` infers a draft's attention mask from the pad token, which random models generate
SPECULATIVE_GREEDY = dict(do_sample=False, eos_token_id=None, pad_token_id=None)


def random_ids(batch, length, seed=0, vocab=99):
    return torch.randint(4, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def layout_model(layout: str, seed: int = 0, **overrides):
    return tiny_model(seed=seed, **LAYOUTS[layout], **overrides)


@torch.no_grad()
def uncached_logits(model, ids):
    """Next-token logits (b, vocab) from a full forward over `ids`, no cache: the reference for every decode step."""
    return model(ids, use_cache=False).logits[:, -1].float()


@torch.no_grad()
def argmax_loop(model, ids, steps, penalty=None):
    """Greedy decoding by full forwards; `penalty` applies the CTRL repetition penalty (divide a positive score of
    an already present token, multiply a negative one)."""
    for _ in range(steps):
        logits = uncached_logits(model, ids)
        if penalty is not None:
            seen = torch.gather(logits, 1, ids)
            logits = logits.scatter(1, ids, torch.where(seen > 0, seen / penalty, seen * penalty))
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("layout", LAYOUTS)
def test_greedy_generate_is_the_argmax_loop(layout):
    """Cached greedy decoding of 20 tokens equals the argmax loop over uncached full forwards."""
    model = layout_model(layout, seed=3)
    prompt = random_ids(2, 6, seed=3)
    assert torch.equal(model.generate(prompt, max_new_tokens=20, **GREEDY), argmax_loop(model, prompt, 20))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_prefill_and_decode_from_the_cache_equal_the_full_forward(layout):
    """Prefill 5 tokens, then feed the rest one by one through the model-made cache: the logits of one full pass."""
    model = layout_model(layout)
    ids = random_ids(2, 13)
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
        first = model(ids[:, :5], use_cache=True)
        cache, pieces = first.cache, [first.logits]
        for t in range(5, 13):
            pieces.append(model(ids[:, t : t + 1], cache=cache).logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layout", ["i3", "all-recurrent i3"])
def test_the_cache_counts_its_tokens_and_refuses_transformers_caches(layout):
    """The model's own cache counts the tokens it holds, with or without attention layers (positions follow from it,
    whatever transformers' layers report); a transformers cache is refused with a message that says what to pass."""
    model = layout_model(layout)
    cache = model(random_ids(1, 7), use_cache=True).cache
    assert isinstance(cache, I3Cache) and cache.get_seq_length() == 7
    model(random_ids(1, 1), cache=cache)
    assert cache.get_seq_length() == 8
    from transformers import DynamicCache

    with pytest.raises(TypeError, match=r"I3Cache\(model.config\)"):
        model(random_ids(1, 3), cache=DynamicCache(config=model.config))


@pytest.mark.parametrize("layout", ["i3", "all-recurrent open-i3"])
def test_sampling_with_a_seed_is_the_sampling_loop(layout):
    """Temperature, top-k and top-p sampling with a seed draws exactly what a hand-written loop draws from the
    uncached logits with the same seed."""
    model = layout_model(layout)
    prompt = random_ids(2, 5)
    torch.manual_seed(7)
    sampled = model.generate(prompt, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, max_new_tokens=12,
                             eos_token_id=None, pad_token_id=1)
    torch.manual_seed(7)
    ids = prompt
    for _ in range(12):
        scores = uncached_logits(model, ids) / 0.8
        kth_best = scores.topk(20, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth_best, -float("inf"))
        ascending, order = scores.sort(dim=-1)  # top-p: drop the least likely tokens holding 1 - p of the mass
        dropped = ascending.softmax(-1).cumsum(-1) <= 1 - 0.9
        dropped[:, -1] = False
        scores = scores.masked_fill(dropped.scatter(1, order, dropped), -float("inf"))
        ids = torch.cat([ids, torch.multinomial(scores.softmax(-1), num_samples=1)], dim=1)
    assert torch.equal(sampled, ids)


@pytest.mark.parametrize("layout", ["i3", "rwkv4", "all-recurrent i3"])
def test_beam_search_scores_are_the_log_prob_sums(layout):
    """Each returned beam's score (length penalty 0) is the sum of its tokens' log-probabilities under uncached full
    forwards, and the best beam scores at least as high as the greedy sequence."""
    model = layout_model(layout, seed=2)
    prompt = random_ids(1, 6, seed=2)
    out = model.generate(prompt, num_beams=4, num_return_sequences=3, max_new_tokens=8, length_penalty=0.0,
                         output_scores=True, return_dict_in_generate=True, **GREEDY)
    with torch.no_grad():
        log_probs = model(out.sequences, use_cache=False).logits.float().log_softmax(-1)[:, 5:-1]
    sums = log_probs.gather(-1, out.sequences[:, 6:, None]).squeeze(-1).sum(-1)
    torch.testing.assert_close(out.sequences_scores, sums, atol=1e-4, rtol=1e-4)
    greedy = argmax_loop(model, prompt, 8)
    with torch.no_grad():
        greedy_log_probs = model(greedy).logits.float().log_softmax(-1)[:, 5:-1]
    assert sums[0] >= greedy_log_probs.gather(-1, greedy[:, 6:, None]).sum() - 1e-4


@pytest.mark.parametrize("layout", ["i3", "all-recurrent open-i3"])
def test_repetition_penalty_is_the_manual_loop(layout):
    """`repetition_penalty=1.5` gives the tokens of an argmax loop that applies the penalty by hand."""
    model = layout_model(layout, seed=4)
    prompt = random_ids(2, 6, seed=4)
    generated = model.generate(prompt, max_new_tokens=16, repetition_penalty=1.5, **GREEDY)
    assert torch.equal(generated, argmax_loop(model, prompt, 16, penalty=1.5))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_left_padded_batch_generates_as_each_prompt_alone(layout):
    """Prompts of lengths 3, 8 and 12, left-padded into one batch, generate exactly what each does alone."""
    model = layout_model(layout, seed=1)
    prompts = [random_ids(1, length, seed=length)[0] for length in (3, 8, 12)]
    width = max(len(p) for p in prompts)
    batch = torch.stack([torch.cat([torch.full((width - len(p),), 1), p]) for p in prompts])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    batched = model.generate(batch, attention_mask=mask, max_new_tokens=16, **GREEDY)
    for row, prompt in enumerate(prompts):
        assert torch.equal(batched[row, width:], argmax_loop(model, prompt[None], 16)[0, len(prompt):]), row


@pytest.mark.parametrize("layout", ["i3", "all-recurrent i3"])
def test_chunked_prefill_and_continuing_from_the_returned_cache(layout):
    """`prefill_chunk_size=4` over a 13-token prompt, and 4 + 4 tokens continued from a returned cache, both give the
    argmax loop's tokens."""
    model = layout_model(layout)
    prompt = random_ids(2, 13)
    reference = argmax_loop(model, prompt, 8)
    assert torch.equal(model.generate(prompt, max_new_tokens=8, prefill_chunk_size=4, **GREEDY), reference)
    first = model.generate(prompt, max_new_tokens=4, return_dict_in_generate=True, **GREEDY)
    cache = first.cache
    continued = model.generate(first.sequences, max_new_tokens=4, cache=cache, **GREEDY)
    assert torch.equal(continued, reference)


def test_static_cache_and_embeddings_prompts():
    """The static cache (compile-friendly) and an `inputs_embeds` prompt give the argmax loop's tokens."""
    model = layout_model("i3")
    prompt = random_ids(2, 7)
    reference = argmax_loop(model, prompt, 6)
    assert torch.equal(model.generate(prompt, max_new_tokens=6, cache_implementation="static", **GREEDY), reference)
    embeds = model.get_input_embeddings()(prompt)
    assert torch.equal(model.generate(inputs_embeds=embeds, max_new_tokens=6, **GREEDY), reference[:, 7:])


def counting_backend(graphs: list):
    """A torch.compile backend that runs each graph as it is and keeps it, so a test can count compilations."""
    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward
    return backend


@pytest.mark.parametrize("layout", LAYOUTS)
def test_compiled_decoding_with_a_static_cache_is_greedy_and_never_recompiles(layout):
    """`torch.compile(model.forward, fullgraph=True)` with `cache_implementation="static"`, as transformers' docs do it
    for Llama, gives the argmax loop's tokens with one graph for the prefill and one for every decoding step; a
    second `generate` of the same batch and length compiles nothing: the recurrent states and the token count are
    buffers updated in place."""
    model = layout_model(layout)
    prompt = random_ids(2, 7)
    reference = argmax_loop(model, prompt, 8)
    graphs = []
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend=counting_backend(graphs), fullgraph=True)
    assert torch.equal(model.generate(prompt, max_new_tokens=8, cache_implementation="static", **GREEDY), reference)
    assert len(graphs) == 2
    assert torch.equal(model.generate(prompt, max_new_tokens=8, cache_implementation="static", **GREEDY), reference)
    assert len(graphs) == 2


@pytest.mark.parametrize("layout", ["i3", "all-recurrent open-i3"])
def test_transformers_automatic_compiled_decoding_is_greedy(layout):
    """`generate` compiles the decoding step itself when given a `compile_config` and a static cache (on a CPU only
    when told to, as transformers' own tests do): the argmax loop's tokens, with one compiled graph."""
    from transformers import CompileConfig

    model = layout_model(layout)
    prompt = random_ids(2, 7)
    reference = argmax_loop(model, prompt, 8)
    graphs = []
    compile_config = CompileConfig(fullgraph=True, backend=counting_backend(graphs), mode=None)
    compile_config._compile_all_devices = True
    torch._dynamo.reset()
    out = model.generate(prompt, max_new_tokens=8, cache_implementation="static", compile_config=compile_config,
                         **GREEDY)
    assert torch.equal(out, reference)
    assert len(graphs) == 1


@pytest.mark.parametrize("layout", ["i3", "rwkv4"])
def test_compiled_forward_equals_eager(layout):
    """`torch.compile` of the model gives the eager logits, padded batch included."""
    model = layout_model(layout)
    ids = random_ids(2, 11)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        eager = model(ids, attention_mask=mask).logits
        compiled = torch.compile(model, backend="aot_eager")(ids, attention_mask=mask).logits
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


# --- padding anywhere in a sequence ---


def recurrent_states(model, cache):
    """Every recurrent and conv state of the recurrent layers, in order."""
    states = []
    for layer_idx, layer_type in enumerate(model.config.layer_types):
        if layer_type == "linear_attention":
            layer_states = cache.recurrent_states(layer_idx).states
            states += [layer_states[name] for name in sorted(layer_states)]
    return states


def test_padding_anywhere_leaves_every_i3_state_as_it_was():
    """Pads inside a prompt, at its end, and inside a continuation: the i3 mixer's SSM, conv and token-shift states
    and the next logits equal those of the real tokens alone."""
    model = layout_model("all-recurrent i3")
    real = random_ids(1, 8)
    is_real = torch.tensor([[1, 1, 0, 0, 1, 1, 1, 0, 1, 1, 1, 0, 0]])  # 8 real steps and 5 padded ones
    padded = torch.ones_like(is_real)
    padded[is_real.bool()] = real[0]
    positions = (is_real.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        alone = model(real[:, :4], use_cache=True)
        alone = model(real[:, 4:], cache=alone.cache)
        first = model(padded[:, :6], attention_mask=is_real[:, :6], position_ids=positions[:, :6], use_cache=True)
        batched = model(padded[:, 6:], attention_mask=is_real, position_ids=positions[:, 6:],
                        cache=first.cache)
    for state, reference in zip(recurrent_states(model, batched.cache),
                                recurrent_states(model, alone.cache), strict=True):
        torch.testing.assert_close(state, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched.logits[0, 4], alone.logits[0, -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mixer", ["open-i3", "rwkv4"])
def test_published_mixers_refuse_padding_that_would_change_their_state(mixer):
    """The published scans decay at every step: right padding with a cache, and padding in a continuation, are refused
    with an error naming the mixer; right padding without a cache only pads."""
    model = layout_model(mixer)
    ids = random_ids(1, 6)
    right = torch.tensor([[1, 1, 1, 1, 0, 0]])
    with pytest.raises(ValueError, match=f"`{mixer}`.*left"):
        model(ids, attention_mask=right, use_cache=True)
    cache = model(ids, use_cache=True).cache
    with pytest.raises(ValueError, match=f"`{mixer}`"):
        model(ids, attention_mask=torch.cat([torch.tensor([[0, 0, 0, 0, 0, 0]]), right], 1), cache=cache)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=right, use_cache=False).logits[:, :4],
                                   model(ids[:, :4], use_cache=False).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mixer", ["i3", "open-i3", "rwkv4"])
def test_recurrent_masking_is_nan_safe(mixer):
    """A NaN in the embeddings of a padded step reaches no real token through the recurrent layers (padding is
    selected away, not multiplied by zero)."""
    model = tiny_model(recurrent_mixer=mixer, layer_types=["linear_attention"] * 2, position_embedding_type="learned")
    ids = random_ids(1, 8)
    embeds = model.get_input_embeddings()(ids).detach()
    embeds[0, :3] = float("nan")
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        padded = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False)
        padded = padded.logits[:, 3:]
        alone = model(ids[:, 3:], use_cache=False).logits
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)


# --- clients that take a tokenizer: pipeline, streamer, TRL, lm-evaluation-harness ---


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny i3 with the repo's tokenizer (Austen chunk vocabulary), saved as a Hub-ready folder."""
    tokenizer = AutoTokenizer.from_pretrained(REPO_ROOT, trust_remote_code=True)
    model = tiny_model(seed=6, vocab_size=len(tokenizer))
    folder = tmp_path_factory.mktemp("chat_model")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_pipeline_text_and_chat_are_the_argmax_loop(chat_model):
    """The text-generation pipeline, given text or chat messages, returns the argmax loop's continuation, decoded."""
    generator = pipeline("text-generation", model=str(chat_model), trust_remote_code=True)
    model, tokenizer = generator.model, generator.tokenizer
    prompt = "It is a truth universally acknowledged"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    expected = tokenizer.decode(argmax_loop(model, ids, 10)[0, ids.shape[1]:])
    text = generator(prompt, max_new_tokens=10, do_sample=False)[0]["generated_text"]
    assert text == prompt + expected

    messages = [{"role": "user", "content": "How are you?"}]
    chat_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                             return_dict=True)["input_ids"]
    reply = generator(messages, max_new_tokens=10, do_sample=False)[0]["generated_text"][-1]
    assert reply["role"] == "assistant"
    expected_ids = argmax_loop(model, chat_ids, 10)[0, chat_ids.shape[1]:]
    stop = (expected_ids == tokenizer.eos_token_id).nonzero()
    expected_ids = expected_ids[: stop[0, 0]] if len(stop) else expected_ids
    assert reply["content"] == tokenizer.decode(expected_ids, skip_special_tokens=True)


def test_text_streamer_prints_the_generated_text(chat_model, capsys):
    """`TextStreamer` prints exactly the decoded new tokens of the generation it follows."""
    model = AutoModelForCausalLM.from_pretrained(chat_model, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(chat_model, trust_remote_code=True)
    ids = tokenizer("Emma Woodhouse, handsome, clever", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=12, streamer=TextStreamer(tokenizer, skip_prompt=True), **GREEDY)
    assert capsys.readouterr().out == tokenizer.decode(generated[0, ids.shape[1]:]) + "\n"


def test_tokenizer_pads_on_the_left_and_batches_generate_as_alone(chat_model):
    """The saved tokenizer pads on the left by default, so a batch of prompts generates what each does alone."""
    model = AutoModelForCausalLM.from_pretrained(chat_model, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(chat_model, trust_remote_code=True)
    assert tokenizer.padding_side == "left"
    prompts = ["Mr. Darcy", "She was the youngest of the two daughters"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    generated = model.generate(**batch, max_new_tokens=8, **GREEDY)
    for row, prompt in enumerate(prompts):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        assert torch.equal(generated[row, batch.input_ids.shape[1]:], argmax_loop(model, ids, 8)[0, ids.shape[1]:])


def test_auto_model_loads_the_backbone(chat_model):
    """`AutoModel` (hidden states, embeddings) is in the saved auto_map and gives the causal LM's last hidden state."""
    assert json.loads((chat_model / "config.json").read_text())["auto_map"]["AutoModel"] == "modeling_i3.I3Model"
    backbone = AutoModel.from_pretrained(chat_model, trust_remote_code=True)
    lm = AutoModelForCausalLM.from_pretrained(chat_model, trust_remote_code=True)
    ids = random_ids(1, 9, vocab=500)
    with torch.no_grad():
        hidden = backbone(ids).last_hidden_state
        torch.testing.assert_close(lm.lm_head(hidden), lm(ids).logits)
    assert type(backbone).__name__ == "I3Model"
    assert json.loads((REPO_ROOT / "config.json").read_text())["auto_map"]["AutoModel"] == "modeling_i3.I3Model"


def test_trl_sft_trainer_fits_chat_messages(chat_model, tmp_path):
    """TRL's SFTTrainer trains i3 on a `messages` dataset through the chat template: 25 steps cut the loss by a fifth."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    model = AutoModelForCausalLM.from_pretrained(chat_model, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(chat_model, trust_remote_code=True)
    dialogue = [{"role": "user", "content": "Who is Emma?"}, {"role": "assistant", "content": "A young lady."}]
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=25, per_device_train_batch_size=4, learning_rate=3e-3,
                         logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"messages": [dialogue] * 16}),
                             processing_class=tokenizer)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < 0.8 * losses[0]


def test_lm_evaluation_harness_log_likelihoods_are_the_models(chat_model, tmp_path):
    """lm-evaluation-harness (`simple_evaluate`, a local multiple-choice task) scores each choice with the sum of the
    log-probabilities the model's own forward gives its continuation tokens."""
    pytest.importorskip("lm_eval")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    rows = [{"question": "Emma Woodhouse was", "choices": [" handsome", " a clergyman"], "answer": 0},
            {"question": "Mr. Knightley lived at", "choices": [" Donwell Abbey", " the seaside"], "answer": 0}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "austen_facts.yaml").write_text(
        "task: austen_facts\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'rows.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: answer\nmetric_list:\n  - metric: acc\n"
    )
    model = AutoModelForCausalLM.from_pretrained(chat_model, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(chat_model, trust_remote_code=True)
    results = simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1),
                              tasks=["austen_facts"], task_manager=TaskManager(include_path=str(tmp_path)),
                              log_samples=True)
    samples = results["samples"]["austen_facts"]
    assert len(samples) == 2
    for sample in samples:
        for (context_text, continuation_text), (log_likelihood, _) in zip(
            sample["arguments"], (resp[0] for resp in sample["resps"]), strict=True
        ):
            # the harness's split: the context encoded alone, the continuation as the rest of the whole encoding
            context = tokenizer(context_text).input_ids
            continuation = tokenizer(context_text + continuation_text).input_ids[len(context):]
            with torch.no_grad():
                log_probs = model(torch.tensor([context + continuation])).logits[0].float().log_softmax(-1)
            expected = log_probs[len(context) - 1 : -1].gather(-1, torch.tensor(continuation)[:, None]).sum()
            assert log_likelihood == pytest.approx(expected.item(), abs=1e-4)


# --- packed documents (padding-free training) ---


@pytest.mark.parametrize("overrides", [dict(), dict(position_embedding_type="learned"),
                                       dict(layer_types=["linear_attention"] * 3)], ids=["rope", "learned", "recurrent"])
def test_packed_documents_equal_each_document_alone(overrides):
    """Three documents packed into one row by transformers' `DataCollatorWithFlattening` (position ids restart at each
    document) give each document's own logits and loss: neither attention nor any recurrent state leaks across."""
    from transformers import DataCollatorWithFlattening

    model = tiny_model(**overrides)
    documents = [random_ids(1, length, seed=length)[0].tolist() for length in (5, 11, 4)]
    batch = DataCollatorWithFlattening(return_tensors="pt")([{"input_ids": ids} for ids in documents])
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"])
        start, nll, count = 0, 0.0, 0
        for ids in documents:
            alone = model(torch.tensor([ids]), labels=torch.tensor([ids]))
            torch.testing.assert_close(packed.logits[0, start : start + len(ids)], alone.logits[0], atol=1e-5,
                                       rtol=1e-5)
            nll, count, start = nll + alone.loss * (len(ids) - 1), count + len(ids) - 1, start + len(ids)
    torch.testing.assert_close(packed.loss, nll / count, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mixer", ["open-i3", "rwkv4"])
def test_published_mixers_refuse_packed_documents(mixer):
    """The published mixers cannot drop their state inside a row, so packed position ids are refused by name."""
    model = layout_model(mixer)
    with pytest.raises(ValueError, match=f"`{mixer}`"):
        model(random_ids(1, 8), position_ids=torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]]))


def test_the_old_cache_name_warns_as_transformers_models_do(caplog):
    """Generating and calling forward with `cache` warn about nothing; the old name `past_key_values` still works
    (the same logits) and warns that it is deprecated, as transformers' own models do."""
    import warnings

    from transformers.utils import logging as transformers_logging

    model = layout_model("i3")
    ids, token = random_ids(1, 6), random_ids(1, 1, seed=1)
    transformers_logging.enable_propagation()
    try:
        with warnings.catch_warnings(), caplog.at_level("WARNING"):
            warnings.simplefilter("error")
            model.generate(ids, max_new_tokens=4, **GREEDY)
            expected = model(token, cache=model(ids, use_cache=True).cache).logits
    finally:
        transformers_logging.disable_propagation()
    assert not [record for record in caplog.records if "deprecat" in record.getMessage().lower()]
    with pytest.warns(FutureWarning, match="past_key_values.*deprecated.*Use `cache`"):
        old_name = model(token, past_key_values=model(ids, use_cache=True).cache).logits
    torch.testing.assert_close(old_name, expected)


# --- speculative decoding: rolling recurrent states back to the last accepted token ---


def draft_of(model, seed: int = 0):
    """A draft model for assisted generation: `model` with noise on its output layer, so that it proposes the main
    model's next token often but not always (both acceptance and rejection get exercised)."""
    draft = copy.deepcopy(model)
    with torch.no_grad():
        noise = torch.randn(draft.lm_head.weight.shape, generator=torch.Generator().manual_seed(seed))
        draft.lm_head.weight.add_(noise * draft.lm_head.weight.std())
    draft.generation_config.pad_token_id = None  # see SPECULATIVE_GREEDY
    return draft


def count_rollbacks(monkeypatch) -> list[int]:
    """The number of tokens each `I3Cache.crop` call removes, as generation runs."""
    removed = []
    crop = I3Cache.crop
    monkeypatch.setattr(I3Cache, "crop", lambda cache, tokens: (removed.append(-tokens), crop(cache, tokens))[1])
    return removed


@pytest.mark.parametrize("layout", LAYOUTS)
def test_assisted_generation_with_an_i3_draft_is_greedy_decoding(layout, monkeypatch):
    """`generate(assistant_model=draft)` gives exactly the argmax loop's tokens: the main model's (and the draft's)
    recurrent states roll back to the last accepted token whenever draft tokens are rejected."""
    model = layout_model(layout, seed=3)
    prompt = random_ids(1, 6, seed=3)
    removed = count_rollbacks(monkeypatch)
    out = model.generate(prompt, assistant_model=draft_of(model), max_new_tokens=24, **SPECULATIVE_GREEDY)
    assert torch.equal(out, argmax_loop(model, prompt, 24))
    assert any(tokens >= 1 for tokens in removed), "no draft token was ever rejected: the rollback went untested"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_prompt_lookup_decoding_is_greedy_decoding(layout, monkeypatch):
    """`prompt_lookup_num_tokens` (drafts copied from the prompt) gives exactly the argmax loop's tokens."""
    model = layout_model(layout, seed=5)
    prompt = random_ids(1, 5, seed=5).repeat(1, 3)  # repeats, so that lookups find candidates
    removed = count_rollbacks(monkeypatch)
    out = model.generate(prompt, prompt_lookup_num_tokens=3, max_new_tokens=16, **SPECULATIVE_GREEDY)
    assert torch.equal(out, argmax_loop(model, prompt, 16))
    assert any(tokens >= 2 for tokens in removed), "no rollback of several tokens happened"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_rolling_back_restores_the_states_of_the_shorter_sequence(layout):
    """A recording cache that saw 4 + 5 tokens and dropped the last 3 holds every state, and gives the next logits,
    of a cache that saw only the first 6 tokens."""
    model = layout_model(layout)
    ids = random_ids(2, 9)
    with torch.no_grad():
        expected = model(ids[:, :6], use_cache=True).cache
        cache = model(ids[:, :4], use_cache=True).cache
        cache.activate_past_recording()
        model(ids[:, 4:], cache=cache)
        cache.crop(-3)
        assert cache.get_seq_length() == 6
        for state, reference in zip(recurrent_states(model, cache), recurrent_states(model, expected), strict=True):
            torch.testing.assert_close(state, reference, atol=1e-5, rtol=1e-5)
        next_token = random_ids(2, 1, seed=1)
        torch.testing.assert_close(model(next_token, cache=cache).logits, model(next_token, cache=expected).logits,
                                   atol=1e-5, rtol=1e-5)


def test_rolling_back_without_recording_is_refused():
    """Removing tokens from a cache that recorded nothing stops at once, saying what to call first."""
    model = layout_model("i3")
    cache = model(random_ids(1, 5), use_cache=True).cache
    with pytest.raises(ValueError, match="activate_past_recording"):
        cache.crop(-2)
