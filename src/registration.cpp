// Every spconv_lite op schema, in one place. Device implementations register themselves from
// src/cpu/*_cpu.cpp and src/cuda/*_cuda.cu; fake (meta) kernels and autograd are registered in
// spconv_lite/ops.py.
// No Python here: the Python module's entry point is src/python/module.cpp.
#include <torch/library.h>

TORCH_LIBRARY(spconv_lite, m) {
  // Kernel maps. nbr [N_out, K]: input row feeding output o through offset k, or -1.
  // nbr_t [N_in, K]: output row fed by input i through offset k, or -1.
  // The grids are SymInt[] so that a compiled model keeps them symbolic: as int[] every new grid
  // (Pointcept's per-frame max + 96) was specialized and recompiled. The kernels still take
  // c10::IntArrayRef (the dispatcher passes concrete sizes to non-SymInt kernels).
  // check_sites=False: the caller vouches that the sites are in the grid and distinct (the
  // output sites of a conv map); the CUDA op then skips its host synchronisation for the check.
  m.def(
      "build_subm_map(Tensor indices, SymInt[] spatial_shape, int batch_size, "
      "int[] kernel_size, int[] dilation, bool check_sites=True) -> (Tensor nbr, Tensor nbr_t)");
  m.def(
      "build_conv_map(Tensor indices, SymInt[] spatial_shape, int batch_size, "
      "SymInt[] out_spatial_shape, int[] kernel_size, int[] stride, int[] padding, "
      "int[] dilation, bool transposed) -> (Tensor out_indices, Tensor nbr, Tensor nbr_t)");
  // Convolution: out[o] = sum_k features[nbr[o, k]] @ weight[k], weight [K, C_in, C_out].
  // nbr_t is not read by the forward kernel; it is an input so that autograd can run the input
  // gradient (the same kernel over nbr_t) without rebuilding it. order / order_t, optional,
  // are conv_row_order(nbr / nbr_t, splits): the CUDA kernels then visit the output rows in that
  // order, one pass per split of the offsets; the result is the same (the CPU ignores them).
  m.def(
      "sparse_conv(Tensor features, Tensor weight, Tensor nbr, Tensor nbr_t, Tensor? order=None, "
      "Tensor? order_t=None) -> Tensor");
  m.def("sparse_conv_weight_grad(Tensor features, Tensor grad_out, Tensor nbr) -> Tensor");
  // Row orders for the CUDA conv kernels: [splits, rows]; for each split s of the kernel
  // offsets (contiguous ranges, include/spconv_lite/row_order.h), the rows of nbr sorted stably
  // by their neighbour mask over that split, so that rows with the same pattern share tiles.
  m.def("conv_row_order(Tensor nbr, int splits) -> Tensor");
  // Pooling over the same tables.
  m.def("sparse_sum_pool(Tensor features, Tensor nbr, Tensor nbr_t) -> Tensor");
  m.def("sparse_max_pool(Tensor features, Tensor nbr, Tensor nbr_t) -> (Tensor, Tensor)");
  m.def("sparse_max_pool_backward(Tensor grad_out, Tensor argmax, Tensor nbr_t) -> Tensor");
  // Voxelization of points [N, C] (columns x, y, z, ... first). A point's voxel along axis d is
  // floor((p[d] - range_min[d]) / voxel_size[d]) in float32; it is dropped when that is outside
  // [0, grid_size[d]) or any of its values is not finite. voxel_size, range_min and grid_size
  // are in x, y, z order; coordinates come out as z, y, x. Voxels are numbered in order of their
  // first point and those past max_voxels are dropped. point_voxel_id [N] int64: a point's voxel
  // or -1.
  // voxelize: spconv's PointToVoxel. voxels [M, max_points_per_voxel, C] keep the first points
  // of each voxel in input order; free slots are zero, or the mean of the voxel's points with
  // empty_mean. num_points_per_voxel [M] counts the stored points.
  m.def(
      "voxelize(Tensor points, float[] voxel_size, float[] range_min, int[] grid_size, "
      "int max_points_per_voxel, int max_voxels, bool empty_mean) -> (Tensor voxels, "
      "Tensor coordinates, Tensor num_points_per_voxel, Tensor point_voxel_id)");
  // voxelize_mean: dynamic voxelization. features [M, C] is the mean of all the voxel's points
  // (no cap), num_points_per_voxel [M] their count.
  m.def(
      "voxelize_mean(Tensor points, float[] voxel_size, float[] range_min, int[] grid_size, "
      "int max_voxels) -> (Tensor features, Tensor coordinates, Tensor num_points_per_voxel, "
      "Tensor point_voxel_id)");
}
