"""The SpikingJelly 2.0.0 model-zoo families at test sizes, shared by the zoo test modules.

:func:`snncompile.zoo_compat.zoo_modules` imports ``spikingjelly.activation_based.model``'s
modules (behind the torchvision stand-in, so nothing downloads); :func:`build_small` builds one
family at the small size the tests run (T=2 where a model fixes T, 16-32 px inputs, narrow
widths) and returns it with its per-sample input shape.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from snncompile.zoo_compat import zoo_modules

__all__ = ["build_small", "zoo_modules"]


def build_small(name: str, sj: Any, zoo: dict[str, Any]) -> tuple[nn.Module, tuple[int, ...]]:
    """Family ``name`` at test size (``sj``: ``spikingjelly.activation_based``; ``zoo``:
    :func:`zoo_modules`) and its per-sample input shape."""
    neuron, surrogate, layer = sj.neuron, sj.surrogate, sj.layer
    sg = {"surrogate_function": surrogate.ATan(), "detach_reset": True}
    lif = {"spiking_neuron": neuron.LIFNode, **sg}
    if name == "spiking_resnet18":
        return zoo["spiking_resnet"].spiking_resnet18(num_classes=10, **lif), (3, 16, 16)
    if name == "sew_resnet18":
        return zoo["sew_resnet"].sew_resnet18(num_classes=10, cnf="ADD", **lif), (3, 16, 16)
    if name == "spiking_vgg_bn":
        net = zoo["spiking_vgg"].SpikingVGG(
            [8, "M", 512], batch_norm=True, num_classes=10, spiking_neuron=neuron.IFNode
        )
        # The real classifier is 512*7*7 -> 4096 -> 4096 (120M parameters): shrunk, same code.
        net.classifier = nn.Sequential(
            layer.Linear(512 * 49, 16), neuron.IFNode(**sg), layer.Dropout(), layer.Linear(16, 10)
        )
        return net, (3, 16, 16)
    if name == "MNISTNet":
        plif = {"spiking_neuron": neuron.ParametricLIFNode, **sg}
        return zoo["plif"].MNISTNet(channels=8, **plif), (1, 28, 28)
    if name == "CIFAR10Net":
        return zoo["plif"].CIFAR10Net(channels=8, **lif), (3, 32, 32)
    if name == "DVSGestureNet":
        return zoo["plif"].DVSGestureNet(channels=4, **lif), (2, 128, 128)
    if name == "MSResNet":
        net = zoo["ms_resnet"].MSResNet(
            T=2, num_classes=10, base_channels=8, layers=(1, 1, 1, 1), **sg
        )
        return net, (3, 16, 16)
    if name == "MaxResNet":
        return zoo["ms_resnet"].max_resnet18(T=2, num_classes=10, **sg), (3, 16, 16)
    if name == "MASNN":
        net = zoo["masnn"].MASNN(
            T=2,
            num_classes=11,
            input_size=(16, 16),
            channels=(8, 8, 8),
            fc_hidden=16,
            reduction_t=1,
            reduction_c=2,
            surrogate_function=surrogate.ATan(),
        )
        return net, (2, 16, 16)
    if name == "AttMSResNet":
        net = zoo["masnn"].AttMSResNet(
            T=2,
            num_classes=10,
            base_channels=8,
            layers=(1, 1, 1, 1),
            surrogate_function=surrogate.ATan(),
        )
        return net, (3, 16, 16)
    if name == "SpikeDrivenTransformer":
        net = zoo["sdt"].SpikeDrivenTransformer(
            T=2, num_classes=10, embed_dims=32, num_heads=2, depths=1
        )
        return net, (3, 32, 32)
    if name == "QKFormer":
        net = zoo["qkformer"].QKFormer(
            T=2, num_classes=10, embed_dims=32, num_heads=(1, 2, 2), depths=(1, 1, 1)
        )
        return net, (3, 32, 32)
    if name == "MaxFormer":
        net = zoo["maxformer"].MaxFormer(
            T=2, num_classes=10, embed_dims=32, depths=(1, 1, 1), cifar=True
        )
        return net, (3, 32, 32)
    if name == "Spikformer":
        net = zoo["spikformer"].Spikformer(
            T=2,
            img_size_h=32,
            img_size_w=32,
            patch_size=4,
            num_classes=10,
            embed_dims=32,
            num_heads=2,
            depths=1,
        )
        return net, (3, 32, 32)
    if name == "OTTTSpikingVGG":
        net = zoo["ottt"].OTTTSpikingVGG(
            [8, "M", 512], num_classes=10, spiking_neuron=neuron.OTTTLIFNode
        )
        return net, (3, 16, 16)
    raise KeyError(name)
