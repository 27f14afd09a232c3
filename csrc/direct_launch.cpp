// The Python module of fused_ddpm._C: the step's launches without the Python side of
// torch.ops.
//
// A call through torch.ops.fused_ddpm.* turns every argument into an IValue and looks for
// __torch_function__ overrides on each: about 8 µs per launch of the step, which is the
// whole cost of a small step. These functions call the same ops through the C++ dispatcher,
// so the kernels' own checks, dispatch modes and the CUDA implementations registered by
// fused_ddpm._C_cuda all still apply:
//
//   step_forward(ins, t, seeds, table, thresh, gscale, outs, flags, scalars)
//   step_backward(ins, grad_y, grad_x0, t, seeds, table, thresh, gscale, grads, flags, scalars)
//       the launches of docs/kernels.md, arguments as the ops take them.
//   PlainStep(...)
//       one kind of plain step that fused_ddpm.step.Prepared has validated (int t, no out=,
//       no guidance, no dynamic thresholding, dense inputs). Calling it with arguments of
//       that kind checks a few values, allocates the outputs and launches; for any other
//       call it returns None and the Python step takes its own path (which validates,
//       raises, or runs the call). PlainStep.randn and PlainStep.seeded also draw the step's
//       noise (z, or the Philox seeds) from a generator, as the diffusers drop-ins do.
#include <torch/csrc/Generator.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/strides.h>

#include <optional>
#include <vector>

#include "step_common.h"

namespace fused_ddpm {
namespace {

namespace py = pybind11;

using ForwardFn = void(const OptTensorList&, const at::Tensor&, const OptTensor&,
                       const at::Tensor&, const OptTensor&, const OptTensor&,
                       const OptTensorList&, c10::IntArrayRef, c10::ArrayRef<double>);
using BackwardFn = void(const OptTensorList&, const at::Tensor&, const OptTensor&,
                        const at::Tensor&, const OptTensor&, const at::Tensor&,
                        const OptTensor&, const OptTensor&, const OptTensorList&,
                        c10::IntArrayRef, c10::ArrayRef<double>);

template <typename Fn>
c10::TypedOperatorHandle<Fn> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

const c10::TypedOperatorHandle<ForwardFn>& forward_op() {
  static const auto op = find_op<ForwardFn>("fused_ddpm::step_forward_kernel");
  return op;
}

const c10::TypedOperatorHandle<BackwardFn>& backward_op() {
  static const auto op = find_op<BackwardFn>("fused_ddpm::step_backward_kernel");
  return op;
}

OptTensorList to_list(const std::vector<OptTensor>& v) {
  OptTensorList list;
  list.reserve(v.size());
  for (const auto& a : v) list.push_back(a);
  return list;
}

void step_forward(const std::vector<OptTensor>& ins, const at::Tensor& t, const OptTensor& seeds,
                  const at::Tensor& table, const OptTensor& thresh, const OptTensor& gscale,
                  const std::vector<OptTensor>& outs, const std::vector<int64_t>& flags,
                  const std::vector<double>& scalars) {
  forward_op().call(to_list(ins), t, seeds, table, thresh, gscale, to_list(outs), flags,
                    scalars);
}

void step_backward(const std::vector<OptTensor>& ins, const at::Tensor& grad_y,
                   const OptTensor& grad_x0, const at::Tensor& t, const OptTensor& seeds,
                   const at::Tensor& table, const OptTensor& thresh, const OptTensor& gscale,
                   const std::vector<OptTensor>& grads, const std::vector<int64_t>& flags,
                   const std::vector<double>& scalars) {
  backward_op().call(to_list(ins), grad_y, grad_x0, t, seeds, table, thresh, gscale,
                     to_list(grads), flags, scalars);
}

// What a validated call passed for one argument: nothing, a Python int, or a plain tensor
// (torch.Tensor or Parameter, not a subclass) with these sizes, strides, dtype and device.
struct Kind {
  enum Of { NONE, INT, TENSOR, OTHER } of = NONE;
  std::vector<int64_t> sizes, strides;
  at::ScalarType dtype = at::kFloat;
  at::Device device = at::kCPU;

