#include <gtest/gtest.h>

#include <cstdint>
#include <memory>
#include <string>
#include <thread>

#include "pipesd/errors.h"
#include "pipesd/spsc_ring.h"

namespace pipesd {
namespace {

TEST(SpscRing, CapacityRoundsUpToPowerOfTwo) {
  EXPECT_EQ(SpscRing<int>(1).Capacity(), 1u);
  EXPECT_EQ(SpscRing<int>(2).Capacity(), 2u);
  EXPECT_EQ(SpscRing<int>(5).Capacity(), 8u);
  EXPECT_EQ(SpscRing<int>(1024).Capacity(), 1024u);
  EXPECT_EQ(SpscRing<int>(1025).Capacity(), 2048u);
}

TEST(SpscRing, RejectsBadCapacity) {
  EXPECT_THROW(SpscRing<int>(0), TransportError);
  EXPECT_THROW(SpscRing<int>((size_t{1} << 30) + 1), TransportError);
}

TEST(SpscRing, PushUntilFullThenFifo) {
  SpscRing<int> r(6);  // rounds to 8
  EXPECT_TRUE(r.Empty());
  for (int i = 0; i < 8; ++i) EXPECT_TRUE(r.TryPush(i)) << i;
  EXPECT_EQ(r.Size(), 8u);
  int v = 100;
  EXPECT_FALSE(r.TryPush(std::move(v)));  // full is an outcome, not an exception
  EXPECT_EQ(v, 100);
  for (int i = 0; i < 8; ++i) {
    int out = -1;
    ASSERT_TRUE(r.TryPop(&out));
    EXPECT_EQ(out, i);
  }
  int out = -1;
  EXPECT_FALSE(r.TryPop(&out));
  EXPECT_EQ(out, -1);
  EXPECT_EQ(r.Size(), 0u);
}

TEST(SpscRing, WrapsAroundManyTimes) {
  SpscRing<uint64_t> r(4);
  uint64_t next_push = 0;
  uint64_t next_pop = 0;
  // Uneven push/pop bursts so that the indices cross the end of the buffer at every offset.
  for (int round = 0; round < 10000; ++round) {
    const int pushes = 1 + round % 4;
    for (int i = 0; i < pushes; ++i) {
      if (!r.TryPush(next_push)) break;
      ++next_push;
    }
    EXPECT_LE(r.Size(), r.Capacity());
    const int pops = 1 + (round * 7) % 4;
    for (int i = 0; i < pops; ++i) {
      uint64_t v;
      if (!r.TryPop(&v)) break;
      ASSERT_EQ(v, next_pop);
      ++next_pop;
    }
    EXPECT_EQ(r.Size(), next_push - next_pop);
  }
  EXPECT_GT(next_pop, 5000 * r.Capacity());  // thousands of trips round the buffer
}

TEST(SpscRing, MoveOnlyElements) {
  SpscRing<std::unique_ptr<std::string>> r(2);
  EXPECT_TRUE(r.TryPush(std::make_unique<std::string>("a")));
  EXPECT_TRUE(r.TryPush(std::make_unique<std::string>("b")));
  auto c = std::make_unique<std::string>("c");
  EXPECT_FALSE(r.TryPush(std::move(c)));
  ASSERT_NE(c, nullptr);  // a failed push leaves the value with the caller
  std::unique_ptr<std::string> out;
  ASSERT_TRUE(r.TryPop(&out));
  EXPECT_EQ(*out, "a");
  EXPECT_TRUE(r.TryPush(std::move(c)));
  ASSERT_TRUE(r.TryPop(&out));
  EXPECT_EQ(*out, "b");
  ASSERT_TRUE(r.TryPop(&out));
  EXPECT_EQ(*out, "c");
}

TEST(SpscRing, TwoThreadsMillionIntegersInOrder) {
  constexpr int64_t kCount = 1000000;
  SpscRing<int64_t> r(1024);
  std::thread producer([&r] {
    for (int64_t i = 0; i < kCount; ++i) {
      while (!r.TryPush(i)) std::this_thread::yield();
    }
  });
  int64_t expected = 0;
  int64_t mismatches = 0;
  while (expected < kCount) {
    int64_t v;
    if (!r.TryPop(&v)) {
      std::this_thread::yield();
      continue;
    }
    if (v != expected) ++mismatches;
    expected = v + 1;
  }
  producer.join();
  EXPECT_EQ(mismatches, 0);
  EXPECT_EQ(expected, kCount);
  int64_t v;
  EXPECT_FALSE(r.TryPop(&v));
}

// Non-trivial payloads across threads: the release/acquire pair must publish the string's heap
// contents, not just the slot index.
TEST(SpscRing, TwoThreadsStrings) {
  constexpr int kCount = 100000;
  SpscRing<std::string> r(64);
  std::thread producer([&r] {
    for (int i = 0; i < kCount; ++i) {
      std::string s = "item-" + std::to_string(i) + std::string(i % 50, 'x');
      while (!r.TryPush(std::move(s))) std::this_thread::yield();
    }
  });
  int bad = 0;
  for (int i = 0; i < kCount;) {
    std::string s;
    if (!r.TryPop(&s)) {
      std::this_thread::yield();
      continue;
    }
    if (s != "item-" + std::to_string(i) + std::string(i % 50, 'x')) ++bad;
    ++i;
  }
  producer.join();
  EXPECT_EQ(bad, 0);
}

}  // namespace
}  // namespace pipesd
