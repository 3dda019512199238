#include "pipesd/endpoint.h"

#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <limits>
#include <system_error>
#include <utility>

#include "pipesd/errors.h"

namespace pipesd {
namespace {

using Clock = std::chrono::steady_clock;

constexpr size_t kReadChunk = 64 * 1024;  // bytes per recv()
constexpr int kMaxReadsPerWake = 16;      // then let writes run
constexpr int kMaxWritesPerPump = 16;     // then let reads run
constexpr size_t kMaxOutFrames = 64;      // frames taken off the send ring ahead of the socket
constexpr size_t kMaxOutBytes = 256 * 1024;

int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch())
      .count();
}

std::string ErrnoText(int err) { return std::system_category().message(err); }

std::string HostPort(const std::string& host, uint16_t port) {
  const bool v6 = host.find(':') != std::string::npos;
  return (v6 ? "[" + host + "]" : host) + ":" + std::to_string(port);
}

void CloseFd(int fd) {
  if (fd >= 0) ::close(fd);  // not retried on EINTR: on Linux the descriptor is gone anyway
}

void AddWait(std::atomic<uint64_t>* total, std::atomic<uint64_t>* max, int64_t ns) {
  const uint64_t v = ns > 0 ? static_cast<uint64_t>(ns) : 0;
  total->fetch_add(v, std::memory_order_relaxed);
  uint64_t cur = max->load(std::memory_order_relaxed);
  while (v > cur && !max->compare_exchange_weak(cur, v, std::memory_order_relaxed)) {
  }
}

void SetNonBlocking(int fd) {
  const int flags = ::fcntl(fd, F_GETFL);
  PIPESD_CHECK(flags >= 0 && ::fcntl(fd, F_SETFL, flags | O_NONBLOCK) == 0, TransportError,
               "cannot make socket " << fd << " non-blocking: " << ErrnoText(errno));
}

void SetNoDelay(int fd) {
  int one = 1;
  if (::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) == 0) return;
  // A non-TCP stream socket (AF_UNIX) has no Nagle algorithm to turn off.
  PIPESD_CHECK(errno == EOPNOTSUPP || errno == ENOPROTOOPT, TransportError,
               "cannot set TCP_NODELAY on socket " << fd << ": " << ErrnoText(errno));
}

// Milliseconds left until deadline for poll(): -1 when there is no deadline.
int RemainingMs(bool has_deadline, Clock::time_point deadline) {
  if (!has_deadline) return -1;
  const auto left =
      std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
  if (left <= 0) return 0;
  return static_cast<int>(std::min<int64_t>(left, std::numeric_limits<int>::max()));
}

struct AddrInfoDeleter {
  void operator()(addrinfo* ai) const { ::freeaddrinfo(ai); }
};
using AddrInfoPtr = std::unique_ptr<addrinfo, AddrInfoDeleter>;

AddrInfoPtr Resolve(const std::string& host, uint16_t port, bool passive) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV | (passive ? AI_PASSIVE : 0);
  addrinfo* res = nullptr;
  const std::string service = std::to_string(port);
  const int rc =
      ::getaddrinfo(host.empty() ? nullptr : host.c_str(), service.c_str(), &hints, &res);
  PIPESD_CHECK(rc == 0, TransportError,
               "cannot resolve " << HostPort(host, port) << ": " << ::gai_strerror(rc));
  return AddrInfoPtr(res);
}

}  // namespace

bool ByteBudget::TryTake(size_t n) {
  size_t cur = used_.load(std::memory_order_acquire);
  for (;;) {
    if (cur > 0 && (cur + n > limit_ || cur + n < cur)) return false;
    if (used_.compare_exchange_weak(cur, cur + n, std::memory_order_acq_rel)) return true;
  }
}

