"""Point-cloud file readers: every format comes back as a float32 ``[N, C]`` numpy array with
x, y, z first (or float64, on request: ``dtype=np.float64``, or ``dtype=None`` for float64 only
where the file's coordinates need it).

======================  ====================================================================
suffix                  layout
======================  ====================================================================
``.bin``                KITTI / Waymo raw little-endian float32, ``point_dims`` columns (4)
``.pcd.bin``            nuScenes raw float32, 5 columns (x, y, z, intensity, ring)
``.npy``                a 2-D array
``.npz``                its only array, or the one named ``points``, ``pc``, ``point_cloud``,
                        ``lidar`` or ``xyz``
``.pcd``                PCD 0.7 (PCL): ascii, binary or binary_compressed
``.ply``                PLY 1.0: ascii, binary_little_endian or binary_big_endian; the points
                        are the ``vertex`` element
======================  ====================================================================

For ``.bin`` files ``point_dims`` is the number of columns in the file; for the other formats
it keeps the first ``point_dims`` columns. Values are returned as stored (converted to the
``dtype`` asked for): NaN or infinite points are kept (the voxelizer drops them).

Coordinates far from the origin need float64: in a map or UTM frame float32's spacing is 3 cm
near 5e5 m and 25 cm near 4e6 m, so rounding them moves points into other voxels. With
``dtype=None`` a file whose x, y or z is stored as float64, or as an integer wider than 16 bits
(float32 holds integers exactly only up to 2**24), is read as float64; the voxelizer bins
float64 points in float64. The ``spconv-lite`` command reads that way.

``.pcd`` and ``.ply`` files give x, y, z (of any numeric type), then the file's other per-point
fields in file order, each under its name, except: PCL's padding fields ``_`` are dropped; a
PCD field of ``COUNT`` k gives the columns ``NAME_0`` .. ``NAME_k-1``; normals (``normal_x``,
``normal_y``, ``normal_z`` or ``nx``, ``ny``, ``nz``) and colours (``red``, ``green``, ``blue``)
give ``normals_0`` .. ``normals_2`` and ``colors_0`` .. ``colors_2`` where all three are present;
a PCD ``rgb`` or ``rgba`` field (PCL's packed colour) gives its 8-bit red, green and blue as
``colors_0`` .. ``colors_2``. Ascii values must be numbers of their field's type (``nan`` and
``inf`` are numbers); a value that is not, or a file shorter than its header declares, raises a
ValueError naming the file and the point.
"""

from __future__ import annotations

import math
import os
import struct
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np
from numpy.typing import DTypeLike

from ._extension import _C
from .tensor import check_count

__all__ = [
    "SUPPORTED_SUFFIXES", "read_points", "read_points_with_fields", "read_cloud", "is_point_file"
]

PathLike = Union[str, os.PathLike]
SUPPORTED_SUFFIXES = (".pcd.bin", ".bin", ".npy", ".npz", ".pcd", ".ply")
_NPZ_KEYS = ("points", "pc", "point_cloud", "lidar", "xyz")
_XYZ = ("x", "y", "z")
_NUSCENES_COLUMNS = 5  # .pcd.bin: x, y, z, intensity, ring index
_BIN_DEFAULT_COLUMNS = 4  # KITTI: x, y, z, intensity
# No LiDAR point lies 10,000 km (1e7 m) away, but a raw .bin read with the wrong column count or
# dtype does (a float64 file, or a timestamp column such as Waymo's read as x, y or z).
_ABSURD_COORDINATE = 1e7
_ABSURD_SHARE = 0.01  # more than this share of such points means the layout is wrong


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in SUPPORTED_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return ""


def is_point_file(path: PathLike) -> bool:
    """Whether ``path`` has a suffix that :func:`read_points` reads."""
    return _suffix(Path(path)) != ""