  explicit Kind(py::handle h) {
    if (h.is_none()) {
      of = NONE;
    } else if (PyLong_CheckExact(h.ptr())) {
      of = INT;
    } else if (THPVariable_CheckExact(h.ptr())) {
      of = TENSOR;
      const at::Tensor& a = THPVariable_Unpack(h.ptr());
      sizes = a.sizes().vec();
      strides = a.strides().vec();
      dtype = a.scalar_type();
      device = a.device();
    } else {
      of = OTHER;
    }
  }

  // Whether h is of this kind; a tensor is returned through `out`.
  bool matches(py::handle h, OptTensor* out = nullptr) const {
    switch (of) {
      case NONE:
        return h.is_none();
      case INT:
        return PyLong_CheckExact(h.ptr());
      case TENSOR: {
        if (!THPVariable_CheckExact(h.ptr())) return false;
        const at::Tensor& a = THPVariable_Unpack(h.ptr());
        if (a.scalar_type() != dtype || a.device() != device ||
            !a.sizes().equals(sizes) || !a.strides().equals(strides)) {
          return false;
        }
        if (out != nullptr) *out = a;
        return true;
      }
      case OTHER:
        return false;
    }
    return false;
  }
};

class PlainStep {
 public:
  // table, flags, scalars: the launch's (docs/kernels.md). rows: int64 [R] on the device,
  // rows[i] = i (t's per-sample view is taken from it). h_free: per row, whether it needs
  // no history (empty when every row may be launched). x ... history: the arguments of the
  // validated call; uses_*: whether the launch reads them (noise as ins[Z], seeds for
  // Philox noise, history as ins[H]).
  PlainStep(at::Tensor table, at::Tensor rows, std::vector<int64_t> flags,
            std::vector<double> scalars, std::vector<bool> h_free, py::handle x, py::handle m,
            py::handle noise, py::handle seeds, py::handle history, bool uses_noise,
            bool uses_seeds, bool uses_history)
      : table_(std::move(table)),
        rows_(std::move(rows)),
        flags_(std::move(flags)),
        scalars_(std::move(scalars)),
        h_free_(std::move(h_free)),
        x_(x),
        m_(m),
        noise_(noise),
        seeds_(seeds),
        history_(history),
        uses_noise_(uses_noise),
        uses_seeds_(uses_seeds),
        uses_history_(uses_history) {
    t_views_.resize(rows_.size(0));
    TORCH_CHECK_VALUE(x_.of == Kind::TENSOR && m_.of == Kind::TENSOR,
                      "PlainStep: x and model_output must be plain tensors");
    TORCH_CHECK_VALUE(x_.sizes.size() >= 2 && x_.sizes[0] > 0 && rows_.dim() == 1,
                      "PlainStep: x must be a non-empty [B, C, ...] tensor, rows [R]");
    TORCH_CHECK_VALUE(!uses_noise_ || noise_.of == Kind::TENSOR,
                      "PlainStep: the noise it reads must be a tensor");
    TORCH_CHECK_VALUE(!uses_seeds_ || seeds_.of == Kind::TENSOR,
                      "PlainStep: the seeds it reads must be a tensor");
    TORCH_CHECK_VALUE(!uses_history_ || history_.of == Kind::TENSOR,
                      "PlainStep: the history it reads must be a tensor");
    randn_ok_ = uses_noise_ && noise_.sizes == x_.sizes && noise_.dtype == x_.dtype &&
                noise_.device == x_.device &&
                c10::IntArrayRef(noise_.strides).equals(c10::contiguous_strides(noise_.sizes));
    seeded_ok_ = uses_seeds_ && seeds_.sizes == std::vector<int64_t>{x_.sizes[0]} &&
                 seeds_.strides == std::vector<int64_t>{1} && seeds_.dtype == at::kLong &&
                 seeds_.device == x_.device;
  }

