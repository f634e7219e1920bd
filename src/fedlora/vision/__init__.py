"""Vision parts: the packaged EfficientNet-Lite0 encoder and the vision-language model built on it."""
