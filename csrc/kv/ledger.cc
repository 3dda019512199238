#include "pipesd/ledger.h"

#include <algorithm>

#include "pipesd/errors.h"

namespace pipesd {

SpeculationLedger::SpeculationLedger(int64_t max_len) : max_len_(max_len) {
  PIPESD_CHECK(max_len >= 2, LedgerError, "max_len must be at least 2, got " << max_len);
}

void SpeculationLedger::Begin(const std::vector<int32_t>& prompt) {
  PIPESD_CHECK(!prompt.empty(), LedgerError, "a sequence needs a prompt of at least one token");
  PIPESD_CHECK(
      static_cast<int64_t>(prompt.size()) < max_len_, LedgerError,
      "prompt of " << prompt.size() << " tokens leaves no room in a context of " << max_len_);
  for (int32_t t : prompt) PIPESD_CHECK(t >= 0, LedgerError, "negative token id " << t);
  tokens_ = prompt;
  committed_len_ = static_cast<int64_t>(prompt.size());
  sent_ = 0;
  ++epoch_;
  in_flight_ = false;
  window_ = VerifyWindow{};
  draft_kv_ = 0;
  target_kv_ = 0;
}

int32_t SpeculationLedger::AppendDrafts(const std::vector<int32_t>& drafts) {
  PIPESD_CHECK(committed_len_ > 0, LedgerError, "AppendDrafts before Begin");
  // Keep one position free for the token the target adds after the last draft.
  const int64_t room = std::max<int64_t>(0, max_len_ - 1 - static_cast<int64_t>(tokens_.size()));
  const int32_t n = static_cast<int32_t>(std::min<int64_t>(room, drafts.size()));
  for (int32_t i = 0; i < n; ++i) {
    PIPESD_CHECK(drafts[i] >= 0, LedgerError, "negative draft token id " << drafts[i]);
    tokens_.push_back(drafts[i]);
  }
  return n;
}

void SpeculationLedger::MarkSent(int32_t n) {
  PIPESD_CHECK(n >= 0 && n <= unsent_count(), LedgerError,
               "cannot mark " << n << " drafts sent: " << unsent_count() << " are unsent");
  sent_ += n;
}

VerifyWindow SpeculationLedger::Submit(int32_t count) {
  PIPESD_CHECK(committed_len_ > 0, LedgerError, "Submit before Begin");
  PIPESD_CHECK(!in_flight_, LedgerError,
               "a verification window is already in flight (epoch " << window_.epoch << ")");
  PIPESD_CHECK(count >= 0 && count <= pending_count(), LedgerError,
               "cannot submit " << count << " drafts: " << pending_count() << " are pending");
  window_ = VerifyWindow{epoch_, committed_len_, count};
  in_flight_ = true;
  sent_ = std::max(sent_, count);
  return window_;
}

VerdictDecision SpeculationLedger::ApplyVerdict(uint64_t epoch, int32_t accepted,
                                                int32_t next_token) {
  VerdictDecision d;
  d.epoch = epoch_;
  d.committed_len = committed_len_;
  d.draft_keep = draft_kv_;
  d.target_keep = target_kv_;
  if (!in_flight_ || epoch != window_.epoch || epoch != epoch_) {
    d.stale = true;
    return d;
  }
  const int32_t w = window_.count;
  PIPESD_CHECK(accepted >= 0 && accepted <= w, LedgerError,
               "verdict accepts " << accepted << " drafts of a window of " << w);
  PIPESD_CHECK(next_token >= 0, LedgerError, "verdict carries negative token id " << next_token);
  const int64_t c = committed_len_;
  const int32_t beyond = pending_count() - w;  // drafted after the window was submitted
  d.accepted = accepted;
  d.next_token = next_token;
  d.bonus = accepted == w;

  bool keep_beyond = false;
  if (d.bonus && beyond > 0 && tokens_[c + w] == next_token) {
    // The edge assumed a full accept and guessed the bonus token right: everything it drafted
    // during the wait is conditioned on the true prefix and stays.
    keep_beyond = true;
  }

  if (keep_beyond) {
    committed_len_ = c + w + 1;
    d.kept_beyond = beyond - 1;
    d.discarded = 0;
  } else {
    tokens_.resize(c + accepted);
    tokens_.push_back(next_token);
    committed_len_ = c + accepted + 1;
    d.discarded = (w - accepted) + beyond;
    d.kept_beyond = 0;
  }
  // The target holds every committed token but the last, which opens the next pass.
  target_kv_ = committed_len_ - 1;
  // The drafter's cache is valid up to the first position where it differs from tokens_.
  if (!keep_beyond) draft_kv_ = std::min<int64_t>(draft_kv_, c + accepted);
  // Drafts streamed beyond the window stay sent only if they stay at all.
  sent_ = keep_beyond ? std::max<int32_t>(0, sent_ - w - 1) : 0;
  if (d.discarded > 0) {
    ++epoch_;
    d.rolled_back = true;
  }
  in_flight_ = false;
  window_ = VerifyWindow{};

  d.committed_len = committed_len_;
  d.draft_keep = draft_kv_;
  d.target_keep = target_kv_;
  d.epoch = epoch_;
  return d;
}

void SpeculationLedger::CommitDrafts(int32_t n) {
  PIPESD_CHECK(!in_flight_, LedgerError, "cannot commit drafts while a window is in flight");
  PIPESD_CHECK(n >= 0 && n <= pending_count(), LedgerError,
               "cannot commit " << n << " drafts: " << pending_count() << " are pending");
  committed_len_ += n;
  sent_ = std::max<int32_t>(0, sent_ - n);
}

int32_t SpeculationLedger::DiscardDrafts() {
  const int32_t n = pending_count();
  tokens_.resize(committed_len_);
  sent_ = 0;
  in_flight_ = false;
  window_ = VerifyWindow{};
  draft_kv_ = std::min<int64_t>(draft_kv_, committed_len_ - 1);
  if (n > 0) ++epoch_;
  return n;
}

void SpeculationLedger::NoteDraftKv(int64_t len) {
  PIPESD_CHECK(len >= 0 && len <= static_cast<int64_t>(tokens_.size()), LedgerError,
               "drafter KV length " << len << " outside [0, " << tokens_.size() << "]");
  draft_kv_ = len;
}

void SpeculationLedger::NoteTargetKv(int64_t len) {
  PIPESD_CHECK(len >= 0 && len <= static_cast<int64_t>(tokens_.size()), LedgerError,
               "target KV length " << len << " outside [0, " << tokens_.size() << "]");
  target_kv_ = len;
}

int32_t SpeculationLedger::last_token() const {
  PIPESD_CHECK(committed_len_ > 0, LedgerError, "no committed token before Begin");
  return tokens_[committed_len_ - 1];
}

std::vector<int32_t> SpeculationLedger::committed() const {
  return std::vector<int32_t>(tokens_.begin(), tokens_.begin() + committed_len_);
}

std::vector<int32_t> SpeculationLedger::pending() const {
  return std::vector<int32_t>(tokens_.begin() + committed_len_, tokens_.end());
}

std::vector<int32_t> SpeculationLedger::TokensFrom(int64_t start) const {
  PIPESD_CHECK(start >= 0 && start <= static_cast<int64_t>(tokens_.size()), LedgerError,
               "TokensFrom(" << start << ") outside [0, " << tokens_.size() << "]");
  return std::vector<int32_t>(tokens_.begin() + start, tokens_.end());
}

}  // namespace pipesd
