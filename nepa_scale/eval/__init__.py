"""Evaluation of representations: probes on frozen features (fine-tuning: the evaluation issue)."""
