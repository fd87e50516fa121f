"""The names of the files looplm's directories hold, in one place that imports nothing (the config
layer reads these paths and may not import the checkpoint or data modules that write them).

A checkpoint directory: ``CONFIG_FILE``, ``WEIGHTS_FILE``, ``TOKENIZER_FILE`` (and a training
checkpoint's ``RUN_CONFIG_FILE``, ``TRAIN_STATE_FILE``); a prepared data directory: the split
shards, ``META_FILE`` and ``TOKENIZER_FILE``.
"""

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
RUN_CONFIG_FILE = "run_config.json"
TRAIN_STATE_FILE = "train_state.pt"
META_FILE = "meta.json"
# The format marker and version a looplm checkpoint's config.json carries (a newer version is refused).
CHECKPOINT_FORMAT = "looplm"
CHECKPOINT_VERSION = 1