const char* CloseReasonName(CloseReason reason) {
  switch (reason) {
    case CloseReason::kOpen:
      return "OPEN";
    case CloseReason::kLocal:
      return "LOCAL";
    case CloseReason::kPeerClosed:
      return "PEER_CLOSED";
    case CloseReason::kProtocolError:
      return "PROTOCOL_ERROR";
    case CloseReason::kTransportError:
      return "TRANSPORT_ERROR";
  }
  return "UNKNOWN";
}

// ---- Construction

std::unique_ptr<FrameEndpoint> FrameEndpoint::Connect(const std::string& host, uint16_t port,
                                                      const EndpointOptions& options) {
  const std::string where = HostPort(host, port);
  AddrInfoPtr addrs = Resolve(host, port, /*passive=*/false);
  const bool has_deadline = options.connect_timeout_ms > 0;
  const Clock::time_point deadline =
      Clock::now() + std::chrono::milliseconds(std::max(options.connect_timeout_ms, 0));
  std::string last_error = "no address";
  for (const addrinfo* ai = addrs.get(); ai != nullptr; ai = ai->ai_next) {
    const int fd =
        ::socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, ai->ai_protocol);
    if (fd < 0) {
      last_error = ErrnoText(errno);
      continue;
    }
    int err = 0;
    if (::connect(fd, ai->ai_addr, ai->ai_addrlen) != 0) err = errno;
    if (err == EINPROGRESS || err == EINTR) {  // the connection goes on asynchronously
      pollfd p{fd, POLLOUT, 0};
      int n;
      while ((n = ::poll(&p, 1, RemainingMs(has_deadline, deadline))) < 0 && errno == EINTR) {
      }
      if (n == 0) {
        CloseFd(fd);
        throw TransportError("connect to " + where + " timed out after " +
                             std::to_string(options.connect_timeout_ms) + " ms");
      }
      socklen_t len = sizeof err;
      if (n < 0) {
        err = errno;
      } else if (::getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0) {
        err = errno;
      }
    }
    if (err == 0) return Adopt(fd, options);
    last_error = ErrnoText(err);
    CloseFd(fd);
  }
  throw TransportError("connect to " + where + " failed: " + last_error);
}

std::unique_ptr<FrameEndpoint> FrameEndpoint::Adopt(int fd, const EndpointOptions& options) {
  PIPESD_CHECK(fd >= 0, TransportError, "cannot adopt invalid socket descriptor " << fd);
  std::unique_ptr<FrameEndpoint> ep;
  try {
    SetNonBlocking(fd);
    SetNoDelay(fd);
    ep.reset(new FrameEndpoint(fd, options));
  } catch (...) {
    CloseFd(fd);
    throw;
  }
  ep->Start();  // on failure ep's destructor closes fd
  return ep;
}

FrameEndpoint::FrameEndpoint(int fd, const EndpointOptions& options)
    : options_(options),
      fd_(fd),
      send_ring_(options.send_ring),
      recv_ring_(options.recv_ring),
      parser_(options.max_payload),
      read_buf_(kReadChunk) {
  notify_fd_ = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  const int notify_errno = errno;
  wake_fd_ = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (notify_fd_ < 0 || wake_fd_ < 0) {
    const int err = notify_fd_ < 0 ? notify_errno : errno;
    CloseFd(notify_fd_);
    CloseFd(wake_fd_);
    throw TransportError("cannot create eventfd: " + ErrnoText(err));
  }
}

void FrameEndpoint::Start() {
  try {
    thread_ = std::thread([this] { IoLoop(); });
  } catch (const std::system_error& e) {
    throw TransportError(std::string("cannot start the endpoint I/O thread: ") + e.what());
  }
}

FrameEndpoint::~FrameEndpoint() {
  Close();
  // Frames never sent or never taken give their bytes back to the shared budget.
  if (options_.shared_budget) {
    options_.shared_budget->Give(send_bytes_.load(std::memory_order_acquire) +
                                 recv_bytes_.load(std::memory_order_acquire));
  }
  CloseFd(notify_fd_);
  CloseFd(wake_fd_);
}

