"""The teachers' clean-image logits kept per dataset index: in memory, or on disk in an fp16 memory-mapped store.

A frozen teacher sees the same clean image behind a dataset index every epoch (a deterministic pipeline), so its
logits are computed once and reused (spec 2.1); :class:`LogitCache` is that store.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mmtard.errors import ConfigError
from mmtard.fileio import atomic_write_text

logger = logging.getLogger(__name__)


@torch.no_grad()
def frozen_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A frozen model's logits, without gradient."""
    return model(x, return_features=False)


class LogitCache:
    """Per-dataset-index logits of a frozen model, computed on first sight and reused (spec 2.1).

    Only correct when the image of an index never changes between epochs: enable it for deterministic
    pipelines (no random augmentation) only.

    Two stores:

    - in memory (the default, ``cache_dir=None``): float32 rows exactly as the model computed them, in CPU
      memory (``N x K`` floats: 17.5k x 5 on the CPU protocol, 1.28M x 1000 = 5 GB on ImageNet). A row's
      values depend on the batch it was first computed in (a forward of 3 rows and one of 8 differ in the last
      bits), so a training checkpoint saves the rows (:meth:`state_dict`) and a resume restores them
      (:meth:`load_state_dict`): the resumed run reads the same values as the uninterrupted one.
    - on disk (``cache_dir``): an fp16 memory-mapped array of ``rows x K`` (``logits.npy``, 2.6 GB for
      ImageNet, paged in by the OS, no RAM of its own), a filled-row mask (``filled.npy``, one byte per row)
      and ``cache.json`` (rows, classes, ``identity``). Rows survive the process: a resumed or later run
      with the same ``identity`` reuses them and forwards only rows never seen. **fp16 rounding applies**:
      every row, the first time too, is returned as stored, rounded to fp16 (relative error at most
      2**-11, e.g. 0.008 on a logit of 30), so every epoch sees the same values; logits beyond fp16's
      range (65504) are refused. Rows are written before their mask entries (each flushed), so a crash
      leaves at worst rows computed again, never a marked row that was not written; a folder whose
      ``cache.json`` is missing, unreadable or of another ``identity`` is started over. Under several
      processes (DDP), construct the cache with ``classes`` on rank 0 first (it creates the files then),
      then, after a barrier, on the others (they open them): the processes share the files, each writing
      the rows of its own indices.

    Args:
        cache_dir: a folder for the disk store; None keeps the rows in memory.
        rows: the dataset's size (required with ``cache_dir``): indices are ``0..rows-1``.
        identity: what the logits depend on (the model and its weights, the dataset, split, image size,
            classes...), JSON-serialisable; a folder written for another identity is started over.
        classes: logits per row; given, a missing store is created here, else at the first forward.

    Raises:
        ConfigError: ``cache_dir`` without a positive ``rows``, or a path that is not a folder.
    """

    LOGITS_FILE = "logits.npy"
    FILLED_FILE = "filled.npy"
    META_FILE = "cache.json"
    FP16_MAX = 65504.0

    def __init__(
        self,
        cache_dir: str | Path | None = None,
        rows: int | None = None,
        identity: object = None,
        classes: int | None = None,
    ) -> None:
        self._rows: dict[int, torch.Tensor] = {}
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.num_rows = rows
        self.identity = json.loads(json.dumps(identity, sort_keys=True))
        self._logits: np.ndarray | None = None  # the disk store's (rows, K) float16 memmap, once open
        self._filled: np.ndarray | None = None  # its (rows,) bool memmap
        if self.cache_dir is not None:
            if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
                raise ConfigError(f"cache_dir: a disk cache needs rows = the dataset's size (>= 1), got {rows!r}")
            if self.cache_dir.exists() and not self.cache_dir.is_dir():
                raise ConfigError(f"cache_dir: '{self.cache_dir}' is a file, expected a folder")
            self._open_existing()
            if self._logits is None and classes is not None:
                self._create(classes)

    def __len__(self) -> int:
        if self.cache_dir is None:
            return len(self._rows)
        return 0 if self._filled is None else int(np.count_nonzero(self._filled))

    def state_dict(self) -> dict[str, torch.Tensor] | None:
        """The in-memory rows, ``{"index": (n,) int64, "logits": (n, K) float32}`` in the order they were
        computed; None for the disk store, which keeps its rows itself."""
        if self.cache_dir is not None:
            return None
        keys = list(self._rows)
        rows = torch.stack([self._rows[key] for key in keys]) if keys else torch.zeros(0, 0)
        return {"index": torch.tensor(keys, dtype=torch.int64), "logits": rows}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the in-memory rows with :meth:`state_dict`'s (bitwise the saved values)."""
        index, logits = state["index"], state["logits"]
        if index.ndim != 1 or logits.shape[0] != index.shape[0]:
            raise ValueError(f"a logit cache state of {tuple(index.shape)} indices and {tuple(logits.shape)} rows")
        self._rows = {int(key): row.clone() for key, row in zip(index.tolist(), logits.float())}

    def logits(self, model: nn.Module, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Logits of ``model`` on ``x`` whose rows have dataset indices ``index``; forwards only unseen rows."""
        if self.cache_dir is not None:
            return self._disk_logits(model, x, index)
        keys = index.tolist()
        missing = [i for i, key in enumerate(keys) if key not in self._rows]
        if missing:
            computed = frozen_forward(model, x[missing]).float().cpu()
            for i, row in zip(missing, computed):
                self._rows[keys[i]] = row.clone()
        return torch.stack([self._rows[key] for key in keys]).to(x.device, non_blocking=True)

    def _disk_logits(self, model: nn.Module, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        keys = index.detach().cpu().numpy().astype(np.int64)
        if keys.size and (keys.min() < 0 or keys.max() >= self.num_rows):
            raise ConfigError(
                f"cache_dir: dataset index {int(keys.max() if keys.max() >= self.num_rows else keys.min())} is "
                f"outside the cache's rows 0..{self.num_rows - 1} (rows must be the dataset's size)"
            )
        missing = np.arange(len(keys)) if self._filled is None else np.flatnonzero(~self._filled[keys])
        if missing.size:
            computed = frozen_forward(model, x[torch.from_numpy(missing).to(x.device)]).float().cpu().numpy()
            self._write_rows(keys[missing], computed)
        rows = np.asarray(self._logits[keys], dtype=np.float32)
        return torch.from_numpy(rows).to(x.device, non_blocking=True)

    def _write_rows(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Store ``values`` (float32 ``(n, K)``) at rows ``keys``: rows first, then their mask entries."""
        if self._logits is None:
            self._create(values.shape[1])
        elif values.shape[1] != self._logits.shape[1]:
            raise ConfigError(
                f"cache_dir: '{self.cache_dir}' holds {self._logits.shape[1]} logits per row, the model gives "
                f"{values.shape[1]}; give each label set its own folder (or identity)"
            )
        largest = float(np.abs(values).max()) if values.size else 0.0
        if not largest <= self.FP16_MAX:
            raise ConfigError(
                f"cache_dir: the model's logits reach {largest:g}, beyond fp16's range ({self.FP16_MAX:g}); "
                "keep this cache in memory"
            )
        self._logits[keys] = values.astype(np.float16)
        self._logits.flush()
        self._filled[keys] = True
        self._filled.flush()

    def _paths(self) -> tuple[Path, Path, Path]:
        return self.cache_dir / self.LOGITS_FILE, self.cache_dir / self.FILLED_FILE, self.cache_dir / self.META_FILE

    def _open_existing(self) -> None:
        """Open the folder's store if ``cache.json`` describes this cache and the arrays match it."""
        logits_path, filled_path, meta_path = self._paths()
        if not meta_path.is_file():
            return
        try:
            meta = json.loads(meta_path.read_text())
            matches = meta["rows"] == self.num_rows and meta["identity"] == self.identity
            if matches:
                logits = np.lib.format.open_memmap(logits_path, mode="r+")
                filled = np.lib.format.open_memmap(filled_path, mode="r+")
                shapes_match = logits.shape == (self.num_rows, meta["classes"]) and filled.shape == (self.num_rows,)
                if shapes_match and logits.dtype == np.float16 and filled.dtype == np.bool_:
                    self._logits, self._filled = logits, filled
                    logger.info("%s: reusing %d of %d cached rows", self.cache_dir, len(self), self.num_rows)
                    return
        except (OSError, ValueError, KeyError, TypeError):
            pass
        logger.warning("%s: written for another cache (or incomplete); starting it over", self.cache_dir)

    def _create(self, classes: int) -> None:
        """A new store of ``rows x classes``: arrays first, then ``cache.json`` (atomically), which marks it valid."""
        logits_path, filled_path, meta_path = self._paths()
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        meta_path.unlink(missing_ok=True)  # until the arrays exist, the folder is not a valid cache
        logits = np.lib.format.open_memmap(logits_path, mode="w+", dtype=np.float16, shape=(self.num_rows, classes))
        filled = np.lib.format.open_memmap(filled_path, mode="w+", dtype=np.bool_, shape=(self.num_rows,))
        logits.flush()
        filled.flush()
        meta = {"format": 1, "rows": self.num_rows, "classes": classes, "dtype": "float16", "identity": self.identity}
        atomic_write_text(meta_path, json.dumps(meta, sort_keys=True, indent=2))
        self._logits, self._filled = logits, filled
