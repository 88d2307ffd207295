// Every spconv_lite op schema, in one place. Device implementations register themselves from
// src/cpu/*_cpu.cpp and src/cuda/*_cuda.cu; fake (meta) kernels and autograd are registered in
// spconv_lite/ops.py.
#include <Python.h>
#include <torch/library.h>

// `import spconv_lite._C` loads this shared library, which runs the registrations below. The
// module itself is empty: all functionality is reached through torch.ops.spconv_lite.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(spconv_lite, m) {
  // Kernel maps. nbr [N_out, K]: input row feeding output o through offset k, or -1.
  // nbr_t [N_in, K]: output row fed by input i through offset k, or -1.
  m.def(
      "build_subm_map(Tensor indices, int[] spatial_shape, int batch_size, int[] kernel_size, "
      "int[] dilation) -> (Tensor nbr, Tensor nbr_t)");
  m.def(
      "build_conv_map(Tensor indices, int[] spatial_shape, int batch_size, "
      "int[] out_spatial_shape, int[] kernel_size, int[] stride, int[] padding, int[] dilation, "
      "bool transposed) -> (Tensor out_indices, Tensor nbr, Tensor nbr_t)");
  // Convolution: out[o] = sum_k features[nbr[o, k]] @ weight[k], weight [K, C_in, C_out].
  // nbr_t is not read by the forward kernel; it is an input so that autograd can run the input
  // gradient (the same kernel over nbr_t) without rebuilding it.
  m.def("sparse_conv(Tensor features, Tensor weight, Tensor nbr, Tensor nbr_t) -> Tensor");
  m.def("sparse_conv_weight_grad(Tensor features, Tensor grad_out, Tensor nbr) -> Tensor");
  // Pooling over the same tables.
  m.def("sparse_sum_pool(Tensor features, Tensor nbr, Tensor nbr_t) -> Tensor");
  m.def("sparse_max_pool(Tensor features, Tensor nbr, Tensor nbr_t) -> (Tensor, Tensor)");
  m.def("sparse_max_pool_backward(Tensor grad_out, Tensor argmax, Tensor nbr_t) -> Tensor");
}
