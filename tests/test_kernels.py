"""The optional CUDA kernels (flash-linear-attention's chunk_simple_gla, causal-conv1d): the dispatch, and the i3 model
through them equal to the pure-torch path.

On a CPU the kernels cannot run, so stand-ins with each library's own conventions (written as plain loops from their
documented math) are installed under the libraries' module names and allowed on the CPU: what is tested is everything
i3 does around a kernel (layouts, the shared B and C, the transposed state, the conv's own padding, the fallbacks)."""

import sys
import types

import pytest
import torch

import i3.modeling_i3 as modeling

from conftest import tiny_model, with_live_states


def simple_gla_loop(q, k, v, g, scale=None, initial_state=None, output_final_state=False, **unused):
    """flash-linear-attention's documented recurrence, per head: S_t = exp(g_t) S_{t-1} + k_t^T v_t with S: (K, V),
    o_t = scale q_t S_t; inputs (B, T, H, K or V), g (B, T, H)."""
    batch, seq_len, heads, key_size = q.shape
    state = q.new_zeros(batch, heads, key_size, v.shape[-1]) if initial_state is None else initial_state
    outputs = []
    for t in range(seq_len):
        state = g[:, t, :, None, None].exp() * state + k[:, t, :, :, None] * v[:, t, :, None, :]
        outputs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], state))
    return torch.stack(outputs, dim=1), state if output_final_state else None


def causal_conv1d_loop(x, weight, bias=None, activation=None, **unused):
    """causal-conv1d's documented contract: x (B, D, T), weight (D, W), K - 1 zeros padded on the left, same length."""
    width = weight.shape[-1]
    padded = torch.nn.functional.pad(x, (width - 1, 0))
    out = sum(padded[..., k : k + x.shape[-1]] * weight[:, k, None] for k in range(width))
    return out + bias[:, None] if bias is not None else out


@pytest.fixture
def stand_ins(monkeypatch):
    """Install counting stand-ins under the kernels' module names; returns the call counts."""
    calls = {"ssm": 0, "conv": 0}

    def counted(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return wrapper

    simple_gla = types.ModuleType("fla.ops.simple_gla")
    simple_gla.chunk_simple_gla = counted("ssm", simple_gla_loop)
    conv = types.ModuleType("causal_conv1d")
    conv.causal_conv1d_fn = counted("conv", causal_conv1d_loop)
    for name, module in {"fla": types.ModuleType("fla"), "fla.ops": types.ModuleType("fla.ops"),
                         "fla.ops.simple_gla": simple_gla, "causal_conv1d": conv}.items():
        monkeypatch.setitem(sys.modules, name, module)
    modeling.import_optional.cache_clear()
    yield calls
    modeling.import_optional.cache_clear()


def forward_and_decode(model, ids, attention_mask=None):
    """Logits of a prefill with a cache, of three decoded steps after it, and the gradients of a training loss."""
    model.zero_grad()
    model.train()
    model(ids, labels=ids, attention_mask=attention_mask).loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.eval()
    with torch.no_grad():
        out = model(ids, attention_mask=attention_mask, use_cache=True)
        cache, logits = out.cache, [out.logits]
        mask = attention_mask
        for step in range(3):
            token = logits[-1][:, -1:].argmax(-1)
            mask = None if mask is None else torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            logits.append(model(token, attention_mask=mask, use_cache=True, cache=cache).logits)
    return torch.cat(logits, dim=1), grads


@pytest.mark.parametrize("padded", [False, True])
def test_model_through_the_kernels_equals_the_pure_path(stand_ins, monkeypatch, padded):
    model = with_live_states(tiny_model(conv_kernel=3))
    ids = torch.randint(4, 99, (2, 11), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[0, 0, 0] + [1] * 8, [1] * 11]) if padded else None
    expected_logits, expected_grads = forward_and_decode(model, ids, mask)
    assert stand_ins == {"ssm": 0, "conv": 0}, "the kernels ran on the CPU without being allowed there"

    monkeypatch.setattr(modeling, "KERNEL_DEVICES", ("cpu",))
    logits, grads = forward_and_decode(model, ids, mask)
    assert stand_ins["ssm"] > 0 and stand_ins["conv"] > 0
    torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=1e-4)
    assert grads.keys() == expected_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], expected_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_packed_documents_keep_the_pure_scan(stand_ins, monkeypatch):
    """A document start's log-decay (LOG_DECAY_AT_DOCUMENT_START) needs the exact per-segment sums of the pure scan,
    so packed rows skip the SSM kernel (the conv's windows are cut by the pure path too)."""
    monkeypatch.setattr(modeling, "KERNEL_DEVICES", ("cpu",))
    model = tiny_model()
    ids = torch.randint(4, 99, (1, 10), generator=torch.Generator().manual_seed(1))
    model(ids, position_ids=torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]]))
    assert stand_ins == {"ssm": 0, "conv": 0}


def test_a_missing_kernel_falls_back_to_pure_torch(monkeypatch):
    monkeypatch.setattr(modeling, "KERNEL_DEVICES", ("cpu",))
    for name in ("fla", "fla.ops", "fla.ops.simple_gla", "causal_conv1d"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    modeling.import_optional.cache_clear()
    try:
        model = tiny_model()
        ids = torch.randint(4, 99, (1, 9), generator=torch.Generator().manual_seed(2))
        logits = model(ids).logits
        monkeypatch.setattr(modeling, "KERNEL_DEVICES", ())
        torch.testing.assert_close(logits, model(ids).logits)
    finally:
        modeling.import_optional.cache_clear()


@pytest.mark.skipif(not torch.cuda.is_available() or modeling.import_optional(*modeling.SSM_KERNEL) is None,
                    reason="needs CUDA and flash-linear-attention")
def test_real_ssm_kernel_matches_the_chunked_scan():
    generator = torch.Generator(device="cuda").manual_seed(0)
    b, t, h, p, n = 2, 300, 4, 16, 8
    u = torch.randn(b, t, h, p, device="cuda", generator=generator)
    dt = torch.rand(b, t, h, device="cuda", generator=generator) * 0.1
    log_a, B, C = -dt, torch.randn(b, t, n, device="cuda", generator=generator), torch.randn(b, t, n, device="cuda")
    D, state = torch.randn(h, device="cuda"), torch.randn(b, h, p, n, device="cuda")
    kernel = modeling.import_optional(*modeling.SSM_KERNEL)
    y, final = modeling.i3_scan_kernel(kernel, u, dt, log_a, B, C, D, initial_state=state)
    y_ref, final_ref = modeling.i3_scan_chunked(u, dt, log_a, B, C, D, chunk_size=32, initial_state=state)
    torch.testing.assert_close(y, y_ref, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(final, final_ref, atol=2e-3, rtol=2e-3)
