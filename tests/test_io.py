"""Point-cloud readers (spconv_lite.io): the real frames of every format, files written here
byte by byte (so the expected values are known exactly), and bad files."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from lidar_frames import data_file, require_open3d

from spconv_lite import io

# file, point_dims, points, columns, first value of each column (from the data README and the
# raw bytes), column names
REAL_FILES = [
    ("kitti_object_training_000000.bin", None, 115384, 4, ["x", "y", "z", "c3"]),
    ("kitti_000008_reduced_mmdet3d_demo.bin", None, 17238, 4, ["x", "y", "z", "c3"]),
    ("nuscenes_LIDAR_TOP_1532402927647951.pcd.bin", None, 34688, 5, ["x", "y", "z", "c3", "c4"]),
    ("semantickitti_000000.bin", None, 123389, 4, ["x", "y", "z", "c3"]),
    ("waymo_mmdet3d_test_1000000.bin", 6, 800, 6, ["x", "y", "z", "c3", "c4", "c5"]),
    ("spconv_benchmark-pc.npz", None, 198130, 3, ["x", "y", "z"]),
    ("fast_gicp_251370668.pcd", None, 69088, 4, ["x", "y", "z", "intensity"]),
    ("small_gicp_source.ply", None, 69792, 4, ["x", "y", "z", "scalar_intensity"]),
]
HEADER_BYTES = {"fast_gicp_251370668.pcd": 188, "small_gicp_source.ply": 268}


def raw_points(path, columns: int) -> np.ndarray:
    """The file's float32 payload, read without spconv_lite."""
    if path.suffix == ".npz":
        return np.load(path)["pc"]
    offset = HEADER_BYTES.get(path.name, 0)
    return np.frombuffer(path.read_bytes()[offset:], "<f4").reshape(-1, columns)


@pytest.mark.parametrize(
    "name, point_dims, count, columns, names", REAL_FILES, ids=[f[0] for f in REAL_FILES]
)
def test_real_files(name, point_dims, count, columns, names):
    path = data_file(name)
    if path.suffix in (".pcd", ".ply"):
        require_open3d()
    points, fields = io.read_points_with_fields(path, point_dims)
    assert points.shape == (count, columns) and points.dtype == np.float32
    assert points.flags.c_contiguous
    assert fields == names
    np.testing.assert_array_equal(points, raw_points(path, columns))


def write_pcd(path, fields: list[str], points: np.ndarray) -> None:
    n, c = points.shape
    header = (
        "# .PCD v0.7 - Point Cloud Data file format\nVERSION 0.7\n"
        f"FIELDS {' '.join(fields)}\nSIZE {' '.join(['4'] * c)}\nTYPE {' '.join(['F'] * c)}\n"
        f"COUNT {' '.join(['1'] * c)}\nWIDTH {n}\nHEIGHT 1\nVIEWPOINT 0 0 0 1 0 0 0\n"
        f"POINTS {n}\nDATA binary\n"
    )
    path.write_bytes(header.encode() + points.astype("<f4").tobytes())


def write_ply(path, fields: list[str], points: np.ndarray) -> None:
    header = "ply\nformat binary_little_endian 1.0\ncomment written by the test\n"
    header += f"element vertex {len(points)}\n"
    header += "".join(f"property float {f}\n" for f in fields) + "end_header\n"
    path.write_bytes(header.encode() + points.astype("<f4").tobytes())


@pytest.mark.parametrize("writer, suffix", [(write_pcd, ".pcd"), (write_ply, ".ply")])
@pytest.mark.parametrize("count", [7, 0])
def test_pcd_ply_fields_in_file_order(tmp_path, writer, suffix, count):
    """open3d hands the fields back sorted by name; the reader restores the file's order."""
    require_open3d()
    fields = ["x", "y", "z", "zeta", "intensity", "alpha"]
    points = np.random.default_rng(count).normal(size=(count, 6)).astype(np.float32)
    writer(tmp_path / f"cloud{suffix}", fields, points)
    read, names = io.read_points_with_fields(tmp_path / f"cloud{suffix}")
    assert names == fields
    np.testing.assert_array_equal(read, points)
    np.testing.assert_array_equal(io.read_points(tmp_path / f"cloud{suffix}", 4), points[:, :4])


