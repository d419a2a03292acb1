"""The prediction parameterisations of the objective: x (JiT), eps and v, each turned into a velocity."""

from __future__ import annotations

import math

import pytest
import torch

from jit_fast.model.denoiser import eps_to_v, flow_matching_loss, to_velocity, x_to_v


def test_to_velocity_by_hand() -> None:
    z = torch.tensor([[0.5, -1.0], [2.0, 0.25]], dtype=torch.float64)
    out = torch.tensor([[1.5, 0.5], [-1.0, 0.75]], dtype=torch.float64)
    t = torch.tensor([[0.01], [0.99]], dtype=torch.float64)  # row 0: the t clamp (eps), row 1: the 1-t clamp (x)
    want = {
        # x: (x_pred - z) / max(1 - t, 0.05)
        "x": [[(1.5 - 0.5) / 0.99, (0.5 + 1.0) / 0.99], [(-1.0 - 2.0) / 0.05, (0.75 - 0.25) / 0.05]],
        # eps: (z - eps_pred) / max(t, 0.05)
        "eps": [[(0.5 - 1.5) / 0.05, (-1.0 - 0.5) / 0.05], [(2.0 + 1.0) / 0.99, (0.25 - 0.75) / 0.99]],
        # v: the output itself
        "v": [[1.5, 0.5], [-1.0, 0.75]],
    }
    for prediction, rows in want.items():
        got = to_velocity(out, z, t, 0.05, prediction)
        torch.testing.assert_close(got, torch.tensor(rows, dtype=torch.float64), rtol=1e-12, atol=0)
    assert torch.equal(to_velocity(out, z, t, 0.05), x_to_v(out, z, t, 0.05))  # x is the default
    assert torch.equal(to_velocity(out, z, t, 0.05, "eps"), eps_to_v(out, z, t, 0.05))
    with pytest.raises(ValueError, match="unknown prediction 'noise'"):
        to_velocity(out, z, t, 0.05, "noise")  # type: ignore[arg-type]


def _draws(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, 4, 4, generator=g)
    noise = torch.randn(x.shape, generator=g)
    t = torch.rand(4, generator=g) * 0.9 + 0.05
    t[0] = 0.97  # 1 - t clamped
    drop = torch.tensor([True, False, False, True])
    y = torch.tensor([1, 2, 0, 4])
    net = torch.nn.Conv2d(3, 3, 1)
    return net, x, y, t, noise, drop


def test_x_prediction_is_the_old_objective_bitwise() -> None:
    """The JiT path (default and explicit "x") computes exactly what the x-only objective computed."""
    net, x, y, t, noise, drop = _draws()
    kw = dict(t=t, noise=noise, drop=drop, noise_scale=2.0, t_eps=0.05, num_classes=5)

    # the x-only objective as it stood before `prediction` was added
    tb = t.view(-1, 1, 1, 1)
    z = tb * x + (1 - tb) * (noise * 2.0)
    v = x_to_v(x, z, tb, 0.05)
    old = ((v - x_to_v(net(z), z, tb, 0.05)) ** 2).mean(dim=(1, 2, 3)).mean()
    old.backward()
    old_grads = [p.grad.clone() for p in net.parameters()]
    for extra in ({}, {"prediction": "x"}):
        net.zero_grad()
        loss = flow_matching_loss(lambda zz, tt, yy: net(zz), x, y, **kw, **extra)
        assert torch.equal(loss, old)
        loss.backward()
        for p, g in zip(net.parameters(), old_grads, strict=True):
            assert torch.equal(p.grad, g)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_flow_matching_loss_other_predictions_by_hand(prediction: str) -> None:
    """The v-loss of an eps- or v-predicting net, element by element (the paper's Tab. 1, row 3)."""
    x = torch.tensor([[0.5, -1.0], [0.75, 0.0], [0.1, 0.2]], dtype=torch.float64)
    e = torch.tensor([[1.0, -0.5], [-1.5, 0.25], [0.3, -0.7]], dtype=torch.float64)
    t = torch.tensor([0.3, 0.99, 0.02], dtype=torch.float64)  # 0.99: 1-t clamp in the target; 0.02: t clamp (eps)

    def net(z: torch.Tensor, tt: torch.Tensor, yy: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z) * tt.view(-1, 1) + 0.25

    y = torch.zeros(3, dtype=torch.long)
    loss = flow_matching_loss(net, x, y, t=t, noise=e, drop=torch.zeros(3, dtype=torch.bool), t_eps=0.05,
                              num_classes=1, prediction=prediction)
    total = 0.0
    for i in range(3):
        ti = t[i].item()
        for c in range(2):
            xi, ei = x[i, c].item(), e[i, c].item()
            z = ti * xi + (1 - ti) * ei
            target = (xi - z) / max(1 - ti, 0.05)
            out = math.tanh(z) * ti + 0.25
            v_pred = (z - out) / max(ti, 0.05) if prediction == "eps" else out
            total += (target - v_pred) ** 2
    assert math.isclose(loss.item(), total / 6, rel_tol=1e-12)