void FrameEndpoint::CloseAfterFlush(int timeout_ms) {
  if (closed_.load(std::memory_order_acquire) || lingering_.load(std::memory_order_acquire)) {
    return;
  }
  linger_deadline_ns_.store(NowNs() + static_cast<int64_t>(std::max(timeout_ms, 0)) * 1000000,
                            std::memory_order_release);
  lingering_.store(true, std::memory_order_seq_cst);
  Notify();
}

void FrameEndpoint::Close() {
  std::lock_guard<std::mutex> lock(close_mu_);
  if (close_done_) return;
  close_done_ = true;
  stop_.store(true, std::memory_order_seq_cst);
  Notify();
  if (thread_.joinable()) thread_.join();
  CloseFd(fd_);
  fd_ = -1;
  {
    std::lock_guard<std::mutex> l(mu_);
    if (reason_ == CloseReason::kOpen) reason_ = CloseReason::kLocal;
  }
  closed_.store(true, std::memory_order_release);
  SignalWake();
}

// ---- Producer and consumer

bool FrameEndpoint::Send(Frame&& frame) {
  if (closed_.load(std::memory_order_acquire) || stop_.load(std::memory_order_relaxed) ||
      lingering_.load(std::memory_order_acquire)) {
    return false;
  }
  PIPESD_CHECK(frame.payload.size() <= options_.max_payload, ProtocolError,
               "cannot send a " << FrameTypeName(frame.header.type) << " frame with a payload of "
                                << frame.payload.size() << " bytes, limit "
                                << options_.max_payload);
  frame.header.payload_len = static_cast<uint32_t>(frame.payload.size());
  ValidateHeader(frame.header, options_.max_payload);

  const size_t size = kFrameHeaderSize + frame.payload.size();
  const size_t held = send_bytes_.load(std::memory_order_acquire);
  ByteBudget* budget = options_.shared_budget.get();
  if ((held > 0 && held + size > options_.send_bytes) ||
      (budget != nullptr && !budget->TryTake(size))) {
    send_rejected_.fetch_add(1, std::memory_order_relaxed);
    return false;
  }
  // Counted before the push: the I/O thread subtracts as soon as it has taken the frame.
  send_bytes_.fetch_add(size, std::memory_order_acq_rel);
  Queued q;
  q.frame = std::move(frame);
  q.enqueued_ns = NowNs();
  if (!send_ring_.TryPush(std::move(q))) {
    frame = std::move(q.frame);  // TryPush left q untouched: hand the frame back
    send_bytes_.fetch_sub(size, std::memory_order_acq_rel);
    if (budget != nullptr) budget->Give(size);
    send_rejected_.fetch_add(1, std::memory_order_relaxed);
    return false;
  }
  // Pairs with the I/O thread's store of io_waiting_ then load of send_pushed_ (both seq_cst):
  // either it sees this frame before sleeping, or this load sees it waiting and wakes it.
  send_pushed_.fetch_add(1, std::memory_order_seq_cst);
  if (io_waiting_.load(std::memory_order_seq_cst)) Notify();
  return true;
}

bool FrameEndpoint::TryRecv(Frame* out) {
  Queued q;
  if (!recv_ring_.TryPop(&q)) return false;
  AddWait(&recv_wait_total_ns_, &recv_wait_max_ns_, NowNs() - q.enqueued_ns);
  const size_t size = q.size();
  recv_bytes_.fetch_sub(size, std::memory_order_acq_rel);
  if (options_.shared_budget) options_.shared_budget->Give(size);
  *out = std::move(q.frame);
  // Same pattern as Send(): the I/O thread sets recv_stalled_ then rereads recv_popped_.
  recv_popped_.fetch_add(1, std::memory_order_seq_cst);
  if (recv_stalled_.load(std::memory_order_seq_cst) &&
      recv_stalled_.exchange(false, std::memory_order_seq_cst)) {
    Notify();
  }
  return true;
}

