"""The method: the (distribution-aware) mixture-of-experts layer, its settings and routing, and its expert kernels."""
