"""Networks: parameter counts against the papers' designs, shapes in 3D/2D/anisotropic, gradients, channels_last."""

import pytest
import torch
from torch import nn

from autopetseg.planning.plans import NetworkTopology
from autopetseg.models.networks import (
    NETWORKS,
    AttentionUNet,
    AttentionUNetOptions,
    ResidualUNetOptions,
    SegResNet,
    SegResNetOptions,
    build_network,
    count_parameters,
)
from autopetseg.models.networks.resunet import ResidualUNet
from autopetseg.models.networks.segresnet import stage_block_counts

torch.set_num_threads(1)

PAPER_TOPOLOGY = NetworkTopology(
    features_per_stage=[32, 64, 128, 256, 512],
    strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]],
    kernel_sizes=[[3, 3, 3]] * 5,
    num_res_units=2,
)


def small_topology(ndim: int, first_stride=None, first_kernel=None, num_res_units: int = 2) -> NetworkTopology:
    strides = [[1] * ndim, first_stride or [2] * ndim, [2] * ndim]
    kernels = [first_kernel or [3] * ndim, [3] * ndim, [3] * ndim]
    return NetworkTopology([4, 8, 16], strides, kernels, num_res_units)


def monai_formula_count(features, in_ch, out_ch, k3, affine_norm_params: bool) -> int:
    """Trainable parameters of MONAI's residual UNet design, counted layer by layer from its description.

    conv: k^3*cin*cout + cout; norm: 2*c if affine; PReLU: 1.
    """

    def conv(cin, cout, k=k3):
        return k * cin * cout + cout

    def cna(cin, cout):  # conv, norm (2 per channel when affine), PReLU (1)
        return conv(cin, cout) + (2 * cout if affine_norm_params else 0) + 1

    total = 0
    chans = [in_ch] + list(features)
    n = len(features)
    for k in range(n - 1):  # strided residual units, 2 subunits, shortcut conv with the same kernel
        total += cna(chans[k], chans[k + 1]) + cna(chans[k + 1], chans[k + 1]) + conv(chans[k], chans[k + 1])
    # bottleneck, stride 1: 1x1 shortcut
    total += cna(features[-2], features[-1]) + cna(features[-1], features[-1]) + conv(features[-2], features[-1], 1)
    for k in range(n - 1):
        c_in = features[k] + (features[-1] if k == n - 2 else features[k])
        c_out = out_ch if k == 0 else features[k - 1]
        total += cna(c_in, c_out)  # transposed conv-norm-act
        total += conv(c_out, c_out) if k == 0 else cna(c_out, c_out)  # 1-subunit residual unit (identity shortcut)
    return total


def test_paper_configuration_has_the_papers_parameter_count():
    model = build_network("resunet", PAPER_TOPOLOGY, in_channels=2, out_channels=2)
    assert isinstance(model, ResidualUNet)
    assert count_parameters(model) == 19_223_525
    assert monai_formula_count([32, 64, 128, 256, 512], 2, 2, 27, affine_norm_params=True) == 19_223_525
    # Instance norm without affine parameters (MONAI's default) drops 2 per normalised channel.
    plain = build_network(
        "resunet", PAPER_TOPOLOGY, options=ResidualUNetOptions(norm="instance", affine_instance_norm=False)
    )
    assert count_parameters(plain) == monai_formula_count([32, 64, 128, 256, 512], 2, 2, 27, False) == 19_218_657


def test_registry_and_unknown_name():
    assert NETWORKS["resunet"] is ResidualUNet
    with pytest.raises(ValueError, match="unknown network"):
        build_network("nope", PAPER_TOPOLOGY)


@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_3d_output_is_logits_at_input_size_and_gradients_flow(norm):
    torch.manual_seed(0)
    topo = small_topology(3)
    model = build_network("resunet", topo, 2, 2, options=ResidualUNetOptions(norm=norm))
    assert count_parameters(model) == monai_formula_count([4, 8, 16], 2, 2, 27, True)
    x = torch.randn(2, 2, 16, 16, 16)
    y = model(x)
    assert y.shape == (2, 2, 16, 16, 16)
    y.square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # the first encoder conv and the final conv both receive signal
    assert model.encoder[0].conv[0][0].weight.grad.abs().sum() > 0
    assert model.decoder[0][1].conv[0][0].weight.grad.abs().sum() > 0


def test_2d_network():
    topo = small_topology(2)
    model = build_network("resunet", topo, in_channels=2, out_channels=3)
    assert model(torch.randn(3, 2, 24, 32)).shape == (3, 3, 24, 32)
    assert all(m.__class__.__name__.endswith("2d") for m in model.modules() if "Conv" in m.__class__.__name__)


