"""Small builders shared by the tests."""
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

IMPORTS = ["conv_op", "norm_op", "dropout_op", "nonlin"]


def configuration(dim=3, residual=False, features=(8, 16, 32), **dmoe):
    n = len(features)
    conv = f"torch.nn.modules.conv.Conv{dim}d"
    norm = f"torch.nn.modules.instancenorm.InstanceNorm{dim}d"
    kw = {"n_stages": n, "features_per_stage": list(features), "conv_op": conv,
          "kernel_sizes": [[3] * dim] * n, "strides": [[1] * dim] + [[2] * dim] * (n - 1),
          "n_conv_per_stage_decoder": [1] * (n - 1), "conv_bias": True, "norm_op": norm,
          "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
          "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}}
    if residual:
        cls = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
        kw["n_blocks_per_stage"] = [1, 2, 2][:n] + [2] * max(0, n - 3)
    else:
        cls = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
        kw["n_conv_per_stage"] = [2] * n
    kw.update({f"dmoe_{k}": v for k, v in dmoe.items()})
    return ConfigurationManager({"architecture": {"network_class_name": cls, "arch_kwargs": kw,
                                                  "_kw_requires_import": IMPORTS}})
