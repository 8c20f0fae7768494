"""The option keys each CLI command takes from ``--config FILE.yaml`` (besides ``hparams`` and
``original_hparams``). One table for the CLI (cli.py) and the recipes' ``options`` (recipes.py), so a
recipe can never use a key the CLI would refuse."""
from __future__ import annotations

RUN_KEYS = ("workers", "channels_last", "bf16")   # data pipeline / precision options of every training stage
TRAIN_KEYS = ("model", "data", "run_dir", "device", "seed", "img_size", "in_chans", "retrain", "max_per_class",
              "data_fraction", "forget", "eval_splits", "eval_train_max", "weights", "feature_layers", *RUN_KEYS)
COMPARE_API_KEYS = ("model", "data", "run_dir", "device", "seed", "img_size", "in_chans", "tsne_method",
                    "max_per_class", "data_fraction", "representation", "knn_data", "weights", "feature_layers",
                    *RUN_KEYS)  # passed to unlearn_fast.compare as they are

COMMAND_KEYS: dict[str, tuple[str, ...]] = {
    "demo": ("run_dir", "device", "threads", "model", "data", "seed", "retrain", *RUN_KEYS),
    "train": ("method", *TRAIN_KEYS, "threads"),
    "evaluate": ("run_dir", "device", "batch_size", "insertion_steps", "threads", "eval_splits", "eval_train_max",
                 "representation", "knn_data", *RUN_KEYS),
    "compare": (*COMPARE_API_KEYS, "forget", "methods", "threads", "idi"),
}
