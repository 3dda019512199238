// Bindings of the wire format and the TCP endpoint: conversion, GIL release, nothing else.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "pipesd/endpoint.h"
#include "pipesd/frame.h"

namespace py = pybind11;
using namespace pipesd;  // NOLINT(build/namespaces): binding code names every core type

namespace {

std::vector<uint8_t> ToVector(const py::bytes& b) {
  std::string_view s(b);
  return std::vector<uint8_t>(s.begin(), s.end());
}

py::bytes ToBytes(const std::vector<uint8_t>& v) {
  return py::bytes(reinterpret_cast<const char*>(v.data()), v.size());
}

py::dict StatsDict(const EndpointStats& s) {
  py::dict d;
  d["frames_sent"] = s.frames_sent;
  d["frames_received"] = s.frames_received;
  d["bytes_sent"] = s.bytes_sent;
  d["bytes_received"] = s.bytes_received;
  d["send_rejected"] = s.send_rejected;
  d["send_wait_total_ns"] = s.send_wait_total_ns;
  d["send_wait_max_ns"] = s.send_wait_max_ns;
  d["recv_wait_total_ns"] = s.recv_wait_total_ns;
  d["recv_wait_max_ns"] = s.recv_wait_max_ns;
  return d;
}

}  // namespace

void bind_transport(py::module_& m) {
  m.attr("PROTOCOL_VERSION") = kProtocolVersion;
  m.attr("DEFAULT_MAX_PAYLOAD") = kDefaultMaxPayload;
  m.attr("MAX_PING_PAYLOAD") = kMaxPingPayload;
  m.attr("FLAG_VERIFY") = kFlagVerify;
  m.attr("FLAG_HAS_DIST") = kFlagHasDist;

  py::enum_<FrameType>(m, "FrameType")
      .value("HELLO", FrameType::kHello)
      .value("HELLO_OK", FrameType::kHelloOk)
      .value("PREFILL", FrameType::kPrefill)
      .value("DRAFT", FrameType::kDraft)
      .value("VERDICT", FrameType::kVerdict)
      .value("RESET", FrameType::kReset)
      .value("BYE", FrameType::kBye)
      .value("ERROR", FrameType::kError)
      .value("PING", FrameType::kPing)
      .value("PONG", FrameType::kPong)
      .value("COSTS", FrameType::kCosts);

  py::enum_<ErrorCode>(m, "ErrorCode")
      .value("BAD_FRAME", ErrorCode::kBadFrame)
      .value("BAD_VERSION", ErrorCode::kBadVersion)
      .value("AUTH_FAILED", ErrorCode::kAuthFailed)
      .value("TOKENIZER_MISMATCH", ErrorCode::kTokenizerMismatch)
      .value("UNKNOWN_SESSION", ErrorCode::kUnknownSession)
      .value("STALE_EPOCH", ErrorCode::kStaleEpoch)
      .value("TOO_LONG", ErrorCode::kTooLong)
      .value("INTERNAL", ErrorCode::kInternal)
      .value("BUSY", ErrorCode::kBusy)
      .value("TIMEOUT", ErrorCode::kTimeout)
      .value("OVERLOADED", ErrorCode::kOverloaded);

  py::class_<Frame>(m, "Frame", "One frame: header fields and the raw payload.")
      .def(py::init([](FrameType type, uint64_t session, uint64_t epoch, const py::bytes& payload,
                       uint32_t flags) {
             return MakeFrame(type, session, epoch, ToVector(payload), flags);
           }),
           py::arg("type"), py::arg("session") = 0, py::arg("epoch") = 0,
           py::arg("payload") = py::bytes(), py::arg("flags") = 0)
      .def_property_readonly("type", [](const Frame& f) { return f.header.type; })
      .def_property_readonly("flags", [](const Frame& f) { return f.header.flags; })
      .def_property_readonly("session", [](const Frame& f) { return f.header.session; })
      .def_property_readonly("epoch", [](const Frame& f) { return f.header.epoch; })
      .def_property_readonly("payload", [](const Frame& f) { return ToBytes(f.payload); })
      .def("encode", [](const Frame& f) { return ToBytes(EncodeFrame(f)); })
      .def("__repr__", [](const Frame& f) {
        return std::string("Frame(") + FrameTypeName(f.header.type) +
               ", session=" + std::to_string(f.header.session) +
               ", epoch=" + std::to_string(f.header.epoch) +
               ", flags=" + std::to_string(f.header.flags) +
               ", payload=" + std::to_string(f.payload.size()) + " bytes)";
      });

  py::class_<FrameParser>(m, "FrameParser", "Incremental parser; validates headers first.")
      .def(py::init<uint32_t>(), py::arg("max_payload") = kDefaultMaxPayload)
      .def("feed",
           [](FrameParser& p, const py::bytes& data) {
             std::string_view s(data);
             p.Feed(reinterpret_cast<const uint8_t*>(s.data()), s.size());
           })
      .def("next",
           [](FrameParser& p) -> py::object {
             Frame f;
             if (!p.Next(&f)) return py::none();
             return py::cast(std::move(f));
           })
      .def_property_readonly("buffered", &FrameParser::Buffered);

  py::class_<Hello>(m, "Hello")
      .def(py::init([](std::string auth_token, uint32_t vocab_size, std::string tokenizer_hash) {
             return Hello{std::move(auth_token), vocab_size, std::move(tokenizer_hash),
                          kProtocolVersion, kProtocolVersion};
           }),
           py::arg("auth_token") = "", py::arg("vocab_size") = 0, py::arg("tokenizer_hash") = "")
      // Opaque bytes on the wire: read back as bytes, so a token that is not UTF-8 still
      // reaches the comparison (and fails it) instead of failing to convert.
      .def_property(
          "auth_token", [](const Hello& h) { return py::bytes(h.auth_token); },
          [](Hello& h, std::string v) { h.auth_token = std::move(v); })
      .def_readwrite("vocab_size", &Hello::vocab_size)
      .def_readwrite("tokenizer_hash", &Hello::tokenizer_hash)
      .def_readwrite("min_version", &Hello::min_version)
      .def_readwrite("max_version", &Hello::max_version);

  py::class_<HelloOk>(m, "HelloOk")
      .def(py::init([](uint64_t session, std::string fingerprint, uint32_t max_ctx,
                       std::vector<float> verify_ms, uint32_t max_window, uint32_t max_dist) {
             return HelloOk{session,  std::move(fingerprint),         max_ctx, max_window,
                            max_dist, CostTable{std::move(verify_ms)}};
           }),
           py::arg("session") = 0, py::arg("model_fingerprint") = "", py::arg("max_ctx") = 0,
           py::arg("verify_ms") = std::vector<float>{}, py::arg("max_window") = 0,
           py::arg("max_dist") = 0)
      .def_readwrite("session", &HelloOk::session)
      .def_readwrite("model_fingerprint", &HelloOk::model_fingerprint)
      .def_readwrite("max_ctx", &HelloOk::max_ctx)
      .def_readwrite("max_window", &HelloOk::max_window)
      .def_readwrite("max_dist", &HelloOk::max_dist)
      .def_property(
          "verify_ms", [](const HelloOk& h) { return h.costs.verify_ms; },
          [](HelloOk& h, std::vector<float> v) { h.costs.verify_ms = std::move(v); });

  py::class_<Prefill>(m, "Prefill")
      .def(py::init([](std::vector<int32_t> tokens, float temperature, int32_t top_k, float top_p,
                       int64_t seed) {
             return Prefill{temperature, top_k, top_p, seed, std::move(tokens)};
           }),
           py::arg("tokens") = std::vector<int32_t>{}, py::arg("temperature") = 0.0f,
           py::arg("top_k") = 0, py::arg("top_p") = 1.0f, py::arg("seed") = -1)
      .def_readwrite("tokens", &Prefill::tokens)
      .def_readwrite("temperature", &Prefill::temperature)
      .def_readwrite("top_k", &Prefill::top_k)
      .def_readwrite("top_p", &Prefill::top_p)
      .def_readwrite("seed", &Prefill::seed);

  py::class_<SparseDist>(m, "WireDist", "A sparse draft distribution as it travels.")
      .def(py::init([](std::vector<int32_t> ids, std::vector<float> probs) {
             return SparseDist{std::move(ids), std::move(probs)};
           }),
           py::arg("ids"), py::arg("probs"))
      .def_readwrite("ids", &SparseDist::ids)
      .def_readwrite("probs", &SparseDist::probs)
      // Copies straight into NumPy: no Python int or float per entry.
      .def("ids_array",
           [](const SparseDist& d) {
             return py::array_t<int32_t>(static_cast<py::ssize_t>(d.ids.size()), d.ids.data());
           })
      .def("probs_array", [](const SparseDist& d) {
        return py::array_t<float>(static_cast<py::ssize_t>(d.probs.size()), d.probs.data());
      });

  py::class_<Draft>(m, "Draft")
      .def(py::init([](uint64_t start, std::vector<int32_t> tokens, std::vector<SparseDist> dists) {
             return Draft{start, std::move(tokens), std::move(dists)};
           }),
           py::arg("start") = 0, py::arg("tokens") = std::vector<int32_t>{},
           py::arg("dists") = std::vector<SparseDist>{})
      .def_readwrite("start", &Draft::start)
      .def_readwrite("tokens", &Draft::tokens)
      .def_readwrite("dists", &Draft::dists);

  py::class_<Verdict>(m, "WireVerdict", "A verdict as it travels.")
      .def(py::init([](uint64_t start, uint32_t drafted, uint32_t accepted, int32_t next_token,
                       float verify_ms) {
             return Verdict{start, drafted, accepted, next_token, verify_ms};
           }),
           py::arg("start") = 0, py::arg("drafted") = 0, py::arg("accepted") = 0,
           py::arg("next_token") = 0, py::arg("verify_ms") = 0.0f)
      .def_readwrite("start", &Verdict::start)
      .def_readwrite("drafted", &Verdict::drafted)
      .def_readwrite("accepted", &Verdict::accepted)
      .def_readwrite("next_token", &Verdict::next_token)
      .def_readwrite("verify_ms", &Verdict::verify_ms);

  py::class_<Error>(m, "WireError", "The payload of an ERROR frame.")
      .def(py::init([](ErrorCode code, std::string message) {
             return Error{static_cast<uint32_t>(code), std::move(message)};
           }),
           py::arg("code"), py::arg("message"))
      .def_readwrite("code", &Error::code)
      .def_readwrite("message", &Error::message);

  m.def("encode_hello", [](const Hello& x) { return ToBytes(EncodeHello(x)); });
  m.def("decode_hello", [](const py::bytes& b) { return DecodeHello(ToVector(b)); });
  m.def("encode_hello_ok", [](const HelloOk& x) { return ToBytes(EncodeHelloOk(x)); });
  m.def("decode_hello_ok", [](const py::bytes& b) { return DecodeHelloOk(ToVector(b)); });
  m.def("encode_prefill", [](const Prefill& x) { return ToBytes(EncodePrefill(x)); });
  m.def("decode_prefill", [](const py::bytes& b) { return DecodePrefill(ToVector(b)); });
  m.def("encode_draft", [](const Draft& x) { return ToBytes(EncodeDraft(x)); });
  m.def(
      "decode_draft",
      [](const py::bytes& b, bool has_dist) { return DecodeDraft(ToVector(b), has_dist); },
      py::arg("payload"), py::arg("has_dist"));
  m.def("make_draft_frame", &MakeDraftFrame, py::arg("session"), py::arg("epoch"), py::arg("draft"),
        py::arg("verify"));
  m.def("encode_verdict", [](const Verdict& x) { return ToBytes(EncodeVerdict(x)); });
  m.def("decode_verdict", [](const py::bytes& b) { return DecodeVerdict(ToVector(b)); });
  m.def(
      "encode_costs",
      [](std::vector<float> verify_ms) {
        return ToBytes(EncodeCosts(CostTable{std::move(verify_ms)}));
      },
      py::arg("verify_ms"));
  m.def("decode_costs", [](const py::bytes& b) { return DecodeCosts(ToVector(b)).verify_ms; });
  m.def("encode_error", [](const Error& x) { return ToBytes(EncodeError(x)); });
  m.def("decode_error", [](const py::bytes& b) { return DecodeError(ToVector(b)); });

  py::class_<ByteBudget, std::shared_ptr<ByteBudget>>(
      m, "ByteBudget", "Bytes that the rings of many endpoints may hold together.")
      .def(py::init<size_t>(), py::arg("limit"))
      .def_property_readonly("used", &ByteBudget::used)
      .def_property_readonly("limit", &ByteBudget::limit);

  const EndpointOptions defaults;
  py::class_<EndpointOptions>(m, "EndpointOptions")
      .def(py::init([](size_t send_ring, size_t recv_ring, uint32_t max_payload,
                       int connect_timeout_ms, size_t send_bytes, size_t recv_bytes,
                       std::shared_ptr<ByteBudget> shared_budget) {
             EndpointOptions o;
             o.send_ring = send_ring;
             o.recv_ring = recv_ring;
             o.max_payload = max_payload;
             o.connect_timeout_ms = connect_timeout_ms;
             o.send_bytes = send_bytes;
             o.recv_bytes = recv_bytes;
             o.shared_budget = std::move(shared_budget);
             return o;
           }),
           py::arg("send_ring") = 1024, py::arg("recv_ring") = 1024,
           py::arg("max_payload") = kDefaultMaxPayload, py::arg("connect_timeout_ms") = 5000,
           py::arg("send_bytes") = defaults.send_bytes, py::arg("recv_bytes") = defaults.recv_bytes,
           py::arg("shared_budget") = nullptr)
      .def_readwrite("send_bytes", &EndpointOptions::send_bytes)
      .def_readwrite("recv_bytes", &EndpointOptions::recv_bytes)
      .def_readwrite("shared_budget", &EndpointOptions::shared_budget)
      .def_readwrite("send_ring", &EndpointOptions::send_ring)
      .def_readwrite("recv_ring", &EndpointOptions::recv_ring)
      .def_readwrite("max_payload", &EndpointOptions::max_payload)
      .def_readwrite("connect_timeout_ms", &EndpointOptions::connect_timeout_ms);

  py::class_<FrameEndpoint>(m, "FrameEndpoint",
                            "A TCP connection carrying frames, served by its own I/O thread.")
      .def_static("connect", &FrameEndpoint::Connect, py::arg("host"), py::arg("port"),
                  py::arg("options") = EndpointOptions{}, py::call_guard<py::gil_scoped_release>())
      .def_static("adopt", &FrameEndpoint::Adopt, py::arg("fd"),
                  py::arg("options") = EndpointOptions{})
      .def("send", py::overload_cast<const Frame&>(&FrameEndpoint::Send), py::arg("frame"),
           "Queues a frame; False when the send ring is full (back-pressure).")
      .def("try_recv",
           [](FrameEndpoint& e) -> py::object {
             Frame f;
             if (!e.TryRecv(&f)) return py::none();
             return py::cast(std::move(f));
           })
      .def_property_readonly("wake_fd", &FrameEndpoint::wake_fd)
      .def("drain_wake", &FrameEndpoint::DrainWake)
      .def("flush", &FrameEndpoint::Flush, py::arg("timeout_ms"),
           py::call_guard<py::gil_scoped_release>())
      .def("close_after_flush", &FrameEndpoint::CloseAfterFlush, py::arg("timeout_ms"),
           "Stops reading, sends what is queued (at most timeout_ms), then closes; no wait.")
      .def_property_readonly("send_queued_bytes", &FrameEndpoint::send_queued_bytes)
      .def_property_readonly("recv_queued_bytes", &FrameEndpoint::recv_queued_bytes)
      .def_property_readonly("closed", &FrameEndpoint::closed)
      .def_property_readonly(
          "close_reason",
          [](const FrameEndpoint& e) { return std::string(CloseReasonName(e.close_reason())); })
      .def_property_readonly("error", &FrameEndpoint::error)
      .def("close", &FrameEndpoint::Close, py::call_guard<py::gil_scoped_release>())
      .def("stats", [](const FrameEndpoint& e) { return StatsDict(e.stats()); });

  py::class_<FrameListener>(m, "FrameListener", "A listening TCP socket that yields endpoints.")
      .def_static("listen", &FrameListener::Listen, py::arg("host"), py::arg("port"),
                  py::arg("backlog") = 16)
      .def_property_readonly("port", &FrameListener::port)
      .def_property_readonly("fd", &FrameListener::fd)
      .def("accept", &FrameListener::Accept, py::arg("options") = EndpointOptions{},
           py::arg("timeout_ms") = 0, py::call_guard<py::gil_scoped_release>());
}
