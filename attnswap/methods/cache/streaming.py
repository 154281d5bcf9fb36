"""streaming (StreamingLLM, Xiao et al. 2023, arXiv 2309.17453): the first `sinks` tokens and the most recent."""
from pydantic import Field

from . import register
from .base import CacheOptions, CachePolicy


class StreamingOptions(CacheOptions):
    sinks: int = Field(4, ge=0, description="first tokens always kept")


@register
class Streaming(CachePolicy):
    name = "streaming"
    summary = "attention sinks + the most recent tokens (StreamingLLM)"
    Options = StreamingOptions

    def score(self, layer, rows):
        return layer.pos.float().masked_fill(layer.pos < self.options.sinks, float("inf"))
