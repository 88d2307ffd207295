"""Point-cloud file readers: every format comes back as a float32 ``[N, C]`` numpy array with
x, y, z first.

======================  ====================================================================
suffix                  layout
======================  ====================================================================
``.bin``                KITTI / Waymo raw little-endian float32, ``point_dims`` columns (4)
``.pcd.bin``            nuScenes raw float32, 5 columns (x, y, z, intensity, ring)
``.npy``                a 2-D array
``.npz``                its only array, or the one named ``points``, ``pc``, ``point_cloud``,
                        ``lidar`` or ``xyz``
``.pcd``, ``.ply``      read with open3d (``pip install spconv_lite[io]``): x, y, z, then the
                        file's other per-point fields (intensity, ...) in file order
======================  ====================================================================

For ``.bin`` files ``point_dims`` is the number of columns in the file; for the other formats
it keeps the first ``point_dims`` columns. Values are returned as stored: NaN or infinite points
are kept (the voxelizer drops them).
"""

from __future__ import annotations

import itertools
import os
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np

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
# File field names that open3d gathers into one multi-column attribute.
_OPEN3D_GROUPS = {
    "normal_x": "normals", "normal_y": "normals", "normal_z": "normals",
    "nx": "normals", "ny": "normals", "nz": "normals",
    "rgb": "colors", "rgba": "colors", "red": "colors", "green": "colors", "blue": "colors",
}  # fmt: skip


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in SUPPORTED_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return ""


def is_point_file(path: PathLike) -> bool:
    """Whether ``path`` has a suffix that :func:`read_points` reads."""
    return _suffix(Path(path)) != ""


def read_points(path: PathLike, point_dims: Optional[int] = None) -> np.ndarray:
    """Reads a point cloud file as float32 ``[N, C]`` (see the module docstring for formats).

    Args:
        path: the file.
        point_dims: columns of a raw ``.bin`` file (default 4, 5 for ``.pcd.bin``); for the
            other formats, how many leading columns to keep (default all).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: naming the argument, for a ``point_dims`` that is not a whole number of at
            least 3, an unknown suffix, a ``.bin`` size that is not a multiple of
            ``4 * point_dims``, a ``point_dims`` larger than the file's columns, content that
            is not a 2-D array with at least 3 columns, an empty, corrupt or pickled ``.npy`` /
            ``.npz``, or a ``.pcd`` / ``.ply`` whose header is malformed or declares more
            points than the file holds.
        ImportError: ``.pcd`` / ``.ply`` without open3d.

    Example:
        >>> pts = read_points("000000.bin")  # doctest: +SKIP
        >>> pts.shape, pts.dtype  # doctest: +SKIP
        ((115384, 4), dtype('float32'))
    """
    return read_points_with_fields(path, point_dims)[0]


