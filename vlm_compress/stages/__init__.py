from .encoder import EncoderStage, RewrittenInputs

__all__ = ["EncoderStage", "RewrittenInputs"]