def read_points(
    path: PathLike, point_dims: Optional[int] = None, dtype: DTypeLike = np.float32
) -> np.ndarray:
    """Reads a point cloud file as ``[N, C]`` points of ``dtype``, float32 by default (see the
    module docstring for formats).

    Args:
        path: the file.
        point_dims: columns of a raw ``.bin`` file (default 4, 5 for ``.pcd.bin``); for the
            other formats, how many leading columns to keep (default all).
        dtype: ``np.float32`` (the default), ``np.float64``, or None: float64 where the file
            stores x, y or z in a type that float32 does not hold exactly (float64, or an
            integer wider than 16 bits), float32 otherwise.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: naming the argument, for a ``point_dims`` that is not a whole number of at
            least 3, a ``dtype`` other than those, an unknown suffix, a path that is not a
            regular file (a FIFO, a folder), a ``.bin`` size that is not a multiple of
            ``4 * point_dims``, a ``point_dims`` larger than the file's columns, content that
            is not a 2-D array with at least 3 columns, an empty, corrupt or pickled ``.npy`` /
            ``.npz`` or one whose header declares more data than it holds, or a ``.pcd`` /
            ``.ply`` whose header is malformed or disagrees with its data, or whose ascii data
            holds a value that is not a number of its field's type.

    Example:
        >>> pts = read_points("000000.bin")  # doctest: +SKIP
        >>> pts.shape, pts.dtype  # doctest: +SKIP
        ((115384, 4), dtype('float32'))
    """
    return read_points_with_fields(path, point_dims, dtype)[0]


def read_points_with_fields(
    path: PathLike, point_dims: Optional[int] = None, dtype: DTypeLike = np.float32
) -> tuple[np.ndarray, list[str]]:
    """Like :func:`read_points`, also returning a name per column (``x, y, z, ...``; ``c3``,
    ``c4``... where the format has no names)."""
    path = Path(path)
    suffix = _suffix(path)
    if not suffix:
        raise ValueError(
            f"path {str(path)!r} has an unsupported suffix; supported: "
            + ", ".join(SUPPORTED_SUFFIXES)
        )
    point_dims = _check_point_dims(point_dims)
    dtype = _check_dtype(dtype)
    if not path.exists():
        raise FileNotFoundError(f"no such point cloud file: {str(path)!r}")
    if not path.is_file():  # a FIFO would block the read until something writes to it
        raise ValueError(f"{str(path)!r} is not a regular file")
    names: Optional[list[str]] = None
    if suffix in (".bin", ".pcd.bin"):
        columns = point_dims if point_dims is not None else _default_columns(suffix)
        size = path.stat().st_size
        if size % (4 * columns):
            raise ValueError(
                f"{str(path)!r} has {size} bytes, not a multiple of 4 * point_dims = "
                f"{4 * columns}: is point_dims={columns} the file's number of float32 columns?"
            )
        points = np.fromfile(path, dtype="<f4").reshape(-1, columns)
        point_dims = None  # already applied
    elif suffix in (".npy", ".npz"):
        points = _read_numpy(path, suffix)
    else:
        points, names = _read_pcd_ply(path, suffix, dtype)
    points = _as_points(points, path)
    if point_dims is not None:
        if int(point_dims) > points.shape[1]:
            raise ValueError(
                f"point_dims={point_dims} but {str(path)!r} has {points.shape[1]} columns"
            )
        points = points[:, : int(point_dims)]
    if names is None:
        names = [*_XYZ, *(f"c{j}" for j in range(3, points.shape[1]))]
    dtype = _points_dtype(dtype, [points.dtype])
    return np.ascontiguousarray(points, dtype=dtype), names[: points.shape[1]]


def _check_dtype(dtype: DTypeLike) -> Optional[np.dtype]:
    """``dtype`` as a numpy float32 or float64 type (None stays None: chosen per file)."""
    if dtype is None:
        return None
    try:
        checked = np.dtype(dtype)
    except TypeError:
        checked = None
    if checked is None or checked.kind != "f" or checked.itemsize not in (4, 8):
        raise ValueError(f"dtype must be np.float32, np.float64 or None, got {dtype!r}")
    return checked.newbyteorder("=")  # the points come back in the machine's byte order


def _points_dtype(dtype: Optional[np.dtype], coordinate_types: list[np.dtype]) -> np.dtype:
    """The type of the points returned: ``dtype``, or for None float64 where a coordinate's
    stored type holds values that float32 rounds (float64, integers wider than 16 bits)."""
    if dtype is not None:
        return dtype
    wide = any(t.itemsize > (4 if t.kind == "f" else 2) for t in coordinate_types)
    return np.dtype(np.float64 if wide else np.float32)


def _check_point_dims(point_dims) -> Optional[int]:
    """``point_dims`` as an int (None stays None): a whole number of columns, at least 3."""
    return None if point_dims is None else check_count(point_dims, "point_dims", least=3)


def _default_columns(suffix: str) -> int:
    return _NUSCENES_COLUMNS if suffix == ".pcd.bin" else _BIN_DEFAULT_COLUMNS


