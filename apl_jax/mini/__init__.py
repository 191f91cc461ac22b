"""APL-mini: a scale model of the paper's experiment, small enough to measure anonymization on a CPU."""
