"""The packaged recipes (``*.yaml``) and DeepSpeed configs (``deepspeed/*.json``): data, no code.
``dmc.train.recipes`` finds them by name."""
