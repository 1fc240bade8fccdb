from nnunet_dmoe.fairness.adversary import AdversarialNetwork
from nnunet_dmoe.fairness.losses import AdversarialLoss
from nnunet_dmoe.plans.blocks import read_dmoe_block
from nnunet_dmoe.trainers.seam.fairness_loss_base import nnUNetTrainerFairnessLossBase


class nnUNetTrainerAdversarial(nnUNetTrainerFairnessLossBase):
    """Adversarial debiasing (Madras et al., 2018 style): the plans' U-Net plus an attribute classifier on the
    bottleneck behind a gradient-reversal layer of weight adversary_weight; classifier accuracy logged each epoch.
    Prediction: nnU-Net's predictor, the classifier unused."""

    adversary_weight = 0.1  # gradient reversal scale: the encoder gets -adversary_weight x the classifier's gradient

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels,
                                   num_output_channels, enable_deep_supervision: bool = True):
        segmenter = super().build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                       num_output_channels, enable_deep_supervision)
        num_levels = read_dmoe_block(configuration_manager)["num_levels"]
        if isinstance(num_levels, list):  # several attributes: the classifier predicts the first (its groups)
            num_levels = num_levels[0]
        return AdversarialNetwork(segmenter, num_levels, cls.adversary_weight)

    def _build_loss(self):
        return AdversarialLoss(super()._build_loss(), self.attribute.levels)


class nnUNetTrainerAdversarial_w0p01(nnUNetTrainerAdversarial):
    """Adversarial debiasing with gradient-reversal weight 0.01."""
    adversary_weight = 0.01


class nnUNetTrainerAdversarial_w1(nnUNetTrainerAdversarial):
    """Adversarial debiasing with gradient-reversal weight 1."""
    adversary_weight = 1.0
