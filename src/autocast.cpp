// Automatic mixed precision (torch.autocast) for the convolution, as for torch's own
// convolutions and spconv's: inside an autocast region, sparse_conv runs its features and
// weights in the region's lower precision (float16 by default on CUDA, bfloat16 on the CPU, or
// what the region asks for); float64 stays float64. Without this, an fp32 layer would run in
// fp32 under autocast, and features that an earlier autocast op returned in float16 would meet
// float32 weights and raise. The other ops run in their inputs' dtype (autocast falls through),
// as torch's pooling does. The casts are ops of their own, so autograd returns float32
// gradients to float32 weights.
#include <ATen/autocast_mode.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>

namespace spconv_lite {
namespace {

template <c10::DeviceType kDevice>
at::Tensor sparse_conv_autocast(const at::Tensor& features, const at::Tensor& weight,
                                const at::Tensor& nbr, const at::Tensor& nbr_t,
                                const std::optional<at::Tensor>& order,
                                const std::optional<at::Tensor>& order_t) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(
      at::autocast::get_autocast_dispatch_key_from_device_type(kDevice));
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("spconv_lite::sparse_conv", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, const std::optional<at::Tensor>&,
                            const std::optional<at::Tensor>&)>();
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(kDevice);
  return op.call(at::autocast::cached_cast(dtype, features, kDevice),
                 at::autocast::cached_cast(dtype, weight, kDevice), nbr, nbr_t, order, order_t);
}

}  // namespace

TORCH_LIBRARY_IMPL(spconv_lite, AutocastCUDA, m) {
  m.impl("sparse_conv", &sparse_conv_autocast<c10::DeviceType::CUDA>);
}

TORCH_LIBRARY_IMPL(spconv_lite, AutocastCPU, m) {
  m.impl("sparse_conv", &sparse_conv_autocast<c10::DeviceType::CPU>);
}

}  // namespace spconv_lite
