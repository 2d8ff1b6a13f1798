"""tunefast-native fine-tuning methods, one folder each (config, model, save/load):

    side/    memory-saving side tuning: a small ladder side network on the no-grad backbone's hidden states

Imported on demand (``from tunefast.methods import side``); nothing here is loaded with ``import tunefast``.
"""
