"""Named layouts of the vectors that cross between Python and the compiled loop.

A compiled call takes and returns a few flat float64 vectors: one tensor in and one out is
one host-to-device and one device-to-host copy, where a structure of tensors costs a copy
(and microseconds) per field. The layout of each vector is stated here, by name and size,
and both sides read and write it through the same :class:`Layout`, so an off-by-one is not
a comment that drifted but a field that does not exist.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True, slots=True)
class Layout:
    """Named fields laid end to end in one vector. A field of size None is a scalar (one
    element, read back as a scalar); the last field may be open-ended (size -1), taking the
    rest of the vector (e.g. a history of variable length)."""

    fields: tuple[tuple[str, int | None], ...]
    _slices: dict[str, slice | int] = field(init=False, repr=False, compare=False)
    size: int = field(init=False)

    def __post_init__(self) -> None:
        slices: dict[str, slice | int] = {}
        start = 0
        for i, (name, size) in enumerate(self.fields):
            if size is None:
                slices[name] = start
                start += 1
            elif size < 0:
                if i != len(self.fields) - 1:
                    raise ValueError("only the last field may be open-ended")
                slices[name] = slice(start, None)
            else:
                slices[name] = slice(start, start + size)
                start += size
        object.__setattr__(self, "_slices", slices)
        object.__setattr__(self, "size", start)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.fields)

    @classmethod
    def of(cls, **sizes: int | None) -> Layout:
        return cls(tuple(sizes.items()))

    def read(self, vector: Any, name: str) -> Any:
        """One field of ``vector`` (a numpy array or a tensor): a view or a scalar."""
        return vector[self._slices[name]]

    def columns(self, rows: Any) -> dict[str, Any]:
        """The scalar fields of one vector ``[S]`` or of every row of ``[..., S]`` at once,
        by name (a loss written with them serves single and batch fits alike)."""
        return {name: rows[..., where] for name, where in self._slices.items()}

    def unpack(self, vector: Any) -> dict[str, Any]:
        return {name: vector[where] for name, where in self._slices.items()}

    def sub(self, names: tuple[str, ...]) -> Layout:
        """The layout of only these fields, in this layout's order."""
        return Layout(tuple((name, size) for name, size in self.fields if name in names))

    def positions(self, names: tuple[str, ...]) -> list[int]:
        """The indices, in this layout's vector, of these fields' elements in layout order
        (:meth:`sub`'s vector is this vector at these indices)."""
        out: list[int] = []
        for name in self.names:
            if name in names:
                where = self._slices[name]
                out.extend([where] if isinstance(where, int) else range(where.start, where.stop))
        return out

    def pack(self, parts: Mapping[str, Any]) -> npt.NDArray[np.float64]:
        """One float64 vector of the parts (numpy side), in layout order."""
        return np.concatenate([np.ravel(np.asarray(v, np.float64)) for v in self.order(parts)])

    def order(self, parts: Mapping[str, Any]) -> list[Any]:
        """The parts in layout order (to concatenate); every field must be given."""
        missing = [name for name, _ in self.fields if name not in parts]
        if missing or len(parts) != len(self.fields):
            raise ValueError(f"layout fields {missing} missing, or unknown fields given")
        return [parts[name] for name, _ in self.fields]
