"""parsyn: synthesize parallel LLM-agent branches from their KV caches.

    lm = parsyn.load()                                   # embedded SmolLM2-135M-Instruct
    f = parsyn.fork(lm, "Why is the sky blue?", workers=3)
    s = parsyn.synthesize(lm, f, route="cache", layout="parallel")
    trained = parsyn.adapter.resolve(lm, "auto")         # the packaged synthesizer when it fits lm
"""

from . import adapter
from .kv import KV
from .model import LM, load
from .sampling import SamplingParams
from .synthesis import Synthesis, stream, synthesize
from .workers import Branch, Fork, fork, fork_many, from_texts

__all__ = ["KV", "LM", "Branch", "Fork", "SamplingParams", "Synthesis", "adapter", "fork", "fork_many", "from_texts",
           "load", "stream", "synthesize"]
