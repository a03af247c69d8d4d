"""One edit example, whatever data set it comes from, with lazily loaded images."""

from __future__ import annotations

import bisect
import io
import itertools
import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from mgie.images import normalize_image


@dataclass(frozen=True)
class FileImage:
    """An image stored as a file."""

    path: Path

    def load(self) -> Image.Image:
        """The image as RGB (EXIF orientation applied, alpha composited on white)."""
        with Image.open(self.path) as img:
            img.load()
            return normalize_image(img).rgb


@dataclass(frozen=True)
class ParquetImage:
    """An image stored as encoded bytes in one cell of a parquet file (HF ``datasets`` layout:
    a struct column with ``bytes``/``path`` fields, or a plain binary column)."""

    path: Path
    row: int
    column: str

    def load(self) -> Image.Image:
        """Decode the cell, reading only the row group that holds it (the opened file is cached per
        process, so records stay small and picklable and DataLoader workers do not share handles)."""
        file, starts = _parquet_file(self.path)
        group = bisect.bisect_right(starts, self.row) - 1
        table = file.read_row_group(group, columns=[self.column])
        cell = table.column(self.column)[self.row - starts[group]].as_py()
        data = cell["bytes"] if isinstance(cell, dict) else cell
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return normalize_image(img).rgb


_PARQUET_FILES: dict[tuple[int, Path], tuple[object, list[int]]] = {}


def _parquet_file(path: Path):
    """``(pyarrow.parquet.ParquetFile, first row of each row group)``, opened once per process."""
    key = (os.getpid(), Path(path))
    if key not in _PARQUET_FILES:
        import pyarrow.parquet as pq

        file = pq.ParquetFile(path)
        sizes = [file.metadata.row_group(i).num_rows for i in range(file.num_row_groups)]
        _PARQUET_FILES[key] = (file, [0, *itertools.accumulate(sizes)][:-1])
    return _PARQUET_FILES[key]


@dataclass(frozen=True)
class EditRecord:
    """A (source, instruction, target) triplet and, when known, its expressive instruction."""

    id: str
    source: FileImage | ParquetImage
    target: FileImage | ParquetImage
    instruction: str
    expressive: str | None = None
