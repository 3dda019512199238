// Helpers shared by the C++ tests of the wire format and the endpoint.
#pragma once

#include <gtest/gtest.h>

#include "pipesd/frame.h"

namespace pipesd {

// Every header field and the payload agree.
inline void ExpectSameFrame(const Frame& a, const Frame& b) {
  EXPECT_EQ(a.header.magic, b.header.magic);
  EXPECT_EQ(a.header.version, b.header.version);
  EXPECT_EQ(a.header.type, b.header.type);
  EXPECT_EQ(a.header.flags, b.header.flags);
  EXPECT_EQ(a.header.session, b.header.session);
  EXPECT_EQ(a.header.epoch, b.header.epoch);
  EXPECT_EQ(a.header.payload_len, b.header.payload_len);
  EXPECT_EQ(a.payload, b.payload);
}

}  // namespace pipesd
