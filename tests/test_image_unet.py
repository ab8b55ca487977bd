"""The image U-Net: shapes, conditioning, the null condition, input checks, and the
shipped checkpoints' outputs."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from modalities.image.unet import UNet

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS = ROOT / "modalities" / "image" / "checkpoints"
# Inputs and outputs of the shipped checkpoints, computed by the U-Net as it was before its
# blocks moved to diffkit.nn (the commit is in the file's metadata; see tests/data/README.md).
REFERENCE = Path(__file__).resolve().parent / "data" / "image_unet_reference.safetensors"

TINY = dict(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
            num_heads=2, norm_groups=4)


def _randomise(net: torch.nn.Module) -> torch.nn.Module:
    """Fresh nets output zeros (zero-initialised output layers); perturb every weight so
    conditioning effects become visible."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net


def test_fresh_network_outputs_zeros_and_keeps_shape():
    net = UNet(in_channels=3, image_size=16, **TINY)
    x = torch.randn(2, 3, 16, 16)
    out = net(x, torch.tensor([0, 999]))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.is_contiguous()
    assert torch.all(out == 0)


def test_learned_variance_doubles_the_channels_and_trains():
    # Randomised: a fresh net's zero output layer would block every gradient behind it.
    net = _randomise(UNet(in_channels=1, image_size=8, learn_sigma=True, **TINY))
    out = net(torch.randn(4, 1, 8, 8), torch.randint(0, 1000, (4,)))
    assert out.shape == (4, 2, 8, 8)
    out[:, 1].square().mean().backward()  # the variance channel alone reaches every layer
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_class_conditioning_and_null_class():
    net = _randomise(UNet(image_size=8, num_classes=10, **TINY))
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([500, 500])
    a = net(x, t, labels=torch.tensor([1, 1]))
    b = net(x, t, labels=torch.tensor([2, 2]))
    null = net(x, t, labels=torch.tensor([1, 2]), drop_cond=torch.tensor([True, True]))
    assert not torch.allclose(a, b)
    # Dropped examples ignore their label: both use the same null class.
    null_ref = net(x, t, labels=torch.tensor([10, 10]))
    torch.testing.assert_close(null, null_ref)
    mixed = net(x, t, labels=torch.tensor([1, 2]), drop_cond=torch.tensor([False, True]))
    torch.testing.assert_close(mixed[0], a[0])
    torch.testing.assert_close(mixed[1], null_ref[1])


def test_text_conditioning_uses_tokens_and_mask():
    net = _randomise(UNet(image_size=8, context_dim=12, **TINY))
    x, t = torch.randn(1, 1, 8, 8).repeat(2, 1, 1, 1), torch.tensor([300, 300])
    ctx = torch.randn(2, 5, 12)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    out = net(x, t, context=ctx, context_mask=mask)
    # Changing padded tokens must not change the output of the first example.
    ctx2 = ctx.clone()
    ctx2[0, 3:] = 100.0
    out2 = net(x, t, context=ctx2, context_mask=mask)
    torch.testing.assert_close(out[0], out2[0])
    assert not torch.allclose(out[0], net(x, t, context=torch.randn(2, 5, 12), context_mask=mask)[0])
    dropped = net(x, t, context=ctx, context_mask=mask, drop_cond=torch.tensor([True, True]))
    torch.testing.assert_close(dropped[0], dropped[1])  # the null prompt is the same for all


def test_super_resolution_input():
    net = _randomise(UNet(image_size=8, low_res_channels=1, **TINY))
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 10])
    a = net(x, t, low_res=torch.zeros(2, 1, 4, 4))
    b = net(x, t, low_res=torch.ones(2, 1, 4, 4))
    assert a.shape == x.shape and not torch.allclose(a, b)


