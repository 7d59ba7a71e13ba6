"""Evaluation: text loading and scoring for perplexity and related metrics."""
