#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "frame_testing.h"
#include "pipesd/endpoint.h"
#include "pipesd/errors.h"
#include "pipesd/frame.h"

namespace pipesd {
namespace {

using Bytes = std::vector<uint8_t>;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

// Every wait in these tests is bounded; sanitizer builds are slow, so the bounds are generous.
constexpr milliseconds kWait{30000};

struct Pair {
  std::unique_ptr<FrameListener> listener;
  std::unique_ptr<FrameEndpoint> client;
  std::unique_ptr<FrameEndpoint> server;
};

void MakePair(Pair* p, const EndpointOptions& client_opts = {},
              const EndpointOptions& server_opts = {}) {
  p->listener = FrameListener::Listen("127.0.0.1", 0);
  ASSERT_NE(p->listener->port(), 0);
  p->client = FrameEndpoint::Connect("127.0.0.1", p->listener->port(), client_opts);
  p->server = p->listener->Accept(server_opts, 5000);
  ASSERT_NE(p->server, nullptr);
}

bool WaitReadable(int fd, int timeout_ms) {
  pollfd p{fd, POLLIN, 0};
  return ::poll(&p, 1, timeout_ms) == 1 && (p.revents & POLLIN) != 0;
}

int MsLeft(Clock::time_point deadline) {
  const auto left = std::chrono::duration_cast<milliseconds>(deadline - Clock::now()).count();
  return left > 0 ? static_cast<int>(left) : 0;
}

// Waits for a frame the way an event loop does: wake_fd, DrainWake, then TryRecv.
bool RecvWithin(FrameEndpoint* ep, Frame* out, milliseconds timeout = kWait) {
  const Clock::time_point deadline = Clock::now() + timeout;
  for (;;) {
    ep->DrainWake();
    if (ep->TryRecv(out)) return true;
    if (ep->closed()) return ep->TryRecv(out);
    const int left = MsLeft(deadline);
    if (left == 0) return false;
    WaitReadable(ep->wake_fd(), left);
  }
}

bool WaitClosed(FrameEndpoint* ep, milliseconds timeout = kWait) {
  const Clock::time_point deadline = Clock::now() + timeout;
  while (!ep->closed()) {
    const int left = MsLeft(deadline);
    if (left == 0) return false;
    if (WaitReadable(ep->wake_fd(), left)) ep->DrainWake();
  }
  return true;
}

// Retries Send while the ring is full.
bool SendWithin(FrameEndpoint* ep, Frame f, milliseconds timeout = kWait) {
  const Clock::time_point deadline = Clock::now() + timeout;
  while (!ep->Send(std::move(f))) {
    if (ep->closed() || Clock::now() >= deadline) return false;
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
  return true;
}

// A frame that carries its sequence number in the epoch and in the payload.
Frame Numbered(uint64_t i, size_t payload_size = 8) {
  Bytes payload(payload_size);
  for (size_t k = 0; k < payload_size; ++k)
    payload[k] = static_cast<uint8_t>((i >> (8 * (k % 8))) + k / 8);
  return MakeFrame(FrameType::kPrefill, 7, i, std::move(payload));
}

bool Contains(const std::string& s, const std::string& part) {
  return s.find(part) != std::string::npos;
}

// A plain blocking client socket connected to 127.0.0.1:port.
int RawConnect(uint16_t port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof addr) != 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

bool WriteAll(int fd, const void* data, size_t n) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    const ssize_t w = ::send(fd, p, n, MSG_NOSIGNAL);
    if (w <= 0) return false;
    p += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}

// True when the raw socket reaches end of stream (or a reset) within the timeout.
bool RawSeesEnd(int fd, int timeout_ms) {
  char buf[256];
  const Clock::time_point deadline = Clock::now() + milliseconds(timeout_ms);
  for (;;) {
    if (!WaitReadable(fd, MsLeft(deadline))) return false;
    const ssize_t r = ::recv(fd, buf, sizeof buf, 0);
    if (r <= 0) return true;
  }
}

// Everything the raw socket receives until end of stream (or a reset, or the timeout).
Bytes RawReadToEnd(int fd, int timeout_ms) {
  Bytes out;
  uint8_t buf[256];
  const Clock::time_point deadline = Clock::now() + milliseconds(timeout_ms);
  while (WaitReadable(fd, MsLeft(deadline))) {
    const ssize_t r = ::recv(fd, buf, sizeof buf, 0);
    if (r <= 0) break;
    out.insert(out.end(), buf, buf + r);
  }
  return out;
}

// The single ERROR frame an endpoint sends before closing on a malformed stream.
Error ParseErrorFrame(const Bytes& bytes) {
  FrameParser parser;
  parser.Feed(bytes.data(), bytes.size());
  Frame f;
  EXPECT_TRUE(parser.Next(&f)) << bytes.size() << " bytes received";
  EXPECT_EQ(f.header.type, FrameType::kError);
  EXPECT_EQ(parser.Buffered(), 0u);
  return DecodeError(f.payload);
}

// Sends Numbered(0), Numbered(1), ... of payload_size bytes until Send() has refused for 300 ms
// straight: the sender's ring, both socket buffers and the receiver's ring are then full. Returns
// the number sent (the refused frame is left in *next), or 0 if Send() never pushed back.
uint64_t SendUntilStalled(FrameEndpoint* ep, size_t payload_size, Frame* next) {
  uint64_t sent = 0;
  *next = Numbered(0, payload_size);
  bool refusing = false;
  Clock::time_point refused_since{};
  const Clock::time_point deadline = Clock::now() + kWait;
  while (Clock::now() < deadline && sent * payload_size < (256u << 20)) {  // far past any buffer
    if (ep->Send(std::move(*next))) {
      *next = Numbered(++sent, payload_size);
      refusing = false;
      continue;
    }
    const Clock::time_point now = Clock::now();
    if (!refusing) {
      refusing = true;
      refused_since = now;
    } else if (now - refused_since > milliseconds(300)) {
      return sent;
    }
    std::this_thread::sleep_for(milliseconds(1));
  }
  return 0;
}

TEST(Endpoint, RoundTripBothWays) {
  Pair p;
  MakePair(&p);

  Hello hello;
  hello.auth_token = "secret";
  hello.vocab_size = 151936;
  hello.tokenizer_hash = "abc123";
  const Frame hello_frame = MakeFrame(FrameType::kHello, 0, 0, EncodeHello(hello));
  ASSERT_TRUE(p.client->Send(hello_frame));  // the const& overload sends a copy

  Frame got;
  ASSERT_TRUE(RecvWithin(p.server.get(), &got));
  ExpectSameFrame(got, hello_frame);
  EXPECT_EQ(DecodeHello(got.payload).auth_token, "secret");

  HelloOk ok;
  ok.session = 42;
  ok.model_fingerprint = "qwen";
  ok.max_ctx = 4096;
  const Frame ok_frame = MakeFrame(FrameType::kHelloOk, 42, 0, EncodeHelloOk(ok));
  ASSERT_TRUE(p.server->Send(Frame(ok_frame)));
  ASSERT_TRUE(RecvWithin(p.client.get(), &got));
  ExpectSameFrame(got, ok_frame);
  EXPECT_EQ(DecodeHelloOk(got.payload).session, 42u);

  // A draft with flags and an empty-payload frame, then an echo back.
  Draft d;
  d.start = 10;
  d.tokens = {1, 2, 3};
  d.dists = {{{1}, {1.0f}}, {{2, 5}, {0.5f, 0.5f}}, {{}, {}}};
  const Frame draft = MakeDraftFrame(42, 3, d, /*verify=*/true);
  const Frame reset = MakeFrame(FrameType::kReset, 42, 4);
  ASSERT_TRUE(p.client->Send(draft));
  ASSERT_TRUE(p.client->Send(reset));
  ASSERT_TRUE(RecvWithin(p.server.get(), &got));
  ExpectSameFrame(got, draft);
  EXPECT_EQ(DecodeDraft(got.payload, true).tokens, d.tokens);
  ASSERT_TRUE(RecvWithin(p.server.get(), &got));
  ExpectSameFrame(got, reset);
  ASSERT_TRUE(p.server->Send(std::move(got)));
  ASSERT_TRUE(RecvWithin(p.client.get(), &got));
  ExpectSameFrame(got, reset);
  EXPECT_FALSE(p.client->TryRecv(&got));
  EXPECT_FALSE(p.server->TryRecv(&got));

  ASSERT_TRUE(p.client->Flush(5000));
  ASSERT_TRUE(p.server->Flush(5000));
  const EndpointStats cs = p.client->stats();
  const EndpointStats ss = p.server->stats();
  const uint64_t client_bytes =
      3 * kFrameHeaderSize + hello_frame.payload.size() + draft.payload.size();
  EXPECT_EQ(cs.frames_sent, 3u);
  EXPECT_EQ(cs.bytes_sent, client_bytes);
  EXPECT_EQ(ss.frames_received, 3u);
  EXPECT_EQ(ss.bytes_received, client_bytes);
  EXPECT_EQ(ss.frames_sent, 2u);
  EXPECT_EQ(cs.frames_received, 2u);
  EXPECT_EQ(cs.bytes_received, ss.bytes_sent);
  EXPECT_GT(cs.send_wait_total_ns, 0u);
  EXPECT_GT(ss.recv_wait_total_ns, 0u);
  EXPECT_LE(cs.send_wait_max_ns, cs.send_wait_total_ns);
  EXPECT_LE(ss.recv_wait_max_ns, ss.recv_wait_total_ns);
  EXPECT_FALSE(p.client->closed());
  EXPECT_EQ(p.client->close_reason(), CloseReason::kOpen);
  EXPECT_EQ(p.client->error(), "");
}

TEST(Endpoint, ManySmallFramesArriveCompleteAndInOrder) {
  constexpr uint64_t kN = 100000;
  Pair p;
  MakePair(&p);

  std::atomic<uint64_t> received{0};
  std::atomic<bool> in_order{true};
  std::thread consumer([&] {
    Frame f;
    uint64_t next = 0;
    while (next < kN && RecvWithin(p.server.get(), &f)) {
      if (f.header.epoch != next || f.payload != Numbered(next).payload) in_order = false;
      ++next;
    }
    received = next;
  });

  for (uint64_t i = 0; i < kN; ++i) {
    if (!SendWithin(p.client.get(), Numbered(i))) {
      ADD_FAILURE() << "send " << i << " did not go through";
      break;
    }
  }
  consumer.join();
  EXPECT_EQ(received.load(), kN);
  EXPECT_TRUE(in_order.load());
  EXPECT_TRUE(p.client->Flush(5000));
  EXPECT_EQ(p.client->stats().frames_sent, kN);
  EXPECT_EQ(p.server->stats().frames_received, kN);
  EXPECT_EQ(p.server->stats().bytes_received, kN * (kFrameHeaderSize + 8));
  Frame extra;
  EXPECT_FALSE(p.server->TryRecv(&extra));
}

TEST(Endpoint, LargeFramePasses) {
  Pair p;
  MakePair(&p);
  Bytes big(6u << 20);
  std::mt19937 rng(1);
  for (uint8_t& b : big) b = static_cast<uint8_t>(rng());
  const Frame large = MakeFrame(FrameType::kPrefill, 1, 2, big);
  ASSERT_TRUE(p.client->Send(large));
  ASSERT_TRUE(p.client->Send(Numbered(3)));
  Frame got;
  ASSERT_TRUE(RecvWithin(p.server.get(), &got));
  ExpectSameFrame(got, large);
  ASSERT_TRUE(RecvWithin(p.server.get(), &got));
  ExpectSameFrame(got, Numbered(3));

  // And back, at exactly the payload limit.
  Bytes max_payload(kDefaultMaxPayload, 0xab);
  const Frame at_limit = MakeFrame(FrameType::kPrefill, 1, 3, std::move(max_payload));
  ASSERT_TRUE(p.server->Send(at_limit));
  ASSERT_TRUE(RecvWithin(p.client.get(), &got));
  ExpectSameFrame(got, at_limit);
}

TEST(Endpoint, SendRejectsFramesThePeerWouldReject) {
  Pair p;
  EndpointOptions small;
  small.max_payload = 1024;
  MakePair(&p, small);
  EXPECT_THROW(p.client->Send(MakeFrame(FrameType::kPrefill, 0, 0, Bytes(1025))), ProtocolError);
  EXPECT_THROW(p.client->Send(MakeFrame(FrameType::kPrefill, 0, 0, {}, kFlagVerify)),
               ProtocolError);
  Frame bad_magic = MakeFrame(FrameType::kPrefill, 0, 0);
  bad_magic.header.magic = 0;
  EXPECT_THROW(p.client->Send(bad_magic), ProtocolError);
  EXPECT_TRUE(p.client->Send(MakeFrame(FrameType::kPrefill, 0, 0, Bytes(1024))));
  Frame got;
  ASSERT_TRUE(RecvWithin(p.server.get(), &got));
  EXPECT_EQ(got.payload.size(), 1024u);
  EXPECT_FALSE(p.client->closed());
}

TEST(Endpoint, BackPressureStopsTheSenderAndLosesNothing) {
  constexpr size_t kPayload = 64 * 1024;
  EndpointOptions client_opts;
  client_opts.send_ring = 4;
  EndpointOptions server_opts;
  server_opts.recv_ring = 2;
  Pair p;
  MakePair(&p, client_opts, server_opts);

  // Nobody reads on the server: send until Send() keeps refusing.
  Frame next;
  const uint64_t sent = SendUntilStalled(p.client.get(), kPayload, &next);
  ASSERT_GT(sent, 0u) << "Send() never pushed back";
  EXPECT_EQ(next.payload.size(), kPayload) << "a refused frame must be left to the caller";
  EXPECT_EQ(next.header.epoch, sent);
  EXPECT_GT(p.client->stats().send_rejected, 0u);
  EXPECT_FALSE(p.client->closed());
  // The server stopped reading once its ring was full: it holds at most the ring, one frame
  // waiting for room and one read's worth of bytes, however much the client had to send.
  const EndpointStats ss = p.server->stats();
  EXPECT_LE(ss.frames_received, 2u);
  EXPECT_LT(ss.bytes_received, 1u << 20);

  // Now read everything, while the client sends a few more.
  const uint64_t total = sent + 20;
  std::atomic<uint64_t> received{0};
  std::atomic<bool> in_order{true};
  std::thread consumer([&] {
    Frame f;
    uint64_t i = 0;
    while (i < total && RecvWithin(p.server.get(), &f)) {
      if (f.header.epoch != i || f.payload != Numbered(i, kPayload).payload) in_order = false;
      ++i;
    }
    received = i;
  });
  ASSERT_TRUE(SendWithin(p.client.get(), std::move(next)));
  for (uint64_t i = sent + 1; i < total; ++i) {
    ASSERT_TRUE(SendWithin(p.client.get(), Numbered(i, kPayload)));
  }
  consumer.join();
  EXPECT_EQ(received.load(), total);
  EXPECT_TRUE(in_order.load());
  EXPECT_GT(p.server->stats().recv_wait_max_ns, 0u);
}

TEST(Endpoint, CloseWhileThePeerIsNotReadingIsPrompt) {
  EndpointOptions client_opts;
  client_opts.send_ring = 4;
  EndpointOptions server_opts;
  server_opts.recv_ring = 1;
  Pair p;
  MakePair(&p, client_opts, server_opts);
  Frame next;
  const uint64_t sent = SendUntilStalled(p.client.get(), 256 * 1024, &next);
  ASSERT_GT(sent, 0u) << "Send() never pushed back";
  EXPECT_FALSE(p.client->Flush(100));
  const Clock::time_point start = Clock::now();
  p.client->Close();
  EXPECT_LT(Clock::now() - start, milliseconds(2000));
  EXPECT_TRUE(p.client->closed());
  EXPECT_FALSE(p.client->Flush(100));  // frames queued before Close() were dropped
  // The server still hands out what it received, then reports the end.
  Frame got;
  uint64_t i = 0;
  while (RecvWithin(p.server.get(), &got, milliseconds(5000))) {
    EXPECT_EQ(got.header.epoch, i);
    ++i;
  }
  EXPECT_LE(i, sent);
  EXPECT_TRUE(p.server->closed());
}

TEST(Endpoint, RingsAreBoundedInBytes) {
  // A peer that does not read: the sender's ring holds at most send_bytes (any one frame when
  // empty), the receiver's at most recv_bytes, however many frames the rings could hold.
  EndpointOptions client_opts;
  client_opts.send_bytes = 100 * 1024;
  EndpointOptions server_opts;
  server_opts.recv_bytes = 200 * 1024;
  Pair p;
  MakePair(&p, client_opts, server_opts);
  Frame next;
  SendUntilStalled(p.client.get(), 16 * 1024, &next);
  EXPECT_LE(p.client->send_queued_bytes(), client_opts.send_bytes);
  EXPECT_GT(p.client->send_queued_bytes(), 0u);
  EXPECT_LE(p.server->recv_queued_bytes(), server_opts.recv_bytes);
  EXPECT_GT(p.server->recv_queued_bytes(), 0u);
  // One frame larger than the whole byte limit still passes an empty ring.
  EndpointOptions tiny;
  tiny.send_bytes = 10;
  tiny.recv_bytes = 10;
  Pair q;
  MakePair(&q, tiny, tiny);
  ASSERT_TRUE(q.client->Send(Numbered(1, 1000)));
  Frame got;
  ASSERT_TRUE(RecvWithin(q.server.get(), &got));
  EXPECT_EQ(got.payload.size(), 1000u);
  EXPECT_EQ(q.server->recv_queued_bytes(), 0u);
}

TEST(Endpoint, SharedBudgetBoundsAllReceiveRingsTogether) {
  auto budget = std::make_shared<ByteBudget>(64 * 1024);
  EndpointOptions server_opts;
  server_opts.shared_budget = budget;
  Pair a;
  Pair b;
  MakePair(&a, {}, server_opts);
  MakePair(&b, {}, server_opts);
  Frame next;
  SendUntilStalled(a.client.get(), 8 * 1024, &next);
  Frame next_b;
  SendUntilStalled(b.client.get(), 8 * 1024, &next_b);
  // Both servers' rings together stay within the budget (plus one frame taken when empty).
  EXPECT_LE(a.server->recv_queued_bytes() + b.server->recv_queued_bytes(),
            budget->limit() + kFrameHeaderSize + 8 * 1024);
  EXPECT_EQ(budget->used(), a.server->recv_queued_bytes() + b.server->recv_queued_bytes());
  // Draining one endpoint lets the other go on: nothing is lost and the budget is returned.
  Frame got;
  uint64_t a_got = 0;
  while (RecvWithin(a.server.get(), &got, milliseconds(300))) ++a_got;
  EXPECT_GT(a_got, 0u);
  uint64_t b_got = 0;
  while (RecvWithin(b.server.get(), &got, milliseconds(300))) {
    EXPECT_EQ(got.header.epoch, b_got);
    ++b_got;
  }
  EXPECT_GT(b_got, 0u);
  a.server.reset();
  b.server.reset();
  EXPECT_EQ(budget->used(), 0u);
}

TEST(Endpoint, CloseAfterFlushDeliversThenCloses) {
  Pair p;
  MakePair(&p);
  for (uint64_t i = 0; i < 50; ++i) ASSERT_TRUE(p.server->Send(Numbered(i, 1024)));
  const Clock::time_point start = Clock::now();
  p.server->CloseAfterFlush(5000);
  EXPECT_LT(Clock::now() - start, milliseconds(100));  // does not wait
  EXPECT_FALSE(p.server->Send(Numbered(99)));          // nothing more is taken
  Frame got;
  uint64_t i = 0;
  while (RecvWithin(p.client.get(), &got)) {
    EXPECT_EQ(got.header.epoch, i);
    ++i;
  }
  EXPECT_EQ(i, 50u);
  EXPECT_EQ(p.client->close_reason(), CloseReason::kPeerClosed);
  ASSERT_TRUE(WaitClosed(p.server.get()));
  EXPECT_EQ(p.server->close_reason(), CloseReason::kLocal);
}

TEST(Endpoint, CloseAfterFlushGivesUpOnAPeerThatDoesNotRead) {
  EndpointOptions client_opts;
  client_opts.recv_ring = 1;
  Pair p;
  MakePair(&p, client_opts, {});
  Frame next;
  SendUntilStalled(p.server.get(), 256 * 1024, &next);
  const Clock::time_point start = Clock::now();
  p.server->CloseAfterFlush(200);
  ASSERT_TRUE(WaitClosed(p.server.get(), milliseconds(5000)));
  EXPECT_LT(Clock::now() - start, milliseconds(3000));
  p.server->Close();
}

TEST(Endpoint, GarbageClosesWithProtocolError) {
  auto listener = FrameListener::Listen("127.0.0.1", 0);
  const int raw = RawConnect(listener->port());
  ASSERT_GE(raw, 0);
  auto server = listener->Accept({}, 5000);
  ASSERT_NE(server, nullptr);

  // One good frame, then bytes that are not a frame header.
  const Bytes good = EncodeFrame(Numbered(5));
  const std::string garbage = "GET / HTTP/1.1\r\nHost: example.com\r\nAccept: */*\r\n\r\n";
  ASSERT_TRUE(WriteAll(raw, good.data(), good.size()));
  ASSERT_TRUE(WriteAll(raw, garbage.data(), garbage.size()));

  ASSERT_TRUE(WaitClosed(server.get()));
  EXPECT_EQ(server->close_reason(), CloseReason::kProtocolError);
  EXPECT_TRUE(Contains(server->error(), "protocol error")) << server->error();
  EXPECT_TRUE(Contains(server->error(), "bad frame magic")) << server->error();
  // The frame before the garbage is still delivered; nothing after it.
  Frame got;
  ASSERT_TRUE(server->TryRecv(&got));
  ExpectSameFrame(got, Numbered(5));
  EXPECT_FALSE(server->TryRecv(&got));
  // The peer is told why, then sees the end at once, and the endpoint refuses to send.
  const Error err = ParseErrorFrame(RawReadToEnd(raw, 5000));
  EXPECT_EQ(err.code, static_cast<uint32_t>(ErrorCode::kBadFrame));
  EXPECT_TRUE(Contains(err.message, "bad frame magic")) << err.message;
  EXPECT_FALSE(server->Send(Numbered(6)));
  ::close(raw);
}

TEST(Endpoint, WrongVersionIsAnsweredWithBadVersion) {
  auto listener = FrameListener::Listen("127.0.0.1", 0);
  const int raw = RawConnect(listener->port());
  ASSERT_GE(raw, 0);
  auto server = listener->Accept({}, 5000);
  ASSERT_NE(server, nullptr);
  FrameHeader h;
  h.version = kProtocolVersion + 1;
  h.type = FrameType::kHello;
  uint8_t header[kFrameHeaderSize];
  EncodeHeader(h, header);
  ASSERT_TRUE(WriteAll(raw, header, sizeof header));
  const Error err = ParseErrorFrame(RawReadToEnd(raw, 5000));
  EXPECT_EQ(err.code, static_cast<uint32_t>(ErrorCode::kBadVersion));
  EXPECT_TRUE(
      Contains(err.message, "unsupported protocol version " + std::to_string(kProtocolVersion + 1)))
      << err.message;
  ASSERT_TRUE(WaitClosed(server.get()));
  ::close(raw);
}

TEST(Endpoint, OversizedHeaderClosesBeforeThePayloadArrives) {
  auto listener = FrameListener::Listen("127.0.0.1", 0);
  const int raw = RawConnect(listener->port());
  ASSERT_GE(raw, 0);
  EndpointOptions opts;
  opts.max_payload = 4096;
  auto server = listener->Accept(opts, 5000);
  ASSERT_NE(server, nullptr);
  FrameHeader h;
  h.payload_len = 1u << 30;
  uint8_t header[kFrameHeaderSize];
  EncodeHeader(h, header);
  ASSERT_TRUE(WriteAll(raw, header, sizeof header));
  ASSERT_TRUE(WaitClosed(server.get()));
  EXPECT_EQ(server->close_reason(), CloseReason::kProtocolError);
  EXPECT_TRUE(Contains(server->error(), "limit 4096")) << server->error();
  EXPECT_EQ(ParseErrorFrame(RawReadToEnd(raw, 5000)).code,
            static_cast<uint32_t>(ErrorCode::kTooLong));
  ::close(raw);
}

TEST(Endpoint, PeerCloseIsReported) {
  Pair p;
  MakePair(&p);
  ASSERT_TRUE(p.client->Send(MakeFrame(FrameType::kBye, 1, 0)));
  ASSERT_TRUE(p.client->Flush(5000));
  p.client->Close();
  p.client->Close();  // idempotent
  EXPECT_TRUE(p.client->closed());
  EXPECT_EQ(p.client->close_reason(), CloseReason::kLocal);
  EXPECT_EQ(p.client->error(), "");
  EXPECT_FALSE(p.client->Send(Numbered(1)));
  EXPECT_TRUE(WaitReadable(p.client->wake_fd(), 0));  // Close() signals the consumer too

  Frame got;
  ASSERT_TRUE(RecvWithin(p.server.get(), &got));
  EXPECT_EQ(got.header.type, FrameType::kBye);
  ASSERT_TRUE(WaitClosed(p.server.get()));
  EXPECT_EQ(p.server->close_reason(), CloseReason::kPeerClosed);
  EXPECT_EQ(p.server->error(), "peer closed the connection");
  EXPECT_FALSE(p.server->TryRecv(&got));
  EXPECT_FALSE(p.server->Send(Numbered(2)));
}

TEST(Endpoint, PeerClosingMidFrameIsAProtocolError) {
  auto listener = FrameListener::Listen("127.0.0.1", 0);
  const int raw = RawConnect(listener->port());
  ASSERT_GE(raw, 0);
  auto server = listener->Accept({}, 5000);
  ASSERT_NE(server, nullptr);
  const Bytes wire = EncodeFrame(Numbered(9, 100));
  ASSERT_TRUE(WriteAll(raw, wire.data(), 60));
  ::close(raw);
  ASSERT_TRUE(WaitClosed(server.get()));
  EXPECT_EQ(server->close_reason(), CloseReason::kProtocolError);
  EXPECT_TRUE(Contains(server->error(), "mid-frame")) << server->error();
  EXPECT_TRUE(Contains(server->error(), "60 bytes")) << server->error();
}

TEST(Endpoint, WakeFdBecomesReadableWhenAFrameArrives) {
  Pair p;
  MakePair(&p);
  EXPECT_FALSE(WaitReadable(p.server->wake_fd(), 0));
  Frame got;
  EXPECT_FALSE(p.server->TryRecv(&got));

  ASSERT_TRUE(p.client->Send(Numbered(1)));
  ASSERT_TRUE(WaitReadable(p.server->wake_fd(), 10000));
  p.server->DrainWake();
  EXPECT_FALSE(WaitReadable(p.server->wake_fd(), 0));
  ASSERT_TRUE(p.server->TryRecv(&got));
  ExpectSameFrame(got, Numbered(1));
  EXPECT_FALSE(p.server->TryRecv(&got));

  // A connection that ends signals it too.
  p.client->Close();
  ASSERT_TRUE(WaitReadable(p.server->wake_fd(), 10000));
  p.server->DrainWake();
  ASSERT_TRUE(WaitClosed(p.server.get()));
}

TEST(Endpoint, ConnectToAClosedPortThrows) {
  uint16_t port;
  {
    auto listener = FrameListener::Listen("127.0.0.1", 0);
    port = listener->port();
  }  // closed: nothing listens there now
  try {
    FrameEndpoint::Connect("127.0.0.1", port, {});
    ADD_FAILURE() << "no TransportError thrown";
  } catch (const TransportError& e) {
    const std::string what = e.what();
    EXPECT_TRUE(Contains(what, "127.0.0.1:" + std::to_string(port))) << what;
    EXPECT_TRUE(Contains(what, "refused")) << what;
  }
}

TEST(Endpoint, AcceptTimesOutWithNullptr) {
  auto listener = FrameListener::Listen("127.0.0.1", 0);
  const Clock::time_point start = Clock::now();
  EXPECT_EQ(listener->Accept({}, 50), nullptr);
  EXPECT_GE(Clock::now() - start, milliseconds(40));
  EXPECT_THROW(FrameListener::Listen("127.0.0.1", listener->port()), TransportError);
}

TEST(Endpoint, AdoptsAnyConnectedStreamSocket) {
  int fds[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds), 0);
  auto a = FrameEndpoint::Adopt(fds[0], {});
  auto b = FrameEndpoint::Adopt(fds[1], {});
  ASSERT_TRUE(a->Send(Numbered(11)));
  Frame got;
  ASSERT_TRUE(RecvWithin(b.get(), &got));
  ExpectSameFrame(got, Numbered(11));
  EXPECT_THROW(FrameEndpoint::Adopt(-1, {}), TransportError);
  EndpointOptions zero;
  zero.send_ring = 0;
  int more[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, more), 0);
  EXPECT_THROW(FrameEndpoint::Adopt(more[0], zero), TransportError);  // closes more[0]
  EXPECT_TRUE(RawSeesEnd(more[1], 5000));
  ::close(more[1]);
}

}  // namespace
}  // namespace pipesd
