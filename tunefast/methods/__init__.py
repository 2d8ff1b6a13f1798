"""tunefast-native fine-tuning methods, one folder each (config, model, save/load):

    adapters/  bottleneck and parallel adapters (Houlsby, Pfeiffer, He et al.) on the fused adapter op
    side/      memory-saving side tuning: a small ladder side network on the no-grad backbone's hidden states
    sparse/    sparse fine-tuning: trainable sparse weight deltas (SDDMM gradients), merge / unmerge, composition

Exported as ``tunefast.adapters``, ``tunefast.side`` and ``tunefast.sparse``.
"""
