"""tune-llama: Ray Tune hyperparameter search over a fine-tuning loop for causal LMs on GSM8K."""

__version__ = "0.1.0"
