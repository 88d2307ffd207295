// Runs a sparse backbone exported with spconv_lite.export.export_model on one LiDAR frame,
// without Python:
//
//   run_backbone PACKAGE.pt2 FRAME.bin OUT.bin [THREADS]
//
// 1. reads FRAME.bin, raw float32 points (x, y, z, intensity, ...: the column count is the
//    package's num_point_features, 4 for KITTI);
// 2. voxelizes them with the spconv_lite::voxelize operator (spconv's PointToVoxel), on the
//    grid stored in the package's metadata, and takes the mean of each voxel's stored points
//    as its features, as spconv_lite.batch_point_clouds does;
// 3. runs the package with torch::inductor::AOTIModelPackageLoader on (features, coordinates);
// 4. writes the first output (the BEV map for a backbone + HeightCompression) to OUT.bin as
//    raw float32 in C order and prints its shape and a few sums to compare with Python.
//
// The operators come from libspconv_lite_ops, which registers them with the PyTorch
// dispatcher when the program starts (it is linked with --no-as-needed for that).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/full.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <charconv>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

namespace {

using Metadata = std::unordered_map<std::string, std::string>;

// The voxel grid export_model stores in the package (GridGeometry, x, y, z order).
struct Grid {
  std::vector<double> voxel_size, range_min;
  std::vector<int64_t> grid_size;
  int64_t max_points_per_voxel = 0, max_voxels = 0, num_point_features = 0;
};

std::string metadata_value(const Metadata& metadata, const std::string& key) {
  auto it = metadata.find("spconv_lite." + key);
  if (it == metadata.end()) {
    throw std::runtime_error("the package has no metadata spconv_lite." + key +
                             ": export it with export_model(..., voxelizer=PointToVoxel(...))");
  }
  return it->second;
}

template <typename T>
std::vector<T> numbers(const Metadata& metadata, const std::string& key) {
  std::istringstream in(metadata_value(metadata, key));
  std::vector<T> values;
  for (T v; in >> v;) values.push_back(v);
  if (values.empty() || !in.eof()) {
    throw std::runtime_error("metadata spconv_lite." + key + " is not a list of numbers");
  }
  return values;
}

Grid read_grid(const Metadata& metadata) {
  Grid g;
  g.voxel_size = numbers<double>(metadata, "voxel_size");
  g.range_min = numbers<double>(metadata, "range_min");
  g.grid_size = numbers<int64_t>(metadata, "grid_size");
  g.max_points_per_voxel = numbers<int64_t>(metadata, "max_points_per_voxel").at(0);
  g.max_voxels = numbers<int64_t>(metadata, "max_voxels").at(0);
  g.num_point_features = numbers<int64_t>(metadata, "num_point_features").at(0);
  return g;
}

// Points [N, columns] float32 of a raw .bin file.
at::Tensor read_points(const std::string& path, int64_t columns) {
  if (!std::filesystem::is_regular_file(path)) {
    throw std::runtime_error("FRAME " + path + " is not a file");
  }
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) throw std::runtime_error("cannot open " + path);
  const auto bytes = static_cast<int64_t>(in.tellg());
  const int64_t row_bytes = columns * static_cast<int64_t>(sizeof(float));
  if (bytes % row_bytes != 0) {
    throw std::runtime_error(path + ": " + std::to_string(bytes) + " bytes is not a whole number "
                             "of points of " + std::to_string(columns) + " float32 columns");
  }
  at::Tensor points = at::full({bytes / row_bytes, columns}, 0.0f, at::kFloat);
  in.seekg(0);
  in.read(reinterpret_cast<char*>(points.data_ptr<float>()), bytes);
  if (!in) throw std::runtime_error("cannot read " + path);
  return points;
}

// The THREADS argument: a whole number >= 1 (std::stoi would take "2x" and throw "stoi").
int parse_threads(const std::string& text) {
  int threads = 0;
  const char* end = text.data() + text.size();
  const auto [stop, error] = std::from_chars(text.data(), end, threads);
  if (error != std::errc() || stop != end || threads < 1) {
    throw std::runtime_error("THREADS must be a whole number >= 1, got '" + text + "'");
  }
  return threads;
}

// spconv_lite::voxelize through the dispatcher (schema in src/registration.cpp).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> voxelize(const at::Tensor& points,
                                                                   const Grid& g) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("spconv_lite::voxelize", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, c10::ArrayRef<double>, c10::ArrayRef<double>,
              c10::ArrayRef<int64_t>, int64_t, int64_t, bool)>();
  return op.call(points, g.voxel_size, g.range_min, g.grid_size, g.max_points_per_voxel,
                 g.max_voxels, /*empty_mean=*/false);
}

// Writes the tensor's float32 values under a temporary name, then renames: no partial file.
void write_raw(const at::Tensor& t, const std::string& path) {
  const at::Tensor values = t.contiguous();
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(values.data_ptr<float>()),
              static_cast<std::streamsize>(values.numel() * sizeof(float)));
    if (!out) throw std::runtime_error("cannot write " + tmp);
  }
  std::filesystem::rename(tmp, path);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4 || argc > 5) {
    std::cerr << "usage: " << argv[0] << " PACKAGE.pt2 FRAME.bin OUT.bin [THREADS]\n";
    return 2;
  }
  try {
    if (argc == 5) at::set_num_threads(parse_threads(argv[4]));
    torch::inductor::AOTIModelPackageLoader loader(argv[1]);
    const Grid grid = read_grid(loader.get_metadata());

    const at::Tensor points = read_points(argv[2], grid.num_point_features);
    auto [voxels, coords, num_points, point_voxel_id] = voxelize(points, grid);
    if (coords.size(0) == 0) {
      // The package takes one site or more (its traced shapes start at 1).
      throw std::runtime_error(std::string("no point of ") + argv[2] + " (" +
                               std::to_string(points.size(0)) + " points) lies inside the "
                               "package's voxel grid: there is nothing to run the model on");
    }
    // Mean of the stored points (free slots are zero), as spconv_lite.batch_point_clouds.
    const at::Tensor features =
        voxels.sum({1}).div(num_points.clamp_min(1).unsqueeze(1).to(voxels.scalar_type()));
    const at::Tensor batch_index = at::full({coords.size(0), 1}, 0, coords.options());
    const at::Tensor indices = at::cat({batch_index, coords}, 1);  // (batch, z, y, x)

    const std::vector<at::Tensor> outputs = loader.run({features, indices});
    const at::Tensor bev = outputs.at(0).to(at::kFloat);
    write_raw(bev, argv[3]);

    std::printf("points %lld, voxels %lld\n", static_cast<long long>(points.size(0)),
                static_cast<long long>(coords.size(0)));
    std::ostringstream shape;
    shape << bev.sizes();
    std::printf("output %s float32 -> %s\n", shape.str().c_str(), argv[3]);
    std::printf("sum %.6e, abs max %.6e\n", bev.sum().item<double>(),
                bev.abs().max().item<double>());
  } catch (const std::exception& e) {
    std::cerr << "run_backbone: error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