  // y, or (y, x0) when return_x0 is True; None when this is not the prepared kind of call.
  py::object operator()(py::handle x, py::handle m, py::handle t, py::handle noise,
                        py::handle seeds, py::handle history, py::handle return_x0) {
    OptTensor xt, mt, zt, st, ht;
    if (!x_.matches(x, &xt) || !m_.matches(m, &mt) || !noise_.matches(noise, &zt) ||
        !seeds_.matches(seeds, &st) || !history_.matches(history, &ht)) {
      return py::none();
    }
    const int64_t row = row_of(t);
    if (row < 0 || !is_bool(return_x0) || differentiable({xt, mt, zt, ht})) return py::none();
    return launch(*xt, *mt, zt, st, ht, row, return_x0.ptr() == Py_True);
  }

  // The same step with its noise drawn here from `generator` (None: the default generator
  // of x's device), as the diffusers drop-ins draw it, with the same bits:
  //   randn:  z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device),
  //           for a PlainStep prepared with such a z (external noise, contiguous, x's dtype);
  //   seeded: seeds = torch.randint(0, SEED_HIGH, [B], dtype=int64, generator=generator,
  //           device=generator's device).to(x.device), for one prepared with such seeds.
  // None, with nothing drawn, when this is not that kind of call or the generator is not a
  // torch.Generator (on x's device type, for randn).
  py::object randn(py::handle x, py::handle m, py::handle t, py::handle generator,
                   py::handle history, py::handle return_x0) {
    return draw_and_launch(x, m, t, generator, history, return_x0, /*seeded=*/false);
  }
  py::object seeded(py::handle x, py::handle m, py::handle t, py::handle generator,
                    py::handle history, py::handle return_x0) {
    return draw_and_launch(x, m, t, generator, history, return_x0, /*seeded=*/true);
  }

 private:
  static bool is_bool(py::handle h) { return h.ptr() == Py_True || h.ptr() == Py_False; }

  static bool differentiable(std::initializer_list<OptTensor> ts) {
    if (!at::GradMode::is_enabled()) return false;
    for (const auto& a : ts) {
      if (a.has_value() && a->requires_grad()) return true;
    }
    return false;
  }

  py::object draw_and_launch(py::handle x, py::handle m, py::handle t, py::handle generator,
                             py::handle history, py::handle return_x0, bool seeded) {
    OptTensor xt, mt, ht;
    const bool kind_ok = seeded ? seeded_ok_ && noise_.matches(py::none())
                                : randn_ok_ && seeds_.matches(py::none());
    if (!kind_ok || !x_.matches(x, &xt) || !m_.matches(m, &mt) ||
        !history_.matches(history, &ht)) {
      return py::none();
    }
    const int64_t row = row_of(t);
    if (row < 0 || !is_bool(return_x0) || differentiable({xt, mt, ht})) return py::none();
    std::optional<at::Generator> gen;
    if (!generator.is_none()) {
      if (!THPGenerator_Check(generator.ptr())) return py::none();
      gen = reinterpret_cast<THPGenerator*>(generator.ptr())->cdata;
      if (!seeded && gen->device().type() != xt->device().type()) return py::none();
    }
    const bool want_x0 = return_x0.ptr() == Py_True;
    if (!seeded) {
      return launch(*xt, *mt, at::randn(xt->sizes(), gen, xt->options()), std::nullopt, ht,
                    row, want_x0);
    }
    const at::Device where = gen.has_value() ? gen->device() : xt->device();
    const at::Tensor seeds =
        at::randint(0, SEED_HIGH, {x_.sizes[0]}, gen, at::TensorOptions(at::kLong).device(where))
            .to(xt->device());
    return launch(*xt, *mt, std::nullopt, seeds, ht, row, want_x0);
  }

