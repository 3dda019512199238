// Writes the seed corpus of tests/fuzz/fuzz_frames.cc: valid frames of every type (one or a few
// per file) and valid payloads behind the selector byte of the direct-decoder path. The output is
// deterministic, so the committed seeds can be checked against what the encoders produce now.
//
//   pipesd_fuzz_corpus DIR          write DIR/seed-* (other files in DIR are left alone)
//   pipesd_fuzz_corpus --check DIR  exit 1 if any DIR/seed-* is missing or differs
//
// The encoders validate every message, so a seed that the current protocol would reject cannot
// be written.

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <string>
#include <utility>
#include <vector>

#include "pipesd/frame.h"

namespace pipesd {
namespace {

using Bytes = std::vector<uint8_t>;

struct Seed {
  std::string name;
  Bytes bytes;
};

void Append(Bytes& out, const Frame& f) {
  const Bytes wire = EncodeFrame(f);
  out.insert(out.end(), wire.begin(), wire.end());
}

Bytes Wire(const Frame& f) { return EncodeFrame(f); }

Bytes Stream(const std::vector<Frame>& frames) {
  Bytes out;
  for (const Frame& f : frames) Append(out, f);
  return out;
}

// The direct-decoder path of fuzz_frames.cc: the selector byte, then the payload.
Bytes Direct(uint8_t selector, const Bytes& payload) {
  Bytes out{selector};
  out.insert(out.end(), payload.begin(), payload.end());
  return out;
}

constexpr uint64_t kSession = 0x5eed0001;

Hello SampleHello() {
  Hello m;
  m.auth_token = "s3cret-token";
  m.vocab_size = 151936;
  m.tokenizer_hash = "9f86d081884c7d65";
  return m;
}

HelloOk SampleHelloOk(size_t costs) {
  HelloOk m;
  m.session = kSession;
  m.model_fingerprint = "qwen2.5-coder-1.5b-q4_k_m";
  m.max_ctx = 32768;
  for (size_t i = 0; i < costs; ++i) m.costs.verify_ms.push_back(18.5f + 0.75f * i);
  return m;
}

Prefill SamplePrefill(bool sampling) {
  Prefill m;
  if (sampling) {
    m.temperature = 0.7f;
    m.top_k = 40;
    m.top_p = 0.95f;
    m.seed = 1234;
  }
  m.tokens = {750, 3974, 14149, 10939, 25, 198, 262, 4210};
  return m;
}

Draft SampleDraft(size_t n, bool dists) {
  Draft m;
  m.start = 9;
  for (size_t i = 0; i < n; ++i) {
    m.tokens.push_back(static_cast<int32_t>(100 + 37 * i));
    if (dists) {
      SparseDist d;
      for (size_t j = 0; j <= i % 4; ++j) {
        d.ids.push_back(static_cast<int32_t>(100 + 37 * i + j));
        d.probs.push_back(1.0f / static_cast<float>(j + 2));
      }
      m.dists.push_back(d);
    }
  }
  return m;
}

Verdict SampleVerdict(uint32_t drafted, uint32_t accepted) {
  Verdict m;
  m.start = 9;
  m.drafted = drafted;
  m.accepted = accepted;
  m.next_token = 271;
  m.verify_ms = 23.25f;
  return m;
}

Frame Empty(FrameType type, uint64_t session = kSession, uint64_t epoch = 0) {
  return MakeFrame(type, session, epoch);
}

std::vector<Seed> Seeds() {
  std::vector<Seed> s;
  const Hello hello = SampleHello();
  Hello hello_bare;
  hello_bare.min_version = 1;
  hello_bare.max_version = 3;
  s.push_back({"seed-hello", Wire(MakeFrame(FrameType::kHello, 0, 0, EncodeHello(hello)))});
  s.push_back(
      {"seed-hello-empty", Wire(MakeFrame(FrameType::kHello, 0, 0, EncodeHello(hello_bare)))});

  const HelloOk ok32 = SampleHelloOk(32);
  const HelloOk ok0 = SampleHelloOk(0);
  s.push_back(
      {"seed-hello-ok", Wire(MakeFrame(FrameType::kHelloOk, kSession, 0, EncodeHelloOk(ok32)))});
  s.push_back({"seed-hello-ok-no-costs",
               Wire(MakeFrame(FrameType::kHelloOk, kSession, 0, EncodeHelloOk(ok0)))});

  const Prefill greedy = SamplePrefill(false);
  const Prefill sampled = SamplePrefill(true);
  Prefill prefill_empty;
  s.push_back({"seed-prefill-greedy",
               Wire(MakeFrame(FrameType::kPrefill, kSession, 1, EncodePrefill(greedy)))});
  s.push_back({"seed-prefill-sampling",
               Wire(MakeFrame(FrameType::kPrefill, kSession, 1, EncodePrefill(sampled)))});
  s.push_back({"seed-prefill-no-tokens",
               Wire(MakeFrame(FrameType::kPrefill, kSession, 1, EncodePrefill(prefill_empty)))});

  const Draft draft4 = SampleDraft(4, false);
  const Draft draft4d = SampleDraft(4, true);
  const Draft draft1d = SampleDraft(1, true);
  const Draft draft0 = SampleDraft(0, false);
  Draft draft_empty_dist = SampleDraft(3, true);
  draft_empty_dist.dists[1] = {};
  s.push_back({"seed-draft", Wire(MakeDraftFrame(kSession, 2, draft4, false))});
  s.push_back({"seed-draft-verify", Wire(MakeDraftFrame(kSession, 2, draft4, true))});
  s.push_back({"seed-draft-dists", Wire(MakeDraftFrame(kSession, 2, draft4d, false))});
  s.push_back({"seed-draft-dists-verify", Wire(MakeDraftFrame(kSession, 2, draft4d, true))});
  s.push_back({"seed-draft-one-dist", Wire(MakeDraftFrame(kSession, 2, draft1d, true))});
  s.push_back({"seed-draft-empty-dist", Wire(MakeDraftFrame(kSession, 2, draft_empty_dist, true))});
  s.push_back({"seed-draft-no-tokens", Wire(MakeDraftFrame(kSession, 2, draft0, true))});
  // kFlagHasDist on a draft of no tokens: valid, and not what MakeDraftFrame writes.
  s.push_back({"seed-draft-no-tokens-has-dist",
               Wire(MakeFrame(FrameType::kDraft, kSession, 2, EncodeDraft(draft0),
                              kFlagVerify | kFlagHasDist))});

  const Verdict verdict = SampleVerdict(4, 2);
  const Verdict verdict_prefill = SampleVerdict(0, 0);
  s.push_back(
      {"seed-verdict", Wire(MakeFrame(FrameType::kVerdict, kSession, 2, EncodeVerdict(verdict)))});
  s.push_back({"seed-verdict-prefill",
               Wire(MakeFrame(FrameType::kVerdict, kSession, 1, EncodeVerdict(verdict_prefill)))});

  s.push_back({"seed-reset", Wire(Empty(FrameType::kReset, kSession, 3))});
  s.push_back({"seed-bye", Wire(Empty(FrameType::kBye))});

  const Error err{static_cast<uint32_t>(ErrorCode::kStaleEpoch), "DRAFT of epoch 2, expected 3"};
  const Error err_unknown{1000, ""};
  s.push_back({"seed-error", Wire(MakeFrame(FrameType::kError, kSession, 0, EncodeError(err)))});
  s.push_back({"seed-error-unknown-code",
               Wire(MakeFrame(FrameType::kError, 0, 0, EncodeError(err_unknown)))});

  const Bytes stamp = {0x10, 0x32, 0x54, 0x76, 0x98, 0xba, 0xdc, 0xfe};
  s.push_back({"seed-ping", Wire(MakeFrame(FrameType::kPing, kSession, 4, stamp))});
  s.push_back({"seed-pong", Wire(MakeFrame(FrameType::kPong, kSession, 4, stamp))});
  s.push_back({"seed-ping-empty", Wire(Empty(FrameType::kPing))});

  CostTable costs;
  costs.verify_ms = {17.0f, 17.5f, 18.0f, 19.25f, 0.0f};
  s.push_back({"seed-costs", Wire(MakeFrame(FrameType::kCosts, kSession, 0, EncodeCosts(costs)))});
  s.push_back(
      {"seed-costs-empty", Wire(MakeFrame(FrameType::kCosts, kSession, 0, EncodeCosts({})))});

  // Whole conversations, one direction each, and one cut short in the middle of a frame.
  const Bytes edge = Stream({
      MakeFrame(FrameType::kHello, 0, 0, EncodeHello(hello)),
      MakeFrame(FrameType::kPrefill, kSession, 1, EncodePrefill(sampled)),
      MakeDraftFrame(kSession, 1, draft4d, false),
      MakeDraftFrame(kSession, 1, draft1d, true),
      Empty(FrameType::kReset, kSession, 2),
      MakeFrame(FrameType::kPing, kSession, 2, stamp),
      MakeDraftFrame(kSession, 2, draft4, true),
      Empty(FrameType::kBye),
  });
  s.push_back({"seed-stream-edge", edge});
  s.push_back({"seed-stream-cloud",
               Stream({
                   MakeFrame(FrameType::kHelloOk, kSession, 0, EncodeHelloOk(ok32)),
                   MakeFrame(FrameType::kVerdict, kSession, 1, EncodeVerdict(verdict_prefill)),
                   MakeFrame(FrameType::kVerdict, kSession, 1, EncodeVerdict(verdict)),
                   MakeFrame(FrameType::kCosts, kSession, 1, EncodeCosts(costs)),
                   MakeFrame(FrameType::kPong, kSession, 2, stamp),
                   MakeFrame(FrameType::kError, kSession, 2, EncodeError(err)),
               })});
  s.push_back({"seed-stream-truncated", Bytes(edge.begin(), edge.begin() + edge.size() * 2 / 3)});

  // Payloads for the direct-decoder path (selectors as in fuzz_frames.cc's DecodeDirect).
  s.push_back({"seed-direct-hello", Direct(0, EncodeHello(hello))});
  s.push_back({"seed-direct-hello-ok", Direct(1, EncodeHelloOk(ok32))});
  s.push_back({"seed-direct-prefill", Direct(2, EncodePrefill(sampled))});
  s.push_back({"seed-direct-draft", Direct(3, EncodeDraft(draft4))});
  s.push_back({"seed-direct-draft-dists", Direct(4, EncodeDraft(draft4d))});
  s.push_back({"seed-direct-verdict", Direct(5, EncodeVerdict(verdict))});
  s.push_back({"seed-direct-costs", Direct(6, EncodeCosts(costs))});
  s.push_back({"seed-direct-error", Direct(7, EncodeError(err))});
  s.push_back({"seed-direct-reset", Direct(8, {})});
  s.push_back({"seed-direct-bye", Direct(9, {})});
  return s;
}

bool ReadFile(const std::string& path, Bytes* out) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return false;
  out->assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  return true;
}

bool WriteFile(const std::string& path, const Bytes& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()),
            static_cast<std::streamsize>(bytes.size()));
  return static_cast<bool>(out);
}

int Run(int argc, char** argv) {
  const bool check = argc == 3 && std::strcmp(argv[1], "--check") == 0;
  if (argc != 2 && !check) {
    std::fprintf(stderr, "usage: %s [--check] DIR\n", argv[0]);
    return 2;
  }
  const std::string dir = argv[argc - 1];
  int bad = 0;
  for (const Seed& seed : Seeds()) {
    const std::string path = dir + "/" + seed.name;
    if (check) {
      Bytes have;
      if (!ReadFile(path, &have) || have != seed.bytes) {
        std::fprintf(stderr, "%s is missing or out of date\n", path.c_str());
        ++bad;
      }
    } else if (!WriteFile(path, seed.bytes)) {
      std::fprintf(stderr, "cannot write %s\n", path.c_str());
      ++bad;
    }
  }
  if (check && bad > 0) {
    std::fprintf(stderr,
                 "regenerate the seeds: pipesd_fuzz_corpus %s (in a -DPIPESD_FUZZ=ON build)\n",
                 dir.c_str());
  }
  return bad == 0 ? 0 : 1;
}

}  // namespace
}  // namespace pipesd

int main(int argc, char** argv) { return pipesd::Run(argc, argv); }
