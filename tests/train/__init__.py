"""Tests of the `train` package (QAT fine-tuning)."""