@pytest.mark.parametrize(
    "filename, columns, point_dims",
    [("a.bin", 4, None), ("b.bin", 6, 6), ("c.pcd.bin", 5, None), ("d.BIN", 3, 3)],
)
def test_raw_bin(tmp_path, filename, columns, point_dims):
    points = np.arange(10 * columns, dtype=np.float32).reshape(10, columns) / 7
    points[3, 0] = np.nan  # kept as stored: the voxelizer drops it
    points.astype("<f4").tofile(tmp_path / filename)
    np.testing.assert_array_equal(io.read_points(tmp_path / filename, point_dims), points)


def test_empty_bin(tmp_path):
    (tmp_path / "empty.bin").write_bytes(b"")
    assert io.read_points(tmp_path / "empty.bin").shape == (0, 4)


@pytest.mark.parametrize(
    "arrays, expected_key",
    [({"anything": 0}, "anything"), ({"points": 0, "labels": 1}, "points"), ({"pc": 0}, "pc")],
)
def test_npz(tmp_path, arrays, expected_key):
    stored = {key: np.full((5, 4), value, dtype=np.float64) for key, value in arrays.items()}
    np.savez(tmp_path / "cloud.npz", **stored)
    read = io.read_points(tmp_path / "cloud.npz")
    assert read.dtype == np.float32
    np.testing.assert_array_equal(read, stored[expected_key])


def test_npy_keeps_leading_columns(tmp_path):
    points = np.random.default_rng(0).normal(size=(9, 5))
    np.save(tmp_path / "cloud.npy", points)
    np.testing.assert_array_equal(
        io.read_points(tmp_path / "cloud.npy", 3), points[:, :3].astype(np.float32)
    )


def make_bad_file(tmp_path, kind: str):
    if kind == "bin-size":
        (tmp_path / "bad.bin").write_bytes(b"\0" * 20)  # 5 floats: not a multiple of 4 columns
        return tmp_path / "bad.bin"
    if kind == "npz-ambiguous":
        np.savez(tmp_path / "bad.npz", a=np.zeros((2, 3)), b=np.zeros((2, 3)))
        return tmp_path / "bad.npz"
    if kind == "npy-1d":
        np.save(tmp_path / "bad.npy", np.zeros(6))
        return tmp_path / "bad.npy"
    if kind == "suffix":
        (tmp_path / "cloud.xyz").write_text("0 0 0\n")
        return tmp_path / "cloud.xyz"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind, point_dims, match",
    [
        ("bin-size", None, "not a multiple of 4 \\* point_dims = 16"),
        ("npz-ambiguous", None, "expected one array"),
        ("npy-1d", None, "C >= 3"),
        ("suffix", None, "unsupported suffix"),
    ],
)
def test_bad_files_raise_value_error(tmp_path, kind, point_dims, match):
    with pytest.raises(ValueError, match=match):
        io.read_points(make_bad_file(tmp_path, kind), point_dims)


def write_ascii(path, points: np.ndarray) -> None:
    """An ascii PLY (with a face element before the vertices) or PCD of x, y, z, intensity."""
    rows = "".join(" ".join(f"{v:g}" for v in row) + "\n" for row in points)
    if path.suffix == ".ply":
        header = ("ply\nformat ascii 1.0\nelement face 1\nproperty list uchar int vertex_indices\n"
                  f"element vertex {len(points)}\nproperty float x\nproperty float y\n"
                  "property float z\nproperty float intensity\nend_header\n3 0 1 2\n")
    else:
        header = ("VERSION 0.7\nFIELDS x y z intensity\nSIZE 4 4 4 4\nTYPE F F F F\n"
                  f"COUNT 1 1 1 1\nWIDTH {len(points)}\nHEIGHT 1\nPOINTS {len(points)}\n"
                  "DATA ascii\n")
    path.write_text(header + rows)