def read_cloud(
    path: PathLike, point_dims: Optional[int] = None, dtype: DTypeLike = np.float32
) -> tuple[np.ndarray, str]:
    """Reads a point cloud as the ``spconv-lite`` command does, refusing what looks wrong.

    Stricter than :func:`read_points`:

    * where the format states the width (``.npy`` / ``.npz`` arrays, ``.pcd`` / ``.ply``
      fields, 5 columns for nuScenes ``.pcd.bin``), a ``point_dims`` that differs is refused;
    * a raw ``.bin`` (``point_dims`` float32 columns, 4 by default) is refused when its rows
      show a wrong column count or dtype: more than 1% of the points with a coordinate beyond
      10,000 km (the message suggests a column count that gives plausible points);
    * a file without points is refused.

    Args:
        path: the file.
        point_dims: columns of a raw ``.bin`` file; for the other formats, None or their width.
        dtype: as for :func:`read_points` (the command passes None).

    Returns:
        ``(points, layout)``: ``[N, C]`` points of that type and how the file was read, e.g.
        ``"4 float32 columns (the .bin default)"``.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: naming the file, for the cases above and those of :func:`read_points`.

    Example:
        >>> points, layout = read_cloud("000000.bin")  # doctest: +SKIP
        >>> layout  # doctest: +SKIP
        '4 float32 columns (the .bin default)'
    """
    point_dims = _check_point_dims(point_dims)
    path = Path(path)
    suffix = _suffix(path)
    if suffix == ".pcd.bin" and point_dims not in (None, _NUSCENES_COLUMNS):
        raise ValueError(
            f"{str(path)!r} is named as a nuScenes .pcd.bin file, which has 5 float32 columns "
            f"(x, y, z, intensity, ring), but point_dims={point_dims}"
        )
    if suffix == ".bin":
        columns = _BIN_DEFAULT_COLUMNS if point_dims is None else point_dims
        points = read_points(path, columns, dtype)
        layout = f"{columns} float32 columns" + (
            " (the .bin default)" if point_dims is None else f" (point_dims={columns})"
        )
        _check_raw_layout(path, points, layout)
    else:
        points = read_points(path, dtype=dtype)
        layout = f"{points.shape[1]} " + (
            "float32 columns (nuScenes .pcd.bin)" if suffix == ".pcd.bin" else "columns"
        )
        if point_dims is not None and point_dims != points.shape[1]:
            raise ValueError(
                f"{str(path)!r} has {points.shape[1]} columns, but point_dims={point_dims}: "
                f"the {suffix} format states its width (leave point_dims out)"
            )
    if len(points) == 0:
        raise ValueError(f"{str(path)!r} holds no points")
    return points, layout


def _absurd_share(rows: np.ndarray) -> float:
    """Share of the rows whose x, y or z is finite and beyond any LiDAR's reach."""
    xyz = rows[:, :3]
    with np.errstate(invalid="ignore"):
        absurd = (np.isfinite(xyz) & (np.abs(xyz) > _ABSURD_COORDINATE)).any(axis=1)
    return float(absurd.mean()) if len(rows) else 0.0


