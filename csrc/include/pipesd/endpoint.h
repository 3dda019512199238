// A framed TCP connection: one connected socket, one I/O thread, and two bounded SPSC rings
// between that thread and the rest of the process.
//
//   producer thread --Send()--> [send ring] --I/O thread--> socket
//   socket --I/O thread (FrameParser)--> [recv ring] --TryRecv()--> consumer thread
//
// Send() is for exactly one producer thread and TryRecv() for exactly one consumer thread (they
// may be the same thread). Neither blocks: Send() returns false when the send ring is full, and
// TryRecv() returns false when nothing has arrived. Nothing is buffered without bound: when the
// receive ring is full the I/O thread stops reading the socket, so TCP flow control pushes back
// on the peer, whose send ring then fills and whose Send() returns false.
//
// The consumer learns that frames arrived (or that the connection ended) through wake_fd(), an
// eventfd that becomes readable; it is meant for an event loop (Python's loop.add_reader). The
// consumer calls DrainWake() first and then TryRecv() until it returns false: a frame that
// arrives after the drain signals wake_fd() again, so no wakeup is lost.
//
// Any error on the connection (the peer closing it, a reset, a ProtocolError from the parser)
// ends the I/O thread: closed() becomes true, error() says why, and wake_fd() is signalled.
// Frames that arrived completely before the end can still be taken with TryRecv().
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "pipesd/frame.h"
#include "pipesd/spsc_ring.h"

namespace pipesd {

// Bytes that many endpoints may hold together (a whole server's budget). Thread-safe.
class ByteBudget {
 public:
  explicit ByteBudget(size_t limit) : limit_(limit) {}
  // Takes n bytes if they fit, or if nothing is held at all (so one frame larger than the
  // limit can still pass, alone). False otherwise.
  bool TryTake(size_t n);
  void Give(size_t n) { used_.fetch_sub(n, std::memory_order_acq_rel); }
  size_t used() const { return used_.load(std::memory_order_acquire); }
  size_t limit() const { return limit_; }

 private:
  const size_t limit_;
  std::atomic<size_t> used_{0};
};

struct EndpointOptions {
  size_t send_ring = 1024;                    // frames; rounded up to a power of two
  size_t recv_ring = 1024;                    // frames; rounded up to a power of two
  uint32_t max_payload = kDefaultMaxPayload;  // largest payload accepted from (and sent to) peer
  int connect_timeout_ms = 5000;              // Connect() only; <= 0 waits forever
  // Bytes (headers and payloads) queued in each ring at most. A frame that does not fit waits
  // (Send() returns false; the I/O thread stops reading the socket), except that an empty ring
  // takes any one frame, so these may be smaller than max_payload.
  size_t send_bytes = 64u << 20;
  size_t recv_bytes = 64u << 20;
  // Shared by every endpoint given the same budget: the bytes all their rings hold together.
  // A receive that does not fit it waits like a full ring; nullptr: no shared limit.
  std::shared_ptr<ByteBudget> shared_budget;
};

// Counters since the endpoint was created. Wait times are in nanoseconds (steady clock): a send
// wait runs from Send() to the first byte of the frame being written to the socket, a receive
// wait from the frame being parsed to TryRecv() returning it.
struct EndpointStats {
  uint64_t frames_sent = 0;      // completely written to the socket
  uint64_t frames_received = 0;  // parsed and placed in the receive ring
  uint64_t bytes_sent = 0;
  uint64_t bytes_received = 0;
  uint64_t send_rejected = 0;  // Send() calls that returned false while open (ring full)
  uint64_t send_wait_total_ns = 0;
  uint64_t send_wait_max_ns = 0;
  uint64_t recv_wait_total_ns = 0;
  uint64_t recv_wait_max_ns = 0;
};

// Why an endpoint is closed.
enum class CloseReason {
  kOpen = 0,        // not closed
  kLocal,           // Close() was called
  kPeerClosed,      // the peer closed the connection cleanly (at a frame boundary)
  kProtocolError,   // the peer sent bytes that are not valid frames, or stopped mid-frame
  kTransportError,  // a socket error: reset, broken pipe, ...
};

const char* CloseReasonName(CloseReason reason);

class FrameEndpoint {
 public:
  // Resolves host, connects with a timeout of options.connect_timeout_ms and starts the I/O
  // thread. Throws TransportError naming host:port and the reason (the errno text, or the
  // timeout) on failure.
  static std::unique_ptr<FrameEndpoint> Connect(const std::string& host, uint16_t port,
                                                const EndpointOptions& options);
  // Takes ownership of fd, a connected stream socket (accepted elsewhere), and starts the I/O
  // thread. fd is closed if this throws (TransportError).
  static std::unique_ptr<FrameEndpoint> Adopt(int fd, const EndpointOptions& options);

