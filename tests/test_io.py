"""Point-cloud readers (spconv_lite.io): the real frames of every format, files written here
byte by byte (so the expected values are known exactly), and bad files."""

from __future__ import annotations

import os
import re
import struct
import tracemalloc
import zipfile

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
    points, fields = io.read_points_with_fields(path, point_dims)
    assert points.shape == (count, columns) and points.dtype == np.float32
    assert points.flags.c_contiguous
    assert fields == names
    np.testing.assert_array_equal(points, raw_points(path, columns))


@pytest.mark.parametrize("name", [f[0] for f in REAL_FILES if f[0].endswith((".pcd", ".ply"))])
def test_real_pcd_ply_as_open3d_reads_them(name):
    """An independent reader agrees: open3d's positions and its other per-point fields."""
    require_open3d()
    import open3d as o3d

    points, fields = io.read_points_with_fields(data_file(name))
    cloud = o3d.t.io.read_point_cloud(str(data_file(name))).point
    np.testing.assert_array_equal(points[:, :3], cloud.positions.numpy())
    for column, field in enumerate(fields[3:], start=3):
        if field in cloud:
            np.testing.assert_array_equal(points[:, column], cloud[field].numpy()[:, 0])


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
    """The fields come back in the file's order (open3d, which read these files before, sorted
    them by name)."""
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
    if kind == "npy-complex":
        np.save(tmp_path / "bad.npy", np.ones((2, 3)) + 1j)
        return tmp_path / "bad.npy"
    if kind == "npy-timedelta":
        np.save(tmp_path / "bad.npy", np.ones((2, 3), "m8[s]"))
        return tmp_path / "bad.npy"
    if kind == "npz-member-not-npy":  # an archive member without the .npy suffix
        np.save(tmp_path / "points.npy", np.zeros((2, 3), np.float32))
        with zipfile.ZipFile(tmp_path / "bad.npz", "w") as archive:
            archive.writestr("points", (tmp_path / "points.npy").read_bytes())
        return tmp_path / "bad.npz"
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
        ("npy-complex", None, "must hold a numeric .* of complex128"),  # lost its imaginary part
        ("npy-timedelta", None, "must hold a numeric .* of timedelta64"),  # read as coordinates
        ("npz-member-not-npy", None, "its member 'points' is not a .npy array"),  # KeyError
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
    """A binary_compressed PCD written by open3d (PCL's LZF, back-references included)."""
    require_open3d()
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
    """A file shorter than its header declares is refused (open3d returned the missing points
    as whatever its memory held)."""
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
    ("nuscenes_LIDAR_TOP_1532402927647951.pcd.bin", 4, "5 float32 columns .* but point_dims=4"),
    ("waymo_mmdet3d_test_1000000.bin", None, "6 float32 columns give plausible coordinates"),
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


# ----------------------------------------------------------------------------- layouts the
# readers once got wrong without an error (open3d returned uninitialised memory or dropped,
# cut or invented fields; a raw .bin was refused although its column count was given).


def test_read_cloud_trusts_a_given_column_count(tmp_path):
    """x, y, z, then the same point in the previous sweep's frame: every row looks like two
    neighbouring points, but point_dims=6 says what the file holds."""
    xyz = np.random.default_rng(0).uniform(-40, 40, (2000, 3)).astype(np.float32)
    points = np.c_[xyz, xyz + np.float32([0.8, 0.05, 0.0])]
    points.astype("<f4").tofile(tmp_path / "flow.bin")
    read, layout = io.read_cloud(tmp_path / "flow.bin", 6)
    assert layout == "6 float32 columns (point_dims=6)"
    np.testing.assert_array_equal(read, points)


def pcd_header(fields: str, sizes: str, types: str, count: int, data: str,
               counts: str = "") -> bytes:
    counts = counts or " ".join("1" * len(fields.split()))
    return (f"VERSION 0.7\nFIELDS {fields}\nSIZE {sizes}\nTYPE {types}\nCOUNT {counts}\n"
            f"WIDTH {count}\nHEIGHT 1\nVIEWPOINT 0 0 0 1 0 0 0\nPOINTS {count}\n"
            f"DATA {data}\n").encode()


def lzf_literals(data: bytes) -> bytes:
    """An LZF stream of literal runs only (32 bytes at most each)."""
    return b"".join(bytes([len(data[i : i + 32]) - 1]) + data[i : i + 32]
                    for i in range(0, len(data), 32))  # fmt: skip


