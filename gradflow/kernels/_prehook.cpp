/* Output-gradient hooks in C++ for gradflow's grad_output probe on the CPU.

   A pre-hook on the autograd node that made a layer output reads the gradient of that
   output when backward reaches the node, and appends one row (layer, entries, sum of
   squares, in float64) to a sink; Python takes the rows once per recorded step. The hook
   runs without the GIL and makes no Python object: a Python pre-hook costs the engine a
   GIL hand-over, a tuple of wrapped tensors and a RemovableHandle per call, ~25 us a layer
   when backward has just streamed megabytes through the caches.

   Built once per torch version into gradflow's per-user cache (gradflow/kernels/prehook.py)
   and loaded with ctypes. Dense float32 and bfloat16 gradients go through the C kernels of
   _cpu.c (passed in as function pointers), any other through ATen: the squares summed in
   float32 or wider, as gradflow.kernels.host.sum_of_squares does. */

#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/python_variable.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

namespace {

using Reduce = void (*)(const void *, long, void *);

struct Sink {
  std::mutex mutex;
  std::vector<double> sums;
  std::vector<int64_t> layers;
  std::vector<int64_t> sizes;
  double seconds = 0.0;
  Reduce f32 = nullptr;
  Reduce bf16 = nullptr;
};

using SinkRef = std::shared_ptr<Sink>;

bool dense(const at::Tensor &g) {
  if (g.layout() != at::kStrided) return false;
  if (g.is_contiguous()) return true;
  if (g.dim() == 4) return g.is_contiguous(at::MemoryFormat::ChannelsLast);
  return g.dim() == 5 && g.is_contiguous(at::MemoryFormat::ChannelsLast3d);
}

double sum_of_squares(const Sink &sink, const at::Tensor &g) {
  if (g.device().is_cpu() && dense(g)) {
    Reduce kernel = g.scalar_type() == at::kFloat      ? sink.f32
                    : g.scalar_type() == at::kBFloat16 ? sink.bf16
                                                       : nullptr;
    if (kernel != nullptr) {
      double out = 0.0;
      kernel(g.data_ptr(), static_cast<long>(g.numel()), &out);
      return out;
    }
  }
  at::Tensor flat = g.detach().reshape(-1);
  if (flat.scalar_type() == at::kHalf || flat.scalar_type() == at::kBFloat16)
    flat = flat.to(at::kFloat);
  return at::square(flat).sum().item<double>();
}

class SquaresHook final : public torch::autograd::FunctionPreHook {
 public:
  SquaresHook(SinkRef sink, int64_t layer, uint32_t output_nr)
      : sink_(std::move(sink)), layer_(layer), output_nr_(output_nr) {}

  torch::autograd::variable_list operator()(
      const torch::autograd::variable_list &grads) override {
    if (output_nr_ >= grads.size() || !grads[output_nr_].defined()) return grads;
    auto start = std::chrono::steady_clock::now();
    const at::Tensor &grad = grads[output_nr_];
    double sum_sq = sum_of_squares(*sink_, grad);
    std::chrono::duration<double> spent = std::chrono::steady_clock::now() - start;
    std::lock_guard<std::mutex> lock(sink_->mutex);
    sink_->sums.push_back(sum_sq);
    sink_->layers.push_back(layer_);
    sink_->sizes.push_back(grad.numel());
    sink_->seconds += spent.count();
    return grads;
  }

 private:
  SinkRef sink_;  // shared: a graph kept past the Recorder's close keeps its sink
  int64_t layer_;
  uint32_t output_nr_;
};

}  // namespace

extern "C" {

/* A new sink (a handle for the calls below), reducing with these kernels (NULL: ATen). */
void *gradflow_sink_new(Reduce f32, Reduce bf16) {
  auto *handle = new SinkRef(std::make_shared<Sink>());
  (*handle)->f32 = f32;
  (*handle)->bf16 = bf16;
  return handle;
}

/* Drop Python's handle; hooks still waiting in a graph keep the sink until they go. */
void gradflow_sink_free(void *handle) { delete static_cast<SinkRef *>(handle); }

/* Rows waiting in the sink. */
long gradflow_sink_size(void *handle) {
  Sink &sink = **static_cast<SinkRef *>(handle);
  std::lock_guard<std::mutex> lock(sink.mutex);
  return static_cast<long>(sink.sums.size());
}

/* Move the first rows (at most capacity) out of the sink, oldest first, and the seconds
   the hooks spent since the last take; returns the number of rows moved. */
long gradflow_sink_take(void *handle, long capacity, double *sums, int64_t *layers,
                        int64_t *sizes, double *seconds) {
  Sink &sink = **static_cast<SinkRef *>(handle);
  std::lock_guard<std::mutex> lock(sink.mutex);
  long n = std::min(capacity, static_cast<long>(sink.sums.size()));
  std::copy_n(sink.sums.begin(), n, sums);
  std::copy_n(sink.layers.begin(), n, layers);
  std::copy_n(sink.sizes.begin(), n, sizes);
  sink.sums.erase(sink.sums.begin(), sink.sums.begin() + n);
  sink.layers.erase(sink.layers.begin(), sink.layers.begin() + n);
  sink.sizes.erase(sink.sizes.begin(), sink.sizes.begin() + n);
  *seconds = sink.seconds;
  sink.seconds = 0.0;
  return n;
}

/* Hook the node that made `tensor` (a torch.Tensor; called with the GIL held): 1 where
   hooked, 0 where the tensor has no node (a leaf), -1 where it is not a tensor or torch
   refused. */
int gradflow_watch(PyObject *tensor, void *handle, int64_t layer) {
  if (!THPVariable_Check(tensor)) return -1;
  try {
    const at::Tensor &out = THPVariable_Unpack(tensor);
    const auto &node = out.grad_fn();
    if (!node) return 0;
    node->add_pre_hook(std::make_unique<SquaresHook>(*static_cast<SinkRef *>(handle), layer,
                                                     out.output_nr()));
    return 1;
  } catch (...) {
    return -1;
  }
}

}  // extern "C"
