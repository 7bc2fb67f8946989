"""Plain per-step loops typed straight from docs/design.md, the independent references for every scan and mixer.

Nothing here imports the model code: a reference built from the model's own step function would share its bugs.
"""

import torch


def i3_ssm_loop(u, dt, A_log, B, C, D, initial_state=None):
    """docs/design.md#the-i3-mixer step 4, one step at a time.

    u: (b, t, h, p); dt: (b, t, h) after softplus; B, C: (b, t, n); D, A_log: (h).
    Returns y (b, t, h, p) and the final state S (b, h, p, n).
    """
    batch, seq_len, num_heads, head_dim = u.shape
    S = torch.zeros(batch, num_heads, head_dim, B.shape[-1], dtype=u.dtype) if initial_state is None else initial_state
    ys = []
    for t in range(seq_len):
        a = torch.exp(-torch.exp(A_log) * dt[:, t])  # (b, h)
        S = a[:, :, None, None] * S + dt[:, t, :, None, None] * u[:, t, :, :, None] * B[:, t, None, None, :]
        ys.append((S * C[:, t, None, None, :]).sum(-1) + D[:, None] * u[:, t])
    return torch.stack(ys, dim=1), S


def open_i3_loop(x, w_mix, A, B, C, D, initial_average=None, initial_state=None):
    """docs/design.md#the-open-i3-mixer, one step at a time. x: (b, t, d). Returns y (b, t, d), the final h (b, d)
    and s (b, n)."""
    h = torch.zeros_like(x[:, 0]) if initial_average is None else initial_average
    s = torch.zeros(x.shape[0], A.shape[0], dtype=x.dtype) if initial_state is None else initial_state
    ys = []
    for t in range(x.shape[1]):
        h = w_mix * h + (1 - w_mix) * x[:, t]
        s = s @ A.T + x[:, t] @ B.T
        ys.append(s @ C.T + D * h)
    return torch.stack(ys, dim=1), h, s


def wkv4_loop(k, v, time_decay, time_first, initial_state=None):
    """The numerically stable WKV (docs/design.md#the-rwkv4-mixer), one step at a time. k, v: (b, t, d); state
    (b, 3, d) = (aa, bb, pp)."""
    w, u = -torch.exp(time_decay), time_first
    if initial_state is None:
        aa, bb, pp = torch.zeros_like(k[:, 0]), torch.zeros_like(k[:, 0]), torch.full_like(k[:, 0], -1e30)
    else:
        aa, bb, pp = initial_state.unbind(1)
    outputs = []
    for t in range(k.shape[1]):
        kt, vt = k[:, t], v[:, t]
        q = torch.maximum(u + pp, kt)
        e1, e2 = torch.exp(u + pp - q), torch.exp(kt - q)
        outputs.append((aa * e1 + vt * e2) / (bb * e1 + e2 + 1e-8))
        q = torch.maximum(w + pp, kt)
        e1, e2 = torch.exp(w + pp - q), torch.exp(kt - q)
        aa, bb, pp = aa * e1 + vt * e2, bb * e1 + e2, q
    return torch.stack(outputs, dim=1), torch.stack([aa, bb, pp], dim=1)
