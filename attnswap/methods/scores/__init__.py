"""Score modifiers (one file per modifier): each changes the scores of the softmax attention a layer runs,
before its softmax. Attention methods that form explicit scores (`AttentionMethod.takes_scores`) and the
layers that keep the original attention apply them."""
from .. import Registry
from .base import ScoreModifier

REGISTRY = Registry("scores", __name__, ScoreModifier)
register = REGISTRY.register

__all__ = ["REGISTRY", "ScoreModifier", "register"]
