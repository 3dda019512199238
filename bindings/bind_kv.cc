// Bindings of the speculation ledger: conversion and argument checks only.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "pipesd/ledger.h"

namespace py = pybind11;
using pipesd::SpeculationLedger;
using pipesd::VerdictDecision;
using pipesd::VerifyWindow;

void bind_kv(py::module_& m) {
  py::class_<VerifyWindow>(m, "VerifyWindow", "Drafts submitted for one verification.")
      .def_readonly("epoch", &VerifyWindow::epoch)
      .def_readonly("start", &VerifyWindow::start)
      .def_readonly("count", &VerifyWindow::count)
      .def("__repr__", [](const VerifyWindow& w) {
        return "VerifyWindow(epoch=" + std::to_string(w.epoch) +
               ", start=" + std::to_string(w.start) + ", count=" + std::to_string(w.count) + ")";
      });

  py::class_<VerdictDecision>(m, "VerdictDecision", "What a verdict means for both sides.")
      .def_readonly("stale", &VerdictDecision::stale)
      .def_readonly("accepted", &VerdictDecision::accepted)
      .def_readonly("next_token", &VerdictDecision::next_token)
      .def_readonly("bonus", &VerdictDecision::bonus)
      .def_readonly("committed_len", &VerdictDecision::committed_len)
      .def_readonly("draft_keep", &VerdictDecision::draft_keep)
      .def_readonly("target_keep", &VerdictDecision::target_keep)
      .def_readonly("discarded", &VerdictDecision::discarded)
      .def_readonly("kept_beyond", &VerdictDecision::kept_beyond)
      .def_readonly("rolled_back", &VerdictDecision::rolled_back)
      .def_readonly("epoch", &VerdictDecision::epoch)
      .def("__repr__", [](const VerdictDecision& d) {
        return "VerdictDecision(stale=" + std::string(d.stale ? "True" : "False") +
               ", accepted=" + std::to_string(d.accepted) +
               ", next_token=" + std::to_string(d.next_token) +
               ", committed_len=" + std::to_string(d.committed_len) +
               ", discarded=" + std::to_string(d.discarded) +
               ", kept_beyond=" + std::to_string(d.kept_beyond) +
               ", epoch=" + std::to_string(d.epoch) + ")";
      });

  py::class_<SpeculationLedger>(m, "SpeculationLedger",
                                "Committed prefix, pending drafts, epochs and rollback decisions "
                                "for one sequence.")
      .def(py::init<int64_t>(), py::arg("max_len"))
      .def("begin", &SpeculationLedger::Begin, py::arg("prompt"))
      .def("append_drafts", &SpeculationLedger::AppendDrafts, py::arg("drafts"))
      .def("mark_sent", &SpeculationLedger::MarkSent, py::arg("n"))
      .def("submit", &SpeculationLedger::Submit, py::arg("count"))
      .def("apply_verdict", &SpeculationLedger::ApplyVerdict, py::arg("epoch"), py::arg("accepted"),
           py::arg("next_token"))
      .def("commit_drafts", &SpeculationLedger::CommitDrafts, py::arg("n"))
      .def("discard_drafts", &SpeculationLedger::DiscardDrafts)
      .def("note_draft_kv", &SpeculationLedger::NoteDraftKv, py::arg("length"))
      .def("note_target_kv", &SpeculationLedger::NoteTargetKv, py::arg("length"))
      .def_property_readonly("max_len", &SpeculationLedger::max_len)
      .def_property_readonly("committed_len", &SpeculationLedger::committed_len)
      .def_property_readonly("pending_count", &SpeculationLedger::pending_count)
      .def_property_readonly("sent_count", &SpeculationLedger::sent_count)
      .def_property_readonly("unsent_count", &SpeculationLedger::unsent_count)
      .def_property_readonly("epoch", &SpeculationLedger::epoch)
      .def_property_readonly("in_flight", &SpeculationLedger::in_flight)
      .def_property_readonly("window", &SpeculationLedger::window)
      .def_property_readonly("draft_kv", &SpeculationLedger::draft_kv)
      .def_property_readonly("target_kv", &SpeculationLedger::target_kv)
      .def_property_readonly("last_token", &SpeculationLedger::last_token)
      .def_property_readonly("tokens", &SpeculationLedger::tokens)
      .def("committed", &SpeculationLedger::committed)
      .def("pending", &SpeculationLedger::pending)
      .def("tokens_from", &SpeculationLedger::TokensFrom, py::arg("start"));
}
