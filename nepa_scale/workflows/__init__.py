"""Workflows over a whole study, above the launcher: the demo, attached fine-tunes, the transfer
comparison, and probing or scoring a finished run from its checkpoint."""
