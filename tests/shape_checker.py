"""The runtime shape/type checker of the shape-checking tier (see .ci/run):
``pytest tests/unit --jaxtyping-packages=animate124.core,shape_checker.typechecker``.

beartype with the PEP 484 numeric tower, so an ``int`` passes where a ``float`` is declared (as Python's typing
intends)."""
from beartype import BeartypeConf, beartype

typechecker = beartype(conf=BeartypeConf(is_pep484_tower=True))
