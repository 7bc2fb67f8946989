"""Every chunked scan and its single-step twin against the plain loops of `reference.py`."""

import pytest
import torch
from reference import i3_ssm_loop

from i3.modeling_i3 import i3_scan_chunked, i3_scan_step

LENGTHS = [1, 3, 4, 5, 13]  # inside one chunk, exactly one chunk, a ragged tail, several chunks (chunk 4)


def i3_inputs(seq_len, with_state, seed=0, batch=2, heads=3, head_dim=5, state=4):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float32)

    inputs = dict(
        u=randn(batch, seq_len, heads, head_dim),
        dt=torch.nn.functional.softplus(randn(batch, seq_len, heads) - 1),
        A_log=torch.log(torch.rand(heads, generator=generator) * 15 + 1),
        B=randn(batch, seq_len, state),
        C=randn(batch, seq_len, state),
        D=randn(heads),
        initial_state=randn(batch, heads, head_dim, state) if with_state else None,
    )
    return {name: value.requires_grad_() if value is not None else None for name, value in inputs.items()}


def run_chunked(inputs, chunk_size):
    log_a = -torch.exp(inputs["A_log"]) * inputs["dt"]
    return i3_scan_chunked(
        inputs["u"], inputs["dt"], log_a, inputs["B"], inputs["C"], inputs["D"],
        chunk_size=chunk_size, initial_state=inputs["initial_state"],
    )


def run_steps(inputs):
    """Feed the sequence one step at a time through the decoding path, as generation does."""
    u = inputs["u"]
    state = inputs["initial_state"]
    if state is None:
        state = u.new_zeros(u.shape[0], u.shape[2], u.shape[3], inputs["B"].shape[-1])
    log_a = -torch.exp(inputs["A_log"]) * inputs["dt"]
    ys = []
    for t in range(u.shape[1]):
        step = slice(t, t + 1)
        y, state = i3_scan_step(
            u[:, step], inputs["dt"][:, step], log_a[:, step], inputs["B"][:, step], inputs["C"][:, step],
            inputs["D"], initial_state=state,
        )
        ys.append(y)
    return torch.cat(ys, dim=1), state


def grads(outputs, inputs):
    y, state = outputs
    loss = (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum() + (state.sin()).sum()
    leaves = [value for value in inputs.values() if value is not None]
    return torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("seq_len", LENGTHS)
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 4, 8])
def test_i3_chunked_matches_loop(seq_len, with_state, chunk_size):
    """The chunked i3 scan gives the loop's outputs, final state and gradients, for any length and chunk size."""
    inputs = i3_inputs(seq_len, with_state)
    expected = i3_ssm_loop(**inputs)
    actual = run_chunked(inputs, chunk_size)
    torch.testing.assert_close(actual[0], expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(actual[1], expected[1], atol=1e-5, rtol=1e-5)
    for got, want in zip(grads(actual, inputs), grads(expected, inputs)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seq_len", LENGTHS)
@pytest.mark.parametrize("with_state", [False, True])
def test_i3_step_matches_loop(seq_len, with_state):
    """Decoding one step at a time from the state gives the loop's outputs, final state and gradients."""
    inputs = i3_inputs(seq_len, with_state, seed=1)
    expected = i3_ssm_loop(**inputs)
    actual = run_steps(inputs)
    torch.testing.assert_close(actual[0], expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(actual[1], expected[1], atol=1e-5, rtol=1e-5)
    for got, want in zip(grads(actual, inputs), grads(expected, inputs)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_i3_chunked_long_sequence_is_stable():
    """Strong decays over 300 steps (many chunks) stay finite and match the loop: no overflow in exp(cumsum)."""
    inputs = i3_inputs(300, True, seed=2)
    with torch.no_grad():
        inputs["dt"].mul_(20)
    expected = i3_ssm_loop(**inputs)
    actual = run_chunked(inputs, 64)
    torch.testing.assert_close(actual[0], expected[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(actual[1], expected[1], atol=1e-4, rtol=1e-4)
