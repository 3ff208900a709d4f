"""Inference options of the reconstruction detectors (nets/inference.py and the
channels_last / fold_batchnorm / inference_dtype fields applied in predict): the same scores
within tolerance, the trained weights untouched, and each rewrite really applied."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from anomalyqc.models import Ganomaly, Resganad
from anomalyqc.nets import Autoencoder, resganad_config
from anomalyqc.nets.blocks import PreActBlock
from anomalyqc.nets.inference import autocast_bodies, fold_batchnorm, inference_copy
from anomalyqc.types import Batch

TINY = {"image_size": 32, "width": 4, "stages": 2, "epochs": 1, "batch_size": 4,
        "loss_curves": False}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def _randomise_bn(net: nn.Module, seed: int = 0) -> nn.Module:
    """Running statistics and affine terms far from the identity, so a wrong fold shows."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.2)
    return net.eval()


def _images(n: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return 0.25 + 0.5 * torch.rand(n, 1, 32, 32, generator=g)


def test_fold_batchnorm_folds_the_bn_after_each_conv_and_keeps_the_output():
    block = _randomise_bn(PreActBlock(8, 16, "down", convs=3))
    x = torch.randn(2, 8, 16, 16)
    with torch.no_grad():
        want = block(x)
        n = fold_batchnorm(block)
        got = block(x)
    # three convs: the two BNs after conv 1 and conv 2 fold; the pre-activation BN stays
    assert n == 2
    assert isinstance(block.pre[0], nn.BatchNorm2d)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in block.body) == 0
    assert torch.allclose(got, want, atol=1e-5)


def test_fold_batchnorm_handles_the_transposed_convs_of_the_decoder():
    net = _randomise_bn(Autoencoder(resganad_config(width=4, image_size=32, blocks=2, convs=2,
                                                    stages=2)))
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        want = net(x)
        n = fold_batchnorm(net)
        got = net(x)
    # 2 stages x 2 blocks x 1 inner BN, in the encoder and in the decoder
    assert n == 8
    assert any(isinstance(m, nn.ConvTranspose2d) and m.bias is not None for m in net.modules())
    assert torch.allclose(got, want, atol=1e-5)


def test_autocast_bodies_runs_convs_in_bfloat16_and_returns_float32():
    net = Autoencoder(resganad_config(width=4, image_size=32, stages=2, blocks=1, convs=2)).eval()
    seen: list[torch.dtype] = []
    net.encoder.trunk[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    assert autocast_bodies(net, "cpu", torch.bfloat16) == 2  # the encoder and the decoder
    with torch.no_grad():
        out = net(torch.rand(2, 1, 32, 32))
    assert seen == [torch.bfloat16]
    assert out.dtype == torch.float32


def test_inference_copy_leaves_the_originals_alone():
    net = _randomise_bn(Autoencoder(resganad_config(width=4, image_size=32, stages=2, blocks=1,
                                                    convs=2)))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    copies = inference_copy({"g": net}, channels_last=True, fold=True, dtype="bfloat16")
    conv = next(m for m in copies["g"].modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in copies["g"].encoder.trunk[1][0].body)
    assert any(isinstance(m, nn.BatchNorm2d) for m in net.encoder.trunk[1][0].body)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert "forward" not in vars(net.encoder)  # the original's forward is not wrapped


@pytest.mark.parametrize("cls", [Resganad, Ganomaly])
def test_predict_options_give_the_same_scores(cls):
    x = _images()
    det = cls(**TINY, **({"blocks": 1, "convs": 2} if cls is Resganad else {}))
    det.fit([Batch(image=x, label=torch.zeros(len(x), dtype=torch.long))])
    _randomise_bn(det.nets["generator"])  # one epoch barely moves the BN statistics
    weights = {k: v.clone() for k, v in det.state_tensors().items()}
    base = det.predict(x)
    exact = [{"channels_last": True}, {"fold_batchnorm": True},
             {"channels_last": True, "fold_batchnorm": True}]
    for options in [*exact, {"inference_dtype": "bfloat16"},
                    {"channels_last": True, "fold_batchnorm": True, "inference_dtype": "bfloat16"}]:
        det.config = det.config.model_copy(update=options)
        got = det.predict(x)
        bf16 = "inference_dtype" in options
        # bf16 keeps 8 bits of mantissa in the networks; the scores are computed in fp32
        rtol, atol = (3e-2, 3e-3) if bf16 else (1e-4, 1e-6)
        assert torch.allclose(got.score, base.score, rtol=rtol, atol=atol), options
        assert torch.allclose(got.anomaly_map, base.anomaly_map, rtol=rtol, atol=10 * atol), options
        assert got.score.dtype == torch.float32
        # ... and predict really ran the rewritten copies
        used = det._inference_nets()["generator"]
        if bf16:
            assert not torch.equal(got.score, base.score), options
        if options.get("fold_batchnorm"):
            assert sum(isinstance(m, nn.BatchNorm2d) for m in used.modules()) < sum(
                isinstance(m, nn.BatchNorm2d) for m in det.nets["generator"].modules())
        if options.get("channels_last"):
            conv = next(m for m in used.modules() if isinstance(m, nn.Conv2d))
            assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    det.config = det.config.model_copy(update={"channels_last": False, "fold_batchnorm": False,
                                               "inference_dtype": "float32"})
    assert torch.equal(det.predict(x).score, base.score)
    assert all(torch.equal(weights[k], v) for k, v in det.state_tensors().items())
    assert any(isinstance(m, nn.BatchNorm2d) for m in det.nets["generator"].modules())


def test_bad_inference_dtype_is_a_config_error():
    from anomalyqc.errors import ConfigError

    with pytest.raises(ConfigError, match="inference_dtype"):
        Resganad(**TINY, inference_dtype="float16")


def test_options_are_saved_with_the_run_and_apply_after_load(tmp_path):
    from anomalyqc.models.storage import load_detector

    x = _images(6)
    det = Resganad(**TINY, blocks=1, convs=2, channels_last=True, fold_batchnorm=True,
                   inference_dtype="bfloat16")
    det.fit([Batch(image=x, label=torch.zeros(len(x), dtype=torch.long))])
    want = det.predict(x).score
    det.save(tmp_path / "run")
    back = load_detector(tmp_path / "run")
    assert (back.config.channels_last, back.config.fold_batchnorm,
            back.config.inference_dtype) == (True, True, "bfloat16")
    assert torch.allclose(back.predict(x).score, want, atol=1e-6)
    assert back._inference_nets()["generator"] is not back.nets["generator"]
