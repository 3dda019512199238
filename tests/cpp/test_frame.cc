#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "frame_testing.h"
#include "pipesd/errors.h"
#include "pipesd/frame.h"

namespace pipesd {
namespace {

using Bytes = std::vector<uint8_t>;

// Runs fn, which must throw ProtocolError whose message contains every one of `parts`.
void ExpectProtocolError(const std::function<void()>& fn, const std::vector<std::string>& parts) {
  try {
    fn();
    ADD_FAILURE() << "no ProtocolError thrown";
  } catch (const ProtocolError& e) {
    const std::string what = e.what();
    for (const std::string& p : parts) {
      EXPECT_NE(what.find(p), std::string::npos) << "\"" << what << "\" lacks \"" << p << "\"";
    }
  }
}

Bytes HeaderBytes(const FrameHeader& h) {
  Bytes b(kFrameHeaderSize);
  EncodeHeader(h, b.data());
  return b;
}

// Encodes f, parses it back in one piece and returns the parsed frame.
Frame RoundTrip(const Frame& f) {
  const Bytes wire = EncodeFrame(f);
  FrameParser p;
  p.Feed(wire.data(), wire.size());
  Frame out;
  EXPECT_TRUE(p.Next(&out));
  EXPECT_FALSE(p.Next(&out));
  EXPECT_EQ(p.Buffered(), 0u);
  return out;
}

Draft SampleDraft() {
  Draft d;
  d.start = 1234567890123ull;
  d.tokens = {5, 0, 151935, 42};
  d.dists = {{{5, 7}, {0.75f, 0.25f}}, {{0}, {1.0f}}, {{}, {}}, {{42, 1, 2}, {0.5f, 0.0f, 0.5f}}};
  return d;
}

TEST(Frame, HeaderLayoutIsLittleEndianAndFixed) {
  FrameHeader h;
  h.type = FrameType::kDraft;
  h.flags = kFlagVerify | kFlagHasDist;
  h.session = 0x0102030405060708ull;
  h.epoch = 0x1112131415161718ull;
  h.payload_len = 0x21222324;
  const Bytes b = HeaderBytes(h);
  const Bytes want = {'P',  'S',  'D',  '1',  3,    0,    4,    0,    3,    0,    0,
                      0,    0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01, 0x18, 0x17,
                      0x16, 0x15, 0x14, 0x13, 0x12, 0x11, 0x24, 0x23, 0x22, 0x21};
  EXPECT_EQ(b, want);
  const FrameHeader back = DecodeHeader(b.data());
  EXPECT_EQ(back.magic, kFrameMagic);
  EXPECT_EQ(back.type, FrameType::kDraft);
  EXPECT_EQ(back.session, h.session);
  EXPECT_EQ(back.epoch, h.epoch);
  EXPECT_EQ(back.payload_len, h.payload_len);
}

TEST(Frame, EncodeFrameWritesTheActualPayloadLength) {
  Frame f = MakeFrame(FrameType::kPing, 3, 4, {1, 2, 3});
  f.header.payload_len = 999;  // ignored: the payload's size is what goes on the wire
  const Bytes wire = EncodeFrame(f);
  ASSERT_EQ(wire.size(), kFrameHeaderSize + 3);
  EXPECT_EQ(DecodeHeader(wire.data()).payload_len, 3u);
}

TEST(Frame, HelloRoundTrip) {
  Hello m;
  m.auth_token = std::string("s3cret\0token", 12);
  m.vocab_size = 151936;
  m.tokenizer_hash = "0123456789abcdefABCDEF";
  m.min_version = 1;
  m.max_version = 3;
  const Frame f = RoundTrip(MakeFrame(FrameType::kHello, 0, 0, EncodeHello(m)));
  EXPECT_EQ(f.header.type, FrameType::kHello);
  const Hello back = DecodeHello(f.payload);
  EXPECT_EQ(back.auth_token, m.auth_token);
  EXPECT_EQ(back.vocab_size, m.vocab_size);
  EXPECT_EQ(back.tokenizer_hash, m.tokenizer_hash);
  EXPECT_EQ(back.min_version, 1);
  EXPECT_EQ(back.max_version, 3);

  Hello empty;  // empty strings are legal
  EXPECT_EQ(DecodeHello(EncodeHello(empty)).auth_token, "");
}

TEST(Frame, HelloOkRoundTrip) {
  HelloOk m;
  m.session = 0xfeedfacecafebeefull;
  m.model_fingerprint = "qwen2.5-7b-instruct:q4_k_m:9f86d081";
  m.max_ctx = 32768;
  const Frame f = RoundTrip(MakeFrame(FrameType::kHelloOk, m.session, 0, EncodeHelloOk(m)));
  EXPECT_EQ(f.header.session, m.session);
  const HelloOk back = DecodeHelloOk(f.payload);
  EXPECT_EQ(back.session, m.session);
  EXPECT_EQ(back.model_fingerprint, m.model_fingerprint);
  EXPECT_EQ(back.max_ctx, m.max_ctx);
  EXPECT_TRUE(back.costs.verify_ms.empty());

  EXPECT_EQ(back.max_window, 0u);
  EXPECT_EQ(back.max_dist, 0u);

  m.costs.verify_ms = {146.0f, 282.5f, 347.0f, 0.0f};
  m.max_window = 64;
  m.max_dist = 4096;
  const HelloOk with = DecodeHelloOk(EncodeHelloOk(m));
  EXPECT_EQ(with.costs.verify_ms, m.costs.verify_ms);
  EXPECT_EQ(with.max_window, 64u);
  EXPECT_EQ(with.max_dist, 4096u);

  m.model_fingerprint = "bad\xff";  // not UTF-8: neither sent nor accepted
  EXPECT_THROW(EncodeHelloOk(m), ProtocolError);
}

TEST(Frame, Utf8Validation) {
  EXPECT_TRUE(IsValidUtf8(""));
  EXPECT_TRUE(IsValidUtf8("plain ascii"));
  EXPECT_TRUE(IsValidUtf8("caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80"));  // é € 😀
  EXPECT_FALSE(IsValidUtf8("\xff"));
  EXPECT_FALSE(IsValidUtf8("\xc3"));              // truncated
  EXPECT_FALSE(IsValidUtf8("\xc0\xaf"));          // overlong '/'
  EXPECT_FALSE(IsValidUtf8("\xe0\x80\xaf"));      // overlong
  EXPECT_FALSE(IsValidUtf8("\xed\xa0\x80"));      // a surrogate
  EXPECT_FALSE(IsValidUtf8("\xf4\x90\x80\x80"));  // past U+10FFFF
  EXPECT_FALSE(IsValidUtf8("\x80"));              // a lone continuation byte
}

TEST(Frame, CostsRoundTrip) {
  CostTable m;
  m.verify_ms = {1.5f, 2.0f, 2.25f};
  const Frame f = RoundTrip(MakeFrame(FrameType::kCosts, 4, 0, EncodeCosts(m)));
  EXPECT_EQ(f.header.type, FrameType::kCosts);
  EXPECT_STREQ(FrameTypeName(FrameType::kCosts), "COSTS");
  EXPECT_EQ(DecodeCosts(f.payload).verify_ms, m.verify_ms);
  EXPECT_TRUE(DecodeCosts(EncodeCosts(CostTable{})).verify_ms.empty());
}

TEST(Frame, CostsRejectsBadValues) {
  for (float bad :
       {-1.0f, std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    CostTable m;
    m.verify_ms = {10.0f, bad};
    ExpectProtocolError([&] { EncodeCosts(m); }, {"2 tokens", "finite and >= 0"});
    // The same bytes forged by a peer are refused by the decoder.
    Bytes forged = EncodeCosts(CostTable{{10.0f, 20.0f}});
    std::memcpy(forged.data() + 8, &bad, sizeof bad);
    ExpectProtocolError([&] { DecodeCosts(forged); }, {"COSTS", "2 tokens"});
  }
  Bytes count_only = {0xff, 0xff, 0x00, 0x00};  // 65535 entries announced, none present
  ExpectProtocolError([&] { DecodeCosts(count_only); }, {"inconsistent", "verify_ms"});
  Bytes trailing = EncodeCosts(CostTable{{1.0f}});
  trailing.push_back(0);
  ExpectProtocolError([&] { DecodeCosts(trailing); }, {"trailing"});
}

TEST(Frame, PrefillRoundTrip) {
  Prefill m;
  m.temperature = 0.7f;
  m.top_k = 40;
  m.top_p = 0.95f;
  m.seed = 1234567890123456789ll;
  m.tokens = {1, 2, 3, 0, 2147483647};
  const Frame f = RoundTrip(MakeFrame(FrameType::kPrefill, 9, 1, EncodePrefill(m)));
  const Prefill back = DecodePrefill(f.payload);
  EXPECT_EQ(back.temperature, m.temperature);
  EXPECT_EQ(back.top_k, m.top_k);
  EXPECT_EQ(back.top_p, m.top_p);
  EXPECT_EQ(back.seed, m.seed);
  EXPECT_EQ(back.tokens, m.tokens);

  Prefill none;
  none.seed = -1;
  EXPECT_EQ(DecodePrefill(EncodePrefill(none)).seed, -1);
  EXPECT_TRUE(DecodePrefill(EncodePrefill(none)).tokens.empty());
}

TEST(Frame, DraftRoundTripWithAndWithoutDists) {
  const Draft d = SampleDraft();
  const Frame f = RoundTrip(MakeDraftFrame(7, 3, d, /*verify=*/true));
  EXPECT_EQ(f.header.flags, kFlagVerify | kFlagHasDist);
  EXPECT_EQ(f.header.epoch, 3u);
  const Draft back = DecodeDraft(f.payload, (f.header.flags & kFlagHasDist) != 0);
  EXPECT_EQ(back.start, d.start);
  EXPECT_EQ(back.tokens, d.tokens);
  ASSERT_EQ(back.dists.size(), d.dists.size());
  for (size_t i = 0; i < d.dists.size(); ++i) {
    EXPECT_EQ(back.dists[i].ids, d.dists[i].ids);
    EXPECT_EQ(back.dists[i].probs, d.dists[i].probs);
  }

  Draft plain = d;
  plain.dists.clear();
  const Frame g = RoundTrip(MakeDraftFrame(7, 3, plain, /*verify=*/false));
  EXPECT_EQ(g.header.flags, 0u);
  const Draft back2 = DecodeDraft(g.payload, false);
  EXPECT_EQ(back2.tokens, plain.tokens);
  EXPECT_TRUE(back2.dists.empty());

  Draft none;  // a verify request with no new drafts (the window was streamed before)
  none.start = 10;
  const Frame h = RoundTrip(MakeDraftFrame(7, 3, none, /*verify=*/true));
  EXPECT_EQ(h.header.flags, kFlagVerify);
  EXPECT_TRUE(DecodeDraft(h.payload, false).tokens.empty());
}

TEST(Frame, VerdictRoundTrip) {
  Verdict m;
  m.start = 4096;
  m.drafted = 8;
  m.accepted = 5;
  m.next_token = 77;
  m.verify_ms = 12.5f;
  const Frame f = RoundTrip(MakeFrame(FrameType::kVerdict, 7, 3, EncodeVerdict(m)));
  const Verdict back = DecodeVerdict(f.payload);
  EXPECT_EQ(back.start, m.start);
  EXPECT_EQ(back.drafted, m.drafted);
  EXPECT_EQ(back.accepted, m.accepted);
  EXPECT_EQ(back.next_token, m.next_token);
  EXPECT_EQ(back.verify_ms, m.verify_ms);
}

TEST(Frame, ErrorRoundTrip) {
  Error m;
  m.code = static_cast<uint32_t>(ErrorCode::kTokenizerMismatch);
  m.message = "tokenizer hash abc does not match def";
  const Frame f = RoundTrip(MakeFrame(FrameType::kError, 7, 0, EncodeError(m)));
  const Error back = DecodeError(f.payload);
  EXPECT_EQ(back.code, m.code);
  EXPECT_EQ(back.message, m.message);
  EXPECT_STREQ(ErrorCodeName(static_cast<ErrorCode>(back.code)), "TOKENIZER_MISMATCH");
  // A code this build does not know still decodes: it may come from a newer peer.
  m.code = 1000;
  EXPECT_EQ(DecodeError(EncodeError(m)).code, 1000u);
  EXPECT_STREQ(ErrorCodeName(static_cast<ErrorCode>(1000)), "UNKNOWN");
  // A message that is not UTF-8 is a malformed payload, on either side.
  m.message = "caf\xe9";
  EXPECT_THROW(EncodeError(m), ProtocolError);
  Bytes raw = {1, 0, 0, 0, 4, 0, 0, 0, 'c', 'a', 'f', 0xe9};
  ExpectProtocolError([&] { DecodeError(raw); }, {"ERROR message", "UTF-8"});
}

TEST(Frame, PingPayloadIsCapped) {
  FrameHeader h;
  h.type = FrameType::kPing;
  h.payload_len = kMaxPingPayload;
  ValidateHeader(h);
  h.payload_len = kMaxPingPayload + 1;
  ExpectProtocolError([&] { ValidateHeader(h); }, {"PING", "limit 64"});
  h.type = FrameType::kPong;
  ExpectProtocolError([&] { ValidateHeader(h); }, {"PONG", "limit 64"});
}

TEST(Frame, BadTokenizerHashIsQuotedPrintably) {
  Hello m;
  m.tokenizer_hash = "zz\xff\n";
  ExpectProtocolError([&] { EncodeHello(m); }, {"zz\\xff\\x0a"});
}

TEST(Frame, EmptyPayloadTypes) {
  for (FrameType t : {FrameType::kReset, FrameType::kBye}) {
    const Frame f = RoundTrip(MakeFrame(t, 1, 2));
    EXPECT_EQ(f.header.type, t);
    EXPECT_TRUE(f.payload.empty());
    EXPECT_NO_THROW(CheckEmptyPayload(t, f.payload));
  }
  ExpectProtocolError([] { CheckEmptyPayload(FrameType::kBye, {0}); }, {"BYE", "1 bytes"});
}

TEST(Frame, TypeNames) {
  EXPECT_STREQ(FrameTypeName(FrameType::kHelloOk), "HELLO_OK");
  EXPECT_STREQ(FrameTypeName(static_cast<FrameType>(0)), "UNKNOWN");
  EXPECT_FALSE(IsKnownFrameType(0));
  EXPECT_TRUE(IsKnownFrameType(1));
  EXPECT_TRUE(IsKnownFrameType(11));
  EXPECT_FALSE(IsKnownFrameType(12));
}

// Many frames of every type, serialized back to back and fed in random-sized chunks.
TEST(FrameParser, StreamInRandomChunks) {
  std::mt19937 rng(20240611);
  std::vector<Frame> frames;
  Bytes wire;
  for (int i = 0; i < 2000; ++i) {
    Frame f;
    switch (i % 5) {
      case 0: {
        Draft d = SampleDraft();
        d.start = static_cast<uint64_t>(i);
        d.tokens.resize(rng() % 4);
        d.dists.resize(i % 2 ? 0 : d.tokens.size());
        f = MakeDraftFrame(42, i / 7, d, i % 3 == 0);
        break;
      }
      case 1: {
        Verdict v;
        v.start = i;
        v.drafted = 4;
        v.accepted = rng() % 5;
        f = MakeFrame(FrameType::kVerdict, 42, i / 7, EncodeVerdict(v));
        break;
      }
      case 2: {
        Bytes junk(rng() % 300);  // PING payloads are opaque
        for (uint8_t& b : junk) b = static_cast<uint8_t>(rng());
        f = MakeFrame(FrameType::kPrefill, 42, i / 7, junk);
        break;
      }
      case 3:
        f = MakeFrame(FrameType::kReset, 42, i / 7);
        break;
      default: {
        Prefill p;
        p.tokens.assign(rng() % 50, 3);
        f = MakeFrame(FrameType::kPrefill, 42, i / 7, EncodePrefill(p));
      }
    }
    frames.push_back(f);
    const Bytes b = EncodeFrame(f);
    wire.insert(wire.end(), b.begin(), b.end());
  }

  FrameParser parser;
  std::vector<Frame> got;
  size_t off = 0;
  while (off < wire.size()) {
    // Mostly small cuts (split headers), sometimes several frames at once.
    const size_t n =
        std::min<size_t>(wire.size() - off, rng() % 8 == 0 ? rng() % 4000 : rng() % 40);
    parser.Feed(wire.data() + off, n);
    off += n;
    Frame f;
    while (parser.Next(&f)) got.push_back(f);
  }
  EXPECT_EQ(parser.Buffered(), 0u);
  ASSERT_EQ(got.size(), frames.size());
  for (size_t i = 0; i < frames.size(); ++i) {
    SCOPED_TRACE(i);
    ExpectSameFrame(got[i], frames[i]);
  }
}

TEST(FrameParser, ByteAtATime) {
  const Bytes a = EncodeFrame(MakeDraftFrame(1, 2, SampleDraft(), true));
  const Bytes b = EncodeFrame(MakeFrame(FrameType::kBye, 1, 2));
  Bytes wire = a;
  wire.insert(wire.end(), b.begin(), b.end());
  FrameParser p;
  Frame f;
  int frames = 0;
  for (size_t i = 0; i < wire.size(); ++i) {
    p.Feed(&wire[i], 1);
    if (p.Next(&f)) {
      ++frames;
      // Each frame completes exactly on its last byte.
      EXPECT_TRUE(i + 1 == a.size() || i + 1 == wire.size()) << i;
    }
  }
  EXPECT_EQ(frames, 2);
  EXPECT_EQ(f.header.type, FrameType::kBye);
  p.Feed(nullptr, 0);
  EXPECT_FALSE(p.Next(&f));
}

TEST(FrameParser, PartialFrameIsBuffered) {
  const Bytes wire = EncodeFrame(MakeFrame(FrameType::kPrefill, 1, 1, Bytes(100, 7)));
  FrameParser p;
  p.Feed(wire.data(), wire.size() - 1);
  Frame f;
  EXPECT_FALSE(p.Next(&f));
  EXPECT_EQ(p.Buffered(), wire.size() - 1);  // peer closing now would leave a cut frame
  p.Feed(wire.data() + wire.size() - 1, 1);
  EXPECT_TRUE(p.Next(&f));
  EXPECT_EQ(f.payload, Bytes(100, 7));
}

TEST(FrameParser, BadMagic) {
  FrameHeader h;
  h.magic = 0x50545448;  // "HTTP"
  const Bytes b = HeaderBytes(h);
  FrameParser p;
  // Caught with the header's last byte, before any Next().
  p.Feed(b.data(), kFrameHeaderSize - 1);
  ExpectProtocolError([&] { p.Feed(b.data() + kFrameHeaderSize - 1, 1); },
                      {"magic", "0x50545448", "0x31445350"});
  EXPECT_TRUE(p.failed());
}

TEST(FrameParser, BadVersion) {
  FrameHeader h;
  h.version = 1;  // a peer of the first protocol version
  const Bytes b = HeaderBytes(h);
  FrameParser p;
  ExpectProtocolError([&] { p.Feed(b.data(), b.size()); }, {"version 1", "expected 3"});
  EXPECT_EQ(p.error_code(), ErrorCode::kBadVersion);
}

TEST(FrameParser, UnknownType) {
  for (uint16_t t : {0, 12, 0xffff}) {
    FrameHeader h;
    h.type = static_cast<FrameType>(t);
    const Bytes b = HeaderBytes(h);
    FrameParser p;
    ExpectProtocolError([&] { p.Feed(b.data(), b.size()); },
                        {"frame type " + std::to_string(t), "1..11"});
  }
}

TEST(FrameParser, BadFlags) {
  FrameHeader h;
  h.type = FrameType::kDraft;
  h.flags = 4;
  Bytes b = HeaderBytes(h);
  FrameParser p;
  ExpectProtocolError([&] { p.Feed(b.data(), b.size()); }, {"reserved flag", "0x4"});

  h.type = FrameType::kVerdict;  // the DRAFT flags mean nothing elsewhere
  h.flags = kFlagVerify;
  b = HeaderBytes(h);
  FrameParser q;
  ExpectProtocolError([&] { q.Feed(b.data(), b.size()); }, {"VERDICT", "only DRAFT"});
}

TEST(FrameParser, OversizePayloadRejectedBeforePayloadArrives) {
  FrameHeader h;
  h.type = FrameType::kDraft;
  h.payload_len = 1025;
  const Bytes b = HeaderBytes(h);
  FrameParser p(1024);
  ExpectProtocolError([&] { p.Feed(b.data(), b.size()); }, {"1025", "limit 1024"});

  // The default limit, against a header announcing 4 GiB - 1: rejected on the header alone.
  h.payload_len = 0xffffffffu;
  const Bytes c = HeaderBytes(h);
  FrameParser q;
  ExpectProtocolError([&] { q.Feed(c.data(), c.size()); }, {"4294967295", "16777216"});

  // Exactly at the limit is fine.
  FrameParser r(1024);
  const Bytes ok = EncodeFrame(MakeFrame(FrameType::kPrefill, 0, 0, Bytes(1024, 1)));
  r.Feed(ok.data(), ok.size());
  Frame f;
  EXPECT_TRUE(r.Next(&f));
}

TEST(FrameParser, BadHeaderAfterGoodFrameStillDeliversTheGoodOne) {
  Bytes wire = EncodeFrame(MakeFrame(FrameType::kPing, 1, 1, {9}));
  FrameHeader bad;
  bad.version = 9;
  const Bytes b = HeaderBytes(bad);
  wire.insert(wire.end(), b.begin(), b.end());
  FrameParser p;
  p.Feed(wire.data(), wire.size());  // the bad header is not at the front yet
  Frame f;
  ASSERT_TRUE(p.Next(&f));  // every frame before the bad header is delivered
  EXPECT_EQ(f.payload, Bytes{9});
  ExpectProtocolError([&] { p.Next(&f); }, {"version 9"});
}

TEST(FrameParser, UnusableAfterError) {
  FrameHeader h;
  h.magic = 0;
  const Bytes b = HeaderBytes(h);
  FrameParser p;
  EXPECT_THROW(p.Feed(b.data(), b.size()), ProtocolError);
  const Bytes good = EncodeFrame(MakeFrame(FrameType::kBye, 0, 0));
  Frame f;
  ExpectProtocolError([&] { p.Feed(good.data(), good.size()); }, {"earlier error", "magic"});
  ExpectProtocolError([&] { p.Next(&f); }, {"earlier error"});
  EXPECT_EQ(p.Buffered(), 0u);
}

// ---- Truncated and inconsistent payloads.

TEST(FramePayload, EveryTruncationOfEveryTypeThrows) {
  Hello hello;
  hello.auth_token = "tok";
  hello.tokenizer_hash = "ab";
  HelloOk ok;
  ok.model_fingerprint = "fp";
  Prefill prefill;
  prefill.tokens = {1, 2, 3};
  Verdict verdict;
  verdict.drafted = 1;
  Error error;
  error.message = "boom";
  const std::vector<std::pair<Bytes, std::function<void(const Bytes&)>>> cases = {
      {EncodeHello(hello), [](const Bytes& b) { DecodeHello(b); }},
      {EncodeHelloOk(ok), [](const Bytes& b) { DecodeHelloOk(b); }},
      {EncodePrefill(prefill), [](const Bytes& b) { DecodePrefill(b); }},
      {EncodeDraft(SampleDraft()), [](const Bytes& b) { DecodeDraft(b, true); }},
      {EncodeVerdict(verdict), [](const Bytes& b) { DecodeVerdict(b); }},
      {EncodeError(error), [](const Bytes& b) { DecodeError(b); }},
  };
  for (const auto& [full, decode] : cases) {
    EXPECT_NO_THROW(decode(full));
    for (size_t n = 0; n < full.size(); ++n) {
      SCOPED_TRACE(n);
      EXPECT_THROW(decode(Bytes(full.begin(), full.begin() + n)), ProtocolError);
    }
    Bytes longer = full;  // a trailing byte is as wrong as a missing one
    longer.push_back(0);
    ExpectProtocolError([&] { decode(longer); }, {"1 trailing bytes"});
  }
}

// Overwrites the little-endian u32 at offset `at`.
void PokeU32(Bytes* b, size_t at, uint32_t v) {
  for (int i = 0; i < 4; ++i) (*b)[at + i] = static_cast<uint8_t>(v >> (8 * i));
}

TEST(FramePayload, DraftTokenCountBeyondPayload) {
  Draft d;
  d.tokens = {1, 2};
  Bytes b = EncodeDraft(d);  // start u64, count u32 @8, tokens
  PokeU32(&b, 8, 3);
  ExpectProtocolError([&] { DecodeDraft(b, false); }, {"DRAFT", "tokens count 3", "8 remain"});
  PokeU32(&b, 8, 0xffffffffu);  // would be a 16 GiB allocation if trusted
  ExpectProtocolError([&] { DecodeDraft(b, false); }, {"tokens count 4294967295"});
}

TEST(FramePayload, DraftDistMismatch) {
  const Draft d = SampleDraft();
  const Bytes with = EncodeDraft(d);
  Draft plain = d;
  plain.dists.clear();
  const Bytes without = EncodeDraft(plain);
  // Flag says dists but none are present: one per token is required.
  ExpectProtocolError([&] { DecodeDraft(without, true); }, {"4 tokens need 4 dists"});
  // Dists present but the flag is clear: they are trailing garbage.
  ExpectProtocolError([&] { DecodeDraft(with, false); }, {"trailing bytes"});
  // A dist whose entry count runs past the payload.
  Bytes b = with;
  PokeU32(&b, 8 + 4 + 4 * 4, 1000);  // the first dist's count
  ExpectProtocolError([&] { DecodeDraft(b, true); }, {"dist entries count 1000"});
  // Encoders refuse what decoders would refuse.
  Draft short_dists = d;
  short_dists.dists.pop_back();
  ExpectProtocolError([&] { EncodeDraft(short_dists); }, {"3 dists for 4 tokens"});
  Draft ragged = d;
  ragged.dists[1].probs.push_back(0.5f);
  ExpectProtocolError([&] { EncodeDraft(ragged); }, {"dist 1 has 1 ids but 2 probs"});
}

TEST(FramePayload, DraftValues) {
  Draft d = SampleDraft();
  d.dists[0].probs[0] = 1.5f;
  ExpectProtocolError([&] { EncodeDraft(d); }, {"probability 1.5"});
  Bytes b = EncodeDraft(SampleDraft());
  PokeU32(&b, 8 + 4, 0xffffffffu);  // first token -> -1
  ExpectProtocolError([&] { DecodeDraft(b, true); }, {"token id -1"});
}

TEST(FramePayload, SemanticChecks) {
  Hello h;
  h.tokenizer_hash = "not-hex";
  ExpectProtocolError([&] { EncodeHello(h); }, {"not-hex"});
  h.tokenizer_hash = "00";
  h.min_version = 3;
  h.max_version = 2;
  ExpectProtocolError([&] { EncodeHello(h); }, {"[3, 2]"});

  Prefill p;
  p.top_p = 0.0f;
  ExpectProtocolError([&] { EncodePrefill(p); }, {"top_p"});
  p.top_p = 1.0f;
  p.seed = -2;
  ExpectProtocolError([&] { EncodePrefill(p); }, {"seed", "-2"});

  Verdict v;
  v.drafted = 2;
  v.accepted = 3;
  ExpectProtocolError([&] { EncodeVerdict(v); }, {"accepts 3 of 2"});
  v.accepted = 2;
  Bytes b = EncodeVerdict(v);
  PokeU32(&b, 8 + 4, 5);  // accepted > drafted on the wire
  ExpectProtocolError([&] { DecodeVerdict(b); }, {"accepts 5 of 2"});

  Bytes s = EncodeError(Error{1, "x"});
  PokeU32(&s, 4, 2);  // message length past the end
  ExpectProtocolError([&] { DecodeError(s); }, {"message count 2", "1 remain"});
}

// ---- Fuzzing: whatever arrives, only ProtocolError comes out.

// Parses `wire` fed in random chunks and decodes every frame's payload by type. Returns whether
// it ended in a ProtocolError; any other exception fails the test.
bool ParseAndDecodeAll(const Bytes& wire, std::mt19937* rng, uint32_t max_payload) {
  FrameParser p(max_payload);
  try {
    size_t off = 0;
    while (off < wire.size()) {
      const size_t n = std::min<size_t>(wire.size() - off, 1 + (*rng)() % 64);
      p.Feed(wire.data() + off, n);
      off += n;
      Frame f;
      while (p.Next(&f)) {
        try {
          switch (f.header.type) {
            case FrameType::kHello:
              DecodeHello(f.payload);
              break;
            case FrameType::kHelloOk:
              DecodeHelloOk(f.payload);
              break;
            case FrameType::kPrefill:
              DecodePrefill(f.payload);
              break;
            case FrameType::kDraft:
              DecodeDraft(f.payload, (f.header.flags & kFlagHasDist) != 0);
              break;
            case FrameType::kVerdict:
              DecodeVerdict(f.payload);
              break;
            case FrameType::kError:
              DecodeError(f.payload);
              break;
            case FrameType::kReset:
            case FrameType::kBye:
              CheckEmptyPayload(f.header.type, f.payload);
              break;
            case FrameType::kCosts:
              DecodeCosts(f.payload);
              break;
            case FrameType::kPing:
            case FrameType::kPong:
              break;
          }
        } catch (const ProtocolError&) {
          // A bad payload does not break framing; parsing goes on.
        }
      }
    }
  } catch (const ProtocolError&) {
    return true;
  }
  return false;
}

TEST(FrameFuzz, RandomBytesOnlyThrowProtocolError) {
  std::mt19937 rng(7);
  int errors = 0;
  for (int i = 0; i < 3000; ++i) {
    Bytes wire(rng() % 200);
    for (uint8_t& b : wire) b = static_cast<uint8_t>(rng());
    // Half the inputs start with a valid header (random type, flags, length that may overrun
    // the bytes present) so that the payload decoders and later headers get exercised too.
    if (i % 2 == 0 && wire.size() >= kFrameHeaderSize) {
      FrameHeader h;
      h.type = static_cast<FrameType>(1 + rng() % 11);
      h.flags = h.type == FrameType::kDraft ? rng() % 4 : 0;
      h.payload_len = static_cast<uint32_t>(rng() % (wire.size() - kFrameHeaderSize + 8));
      EncodeHeader(h, wire.data());
    }
    EXPECT_NO_THROW(errors += ParseAndDecodeAll(wire, &rng, 256));
  }
  EXPECT_GT(errors, 0);
}

TEST(FrameFuzz, MutatedValidStreamsOnlyThrowProtocolError) {
  std::mt19937 rng(11);
  Bytes valid;
  Hello hello;
  hello.tokenizer_hash = "beef";
  Prefill prefill;
  prefill.tokens = {1, 2, 3, 4};
  Verdict verdict;
  verdict.drafted = 3;
  verdict.accepted = 1;
  for (const Frame& f : {MakeFrame(FrameType::kHello, 0, 0, EncodeHello(hello)),
                         MakeFrame(FrameType::kHelloOk, 5, 0, EncodeHelloOk(HelloOk{5, "m", 99})),
                         MakeFrame(FrameType::kPrefill, 5, 1, EncodePrefill(prefill)),
                         MakeDraftFrame(5, 1, SampleDraft(), true),
                         MakeFrame(FrameType::kVerdict, 5, 1, EncodeVerdict(verdict)),
                         MakeFrame(FrameType::kError, 5, 1, EncodeError(Error{8, "internal"})),
                         MakeFrame(FrameType::kBye, 5, 1)}) {
    const Bytes b = EncodeFrame(f);
    valid.insert(valid.end(), b.begin(), b.end());
  }
  ASSERT_FALSE(ParseAndDecodeAll(valid, &rng, kDefaultMaxPayload));
  for (int i = 0; i < 3000; ++i) {
    Bytes wire = valid;
    const int flips = 1 + rng() % 4;
    for (int k = 0; k < flips; ++k) {
      uint8_t& byte = wire[rng() % wire.size()];
      // Mostly bit flips; sometimes a 0xff that turns a small count into a huge one.
      byte = rng() % 4 == 0 ? 0xff : static_cast<uint8_t>(byte ^ (1u << (rng() % 8)));
    }
    if (rng() % 4 == 0) wire.resize(rng() % wire.size());
    EXPECT_NO_THROW(ParseAndDecodeAll(wire, &rng, kDefaultMaxPayload));
  }
}

TEST(FrameFuzz, RandomPayloadsToEveryDecoder) {
  std::mt19937 rng(13);
  for (int i = 0; i < 3000; ++i) {
    Bytes b(rng() % 64);
    for (uint8_t& x : b) x = static_cast<uint8_t>(rng() % 3 == 0 ? rng() % 4 : rng());
    const auto only_protocol = [&](const std::function<void()>& fn) {
      try {
        fn();
      } catch (const ProtocolError&) {
      }
    };
    EXPECT_NO_THROW(only_protocol([&] { DecodeHello(b); }));
    EXPECT_NO_THROW(only_protocol([&] { DecodeHelloOk(b); }));
    EXPECT_NO_THROW(only_protocol([&] { DecodePrefill(b); }));
    EXPECT_NO_THROW(only_protocol([&] { DecodeDraft(b, true); }));
    EXPECT_NO_THROW(only_protocol([&] { DecodeDraft(b, false); }));
    EXPECT_NO_THROW(only_protocol([&] { DecodeVerdict(b); }));
    EXPECT_NO_THROW(only_protocol([&] { DecodeError(b); }));
  }
}

}  // namespace
}  // namespace pipesd
