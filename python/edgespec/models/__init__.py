"""Model configuration and the decoder."""
from .config import ModelConfig, config_from_hf
from .decoder import Decoder, ForwardOutput, GatedMLP, Layer

__all__ = ["Decoder", "ForwardOutput", "GatedMLP", "Layer", "ModelConfig", "config_from_hf"]