def test_anisotropic_strides_and_kernels():
    topo = small_topology(3, first_stride=[1, 2, 2], first_kernel=[1, 3, 3])
    model = build_network("resunet", topo)
    assert model(torch.randn(1, 2, 6, 16, 20)).shape == (1, 2, 6, 16, 20)
    # encoder block 0 applies strides[1] with kernel_sizes[1]; the top refine unit uses kernel_sizes[0]
    assert model.encoder[0].conv[0][0].stride == (1, 2, 2)
    assert model.decoder[0][0][0].stride == (1, 2, 2)
    assert model.decoder[0][1].conv[0][0].kernel_size == (1, 3, 3)
    with pytest.raises(ValueError, match="divisible"):
        model(torch.randn(1, 2, 6, 16, 18))


def test_plain_variant_without_residual_units():
    model = build_network("resunet", small_topology(3, num_res_units=0))
    assert model(torch.randn(1, 2, 8, 8, 8)).shape == (1, 2, 8, 8, 8)


def test_invalid_topologies_are_rejected():
    with pytest.raises(ValueError, match="strides\\[0\\]"):
        build_network("resunet", NetworkTopology([4, 8], [[2, 2, 2], [2, 2, 2]], [[3, 3, 3]] * 2))
    with pytest.raises(ValueError, match="odd"):
        build_network("resunet", NetworkTopology([4, 8], [[1, 1, 1], [2, 2, 2]], [[3, 3, 3], [2, 2, 2]]))


@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_channels_last_3d_gives_the_same_logits(norm):
    torch.manual_seed(1)
    model = build_network("resunet", small_topology(3), options=ResidualUNetOptions(norm=norm)).eval()
    x = torch.randn(2, 2, 8, 8, 8)
    with torch.no_grad():
        reference = model(x)
        model_cl = model.to(memory_format=torch.channels_last_3d)
        out = model_cl(x.contiguous(memory_format=torch.channels_last_3d))
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-5)
    assert out.is_contiguous(memory_format=torch.channels_last_3d)  # no layout-breaking reshape inside
    model_cl.train()
    model_cl(x.contiguous(memory_format=torch.channels_last_3d)).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model_cl.parameters())


def test_network_and_gdfl_loss_fit_a_tiny_lesion():
    from autopetseg.training.losses import GeneralizedDiceFocalLoss

    torch.manual_seed(0)
    model = build_network("resunet", small_topology(3))
    x = torch.randn(2, 2, 8, 8, 8)
    y = torch.zeros(2, 1, 8, 8, 8, dtype=torch.long)
    y[:, :, 2:5, 3:6, 3:6] = 1
    x[:, :1] += 3.0 * y  # the "PET" channel is bright on the lesion
    loss_fn = GeneralizedDiceFocalLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 20
    with torch.no_grad():
        predicted = model.eval()(x).argmax(1, keepdim=True) == 1
    lesion = y == 1
    dice = 2 * (predicted & lesion).sum() / (predicted.sum() + lesion.sum())
    assert dice > 0.8


# ---------------------------------------------------------------------------------------------
# L1DFL paper networks: Attention U-Net (16..256, 5 levels) and SegResNet (init 16, blocks 1,2,2,4)

ATTENTION_PAPER = NetworkTopology([16, 32, 64, 128, 256], [[1, 1, 1]] + [[2, 2, 2]] * 4, [[3, 3, 3]] * 5)
SEGRESNET_PAPER = NetworkTopology([16, 32, 64, 128], [[1, 1, 1]] + [[2, 2, 2]] * 3, [[3, 3, 3]] * 4)
# Trainable parameters MONAI 1.6.1 reports for AttentionUnet(3, 2, 2, channels=(16, 32, 64, 128, 256),
# strides=(2, 2, 2, 2)) and SegResNet(blocks_down=[1, 2, 2, 4], init_filters=16, in_channels=2, out_channels=2).
MONAI_ATTENTION_UNET_PARAMS = 5_909_562
MONAI_SEGRESNET_PARAMS = 4_701_346


def attention_unet_formula_count(features, in_ch, out_ch, k3, monai_merge: bool) -> int:
    """Layer by layer: conv k^3*cin*cout + cout (bias), BatchNorm 2c; merge: BN (2c) or PReLU (1)."""

    def conv(cin, cout, k=k3):
        return k * cin * cout + cout

    def cbr(cin, cout):
        return conv(cin, cout) + 2 * cout

    total = 0
    chans = [in_ch] + list(features)
    for s in range(len(features)):  # conv blocks: two conv-BN-ReLU
        total += cbr(chans[s], chans[s + 1]) + cbr(chans[s + 1], chans[s + 1])
    for k in range(len(features) - 1):
        f, f_int = features[k], features[k] // 2
        total += 2 * (conv(f, f_int, 1) + 2 * f_int) + conv(f_int, 1, 1) + 2  # gate: W_g, W_x, psi (+BN(1))
        total += cbr(features[k + 1], f)  # transposed conv-BN-ReLU
        total += conv(2 * f, f) + (1 if monai_merge else 2 * f)  # merge
    return total + conv(features[0], out_ch, 1)


