"""`vllm.LLM` with the i3 plugin against i3's own `generate`: every mixer, RoPE and learned positions, prompts of 1 to
300 tokens submitted together, prefix caching on and off, logprobs and seeded sampling.

One engine per model folder serves all of its checks (module-scoped fixture), so the suite starts few engines."""

import gc

import pytest

from conftest import make_engine

VARIANTS = ["i3-rope", "i3-learned", "open-i3-rope", "open-i3-learned", "rwkv4-rope", "rwkv4-learned"]
NEW_TOKENS = 12  # as make_references.py


def greedy(logprobs: bool = False):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, logprobs=0 if logprobs else None)


def token_prompts(references: list[dict]) -> list[dict]:
    return [{"prompt_token_ids": reference["prompt"]} for reference in references]


@pytest.fixture(scope="module", params=VARIANTS)
def served(request, references):
    """(engine with prefix caching on, the variant's references); the engine is shut down before the next one."""
    folder, all_references = references
    engine = make_engine(folder / request.param)
    yield engine, all_references[request.param]
    del engine
    gc.collect()


@pytest.fixture(scope="module")
def batch_outputs(served):
    """The 16 prompts (1 to 300 tokens) submitted together, greedy, with the chosen tokens' logprobs."""
    engine, references = served
    return engine.generate(token_prompts(references["prompts"]), greedy(logprobs=True), use_tqdm=False)


def test_batch_of_16_prompts_gives_each_its_solo_greedy_tokens(served, batch_outputs):
    """16 prompts of 1 to 300 tokens submitted together (continuous batching, prefills chunked into 128-token steps
    that share steps with decodes, one state slot each) give the greedy tokens of i3's `generate` on each alone."""
    _, references = served
    for reference, output in zip(references["prompts"], batch_outputs):
        assert list(output.outputs[0].token_ids) == reference["tokens"], f"prompt of {len(reference['prompt'])}"


def test_greedy_logprobs_match_i3_log_softmax(served, batch_outputs):
    """The logprob vLLM reports for each greedy token equals i3's log-softmax of its logits within 1e-3."""
    _, references = served
    for reference, output in zip(references["prompts"], batch_outputs):
        completion = output.outputs[0]
        reported = [step[token].logprob for step, token in zip(completion.logprobs, completion.token_ids)]
        assert reported == pytest.approx(reference["logprobs"], abs=1e-3), f"prompt of {len(reference['prompt'])}"


def test_prefix_cache_hits_keep_the_tokens(served):
    """Prompts that share 280 tokens, sent after the first has run, reuse its cached blocks (attention KV and the
    recurrent states vLLM saved at block boundaries) and still give i3's tokens."""
    engine, references = served
    first, *others = references["shared_prefix"]
    engine.generate(token_prompts([first]), greedy(), use_tqdm=False)
    outputs = engine.generate(token_prompts(others), greedy(), use_tqdm=False)
    assert all(output.num_cached_tokens > 0 for output in outputs), "the shared prefix was not served from the cache"
    for reference, output in zip(others, outputs):
        assert list(output.outputs[0].token_ids) == reference["tokens"]


def test_seeded_sampling_repeats_and_differs_by_seed(served):
    """Sampling with a per-request seed runs, repeats itself for the same seed, and changes with the seed."""
    from vllm import SamplingParams

    engine, references = served
    prompts = token_prompts(references["prompts"][:4])

    def sample(seed):
        params = SamplingParams(max_tokens=NEW_TOKENS, temperature=1.0, top_p=0.95, seed=seed, ignore_eos=True)
        return [list(output.outputs[0].token_ids) for output in engine.generate(prompts, params, use_tqdm=False)]

    first = sample(1234)
    assert sample(1234) == first
    assert sample(4321) != first
    assert all(len(tokens) == NEW_TOKENS for tokens in first)


@pytest.mark.parametrize("variant", ["i3-rope", "open-i3-learned", "rwkv4-rope"])
def test_prefix_caching_off_gives_the_same_tokens(references, variant):
    """With prefix caching off (no block-boundary state copies) the batch gives the same tokens as with it on, which
    the tests above compare with i3's `generate`."""
    folder, all_references = references
    engine = make_engine(folder / variant, enable_prefix_caching=False)
    try:
        for group in ("prompts", "shared_prefix"):
            expected = all_references[variant][group]
            outputs = engine.generate(token_prompts(expected), greedy(), use_tqdm=False)
            assert [list(output.outputs[0].token_ids) for output in outputs] == [r["tokens"] for r in expected]
    finally:
        del engine
        gc.collect()
