from nnunet_dmoe.planners.nnUNetPlannerDMoE import DMoEPlannerMixin, nnUNetPlannerDMoE, nnUNetPlannerResEncMDMoE

__all__ = ["DMoEPlannerMixin", "nnUNetPlannerDMoE", "nnUNetPlannerResEncMDMoE"]
