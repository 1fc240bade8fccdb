"""Run with version 0.2's code on PYTHONPATH: a tiny dMoE U-Net as that version built it from a plans block."""
import sys
import torch
import nnunet_dmoe
from nnunet_dmoe.configuration import unet_configuration
from nnunet_dmoe.networks import build_attribute_network
from nnunet_dmoe.dmoe import DistributionAwareMoE

block = {"num_levels": 4, "attribute_channel": 1}  # what the trainers of version 0.2 wrote
torch.manual_seed(0)
cm = unet_configuration(2, (8, 16, 32), **block)
net = build_attribute_network(None, cm, 2, 3, False, routing="dmoe")
g = torch.Generator().manual_seed(1)
with torch.no_grad():
    for m in net.modules():
        if isinstance(m, DistributionAwareMoE):  # trained routers are not zero
            m.router.w_gate.copy_(torch.randn(m.router.w_gate.shape, generator=g))
net.eval()
x = torch.randn(4, 1, 16, 16, generator=g)
ch = torch.zeros(4, 1, 16, 16)
for i, code in enumerate([1, 2, 4, 0]):
    ch[i] = code
x = torch.cat([x, ch], 1)
with torch.no_grad():
    y = net(x)
torch.save({"version": "0.2 (ea6d6df)", "plans_block": block, "configuration": cm.configuration,
            "state_dict": net.state_dict(), "input": x, "output": y}, sys.argv[1])
print(sorted(k for k in net.state_dict() if "router" in k)[:4], y.abs().mean().item())