  ~FrameEndpoint();
  FrameEndpoint(const FrameEndpoint&) = delete;
  FrameEndpoint& operator=(const FrameEndpoint&) = delete;

  // Producer thread only. Queues frame for the I/O thread (header.payload_len is set from the
  // payload). Returns false when the send ring is full (back-pressure: retry later) or the
  // endpoint is closed; the frame is then left untouched in the caller's variable, so that
  // `while (!ep->Send(std::move(f))) ...` retries without copying. It is moved from only when
  // Send returns true. Throws ProtocolError for a frame whose header is invalid or whose
  // payload exceeds options.max_payload: that is a bug in the caller.
  bool Send(Frame&& frame);
  // Same, sending a copy.
  bool Send(const Frame& frame) { return Send(Frame(frame)); }

  // Consumer thread only. Moves the next received frame into *out and returns true; false when
  // there is none. Still returns frames that arrived before the endpoint closed.
  bool TryRecv(Frame* out);

  // Readable when frames arrived or the endpoint closed. Valid until destruction (not closed by
  // Close()), so an event loop watching it never sees a reused descriptor.
  int wake_fd() const { return wake_fd_; }
  // Clears wake_fd(): call it before draining with TryRecv().
  void DrainWake();

  // Waits up to timeout_ms (< 0: forever) until every frame queued by Send() has been written
  // to the socket. Returns false on timeout or if the endpoint closed first. Producer thread.
  bool Flush(int timeout_ms);

  bool closed() const { return closed_.load(std::memory_order_acquire); }
  CloseReason close_reason() const;
  // Empty while open and after a local Close(); "peer closed the connection" after a clean
  // close by the peer; otherwise the error, e.g. "protocol error: bad frame magic ...".
  std::string error() const;

  // Does not block: the I/O thread stops reading, writes what is queued (for at most
  // timeout_ms), then ends the connection as Close() would; closed() becomes true and wake_fd()
  // is signalled when it has. Send() fails from now on. Call Close() afterwards (it then
  // returns at once) or let the destructor do it. Any thread.
  void CloseAfterFlush(int timeout_ms);

  // Bytes queued in the send ring and in the receive ring now.
  size_t send_queued_bytes() const { return send_bytes_.load(std::memory_order_acquire); }
  size_t recv_queued_bytes() const { return recv_bytes_.load(std::memory_order_acquire); }

  // Stops the I/O thread, joins it and closes the socket; frames still queued for sending are
  // dropped (call Flush() first to send them). Idempotent; also run by the destructor. Signals
  // wake_fd(). Safe to call from any thread except from inside the I/O thread (which runs no
  // user code).
  void Close();

  EndpointStats stats() const;

 private:
  struct Queued {
    Frame frame;
    int64_t enqueued_ns = 0;
    size_t size() const { return kFrameHeaderSize + frame.payload.size(); }
  };
  struct Outgoing {
    uint8_t header[kFrameHeaderSize];
    Frame frame;
    int64_t enqueued_ns = 0;
    size_t written = 0;  // bytes of header + payload already written
    size_t size() const { return kFrameHeaderSize + frame.payload.size(); }
  };

  FrameEndpoint(int fd, const EndpointOptions& options);
  void Start();

  enum class WriteState { kIdle, kBlocked, kMore };

