// Blocking TCP ping-pong over loopback: the floor under any round trip of a small message.
//
//   pingpong server BYTES
//       listens on 127.0.0.1 (an ephemeral port, printed on the first line of stdout), serves one
//       client: reads BYTES, writes them back, until the client closes.
//   pingpong client PORT BYTES ROUNDS WARMUP REPEATS
//       after WARMUP round trips, times REPEATS x ROUNDS round trips; prints one line per repeat:
//       "median_us p99_us" (p99 by nearest rank).
//
// POSIX sockets only, TCP_NODELAY on both ends. Built by bench/bench_transport.py with
// c++ -O2 -std=c++17.

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

[[noreturn]] void Die(const char* what) {
  std::fprintf(stderr, "pingpong: %s: %s\n", what, std::strerror(errno));
  std::exit(1);
}

void SetNoDelay(int fd) {
  int one = 1;
  if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) != 0) Die("TCP_NODELAY");
}

// Returns false on EOF before the first byte; dies on errors and on EOF mid-message.
bool ReadFull(int fd, char* buf, size_t n) {
  size_t got = 0;
  while (got < n) {
    ssize_t r = recv(fd, buf + got, n - got, 0);
    if (r > 0) {
      got += static_cast<size_t>(r);
    } else if (r == 0) {
      if (got == 0) return false;
      errno = ECONNRESET;
      Die("recv");
    } else if (errno != EINTR) {
      Die("recv");
    }
  }
  return true;
}

void WriteFull(int fd, const char* buf, size_t n) {
  size_t sent = 0;
  while (sent < n) {
    ssize_t r = send(fd, buf + sent, n - sent, MSG_NOSIGNAL);
    if (r >= 0) {
      sent += static_cast<size_t>(r);
    } else if (errno != EINTR) {
      Die("send");
    }
  }
}

sockaddr_in Loopback(int port) {
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  return addr;
}

int Server(size_t bytes) {
  int listener = socket(AF_INET, SOCK_STREAM, 0);
  if (listener < 0) Die("socket");
  int one = 1;
  setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  sockaddr_in addr = Loopback(0);
  if (bind(listener, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) Die("bind");
  if (listen(listener, 1) != 0) Die("listen");
  socklen_t len = sizeof(addr);
  if (getsockname(listener, reinterpret_cast<sockaddr*>(&addr), &len) != 0) Die("getsockname");
  std::printf("%d\n", ntohs(addr.sin_port));
  std::fflush(stdout);
  int fd = accept(listener, nullptr, nullptr);
  if (fd < 0) Die("accept");
  SetNoDelay(fd);
  std::vector<char> buf(bytes);
  while (ReadFull(fd, buf.data(), bytes)) WriteFull(fd, buf.data(), bytes);
  close(fd);
  close(listener);
  return 0;
}

int Client(int port, size_t bytes, int rounds, int warmup, int repeats) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) Die("socket");
  sockaddr_in addr = Loopback(port);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) Die("connect");
  SetNoDelay(fd);
  std::vector<char> msg(bytes, 'p');
  std::vector<char> back(bytes);
  for (int i = 0; i < warmup; ++i) {
    WriteFull(fd, msg.data(), bytes);
    if (!ReadFull(fd, back.data(), bytes)) Die("server closed");
  }
  std::vector<double> rtt_us(static_cast<size_t>(rounds));
  for (int r = 0; r < repeats; ++r) {
    for (int i = 0; i < rounds; ++i) {
      auto t0 = std::chrono::steady_clock::now();
      WriteFull(fd, msg.data(), bytes);
      if (!ReadFull(fd, back.data(), bytes)) Die("server closed");
      auto t1 = std::chrono::steady_clock::now();
      rtt_us[static_cast<size_t>(i)] = std::chrono::duration<double, std::micro>(t1 - t0).count();
    }
    std::sort(rtt_us.begin(), rtt_us.end());
    size_t n = rtt_us.size();
    size_t p99 = std::min(n - 1, (n * 99 + 99) / 100 - 1);  // nearest rank: ceil(0.99 n) - 1
    double median = n % 2 ? rtt_us[n / 2] : (rtt_us[n / 2 - 1] + rtt_us[n / 2]) / 2;
    std::printf("%.3f %.3f\n", median, rtt_us[p99]);
    std::fflush(stdout);
  }
  close(fd);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::string mode = argc > 1 ? argv[1] : "";
  if (mode == "server" && argc == 3) return Server(std::strtoul(argv[2], nullptr, 10));
  if (mode == "client" && argc == 7) {
    return Client(std::atoi(argv[2]), std::strtoul(argv[3], nullptr, 10), std::atoi(argv[4]),
                  std::atoi(argv[5]), std::atoi(argv[6]));
  }
  std::fprintf(stderr,
               "usage: pingpong server BYTES | pingpong client PORT BYTES ROUNDS WARMUP REPEATS\n");
  return 2;
}
