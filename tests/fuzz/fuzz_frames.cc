// libFuzzer target for the wire format: the frame parser and every payload decoder.
//
// Each input is used three ways:
//   1. as a byte stream for FrameParser, fed in one piece and again in chunks whose sizes are read
//      from the input (so headers and payloads are split everywhere), once with the default
//      payload limit and once with a small one; every parsed frame goes through the decoder of
//      its type;
//   2. as a payload handed straight to one decoder, the first byte choosing which.
// ProtocolError is the expected answer to malformed bytes. Anything else is a bug: another
// exception escapes (and terminates), a sanitizer reports, or one of the checks below aborts.
// The checks: a payload that decodes re-encodes to the same bytes and decodes again to an equal
// message; a parsed frame re-encodes to the bytes it came from; the parser's output does not
// depend on how the stream was cut, and a smaller payload limit only ever stops it earlier.
//
// Build with -DPIPESD_FUZZ=ON (clang); tests/fuzz/corpus holds the seeds and regression inputs.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <utility>
#include <vector>

#include "pipesd/errors.h"
#include "pipesd/frame.h"

namespace pipesd {
namespace {

using Bytes = std::vector<uint8_t>;

[[noreturn]] void Bug(const char* what, int line) {
  std::fprintf(stderr, "fuzz_frames.cc:%d: check failed: %s\n", line, what);
  std::abort();
}

#define FUZZ_CHECK(cond)               \
  do {                                 \
    if (!(cond)) Bug(#cond, __LINE__); \
  } while (0)

// ---- Field-by-field equality. Floats compare by bit pattern: a round trip must keep -0.0 and
// every payload bit. When a message gains a field, add it here.

bool SameBits(float a, float b) {
  uint32_t x, y;
  std::memcpy(&x, &a, sizeof x);
  std::memcpy(&y, &b, sizeof y);
  return x == y;
}

bool SameFloats(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!SameBits(a[i], b[i])) return false;
  }
  return true;
}

bool Same(const Hello& a, const Hello& b) {
  return a.auth_token == b.auth_token && a.vocab_size == b.vocab_size &&
         a.tokenizer_hash == b.tokenizer_hash && a.min_version == b.min_version &&
         a.max_version == b.max_version;
}

bool Same(const CostTable& a, const CostTable& b) { return SameFloats(a.verify_ms, b.verify_ms); }

bool Same(const HelloOk& a, const HelloOk& b) {
  return a.session == b.session && a.model_fingerprint == b.model_fingerprint &&
         a.max_ctx == b.max_ctx && Same(a.costs, b.costs);
}

bool Same(const Prefill& a, const Prefill& b) {
  return SameBits(a.temperature, b.temperature) && a.top_k == b.top_k &&
         SameBits(a.top_p, b.top_p) && a.seed == b.seed && a.tokens == b.tokens;
}

bool Same(const SparseDist& a, const SparseDist& b) {
  return a.ids == b.ids && SameFloats(a.probs, b.probs);
}

bool Same(const Draft& a, const Draft& b) {
  if (a.start != b.start || a.tokens != b.tokens || a.dists.size() != b.dists.size()) return false;
  for (size_t i = 0; i < a.dists.size(); ++i) {
    if (!Same(a.dists[i], b.dists[i])) return false;
  }
  return true;
}

bool Same(const Verdict& a, const Verdict& b) {
  return a.start == b.start && a.drafted == b.drafted && a.accepted == b.accepted &&
         a.next_token == b.next_token && SameBits(a.verify_ms, b.verify_ms);
}

bool Same(const Error& a, const Error& b) { return a.code == b.code && a.message == b.message; }

bool Same(const FrameHeader& a, const FrameHeader& b) {
  return a.magic == b.magic && a.version == b.version && a.type == b.type && a.flags == b.flags &&
         a.session == b.session && a.epoch == b.epoch && a.payload_len == b.payload_len;
}

bool Same(const Frame& a, const Frame& b) {
  return Same(a.header, b.header) && a.payload == b.payload;
}

// ---- Payload decoders

// Decodes `payload`; on success checks that the message re-encodes to exactly the same bytes
// (the encoding is canonical) and decodes again to an equal message. Returns whether it decoded.
// The re-encoding runs outside the try: an encoder refusing what its decoder accepted throws
// ProtocolError out of the fuzz target, which is reported as a bug.
template <typename Msg, typename Decode, typename Encode>
bool RoundTrip(const Bytes& payload, Decode decode, Encode encode) {
  Msg m;
  try {
    m = decode(payload);
  } catch (const ProtocolError&) {
    return false;
  }
  const Bytes again = encode(m);
  FUZZ_CHECK(again == payload);
  FUZZ_CHECK(Same(decode(again), m));
  return true;
}

bool DecodeDraftChecked(const Bytes& payload, bool has_dist) {
  Draft m;
  try {
    m = DecodeDraft(payload, has_dist);
  } catch (const ProtocolError&) {
    return false;
  }
  // Dists come back iff they were announced and there is at least one token.
  FUZZ_CHECK(m.dists.size() == (has_dist ? m.tokens.size() : 0));
  const Bytes again = EncodeDraft(m);
  FUZZ_CHECK(again == payload);
  FUZZ_CHECK(Same(DecodeDraft(again, has_dist), m));
  return true;
}

bool CheckEmpty(FrameType type, const Bytes& payload) {
  try {
    CheckEmptyPayload(type, payload);
  } catch (const ProtocolError&) {
    FUZZ_CHECK(!payload.empty());
    return false;
  }
  FUZZ_CHECK(payload.empty());
  return true;
}

// The decoder a frame of this type is read with; PING and PONG payloads are opaque.
void DecodeFramePayload(const Frame& f) {
  const Bytes& p = f.payload;
  switch (f.header.type) {
    case FrameType::kHello:
      RoundTrip<Hello>(p, DecodeHello, EncodeHello);
      break;
    case FrameType::kHelloOk:
      RoundTrip<HelloOk>(p, DecodeHelloOk, EncodeHelloOk);
      break;
    case FrameType::kPrefill:
      RoundTrip<Prefill>(p, DecodePrefill, EncodePrefill);
      break;
    case FrameType::kDraft: {
      const bool has_dist = (f.header.flags & kFlagHasDist) != 0;
      if (DecodeDraftChecked(p, has_dist)) {
        // MakeDraftFrame sets kFlagHasDist iff there are dists, which a draft of no tokens lacks.
        const Draft m = DecodeDraft(p, has_dist);
        if (!has_dist || !m.tokens.empty()) {
          const bool verify = (f.header.flags & kFlagVerify) != 0;
          const Frame g = MakeDraftFrame(f.header.session, f.header.epoch, m, verify);
          FUZZ_CHECK(Same(g, f));
        }
      }
      break;
    }
    case FrameType::kVerdict:
      RoundTrip<Verdict>(p, DecodeVerdict, EncodeVerdict);
      break;
    case FrameType::kCosts:
      RoundTrip<CostTable>(p, DecodeCosts, EncodeCosts);
      break;
    case FrameType::kError:
      RoundTrip<Error>(p, DecodeError, EncodeError);
      break;
    case FrameType::kReset:
    case FrameType::kBye:
      CheckEmpty(f.header.type, p);
      break;
    case FrameType::kPing:
    case FrameType::kPong:
      break;
  }
}

// The first byte picks a decoder, the rest is its payload.
void DecodeDirect(const uint8_t* data, size_t size) {
  if (size == 0) return;
  const Bytes p(data + 1, data + size);
  switch (data[0] % 10) {
    case 0:
      RoundTrip<Hello>(p, DecodeHello, EncodeHello);
      break;
    case 1:
      RoundTrip<HelloOk>(p, DecodeHelloOk, EncodeHelloOk);
      break;
    case 2:
      RoundTrip<Prefill>(p, DecodePrefill, EncodePrefill);
      break;
    case 3:
      DecodeDraftChecked(p, false);
      break;
    case 4:
      DecodeDraftChecked(p, true);
      break;
    case 5:
      RoundTrip<Verdict>(p, DecodeVerdict, EncodeVerdict);
      break;
    case 6:
      RoundTrip<CostTable>(p, DecodeCosts, EncodeCosts);
      break;
    case 7:
      RoundTrip<Error>(p, DecodeError, EncodeError);
      break;
    case 8:
      CheckEmpty(FrameType::kReset, p);
      break;
    case 9:
      CheckEmpty(FrameType::kBye, p);
      break;
  }
}

// ---- Frame parser

struct Parsed {
  std::vector<Frame> frames;
  bool failed = false;
  ErrorCode code = ErrorCode::kBadFrame;
  size_t buffered = 0;  // at end of stream, when not failed
};

// Takes out every complete frame; on ProtocolError marks the stream failed.
bool Drain(FrameParser& parser, Parsed& out) {
  try {
    Frame f;
    while (parser.Next(&f)) out.frames.push_back(std::move(f));
  } catch (const ProtocolError&) {
    out.failed = true;
  }
  return !out.failed;
}

bool FeedAndDrain(FrameParser& parser, const uint8_t* data, size_t n, Parsed& out) {
  try {
    parser.Feed(data, n);
  } catch (const ProtocolError&) {
    out.failed = true;
    return false;
  }
  return Drain(parser, out);
}

void Finish(const FrameParser& parser, Parsed& out) {
  FUZZ_CHECK(parser.failed() == out.failed);
  if (out.failed) {
    out.code = parser.error_code();
  } else {
    out.buffered = parser.Buffered();
  }
}

// After a failure every call throws ProtocolError.
void CheckStaysFailed(FrameParser& parser) {
  bool threw = false;
  try {
    const uint8_t byte = 0;
    parser.Feed(&byte, 1);
  } catch (const ProtocolError&) {
    threw = true;
  }
  FUZZ_CHECK(threw);
  threw = false;
  try {
    Frame f;
    parser.Next(&f);
  } catch (const ProtocolError&) {
    threw = true;
  }
  FUZZ_CHECK(threw);
}

Parsed ParseWhole(const uint8_t* data, size_t size) {
  FrameParser parser;
  Parsed out;
  FeedAndDrain(parser, data, size, out);
  Finish(parser, out);
  if (out.failed) CheckStaysFailed(parser);
  return out;
}

// Feeds the stream in chunks whose sizes are read from the input backwards from its last byte
// (`salt` varies the mapping between passes). A size of 0 is an empty Feed, then one byte.
Parsed ParseChunked(const uint8_t* data, size_t size, uint32_t max_payload, unsigned salt) {
  FrameParser parser(max_payload);
  Parsed out;
  size_t off = 0;
  size_t cursor = size;
  while (off < size && !out.failed) {
    cursor = cursor == 0 ? size - 1 : cursor - 1;
    size_t n = (data[cursor] * (2 * salt + 1) + salt) % 41;
    if (n == 0) {
      if (!FeedAndDrain(parser, nullptr, 0, out)) break;
      n = 1;
    }
    n = std::min(n, size - off);
    FeedAndDrain(parser, data + off, n, out);
    off += n;
  }
  Finish(parser, out);
  if (out.failed) CheckStaysFailed(parser);
  return out;
}

bool SameFrames(const std::vector<Frame>& a, const std::vector<Frame>& b, size_t count) {
  for (size_t i = 0; i < count; ++i) {
    if (!Same(a[i], b[i])) return false;
  }
  return true;
}

void FuzzParser(const uint8_t* data, size_t size) {
  const Parsed whole = ParseWhole(data, size);

  // Each frame is the exact bytes it was parsed from, and goes through its decoder.
  size_t off = 0;
  for (const Frame& f : whole.frames) {
    FUZZ_CHECK(f.payload.size() == f.header.payload_len);
    const Bytes wire = EncodeFrame(f);
    FUZZ_CHECK(wire.size() <= size - off);
    FUZZ_CHECK(std::memcmp(wire.data(), data + off, wire.size()) == 0);
    off += wire.size();
    DecodeFramePayload(f);
  }
  if (!whole.failed) FUZZ_CHECK(whole.buffered == size - off);
  if (size == 0) return;

  // Cutting the stream differently changes nothing.
  const Parsed chunked = ParseChunked(data, size, kDefaultMaxPayload, 0);
  FUZZ_CHECK(chunked.frames.size() == whole.frames.size());
  FUZZ_CHECK(SameFrames(chunked.frames, whole.frames, whole.frames.size()));
  FUZZ_CHECK(chunked.failed == whole.failed);
  FUZZ_CHECK(chunked.code == whole.code);
  FUZZ_CHECK(chunked.buffered == whole.buffered);

  // A small limit stops the parser at the first frame over it (TOO_LONG), or where the default
  // limit stopped it, with the same code, and delivers the same frames up to there.
  const uint32_t small = data[size - 1];
  const Parsed limited = ParseChunked(data, size, small, 1 + data[0] % 7);
  FUZZ_CHECK(limited.frames.size() <= whole.frames.size());
  FUZZ_CHECK(SameFrames(limited.frames, whole.frames, limited.frames.size()));
  for (const Frame& f : limited.frames) FUZZ_CHECK(f.header.payload_len <= small);
  if (limited.frames.size() < whole.frames.size()) {
    FUZZ_CHECK(limited.failed && limited.code == ErrorCode::kTooLong);
  } else if (whole.failed) {
    FUZZ_CHECK(limited.failed && limited.code == whole.code);
  } else if (limited.failed) {
    FUZZ_CHECK(limited.code == ErrorCode::kTooLong);
  } else {
    FUZZ_CHECK(limited.buffered == whole.buffered);
  }
}

}  // namespace
}  // namespace pipesd

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  pipesd::FuzzParser(data, size);
  pipesd::DecodeDirect(data, size);
  return 0;
}
