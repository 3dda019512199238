// A bounded lock-free queue between exactly one producer thread and one consumer thread, e.g.
// the thread that reads a socket and the thread that runs the model.
//
// head_ and tail_ are free-running counters (they never wrap within any realistic run: 2^64
// operations), and a slot is counter & mask_. Only the producer writes tail_ and only the
// consumer writes head_; each publishes its slot with a release store that the other side reads
// with an acquire load, which orders the slot's contents before the index that exposes it.
// Each side also keeps a private copy of the other's index and rereads the shared one only when
// the copy says full/empty, so the common case touches no cache line the other thread writes.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <utility>

#include "pipesd/errors.h"

namespace pipesd {

template <typename T>
class SpscRing {
 public:
  static constexpr size_t kMaxCapacity = size_t{1} << 30;

  // Rounds capacity up to a power of two so that a slot is an index & mask. T must be default
  // constructible and move assignable: slots are constructed up front and moved in and out.
  explicit SpscRing(size_t capacity)
      : capacity_(RoundUp(capacity)),
        mask_(capacity_ - 1),
        slots_(std::make_unique<T[]>(capacity_)) {}

  SpscRing(const SpscRing&) = delete;
  SpscRing& operator=(const SpscRing&) = delete;

  // Producer only. Returns false when the ring is full (backpressure, not an error); v is then
  // left untouched.
  bool TryPush(T&& v) { return Push(std::move(v)); }
  bool TryPush(const T& v) { return Push(v); }

  // Consumer only. Returns false when the ring is empty.
  bool TryPop(T* out) {
    const size_t head = head_.load(std::memory_order_relaxed);
    if (head == cached_tail_) {
      cached_tail_ = tail_.load(std::memory_order_acquire);
      if (head == cached_tail_) return false;
    }
    *out = std::move(slots_[head & mask_]);
    head_.store(head + 1, std::memory_order_release);
    return true;
  }

  // Exact when called from either side with the other idle; otherwise a snapshot that may be
  // off by the operations racing with it (never more than Capacity()).
  size_t Size() const {
    // head first: tail only grows, so the later tail load is never behind this head.
    const size_t head = head_.load(std::memory_order_acquire);
    const size_t tail = tail_.load(std::memory_order_acquire);
    const size_t n = tail - head;
    return n > capacity_ ? capacity_ : n;
  }

  bool Empty() const { return Size() == 0; }
  size_t Capacity() const { return capacity_; }

 private:
  template <typename U>
  bool Push(U&& v) {
    const size_t tail = tail_.load(std::memory_order_relaxed);
    if (tail - cached_head_ == capacity_) {
      cached_head_ = head_.load(std::memory_order_acquire);
      if (tail - cached_head_ == capacity_) return false;
    }
    slots_[tail & mask_] = std::forward<U>(v);
    tail_.store(tail + 1, std::memory_order_release);
    return true;
  }

  static size_t RoundUp(size_t capacity) {
    PIPESD_CHECK(capacity > 0 && capacity <= kMaxCapacity, TransportError,
                 "SpscRing capacity must be in [1, 2^30], got " << capacity);
    size_t c = 1;
    while (c < capacity) c <<= 1;
    return c;
  }

  const size_t capacity_;
  const size_t mask_;
  std::unique_ptr<T[]> slots_;

  // Consumer's line: the index it writes and its private copy of the producer's.
  alignas(64) std::atomic<size_t> head_{0};
  size_t cached_tail_ = 0;
  // Producer's line.
  alignas(64) std::atomic<size_t> tail_{0};
  size_t cached_head_ = 0;
  // No trailing pad needed: alignas(64) rounds sizeof(SpscRing) up to a whole line, so nothing
  // placed after the ring shares the producer's.
};

}  // namespace pipesd
