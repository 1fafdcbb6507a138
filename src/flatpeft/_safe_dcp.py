"""Reading ``torch.distributed.checkpoint`` (DCP) folders without running code from them.

DCP stores tensors with ``torch.load(weights_only=True)``, but its ``.metadata`` file (the index of
every shard) with plain ``pickle``: a crafted ``.metadata`` in a ``--fsdp`` checkpoint would run code
on ``--resume``. :class:`SafeReader` reads it with an unpickler that only builds DCP's own metadata
classes, ``torch.Size``, dtypes, layouts, memory formats and paths, and refuses anything else, naming
the file and the object it refused.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader

from ._train_config import ConfigError

__all__ = ["SafeReader"]

_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_ALLOWED = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),  # rebuilds a torch.layout from its name
    ("torch", "Size"),
    ("collections", "OrderedDict"),
    ("pathlib", "Path"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == _METADATA_MODULE or (module, name) in _ALLOWED:
            found = super().find_class(module, name)
            if isinstance(found, type) or (module, name) in _ALLOWED:
                return found
        elif module == "torch":
            found = getattr(torch, name, None)
            if isinstance(found, (torch.dtype, torch.layout, torch.memory_format)):
                return found
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


class SafeReader(FileSystemReader):
    """A ``FileSystemReader`` whose ``read_metadata`` refuses anything but checkpoint metadata.

    Raises:
        ConfigError: from :meth:`read_metadata`, naming the file, when it holds anything else.
    """

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        rank = kwargs.get("rank")
        path = Path(self.path) / (".metadata" if rank is None else f"__{rank}.metadata")
        try:
            with open(path, "rb") as file:
                metadata = _MetadataUnpickler(file).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, TypeError) as e:
            raise ConfigError(
                f"{path} is not checkpoint metadata that loads safely ({e}); it was not loaded. Use a "
                "checkpoint flatpeft wrote, or start a new --out"
            ) from e
        from torch.distributed.checkpoint import metadata as dcp_metadata

        if hasattr(dcp_metadata, "StorageMeta") and getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        if getattr(metadata, "storage_meta", None) is not None and hasattr(self, "load_id"):
            metadata.storage_meta.load_id = self.load_id
        return metadata