def _repeat_width(rows: np.ndarray) -> Optional[int]:
    """The width ``w`` (a divisor of the row width, at least 3) for which every row looks like
    several consecutive points of ``w`` columns, or None.

    Consecutive points of a scan are neighbours: read with a multiple of the true column count,
    a row's x, y, z (columns 0-2) and those of the next point in it (columns w..w+2) differ by
    a small fraction of the cloud's spread. Real columns (intensity, normals, time) do not.
    """
    width = rows.shape[1]
    for w in range(3, width // 2 + 1):
        if width % w:
            continue
        a, b = rows[:, :3], rows[:, w : w + 3]
        finite = np.isfinite(a).all(axis=1) & np.isfinite(b).all(axis=1)
        a, b = a[finite].astype(np.float64), b[finite].astype(np.float64)
        if len(a) < 100:  # too few rows to tell
            return None
        step = np.median(np.linalg.norm(a - b, axis=1))
        spread = np.median(np.linalg.norm(a - np.median(a, axis=0), axis=1))
        if step < 0.2 * spread:  # measured: below 0.08 for such rows, above 1 for real ones
            return w
    return None


def _check_raw_layout(path: Path, points: np.ndarray, layout: str) -> None:
    """Refuses a raw .bin whose coordinates show that ``layout`` is not the file's."""
    if _absurd_share(points) > _ABSURD_SHARE:
        floats = points.reshape(-1)
        plausible = [
            w for w in range(3, 17)
            if floats.size % w == 0 and _absurd_share(floats.reshape(-1, w)) <= _ABSURD_SHARE
            and _repeat_width(floats.reshape(-1, w)) is None
        ]
        hint = (
            f"{plausible[0]} float32 columns give plausible coordinates: pass point_dims="
            f"{plausible[0]}" if plausible else
            "no float32 column count from 3 to 16 gives plausible coordinates: is it float32?"
        )
        raise ValueError(
            f"{str(path)!r} read as {layout}: {_absurd_share(points):.0%} of its points have a "
            "coordinate beyond 10,000 km, so that is not the file's layout; "
            + hint
        )
    # Rows that look like several consecutive points are not refused: that is a valid layout
    # too (x, y, z, then the point's position in the previous sweep), and a column count the
    # caller gives is theirs to choose. _repeat_width only keeps such counts out of the hint.


def _as_points(array: np.ndarray, path: Path) -> np.ndarray:
    # Integers and real floats only: complex values would lose their imaginary part and
    # timedelta64 its unit, silently.
    if array.ndim != 2 or array.shape[1] < 3 or array.dtype.kind not in "iuf":
        raise ValueError(
            f"{str(path)!r} must hold a numeric [N, C] array with C >= 3 (x, y, z first), got "
            f"shape {list(array.shape)} of {array.dtype}"
        )
    return array


def _read_numpy(path: Path, suffix: str) -> np.ndarray:
    """The array of a .npy file or the points of a .npz archive; an empty, cut-short, corrupt or
    pickled file raises ValueError naming it (numpy raises EOFError, BadZipFile, zlib.error or
    a ValueError that does not)."""
    try:
        if suffix == ".npy":
            with open(path, "rb") as f:
                _check_npy_size(path, f, path.stat().st_size)
            return np.load(path, allow_pickle=False)
        with np.load(path, allow_pickle=False) as archive:
            keys = list(archive.keys())
            key = keys[0] if len(keys) == 1 else next((k for k in _NPZ_KEYS if k in keys), None)
            if key is not None:
                if f"{key}.npy" not in archive.zip.namelist():  # a member that is not an array
                    raise ValueError(f"its member {key!r} is not a .npy array")
                member = archive.zip.getinfo(f"{key}.npy")
                with archive.zip.open(member) as f:
                    _check_npy_size(path, f, member.file_size, f" (array {key!r})")
                return archive[key]
    except (EOFError, ValueError, zipfile.BadZipFile, zlib.error) as exc:
        raise ValueError(f"{str(path)!r} is not a readable {suffix} file: {exc}") from exc
    raise ValueError(
        f"{str(path)!r} holds arrays {keys}; expected one array or one named "
        + " / ".join(_NPZ_KEYS)
    )


def _check_npy_size(path: Path, f, size: int, what: str = "") -> None:
    """Refuses .npy data (``size`` bytes, ``f`` at its start) whose header declares a larger
    array than it holds: numpy allocates the declared array before reading, so a tiny file
    could ask for terabytes (MemoryError)."""
    version = np.lib.format.read_magic(f)
    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
            else np.lib.format.read_array_header_2_0)  # fmt: skip
    shape, _, dtype = read(f)
    need, have = math.prod(shape) * dtype.itemsize, size - f.tell()
    if need > have:
        raise ValueError(
            f"its header{what} declares an array of shape {list(shape)} of {dtype} "
            f"({need} bytes), but holds {have} bytes of data"
        )


# ----------------------------------------------------------------------------- .pcd and .ply
# Read with numpy from the header's description of the data (PCD 0.7 as PCL writes it; PLY 1.0).

# PCD (TYPE, SIZE) -> numpy type. PCD data is little-endian, as PCL writes it.
_PCD_TYPES = {
    ("F", "4"): "<f4", ("F", "8"): "<f8", ("U", "1"): "u1", ("U", "2"): "<u2", ("U", "4"): "<u4",
    ("U", "8"): "<u8", ("I", "1"): "i1", ("I", "2"): "<i2", ("I", "4"): "<i4", ("I", "8"): "<i8",
}  # fmt: skip
_PCD_ENCODINGS = ("ascii", "binary", "binary_compressed")
# PLY property type -> numpy type (the byte order comes from the format line).
_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
    "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}  # fmt: skip
_PLY_FORMATS = {"ascii": "<", "binary_little_endian": "<", "binary_big_endian": ">"}
# Fields that become the columns NAME_0, NAME_1, NAME_2 when all three are present (the names
# open3d, which read these files before, gave them).
_GROUPS = {
    ("normal_x", "normal_y", "normal_z"): "normals", ("nx", "ny", "nz"): "normals",
    ("red", "green", "blue"): "colors",
}  # fmt: skip
_PCD_PACKED_COLOURS = ("rgb", "rgba")  # PCL packs 8-bit r, g, b into one 4-byte field
_PCD_PADDING = "_"  # PCL names padding bytes "_"
_MAX_HEADER_BYTES = 1 << 20  # PCD and PLY headers are a few hundred bytes