def write_compressed_pcd(path, points: np.ndarray) -> None:
    import open3d as o3d

    cloud = o3d.t.geometry.PointCloud()
    cloud.point.positions = o3d.core.Tensor(points[:, :3])
    cloud.point.intensity = o3d.core.Tensor(points[:, 3:])
    assert o3d.t.io.write_point_cloud(str(path), cloud, write_ascii=False, compressed=True)


def write_ply_after_faces(path, points: np.ndarray, big_endian: bool = False) -> None:
    """A binary PLY whose faces (a list property, rows of varying length) come before its
    vertices, so the points' offset is known only by reading each face's length."""
    order = ">" if big_endian else "<"
    header = (f"ply\nformat binary_{'big' if big_endian else 'little'}_endian 1.0\n"
              "element face 2\nproperty list uchar int vertex_indices\nproperty float quality\n"
              f"element vertex {len(points)}\n"
              + "".join(f"property float {f}\n" for f in ["x", "y", "z", "intensity"])
              + "end_header\n")
    faces = (struct.pack(f"{order}B3if", 3, 0, 1, 2, 0.5)
             + struct.pack(f"{order}B4if", 4, 0, 1, 2, 3, 0.25))
    path.write_bytes(header.encode() + faces + points.astype(f"{order}f4").tobytes())


@pytest.mark.parametrize("name, write, cut", [
    ("ascii.ply", write_ascii, 10),  # part of the last row
    ("ascii.ply", write_ascii, 16),  # the whole last row
    ("ascii.pcd", write_ascii, 10),
    ("binary.ply", lambda p, pts: write_ply(p, ["x", "y", "z", "intensity"], pts), 1),
    ("binary.pcd", lambda p, pts: write_pcd(p, ["x", "y", "z", "intensity"], pts), 16),
    ("compressed.pcd", write_compressed_pcd, 1),
    ("faces.ply", write_ply_after_faces, 20),  # less than the faces' list values
    ("faces.ply", lambda p, pts: write_ply_after_faces(p, pts, big_endian=True), 4),
])  # fmt: skip
def test_pcd_ply_cut_short(tmp_path, name, write, cut):
    """open3d returns the declared number of points from a file cut short (the missing ones hold
    whatever its memory held, or zeros): the reader checks the data against the header."""
    require_open3d()
    points = (np.arange(40, dtype=np.float32).reshape(10, 4) - 7) / 4
    path = tmp_path / name
    write(path, points)
    np.testing.assert_array_equal(io.read_points(path), points)
    path.write_bytes(path.read_bytes()[:-cut])
    with pytest.raises(ValueError, match=f"{name}' is cut short.*: its header declares 10 points"):
        io.read_points(path)


@pytest.mark.parametrize("header, match", [
    ("ply\nformat ascii 1.0\nelement vertex 1\nproperty\nend_header\n1 2 3\n",
     "'property': expected 'property TYPE NAME' after an element"),
    ("ply\nformat ascii 1.0\nelement vertex many\nend_header\n",
     "'element vertex many': 'many' is not a whole number"),
    ("VERSION 0.7\nFIELDS x y z\nPOINTS -3\nDATA ascii\n", "'POINTS -3': -3 is negative"),
    ("VERSION 0.7\nFIELDS x y z\nPOINTS 3\n", "no end of header"),
])  # fmt: skip
def test_pcd_ply_malformed_header(tmp_path, header, match):
    require_open3d()  # reading .pcd / .ply needs it before any header is looked at
    path = tmp_path / ("bad.ply" if header.startswith("ply") else "bad.pcd")
    path.write_text(header)
    with pytest.raises(ValueError, match=match):
        io.read_points(path)


