"""Plain per-step loops typed straight from SPEC.md, the independent references for every scan and mixer.

Nothing here imports the model code: a reference built from the model's own step function would share its bugs.
"""

import torch


def i3_ssm_loop(u, dt, A_log, B, C, D, initial_state=None):
    """SPEC 2.1 step 4, one step at a time.

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
