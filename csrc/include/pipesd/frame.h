// The PipeSD wire format: a fixed 32-byte little-endian header followed by a typed payload.
// docs/protocol.md is the normative description; this header is its implementation.
//
// Everything read from the wire is untrusted: decoders and the parser throw ProtocolError on
// anything malformed, bound every count by the bytes actually present (so a forged length never
// causes a large allocation), and never read out of bounds.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace pipesd {

constexpr uint32_t kFrameMagic = 0x31445350;  // the bytes "PSD1" read as a little-endian u32
constexpr uint16_t kProtocolVersion = 3;
constexpr size_t kFrameHeaderSize = 32;
constexpr uint32_t kDefaultMaxPayload = 16u << 20;  // 16 MiB
// PING and PONG carry a small opaque payload (a timestamp): anything longer is refused in the
// header, so a flood of pings can never make a peer queue large echoes.
constexpr uint32_t kMaxPingPayload = 64;

enum class FrameType : uint16_t {
  kHello = 1,
  kHelloOk = 2,
  kPrefill = 3,
  kDraft = 4,
  kVerdict = 5,
  kReset = 6,
  kBye = 7,
  kError = 8,
  kPing = 9,
  kPong = 10,
  kCosts = 11,
};

// Header flags. Both are meaningful on DRAFT frames only; every other bit is reserved and must
// be zero, so that a future meaning can never be silently ignored by an old peer.
constexpr uint32_t kFlagVerify = 1;   // DRAFT: verify the window that ends with this frame
constexpr uint32_t kFlagHasDist = 2;  // DRAFT: carries one sparse draft distribution per token
constexpr uint32_t kKnownFlags = kFlagVerify | kFlagHasDist;

enum class ErrorCode : uint32_t {
  kBadFrame = 1,
  kBadVersion = 2,
  kAuthFailed = 3,
  kTokenizerMismatch = 4,
  kUnknownSession = 5,
  kStaleEpoch = 6,
  kTooLong = 7,
  kInternal = 8,
  kBusy = 9,
  kTimeout = 10,
  kOverloaded = 11,
};

// "HELLO", "DRAFT", ...; "UNKNOWN" for a value outside the enum.
const char* FrameTypeName(FrameType type);
// "BAD_FRAME", "AUTH_FAILED", ...; "UNKNOWN" for a value outside the enum.
const char* ErrorCodeName(ErrorCode code);
bool IsKnownFrameType(uint16_t type);

struct FrameHeader {
  uint32_t magic = kFrameMagic;
  uint16_t version = kProtocolVersion;
  FrameType type = FrameType::kPing;
  uint32_t flags = 0;
  uint64_t session = 0;
  uint64_t epoch = 0;
  uint32_t payload_len = 0;
};

struct Frame {
  FrameHeader header;
  std::vector<uint8_t> payload;
};

// Writes the 32 header bytes exactly as given (no validation, so tests can forge bad headers).
void EncodeHeader(const FrameHeader& header, uint8_t* out32);
// Reads 32 header bytes without validating them.
FrameHeader DecodeHeader(const uint8_t* in32);
// Throws ProtocolError naming the bad value and what was expected: wrong magic, unsupported
// version, unknown type, reserved or misplaced flags, payload_len > max_payload, a PING or PONG
// payload over kMaxPingPayload.
void ValidateHeader(const FrameHeader& header, uint32_t max_payload = kDefaultMaxPayload);

// Header plus payload. The payload_len written is payload.size(); header.payload_len is ignored
// so that a frame can never announce a length other than the one it carries.
std::vector<uint8_t> EncodeFrame(const Frame& frame);

// A frame with payload_len set from the payload.
Frame MakeFrame(FrameType type, uint64_t session, uint64_t epoch, std::vector<uint8_t> payload = {},
                uint32_t flags = 0);

// Reassembles frames from a byte stream cut at arbitrary boundaries.
//
// Each header is validated as soon as its 32 bytes are buffered (by Feed() when it is the next
// frame, otherwise by the Next() call that reaches it), before any payload is allocated, so a
// peer announcing a huge or malformed frame is rejected at once. Feed() and Next() throw
// ProtocolError on a bad header; every frame before it has been returned by then. After that
// the parser is unusable (every further call throws): the stream has lost framing and nothing
// after the bad header can be trusted.
class FrameParser {
 public:
  explicit FrameParser(uint32_t max_payload = kDefaultMaxPayload);

  // Appends n bytes (data may be null when n is 0).
  void Feed(const uint8_t* data, size_t n);
  // Moves the next complete frame into *out and returns true; false if more bytes are needed.
  bool Next(Frame* out);

