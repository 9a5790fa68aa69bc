"""AI feedback: sample completions, label them with a judge, and iterate sample -> label -> DPO."""
