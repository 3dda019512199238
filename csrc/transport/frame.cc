#include "pipesd/frame.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <utility>

#include "pipesd/errors.h"

namespace pipesd {
namespace {

// Byte-wise little-endian access: independent of the host's byte order and of alignment.
void PutLe(uint8_t* p, uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}

uint64_t GetLe(const uint8_t* p, int bytes) {
  uint64_t v = 0;
  for (int i = 0; i < bytes; ++i) v |= static_cast<uint64_t>(p[i]) << (8 * i);
  return v;
}

uint32_t FloatBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

float BitsFloat(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

class Writer {
 public:
  void U16(uint16_t v) { Put(v, 2); }
  void U32(uint32_t v) { Put(v, 4); }
  void U64(uint64_t v) { Put(v, 8); }
  void I32(int32_t v) { Put(static_cast<uint32_t>(v), 4); }
  void I64(int64_t v) { Put(static_cast<uint64_t>(v), 8); }
  void F32(float v) { Put(FloatBits(v), 4); }
  void Count(size_t n, const char* field) {
    PIPESD_CHECK(n <= std::numeric_limits<uint32_t>::max(), ProtocolError,
                 field << " has " << n << " elements; the wire allows at most 2^32 - 1");
    U32(static_cast<uint32_t>(n));
  }
  void Str(const std::string& s, const char* field) {
    Count(s.size(), field);
    out_.insert(out_.end(), s.begin(), s.end());
  }
  std::vector<uint8_t> Take() { return std::move(out_); }

 private:
  void Put(uint64_t v, int bytes) {
    const size_t at = out_.size();
    out_.resize(at + bytes);
    PutLe(out_.data() + at, v, bytes);
  }
  std::vector<uint8_t> out_;
};

// Reads fields from an untrusted payload. Every read is checked against the bytes remaining.
class Reader {
 public:
  Reader(const std::vector<uint8_t>& payload, const char* type)
      : p_(payload.data()), n_(payload.size()), type_(type) {}

  size_t remaining() const { return n_ - off_; }

  uint16_t U16(const char* field) { return static_cast<uint16_t>(Get(2, field)); }
  uint32_t U32(const char* field) { return static_cast<uint32_t>(Get(4, field)); }
  uint64_t U64(const char* field) { return Get(8, field); }
  int32_t I32(const char* field) { return static_cast<int32_t>(U32(field)); }
  int64_t I64(const char* field) { return static_cast<int64_t>(U64(field)); }
  float F32(const char* field) { return BitsFloat(U32(field)); }

  // A u32 element count whose elements take at least elem_size bytes each: a count the
  // remaining bytes cannot hold is rejected before anything is allocated for it.
  uint32_t Count(size_t elem_size, const char* field) {
    const uint32_t n = U32(field);
    PIPESD_CHECK(n <= remaining() / elem_size, ProtocolError,
                 type_ << " payload inconsistent: " << field << " count " << n << " needs at least "
                       << static_cast<uint64_t>(n) * elem_size << " bytes, only " << remaining()
                       << " remain");
    return n;
  }

  std::string Str(const char* field) {
    const uint32_t n = Count(1, field);
    if (n == 0) return {};  // an empty payload's data() may be null
    std::string s(reinterpret_cast<const char*>(p_ + off_), n);
    off_ += n;
    return s;
  }

  void End() {
    PIPESD_CHECK(remaining() == 0, ProtocolError,
                 type_ << " payload inconsistent: " << remaining()
                       << " trailing bytes after the last field");
  }

 private:
  uint64_t Get(int bytes, const char* field) {
    PIPESD_CHECK(static_cast<size_t>(bytes) <= remaining(), ProtocolError,
                 type_ << " payload truncated: " << field << " needs " << bytes << " bytes, only "
                       << remaining() << " remain");
    const uint64_t v = GetLe(p_ + off_, bytes);
    off_ += bytes;
    return v;
  }

  const uint8_t* p_;
  size_t n_;
  size_t off_ = 0;
  const char* type_;
};

// Peer bytes as they may appear in an error message: printable ASCII kept, the rest as \xNN,
// cut after max_bytes.
std::string Printable(const std::string& s, size_t max_bytes) {
  static const char kHex[] = "0123456789abcdef";
  std::string out;
  for (size_t i = 0; i < s.size() && i < max_bytes; ++i) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c >= 0x20 && c < 0x7F && c != '\\') {
      out += static_cast<char>(c);
    } else {
      out += "\\x";
      out += kHex[c >> 4];
      out += kHex[c & 15];
    }
  }
  if (s.size() > max_bytes) out += "...";
  return out;
}

void CheckUtf8(const std::string& s, const char* field) {
  PIPESD_CHECK(IsValidUtf8(s), ProtocolError, field << " is not valid UTF-8");
}

bool IsHex(const std::string& s) {
  for (char c : s) {
    const bool hex = (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
    if (!hex) return false;
  }
  return true;
}

// Checks shared by encoder and decoder: what one side refuses to send, the other refuses to
// accept, so a round trip never fails on the receiving side only.
void CheckHello(const Hello& m) {
  PIPESD_CHECK(
      IsHex(m.tokenizer_hash), ProtocolError,
      "HELLO tokenizer_hash must be hex digits, got \"" << Printable(m.tokenizer_hash, 64) << "\"");
  PIPESD_CHECK(m.min_version >= 1 && m.min_version <= m.max_version, ProtocolError,
               "HELLO version range [" << m.min_version << ", " << m.max_version
                                       << "] is empty or starts below 1");
}

void CheckTokens(const std::vector<int32_t>& tokens, const char* type) {
  for (int32_t t : tokens) PIPESD_CHECK(t >= 0, ProtocolError, type << " carries token id " << t);
}

void CheckPrefill(const Prefill& m) {
  PIPESD_CHECK(std::isfinite(m.temperature) && m.temperature >= 0.0f, ProtocolError,
               "PREFILL temperature must be finite and >= 0, got " << m.temperature);
  PIPESD_CHECK(m.top_k >= 0, ProtocolError,
               "PREFILL top_k must be >= 0 (0 = off), got " << m.top_k);
  PIPESD_CHECK(std::isfinite(m.top_p) && m.top_p > 0.0f && m.top_p <= 1.0f, ProtocolError,
               "PREFILL top_p must be in (0, 1], got " << m.top_p);
  PIPESD_CHECK(m.seed >= -1, ProtocolError,
               "PREFILL seed must be >= 0, or -1 for none, got " << m.seed);
  CheckTokens(m.tokens, "PREFILL");
}

void CheckDist(const SparseDist& d, size_t i) {
  PIPESD_CHECK(
      d.ids.size() == d.probs.size(), ProtocolError,
      "DRAFT dist " << i << " has " << d.ids.size() << " ids but " << d.probs.size() << " probs");
  for (int32_t id : d.ids)
    PIPESD_CHECK(id >= 0, ProtocolError, "DRAFT dist " << i << " carries token id " << id);
  for (float p : d.probs) {
    PIPESD_CHECK(std::isfinite(p) && p >= 0.0f && p <= 1.0f, ProtocolError,
                 "DRAFT dist " << i << " carries probability " << p << ", expected [0, 1]");
  }
}

void CheckDraft(const Draft& m) {
  CheckTokens(m.tokens, "DRAFT");
  PIPESD_CHECK(m.dists.empty() || m.dists.size() == m.tokens.size(), ProtocolError,
               "DRAFT has " << m.dists.size() << " dists for " << m.tokens.size()
                            << " tokens; expected none or one per token");
  for (size_t i = 0; i < m.dists.size(); ++i) CheckDist(m.dists[i], i);
}

void CheckCosts(const CostTable& m, const char* what) {
  for (size_t i = 0; i < m.verify_ms.size(); ++i) {
    const float v = m.verify_ms[i];
    PIPESD_CHECK(std::isfinite(v) && v >= 0.0f, ProtocolError,
                 what << " cost of a pass of " << i + 1 << " tokens is " << v
                      << " ms, expected finite and >= 0");
  }
}

void WriteCosts(Writer& w, const CostTable& m, const char* what) {
  CheckCosts(m, what);
  w.Count(m.verify_ms.size(), what);
  for (float v : m.verify_ms) w.F32(v);
}

CostTable ReadCosts(Reader& r, const char* what) {
  CostTable m;
  const uint32_t n = r.Count(4, "verify_ms");
  m.verify_ms.resize(n);
  for (uint32_t i = 0; i < n; ++i) m.verify_ms[i] = r.F32("verify_ms");
  CheckCosts(m, what);
  return m;
}

void CheckVerdict(const Verdict& m) {
  PIPESD_CHECK(m.accepted <= m.drafted, ProtocolError,
               "VERDICT accepts " << m.accepted << " of " << m.drafted << " drafts");
  PIPESD_CHECK(m.next_token >= 0, ProtocolError, "VERDICT carries token id " << m.next_token);
  PIPESD_CHECK(std::isfinite(m.verify_ms) && m.verify_ms >= 0.0f, ProtocolError,
               "VERDICT verify_ms must be finite and >= 0, got " << m.verify_ms);
}

}  // namespace

const char* FrameTypeName(FrameType type) {
  switch (type) {
    case FrameType::kHello:
      return "HELLO";
    case FrameType::kHelloOk:
      return "HELLO_OK";
    case FrameType::kPrefill:
      return "PREFILL";
    case FrameType::kDraft:
      return "DRAFT";
    case FrameType::kVerdict:
      return "VERDICT";
    case FrameType::kReset:
      return "RESET";
    case FrameType::kBye:
      return "BYE";
    case FrameType::kError:
      return "ERROR";
    case FrameType::kPing:
      return "PING";
    case FrameType::kPong:
      return "PONG";
    case FrameType::kCosts:
      return "COSTS";
  }
  return "UNKNOWN";
}

const char* ErrorCodeName(ErrorCode code) {
  switch (code) {
    case ErrorCode::kBadFrame:
      return "BAD_FRAME";
    case ErrorCode::kBadVersion:
      return "BAD_VERSION";
    case ErrorCode::kAuthFailed:
      return "AUTH_FAILED";
    case ErrorCode::kTokenizerMismatch:
      return "TOKENIZER_MISMATCH";
    case ErrorCode::kUnknownSession:
      return "UNKNOWN_SESSION";
    case ErrorCode::kStaleEpoch:
      return "STALE_EPOCH";
    case ErrorCode::kTooLong:
      return "TOO_LONG";
    case ErrorCode::kInternal:
      return "INTERNAL";
    case ErrorCode::kTimeout:
      return "TIMEOUT";
    case ErrorCode::kOverloaded:
      return "OVERLOADED";
    case ErrorCode::kBusy:
      return "BUSY";
  }
  return "UNKNOWN";
}

bool IsKnownFrameType(uint16_t type) {
  return type >= static_cast<uint16_t>(FrameType::kHello) &&
         type <= static_cast<uint16_t>(FrameType::kCosts);
}

void EncodeHeader(const FrameHeader& h, uint8_t* out32) {
  PutLe(out32 + 0, h.magic, 4);
  PutLe(out32 + 4, h.version, 2);
  PutLe(out32 + 6, static_cast<uint16_t>(h.type), 2);
  PutLe(out32 + 8, h.flags, 4);
  PutLe(out32 + 12, h.session, 8);
  PutLe(out32 + 20, h.epoch, 8);
  PutLe(out32 + 28, h.payload_len, 4);
}

FrameHeader DecodeHeader(const uint8_t* in32) {
  FrameHeader h;
  h.magic = static_cast<uint32_t>(GetLe(in32 + 0, 4));
  h.version = static_cast<uint16_t>(GetLe(in32 + 4, 2));
  h.type = static_cast<FrameType>(GetLe(in32 + 6, 2));
  h.flags = static_cast<uint32_t>(GetLe(in32 + 8, 4));
  h.session = GetLe(in32 + 12, 8);
  h.epoch = GetLe(in32 + 20, 8);
  h.payload_len = static_cast<uint32_t>(GetLe(in32 + 28, 4));
  return h;
}

void ValidateHeader(const FrameHeader& h, uint32_t max_payload) {
  PIPESD_CHECK(h.magic == kFrameMagic, ProtocolError,
               "bad frame magic 0x" << std::hex << h.magic << ", expected 0x" << kFrameMagic
                                    << " (\"PSD1\")");
  PIPESD_CHECK(h.version == kProtocolVersion, ProtocolError,
               "unsupported protocol version " << h.version << ", expected " << kProtocolVersion);
  const uint16_t type = static_cast<uint16_t>(h.type);
  PIPESD_CHECK(IsKnownFrameType(type), ProtocolError,
               "unknown frame type " << type << ", expected 1.."
                                     << static_cast<uint16_t>(FrameType::kCosts));
  PIPESD_CHECK((h.flags & ~kKnownFlags) == 0, ProtocolError,
               "reserved flag bits set in " << FrameTypeName(h.type) << " frame: flags 0x"
                                            << std::hex << h.flags << ", known bits 0x"
                                            << kKnownFlags);
  PIPESD_CHECK(h.flags == 0 || h.type == FrameType::kDraft, ProtocolError,
               "flags 0x" << std::hex << h.flags << " on a " << FrameTypeName(h.type)
                          << " frame; only DRAFT frames carry flags");
  PIPESD_CHECK(h.payload_len <= max_payload, ProtocolError,
               FrameTypeName(h.type) << " frame announces a payload of " << h.payload_len
                                     << " bytes, limit " << max_payload);
  PIPESD_CHECK((h.type != FrameType::kPing && h.type != FrameType::kPong) ||
                   h.payload_len <= kMaxPingPayload,
               ProtocolError,
               FrameTypeName(h.type) << " frame announces a payload of " << h.payload_len
                                     << " bytes, limit " << kMaxPingPayload);
}

bool IsValidUtf8(const std::string& s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const size_t n = s.size();
  size_t i = 0;
  while (i < n) {
    const unsigned char c = p[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    size_t len;
    uint32_t cp;
    if (c >= 0xC2 && c <= 0xDF) {
      len = 2;
      cp = c & 0x1F;
    } else if (c >= 0xE0 && c <= 0xEF) {
      len = 3;
      cp = c & 0x0F;
    } else if (c >= 0xF0 && c <= 0xF4) {
      len = 4;
      cp = c & 0x07;
    } else {
      return false;  // a continuation byte, an overlong lead (C0, C1) or past F4
    }
    if (n - i < len) return false;
    for (size_t k = 1; k < len; ++k) {
      if ((p[i + k] & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (p[i + k] & 0x3F);
    }
    const uint32_t min = len == 2 ? 0x80 : len == 3 ? 0x800 : 0x10000;
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    i += len;
  }
  return true;
}

std::vector<uint8_t> EncodeFrame(const Frame& frame) {
  PIPESD_CHECK(frame.payload.size() <= std::numeric_limits<uint32_t>::max(), ProtocolError,
               "payload of " << frame.payload.size() << " bytes does not fit a u32 length");
  std::vector<uint8_t> out(kFrameHeaderSize + frame.payload.size());
  FrameHeader h = frame.header;
  h.payload_len = static_cast<uint32_t>(frame.payload.size());
  EncodeHeader(h, out.data());
  if (!frame.payload.empty()) {
    std::memcpy(out.data() + kFrameHeaderSize, frame.payload.data(), frame.payload.size());
  }
  return out;
}

Frame MakeFrame(FrameType type, uint64_t session, uint64_t epoch, std::vector<uint8_t> payload,
                uint32_t flags) {
  PIPESD_CHECK(payload.size() <= std::numeric_limits<uint32_t>::max(), ProtocolError,
               "payload of " << payload.size() << " bytes does not fit a u32 length");
  Frame f;
  f.header.type = type;
  f.header.flags = flags;
  f.header.session = session;
  f.header.epoch = epoch;
  f.header.payload_len = static_cast<uint32_t>(payload.size());
  f.payload = std::move(payload);
  return f;
}

// ---- FrameParser

FrameParser::FrameParser(uint32_t max_payload) : max_payload_(max_payload) {}

void FrameParser::Fail(const std::string& what) {
  failed_ = true;
  error_ = what;
  buf_.clear();
  buf_.shrink_to_fit();
  pos_ = 0;
  throw ProtocolError(what);
}

void FrameParser::ThrowIfFailed() const {
  PIPESD_CHECK(!failed_, ProtocolError, "frame parser unusable after an earlier error: " << error_);
}

void FrameParser::CheckPendingHeader() {
  if (have_header_ || Buffered() < kFrameHeaderSize) return;
  const FrameHeader h = DecodeHeader(buf_.data() + pos_);
  try {
    ValidateHeader(h, max_payload_);
  } catch (const ProtocolError& e) {
    // The same order as ValidateHeader: the first check that failed names the code.
    if (h.magic == kFrameMagic && h.version != kProtocolVersion) {
      error_code_ = ErrorCode::kBadVersion;
    } else if (h.magic == kFrameMagic &&
               (h.payload_len > max_payload_ ||
                ((h.type == FrameType::kPing || h.type == FrameType::kPong) &&
                 h.payload_len > kMaxPingPayload)) &&
               IsKnownFrameType(static_cast<uint16_t>(h.type)) && (h.flags & ~kKnownFlags) == 0 &&
               (h.flags == 0 || h.type == FrameType::kDraft)) {
      error_code_ = ErrorCode::kTooLong;
    }
    Fail(e.what());
  }
  header_ = h;
  have_header_ = true;
}

void FrameParser::Feed(const uint8_t* data, size_t n) {
  ThrowIfFailed();
  if (n == 0) return;
  // Reclaim consumed bytes once they are at least half the buffer: each byte is moved a bounded
  // number of times, so parsing stays linear however the stream is cut.
  if (pos_ > 0 && pos_ >= buf_.size() - pos_) {
    buf_.erase(buf_.begin(), buf_.begin() + static_cast<std::ptrdiff_t>(pos_));
    pos_ = 0;
  }
  buf_.insert(buf_.end(), data, data + n);
  CheckPendingHeader();
}

bool FrameParser::Next(Frame* out) {
  ThrowIfFailed();
  CheckPendingHeader();
  if (!have_header_) return false;
  const size_t len = header_.payload_len;
  if (Buffered() - kFrameHeaderSize < len) return false;
  const uint8_t* payload = buf_.data() + pos_ + kFrameHeaderSize;
  out->header = header_;
  out->payload.assign(payload, payload + len);
  pos_ += kFrameHeaderSize + len;
  have_header_ = false;
  if (pos_ == buf_.size()) {
    buf_.clear();
    pos_ = 0;
  }
  // The following header is checked by the next call, not now: throwing here would lose the
  // frame just returned in *out.
  return true;
}

// ---- Typed payloads

std::vector<uint8_t> EncodeHello(const Hello& m) {
  CheckHello(m);
  Writer w;
  w.Str(m.auth_token, "HELLO auth_token");
  w.U32(m.vocab_size);
  w.Str(m.tokenizer_hash, "HELLO tokenizer_hash");
  w.U16(m.min_version);
  w.U16(m.max_version);
  return w.Take();
}

Hello DecodeHello(const std::vector<uint8_t>& payload) {
  Reader r(payload, "HELLO");
  Hello m;
  m.auth_token = r.Str("auth_token");
  m.vocab_size = r.U32("vocab_size");
  m.tokenizer_hash = r.Str("tokenizer_hash");
  m.min_version = r.U16("min_version");
  m.max_version = r.U16("max_version");
  r.End();
  CheckHello(m);
  return m;
}

std::vector<uint8_t> EncodeHelloOk(const HelloOk& m) {
  CheckUtf8(m.model_fingerprint, "HELLO_OK model_fingerprint");
  Writer w;
  w.U64(m.session);
  w.Str(m.model_fingerprint, "HELLO_OK model_fingerprint");
  w.U32(m.max_ctx);
  w.U32(m.max_window);
  w.U32(m.max_dist);
  WriteCosts(w, m.costs, "HELLO_OK verify_ms");
  return w.Take();
}

HelloOk DecodeHelloOk(const std::vector<uint8_t>& payload) {
  Reader r(payload, "HELLO_OK");
  HelloOk m;
  m.session = r.U64("session");
  m.model_fingerprint = r.Str("model_fingerprint");
  m.max_ctx = r.U32("max_ctx");
  m.max_window = r.U32("max_window");
  m.max_dist = r.U32("max_dist");
  m.costs = ReadCosts(r, "HELLO_OK verify_ms");
  r.End();
  CheckUtf8(m.model_fingerprint, "HELLO_OK model_fingerprint");
  return m;
}

std::vector<uint8_t> EncodePrefill(const Prefill& m) {
  CheckPrefill(m);
  Writer w;
  w.F32(m.temperature);
  w.I32(m.top_k);
  w.F32(m.top_p);
  w.I64(m.seed);
  w.Count(m.tokens.size(), "PREFILL tokens");
  for (int32_t t : m.tokens) w.I32(t);
  return w.Take();
}

Prefill DecodePrefill(const std::vector<uint8_t>& payload) {
  Reader r(payload, "PREFILL");
  Prefill m;
  m.temperature = r.F32("temperature");
  m.top_k = r.I32("top_k");
  m.top_p = r.F32("top_p");
  m.seed = r.I64("seed");
  const uint32_t n = r.Count(4, "tokens");
  m.tokens.resize(n);
  for (uint32_t i = 0; i < n; ++i) m.tokens[i] = r.I32("token");
  r.End();
  CheckPrefill(m);
  return m;
}

std::vector<uint8_t> EncodeDraft(const Draft& m) {
  CheckDraft(m);
  Writer w;
  w.U64(m.start);
  w.Count(m.tokens.size(), "DRAFT tokens");
  for (int32_t t : m.tokens) w.I32(t);
  for (const SparseDist& d : m.dists) {
    w.Count(d.ids.size(), "DRAFT dist");
    for (int32_t id : d.ids) w.I32(id);
    for (float p : d.probs) w.F32(p);
  }
  return w.Take();
}

Draft DecodeDraft(const std::vector<uint8_t>& payload, bool has_dist) {
  Reader r(payload, "DRAFT");
  Draft m;
  m.start = r.U64("start");
  const uint32_t n = r.Count(4, "tokens");
  m.tokens.resize(n);
  for (uint32_t i = 0; i < n; ++i) m.tokens[i] = r.I32("token");
  if (has_dist && n > 0) {
    // Every dist takes at least its 4-byte count, which bounds the allocation below.
    PIPESD_CHECK(n <= r.remaining() / 4, ProtocolError,
                 "DRAFT payload inconsistent: " << n << " tokens need " << n
                                                << " dists of at least 4 bytes, only "
                                                << r.remaining() << " bytes remain");
    m.dists.resize(n);
    for (SparseDist& d : m.dists) {
      const uint32_t k = r.Count(8, "dist entries");
      d.ids.resize(k);
      d.probs.resize(k);
      for (uint32_t j = 0; j < k; ++j) d.ids[j] = r.I32("dist id");
      for (uint32_t j = 0; j < k; ++j) d.probs[j] = r.F32("dist prob");
    }
  }
  r.End();
  CheckDraft(m);
  return m;
}

Frame MakeDraftFrame(uint64_t session, uint64_t epoch, const Draft& m, bool verify) {
  const uint32_t flags = (verify ? kFlagVerify : 0u) | (m.dists.empty() ? 0u : kFlagHasDist);
  return MakeFrame(FrameType::kDraft, session, epoch, EncodeDraft(m), flags);
}

std::vector<uint8_t> EncodeVerdict(const Verdict& m) {
  CheckVerdict(m);
  Writer w;
  w.U64(m.start);
  w.U32(m.drafted);
  w.U32(m.accepted);
  w.I32(m.next_token);
  w.F32(m.verify_ms);
  return w.Take();
}

Verdict DecodeVerdict(const std::vector<uint8_t>& payload) {
  Reader r(payload, "VERDICT");
  Verdict m;
  m.start = r.U64("start");
  m.drafted = r.U32("drafted");
  m.accepted = r.U32("accepted");
  m.next_token = r.I32("next_token");
  m.verify_ms = r.F32("verify_ms");
  r.End();
  CheckVerdict(m);
  return m;
}

std::vector<uint8_t> EncodeCosts(const CostTable& m) {
  Writer w;
  WriteCosts(w, m, "COSTS verify_ms");
  return w.Take();
}

CostTable DecodeCosts(const std::vector<uint8_t>& payload) {
  Reader r(payload, "COSTS");
  CostTable m = ReadCosts(r, "COSTS verify_ms");
  r.End();
  return m;
}

std::vector<uint8_t> EncodeError(const Error& m) {
  CheckUtf8(m.message, "ERROR message");
  Writer w;
  w.U32(m.code);
  w.Str(m.message, "ERROR message");
  return w.Take();
}

Error DecodeError(const std::vector<uint8_t>& payload) {
  Reader r(payload, "ERROR");
  Error m;
  m.code = r.U32("code");
  m.message = r.Str("message");
  r.End();
  CheckUtf8(m.message, "ERROR message");
  return m;
}

void CheckEmptyPayload(FrameType type, const std::vector<uint8_t>& payload) {
  PIPESD_CHECK(payload.empty(), ProtocolError,
               FrameTypeName(type) << " payload must be empty, got " << payload.size() << " bytes");
}

}  // namespace pipesd