  // Bytes received but not yet returned as frames: non-zero at end of stream means the peer
  // closed mid-frame.
  size_t Buffered() const { return buf_.size() - pos_; }
  bool failed() const { return failed_; }
  // After a failure: the ERROR code that describes it to the peer (BAD_VERSION for a header of
  // another protocol version, TOO_LONG for a payload over the limit, BAD_FRAME otherwise).
  ErrorCode error_code() const { return error_code_; }
  uint32_t max_payload() const { return max_payload_; }

 private:
  // Validates the header at pos_ if it is complete and not yet checked.
  void CheckPendingHeader();
  [[noreturn]] void Fail(const std::string& what);
  void ThrowIfFailed() const;

  uint32_t max_payload_;
  std::vector<uint8_t> buf_;
  size_t pos_ = 0;  // start of the first unconsumed byte in buf_
  bool have_header_ = false;
  FrameHeader header_;  // valid when have_header_
  bool failed_ = false;
  ErrorCode error_code_ = ErrorCode::kBadFrame;
  std::string error_;
};

// ---- Typed payloads. Encoders check the message (so a peer never receives what its decoder
// would reject) and decoders check the bytes; both throw ProtocolError. Strings are a u32 byte
// count then the bytes; arrays are a u32 element count then the elements. A payload with bytes
// left over after its last field is rejected as inconsistent.

struct Hello {
  std::string auth_token;
  uint32_t vocab_size = 0;
  std::string tokenizer_hash;  // hex digits
  uint16_t min_version = kProtocolVersion;
  uint16_t max_version = kProtocolVersion;
};

// The cloud's measured cost of one verification pass by its size: verify_ms[i] is the wall time
// of a pass over i + 1 tokens (the last committed token and i drafts). Empty: not measured.
struct CostTable {
  std::vector<float> verify_ms;
};

struct HelloOk {
  uint64_t session = 0;
  std::string model_fingerprint;  // UTF-8
  uint32_t max_ctx = 0;
  uint32_t max_window = 0;  // most drafts one verification may cover (0: no limit announced)
  uint32_t max_dist = 0;    // most entries in one draft distribution (0: no limit announced)
  CostTable costs;
};

struct Prefill {
  float temperature = 0.0f;
  int32_t top_k = 0;
  float top_p = 1.0f;
  int64_t seed = -1;  // -1: none
  std::vector<int32_t> tokens;
};

// The drafter's distribution over a few candidate tokens at one position.
struct SparseDist {
  std::vector<int32_t> ids;
  std::vector<float> probs;  // same length as ids
};

struct Draft {
  uint64_t start = 0;  // absolute position of tokens[0]
  std::vector<int32_t> tokens;
  std::vector<SparseDist> dists;  // empty, or exactly one per token (then kFlagHasDist is set)
};

struct Verdict {
  uint64_t start = 0;     // absolute position of the window's first draft
  uint32_t drafted = 0;   // drafts in the window
  uint32_t accepted = 0;  // <= drafted
  int32_t next_token = 0;
  float verify_ms = 0.0f;
};

// The payload of an ERROR frame (not an exception: those derive from PipesdError).
struct Error {
  uint32_t code = 0;    // an ErrorCode; kept raw so that a newer peer's code still decodes
  std::string message;  // UTF-8
};

// True when s is well-formed UTF-8 (no overlong forms, surrogates or code points past U+10FFFF).
bool IsValidUtf8(const std::string& s);

std::vector<uint8_t> EncodeHello(const Hello& m);
Hello DecodeHello(const std::vector<uint8_t>& payload);

std::vector<uint8_t> EncodeHelloOk(const HelloOk& m);
HelloOk DecodeHelloOk(const std::vector<uint8_t>& payload);

std::vector<uint8_t> EncodePrefill(const Prefill& m);
Prefill DecodePrefill(const std::vector<uint8_t>& payload);

// Dists are written iff m.dists is non-empty; the header must then carry kFlagHasDist, which
// MakeDraftFrame sets. has_dist comes from the received header's flags.
std::vector<uint8_t> EncodeDraft(const Draft& m);
Draft DecodeDraft(const std::vector<uint8_t>& payload, bool has_dist);
Frame MakeDraftFrame(uint64_t session, uint64_t epoch, const Draft& m, bool verify);

std::vector<uint8_t> EncodeVerdict(const Verdict& m);
Verdict DecodeVerdict(const std::vector<uint8_t>& payload);

// COSTS (cloud -> edge): the cost table again, whenever the cloud's estimates moved.
std::vector<uint8_t> EncodeCosts(const CostTable& m);
CostTable DecodeCosts(const std::vector<uint8_t>& payload);

std::vector<uint8_t> EncodeError(const Error& m);
Error DecodeError(const std::vector<uint8_t>& payload);

// RESET and BYE carry nothing; a non-empty payload is a ProtocolError naming the type.
void CheckEmptyPayload(FrameType type, const std::vector<uint8_t>& payload);

}  // namespace pipesd
