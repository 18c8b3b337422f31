// The cpu twin's replay loop without Python per op (see twin/native.py).
//
// Each step holds an operator handle and the boxed arguments it was captured with; a replay
// copies them onto a stack and calls the operator's boxed kernel. That skips, per op, what the
// generated Python function pays: a bytecode call, the Python argument parser (keyword `out=`
// included) and a GIL release and re-acquire. Tensors in the saved stacks share their
// TensorImpl with the captured ones, so results land where the Python replay puts them.

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ScalarOps.h>
#include <c10/core/GradMode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/jit/python/pybind_utils.h>

#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace {

struct Step {
  std::optional<c10::OperatorHandle> op;
  std::vector<c10::IValue> args;
  // (index of a returned tensor on the stack, captured tensor it is copied into): ops replayed
  // through their functional form, whose results need a copy into the captured outputs.
  std::vector<std::pair<int64_t, at::Tensor>> copies;
  // An updatable task's segment instead of an op: its `run` is called.
  py::object callback;
};

c10::IValue to_ivalue(const py::handle& value, const c10::Argument& arg) {
  if (arg.real_type()->kind() == c10::TypeKind::TensorType && !THPVariable_Check(value.ptr())) {
    // A number where the schema says Tensor (`add(x, 1e-6)` as the recorder saw it): wrap it
    // as the Python argument parser does, so type promotion treats it as a scalar.
    at::Tensor t =
        c10::scalar_to_tensor(torch::jit::toIValue(value, c10::NumberType::get()).toScalar());
    t.unsafeGetTensorImpl()->set_wrapped_number(true);
    return t;
  }
  return torch::jit::toIValue(value, arg.real_type());
}

class NativeReplay {
 public:
  void add_op(
      const std::string& name,
      const std::string& overload,
      const py::tuple& args,
      const py::dict& kwargs,
      std::vector<std::pair<int64_t, at::Tensor>> copies) {
    Step step;
    step.op = c10::Dispatcher::singleton().findSchemaOrThrow(name.c_str(), overload.c_str());
    const auto& arguments = step.op->schema().arguments();
    if (args.size() > arguments.size()) {
      throw std::invalid_argument(name + ": more positional arguments than the schema has");
    }
    size_t used_kwargs = 0;
    for (size_t i = 0; i < arguments.size(); ++i) {
      const auto& arg = arguments[i];
      if (i < args.size()) {
        step.args.push_back(to_ivalue(args[i], arg));
      } else if (kwargs.contains(arg.name().c_str())) {
        step.args.push_back(to_ivalue(kwargs[arg.name().c_str()], arg));
        ++used_kwargs;
      } else if (arg.default_value()) {
        step.args.push_back(*arg.default_value());
      } else {
        throw std::invalid_argument(name + ": no value for argument " + arg.name());
      }
    }
    if (used_kwargs != kwargs.size()) {
      throw std::invalid_argument(name + ": a keyword argument the schema does not have");
    }
    const size_t returns = step.op->schema().returns().size();
    for (const auto& copy : copies) {
      if (copy.first < 0 || static_cast<size_t>(copy.first) >= returns) {
        throw std::invalid_argument(name + ": copy from a return the op does not have");
      }
    }
    step.copies = std::move(copies);
    steps_.push_back(std::move(step));
  }

  void add_callback(py::object segment) {
    Step step;
    step.callback = std::move(segment);
    steps_.push_back(std::move(step));
  }

  size_t size() const {
    return steps_.size();
  }

  void run() {
    // Replays are inference, as in the generated Python function: grad mode off. With it off,
    // the autograd kernels only check and redispatch, so they are skipped altogether (as
    // torch.inference_mode does); ADInplaceOrView still runs, version counters still move.
    c10::AutoGradMode no_grad(false);
    const c10::impl::LocalDispatchKeySet outer = c10::impl::tls_local_dispatch_key_set();
    c10::impl::ExcludeDispatchKeyGuard below_autograd(c10::autograd_dispatch_keyset);
    py::gil_scoped_release no_gil;
    std::vector<c10::IValue> stack;
    for (const Step& step : steps_) {
      if (step.callback) {
        // A segment records its task again on an update, through Python dispatch: it runs
        // with the caller's dispatch keys, as in the Python replay.
        c10::impl::ForceDispatchKeyGuard caller_keys(outer);
        py::gil_scoped_acquire gil;
        step.callback.attr("run")();
        continue;
      }
      stack.assign(step.args.begin(), step.args.end());
      step.op->callBoxed(stack);
      for (const auto& [index, target] : step.copies) {
        target.copy_(stack[index].toTensor());
      }
    }
  }

 private:
  std::vector<Step> steps_;
};

} // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<NativeReplay>(m, "NativeReplay")
      .def(py::init<>())
      .def("add_op", &NativeReplay::add_op)
      .def("add_callback", &NativeReplay::add_callback)
      .def("__len__", &NativeReplay::size)
      .def("run", &NativeReplay::run);
}
