"""prefalign: align language models to preference data (DPO family and PPO-based RLHF), measured side by side."""

__version__ = "0.1.0"
