"""parsyn: synthesize parallel LLM-agent branches from their KV caches.

    lm = parsyn.load()                                   # embedded SmolLM2-135M-Instruct
    f = parsyn.fork(lm, "Why is the sky blue?", workers=3)
    s = parsyn.synthesize(lm, f, route="cache", layout="parallel")
"""

from .decode import SamplingParams
from .model import LM, load
from .synthesis import Synthesis, synthesize
from .workers import Branch, Fork, fork, from_texts

__all__ = ["LM", "Branch", "Fork", "SamplingParams", "Synthesis", "fork", "from_texts", "load", "synthesize"]
