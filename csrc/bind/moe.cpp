// _core.moe_route, moe_route_bwd, moe_permute, moe_permute_workspace,
// moe_scatter, moe_gather: python/mixkit/ops/moe.py.
#include "bind/bind.h"
#include "common/moe.h"

using namespace mixkit;

MIXKIT_BIND(moe) {
  m.def(
      "moe_route",
      [](int backend, int device, uintptr_t stream, int dtype, uintptr_t logits, uintptr_t weights,
         uintptr_t expert_ids, int64_t tokens, int64_t experts, int64_t top_k, bool renormalize) {
        const MoeRouteArgs a{DType(dtype),       ptr<const void>(logits), ptr<float>(weights),
                             ptr<int32_t>(expert_ids), tokens,              experts,
                             top_k,              renormalize};
        on_backend(backend, [&] { moe_route_cpu(a); }, [&] { moe_route_gpu(a, device, stream_ptr(stream)); });
      },
      nb::call_guard<nb::gil_scoped_release>());

  m.def(
      "moe_route_bwd",
      [](int backend, int device, uintptr_t stream, int dtype, uintptr_t grad_weights, uintptr_t weights,
         uintptr_t expert_ids, uintptr_t grad_logits, uintptr_t logits, int64_t tokens, int64_t experts,
         int64_t top_k) {
        const MoeRouteBwdArgs a{DType(dtype),
                                ptr<const float>(grad_weights),
                                ptr<const float>(weights),
                                ptr<const int32_t>(expert_ids),
                                ptr<void>(grad_logits),
                                ptr<const void>(logits),
                                tokens,
                                experts,
                                top_k};
        on_backend(backend, [&] { moe_route_bwd_cpu(a); },
                   [&] { moe_route_bwd_gpu(a, device, stream_ptr(stream)); });
      },
      nb::call_guard<nb::gil_scoped_release>());

  m.def(
      "moe_permute_workspace",
      [](int backend, int64_t tokens, int64_t top_k, int64_t experts) -> int64_t {
        int64_t n = 0;
        on_backend(
            backend,
            [&] {
              check_moe_sizes(tokens, top_k, 1);  // the CPU walks the ids serially: no scratch
            },
            [&] { n = moe_permute_workspace_gpu(tokens, top_k, experts); });
        return n;
      },
      "int32 elements of scratch that moe_permute needs on this backend.");

  m.def(
      "moe_permute",
      [](int backend, int device, uintptr_t stream, int dtype, uintptr_t x, uintptr_t expert_ids, uintptr_t x_perm,
         uintptr_t offsets, uintptr_t row_map, uintptr_t workspace, int64_t tokens, int64_t top_k, int64_t hidden,
         int64_t experts) {
        const MoePermuteArgs a{DType(dtype),        ptr<const void>(x), ptr<const int32_t>(expert_ids),
                               ptr<void>(x_perm),   ptr<int64_t>(offsets), ptr<int32_t>(row_map),
                               ptr<int32_t>(workspace), tokens,          top_k,
                               hidden,              experts};
        on_backend(backend, [&] { moe_permute_cpu(a); }, [&] { moe_permute_gpu(a, device, stream_ptr(stream)); });
      },
      nb::call_guard<nb::gil_scoped_release>());

  m.def(
      "moe_scatter",
      [](int backend, int device, uintptr_t stream, int dtype, uintptr_t src, uintptr_t scale, uintptr_t row_map,
         uintptr_t dst, int64_t tokens, int64_t top_k, int64_t hidden) {
        const MoeScatterArgs a{DType(dtype),      ptr<const void>(src), ptr<const float>(scale),
                               ptr<const int32_t>(row_map), ptr<void>(dst), tokens,
                               top_k,             hidden};
        on_backend(backend, [&] { moe_scatter_cpu(a); }, [&] { moe_scatter_gpu(a, device, stream_ptr(stream)); });
      },
      nb::call_guard<nb::gil_scoped_release>());

  m.def(
      "moe_gather",
      [](int backend, int device, uintptr_t stream, int dtype, uintptr_t src, uintptr_t row_map, uintptr_t weights,
         uintptr_t dst, uintptr_t grad, uintptr_t grad_weights, int64_t tokens, int64_t top_k, int64_t hidden) {
        const MoeGatherArgs a{DType(dtype),           ptr<const void>(src), ptr<const int32_t>(row_map),
                              ptr<const float>(weights), ptr<void>(dst),     ptr<const void>(grad),
                              ptr<float>(grad_weights),  tokens,             top_k,
                              hidden};
        on_backend(backend, [&] { moe_gather_cpu(a); }, [&] { moe_gather_gpu(a, device, stream_ptr(stream)); });
      },
      nb::call_guard<nb::gil_scoped_release>());
}
