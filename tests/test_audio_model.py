"""The audio networks: DiffWave's structure (zero output at init, receptive field, gating),
continuous noise levels, class and mel conditioning, the mel-diffusion U-Net, and the
log-mel / Griffin-Lim front end."""

import math

import pytest
import torch

from modalities.audio.mel import MelConfig, griffin_lim, log_mel, mel_to_magnitude
from modalities.audio.model import DiffWave, MelDenoiser


def tiny(**kw):
    torch.manual_seed(0)
    args = dict(residual_channels=8, num_layers=6, dilation_cycle=3, embed_dim=16, embed_hidden=32)
    args.update(kw)
    return DiffWave(**args)


def randomise_output(net):
    """Give the zero-initialised output conv weights, so outputs depend on the input."""
    with torch.no_grad():
        net.output.weight.normal_()
        net.output.bias.normal_()
    return net


def test_fresh_diffwave_predicts_exactly_zero_at_any_noise_level():
    net = tiny(num_classes=10)
    x = torch.randn(3, 1, 200)
    out = net(x, torch.tensor([0.05, 0.5123, 0.99995]), labels=torch.tensor([1, 2, 3]))
    assert out.shape == (3, 1, 200)
    assert torch.count_nonzero(out) == 0


def test_fractional_noise_levels_change_the_output_smoothly():
    net = randomise_output(tiny())
    x = torch.randn(1, 1, 128)
    outs = [net(x, torch.tensor([level])) for level in (0.5, 0.5001, 0.9)]
    near, far = (outs[1] - outs[0]).abs().max(), (outs[2] - outs[0]).abs().max()
    assert 0 < near < far  # a tiny change of level is seen, and matters less than a big one


def test_receptive_field_is_one_plus_twice_the_dilations():
    net = randomise_output(tiny(num_layers=5, dilation_cycle=3))  # dilations 1 2 4 1 2
    assert net.receptive_field == 1 + 2 * (1 + 2 + 4 + 1 + 2)
    x = torch.randn(1, 1, 101, requires_grad=True)
    net(x, torch.tensor([0.7]))[0, 0, 50].backward()
    touched = (x.grad[0, 0] != 0).nonzero().flatten()
    half = (net.receptive_field - 1) // 2
    assert touched.min().item() == 50 - half and touched.max().item() == 50 + half


def test_residual_stream_is_scaled_by_one_over_root_two():
    # With every layer's convolutions zeroed, a layer adds nothing: x -> x / sqrt(2) per layer.
    net = tiny(num_layers=4)
    seen = {}
    net.layers[-1].register_forward_hook(lambda m, i, o: seen.update(h_in=i[0], h_out=o[0]))
    for layer in net.layers:
        for p in layer.out.parameters():
            torch.nn.init.zeros_(p)
    net(torch.randn(2, 1, 32), torch.tensor([0.3, 0.6]))
    assert torch.allclose(seen["h_out"], seen["h_in"] / math.sqrt(2))


def test_drop_cond_selects_the_learned_null_class():
    net = randomise_output(tiny(num_classes=10))
    x, t = torch.randn(2, 1, 64), torch.tensor([0.4, 0.8])
    dropped = net(x, t, labels=torch.tensor([3, 7]), drop_cond=torch.tensor([True, True]))
    assert torch.allclose(dropped, net(x, t))  # no labels = the null class
    mixed = net(x, t, labels=torch.tensor([3, 7]), drop_cond=torch.tensor([False, True]))
    assert torch.allclose(mixed[1], dropped[1]) and not torch.allclose(mixed[0], dropped[0])


def test_bad_inputs_are_clear_errors():
    net = tiny(num_classes=10)
    with pytest.raises(ValueError, match="mono audio"):
        net(torch.randn(2, 2, 64), torch.rand(2))
    with pytest.raises(ValueError, match="one noise level per example"):
        net(torch.randn(2, 1, 64), torch.rand(3))
    with pytest.raises(ValueError, match=r"labels must be in 0\.\.9"):
        net(torch.randn(2, 1, 64), torch.rand(2), labels=torch.tensor([0, 11]))
    with pytest.raises(ValueError, match="not mel-conditioned"):
        net(torch.randn(2, 1, 64), torch.rand(2), mel=torch.randn(2, 8, 1))
    with pytest.raises(ValueError, match="not class-conditional"):
        tiny()(torch.randn(2, 1, 64), torch.rand(2), labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="positive integer"):
        DiffWave(residual_channels=0)
    with pytest.raises(ValueError, match="even integers"):
        DiffWave(n_mels=8, upsample_factors=(3, 4))