@dataclass
class _Field:
    """A per-point field: name, numpy type (with byte order) and values per point."""

    name: str
    dtype: np.dtype
    count: int = 1


@dataclass
class _Element:
    """A PLY element stored before the points: its rows, and per property the numpy type of a
    list's length (None: not a list) and of a value."""

    rows: int
    properties: list[tuple[Optional[np.dtype], np.dtype]]


@dataclass
class _Header:
    """What a PCD or PLY header says about the points and where they lie."""

    fields: list[_Field]  # per-point fields in file order
    count: int  # points declared
    encoding: str  # "ascii", "binary" or "binary_compressed" (PCD)
    data_offset: int  # bytes of the header
    before: list[_Element] = field(default_factory=list)  # PLY elements before the points
    rows_after: int = 0  # PLY: rows of the elements after the points


def _malformed(path: Path, line: str, why: str) -> ValueError:
    return ValueError(f"{str(path)!r} has a malformed header line {line!r}: {why}")


def _whole(path: Path, line: str, word: str, least: int = 0) -> int:
    """``word`` of header ``line`` as a whole number of at least ``least``."""
    try:
        value = int(word)
    except ValueError:
        raise _malformed(path, line, f"{word!r} is not a whole number") from None
    if value < least:
        raise _malformed(path, line, f"{value} is " + ("negative" if least == 0 else "below 1"))
    return value


def _header_lines(path: Path, data: bytes, end: str) -> tuple[list[tuple[str, list[str]]], int]:
    """The header's lines (text, words) up to the one starting with ``end``, without comments,
    and the header's bytes."""
    lines, offset = [], 0
    while True:
        stop = data.find(b"\n", offset, _MAX_HEADER_BYTES) + 1
        if not stop:
            raise ValueError(
                f"{str(path)!r} has no end of header (a {end} line) in its first "
                f"{min(len(data), _MAX_HEADER_BYTES)} bytes"
            )
        line = data[offset:stop].decode("ascii", errors="replace").strip()
        offset = stop
        words = line.split()
        if words and words[0] not in ("#", "comment", "obj_info") and not words[0].startswith("#"):
            lines.append((line, words))
            if words[0] == end:
                return lines, offset


def _pcd_header(path: Path, data: bytes) -> _Header:
    """Parses a PCD header: FIELDS, SIZE, TYPE, COUNT, WIDTH, HEIGHT, POINTS and DATA."""
    lines, offset = _header_lines(path, data, "DATA")
    keys = {words[0]: (line, words[1:]) for line, words in lines}
    names = keys.get("FIELDS", ("", []))[1]
    if not names:
        raise ValueError(f"{str(path)!r} has no FIELDS line in its header")

    def per_field(key: str, default: Optional[str] = None) -> tuple[str, list[str]]:
        if key not in keys and default is not None:
            return "", [default] * len(names)
        line, values = keys.get(key, (f"(no {key} line)", []))
        if len(values) != len(names):
            raise _malformed(path, line, f"{len(values)} values for the {len(names)} FIELDS")
        return line, values

    def number(key: str) -> Optional[int]:  # of a one-number line; None without the line
        if key not in keys:
            return None
        line, words = keys[key]
        if len(words) != 1:
            raise _malformed(path, line, "expected one whole number")
        return _whole(path, line, words[0])

    count, width, height = number("POINTS"), number("WIDTH"), number("HEIGHT")
    if count is None and (width is None or height is None):
        raise ValueError(f"{str(path)!r} has neither POINTS nor WIDTH and HEIGHT in its header")
    if count is not None and width is not None and height is not None and width * height != count:
        raise _malformed(path, keys["POINTS"][0], f"the header's WIDTH * HEIGHT is "
                         f"{width * height}")
    count = width * height if count is None else count
    data_line, encoding = keys["DATA"][0], keys["DATA"][1]
    if len(encoding) != 1 or encoding[0] not in _PCD_ENCODINGS:
        raise _malformed(path, data_line, "expected DATA ascii, binary or binary_compressed")
    (size_line, sizes), (type_line, types) = per_field("SIZE"), per_field("TYPE")
    count_line, counts = per_field("COUNT", "1")
    fields = []
    for name, size, kind, values in zip(names, sizes, types, counts):
        if (kind, size) not in _PCD_TYPES:
            raise _malformed(path, type_line, f"field {name!r} has TYPE {kind} and SIZE {size} "
                             f"(from {size_line!r}), which PCD does not define")
        fields.append(_Field(name, np.dtype(_PCD_TYPES[kind, size]),
                             _whole(path, count_line, values, least=1)))
    point_bytes = sum(f.dtype.itemsize * f.count for f in fields)
    if point_bytes > 2**31 - 1:  # numpy's structured types hold at most that per point
        raise _malformed(path, count_line, f"a point of {point_bytes} bytes (at most 2^31 - 1)")
    return _Header(fields, count, encoding[0], offset)


