"""The distillation loop and everything around it: data and caches, teacher adapter, logging, evaluation."""
