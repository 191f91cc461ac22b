"""The programs behind train.py and sample.py (also installed as apl-train and apl-sample)."""