void FrameEndpoint::DrainWake() {
  uint64_t v;
  while (::read(wake_fd_, &v, sizeof v) < 0 && errno == EINTR) {
  }
}

bool FrameEndpoint::Flush(int timeout_ms) {
  const Clock::time_point deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
  while (frames_sent_.load(std::memory_order_acquire) <
         send_pushed_.load(std::memory_order_acquire)) {
    if (closed()) return false;
    if (timeout_ms >= 0 && Clock::now() >= deadline) return false;
    std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
  return true;
}

CloseReason FrameEndpoint::close_reason() const {
  std::lock_guard<std::mutex> lock(mu_);
  return reason_;
}

std::string FrameEndpoint::error() const {
  std::lock_guard<std::mutex> lock(mu_);
  return error_;
}

EndpointStats FrameEndpoint::stats() const {
  EndpointStats s;
  s.frames_sent = frames_sent_.load(std::memory_order_relaxed);
  s.frames_received = frames_received_.load(std::memory_order_relaxed);
  s.bytes_sent = bytes_sent_.load(std::memory_order_relaxed);
  s.bytes_received = bytes_received_.load(std::memory_order_relaxed);
  s.send_rejected = send_rejected_.load(std::memory_order_relaxed);
  s.send_wait_total_ns = send_wait_total_ns_.load(std::memory_order_relaxed);
  s.send_wait_max_ns = send_wait_max_ns_.load(std::memory_order_relaxed);
  s.recv_wait_total_ns = recv_wait_total_ns_.load(std::memory_order_relaxed);
  s.recv_wait_max_ns = recv_wait_max_ns_.load(std::memory_order_relaxed);
  return s;
}

void FrameEndpoint::Notify() {
  const uint64_t one = 1;
  // Can only fail with EAGAIN when the counter is about to overflow: it is readable then anyway.
  while (::write(notify_fd_, &one, sizeof one) < 0 && errno == EINTR) {
  }
}

void FrameEndpoint::SignalWake() {
  const uint64_t one = 1;
  while (::write(wake_fd_, &one, sizeof one) < 0 && errno == EINTR) {
  }
}

// ---- I/O thread

void FrameEndpoint::IoLoop() {
  CloseReason reason = CloseReason::kLocal;
  std::string error;
  try {
    while (!stop_.load(std::memory_order_acquire)) {
      const bool lingering = lingering_.load(std::memory_order_acquire);
      if (have_pending_ && !lingering) DeliverParsed();
      const WriteState ws = PumpWrites();
      if (lingering) {
        const int64_t left_ns = linger_deadline_ns_.load(std::memory_order_acquire) - NowNs();
        const bool drained =
            ws == WriteState::kIdle && send_pushed_.load(std::memory_order_seq_cst) == send_popped_;
        if (drained || left_ns <= 0) {
          ::shutdown(fd_, SHUT_WR);  // the peer reads what was sent, then the end of stream
          Finish(CloseReason::kLocal, "");
          return;
        }
      }
      // A lingering endpoint reads nothing more: it only writes out what is queued.
      const bool want_read = !have_pending_ && !lingering;
      const bool want_write = ws == WriteState::kBlocked;

      int timeout_ms = -1;
      if (ws == WriteState::kMore) {
        timeout_ms = 0;
      } else {
        // Announce the sleep, then look once more for work that raced with it (see Send()).
        io_waiting_.store(true, std::memory_order_seq_cst);
        const bool sends =
            ws == WriteState::kIdle && send_pushed_.load(std::memory_order_seq_cst) != send_popped_;
        if (sends || (have_pending_ && !lingering && RecvRingHasRoom()) ||
            stop_.load(std::memory_order_seq_cst)) {
          timeout_ms = 0;
        } else if (lingering) {
          const int64_t left_ms =
              (linger_deadline_ns_.load(std::memory_order_acquire) - NowNs()) / 1000000 + 1;
          timeout_ms = static_cast<int>(std::clamp<int64_t>(left_ms, 0, 1000));
        } else if (have_pending_ && budget_stalled_) {
          timeout_ms = 10;  // another endpoint frees the shared budget without telling this one
        }
      }

      pollfd fds[2];
      fds[0].fd = (want_read || want_write) ? fd_ : -1;
      fds[0].events = static_cast<short>((want_read ? POLLIN : 0) | (want_write ? POLLOUT : 0));
      fds[0].revents = 0;
      fds[1].fd = notify_fd_;
      fds[1].events = POLLIN;
      fds[1].revents = 0;
      const int n = ::poll(fds, 2, timeout_ms);
      io_waiting_.store(false, std::memory_order_relaxed);
      if (n < 0) {
        if (errno == EINTR) continue;
        throw TransportError("poll failed: " + ErrnoText(errno));
      }
      if (fds[1].revents & POLLIN) {
        uint64_t v;
        while (::read(notify_fd_, &v, sizeof v) < 0 && errno == EINTR) {
        }
      }
      // POLLERR/POLLHUP while only writing: the next write reports the error.
      if (want_read && (fds[0].revents & (POLLIN | POLLHUP | POLLERR)) != 0 && !ReadSome()) {
        const size_t partial = parser_.Buffered();
        PIPESD_CHECK(partial == 0, ProtocolError,
                     "peer closed the connection mid-frame (" << partial
                                                              << " bytes of an incomplete frame "
                                                                 "discarded)");
        reason = CloseReason::kPeerClosed;
        error = "peer closed the connection";
        break;
      }
    }
  } catch (const ProtocolError& e) {
    reason = CloseReason::kProtocolError;
    error = std::string("protocol error: ") + e.what();
    if (parser_.failed()) SendParseError(e.what());
  } catch (const TransportError& e) {
    reason = CloseReason::kTransportError;
    error = e.what();
  } catch (const std::exception& e) {
    reason = CloseReason::kTransportError;
    error = std::string("internal error in the endpoint I/O thread: ") + e.what();
  }
  if (reason != CloseReason::kLocal) Finish(reason, error);
}

void FrameEndpoint::Finish(CloseReason reason, const std::string& error) {
  // Tell the peer at once (it sees EOF or a reset); the descriptor is closed by Close().
  ::shutdown(fd_, SHUT_RDWR);
  {
    std::lock_guard<std::mutex> lock(mu_);
    reason_ = reason;
    error_ = error;
  }
  closed_.store(true, std::memory_order_release);
  SignalWake();
}

void FrameEndpoint::SendParseError(const std::string& message) {
  // A frame already half written cannot be followed by another: the peer's framing would break.
  if (!out_.empty() && out_.front().written > 0) return;
  Error e;
  e.code = static_cast<uint32_t>(parser_.error_code());
  e.message = message.substr(0, 512);
  try {
    const std::vector<uint8_t> bytes =
        EncodeFrame(MakeFrame(FrameType::kError, 0, 0, EncodeError(e), 0));
    // One non-blocking attempt: a peer that is not reading does not delay the close.
    (void)::send(fd_, bytes.data(), bytes.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
  } catch (const std::exception&) {
    // Best effort only; the close that follows tells the peer in any case.
  }
}

FrameEndpoint::WriteState FrameEndpoint::PumpWrites() {
  for (int i = 0; i < kMaxWritesPerPump; ++i) {
    PullSends();
    if (out_.empty()) return WriteState::kIdle;
    if (!WriteOnce()) return WriteState::kBlocked;
  }
  return WriteState::kMore;
}

void FrameEndpoint::PullSends() {
  while (out_.size() < kMaxOutFrames && (out_.empty() || out_bytes_ < kMaxOutBytes)) {
    Queued q;
    if (!send_ring_.TryPop(&q)) return;
    ++send_popped_;
    send_bytes_.fetch_sub(q.size(), std::memory_order_acq_rel);
    if (options_.shared_budget) options_.shared_budget->Give(q.size());
    out_.emplace_back();
    Outgoing& o = out_.back();
    o.frame = std::move(q.frame);
    o.enqueued_ns = q.enqueued_ns;
    EncodeHeader(o.frame.header, o.header);  // Send() set payload_len and validated it
    out_bytes_ += o.size();
  }
}

bool FrameEndpoint::WriteOnce() {
  iovec iov[2 * kMaxOutFrames];
  size_t n = 0;
  for (Outgoing& o : out_) {
    size_t at = o.written;
    if (at < kFrameHeaderSize) {
      iov[n].iov_base = o.header + at;
      iov[n].iov_len = kFrameHeaderSize - at;
      ++n;
      at = kFrameHeaderSize;
    }
    const size_t off = at - kFrameHeaderSize;
    if (off < o.frame.payload.size()) {
      iov[n].iov_base = o.frame.payload.data() + off;
      iov[n].iov_len = o.frame.payload.size() - off;
      ++n;
    }
  }
  msghdr msg{};
  msg.msg_iov = iov;
  msg.msg_iovlen = n;
  const ssize_t r = ::sendmsg(fd_, &msg, MSG_NOSIGNAL);
  if (r < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK) return false;
    if (errno == EINTR) return true;
    throw TransportError("send to peer failed: " + ErrnoText(errno));
  }
  bytes_sent_.fetch_add(static_cast<uint64_t>(r), std::memory_order_relaxed);
  out_bytes_ -= static_cast<size_t>(r);
  const int64_t now = NowNs();
  size_t left = static_cast<size_t>(r);
  while (left > 0) {
    Outgoing& o = out_.front();
    if (o.written == 0) AddWait(&send_wait_total_ns_, &send_wait_max_ns_, now - o.enqueued_ns);
    const size_t take = std::min(left, o.size() - o.written);
    o.written += take;
    left -= take;
    if (o.written == o.size()) {
      out_.pop_front();
      frames_sent_.fetch_add(1, std::memory_order_release);
    }
  }
  return true;
}

bool FrameEndpoint::RecvRingHasRoom() const {
  if (recv_pushed_ - recv_popped_.load(std::memory_order_seq_cst) >= recv_ring_.Capacity()) {
    return false;
  }
  if (!have_pending_) return true;
  const size_t held = recv_bytes_.load(std::memory_order_seq_cst);
  return held == 0 || held + pending_.size() <= options_.recv_bytes;
}

bool FrameEndpoint::DeliverParsed() {
  bool delivered = false;
  bool room = true;
  for (;;) {
    if (!have_pending_) {
      if (!parser_.Next(&pending_.frame)) break;
      pending_.enqueued_ns = NowNs();
      have_pending_ = true;
    }
    const size_t size = pending_.size();
    const size_t held = recv_bytes_.load(std::memory_order_seq_cst);
    ByteBudget* budget = options_.shared_budget.get();
    budget_stalled_ = false;
    bool pushed = false;
    if (held == 0 || held + size <= options_.recv_bytes) {
      if (budget != nullptr && !budget->TryTake(size)) {
        budget_stalled_ = true;
      } else {
        // Counted before the push: TryRecv() subtracts as soon as it has the frame.
        recv_bytes_.fetch_add(size, std::memory_order_seq_cst);
        pushed = recv_ring_.TryPush(std::move(pending_));
        if (!pushed) {
          recv_bytes_.fetch_sub(size, std::memory_order_seq_cst);
          if (budget != nullptr) budget->Give(size);
        }
      }
    }
    if (!pushed) {
      // Ask TryRecv() for a Notify(); IoLoop() rechecks the room after this store.
      recv_stalled_.store(true, std::memory_order_seq_cst);
      room = false;
      break;
    }
    have_pending_ = false;
    ++recv_pushed_;
    frames_received_.fetch_add(1, std::memory_order_relaxed);
    delivered = true;
  }
  if (delivered) SignalWake();
  return room;
}

bool FrameEndpoint::ReadSome() {
  for (int i = 0; i < kMaxReadsPerWake; ++i) {
    const ssize_t r = ::recv(fd_, read_buf_.data(), read_buf_.size(), 0);
    if (r == 0) return false;
    if (r < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return true;
      throw TransportError("receive from peer failed: " + ErrnoText(errno));
    }
    bytes_received_.fetch_add(static_cast<uint64_t>(r), std::memory_order_relaxed);
    parser_.Feed(read_buf_.data(), static_cast<size_t>(r));
    // Stop reading while the receive ring is full: TCP then pushes back on the peer.
    if (!DeliverParsed()) return true;
    if (static_cast<size_t>(r) < read_buf_.size()) return true;  // drained for now
  }
  return true;
}

// ---- FrameListener

std::unique_ptr<FrameListener> FrameListener::Listen(const std::string& host, uint16_t port,
                                                     int backlog) {
  const std::string where = HostPort(host, port);
  AddrInfoPtr addrs = Resolve(host, port, /*passive=*/true);
  std::string last_error = "no address";
  for (const addrinfo* ai = addrs.get(); ai != nullptr; ai = ai->ai_next) {
    const int fd =
        ::socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, ai->ai_protocol);
    if (fd < 0) {
      last_error = ErrnoText(errno);
      continue;
    }
    int one = 1;
    sockaddr_storage bound{};
    socklen_t len = sizeof bound;
    if (::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0 ||
        ::bind(fd, ai->ai_addr, ai->ai_addrlen) != 0 || ::listen(fd, backlog) != 0 ||
        ::getsockname(fd, reinterpret_cast<sockaddr*>(&bound), &len) != 0) {
      last_error = ErrnoText(errno);
      CloseFd(fd);
      continue;
    }
    uint16_t actual = port;
    if (bound.ss_family == AF_INET) {
      actual = ntohs(reinterpret_cast<const sockaddr_in*>(&bound)->sin_port);
    } else if (bound.ss_family == AF_INET6) {
      actual = ntohs(reinterpret_cast<const sockaddr_in6*>(&bound)->sin6_port);
    }
    return std::unique_ptr<FrameListener>(new FrameListener(fd, actual));
  }
  throw TransportError("listen on " + where + " failed: " + last_error);
}