def _ply_header(path: Path, data: bytes) -> _Header:
    """Parses a PLY header: format, the elements and their properties; the points are the first
    element named vertex."""
    if not data.startswith(b"ply"):
        raise ValueError(f"{str(path)!r} does not start with 'ply': it is not a PLY file")
    lines, offset = _header_lines(path, data, "end_header")
    formats = [(line, words) for line, words in lines if words[0] == "format"]
    if not formats or len(formats[0][1]) != 3 or formats[0][1][1] not in _PLY_FORMATS:
        raise _malformed(path, formats[0][0] if formats else "(no format line)",
                         "expected 'format ascii|binary_little_endian|binary_big_endian 1.0'")
    encoding = formats[0][1][1]
    order = _PLY_FORMATS[encoding]

    def type_of(line: str, name: str) -> np.dtype:
        if name not in _PLY_TYPES:
            raise _malformed(path, line, f"unknown property type {name!r}")
        return np.dtype(_PLY_TYPES[name]).newbyteorder(order)

    # elements as [name, rows, properties as (line, name, list length type or None, type)]
    elements: list = []
    for line, words in lines:
        if words[0] == "element":
            if len(words) != 3:
                raise _malformed(path, line, "expected 'element NAME COUNT'")
            elements.append([words[1], _whole(path, line, words[2]), []])
        elif words[0] == "property":
            if not elements or len(words) != (5 if words[1:2] == ["list"] else 3):
                raise _malformed(path, line, "expected 'property TYPE NAME' after an element "
                                 "(or 'property list COUNT_TYPE TYPE NAME')")
            length = type_of(line, words[2]) if words[1] == "list" else None
            elements[-1][2].append((line, words[-1], length, type_of(line, words[-2])))
    vertex = next((i for i, e in enumerate(elements) if e[0] == "vertex"), None)
    if vertex is None:
        raise ValueError(f"{str(path)!r} has no 'element vertex' (the points) in its header")
    fields = []
    for line, name, length, dtype in elements[vertex][2]:
        if length is not None:
            raise _malformed(path, line, "a list property of the points is not supported")
        fields.append(_Field(name, dtype))
    return _Header(
        fields, elements[vertex][1], "ascii" if encoding == "ascii" else "binary", offset,
        before=[_Element(rows, [p[2:] for p in props]) for _, rows, props in elements[:vertex]],
        rows_after=sum(e[1] for e in elements[vertex + 1 :]),
    )


def _read_pcd_ply(
    path: Path, suffix: str, dtype: Optional[np.dtype]
) -> tuple[np.ndarray, list[str]]:
    """The points of a .pcd or .ply file (of ``dtype``, None: as its x, y, z need) and their
    column names."""
    data = path.read_bytes()
    header = (_pcd_header if suffix == ".pcd" else _ply_header)(path, data)
    if header.encoding == "ascii":
        values = _ascii_values(path, header, data)
    elif header.encoding == "binary_compressed":
        values = _compressed_values(path, header, data)
    else:
        values = _binary_values(path, header, data)
    return _columns(path, header, values, dtype, packed_colours=suffix == ".pcd")


def _cut_short(path: Path, header: _Header, need: int, have: int, what: str) -> ValueError:
    return ValueError(
        f"{str(path)!r} is cut short: its header declares {header.count} points (at least "
        f"{need} bytes of {what}) but {have} bytes follow it"
    )


def _row_type(fields: list[_Field], parse: bool = False) -> np.dtype:
    """The structured type of a point (ascii ``parse``: float fields as float64, so that a
    value beyond float32's range can be told from infinity)."""
    return np.dtype([
        (f"f{i}", np.dtype("f8") if parse and f.dtype.kind == "f" else f.dtype, (f.count,))
        for i, f in enumerate(fields)
    ])  # fmt: skip


