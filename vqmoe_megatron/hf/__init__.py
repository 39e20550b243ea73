"""Hugging Face modelling, configuration and tokenizer code of exported VQMoE models.

The three modules are self-contained (torch, transformers and sentencepiece only): the exporter
(``vqmoe_megatron.convert.hf``) copies them into every HF directory, where ``trust_remote_code``
loads them.
"""