FrameListener::~FrameListener() { CloseFd(fd_); }

std::unique_ptr<FrameEndpoint> FrameListener::Accept(const EndpointOptions& options,
                                                     int timeout_ms) {
  const bool has_deadline = timeout_ms >= 0;
  const Clock::time_point deadline =
      Clock::now() + std::chrono::milliseconds(std::max(timeout_ms, 0));
  for (;;) {
    pollfd p{fd_, POLLIN, 0};
    const int n = ::poll(&p, 1, RemainingMs(has_deadline, deadline));
    if (n < 0 && errno != EINTR) {
      throw TransportError("poll on listening port " + std::to_string(port_) +
                           " failed: " + ErrnoText(errno));
    }
    if (n > 0) {
      const int fd = ::accept4(fd_, nullptr, nullptr, SOCK_CLOEXEC);
      if (fd >= 0) return FrameEndpoint::Adopt(fd, options);
      // The connection may have gone away between poll() and accept(): wait for another.
      if (errno != EAGAIN && errno != EWOULDBLOCK && errno != ECONNABORTED && errno != EINTR) {
        throw TransportError("accept on port " + std::to_string(port_) +
                             " failed: " + ErrnoText(errno));
      }
    }
    if (has_deadline && Clock::now() >= deadline) return nullptr;
  }
}

}  // namespace pipesd
