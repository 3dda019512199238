// pipesd._core: the compiled core. Each area binds itself in bind_<area>.cc.
#include <pybind11/pybind11.h>

#include "pipesd/errors.h"

namespace py = pybind11;

void bind_kv(py::module_& m);
void bind_scheduler(py::module_& m);
void bind_transport(py::module_& m);

PYBIND11_MODULE(_core, m) {
  m.doc() = "PipeSD compiled core: speculation ledger, batch scheduler, token transport.";

  // One hierarchy, mirrored: PipesdError is the base of every core error.
  auto base = py::register_exception<pipesd::PipesdError>(m, "PipesdError", PyExc_RuntimeError);
  py::register_exception<pipesd::LedgerError>(m, "LedgerError", base.ptr());
  py::register_exception<pipesd::ProtocolError>(m, "ProtocolError", base.ptr());
  py::register_exception<pipesd::TransportError>(m, "TransportError", base.ptr());
  py::register_exception<pipesd::ScheduleError>(m, "ScheduleError", base.ptr());

  bind_kv(m);
  bind_scheduler(m);
  bind_transport(m);
}
