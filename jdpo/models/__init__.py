"""Decoder models: one NNX transformer configured per family, HF import/export, sharded random init."""

from jdpo.models.families import FAMILIES, config_from_hf, config_to_hf, weight_table
from jdpo.models.hf import CheckpointError, from_pretrained, init_model, save_pretrained
from jdpo.models.hf_tokenizer import load_tokenizer
from jdpo.models.masks import AttentionMask
from jdpo.models.transformer import ModelConfig, ModelOptions, Transformer

__all__ = [
    "FAMILIES",
    "AttentionMask",
    "CheckpointError",
    "ModelConfig",
    "ModelOptions",
    "Transformer",
    "config_from_hf",
    "config_to_hf",
    "from_pretrained",
    "init_model",
    "load_tokenizer",
    "save_pretrained",
    "weight_table",
]
