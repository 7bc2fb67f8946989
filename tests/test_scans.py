"""Every chunked scan and its single-step twin against the plain loops of `reference.py`."""

import pytest
import torch

from i3.modeling_i3 import (
    i3_scan_chunked,
    i3_scan_step,
    lti_scan_chunked,
    lti_scan_step,
    wkv4_scan_chunked,
    wkv4_scan_step,
)

from reference import i3_ssm_loop, open_i3_loop, wkv4_loop

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


def assert_outputs_and_grads_close(actual, expected, inputs, atol=1e-5):
    """The one check of every scan: each output (and final state) of `actual` equals `expected`'s, and so do the
    gradients of a fixed weighting of them with respect to every input."""
    for got, want in zip(actual, expected, strict=True):
        torch.testing.assert_close(got, want, atol=atol, rtol=atol)
    leaves = [value for value in inputs.values() if value is not None and value.requires_grad]

    def grads(outputs):
        loss = sum((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum() for out in outputs)
        return torch.autograd.grad(loss, leaves)

    for got, want in zip(grads(actual), grads(expected), strict=True):
        torch.testing.assert_close(got, want, atol=atol, rtol=atol)


def test_i3_chunked_long_sequence_is_stable():
    """Strong decays over 300 steps (many chunks) stay finite and match the loop: no overflow in exp(cumsum)."""
    inputs = i3_inputs(300, True, seed=2)
    with torch.no_grad():
        inputs["dt"].mul_(20)
    assert_outputs_and_grads_close(run_chunked(inputs, 64), i3_ssm_loop(**inputs), inputs, atol=1e-4)


def open_i3_inputs(seq_len, with_state, seed=0, batch=2, width=6, state=4):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).requires_grad_()

    # w_mix outside (0, 1) and A with spectral radius near 1: the published weights are unconstrained
    return dict(
        x=randn(batch, seq_len, width),
        w_mix=randn(width, scale=0.7),
        A=randn(state, state, scale=0.45),
        B=randn(state, width),
        C=randn(width, state),
        D=randn(width),
        initial_average=randn(batch, width) if with_state else None,
        initial_state=randn(batch, state) if with_state else None,
    )


def open_i3_chunked(inputs, chunk_size):
    x, w_mix = inputs["x"], inputs["w_mix"]
    averages, average = lti_scan_chunked((1 - w_mix) * x, w_mix, chunk_size=chunk_size,
                                         initial_state=inputs["initial_average"])
    states, state = lti_scan_chunked(x @ inputs["B"].T, inputs["A"], chunk_size=chunk_size,
                                     initial_state=inputs["initial_state"])
    return states @ inputs["C"].T + inputs["D"] * averages, average, state


def open_i3_steps(inputs):
    x, w_mix = inputs["x"], inputs["w_mix"]
    average = inputs["initial_average"]
    state = inputs["initial_state"]
    average = x.new_zeros(x.shape[0], x.shape[2]) if average is None else average
    state = x.new_zeros(x.shape[0], inputs["A"].shape[0]) if state is None else state
    ys = []
    for t in range(x.shape[1]):
        xt = x[:, t : t + 1]
        h, average = lti_scan_step((1 - w_mix) * xt, w_mix, initial_state=average)
        s, state = lti_scan_step(xt @ inputs["B"].T, inputs["A"], initial_state=state)
        ys.append(s @ inputs["C"].T + inputs["D"] * h)
    return torch.cat(ys, dim=1), average, state


def wkv_inputs(seq_len, with_state, seed=0, batch=2, width=6):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=generator) * scale + shift).requires_grad_()

    state = None
    if with_state:
        state = torch.stack([torch.randn(batch, width, generator=generator),
                             torch.rand(batch, width, generator=generator) + 0.5,
                             torch.randn(batch, width, generator=generator) * 3], dim=1).requires_grad_()
    # large keys (up to ~20) exercise the max-shift that keeps exp from overflowing
    return dict(k=randn(batch, seq_len, width, scale=6.0), v=randn(batch, seq_len, width),
                time_decay=randn(width, scale=1.5, shift=-1.0), time_first=randn(width), initial_state=state)


def comparable_state(state):
    """(aa, bb, pp) is unique only up to the shared exponent: compare the log-sums it stands for, and aa/bb."""
    aa, bb, pp = state.unbind(1)
    return torch.log(bb) + pp, aa / bb


def wkv_chunked(inputs, chunk_size):
    wkv, state = wkv4_scan_chunked(**inputs, chunk_size=chunk_size)
    return wkv, *comparable_state(state)


def wkv_steps(inputs):
    state = inputs["initial_state"]
    if state is None:
        zeros = torch.zeros(inputs["k"].shape[0], inputs["k"].shape[2])
        state = torch.stack([zeros, zeros, zeros - 1e30], dim=1)
    outputs = []
    for t in range(inputs["k"].shape[1]):
        out, state = wkv4_scan_step(inputs["k"][:, t : t + 1], inputs["v"][:, t : t + 1], inputs["time_decay"],
                                    inputs["time_first"], initial_state=state)
        outputs.append(out)
    return torch.cat(outputs, 1), *comparable_state(state)


def wkv_loop(inputs):
    wkv, state = wkv4_loop(**inputs)
    return wkv, *comparable_state(state)


# scan -> (inputs, chunked evaluation, single-step evaluation, plain loop, tolerance)
SCANS = {
    "i3": (i3_inputs, run_chunked, run_steps, lambda inputs: i3_ssm_loop(**inputs), 1e-5),
    "open-i3": (open_i3_inputs, open_i3_chunked, open_i3_steps, lambda inputs: open_i3_loop(**inputs), 1e-5),
    # keys up to ~20 would overflow a naive exp in the WKV
    "rwkv4": (wkv_inputs, wkv_chunked, wkv_steps, wkv_loop, 1e-4),
}


@pytest.mark.parametrize("seq_len", LENGTHS)
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 4, 8])
@pytest.mark.parametrize("scan", SCANS)
def test_chunked_scan_matches_loop(scan, seq_len, with_state, chunk_size):
    """Each chunked scan gives its plain loop's outputs, final states and gradients, for any length, chunk size and
    initial state."""
    make_inputs, chunked, _, loop, atol = SCANS[scan]
    inputs = make_inputs(seq_len, with_state)
    assert_outputs_and_grads_close(chunked(inputs, chunk_size), loop(inputs), inputs, atol=atol)


@pytest.mark.parametrize("seq_len", LENGTHS)
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("scan", SCANS)
def test_single_steps_match_loop(scan, seq_len, with_state):
    """Decoding one step at a time from the state, as generation does, gives the loop's outputs, final states and
    gradients."""
    make_inputs, _, steps, loop, atol = SCANS[scan]
    inputs = make_inputs(seq_len, with_state, seed=1)
    assert_outputs_and_grads_close(steps(inputs), loop(inputs), inputs, atol=atol)
