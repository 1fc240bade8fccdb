"""Cost report of the distribution-aware MoE (the paper's Table 7): parameters, GFLOPs, time and peak memory.

For a configuration from the plans (``-d DATASET -c CONFIG [-p PLANS]``) or a built-in preset (``-preset``), the
network is built twice through :func:`nnunet_dmoe.networks.unet.build_attribute_network`: without dMoE (attribute mode
``none``, the plans' U-Net) and with it (``dmoe``, or ``moe``). Reported:

- parameters (all trainable tensors);
- GFLOPs of one inference forward pass at a large input (default: the paper's 3D 384x384x128, 2D 224x224),
  counted with :class:`torch.utils.flop_counter.FlopCounterMode` on the meta device (nothing is run). Convention
  of that counter: 2 FLOPs per multiply-add of convolutions and matrix products; normalisation, activations and
  elementwise ops are not counted (``thop``/``fvcore``-style counts report multiply-adds, half these numbers).
  The experts are custom ops (``nnunet_dmoe::experts_torch``, ``nnunet_dmoe::experts_triton``) that register
  their formulas, so the dMoE part is the sparse top-k computation that is executed: routers for every token
  plus ``k`` of ``E`` expert MLPs per token;
- measured time of eval forward (no_grad) and train forward+backward at a small patch (``-patch``, ``-b``),
  runs interleaved, medians;
- peak memory of forward+backward: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the largest sum of live
  tensor allocations seen by ``torch.profiler`` (``profile_memory``) during the step, plus the parameters.

Modules: :mod:`~.presets` (the networks compared), :mod:`~.flops` (parameters and FLOPs), :mod:`~.timing` (times,
peak memory, profiles), :mod:`~.train_step` (nnU-Net's training iteration), :mod:`~.report` (the report and its
table), :mod:`~.entry_point` (``nnUNetv2_dmoe_benchmark``).
"""