  // t's row when t is a Python int the prepared call may take, else -1 (the Python step
  // then raises the error that names t).
  int64_t row_of(py::handle t) const {
    if (!PyLong_CheckExact(t.ptr())) return -1;
    int overflow = 0;
    const long long row = PyLong_AsLongLongAndOverflow(t.ptr(), &overflow);
    if (overflow != 0 || row < 0 || row >= rows_.size(0) ||
        (!h_free_.empty() && !h_free_[row])) {
      return -1;
    }
    return row;
  }

  py::object launch(const at::Tensor& x, const at::Tensor& m, const OptTensor& z,
                    const OptTensor& seeds, const OptTensor& history, int64_t row,
                    bool want_x0) {
    at::Tensor& t = t_views_[row];
    if (!t.defined()) t = rows_.as_strided({x_.sizes[0]}, {0}, rows_.storage_offset() + row);
    at::Tensor y = at::empty_like(x);
    OptTensor x0 = want_x0 ? OptTensor(at::empty_like(x)) : std::nullopt;
    OptTensorList ins;
    ins.reserve(NUM_IN);
    for (int i = 0; i < NUM_IN; ++i) ins.push_back(std::nullopt);
    ins.set(In::X, x);
    ins.set(In::M, m);
    if (uses_noise_) ins.set(In::Z, z);
    if (uses_history_) ins.set(In::H, history);
    OptTensorList outs;
    outs.reserve(NUM_OUT);
    outs.push_back(y);
    outs.push_back(x0);
    {
      py::gil_scoped_release no_gil;  // as torch.ops does while a kernel runs
      forward_op().call(ins, t, uses_seeds_ ? seeds : std::nullopt, table_, std::nullopt,
                        std::nullopt, outs, flags_, scalars_);
    }
    if (!want_x0) return py::cast(y);
    return py::make_tuple(y, *x0);
  }

  at::Tensor table_, rows_;
  std::vector<at::Tensor> t_views_;  // per row: its [B] view of rows_, made on first use
  std::vector<int64_t> flags_;
  std::vector<double> scalars_;
  std::vector<bool> h_free_;
  Kind x_, m_, noise_, seeds_, history_;
  bool uses_noise_, uses_seeds_, uses_history_;
  bool randn_ok_ = false;   // the noise read is a contiguous tensor shaped, typed, placed as x
  bool seeded_ok_ = false;  // the seeds read are a contiguous int64 [B] on x's device
};

}  // namespace
}  // namespace fused_ddpm

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using fused_ddpm::PlainStep;
  namespace py = pybind11;
  m.doc() = "fused_ddpm's C++ kernels: the step's launches without torch.ops' Python side";
  // The GIL is released while the kernels run, as torch.ops does.
  m.def("step_forward", torch::wrap_pybind_function_no_gil(&fused_ddpm::step_forward),
        "step_forward_kernel through the C++ dispatcher (arguments as the op's)");
  m.def("step_backward", torch::wrap_pybind_function_no_gil(&fused_ddpm::step_backward),
        "step_backward_kernel through the C++ dispatcher (arguments as the op's)");
  py::class_<PlainStep>(m, "PlainStep")
      .def(py::init<at::Tensor, at::Tensor, std::vector<int64_t>, std::vector<double>,
                    std::vector<bool>, py::handle, py::handle, py::handle, py::handle,
                    py::handle, bool, bool, bool>())
      .def("__call__", torch::wrap_pybind_function(
                           [](PlainStep& s, py::handle x, py::handle m, py::handle t,
                              py::handle noise, py::handle seeds, py::handle history,
                              py::handle return_x0) {
                             return s(x, m, t, noise, seeds, history, return_x0);
                           }))
      .def("randn", torch::wrap_pybind_function(
                        [](PlainStep& s, py::handle x, py::handle m, py::handle t,
                           py::handle generator, py::handle history, py::handle return_x0) {
                          return s.randn(x, m, t, generator, history, return_x0);
                        }))
      .def("seeded", torch::wrap_pybind_function(
                         [](PlainStep& s, py::handle x, py::handle m, py::handle t,
                            py::handle generator, py::handle history, py::handle return_x0) {
                           return s.seeded(x, m, t, generator, history, return_x0);
                         }));
}
