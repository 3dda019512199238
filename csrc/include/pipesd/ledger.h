// The speculation ledger: per sequence, what is committed, which draft tokens are pending,
// which of them are being verified, the epoch of the speculation, and how far each side's
// KV cache must roll back after a verdict.
//
// Conventions (shared by the drafter and both target backends):
//   * tokens() is the committed prefix followed by the pending drafts.
//   * A model's "KV length" counts the positions whose keys/values it holds. The target holds
//     every committed token but the last: that last token (the prompt's last token, or the
//     correction/bonus token of the previous verdict) is the first input of the next verify
//     pass, whose logits score the first draft. So after every verdict target_keep is
//     committed_len - 1.
//   * The drafter may hold more than it needs (drafts it evaluated); after a verdict it keeps
//     min(what it holds, the valid prefix).
//   * The epoch advances whenever drafts are thrown away, so that anything still in flight
//     for the old speculation (streamed drafts, a verdict) is recognised as stale and dropped.
#pragma once

#include <cstdint>
#include <vector>

namespace pipesd {

// The drafts submitted for one verification: positions [start, start + count).
struct VerifyWindow {
  uint64_t epoch = 0;
  int64_t start = 0;
  int32_t count = 0;
};

// What a verdict means for both sides. All lengths are absolute token positions.
struct VerdictDecision {
  bool stale = false;         // belonged to a discarded epoch or no window: nothing applied
  int32_t accepted = 0;       // drafts of the window the target accepted
  int32_t next_token = -1;    // the target's correction (or bonus) token, now committed
  bool bonus = false;         // the whole window was accepted; next_token is the bonus
  int64_t committed_len = 0;  // committed length after the verdict (includes next_token)
  int64_t draft_keep = 0;     // the drafter truncates its KV cache to this length
  int64_t target_keep = 0;    // the target truncates its KV cache to this length
  int32_t discarded = 0;      // drafts thrown away (rejected, or drafted beyond the window)
  int32_t kept_beyond = 0;    // drafts made beyond the window that stay valid pending drafts
  bool rolled_back = false;   // the epoch advanced
  uint64_t epoch = 0;         // the epoch after the verdict
};

class SpeculationLedger {
 public:
  // max_len: the context size; no sequence grows past it.
  explicit SpeculationLedger(int64_t max_len);

  // Starts a new sequence from a prompt (at least one token). Advances the epoch and forgets
  // every draft; both KV lengths are reset to 0.
  void Begin(const std::vector<int32_t>& prompt);

  // Appends drafted tokens after the pending ones. Returns how many fit (the rest would pass
  // max_len); never throws for capacity, which is an expected outcome at the end of a context.
  int32_t AppendDrafts(const std::vector<int32_t>& drafts);

  // Marks the next n unsent pending drafts as sent (streamed to the target, not yet verified).
  void MarkSent(int32_t n);

  // Submits the first `count` pending drafts for verification. Exactly one window may be in
  // flight; count may be 0 (plain autoregressive step of the target).
  VerifyWindow Submit(int32_t count);

  // Applies the target's verdict for the window in flight. A verdict whose epoch is not the
  // current one is stale: it is reported as such and changes nothing.
  VerdictDecision ApplyVerdict(uint64_t epoch, int32_t accepted, int32_t next_token);

  // Commits the first n pending drafts without verification: the draft-only reference, or
  // tokens the target produced itself. No window may be in flight.
  void CommitDrafts(int32_t n);

  // Drops every pending draft (e.g. a policy gives up on a speculation). Advances the epoch if
  // there were any; a window in flight is abandoned.
  int32_t DiscardDrafts();

  // Records how many positions each model's KV cache holds after it evaluated tokens.
  void NoteDraftKv(int64_t len);
  void NoteTargetKv(int64_t len);

  int64_t max_len() const { return max_len_; }
  int64_t committed_len() const { return committed_len_; }
  int32_t pending_count() const { return static_cast<int32_t>(tokens_.size() - committed_len_); }
  int32_t sent_count() const { return sent_; }
  int32_t unsent_count() const { return pending_count() - sent_; }
  uint64_t epoch() const { return epoch_; }
  bool in_flight() const { return in_flight_; }
  const VerifyWindow& window() const { return window_; }
  int64_t draft_kv() const { return draft_kv_; }
  int64_t target_kv() const { return target_kv_; }
  int32_t last_token() const;  // the last committed token
  const std::vector<int32_t>& tokens() const { return tokens_; }
  std::vector<int32_t> committed() const;
  std::vector<int32_t> pending() const;
  // tokens()[start:], so a caller can fetch what a model has not evaluated without a full copy.
  std::vector<int32_t> TokensFrom(int64_t start) const;

 private:
  int64_t max_len_;
  std::vector<int32_t> tokens_;  // committed prefix, then pending drafts
  int64_t committed_len_ = 0;
  int32_t sent_ = 0;  // pending drafts already streamed to the target
  uint64_t epoch_ = 0;
  bool in_flight_ = false;
  VerifyWindow window_;
  int64_t draft_kv_ = 0;
  int64_t target_kv_ = 0;
};

}  // namespace pipesd
