// The PipeSD batch schedule: where to cut a window of draft tokens into batches so that the last
// batch reaches the cloud as early as possible (the DP of PipeSD, arXiv 2605.13319).
//
// Cost model for one window of n draft tokens, all times relative to the window's start:
//   * token j (1-based) finishes drafting at ready(j): gamma * j for a constant per-token draft
//     time gamma, or a prefix sum of measured per-token draft times;
//   * sending a batch of b tokens occupies the link for alpha + beta * b;
//   * the edge and the link each work serially: a batch leaves once its last token is drafted
//     and the previous batch has crossed the link, which is free at time 0.
// The dynamic program
//   dp[0] = 0,  dp[j] = min over 0 <= i < j of max(dp[i], ready(j)) + alpha + beta * (j - i)
// gives the earliest time the first j tokens can have crossed the link; back-pointers give the
// batch boundaries and the makespan is dp[n]. O(n^2) time in the worst case, O(n) memory; a
// bound on each candidate ends the inner loop early, so draft-bound windows cost about O(n).
//
// Ties. Candidates within kScheduleTieTolerance (relative) of the best are equal. Among equal
// candidates for dp[j] the solver takes the one whose prefix plan has the fewest batches, then
// the smallest i (the largest last batch). Every boundary k of the returned plan is reached at
// dp[k], the earliest time the first k tokens can have crossed the link: this matters when a
// verification is triggered mid-window and the unsent tokens go at once.
#pragma once

#include <cstdint>
#include <vector>

namespace pipesd {

// The largest window the solver accepts. A window is tens of tokens in practice; the cap keeps
// a bad argument from turning into seconds of work and a large allocation.
inline constexpr int32_t kMaxScheduleTokens = 1 << 16;

// Relative tolerance under which two candidate finish times count as equal.
inline constexpr double kScheduleTieTolerance = 1e-12;

struct BatchPlan {
  // Cumulative token counts at the end of each batch: strictly increasing, the last is n.
  // Batch k holds tokens batch_ends[k-1] + 1 .. batch_ends[k] (1-based, batch_ends[-1] = 0).
  std::vector<int32_t> batch_ends;
  // When the last batch has crossed the link, in the units of alpha, beta and ready.
  double makespan = 0.0;

  int32_t num_tokens() const { return batch_ends.empty() ? 0 : batch_ends.back(); }
  int32_t num_batches() const { return static_cast<int32_t>(batch_ends.size()); }
};

// The optimal plan for measured ready times: ready[j-1] is when token j finishes drafting.
// ready must hold 1 .. kMaxScheduleTokens finite, non-negative, non-decreasing times; alpha and
// beta must be finite and non-negative. Throws ScheduleError otherwise.
BatchPlan SolveBatchSchedule(double alpha, double beta, const std::vector<double>& ready);

// The optimal plan for a constant draft time per token: ready(j) = gamma * j, 1 <= n <=
// kMaxScheduleTokens. Equal to SolveBatchSchedule with those ready times, without building them.
BatchPlan SolveBatchScheduleConstant(double alpha, double beta, double gamma, int32_t n);

// Simulates a given plan under the same cost model and returns its makespan. batch_ends must be
// strictly increasing, start above 0 and end at ready.size(). For a plan returned by a solver
// with the same arguments this equals plan.makespan exactly (same operations, same order).
double PlanMakespan(double alpha, double beta, const std::vector<double>& ready,
                    const std::vector<int32_t>& batch_ends);

// The number of tokens in each batch of the plan.
std::vector<int32_t> BatchSizes(const BatchPlan& plan);

}  // namespace pipesd