def segresnet_formula_count(features, blocks_down, blocks_up, in_ch, out_ch, k3) -> int:
    """Bias-free convs k^3*cin*cout, GroupNorm 2c, residual block = 2 x (GN + conv c->c); final conv has a bias."""

    def res(c):
        return 2 * (2 * c + k3 * c * c)

    total = k3 * in_ch * features[0]
    for s, f in enumerate(features):
        total += (k3 * features[s - 1] * f if s else 0) + blocks_down[s] * res(f)
    for i, k in enumerate(range(len(features) - 2, -1, -1)):
        total += features[k + 1] * features[k] + blocks_up[i] * res(features[k])
    return total + 2 * features[0] + features[0] * out_ch + out_ch


def test_l1dfl_papers_networks_have_monais_parameter_counts():
    monai_like = build_network("attention_unet", ATTENTION_PAPER, options=AttentionUNetOptions(merge_block="monai"))
    assert isinstance(monai_like, AttentionUNet)
    assert count_parameters(monai_like) == MONAI_ATTENTION_UNET_PARAMS
    assert attention_unet_formula_count([16, 32, 64, 128, 256], 2, 2, 27, True) == MONAI_ATTENTION_UNET_PARAMS
    # The default merge block (BN + ReLU, as the paper states for every layer): 2c BN parameters instead of 1 PReLU.
    default = build_network("attention_unet", ATTENTION_PAPER)
    assert count_parameters(default) == attention_unet_formula_count([16, 32, 64, 128, 256], 2, 2, 27, False)
    assert count_parameters(default) == MONAI_ATTENTION_UNET_PARAMS + sum(2 * c - 1 for c in (16, 32, 64, 128))
    seg = build_network("segresnet", SEGRESNET_PAPER)
    assert isinstance(seg, SegResNet)
    assert count_parameters(seg) == MONAI_SEGRESNET_PARAMS
    assert segresnet_formula_count([16, 32, 64, 128], [1, 2, 2, 4], [1, 1, 1], 2, 2, 27) == MONAI_SEGRESNET_PARAMS


def _copy_in_order(ours: list, theirs: dict) -> None:
    assert len(ours) == len(theirs)
    for tensor, (name, value) in zip(ours, theirs.items()):
        assert tensor.shape == value.shape, name
        tensor.copy_(value)


def test_l1dfl_networks_compute_what_monai_computes():
    """Optional cross-check: with MONAI's weights copied in, the logits are MONAI's (skipped without MONAI)."""
    nets = pytest.importorskip("monai.networks.nets")
    torch.manual_seed(0)
    x = torch.randn(1, 2, 16, 16, 16)
    ours = build_network("attention_unet", ATTENTION_PAPER, options=AttentionUNetOptions(merge_block="monai")).eval()
    theirs = nets.AttentionUnet(3, 2, 2, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2)).eval()
    order = [ours.encoder[0]]
    for k in range(4):  # MONAI nests: head, then per level gate, up, merge, next encoder block
        order += [ours.gates[k], ours.up[k], ours.merge[k], ours.encoder[k + 1]]
    with torch.no_grad():
        _copy_in_order([t for m in order + [ours.out] for t in m.state_dict().values()], theirs.state_dict())
        torch.testing.assert_close(ours(x), theirs(x))
    seg = build_network("segresnet", SEGRESNET_PAPER).eval()
    seg_ref = nets.SegResNet(blocks_down=[1, 2, 2, 4], init_filters=16, in_channels=2, out_channels=2).eval()
    with torch.no_grad():
        _copy_in_order(list(seg.state_dict().values()), seg_ref.state_dict())
        torch.testing.assert_close(seg(x), seg_ref(x))


@pytest.mark.parametrize("name", ["attention_unet", "segresnet"])
def test_l1dfl_networks_give_logits_at_input_size_and_gradients_flow(name):
    torch.manual_seed(0)
    assert NETWORKS[name] is {"attention_unet": AttentionUNet, "segresnet": SegResNet}[name]
    model = build_network(name, small_topology(3))
    x = torch.randn(2, 2, 16, 16, 16)
    y = model(x)
    assert y.shape == (2, 2, 16, 16, 16)
    y.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    first = model.encoder[0][0][0] if name == "attention_unet" else model.conv_init
    assert first.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["attention_unet", "segresnet"])
