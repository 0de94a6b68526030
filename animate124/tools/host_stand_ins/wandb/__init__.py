"""Import stand-in for wandb: threestudio imports it at module level; our components never log to it.

Attribute look-ups raise AttributeError (not another error), so ``getattr(wandb, name, default)`` and
``hasattr`` behave as for any module that lacks the name.
"""


def __getattr__(name):
    raise AttributeError(f"wandb stand-in has no {name!r}: pip install wandb to log to Weights & Biases")
