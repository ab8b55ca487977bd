"""diffkit.nn: the network blocks the modalities share."""

import math

import pytest
import torch

from diffkit.nn import (
    Attention,
    ResidualBlock,
    TimeEmbedding,
    group_norm,
    sinusoidal_embedding,
    zero_module,
)


def _randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Perturb every weight, so zero-initialised branches do something."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return module


def _x(dims: int, channels: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, *(6,) * dims, generator=gen)


# ------------------------------------------------------------------- sinusoidal_embedding
@pytest.mark.parametrize("dim", [1, 2, 7, 16])
def test_sinusoidal_embedding_matches_its_closed_form(dim):
    t = torch.tensor([0.0, 1.0, 3.5, 999.0, 12345.25], dtype=torch.float64)
    emb = sinusoidal_embedding(t, dim)
    assert emb.shape == (5, dim) and emb.dtype == torch.float32
    half = dim // 2
    expected = torch.zeros(5, dim, dtype=torch.float64)
    for b, tb in enumerate(t.tolist()):
        for i in range(half):
            freq = 10000.0 ** (-i / half)
            expected[b, i] = math.cos(tb * freq)
            expected[b, half + i] = math.sin(tb * freq)
    # float32 arguments up to ~1e4: the phase is exact to about 1e-3 there.
    torch.testing.assert_close(emb.double(), expected, atol=2e-3, rtol=0)
    torch.testing.assert_close(emb[:3].double(), expected[:3], atol=1e-6, rtol=0)
    if dim % 2:
        assert torch.all(emb[:, -1] == 0)


def test_sinusoidal_embedding_scale_and_max_period():
    t = torch.tensor([0.001, 0.25, 1.0])
    torch.testing.assert_close(sinusoidal_embedding(t, 8, scale=1000.0),
                               sinusoidal_embedding(t * 1000.0, 8))
    emb = sinusoidal_embedding(t, 4, max_period=100.0)
    expected = torch.stack([torch.cos(t), torch.cos(t / 10), torch.sin(t), torch.sin(t / 10)], 1)
    torch.testing.assert_close(emb, expected)
    # Integer timesteps are embedded as the same real numbers.
    torch.testing.assert_close(sinusoidal_embedding(torch.tensor([3, 500]), 10),
                               sinusoidal_embedding(torch.tensor([3.0, 500.0]), 10))


def test_sinusoidal_embedding_rejects_bad_input():
    with pytest.raises(ValueError, match=r"shape \(B,\), got \(2, 1\)"):
        sinusoidal_embedding(torch.zeros(2, 1), 8)
    with pytest.raises(ValueError, match="dim"):
        sinusoidal_embedding(torch.zeros(2), 0)


# -------------------------------------------------------------------------- TimeEmbedding
def test_time_embedding_shapes_and_defaults():
    emb = TimeEmbedding(16)
    assert emb(torch.rand(3)).shape == (3, 64)
    assert TimeEmbedding(16, hidden=32, out_dim=8)(torch.rand(3)).shape == (3, 8)
    assert [k for k in TimeEmbedding(4).state_dict()] == ["0.weight", "0.bias", "2.weight", "2.bias"]


def test_time_embedding_separates_fractional_times_and_is_smooth():
    torch.manual_seed(0)
    emb = TimeEmbedding(32)
    e = emb(torch.tensor([3.0, 3.5]))
    assert (e[0] - e[1]).norm() > 1e-2 * e[0].norm()

    # Smooth: differences shrink linearly with the step (first-order behaviour).
    t0 = torch.tensor([3.0, 250.0])
    d1 = (emb(t0 + 1e-2) - emb(t0)).norm(dim=1)
    d2 = (emb(t0 + 2e-2) - emb(t0)).norm(dim=1)
    assert torch.all(d1 > 0)
    torch.testing.assert_close(d2 / d1, torch.full_like(d1, 2.0), atol=0.05, rtol=0)
    # ... and along a fine path there is no jump.
    path = emb(torch.linspace(3.0, 4.0, 101))
    steps = (path[1:] - path[:-1]).norm(dim=1)
    assert steps.max() < 3 * steps.mean()

    # With scale=1000, times in (0, 1] are as distinguishable as integer steps.
    cont = TimeEmbedding(32, scale=1000.0)
    cont.load_state_dict(emb.state_dict())
    torch.testing.assert_close(cont(torch.tensor([0.003, 0.0035])), e)


# -------------------------------------------------------------------------- ResidualBlock
@pytest.mark.parametrize(
    "dims, kwargs",
    [(1, {}), (1, {"kernel_size": 5, "activation": "mish"}), (2, {}), (2, {"groups": 3})],
)
@pytest.mark.parametrize("widths", [(8, 8), (8, 12)])
def test_residual_block_is_the_identity_at_init(dims, kwargs, widths):
    cin, cout = widths
    block = ResidualBlock(cin, cout, 16, dims=dims, **kwargs)
    x, emb = _x(dims, cin), torch.randn(2, 16)
    out = block(x, emb)
    assert out.shape == (2, cout, *x.shape[2:])
    if cin == cout:
        assert torch.equal(out, x)
    else:
        torch.testing.assert_close(out, block.skip(x))


def test_residual_block_keeps_channels_last():
    block = ResidualBlock(8, 8, 4)
    x = _x(2, 8).contiguous(memory_format=torch.channels_last)
    out = _randomise(block)(x, torch.randn(2, 4))
    assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dims", [1, 2])
