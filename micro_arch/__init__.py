"""micro-arch: compose language-model architectures from block strings, train, trace, sweep, compare."""

__version__ = "0.1.0"
