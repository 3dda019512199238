// Bindings of the batch-schedule solver: conversion and GIL release only.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "pipesd/errors.h"
#include "pipesd/scheduler.h"

namespace py = pybind11;
using pipesd::BatchPlan;

namespace {

// Python ints are unbounded; a window size that does not fit the core's int32_t gets the core's
// message rather than a conversion TypeError.
int32_t WindowSize(int64_t n) {
  if (n < std::numeric_limits<int32_t>::min() || n > std::numeric_limits<int32_t>::max()) {
    PIPESD_CHECK(
        false, ScheduleError,
        "a window needs 1 to " << pipesd::kMaxScheduleTokens << " draft tokens, got " << n);
  }
  return static_cast<int32_t>(n);
}

}  // namespace

void bind_scheduler(py::module_& m) {
  m.attr("MAX_SCHEDULE_TOKENS") = pipesd::kMaxScheduleTokens;

  py::class_<BatchPlan>(m, "BatchPlan",
                        "Where to cut a window of draft tokens into batches, and when the last "
                        "batch has crossed the link.")
      .def_property_readonly(
          "batch_ends", [](const BatchPlan& p) { return p.batch_ends; },
          "Cumulative token counts at the end of each batch; the last is the window size.")
      .def_readonly("makespan", &BatchPlan::makespan,
                    "When the last batch has crossed the link (units of alpha, beta, ready).")
      .def_property_readonly("batch_sizes", &pipesd::BatchSizes, "Tokens in each batch.")
      .def_property_readonly("num_batches", &BatchPlan::num_batches)
      .def_property_readonly("num_tokens", &BatchPlan::num_tokens)
      .def("__repr__", [](const BatchPlan& p) {
        return "BatchPlan(batch_ends=" + py::repr(py::cast(p.batch_ends)).cast<std::string>() +
               ", makespan=" + py::repr(py::float_(p.makespan)).cast<std::string>() + ")";
      });

  m.def("solve_batch_schedule", &pipesd::SolveBatchSchedule, py::arg("alpha"), py::arg("beta"),
        py::arg("ready"), py::call_guard<py::gil_scoped_release>(),
        "The optimal batching of a window whose token j is drafted at ready[j-1].");
  m.def(
      "solve_batch_schedule_constant",
      [](double alpha, double beta, double gamma, int64_t n) {
        const int32_t n32 = WindowSize(n);
        py::gil_scoped_release release;
        return pipesd::SolveBatchScheduleConstant(alpha, beta, gamma, n32);
      },
      py::arg("alpha"), py::arg("beta"), py::arg("gamma"), py::arg("n"),
      "The optimal batching of n tokens drafted at a constant gamma per token.");
  m.def("plan_makespan", &pipesd::PlanMakespan, py::arg("alpha"), py::arg("beta"), py::arg("ready"),
        py::arg("batch_ends"), py::call_guard<py::gil_scoped_release>(),
        "Simulates a given batching and returns when its last batch has crossed the link.");
}
