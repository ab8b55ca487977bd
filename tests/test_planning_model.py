"""The planner's networks: shapes, zero output at initialisation, clear shape errors, and
that they train (the gradient reaches every layer)."""

import pytest
import torch

from modalities.planning.model import InverseDynamics, TemporalUNet, ValueNet


@pytest.mark.parametrize("dim_mults,horizon", [((1, 2), 16), ((1, 2, 4), 32), ((1, 2, 4, 8), 64)])
def test_unet_keeps_shapes_and_starts_at_zero(dim_mults, horizon):
    torch.manual_seed(0)
    net = TemporalUNet(6, dim=8, dim_mults=dim_mults)
    x, t = torch.randn(3, 6, horizon), torch.tensor([0.0, 5.5, 63.0])
    out = net(x, t)
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0  # zero_init_output: the first prediction is "nothing"
    assert torch.count_nonzero(TemporalUNet(6, dim=8, dim_mults=dim_mults, zero_init_output=False)(x, t)) > 0


def test_unet_learns_and_depends_on_time_and_every_step():
    torch.manual_seed(0)
    net = TemporalUNet(3, dim=8, dim_mults=(1, 2))
    x, t = torch.randn(4, 3, 16), torch.full((4,), 3.0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        loss = (net(x, t) - x).pow(2).mean()
        loss.backward()
        opt.step()
    assert all(p.grad is not None for p in net.parameters())
    out = net(x, t)
    assert not torch.allclose(out, net(x, torch.full((4,), 9.0)))  # the time matters
    moved = x.clone()
    moved[:, :, -1] += 1.0  # the receptive field spans the horizon: the first step sees the last
    assert not torch.allclose(net(moved, t)[:, :, 0], out[:, :, 0])


def test_unet_shape_errors_name_expected_and_given():
    net = TemporalUNet(6, dim=8, dim_mults=(1, 2, 4))
    with pytest.raises(ValueError, match=r"shape \(batch, 6, horizon\), got \(2, 5, 16\)"):
        net(torch.randn(2, 5, 16), torch.zeros(2))
    with pytest.raises(ValueError, match="multiple of 4.*got 18"):
        net(torch.randn(2, 6, 18), torch.zeros(2))
    with pytest.raises(ValueError, match=r"one time per trajectory, shape \(2,\), got \(3,\)"):
        net(torch.randn(2, 6, 16), torch.zeros(3))


def test_value_and_inverse_dynamics_shapes():
    value = ValueNet(6, dim=8, dim_mults=(1, 2))
    v = value(torch.randn(5, 6, 16), torch.arange(5.0))
    assert v.shape == (5,)
    with pytest.raises(ValueError, match=r"\(batch, 6, horizon\)"):
        value(torch.randn(5, 4, 16), torch.arange(5.0))
    inverse = InverseDynamics(4, 2, hidden=16)
    assert inverse(torch.randn(7, 4), torch.randn(7, 4)).shape == (7, 2)
    with pytest.raises(ValueError, match=r"two \(batch, 4\) observations, got \(7, 4\) and \(7, 3\)"):
        inverse(torch.randn(7, 4), torch.randn(7, 3))