def _binary_values(path: Path, header: _Header, data: bytes) -> list[np.ndarray]:
    """Each field's values ``[N, count]`` of a binary PCD or PLY."""
    start = _ply_skip_before(path, header, data)
    row = _row_type(header.fields)
    need, have = header.count * row.itemsize, len(data) - start
    if have < need:
        raise _cut_short(path, header, need, have, "binary data")
    table = np.frombuffer(data, row, header.count, start)
    return [table[name] for name in row.names]


def _ply_skip_before(path: Path, header: _Header, data: bytes) -> int:
    """Where the points of a binary file start: after its header and, in a PLY, after the
    elements stored before them (rows with list properties are read one by one to find their
    lengths)."""
    position = header.data_offset
    for element in header.before:
        if all(length is None for length, _ in element.properties):
            position += element.rows * sum(dtype.itemsize for _, dtype in element.properties)
            continue
        for _ in range(element.rows):
            for length, dtype in element.properties:
                if length is not None:
                    if position + length.itemsize > len(data):
                        position = len(data) + 1  # cut short: stop reading rows
                        break
                    items = int(np.frombuffer(data, length, 1, position)[0])
                    if items < 0:
                        raise ValueError(f"{str(path)!r} has a list of {items} values before "
                                         "its points")
                    position += length.itemsize + items * dtype.itemsize
                else:
                    position += dtype.itemsize
            if position > len(data):
                break
    if position > len(data):
        raise ValueError(
            f"{str(path)!r} is cut short: its header declares {header.count} points after "
            f"other elements, but the file ends within those elements ({len(data)} bytes)"
        )
    return position


def _compressed_values(path: Path, header: _Header, data: bytes) -> list[np.ndarray]:
    """Each field's values ``[N, count]`` of a binary_compressed PCD: two uint32 sizes, then
    the LZF-compressed fields one after the other (all x, then all y, ...)."""
    start = header.data_offset
    if len(data) - start < 8:
        raise _cut_short(path, header, 8, len(data) - start, "binary_compressed data")
    packed, size = struct.unpack_from("<II", data, start)
    point_bytes = sum(f.dtype.itemsize * f.count for f in header.fields)
    if size != header.count * point_bytes:
        raise ValueError(
            f"{str(path)!r} declares {header.count} points of {point_bytes} bytes "
            f"({header.count * point_bytes} bytes), but its compressed data unpacks to {size} "
            "bytes"
        )
    if len(data) - start - 8 < packed:
        raise _cut_short(path, header, 8 + packed, len(data) - start, "binary_compressed data")
    raw = _lzf_decompress(path, memoryview(data)[start + 8 : start + 8 + packed], size)
    values, offset = [], 0
    for f in header.fields:
        values.append(np.frombuffer(raw, f.dtype, header.count * f.count, offset)
                      .reshape(header.count, f.count))
        offset += header.count * f.count * f.dtype.itemsize
    return values


def _lzf_decompress(path: Path, packed: memoryview, size: int) -> bytes:
    """Decodes LZF (liblzf's format, which PCL compresses with) into ``size`` bytes, in C++
    (src/python/lzf.cpp: a token of a few bytes at a time is too slow a loop for Python)."""
    try:
        return _C.lzf_decompress(packed, size)
    except ValueError as error:
        raise ValueError(f"{str(path)!r} has corrupt compressed data: {error}") from None


def _ascii_values(path: Path, header: _Header, data: bytes) -> list[np.ndarray]:
    """Each field's values ``[N, count]`` of an ascii PCD or PLY: a line per point (PLY: per
    element row) of numbers of the field's type; nan and inf are numbers, nothing else is."""
    lines = [line for line in data[header.data_offset :].decode("latin-1").split("\n")
             if line.strip()]  # fmt: skip
    before = sum(element.rows for element in header.before)
    total = before + header.count + header.rows_after
    if len(lines) != total:
        others = total - header.count
        others = f" and {others} rows of other elements" if others else ""
        raise ValueError(
            f"{str(path)!r} is " + ("cut short" if len(lines) < total else "malformed")
            + f": its header declares {header.count} points{others}, but {len(lines)} rows "
            "follow it"
        )
    lines = lines[before : before + header.count]
    width = sum(f.count for f in header.fields)
    for index, line in enumerate(lines):
        if len(line.split()) != width:
            raise ValueError(
                f"{str(path)!r} is cut short or malformed: its header declares {header.count} "
                f"points of {width} numbers, but point {index} has {len(line.split())}"
            )
    row = _row_type(header.fields, parse=True)
    table = _parse_rows(lines, row)
    if table is None:
        raise _bad_value(path, header.fields, lines, row)
    values = []
    for f, name in zip(header.fields, row.names):
        column = table[name]
        if f.dtype.kind == "f" and f.dtype.itemsize < 8:
            with np.errstate(over="ignore"):
                beyond = np.isinf(column.astype(f.dtype)) & np.isfinite(column)
            if beyond.any():
                index = int(np.argwhere(beyond)[0, 0])
                raise ValueError(
                    f"{str(path)!r}: point {index} has {column[index][beyond[index]][0]:g} for "
                    f"field {f.name!r}, beyond the range of its type {f.dtype.name}"
                )
        values.append(column)
    return values