@pytest.mark.parametrize("factors, frames", [((8, 8), 5), ((4, 2), 16), ((16, 16), 2)])
def test_mel_upsampler_gives_exactly_frames_times_hop_samples(factors, frames):
    net = tiny(n_mels=8, upsample_factors=factors)
    assert net.hop_length == math.prod(factors)
    features = net.upsample_mel(torch.randn(3, 8, frames))
    assert features.shape == (3, 8, frames * net.hop_length)
    out = net(torch.randn(3, 1, frames * net.hop_length), torch.rand(3), mel_features=features)
    assert out.shape == (3, 1, frames * net.hop_length)


def test_mel_and_its_upsampled_features_give_the_same_output():
    net = randomise_output(tiny(n_mels=8, upsample_factors=(4, 4)))
    mel, x, t = torch.randn(2, 8, 6), torch.randn(2, 1, 96), torch.rand(2)
    assert torch.allclose(net(x, t, mel=mel), net(x, t, mel_features=net.upsample_mel(mel)), atol=1e-6)


def test_a_mel_of_the_wrong_shape_is_a_clear_error():
    net = tiny(n_mels=8, upsample_factors=(4, 4))
    x, t = torch.randn(2, 1, 96), torch.rand(2)
    with pytest.raises(ValueError, match=r"mel must be \(2, 8, 6\)"):
        net(x, t, mel=torch.randn(2, 8, 5))  # 5 frames = 80 samples, not 96
    with pytest.raises(ValueError, match="8 mel bins"):
        net.upsample_mel(torch.randn(2, 7, 6))
    with pytest.raises(ValueError, match=r"mel_features must be \(2, 8, 96\)"):
        net(x, t, mel_features=torch.randn(2, 8, 95))
    with pytest.raises(ValueError, match="vocoder: pass mel"):
        net(x, t)


def test_mel_denoiser_is_zero_at_init_and_keeps_the_shape():
    torch.manual_seed(0)
    net = MelDenoiser(n_mels=8, channels=8, blocks=1, num_classes=10, embed_dim=16, embed_hidden=32)
    x = torch.randn(2, 8, 12)
    out = net(x, torch.tensor([0.3, 0.9]), labels=torch.tensor([1, 2]))
    assert out.shape == x.shape and torch.count_nonzero(out) == 0
    with pytest.raises(ValueError, match="divisible by 4"):
        net(torch.randn(2, 8, 10), torch.rand(2))


def test_log_mel_has_one_frame_per_hop_and_griffin_lim_inverts_it():
    cfg = MelConfig(sample_rate=8000, n_fft=256, win_length=256, hop_length=64, n_mels=32)
    t = torch.arange(2048) / 8000
    audio = (0.5 * torch.sin(2 * math.pi * 500 * t))[None, None]
    mel = log_mel(audio, cfg)
    assert mel.shape == (1, 32, 2048 // 64) and mel.min() >= -1 and mel.max() <= 1
    back = griffin_lim(mel, cfg, length=2048, n_iter=16)
    assert back.shape == (1, 1, 2048)
    spectrum = torch.fft.rfft(back[0, 0]).abs()
    assert abs(spectrum.argmax().item() * 8000 / 2048 - 500) < 20  # the tone comes back
    loud = mel > 0  # where the tone is; quiet bins only hold Griffin-Lim's phase noise
    assert loud.sum() > 32 and (log_mel(back, cfg) - mel)[loud].abs().mean() < 0.05
    with pytest.raises(ValueError, match="multiple of 64"):
        log_mel(torch.zeros(1, 1, 1000), cfg)


def test_mel_scale_maps_minus_100_to_plus_20_db_onto_minus_1_to_1():
    assert torch.allclose(mel_to_magnitude(torch.tensor([-1.0, 1.0])), torch.tensor([1e-5, 10.0]))
    with pytest.raises(ValueError, match="invalid MelConfig"):
        MelConfig(sample_rate=8000, f_max=6000)
