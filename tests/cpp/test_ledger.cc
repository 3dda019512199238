#include <gtest/gtest.h>

#include <random>

#include "pipesd/errors.h"
#include "pipesd/ledger.h"

namespace pipesd {
namespace {

using Tokens = std::vector<int32_t>;

TEST(SpeculationLedger, BeginCommitsPrompt) {
  SpeculationLedger l(16);
  l.Begin({1, 2, 3});
  EXPECT_EQ(l.committed_len(), 3);
  EXPECT_EQ(l.pending_count(), 0);
  EXPECT_EQ(l.last_token(), 3);
  EXPECT_EQ(l.epoch(), 1u);
  EXPECT_THROW(l.Begin({}), LedgerError);
  EXPECT_THROW(SpeculationLedger(1), LedgerError);
}

TEST(SpeculationLedger, PartialAcceptRollsBackBothSides) {
  SpeculationLedger l(64);
  l.Begin({1, 2, 3});
  l.NoteTargetKv(2);
  ASSERT_EQ(l.AppendDrafts({10, 11, 12, 13}), 4);
  l.NoteDraftKv(3 + 3);  // evaluated the prompt's last token and drafts 10, 11, 12
  VerifyWindow w = l.Submit(4);
  EXPECT_EQ(w.start, 3);
  EXPECT_EQ(w.count, 4);
  l.NoteTargetKv(3 + 4);  // the verify pass evaluated token 3 and the four drafts
  const uint64_t e = l.epoch();
  VerdictDecision d = l.ApplyVerdict(w.epoch, 2, 99);
  EXPECT_FALSE(d.stale);
  EXPECT_FALSE(d.bonus);
  EXPECT_EQ(d.committed_len, 6);
  EXPECT_EQ(l.committed(), (Tokens{1, 2, 3, 10, 11, 99}));
  EXPECT_EQ(d.target_keep, 5);
  EXPECT_EQ(d.draft_keep, 5);
  EXPECT_EQ(d.discarded, 2);
  EXPECT_TRUE(d.rolled_back);
  EXPECT_EQ(l.epoch(), e + 1);
  EXPECT_EQ(l.pending_count(), 0);
  EXPECT_FALSE(l.in_flight());
}

TEST(SpeculationLedger, FullAcceptAddsBonus) {
  SpeculationLedger l(64);
  l.Begin({5});
  l.AppendDrafts({6, 7});
  l.NoteDraftKv(2);
  VerifyWindow w = l.Submit(2);
  VerdictDecision d = l.ApplyVerdict(w.epoch, 2, 8);
  EXPECT_TRUE(d.bonus);
  EXPECT_FALSE(d.rolled_back);
  EXPECT_EQ(d.discarded, 0);
  EXPECT_EQ(l.committed(), (Tokens{5, 6, 7, 8}));
  EXPECT_EQ(d.target_keep, 3);
  EXPECT_EQ(d.draft_keep, 2);  // the drafter never evaluated 7; it keeps what it has
}

TEST(SpeculationLedger, WaitDraftsKeptWhenBonusMatches) {
  SpeculationLedger l(64);
  l.Begin({1, 2});
  l.AppendDrafts({3, 4});
  VerifyWindow w = l.Submit(2);
  // While the verdict is pending the edge drafts on, assuming 3, 4 accepted and bonus 5.
  l.AppendDrafts({5, 6, 7});
  l.MarkSent(3);
  l.NoteDraftKv(6);
  VerdictDecision d = l.ApplyVerdict(w.epoch, 2, 5);
  EXPECT_TRUE(d.bonus);
  EXPECT_EQ(d.kept_beyond, 2);
  EXPECT_EQ(d.discarded, 0);
  EXPECT_FALSE(d.rolled_back);
  EXPECT_EQ(l.committed(), (Tokens{1, 2, 3, 4, 5}));
  EXPECT_EQ(l.pending(), (Tokens{6, 7}));
  EXPECT_EQ(l.sent_count(), 2);
  EXPECT_EQ(d.draft_keep, 6);
  EXPECT_EQ(d.target_keep, 4);
}

TEST(SpeculationLedger, WaitDraftsDiscardedWhenBonusDiffers) {
  SpeculationLedger l(64);
  l.Begin({1, 2});
  l.AppendDrafts({3, 4});
  VerifyWindow w = l.Submit(2);
  l.AppendDrafts({5, 6, 7});
  l.NoteDraftKv(6);
  VerdictDecision d = l.ApplyVerdict(w.epoch, 2, 9);
  EXPECT_TRUE(d.bonus);
  EXPECT_EQ(d.kept_beyond, 0);
  EXPECT_EQ(d.discarded, 3);
  EXPECT_TRUE(d.rolled_back);
  EXPECT_EQ(l.committed(), (Tokens{1, 2, 3, 4, 9}));
  EXPECT_EQ(l.pending_count(), 0);
  EXPECT_EQ(d.draft_keep, 4);
}

TEST(SpeculationLedger, WaitDraftsDiscardedOnRejection) {
  SpeculationLedger l(64);
  l.Begin({1});
  l.AppendDrafts({2, 3, 4});
  VerifyWindow w = l.Submit(3);
  l.AppendDrafts({5});
  l.NoteDraftKv(4);
  VerdictDecision d = l.ApplyVerdict(w.epoch, 0, 7);
  EXPECT_EQ(d.discarded, 4);
  EXPECT_EQ(l.committed(), (Tokens{1, 7}));
  EXPECT_EQ(d.draft_keep, 1);
  EXPECT_EQ(d.target_keep, 1);
}

TEST(SpeculationLedger, StaleVerdictChangesNothing) {
  SpeculationLedger l(64);
  l.Begin({1});
  l.AppendDrafts({2, 3});
  VerifyWindow w = l.Submit(2);
  VerdictDecision first = l.ApplyVerdict(w.epoch, 1, 9);  // rejection: epoch advances
  ASSERT_TRUE(first.rolled_back);
  const Tokens before = l.tokens();
  VerdictDecision again = l.ApplyVerdict(w.epoch, 2, 4);  // duplicate of the old epoch
  EXPECT_TRUE(again.stale);
  EXPECT_EQ(l.tokens(), before);
  // A verdict with no window in flight is stale too.
  EXPECT_TRUE(l.ApplyVerdict(l.epoch(), 0, 1).stale);
}

TEST(SpeculationLedger, CommitDraftsWithoutVerifier) {
  SpeculationLedger l(64);
  l.Begin({1});
  l.AppendDrafts({2, 3, 4});
  const uint64_t e = l.epoch();
  l.CommitDrafts(2);
  EXPECT_EQ(l.committed(), (Tokens{1, 2, 3}));
  EXPECT_EQ(l.pending(), (Tokens{4}));
  EXPECT_EQ(l.epoch(), e);
  EXPECT_THROW(l.CommitDrafts(2), LedgerError);
  EXPECT_EQ(l.DiscardDrafts(), 1);
  EXPECT_EQ(l.epoch(), e + 1);
}

TEST(SpeculationLedger, MisuseIsAnError) {
  SpeculationLedger l(64);
  l.Begin({1});
  l.AppendDrafts({2});
  EXPECT_THROW(l.Submit(2), LedgerError);
  VerifyWindow w = l.Submit(1);
  EXPECT_THROW(l.Submit(0), LedgerError);
  EXPECT_THROW(l.ApplyVerdict(w.epoch, 2, 3), LedgerError);
  EXPECT_THROW(l.ApplyVerdict(w.epoch, 1, -1), LedgerError);
  EXPECT_THROW(l.NoteDraftKv(99), LedgerError);
  EXPECT_THROW(l.MarkSent(5), LedgerError);
}

TEST(SpeculationLedger, CapacityIsAReturnValue) {
  SpeculationLedger l(6);
  l.Begin({1, 2, 3});
  EXPECT_EQ(l.AppendDrafts({4, 5, 6, 7}), 2);  // one slot stays free for the target's token
  EXPECT_EQ(l.AppendDrafts({8}), 0);
  EXPECT_THROW(l.Begin({1, 2, 3, 4, 5, 6}), LedgerError);
}

// Random rounds against a plain reference of the same rules.
TEST(SpeculationLedger, RandomRoundsMatchReference) {
  std::mt19937 rng(7);
  SpeculationLedger l(100000);
  Tokens ref = {1, 2, 3};
  l.Begin(ref);
  for (int round = 0; round < 2000; ++round) {
    const int n = std::uniform_int_distribution<int>(0, 6)(rng);
    Tokens drafts;
    for (int i = 0; i < n; ++i) drafts.push_back(std::uniform_int_distribution<int>(0, 3)(rng));
    l.AppendDrafts(drafts);
    VerifyWindow w = l.Submit(n);
    const int extra = std::uniform_int_distribution<int>(0, 2)(rng);
    Tokens beyond;
    for (int i = 0; i < extra; ++i) beyond.push_back(std::uniform_int_distribution<int>(0, 3)(rng));
    l.AppendDrafts(beyond);
    const int acc = std::uniform_int_distribution<int>(0, n)(rng);
    const int tok = std::uniform_int_distribution<int>(0, 3)(rng);
    VerdictDecision d = l.ApplyVerdict(w.epoch, acc, tok);
    ASSERT_FALSE(d.stale);
    for (int i = 0; i < acc; ++i) ref.push_back(drafts[i]);
    ref.push_back(tok);
    ASSERT_EQ(l.committed(), ref);
    const bool keep = acc == n && extra > 0 && beyond[0] == tok;
    ASSERT_EQ(d.kept_beyond, keep ? extra - 1 : 0);
    ASSERT_EQ(l.pending_count(), keep ? extra - 1 : 0);
    if (keep) {
      // The kept drafts become the next window's leading drafts; verify them now.
      Tokens rest(beyond.begin() + 1, beyond.end());
      ASSERT_EQ(l.pending(), rest);
      VerifyWindow w2 = l.Submit(l.pending_count());
      VerdictDecision d2 = l.ApplyVerdict(w2.epoch, 0, 0);
      ref.push_back(0);
      ASSERT_EQ(d2.committed_len, static_cast<int64_t>(ref.size()));
    }
    ASSERT_EQ(l.target_kv(), static_cast<int64_t>(ref.size()) - 1);
  }
}

}  // namespace
}  // namespace pipesd
