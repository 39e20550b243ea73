"""Checkpoints: writing and reading them, and opening whatever path a user gave.

* ``opened``: :func:`~vqmoe_megatron.checkpoint.opened.open_checkpoint` — run directory,
  ``checkpoints/``, step directory, consolidated directory, Hugging Face export
  -> the weights, config, tokenizer record and routing facts; used by training, fine-tuning,
  conversion and evaluation alike.
* ``training``: layout-free, crash-safe training checkpoints (``CheckpointManager``).
* ``consolidated``: one safetensors file of full fp32 tensors + the run config.
* ``hf_export``: the HF export's tensor names (both directions) and its config read back.
* ``files``: the integrity record every consumer checks before reading.
* ``errors``: :class:`~vqmoe_megatron.checkpoint.errors.CheckpointError`.

Nothing is imported here, so that the light modules (``errors``, ``files``) stay light.
"""
