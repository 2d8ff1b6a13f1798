"""tunefast-native fine-tuning methods, one folder each (config, model, save/load):

    side/    memory-saving side tuning: a small ladder side network on the no-grad backbone's hidden states
    sparse/  sparse fine-tuning: trainable sparse weight deltas (SDDMM gradients), merge / unmerge, composition

Both are exported as ``tunefast.side`` and ``tunefast.sparse``.
"""
