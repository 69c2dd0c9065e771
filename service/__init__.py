"""tapefit: fit models with custom TensorFlow training loops, over HTTP."""

__version__ = "0.1.0"
