"""Import stand-in for wandb (threestudio imports it at module level; tests and our components never log to it)."""


def __getattr__(name):
    raise RuntimeError(f"wandb stand-in used (wandb.{name}): install wandb to log to Weights & Biases")
