"""Input pipeline: APL prompt pairs and the example sources feeding the training step."""