def write_compressed(path, declared: int, fields_data: bytes, stream=None, size=None) -> None:
    stream = lzf_literals(fields_data) if stream is None else stream
    size = len(fields_data) if size is None else size
    path.write_bytes(pcd_header("x y z", "4 4 4", "F F F", declared, "binary_compressed")
                     + struct.pack("<II", len(stream), size) + stream)


def test_compressed_pcd_back_references(tmp_path):
    """LZF: 3 literal bytes, then a copy of 6 bytes from 3 back (it overlaps its own output)."""
    path = tmp_path / "u1.pcd"
    stream = bytes([2, 1, 2, 3, (4 << 5), 2])  # -> 1 2 3 1 2 3 1 2 3: all x, all y, all z
    path.write_bytes(pcd_header("x y z", "1 1 1", "U U U", 3, "binary_compressed")
                     + struct.pack("<II", len(stream), 9) + stream)
    np.testing.assert_array_equal(io.read_points(path), [[1, 1, 1], [2, 2, 2], [3, 3, 3]])


@pytest.mark.parametrize("declared, size, match", [
    (6, None, "declares 6 points of 12 bytes \\(72 bytes\\), but its compressed data unpacks to "
              "48 bytes"),
    (2, None, "declares 2 points of 12 bytes \\(24 bytes\\), but .* unpacks to 48 bytes"),
    (10**7, None, "declares 10000000 points"),  # open3d crashed (SIGSEGV)
    (6, 72, "corrupt compressed data: it unpacks to 48 bytes, not the 72 its header states"),
])  # fmt: skip
def test_compressed_pcd_count_must_match_its_data(tmp_path, declared, size, match):
    path = tmp_path / "c.pcd"
    write_compressed(path, declared, np.arange(1, 13, dtype="<f4").reshape(3, 4).tobytes(),
                     size=size)
    with pytest.raises(ValueError, match=match):
        io.read_points(path)


@pytest.mark.parametrize("stream, match", [
    (bytes([31, 1, 2]), "it ends mid-way"),
    (bytes([0, 7, (1 << 5)]), "it ends mid-way"),  # a copy without its distance byte
    (bytes([0, 7, (7 << 5)]), "it ends mid-way"),  # a long copy without its length byte
    (bytes([0, 7, (1 << 5), 9]), "a reference before its start"),
    (bytes([11]) + bytes(12) + bytes([0, 1]), "it unpacks to more than the 12 bytes its header "
                                              "states"),
    (bytes([0, 7, (7 << 5), 255, 0]), "it unpacks to more than the 12 bytes"),
])  # fmt: skip
def test_corrupt_compressed_pcd(tmp_path, stream, match):
    write_compressed(tmp_path / "c.pcd", 1, bytes(12), stream=stream)
    with pytest.raises(ValueError, match=f"c.pcd' has corrupt compressed data: {match}"):
        io.read_points(tmp_path / "c.pcd")


def test_compressed_pcd_declaring_more_than_its_stream_can_hold(tmp_path):
    """A size no stream of this length unpacks to is refused without allocating it."""
    write_compressed(tmp_path / "c.pcd", 300_000_000, bytes(12), size=3_600_000_000)
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="it unpacks to 12 bytes, not the 3600000000 its "):
            io.read_points(tmp_path / "c.pcd")
        assert tracemalloc.get_traced_memory()[1] < 10**8  # peak bytes
    finally:
        tracemalloc.stop()


def lzf_reference(stream: bytes) -> bytes:
    """LZF decoded a token at a time, the slow and obvious way (valid streams only)."""
    out, i = bytearray(), 0
    while i < len(stream):
        control, i = stream[i], i + 1
        if control < 32:
            out += stream[i : i + control + 1]
            i += control + 1
            continue
        length = control >> 5
        if length == 7:
            length, i = length + stream[i], i + 1
        distance, i = ((control & 31) << 8) + stream[i] + 1, i + 1
        for _ in range(length + 2):
            out.append(out[-distance])
    return bytes(out)