@pytest.mark.parametrize("name, content, match", [
    ("empty.npy", b"", "empty.npy' is not a readable .npy file"),
    ("text.npz", b"not a zip archive", "text.npz' is not a readable .npz file"),
    ("crc.npz", None, "crc.npz' is not a readable .npz file"),
])  # fmt: skip
def test_unreadable_numpy_files(tmp_path, name, content, match):
    path = tmp_path / name
    if content is None:  # a stored (uncompressed) archive with one data byte flipped
        np.savez(path, points=np.arange(30, dtype=np.float32).reshape(10, 3))
        data = bytearray(path.read_bytes())
        data[data.index(b"NUMPY") + 200] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=match):
        io.read_points(path)


@pytest.mark.parametrize("point_dims, match", [(2, "point_dims must be"), (9, "point_dims=9")])
def test_bad_point_dims(tmp_path, point_dims, match):
    np.zeros((4, 3), dtype=np.float32).tofile(tmp_path / "c.bin")
    np.save(tmp_path / "c.npy", np.zeros((4, 3)))
    with pytest.raises(ValueError, match=match):
        io.read_points(tmp_path / "c.npy", point_dims)


@pytest.mark.parametrize("point_dims", [0, False, True, 4.5, 4.0, "4"])
@pytest.mark.parametrize("reader", ["read_points", "read_cloud"])
def test_point_dims_must_be_a_whole_count(tmp_path, reader, point_dims):
    # 0 and False read the 4-column default, 4.5 read 4 columns and reported "4.5".
    np.zeros((4, 4), dtype=np.float32).tofile(tmp_path / "c.bin")
    with pytest.raises(ValueError, match=r"point_dims must be an int >= 3, got "):
        getattr(io, reader)(tmp_path / "c.bin", point_dims)


# read_cloud (the command's reader) on the real frames: how it reads each, and the layout
# mistakes it refuses (the Waymo fixture has 6 columns, the last a timestamp).
@pytest.mark.parametrize("name, point_dims, layout", [
    ("kitti_object_training_000000.bin", None, "4 float32 columns (the .bin default)"),
    ("nuscenes_LIDAR_TOP_1532402927647951.pcd.bin", None, "5 float32 columns (nuScenes .pcd.bin)"),
    ("waymo_mmdet3d_test_1000000.bin", 6, "6 float32 columns (point_dims=6)"),
    ("semantickitti_000000.bin", None, "4 float32 columns (the .bin default)"),
    ("spconv_benchmark-pc.npz", None, "3 columns"),
])  # fmt: skip
def test_read_cloud_real_frames(name, point_dims, layout):
    path = data_file(name)
    points, how = io.read_cloud(path, point_dims)
    assert how == layout
    np.testing.assert_array_equal(points, io.read_points(path, point_dims))


@pytest.mark.parametrize("name, point_dims, match", [
    ("kitti_object_training_000000.bin", 8, "every row looks like 2 consecutive points of 4 "),
    ("kitti_000008_reduced_mmdet3d_demo.bin", 12, "every row looks like 3 consecutive points "),
    ("nuscenes_LIDAR_TOP_1532402927647951.pcd.bin", 4, "5 float32 columns .* but point_dims=4"),
    ("waymo_mmdet3d_test_1000000.bin", None, "6 float32 columns give plausible coordinates"),
    ("waymo_mmdet3d_test_1000000.bin", 12, "every row looks like 2 consecutive points of 6 "),
    ("spconv_benchmark-pc.npz", 4, "has 3 columns, but point_dims=4"),
])  # fmt: skip
def test_read_cloud_refuses_a_wrong_layout(name, point_dims, match):
    with pytest.raises(ValueError, match=match):
        io.read_cloud(data_file(name), point_dims)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        io.read_points(tmp_path / "missing.bin")


def test_is_point_file():
    assert io.is_point_file("a/b/000000.bin") and io.is_point_file("x.PCD")
    assert io.is_point_file("scan.pcd.bin") and not io.is_point_file("notes.txt")