def test_l1dfl_networks_2d_and_anisotropic(name):
    model2d = build_network(name, small_topology(2), in_channels=2, out_channels=3)
    assert model2d(torch.randn(3, 2, 24, 32)).shape == (3, 3, 24, 32)
    assert all(not isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)) for m in model2d.modules())
    topo = small_topology(3, first_stride=[1, 2, 2], first_kernel=[1, 3, 3])
    model = build_network(name, topo)
    assert model(torch.randn(1, 2, 6, 16, 20)).shape == (1, 2, 6, 16, 20)
    with pytest.raises(ValueError, match="divisible"):
        model(torch.randn(1, 2, 6, 16, 18))
    # stage 1 downsamples by strides[1]; stage 0 uses kernel_sizes[0]
    if name == "attention_unet":
        assert model.encoder[1][0][0].stride == (1, 2, 2)
        assert model.encoder[0][0][0].kernel_size == (1, 3, 3)
        assert model.up[0][0].stride == (1, 2, 2)
    else:
        assert model.down_layers[1][0].stride == (1, 2, 2)
        assert model.conv_init.kernel_size == (1, 3, 3)


def test_cpu_plan_topology_gives_a_narrower_shallower_network():
    """A CPU plan (features 16..128 in 4 stages) keeps the design with the plan's widths and depth."""
    cpu = NetworkTopology([16, 32, 64, 128], [[1, 1, 1]] + [[2, 2, 2]] * 3, [[3, 3, 3]] * 4)
    att = build_network("attention_unet", cpu)
    assert len(att.encoder) == 4 and [m[0][0].out_channels for m in att.encoder] == [16, 32, 64, 128]
    assert count_parameters(att) == attention_unet_formula_count([16, 32, 64, 128], 2, 2, 27, False)
    three = NetworkTopology([8, 16, 32], [[1, 1, 1]] + [[2, 2, 2]] * 2, [[3, 3, 3]] * 3)
    seg = build_network("segresnet", three)
    assert [sum(isinstance(m, nn.Module) and m.__class__.__name__ == "ResBlock" for m in layer) for layer in seg.down_layers] == [1, 2, 4]
    assert count_parameters(seg) == segresnet_formula_count([8, 16, 32], [1, 2, 4], [1, 1], 2, 2, 27)


def test_segresnet_block_counts_follow_the_number_of_stages():
    assert stage_block_counts((1, 2, 2, 4), (1, 1, 1), 4) == ([1, 2, 2, 4], [1, 1, 1])
    assert stage_block_counts((1, 2, 2, 4), (1, 1, 1), 3) == ([1, 2, 4], [1, 1])
    assert stage_block_counts((1, 2, 2, 4), (1, 1, 1), 5) == ([1, 2, 2, 2, 4], [1, 1, 1, 1])
    assert stage_block_counts((1, 2, 2, 4), (2, 1), 2) == ([1, 4], [2])
    model = build_network("segresnet", small_topology(3), options=SegResNetOptions(blocks_down=(1, 1, 1), num_groups=4))
    assert model(torch.randn(1, 2, 8, 8, 8)).shape == (1, 2, 8, 8, 8)


def test_l1dfl_networks_reject_bad_topologies_and_options():
    for name in ("attention_unet", "segresnet"):
        with pytest.raises(ValueError, match="strides\\[0\\]"):
            build_network(name, NetworkTopology([4, 8], [[2, 2, 2], [2, 2, 2]], [[3, 3, 3]] * 2))
        with pytest.raises(ValueError, match="odd"):
            build_network(name, NetworkTopology([4, 8], [[1, 1, 1], [2, 2, 2]], [[3, 3, 3], [2, 2, 2]]))
        with pytest.raises(ValueError, match="at least 2 stages"):
            build_network(name, NetworkTopology([4], [[1, 1, 1]], [[3, 3, 3]]))
    with pytest.raises(ValueError, match="merge_block"):
        AttentionUNet(ATTENTION_PAPER, options=AttentionUNetOptions(merge_block="nope"))


@pytest.mark.parametrize("name", ["attention_unet", "segresnet"])
def test_l1dfl_networks_channels_last_3d_gives_the_same_logits(name):
    torch.manual_seed(1)
    model = build_network(name, small_topology(3)).eval()
    x = torch.randn(2, 2, 8, 8, 8)
    with torch.no_grad():
        reference = model(x)
        out = model.to(memory_format=torch.channels_last_3d)(x.contiguous(memory_format=torch.channels_last_3d))
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-5)