def random_lzf_stream(rng) -> bytes:
    """Literal runs and copies of every length (3 to 264 bytes), from up to 8 KB back and
    overlapping their own output."""
    stream, produced = bytearray(), 0
    for _ in range(int(rng.integers(1, 60))):
        if produced == 0 or rng.random() < 0.3:
            run = int(rng.integers(1, 33))
            stream += bytes([run - 1]) + rng.integers(0, 256, run, dtype=np.uint8).tobytes()
            produced += run
            continue
        length = int(rng.integers(3, 265))
        distance = int(rng.integers(1, min(produced, 8192) + 1))
        code = min(length - 2, 7)
        stream += bytes([(code << 5) | ((distance - 1) >> 8)])
        if code == 7:
            stream.append(length - 9)
        stream.append((distance - 1) & 255)
        produced += length
    return bytes(stream)


def test_lzf_decoder_matches_a_reference_on_random_streams(tmp_path):
    rng = np.random.default_rng(7)
    for _ in range(200):
        stream = random_lzf_stream(rng)
        stream += lzf_literals(bytes(-len(lzf_reference(stream)) % 12))  # whole points
        want = lzf_reference(stream)
        path = tmp_path / "r.pcd"
        write_compressed(path, len(want) // 12, want, stream=stream)
        fields = np.frombuffer(want, "<f4").reshape(3, -1)  # all x, then all y, then all z
        np.testing.assert_array_equal(io.read_points(path).view("<u4"),
                                      fields.T.view("<u4"))


@pytest.mark.parametrize("order", ["<", ">"])
@pytest.mark.parametrize("types", [("float", "double", "float"), ("int", "float", "short"),
                                   ("uchar", "ushort", "double")])
def test_ply_xyz_of_different_types(tmp_path, order, types):
    """open3d read y and z with x's type (garbage); integer coordinates were refused."""
    numpy_type = {"float": "f4", "double": "f8", "int": "i4", "short": "i2", "uchar": "u1",
                  "ushort": "u2"}
    rows = np.zeros(3, [(a, order + numpy_type[t]) for a, t in zip("xyz", types)])
    rows["x"], rows["y"], rows["z"] = [1, 2, 3], [10, 20, 30], [5, 6, 7]
    endian = "big" if order == ">" else "little"
    header = (f"ply\nformat binary_{endian}_endian 1.0\nelement vertex 3\n"
              + "".join(f"property {t} {a}\n" for a, t in zip("xyz", types)) + "end_header\n")
    (tmp_path / "m.ply").write_bytes(header.encode() + rows.tobytes())
    np.testing.assert_array_equal(io.read_points(tmp_path / "m.ply"),
                                  [[1, 10, 5], [2, 20, 6], [3, 30, 7]])


def ascii_file(path, rows: str, fields: str = "x y z", types: str = "F F F") -> None:
    names = fields.split()
    if path.suffix == ".ply":
        ply_types = {"F": "float", "U": "uchar", "I": "int"}
        header = (f"ply\nformat ascii 1.0\nelement vertex {rows.count(chr(10))}\n"
                  + "".join(f"property {ply_types[t]} {n}\n" for n, t in zip(names, types.split()))
                  + "end_header\n")
    else:
        sizes = " ".join("1" if t == "U" else "4" for t in types.split())
        header = pcd_header(fields, sizes, types, rows.count("\n"), "ascii").decode()
    path.write_text(header + rows)


@pytest.mark.parametrize("suffix", [".ply", ".pcd"])
def test_ascii_nan_and_inf_are_kept(tmp_path, suffix):
    """open3d (RPly) stopped at 'inf' and returned the later points as garbage."""
    path = tmp_path / f"a{suffix}"
    ascii_file(path, "1 2 3\ninf 1 2\n-inf nan NaN\n4 5 6\n7 8 9\n")
    expected = [[1, 2, 3], [np.inf, 1, 2], [-np.inf, np.nan, np.nan], [4, 5, 6], [7, 8, 9]]
    np.testing.assert_array_equal(io.read_points(path), expected)


@pytest.mark.parametrize("suffix", [".ply", ".pcd"])
@pytest.mark.parametrize("rows, types, match", [
    ("1 2 3 4\n1,5 2 3 4\n", "F F F U", "point 1 has '1,5' for field 'x', which is not a number"),
    ("1 2 3 4\n1 foo 3 4\n", "F F F U", "point 1 has 'foo' for field 'y', which is not a number"),
    ("1 2 3 4\n1 2 1e39 4\n", "F F F U", "point 1 has 1e\\+39 for field 'z', beyond the range "
                                         "of its type float32"),
    ("1 2 3 300\n1 2 3 4\n", "F F F U", "point 0 has '300' for field 'i', which is not a uint8 "
                                        "number"),
    ("1 2 3 4\n1 2 3 2.5\n", "F F F I", "point 1 has '2.5' for field 'i', which is not a int32 "
                                        "number"),
])  # fmt: skip
def test_ascii_value_that_is_not_a_number_of_its_type(tmp_path, suffix, rows, types, match):
    """open3d read '1,5' as 1, 'foo' as 0, 300 in a uint8 as 44 (PLY: garbage from there on)."""
    path = tmp_path / f"a{suffix}"
    ascii_file(path, rows, "x y z i", types)
    with pytest.raises(ValueError, match=f"a{re.escape(suffix)}': {match}"):
        io.read_points(path)


@pytest.mark.parametrize("keyword", ["Binary", "bin", "binary extra", "BINARY_COMPRESSED"])
def test_pcd_unknown_data_keyword(tmp_path, keyword):
    """open3d returned uninitialised memory for a DATA keyword it does not know."""
    path = tmp_path / "k.pcd"
    path.write_bytes(pcd_header("x y z", "4 4 4", "F F F", 4, keyword) + bytes(48))
    with pytest.raises(ValueError, match=f"'DATA {keyword}': expected DATA ascii, binary or "):
        io.read_points(path)


def test_ascii_ply_with_fewer_points_than_declared(tmp_path):
    """open3d returned the faces that follow as points."""
    path = tmp_path / "f.ply"
    path.write_text("ply\nformat ascii 1.0\nelement vertex 5\nproperty float x\nproperty float y\n"
                    "property float z\nproperty float intensity\nelement face 2\n"
                    "property list uchar int vertex_indices\nend_header\n"
                    "1 2 3 0.5\n4 5 6 0.5\n7 8 9 0.5\n3 0 1 2\n3 2 1 0\n")
    with pytest.raises(ValueError, match="f.ply' is cut short: its header declares 5 points and "
                                         "2 rows of other elements, but 5 rows follow it"):
        io.read_points(path)


@pytest.mark.parametrize("name, header, rows, names", [
    ("n.pcd", "x y z nx ny nz", "1 2 3 0 0 1", ["normals_0", "normals_1", "normals_2"]),
    ("n.ply", "x y z normal_x normal_y normal_z", "1 2 3 0 0 1",
     ["normals_0", "normals_1", "normals_2"]),
    ("r.ply", "x y z red", "1 2 3 10", ["red"]),  # open3d invented green and blue
    ("c.pcd", "x y z red alpha green blue", "1 2 3 10 5 20 30",
     ["colors_0", "colors_1", "colors_2", "alpha"]),
    ("p.pcd", "x y z positions colors normals", "1 2 3 4 5 6",  # open3d: heap corruption
     ["positions", "colors", "normals"]),
    ("p.ply", "x y z positions", "1 2 3 4", ["positions"]),  # open3d: wrong x, y, z
])  # fmt: skip
def test_extra_fields_are_kept_under_their_names(tmp_path, name, header, rows, names):
    path = tmp_path / name
    ascii_file(path, rows + "\n", header, " ".join("F" * len(header.split())))
    points, fields = io.read_points_with_fields(path)
    assert fields == ["x", "y", "z", *names]
    expected = [float(v) for v in rows.split()]
    if name == "c.pcd":  # the colours are gathered at red's place
        expected = expected[:4] + expected[5:] + [expected[4]]
    np.testing.assert_array_equal(points, [expected])


def test_pcd_count_padding_and_packed_colour(tmp_path):
    """A COUNT 3 field gives three columns (open3d kept the first, named as the whole field),
    PCL's '_' padding is dropped and its packed rgb unpacked into 8-bit r, g, b."""
    rows = np.zeros(2, [("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("hist", "<f4", (3,)),
                        ("_", "u1", (4,)), ("rgb", "<u4"), ("i", "<u2")])
    rows["x"], rows["hist"] = [1, 2], [[7, 8, 9], [4, 5, 6]]
    rows["rgb"], rows["i"] = [0x0A141E, 0xFF0001], [300, 7]
    path = tmp_path / "h.pcd"
    path.write_bytes(pcd_header("x y z hist _ rgb i", "4 4 4 4 1 4 2", "F F F F U U U", 2,
                                "binary", counts="1 1 1 3 4 1 1") + rows.tobytes())
    points, names = io.read_points_with_fields(path)
    assert names == ["x", "y", "z", "hist_0", "hist_1", "hist_2", "colors_0", "colors_1",
                     "colors_2", "i"]
    np.testing.assert_array_equal(points, [[1, 0, 0, 7, 8, 9, 10, 20, 30, 300],
                                           [2, 0, 0, 4, 5, 6, 255, 0, 1, 7]])


def test_pcd_rgb_of_several_values_is_not_unpacked_as_one_colour(tmp_path):
    """Packed colours are one 4-byte value; an 'rgb' field of COUNT 2 (the unpacking raised a
    numpy broadcast error) keeps its values as rgb_0, rgb_1."""
    rows = np.zeros(1, [("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("rgb", "<f4", (2,))])
    rows["rgb"] = [[1.5, 2.5]]
    path = tmp_path / "c.pcd"
    path.write_bytes(pcd_header("x y z rgb", "4 4 4 4", "F F F F", 1, "binary",
                                counts="1 1 1 2") + rows.tobytes())
    points, names = io.read_points_with_fields(path)
    assert names == ["x", "y", "z", "rgb_0", "rgb_1"]
    np.testing.assert_array_equal(points, [[0, 0, 0, 1.5, 2.5]])


def test_pcd_point_larger_than_numpy_holds_is_a_malformed_header(tmp_path):
    path = tmp_path / "huge.pcd"
    path.write_bytes(pcd_header("x y z w", "4 4 4 4", "F F F F", 1, "binary",
                                counts="1 1 1 2147483648") + bytes(16))
    with pytest.raises(ValueError, match=r"huge\.pcd'.*a point of 8589934604 bytes"):
        io.read_points(path)


@pytest.mark.parametrize("fields, counts, match", [
    ("x y z x", "1 1 1 1", "has two fields named 'x'"),
    ("x y w", "1 1 1", "must have one field each named x, y and z"),
    ("x y z", "1 1 2", "must have one field each named x, y and z with one value per point"),
])  # fmt: skip
def test_pcd_without_one_x_y_z(tmp_path, fields, counts, match):
    values = sum(int(c) for c in counts.split())
    path = tmp_path / "f.pcd"
    path.write_bytes(pcd_header(fields, " ".join(["4"] * len(fields.split())),
                                " ".join(["F"] * len(fields.split())), 1, "binary", counts)
                     + bytes(4 * values))
    with pytest.raises(ValueError, match=match):
        io.read_points(path)


@pytest.mark.parametrize("suffix", [".npy", ".npz"])
def test_numpy_header_larger_than_its_data(tmp_path, suffix):
    """A 180-byte file declaring 1e11 x 3 floats raised MemoryError."""
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (100000000000, 3), }"
    header = header.ljust(117) + "\n"
    data = (b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode()
            + bytes(48))
    path = tmp_path / f"bomb{suffix}"
    if suffix == ".npy":
        path.write_bytes(data)
    else:
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("points.npy", data)
    with pytest.raises(ValueError, match=r"declares an array of shape \[100000000000, 3\] of "
                                         r"float32 \(1200000000000 bytes\), but holds 48 bytes"):
        io.read_points(path)


def test_fifo_is_not_a_regular_file(tmp_path):
    """A FIFO was reported as missing (and reading it would wait for a writer)."""
    os.mkfifo(tmp_path / "pipe.bin")
    with pytest.raises(ValueError, match="pipe.bin' is not a regular file"):
        io.read_points(tmp_path / "pipe.bin")


# A UTM-frame cloud: float32's spacing near x = 5e5 m and y = 4e6 m is 3 cm and 25 cm, so
# float32 moves its points by more than a 0.1 m voxel.
UTM_ORIGIN = np.array([512_345.0, 4_180_123.0, 35.0])


def utm_points(count: int = 200) -> np.ndarray:
    rng = np.random.default_rng(7)
    return UTM_ORIGIN + rng.uniform(0, 20, (count, 3)).round(3)


def write_binary_pcd(path, points: np.ndarray, types: list[str]) -> None:
    """A binary PCD of x, y, z (numpy ``types`` per field, 'f8' or 'f4') and intensity (f4)."""
    fields = ["x", "y", "z", "intensity"]
    kinds = [*types, "f4"]
    rows = np.zeros(len(points), [(f, "<" + k) for f, k in zip(fields, kinds)])
    for j, f in enumerate(fields[:3]):
        rows[f] = points[:, j]
    rows["intensity"] = 0.5
    sizes = " ".join(k[1] for k in kinds)
    path.write_bytes(pcd_header(" ".join(fields), sizes, " ".join("F" * 4), len(points),
                                "binary") + rows.tobytes())


@pytest.mark.parametrize("dtype", [None, np.float64, "float64", ">f8"])
def test_float64_coordinates_are_kept(tmp_path, dtype):
    points = utm_points()
    np.save(tmp_path / "u.npy", points)
    write_binary_pcd(tmp_path / "u.pcd", points, ["f8", "f8", "f8"])
    header = ("ply\nformat binary_little_endian 1.0\nelement vertex 200\n"
              "property double x\nproperty double y\nproperty double z\nend_header\n")
    (tmp_path / "u.ply").write_bytes(header.encode() + points.astype("<f8").tobytes())
    for name, columns in [("u.npy", 3), ("u.pcd", 4), ("u.ply", 3)]:
        read = io.read_points(tmp_path / name, dtype=dtype)
        assert read.dtype == np.float64, name
        np.testing.assert_array_equal(read[:, :3], points, err_msg=name)
        assert read.shape == (200, columns)
        assert io.read_cloud(tmp_path / name, dtype=dtype)[0].dtype == np.float64
        # float32, the default, rounds them: the reason for the option
        assert np.abs(io.read_points(tmp_path / name)[:, :3] - points).max() > 0.01


@pytest.mark.parametrize("stored, expected", [
    ("<f4", np.float32), ("<f2", np.float32), ("<i2", np.float32), ("<u2", np.float32),
    ("u1", np.float32), ("<f8", np.float64), ("<i4", np.float64), ("<u4", np.float64),
    ("<i8", np.float64),
])  # fmt: skip
def test_dtype_none_is_float64_where_coordinates_need_it(tmp_path, stored, expected):
    np.save(tmp_path / "p.npy", np.arange(12).reshape(4, 3).astype(stored))
    read = io.read_points(tmp_path / "p.npy", dtype=None)
    assert read.dtype == expected
    np.testing.assert_array_equal(read, np.arange(12).reshape(4, 3))
    assert io.read_points(tmp_path / "p.npy").dtype == np.float32


def test_dtype_none_follows_the_coordinates_not_other_fields(tmp_path):
    """A float32 x, y, z beside a float64 field reads as float32 (binned as before); one
    float64 coordinate makes it float64. Raw .bin files are float32."""
    points = utm_points(5)
    write_binary_pcd(tmp_path / "a.pcd", points, ["f4", "f4", "f4"])
    assert io.read_points(tmp_path / "a.pcd", dtype=None).dtype == np.float32
    write_binary_pcd(tmp_path / "b.pcd", points, ["f4", "f8", "f4"])
    read = io.read_points(tmp_path / "b.pcd", dtype=None)
    assert read.dtype == np.float64 and read[0, 1] == points[0, 1]
    points.astype("<f4").tofile(tmp_path / "c.bin")
    assert io.read_points(tmp_path / "c.bin", 3, dtype=None).dtype == np.float32
    assert io.read_points(tmp_path / "c.bin", 3, dtype=np.float64).dtype == np.float64


def test_ascii_float64_coordinates(tmp_path):
    ascii_file(tmp_path / "a.pcd", "512345.123 4180123.457 35.5\n", types="F F F")
    text = (tmp_path / "a.pcd").read_text().replace("SIZE 4 4 4", "SIZE 8 8 8")
    (tmp_path / "a.pcd").write_text(text)
    read = io.read_points(tmp_path / "a.pcd", dtype=None)
    np.testing.assert_array_equal(read, [[512345.123, 4180123.457, 35.5]])


@pytest.mark.parametrize("dtype", [np.float16, np.int32, "points", object, np.complex128])
@pytest.mark.parametrize("reader", ["read_points", "read_points_with_fields", "read_cloud"])
def test_bad_dtype(tmp_path, reader, dtype):
    np.save(tmp_path / "p.npy", np.zeros((4, 3)))
    with pytest.raises(ValueError, match="dtype must be np.float32, np.float64 or None, got"):
        getattr(io, reader)(tmp_path / "p.npy", dtype=dtype)