  void IoLoop();
  // Moves frames from the send ring to out_ (bounded) and writes them: kIdle when everything
  // queued is written, kBlocked when the socket would block, kMore when it stopped early to let
  // reads run.
  WriteState PumpWrites();
  void PullSends();
  // Writes out_ once; returns false if the socket would block.
  bool WriteOnce();
  // Moves parsed frames into the receive ring; returns false if it is full (stalled).
  bool DeliverParsed();
  // Reads while the socket has data and the receive ring has room. Returns false at EOF.
  bool ReadSome();
  bool RecvRingHasRoom() const;
  void Finish(CloseReason reason, const std::string& error);
  // Best effort, before closing on a malformed stream: one ERROR frame telling the peer why.
  void SendParseError(const std::string& message);
  void Notify();
  void SignalWake();

  const EndpointOptions options_;
  int fd_;
  int notify_fd_ = -1;  // eventfd: wakes the I/O thread
  int wake_fd_ = -1;    // eventfd: wakes the consumer

  SpscRing<Queued> send_ring_;
  SpscRing<Queued> recv_ring_;

  // Producer side of the send ring.
  std::atomic<uint64_t> send_pushed_{0};
  // Consumer side of the receive ring.
  std::atomic<uint64_t> recv_popped_{0};
  // Set by the I/O thread before it sleeps in poll(); Send() notifies only then.
  std::atomic<bool> io_waiting_{false};
  // Set by the I/O thread when the receive ring was full; TryRecv() clears it and notifies.
  std::atomic<bool> recv_stalled_{false};
  std::atomic<bool> stop_{false};
  std::atomic<bool> closed_{false};
  // CloseAfterFlush(): set once; the I/O thread finishes when the sends are out or at the
  // deadline (steady clock, ns).
  std::atomic<bool> lingering_{false};
  std::atomic<int64_t> linger_deadline_ns_{0};
  // Bytes in the rings (and charged to options_.shared_budget).
  std::atomic<size_t> send_bytes_{0};
  std::atomic<size_t> recv_bytes_{0};
  bool budget_stalled_ = false;  // I/O thread: the last delivery waited for the shared budget

  // I/O thread state.
  uint64_t send_popped_ = 0;
  uint64_t recv_pushed_ = 0;
  std::deque<Outgoing> out_;
  size_t out_bytes_ = 0;  // unwritten bytes in out_
  FrameParser parser_;
  Queued pending_;  // parsed, waiting for room in the receive ring, when have_pending_
  bool have_pending_ = false;
  std::vector<uint8_t> read_buf_;

  mutable std::mutex mu_;  // guards reason_, error_
  CloseReason reason_ = CloseReason::kOpen;
  std::string error_;

  std::mutex close_mu_;
  bool close_done_ = false;
  std::thread thread_;

  std::atomic<uint64_t> frames_sent_{0};
  std::atomic<uint64_t> frames_received_{0};
  std::atomic<uint64_t> bytes_sent_{0};
  std::atomic<uint64_t> bytes_received_{0};
  std::atomic<uint64_t> send_rejected_{0};
  std::atomic<uint64_t> send_wait_total_ns_{0};
  std::atomic<uint64_t> send_wait_max_ns_{0};
  std::atomic<uint64_t> recv_wait_total_ns_{0};
  std::atomic<uint64_t> recv_wait_max_ns_{0};
};

// A listening TCP socket that hands out FrameEndpoints.
class FrameListener {
 public:
  // Binds host:port (port 0: an ephemeral port, see port()) with SO_REUSEADDR and listens.
  // Throws TransportError naming host:port and the errno text on failure.
  static std::unique_ptr<FrameListener> Listen(const std::string& host, uint16_t port,
                                               int backlog = 16);
  ~FrameListener();
  FrameListener(const FrameListener&) = delete;
  FrameListener& operator=(const FrameListener&) = delete;

  uint16_t port() const { return port_; }
  int fd() const { return fd_; }  // non-blocking; readable when a connection is waiting

  // Waits up to timeout_ms (< 0: forever) for a connection and adopts it; nullptr on timeout.
  // Throws TransportError if accept() fails for another reason.
  std::unique_ptr<FrameEndpoint> Accept(const EndpointOptions& options, int timeout_ms);

 private:
  FrameListener(int fd, uint16_t port) : fd_(fd), port_(port) {}
  int fd_;
  uint16_t port_;
};

}  // namespace pipesd