@pytest.mark.parametrize(
    "kwargs, cond, message",
    [
        ({}, {"labels": torch.tensor([1])}, "not class-conditional"),
        ({"num_classes": 3}, {}, "pass labels"),
        ({}, {"context": torch.randn(1, 2, 4)}, "not text-conditional"),
        ({"context_dim": 4}, {}, "pass context"),
        ({}, {"low_res": torch.randn(1, 1, 4, 4)}, "not a super-resolution model"),
        ({"low_res_channels": 1}, {}, "pass low_res"),
    ],
)
def test_missing_or_unexpected_conditions_are_errors(kwargs, cond, message):
    net = UNet(image_size=8, **TINY, **kwargs)
    with pytest.raises(ValueError, match=message):
        net(torch.randn(1, 1, 8, 8), torch.tensor([1]), **cond)


def test_wrong_channels_and_sizes_are_errors():
    net = UNet(in_channels=1, image_size=8, **TINY)
    with pytest.raises(ValueError, match=r"expected images \(B, 1, H, W\)"):
        net(torch.randn(1, 3, 8, 8), torch.tensor([1]))
    with pytest.raises(ValueError, match="divisible"):
        net(torch.randn(1, 1, 7, 7), torch.tensor([1]))
    with pytest.raises(ValueError, match="not divisible"):
        UNet(image_size=10, channel_mult=(1, 2, 2))
    with pytest.raises(ValueError, match="out of range"):
        UNet(channel_mult=(1, 2), num_res_blocks=1, attention_levels=(2,))
    with pytest.raises(ValueError, match="num_heads"):
        UNet(base_channels=6, channel_mult=(1, 1), num_res_blocks=1, attention_levels=(1,), num_heads=4)


@pytest.mark.parametrize("name", ["digits", "digits-text", "digits-sr"])
def test_shipped_checkpoints_load_strictly_and_reproduce_the_reference(name):
    kwargs = json.loads((CHECKPOINTS / name / "config.json").read_text())["model"]["kwargs"]
    net = UNet(**kwargs)
    net.load_state_dict(load_file(str(CHECKPOINTS / name / "model.safetensors")), strict=True)
    net.eval()
    ref = load_file(str(REFERENCE))
    p = f"{name}."
    cond = {key: ref[p + key] for key in ("labels", "context", "context_mask", "low_res")
            if p + key in ref}
    x = ref[p + "x"]
    cases = {
        "out": (ref[p + "t"], {}),
        "out_drop": (ref[p + "t"], {"drop_cond": ref[p + "drop_cond"]}),
        "out_float_t": (ref[p + "t_float"], {}),
    }
    with torch.no_grad():
        for key, (t, extra) in cases.items():
            out = net(x, t, **cond, **extra)
            # Bit-identical on the machine that wrote the file; the tolerance only absorbs
            # other CPUs' kernels.
            torch.testing.assert_close(out, ref[p + key], atol=1e-5, rtol=1e-5, msg=f"{name} {key}")


def test_reference_file_records_its_origin():
    with safe_open(str(REFERENCE), "pt") as f:
        meta = f.metadata()
    assert len(meta["commit"]) == 40 and "before" in meta["generated_by"]


def test_float_timesteps():
    net = _randomise(UNet(image_size=8, **TINY))
    x = torch.randn(2, 1, 8, 8)
    integer = net(x, torch.tensor([3, 500]))
    torch.testing.assert_close(net(x, torch.tensor([3.0, 500.0])), integer)
    torch.testing.assert_close(net(x, torch.tensor([3.0, 500.0], dtype=torch.float64)), integer)
    half = net(x, torch.tensor([3.5, 500.5]))
    assert torch.isfinite(half).all() and not torch.allclose(half, integer)


def test_timesteps_must_be_one_per_image():
    net = UNet(image_size=8, **TINY)
    with pytest.raises(ValueError, match=r"t of shape \(B,\) = \(2,\), got \(1,\)"):
        net(torch.randn(2, 1, 8, 8), torch.tensor([3]))
    with pytest.raises(ValueError, match=r"t of shape \(B,\) = \(2,\), got \(2, 1\)"):
        net(torch.randn(2, 1, 8, 8), torch.tensor([[3], [4]]))
