"""Network building blocks (thesis 8.2.2): residual blocks, coders, discriminator, U-Net,
the ResGANAD preset and the profiling helpers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from anomalyqc.errors import ConfigError
from anomalyqc.nets import (
    Autoencoder,
    Decoder,
    Discriminator,
    Encoder,
    EncoderDecoderEncoder,
    NetConfig,
    PreActBlock,
    UNet,
    count_parameters,
    flops_per_input,
    grdnet_config,
    resganad_config,
    resganad_generator,
    stage,
)

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(image_size=32, base_width=4, stages=2, blocks=2, convs=2, latent_channels=3,
            latent_dim=16)


def _x(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("resample,size", [("none", 16), ("down", 8), ("up", 32)])
def test_block_shapes_and_shortcuts(resample: str, size: int) -> None:
    x = _x(2, 4, 16, 16)
    keep = PreActBlock(4, 4, "none")
    assert keep.shortcut is None and keep(x).shape == x.shape
    change = PreActBlock(4, 6, resample)  # type: ignore[arg-type]
    assert change.shortcut is not None
    assert change(x).shape == (2, 6, size, size)
    plain = PreActBlock(4, 6, resample, residual=False)  # type: ignore[arg-type]
    assert plain.shortcut is None and plain(x).shape == (2, 6, size, size)


def test_residual_block_adds_its_shortcut() -> None:
    # With the body's last conv zeroed, a residual block is exactly its shortcut.
    x = _x(2, 4, 8, 8)
    block = PreActBlock(4, 4, "none", convs=3)
    nn.init.zeros_(block.body[-1].weight)
    assert torch.equal(block(x), x)
    down = PreActBlock(4, 8, "down").eval()
    nn.init.zeros_(down.body[-1].weight)
    assert down.shortcut is not None
    assert torch.allclose(down(x), down.shortcut(down.pre(x.clone())))
    plain = PreActBlock(4, 4, "none", residual=False)
    nn.init.zeros_(plain.body[-1].weight)
    assert plain(x).abs().sum() == 0


def test_stage_resamples_only_in_its_last_block() -> None:
    s = stage(4, 8, blocks=3, resample="down", convs=3)
    kinds = [type(b.body[0]).__name__ + str(b.body[0].stride) for b in s]
    assert kinds == ["Conv2d(1, 1)", "Conv2d(1, 1)", "Conv2d(2, 2)"]
    assert s[0].shortcut is not None and s[1].shortcut is None and s[2].shortcut is not None
    assert sum(isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) for m in s[0].modules()) == 3


@pytest.mark.parametrize("params,latent", [
    (dict(bottleneck="conv"), (3, 8, 8)),
    (dict(bottleneck="dense"), (16,)),
    (dict(bottleneck="none"), (16, 8, 8)),
    (dict(bottleneck="conv", channels=3, image_size=(32, 48), blocks=1, convs=1), (3, 8, 12)),
    (dict(bottleneck="dense", stages=3, blocks=3, convs=3, width_mult=1.5, max_width=7), (16,)),
    (dict(bottleneck="conv", residual=False), (3, 8, 8)),
    (dict(bottleneck="conv", stem="strided", stages=1), (3, 8, 8)),
    (dict(bottleneck="dense", stem="strided", channels=3), (16,)),
])
def test_autoencoder_shapes(params: dict, latent: tuple[int, ...]) -> None:
    cfg = NetConfig(**{**TINY, **params})
    c, (h, w) = cfg.channels, cfg.hw
    x = _x(3, c, h, w)
    enc, dec = Encoder(cfg), Decoder(cfg)
    z = enc(x)
    assert cfg.latent_shape == latent and z.shape == (3, *latent)
    assert dec(z).shape == x.shape
    ae = Autoencoder(cfg)
    out = ae(x)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1


def test_strided_stem_keeps_every_feature_map_off_the_full_resolution() -> None:
    """The strided stem halves once more, so no conv of the encoder or decoder (but the
    decoder's output layer) produces a map at the input's resolution."""
    cfg = NetConfig(**{**TINY, "stem": "strided"})
    assert cfg.halvings == 3 and cfg.feature_shape == (16, 4, 4)
    ae = Autoencoder(cfg)
    sides: list[int] = []
    for m in ae.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            m.register_forward_hook(lambda _m, _i, out: sides.append(out.shape[-1]))
    out = ae(_x(2, 1, 32, 32))
    assert out.shape == (2, 1, 32, 32)
    assert sides.count(32) == 1 and max(sides[:-1]) == 16
    plain = NetConfig(**TINY)
    assert plain.halvings == 2 and count_parameters(Autoencoder(plain)) != count_parameters(ae)


def test_widths_double_per_stage_and_respect_the_cap() -> None:
    cfg = NetConfig(**{**TINY, "stages": 3})
    assert [cfg.width(i) for i in range(-1, 3)] == [4, 8, 16, 32]
    assert cfg.feature_shape == (32, 4, 4)
    capped = NetConfig(**{**TINY, "stages": 3, "max_width": 10})
    assert [capped.width(i) for i in range(-1, 3)] == [4, 8, 10, 10]


def test_vanilla_differs_only_by_the_shortcuts() -> None:
    res = Autoencoder(TINY, residual=True)
    van = Autoencoder(TINY, residual=False)
    shortcuts = sum(count_parameters(b.shortcut) for b in res.modules()
                    if isinstance(b, PreActBlock) and b.shortcut is not None)
    assert shortcuts > 0
    assert count_parameters(res) - count_parameters(van) == shortcuts


@pytest.mark.parametrize("net", ["autoencoder", "ede", "discriminator", "unet"])
def test_gradients_reach_every_parameter(net: str) -> None:
    x = _x(2, 1, 32, 32)
    model: nn.Module
    if net == "autoencoder":
        model = Autoencoder(TINY, bottleneck="dense")
        loss = (model(x) - x).abs().mean()
    elif net == "ede":
        model = EncoderDecoderEncoder(TINY)
        x_hat, z, z_hat = model(x)
        assert z.shape == z_hat.shape == (2, 3, 8, 8) and x_hat.shape == x.shape
        loss = (x_hat - x).abs().mean() + (z - z_hat).pow(2).mean()
    elif net == "discriminator":
        model = Discriminator(TINY)
        logits, feats = model(x)
        loss = logits.mean() + feats.mean()
    else:
        model = UNet(channels=1, base_width=4, depth=2)
        loss = model(x, x.flip(-1)).mean()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_discriminator_returns_logits_and_features() -> None:
    d = Discriminator(TINY, bottleneck="dense", channels=3)
    x = _x(5, 3, 32, 32).requires_grad_(True)
    logits, feats = d(x)
    assert logits.shape == (5,) and feats.shape == (5, 16, 8, 8)
    assert d.config.bottleneck == "none"
    # Feature matching trains the generator through the features: they must carry gradient
    # back to the image.
    feats.pow(2).mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_latent_loss_trains_the_decoder() -> None:
    # GANomaly's L_enc = ||z - z_hat|| reaches the decoder through X_hat.
    gen = EncoderDecoderEncoder(TINY)
    _, z, z_hat = gen(_x(2, 1, 32, 32))
    (z - z_hat).pow(2).mean().backward()
    for name, p in gen.autoencoder.decoder.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("channels,depth,size", [(1, 2, 32), (3, 3, 48), (1, 4, 64)])
def test_unet_shapes(channels: int, depth: int, size: int) -> None:
    net = UNet(channels=channels, base_width=4, depth=depth, max_width=16)
    x = _x(2, channels, size, size)
    assert net.inc[0].in_channels == 2 * channels
    assert net(x, x).shape == (2, 1, size, size)
    net.eval()
    with torch.no_grad():  # it reads both inputs
        assert not torch.allclose(net(x, x), net(x, 1 - x))
        assert not torch.allclose(net(x, x), net(1 - x, x))


def test_unet_rejects_bad_inputs() -> None:
    net = UNet(channels=1, base_width=4, depth=3)
    with pytest.raises(ConfigError, match="divisible"):
        net(_x(1, 1, 20, 20), _x(1, 1, 20, 20))
    with pytest.raises(ValueError, match="same shape"):
        net(_x(1, 1, 32, 32), _x(1, 3, 32, 32))


def test_eval_mode_is_per_sample_and_train_mode_updates_batch_stats() -> None:
    ae = Autoencoder(TINY)
    x = _x(4, 1, 32, 32)
    bn = next(m for m in ae.modules() if isinstance(m, nn.BatchNorm2d))
    before = bn.running_mean.clone()
    ae.train()
    train_out = ae(x)
    assert not torch.equal(bn.running_mean, before)
    # Train mode normalises with the batch: a sample's output depends on its neighbours.
    assert not torch.allclose(ae(x[:2])[0], train_out[0], atol=1e-5)
    ae.eval()
    stats = bn.running_mean.clone()
    with torch.no_grad():
        full, single = ae(x), ae(x[:1])
    assert torch.allclose(full[0], single[0], atol=1e-6)
    assert torch.equal(bn.running_mean, stats)


def test_bad_configs_and_inputs_are_clear_errors() -> None:
    with pytest.raises(ConfigError, match="divisible by 2\\*\\*stages"):
        Encoder(TINY, image_size=36, stages=3)
    with pytest.raises(ConfigError, match="stages \\+ 1, the strided stem\\) = 8"):
        Encoder(TINY, image_size=36, stages=2, stem="strided")
    with pytest.raises(ConfigError):
        Encoder(TINY, bottleneck="sparse")
    with pytest.raises(ConfigError, match="16 \\* 2\\*\\*k"):
        grdnet_config(image_size=100)
    with pytest.raises(ValueError, match="encoder expects"):
        Encoder(TINY)(_x(1, 3, 32, 32))
    with pytest.raises(ValueError, match="decoder expects"):
        Decoder(TINY)(_x(1, 4, 8, 8))


def test_grdnet_presets_have_the_thesis_bottlenecks() -> None:
    assert grdnet_config("conv", image_size=64).latent_shape == (32, 8, 8)
    assert grdnet_config("dense", image_size=64).latent_shape == (2048,)
    crae = Autoencoder(grdnet_config("conv", image_size=32, base_width=4))
    assert crae(_x(2, 3, 32, 32)).shape == (2, 3, 32, 32)


def test_profile_helpers_count_what_torch_counts() -> None:
    conv = nn.Conv2d(1, 4, 3, padding=1)
    assert count_parameters(conv) == 4 * 9 + 4
    conv.bias.requires_grad_(False)  # type: ignore[union-attr]
    assert count_parameters(conv, trainable_only=True) == 36
    assert flops_per_input(conv, _x(3, 1, 8, 8)) == 2 * 9 * 4 * 64  # multiply-adds x 2
    net = Autoencoder(TINY).train()
    flops_per_input(net, _x(2, 1, 32, 32))
    assert net.training  # mode restored


def test_resganad_full_size_structure() -> None:
    # Built on the meta device: shapes, parameters and FLOPs without allocating or computing.
    cfg = resganad_config()
    assert (cfg.channels, cfg.hw, cfg.stages, cfg.blocks, cfg.convs) == (1, (256, 256), 4, 3, 3)
    assert cfg.feature_shape == (1024, 16, 16) and cfg.latent_shape == (64,)
    with torch.device("meta"):
        gen = resganad_generator()
        x = torch.empty(2, 1, 256, 256)
    ae = gen.autoencoder
    assert ae.encoder.features(x).shape == (2, 1024, 16, 16)
    assert ae.encoder(x).shape == (2, 64)
    x_hat, z, z_hat = gen(x)
    assert x_hat.shape == x.shape and z.shape == z_hat.shape == (2, 64)
    params, flops = count_parameters(ae), flops_per_input(ae, x)
    print(f"ResGANAD full size: generator {count_parameters(gen) / 1e6:.1f} M parameters, "
          f"autoencoder {params / 1e6:.1f} M, {flops / 1e9:.1f} GFLOP per 256x256x1 patch")
    assert params > 0 and flops > 0


def test_resganad_small_runs_for_real() -> None:
    gen = resganad_generator(width=4, image_size=64)
    x = _x(2, 1, 64, 64)
    x_hat, z, _ = gen(x)
    assert x_hat.shape == x.shape and z.shape == (2, 64)
    assert gen.config.feature_shape == (64, 4, 4)