def test_film_embedding_changes_the_output_after_one_step(dims):
    torch.manual_seed(0)
    block = ResidualBlock(8, 8, 16, dims=dims, kernel_size=5 if dims == 1 else 3)
    x = _x(dims, 8)
    emb_a, emb_b = torch.randn(2, 16), torch.randn(2, 16)
    # Fresh, the zero conv hides the embedding entirely...
    assert torch.equal(block(x, emb_a), block(x, emb_b))
    opt = torch.optim.SGD(block.parameters(), lr=0.1)
    loss = (block(x, emb_a) - torch.randn_like(x)).square().mean()
    loss.backward()
    opt.step()
    # ... and one step of training makes it matter.
    out_a, out_b = block(x, emb_a), block(x, emb_b)
    assert (out_a - out_b).abs().max() > 1e-4


def test_residual_block_rejects_bad_shapes_and_options():
    block = ResidualBlock(8, 12, 16, dims=1)
    with pytest.raises(ValueError, match=r"emb of shape \(B=2, emb_dim=16\), got \(2, 8\)"):
        block(_x(1, 8), torch.randn(2, 8))
    with pytest.raises(ValueError, match=r"emb of shape \(B=2, emb_dim=16\), got \(3, 16\)"):
        block(_x(1, 8), torch.randn(3, 16))
    with pytest.raises(ValueError, match=r"x of shape \(B, 8, L\), got \(2, 4, 6\)"):
        block(_x(1, 4), torch.randn(2, 16))
    with pytest.raises(ValueError, match=r"x of shape \(B, 8, L\), got \(2, 8, 6, 6\)"):
        block(_x(2, 8), torch.randn(2, 16))
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        ResidualBlock(8, 8, 16, kernel_size=4)
    with pytest.raises(ValueError, match="dims must be"):
        ResidualBlock(8, 8, 16, dims=4)
    with pytest.raises(ValueError, match="unknown activation 'tanhh'"):
        ResidualBlock(8, 8, 16, activation="tanhh")


# ------------------------------------------------------------------------------ Attention
@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("cross", [False, True])
def test_attention_is_the_identity_at_init(dims, cross):
    attn = Attention(8, num_heads=2, groups=4, context_dim=5 if cross else None)
    x = _x(dims, 8)
    kwargs = {}
    if cross:
        kwargs = {"context": torch.randn(2, 3, 5),
                  "context_mask": torch.tensor([[True, True, False], [True, True, True]])}
    out = attn(x, **kwargs)
    assert out.shape == x.shape
    assert torch.equal(out, x)
    if dims == 2:
        assert out.is_contiguous(memory_format=torch.channels_last)
    else:
        assert out.is_contiguous()


@pytest.mark.parametrize("dims", [1, 2])
def test_cross_attention_ignores_padded_tokens(dims):
    attn = _randomise(Attention(8, num_heads=2, groups=4, context_dim=6))
    x = _x(dims, 8)
    ctx = torch.randn(2, 5, 6)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    out = attn(x, ctx, mask)
    ctx2 = ctx.clone()
    ctx2[0, 2:] = 100.0 * torch.randn(3, 6)
    out2 = attn(x, ctx2, mask)
    torch.testing.assert_close(out2[0], out[0])
    # A change to a real token does change the output, and the context matters at all.
    ctx3 = ctx.clone()
    ctx3[0, 1] += 1.0
    assert not torch.allclose(attn(x, ctx3, mask)[0], out[0])
    assert not torch.allclose(out, attn(x))
    # Integer masks (as tokenizers give) mean the same as boolean ones.
    torch.testing.assert_close(attn(x, ctx, mask.long()), out)


def test_cross_attention_to_only_padding_adds_nothing():
    attn = _randomise(Attention(8, num_heads=2, groups=4, context_dim=6))
    x = _x(2, 8)
    mask = torch.tensor([[False, False, False], [True, False, False]])
    out = attn(x, torch.randn(2, 3, 6), mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0], attn(x)[0])  # no tokens: self-attention only


def test_attention_rejects_bad_shapes():
    attn = Attention(8, num_heads=2, groups=4, context_dim=6)
    x = _x(2, 8)
    with pytest.raises(ValueError, match=r"x of shape \(B, 8, \*spatial\), got \(2, 4, 6, 6\)"):
        attn(_x(2, 4))
    with pytest.raises(ValueError, match=r"context of shape \(B=2, L, context_dim=6\), got \(2, 3, 5\)"):
        attn(x, torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match=r"context of shape \(B=2, L, context_dim=6\), got \(1, 3, 6\)"):
        attn(x, torch.randn(1, 3, 6))
    with pytest.raises(ValueError, match=r"context_mask of shape \(2, 3\) \(B, L\), got \(2, 4\)"):
        attn(x, torch.randn(2, 3, 6), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="boolean"):
        attn(x, torch.randn(2, 3, 6), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="without a context"):
        attn(x, context_mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="no cross-attention"):
        Attention(8, num_heads=2, groups=4)(x, torch.randn(2, 3, 6))
    with pytest.raises(ValueError, match="not divisible by num_heads=3"):
        Attention(8, num_heads=3)


def test_attention_trains():
    # Randomised: a zero-initialised output projection would block every gradient behind it.
    attn = _randomise(Attention(8, num_heads=2, groups=4, context_dim=6))
    out = attn(_x(1, 8), torch.randn(2, 3, 6), torch.tensor([[1, 0, 0], [1, 1, 1]]).bool())
    out.square().mean().backward()
    for name, p in attn.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


# ------------------------------------------------------------------------------- helpers
def test_group_norm_falls_back_to_gcd_groups():
    assert group_norm(32, 8).num_groups == 8
    assert group_norm(12, 8).num_groups == 4
    assert group_norm(7, 8).num_groups == 1
    assert group_norm(12, 8).num_channels == 12


def test_zero_module_zeroes_and_returns_the_module():
    lin = torch.nn.Linear(3, 4)
    assert zero_module(lin) is lin
    assert all(torch.all(p == 0) for p in lin.parameters())