def read_points_with_fields(
    path: PathLike, point_dims: Optional[int] = None
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
    if not path.is_file():
        raise FileNotFoundError(f"no such point cloud file: {str(path)!r}")
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
        points, names = _read_open3d(path)
    points = _as_points(points, path)
    if point_dims is not None:
        if int(point_dims) > points.shape[1]:
            raise ValueError(
                f"point_dims={point_dims} but {str(path)!r} has {points.shape[1]} columns"
            )
        points = points[:, : int(point_dims)]
    if names is None:
        names = [*_XYZ, *(f"c{j}" for j in range(3, points.shape[1]))]
    return np.ascontiguousarray(points, dtype=np.float32), names[: points.shape[1]]


def _check_point_dims(point_dims) -> Optional[int]:
    """``point_dims`` as an int (None stays None): a whole number of columns, at least 3."""
    return None if point_dims is None else check_count(point_dims, "point_dims", least=3)


def _default_columns(suffix: str) -> int:
    return _NUSCENES_COLUMNS if suffix == ".pcd.bin" else _BIN_DEFAULT_COLUMNS


def read_cloud(path: PathLike, point_dims: Optional[int] = None) -> tuple[np.ndarray, str]:
    """Reads a point cloud as the ``spconv-lite`` command does, refusing what looks wrong.

    Stricter than :func:`read_points`:

    * where the format states the width (``.npy`` / ``.npz`` arrays, ``.pcd`` / ``.ply``
      fields, 5 columns for nuScenes ``.pcd.bin``), a ``point_dims`` that differs is refused;
    * a raw ``.bin`` (``point_dims`` float32 columns, 4 by default) is refused when its rows
      show a wrong column count or dtype: more than 1% of the points with a coordinate beyond
      10,000 km, or (from 100 points on) every row holding several consecutive points;
    * a file without points is refused.

    Args:
        path: the file.
        point_dims: columns of a raw ``.bin`` file; for the other formats, None or their width.

    Returns:
        ``(points, layout)``: float32 ``[N, C]`` and how the file was read, e.g.
        ``"4 float32 columns (the .bin default)"``.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: naming the file, for the cases above and those of :func:`read_points`.
        ImportError: ``.pcd`` / ``.ply`` without open3d.

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
        points = read_points(path, columns)
        layout = f"{columns} float32 columns" + (
            " (the .bin default)" if point_dims is None else f" (point_dims={columns})"
        )
        _check_raw_layout(path, points, layout)
    else:
        points = read_points(path)
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
    """Refuses a raw .bin whose rows show that ``layout`` is not the file's."""
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
    width = _repeat_width(points)
    if width is not None:
        raise ValueError(
            f"{str(path)!r} read as {layout}: every row looks like {points.shape[1] // width} "
            f"consecutive points of {width} columns (columns 0-2 and {width}-{width + 2} are "
            f"neighbouring x, y, z), so the file likely has {width} columns: pass "
            f"point_dims={width}"
        )


def _as_points(array: np.ndarray, path: Path) -> np.ndarray:
    if array.ndim != 2 or array.shape[1] < 3 or not np.issubdtype(array.dtype, np.number):
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
            return np.load(path, allow_pickle=False)
        with np.load(path, allow_pickle=False) as archive:
            keys = list(archive.keys())
            if len(keys) == 1:
                return archive[keys[0]]
            for key in _NPZ_KEYS:
                if key in archive:
                    return archive[key]
    except (EOFError, ValueError, zipfile.BadZipFile, zlib.error) as exc:
        raise ValueError(f"{str(path)!r} is not a readable {suffix} file: {exc}") from exc
    raise ValueError(
        f"{str(path)!r} holds arrays {keys}; expected one array or one named "
        + " / ".join(_NPZ_KEYS)
    )


# Bytes of each PLY property type.
_PLY_TYPE_BYTES = {
    "char": 1, "int8": 1, "uchar": 1, "uint8": 1, "short": 2, "int16": 2, "ushort": 2,
    "uint16": 2, "int": 4, "int32": 4, "uint": 4, "uint32": 4, "float": 4, "float32": 4,
    "double": 8, "float64": 8,
}  # fmt: skip
_MAX_HEADER_BYTES = 1 << 20  # PCD and PLY headers are a few hundred bytes


@dataclass
class _Header:
    """What a PCD or PLY header says about the points and where they lie."""

    fields: list[str]  # per-point field names in file order
    count: int  # points declared (-1: not stated)
    encoding: str  # "ascii", "binary" or "binary_compressed" (PCD)
    data_offset: int  # bytes of the header
    point_bytes: Optional[int]  # bytes of a point in a binary file (None: not known)
    point_values: Optional[int]  # numbers of a point in an ascii file (None: not known)
    rows_before: int = 0  # PLY: rows of the elements stored before the vertices
    bytes_before: Optional[int] = 0  # their bytes (None: a list property makes it vary)
    # Binary PLY with list properties up to the points: (rows, properties) of those elements,
    # a property as (bytes of a list's length or 0, bytes of a value); None otherwise.
    ply_rows: Optional[list[tuple[int, list[tuple[int, int]]]]] = None
    big_endian: bool = False


def _read_header(path: Path) -> _Header:
    """Parses a PCD header (``FIELDS``, ``SIZE``, ``COUNT``, ``POINTS``, ``DATA``) or a PLY
    header (``format``, the elements and their ``property`` lines) up to its end."""
    fields: list[str] = []
    pcd: dict[str, list[str]] = {}
    # PLY: [count, row bytes, row numbers, properties as (list length bytes or 0, value bytes)]
    ply_format, vertex, elements = "", None, []
    offset = 0

    def malformed(line: str, why: str) -> ValueError:
        return ValueError(f"{str(path)!r} has a malformed header line {line!r}: {why}")

    def number(word: str, line: str) -> int:
        try:
            value = int(word)
        except ValueError:
            raise malformed(line, f"{word!r} is not a whole number") from None
        if value < 0:
            raise malformed(line, f"{value} is negative")
        return value

    with open(path, "rb") as f:
        while True:
            raw = f.readline()
            offset += len(raw)
            if not raw or offset > _MAX_HEADER_BYTES:
                raise ValueError(
                    f"{str(path)!r} has no end of header (a DATA or end_header line) in its "
                    f"first {min(offset, _MAX_HEADER_BYTES)} bytes"
                )
            line = raw.decode("ascii", errors="replace").strip()
            words = line.split()
            if not words or words[0] in ("#", "comment", "obj_info"):
                continue
            if words[0] == "element":  # PLY
                if len(words) != 3:
                    raise malformed(line, "expected 'element NAME COUNT'")
                elements.append([number(words[2], line), 0, 0, []])
                if words[1] == "vertex" and vertex is None:
                    vertex = len(elements) - 1
            elif words[0] == "property":
                if not elements or len(words) < 3 or (words[1] == "list" and len(words) != 5):
                    raise malformed(line, "expected 'property TYPE NAME' after an element")
                element, size = elements[-1], _PLY_TYPE_BYTES.get(words[1])
                element[1] = None if element[1] is None or size is None else element[1] + size
                element[2] = None if element[2] is None or words[1] == "list" else element[2] + 1
                element[3].append((_PLY_TYPE_BYTES.get(words[2]), _PLY_TYPE_BYTES.get(words[3]))
                                  if words[1] == "list" else (0, size))
                if len(elements) - 1 == vertex and words[1] != "list":
                    fields.append(words[-1])
            elif words[0] == "format" and len(words) > 1:
                ply_format = words[1]
            elif words[0] == "end_header":
                break
            else:  # PCD
                pcd[words[0]] = words[1:]
                if words[0] == "DATA":
                    break
    if ply_format or elements:
        return _ply_header(elements, vertex, fields, ply_format, offset)
    return _pcd_header(pcd, offset, number)


def _ply_header(elements: list, vertex: Optional[int], fields: list[str], ply_format: str,
                offset: int) -> _Header:
    """The header of a PLY file from its elements ([count, row bytes, row numbers,
    properties], None where a list property makes them vary) and which of them holds the
    points."""
    if vertex is None:
        return _Header([], -1, "ascii", offset, None, None)
    before = elements[:vertex]
    lists_before = any(e[1] is None for e in before)
    count, point_bytes, point_values, _ = elements[vertex]
    header = _Header(
        fields, count, "ascii" if ply_format == "ascii" else "binary", offset, point_bytes,
        point_values, rows_before=sum(e[0] for e in before),
        bytes_before=None if lists_before else sum(e[0] * e[1] for e in before),
        big_endian=ply_format == "binary_big_endian",
    )
    properties = [p for e in elements[: vertex + 1] for p in e[3]]
    known = all(None not in p for p in properties)
    if header.encoding == "binary" and (lists_before or point_bytes is None) and known:
        header.ply_rows = [(e[0], e[3]) for e in elements[: vertex + 1]]
    return header


def _ply_list_rows_bytes(path: Path, header: _Header, limit: int) -> int:
    """Bytes from the end of a binary PLY's header to the end of its points when list
    properties make rows vary: reads each list's length from the file. Stops once past
    ``limit`` (the bytes there are) and then returns a number above it."""
    assert header.ply_rows is not None
    order = "big" if header.big_endian else "little"
    position = 0
    with open(path, "rb") as f:
        for rows, properties in header.ply_rows:
            if all(length_bytes == 0 for length_bytes, _ in properties):
                position += rows * sum(size for _, size in properties)
                continue
            for _ in range(rows):
                for length_bytes, size in properties:
                    if length_bytes:
                        f.seek(header.data_offset + position)
                        raw = f.read(length_bytes)
                        if len(raw) < length_bytes:
                            return limit + 1
                        position += int.from_bytes(raw, order) * size
                    position += length_bytes or size
                if position > limit:
                    return position
    return position


def _pcd_header(pcd: dict[str, list[str]], offset: int, number) -> _Header:
    """The header of a PCD file from its lines (keyword: values); ``number`` parses a count."""

    def count_of(key: str) -> int:
        return number((pcd[key] or ["(none)"])[0], " ".join([key, *pcd[key]]))

    fields = pcd.get("FIELDS", [])
    if "POINTS" in pcd:
        count = count_of("POINTS")
    elif "WIDTH" in pcd and "HEIGHT" in pcd:
        count = count_of("WIDTH") * count_of("HEIGHT")
    else:
        count = -1
    sizes, counts = pcd.get("SIZE", []), pcd.get("COUNT", ["1"] * len(fields))
    point_bytes = point_values = None
    if len(sizes) == len(fields) == len(counts) and all(w.isdigit() for w in sizes + counts):
        point_bytes = sum(int(a) * int(b) for a, b in zip(sizes, counts))
        point_values = sum(int(b) for b in counts)
    encoding = (pcd.get("DATA") or ["ascii"])[0]
    return _Header(fields, count, encoding, offset, point_bytes, point_values)


def _check_complete(path: Path, header: _Header) -> None:
    """Refuses a file whose data is shorter than its header declares: open3d would return the
    declared points anyway, the missing ones holding whatever its memory held."""
    count = header.count
    if count <= 0:
        return
    if header.encoding == "ascii":  # a row per point (PLY: per element) of numbers
        got = 0
        with open(path, "rb") as f:
            f.seek(header.data_offset)
            rows = (numbers for numbers in (line.split() for line in f) if numbers)
            rows = itertools.islice(rows, header.rows_before, header.rows_before + count)
            for got, numbers in enumerate(rows, 1):
                if header.point_values is not None and len(numbers) != header.point_values:
                    raise ValueError(
                        f"{str(path)!r} is cut short or malformed: its header declares {count} "
                        f"points of {header.point_values} numbers, but point {got - 1} has "
                        f"{len(numbers)}"
                    )
        if got < count:
            raise ValueError(
                f"{str(path)!r} is cut short: its header declares {count} points but {got} "
                "rows of them follow it"
            )
        return
    if header.encoding == "binary_compressed":  # PCD: two uint32 sizes, then the data
        with open(path, "rb") as f:
            f.seek(header.data_offset)
            sizes = f.read(8)
        need = 8 + (struct.unpack("<I", sizes[:4])[0] if len(sizes) == 8 else 0)
    elif header.point_bytes is not None and header.bytes_before is not None:
        need = header.bytes_before + count * header.point_bytes
    elif header.ply_rows is not None:  # PLY list properties up to the points
        need = _ply_list_rows_bytes(path, header, path.stat().st_size - header.data_offset)
    else:
        return  # a PLY property of an unknown type: the points' offset is not known
    have = path.stat().st_size - header.data_offset
    if have < need:
        raise ValueError(
            f"{str(path)!r} is cut short: its header declares {count} points (at least {need} "
            f"bytes of {header.encoding} data) but {have} bytes follow it"
        )


def _read_open3d(path: Path) -> tuple[np.ndarray, list[str]]:
    try:
        import open3d as o3d
    except ImportError as exc:
        raise ImportError(
            f"reading {path.suffix} files needs open3d: pip install 'spconv_lite[io]' "
            "(or open3d-cpu)"
        ) from exc
    o3d.utility.set_verbosity_level(o3d.utility.VerbosityLevel.Error)
    header = _read_header(path)
    _check_complete(path, header)
    fields, count = header.fields, header.count
    cloud = o3d.t.io.read_point_cloud(str(path))
    attributes = {name: cloud.point[name].numpy() for name in cloud.point}
    if "positions" not in attributes:
        if count == 0 and all(axis in fields for axis in _XYZ):  # open3d rejects empty files
            names = [*_XYZ, *(f for f in fields if f not in _XYZ)]
            return np.zeros((0, len(names)), dtype=np.float32), names
        raise ValueError(f"{str(path)!r} could not be read as a point cloud with x, y, z")
    columns = [attributes.pop("positions").reshape(-1, 3)]
    names = list(_XYZ)
    # open3d's attributes come in name order: put them back in the file's order.
    for field in fields:
        attribute = _OPEN3D_GROUPS.get(field, field)
        if field in _XYZ or attribute not in attributes:
            continue  # positions, a field open3d does not load, or a group already taken
        values = attributes.pop(attribute)
        values = values if values.ndim == 2 else values.reshape(-1, 1)
        columns.append(values.astype(np.float32))
        names += (
            [field]
            if values.shape[1] == 1
            else [f"{attribute}_{j}" for j in range(values.shape[1])]
        )
    return np.concatenate(columns, axis=1), names
