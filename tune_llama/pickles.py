"""Reading the pickles a search saved (Tune's ``tuner.pkl``, its searcher and search generator states) without
letting them reach outside the folder they are read from, and telling a pickle of an older tune-llama.

An Optuna ``RDBStorage`` opens its database as it is unpickled (``__setstate__`` creates its engine and tables),
at the path of the folder it was pickled in: a copied or moved search folder would open, or create, a
database in its original place. ``load_detached`` leaves every such storage closed (``Detached``, which keeps
only its URL). A pickle that names a module or class of tune-llama this version no longer has (renamed since
the search started) raises ``OlderState`` naming it, instead of an import error deep in Ray's restore.
No import of Ray or Optuna: the standard ``pickle`` reads what Ray's cloudpickle writes.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

OPTUNA_STORAGES = {("optuna.storages._rdb.storage", "RDBStorage")}
"""Optuna storages that open a database when unpickled: read as ``Detached`` instead."""


class OlderState(Exception):
    """A search's saved state names a piece of tune-llama this version does not have (a module or class
    renamed since the search started)."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name

    def __reduce__(self):
        return (type(self), (self.name,))


class Detached:
    """Stands for an Optuna storage inside a pickle read by ``load_detached``: its URL, no database opened."""

    def __init__(self, *args, **kwargs):
        self.url = None

    def __setstate__(self, state) -> None:
        self.url = state.get("url") if isinstance(state, dict) else None


class DetachingUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in OPTUNA_STORAGES:
            return Detached
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            if module.split(".")[0] == "tune_llama":
                raise OlderState(f"{module}.{name}") from None
            raise


def load_detached(data: bytes) -> Any:
    """Unpickle ``data`` with every Optuna storage in it left closed (``Detached``); ``OlderState`` naming the
    piece of tune-llama it refers to that this version lacks."""
    try:
        return DetachingUnpickler(io.BytesIO(data)).load()
    except ModuleNotFoundError as err:  # cloudpickle imports a by-value function's modules itself
        if (err.name or "").split(".")[0] == "tune_llama":
            raise OlderState(err.name) from None
        raise
