"""``nnUNetv2_train ... -pretrained_weights <plain nnU-Net checkpoint>`` for the (d)MoE U-Nets: upcycling.

nnU-Net's ``-pretrained_weights`` goes through ``nnunetv2.run.run_training.load_pretrained_weights``, which needs
every weight of the new network in the checkpoint, so a plain nnU-Net checkpoint (no expert weights) cannot load
into a (d)MoE U-Net, and it leaves out the segmentation layers. nnU-Net has no trainer hook for this load. When one
of the plugin's trainers initialises, :func:`install` puts :func:`load_pretrained_weights` in that module's place:
for a network with ``load_plain_unet`` (:class:`nnunet_dmoe.networks.unet.AttributeUNet` with blocks) and a checkpoint
without expert weights, it upcycles (the U-Net loaded, segmentation layers included, the blocks starting as the
identity); for everything else it calls nnU-Net's function unchanged. Every DDP rank loads the same file.
"""
import torch
from torch._dynamo import OptimizedModule
from torch.nn.parallel import DistributedDataParallel as DDP

_NNUNET = {}


def _unwrapped(network):
    mod = network.module if isinstance(network, DDP) else network
    return mod._orig_mod if isinstance(mod, OptimizedModule) else mod


def load_pretrained_weights(network, fname, verbose=False):
    mod = _unwrapped(network)
    if getattr(mod, "moe", None) is not None and hasattr(mod, "load_plain_unet"):
        weights = torch.load(fname, map_location="cpu", weights_only=False)["network_weights"]
        if not any(k.startswith("moe.") for k in weights):
            notes = mod.load_plain_unet(weights)
            print(f"Upcycled the nnU-Net U-Net of {fname}: its weights loaded (segmentation layers included), every "
                  f"(d)MoE block starts as the identity, so the network predicts as the loaded one until fine-tuning "
                  f"moves the experts.")
            for note in notes:
                print(f"  {note}")
            return
    return _NNUNET["load_pretrained_weights"](network, fname, verbose=verbose)


def install() -> None:
    """Use :func:`load_pretrained_weights` for nnU-Net's ``-pretrained_weights`` (idempotent)."""
    import nnunetv2.run.run_training as run_training

    if run_training.load_pretrained_weights is not load_pretrained_weights:
        _NNUNET.setdefault("load_pretrained_weights", run_training.load_pretrained_weights)
        run_training.load_pretrained_weights = load_pretrained_weights
