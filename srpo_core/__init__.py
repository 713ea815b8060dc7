"""srpo: reset-based credit assignment (SRPO, RRPO) beside GRPO for language-model RL."""

__version__ = "0.1.0"