def _parse_rows(lines: list[str], row: np.dtype) -> Optional[np.ndarray]:
    """``lines`` as rows of type ``row``, or None where a value is not a number of its type."""
    if not lines:
        return np.zeros(0, row)
    try:
        return np.loadtxt(lines, dtype=row, comments=None, ndmin=1)
    except ValueError:
        return None


def _bad_value(path: Path, fields: list[_Field], lines: list[str], row: np.dtype) -> ValueError:
    """The error naming the first value of ``lines`` that is not a number of its field's type
    (found by halving the rows, then trying each value of the first bad row)."""
    low, high = 0, len(lines)  # lines[low:high] holds the first bad row
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if _parse_rows(lines[low:middle], row) is not None else (
            low, middle)
    kinds = [(f.name, row[i].base) for i, f in enumerate(fields) for _ in range(f.count)]
    for token, (name, dtype) in zip(lines[low].split(), kinds):
        if _parse_rows([token], np.dtype([("v", dtype)])) is None:
            what = f"{dtype.name} number" if dtype.kind != "f" else "number"
            return ValueError(
                f"{str(path)!r}: point {low} has {token!r} for field {name!r}, which is not a "
                f"{what}"
            )
    return ValueError(f"{str(path)!r}: point {low} ({lines[low].strip()!r}) is malformed")


def _columns(
    path: Path,
    header: _Header,
    values: list[np.ndarray],
    dtype: Optional[np.dtype],
    packed_colours: bool,
) -> tuple[np.ndarray, list[str]]:
    """The ``[N, C]`` points (of ``dtype``, None: as x, y, z need) and their names: x, y, z,
    then the other fields in file order (see the module docstring for padding, COUNT > 1,
    normals and colours)."""
    names = [f.name for f in header.fields]
    repeated = sorted(n for n, k in Counter(names).items() if k > 1 and n != _PCD_PADDING)
    if repeated:
        raise ValueError(f"{str(path)!r} has two fields named {repeated[0]!r}: {names}")
    for axis in _XYZ:
        if names.count(axis) != 1 or header.fields[names.index(axis)].count != 1:
            raise ValueError(
                f"{str(path)!r} must have one field each named x, y and z with one value per "
                f"point; its fields are {names} (values per point "
                f"{[f.count for f in header.fields]})"
            )
    columns = [values[names.index(axis)][:, 0] for axis in _XYZ]
    out_names, taken = list(_XYZ), set(_XYZ)
    single = {f.name for f in header.fields if f.count == 1}
    for f, value in zip(header.fields, values):
        if f.name in taken or f.name == _PCD_PADDING:
            continue
        group = next((g for g in _GROUPS.items() if f.name in g[0] and set(g[0]) <= single),
                     None)  # fmt: skip
        if group is not None:  # all three members, taken at the first one's place
            members, group_name = group
            taken.update(members)
            columns += [values[names.index(m)].reshape(-1) for m in members]
            out_names += [f"{group_name}_{j}" for j in range(3)]
        elif (f.name in _PCD_PACKED_COLOURS and packed_colours and f.dtype.itemsize == 4
              and f.count == 1):
            bits = value.reshape(-1).astype(f.dtype).view("<u4")
            columns += [(bits >> shift) & 255 for shift in (16, 8, 0)]
            out_names += [f"colors_{j}" for j in range(3)]
        else:
            columns += list(value.T)
            out_names += [f.name] if f.count == 1 else [f"{f.name}_{j}" for j in range(f.count)]
    repeated = sorted(name for name, k in Counter(out_names).items() if k > 1)
    if repeated:  # e.g. a field named normals_0 beside nx, ny, nz
        raise ValueError(
            f"{str(path)!r} has fields {names}, which give two columns named {repeated[0]!r}"
        )
    xyz_types = [header.fields[names.index(axis)].dtype for axis in _XYZ]
    points = np.empty((header.count, len(columns)), dtype=_points_dtype(dtype, xyz_types))
    for j, column in enumerate(columns):
        points[:, j] = column
    return points, out_names
