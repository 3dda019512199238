#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "pipesd/errors.h"
#include "pipesd/scheduler.h"

namespace pipesd {
namespace {

using Ends = std::vector<int32_t>;
using Times = std::vector<double>;

// The cost model written out independently of the solver: batch by batch, the link starts a
// batch once its last token is drafted and the previous batch is through.
double Simulate(double alpha, double beta, const Times& ready, const Ends& ends) {
  double t = 0.0;
  int32_t start = 0;
  for (int32_t end : ends) {
    t = std::max(t, ready[end - 1]) + alpha + beta * (end - start);
    start = end;
  }
  return t;
}

// The best makespan over every batching of n tokens: bit k of the mask set means a batch ends
// after token k + 1.
double Enumerate(double alpha, double beta, const Times& ready) {
  const int32_t n = static_cast<int32_t>(ready.size());
  double best = std::numeric_limits<double>::infinity();
  for (uint32_t mask = 0; mask < (1u << (n - 1)); ++mask) {
    Ends ends;
    for (int32_t k = 0; k < n - 1; ++k) {
      if (mask & (1u << k)) ends.push_back(k + 1);
    }
    ends.push_back(n);
    best = std::min(best, Simulate(alpha, beta, ready, ends));
  }
  return best;
}

Times ConstantReady(double gamma, int32_t n) {
  Times r(n);
  for (int32_t j = 1; j <= n; ++j) r[j - 1] = gamma * j;
  return r;
}

// Log-uniform over [lo, hi], with an exact zero now and then: the edge cases of the cost model.
double RandomCost(std::mt19937& rng, double lo, double hi, double p_zero) {
  if (std::uniform_real_distribution<double>(0, 1)(rng) < p_zero) return 0.0;
  const double e = std::uniform_real_distribution<double>(std::log(lo), std::log(hi))(rng);
  return std::exp(e);
}

// Prefix sums of per-token draft times: some tokens take no time (equal ready times), some a
// long time (a stall), most somewhere in between.
Times RandomReady(std::mt19937& rng, int32_t n) {
  Times r(n);
  double t = 0.0;
  std::uniform_real_distribution<double> u(0, 1);
  for (int32_t j = 0; j < n; ++j) {
    const double p = u(rng);
    if (p < 0.15) {
      t += 0.0;
    } else if (p < 0.25) {
      t += 5.0 * u(rng);
    } else {
      t += RandomCost(rng, 1e-3, 1.0, 0.0);
    }
    r[j] = t;
  }
  return r;
}

void ExpectValidPlan(const BatchPlan& plan, int32_t n) {
  ASSERT_FALSE(plan.batch_ends.empty());
  EXPECT_EQ(plan.batch_ends.back(), n);
  EXPECT_EQ(plan.num_tokens(), n);
  int32_t prev = 0;
  for (int32_t e : plan.batch_ends) {
    EXPECT_GT(e, prev);
    prev = e;
  }
}

// Checks the solver against enumeration, and the plan's own makespan against the report.
void ExpectOptimal(double alpha, double beta, const Times& ready, const BatchPlan& plan) {
  const int32_t n = static_cast<int32_t>(ready.size());
  SCOPED_TRACE("n=" + std::to_string(n) + " alpha=" + std::to_string(alpha) +
               " beta=" + std::to_string(beta) + " ready(n)=" + std::to_string(ready.back()));
  ExpectValidPlan(plan, n);
  const double best = Enumerate(alpha, beta, ready);
  EXPECT_NEAR(plan.makespan, best, 1e-9 * std::max(1.0, best));
  EXPECT_EQ(PlanMakespan(alpha, beta, ready, plan.batch_ends), plan.makespan);
  EXPECT_NEAR(Simulate(alpha, beta, ready, plan.batch_ends), plan.makespan,
              1e-12 * std::max(1.0, plan.makespan));
  // Every boundary of the plan is reached as early as any plan of that prefix could reach it.
  for (size_t k = 0; k < plan.batch_ends.size(); ++k) {
    const int32_t end = plan.batch_ends[k];
    const Times prefix(ready.begin(), ready.begin() + end);
    const Ends prefix_ends(plan.batch_ends.begin(), plan.batch_ends.begin() + k + 1);
    const double best = Enumerate(alpha, beta, prefix);
    EXPECT_NEAR(Simulate(alpha, beta, prefix, prefix_ends), best, 1e-9 * std::max(1.0, best))
        << "boundary " << end;
  }
}

TEST(BatchSchedule, ConstantDraftTimeMatchesEnumeration) {
  std::mt19937 rng(20260513);
  for (int32_t n = 1; n <= 12; ++n) {
    for (int trial = 0; trial < 40; ++trial) {
      const double alpha = RandomCost(rng, 1e-4, 1.0, 0.1);
      const double beta = RandomCost(rng, 1e-4, 1.0, 0.1);
      const double gamma = RandomCost(rng, 1e-4, 1.0, 0.05);
      const BatchPlan plan = SolveBatchScheduleConstant(alpha, beta, gamma, n);
      const Times ready = ConstantReady(gamma, n);
      ExpectOptimal(alpha, beta, ready, plan);
      // The constant form is the measured form with ready(j) = gamma * j, exactly.
      const BatchPlan same = SolveBatchSchedule(alpha, beta, ready);
      EXPECT_EQ(same.batch_ends, plan.batch_ends);
      EXPECT_EQ(same.makespan, plan.makespan);
    }
  }
}

TEST(BatchSchedule, MeasuredReadyTimesMatchEnumeration) {
  std::mt19937 rng(7);
  for (int32_t n = 1; n <= 12; ++n) {
    for (int trial = 0; trial < 40; ++trial) {
      const double alpha = RandomCost(rng, 1e-4, 2.0, 0.1);
      const double beta = RandomCost(rng, 1e-4, 2.0, 0.1);
      const Times ready = RandomReady(rng, n);
      ExpectOptimal(alpha, beta, ready, SolveBatchSchedule(alpha, beta, ready));
    }
  }
}

TEST(BatchSchedule, ExactTiesPreferFewerBatches) {
  // All tokens ready at once and no per-batch cost: every batching takes n * beta. The
  // documented tie-break sends one batch.
  for (int32_t n = 1; n <= 12; ++n) {
    const BatchPlan plan = SolveBatchSchedule(0.0, 0.25, Times(n, 0.0));
    EXPECT_EQ(plan.batch_ends, (Ends{n}));
    EXPECT_EQ(plan.makespan, 0.25 * n);
  }
  // Free transfers: every plan finishes when the last token is drafted; one batch again.
  const BatchPlan free = SolveBatchScheduleConstant(0.0, 0.0, 0.1, 8);
  EXPECT_EQ(free.batch_ends, (Ends{8}));
  EXPECT_DOUBLE_EQ(free.makespan, 0.8);
  // Equal makespan and equal batch counts: [1 | 2 3] and [1 2 | 3] both end at 3.0; the larger
  // last batch wins.
  const BatchPlan last = SolveBatchSchedule(0.5, 0.5, {0.0, 0.5, 1.5});
  EXPECT_EQ(last.batch_ends, (Ends{1, 3}));
  EXPECT_EQ(last.makespan, 3.0);
  EXPECT_EQ(PlanMakespan(0.5, 0.5, {0.0, 0.5, 1.5}, {2, 3}), 3.0);
  // With many exact ties (times on a grid of binary fractions, so sums are exact) the plan has
  // the fewest batches among the plans whose every boundary is reached as early as possible:
  // the class the DP searches.
  std::mt19937 rng(11);
  for (int trial = 0; trial < 300; ++trial) {
    const int32_t n = 1 + static_cast<int32_t>(rng() % 10);
    Times ready(n);
    for (int32_t j = 0; j < n; ++j) ready[j] = static_cast<double>(rng() % 4) * 0.5;
    std::sort(ready.begin(), ready.end());
    const double alpha = 0.5 * static_cast<double>(rng() % 3);
    const double beta = 0.25 * static_cast<double>(rng() % 3);
    std::vector<double> prefix_best(n + 1, 0.0);
    for (int32_t k = 1; k <= n; ++k) {
      prefix_best[k] = Enumerate(alpha, beta, Times(ready.begin(), ready.begin() + k));
    }
    int32_t fewest = n;
    for (uint32_t mask = 0; mask < (1u << (n - 1)); ++mask) {
      Ends ends;
      for (int32_t k = 0; k < n - 1; ++k) {
        if (mask & (1u << k)) ends.push_back(k + 1);
      }
      ends.push_back(n);
      bool earliest = true;
      for (size_t k = 0; k < ends.size() && earliest; ++k) {
        const Ends head(ends.begin(), ends.begin() + k + 1);
        earliest = Simulate(alpha, beta, ready, head) == prefix_best[ends[k]];
      }
      if (earliest) fewest = std::min(fewest, static_cast<int32_t>(ends.size()));
    }
    const BatchPlan plan = SolveBatchSchedule(alpha, beta, ready);
    EXPECT_EQ(plan.makespan, prefix_best[n]);
    EXPECT_EQ(plan.num_batches(), fewest);
  }
}

TEST(BatchSchedule, NoStartUpCostSendsEachTokenWhenDraftingIsTheBottleneck) {
  // alpha -> 0 and every draft gap longer than a token's send time: each token leaves as soon
  // as it is drafted, one per batch; any larger batch would hold a token back.
  std::mt19937 rng(3);
  for (int32_t n : {1, 2, 5, 12, 64, 256}) {
    const double beta = 0.01;
    const BatchPlan c = SolveBatchScheduleConstant(1e-12, beta, 0.05, n);
    EXPECT_EQ(c.num_batches(), n);
    EXPECT_DOUBLE_EQ(c.makespan, 0.05 * n + 1e-12 + beta);
    Times ready(n);
    double t = 0.0;
    for (int32_t j = 0; j < n; ++j) {
      t += beta * (1.5 + std::uniform_real_distribution<double>(0, 3)(rng));
      ready[j] = t;
    }
    const BatchPlan m = SolveBatchSchedule(1e-12, beta, ready);
    EXPECT_EQ(BatchSizes(m), std::vector<int32_t>(n, 1));
  }
}

TEST(BatchSchedule, FreeStartUpMatchesOneTokenPerBatch) {
  // With alpha = 0 splitting a batch never delays anything, so one token per batch is optimal
  // in every regime (the solver may pick a tied plan with fewer batches).
  std::mt19937 rng(5);
  for (int trial = 0; trial < 100; ++trial) {
    const int32_t n = 1 + static_cast<int32_t>(rng() % 64);
    const double beta = RandomCost(rng, 1e-3, 1.0, 0.0);
    const Times ready = RandomReady(rng, n);
    Ends singles(n);
    for (int32_t j = 0; j < n; ++j) singles[j] = j + 1;
    const double one_each = PlanMakespan(0.0, beta, ready, singles);
    const BatchPlan plan = SolveBatchSchedule(0.0, beta, ready);
    EXPECT_NEAR(plan.makespan, one_each, 1e-9 * one_each);
  }
}

TEST(BatchSchedule, LargeStartUpCostSendsOneBatch) {
  for (int32_t n : {1, 2, 7, 12, 256}) {
    const BatchPlan c = SolveBatchScheduleConstant(1e6, 0.001, 0.05, n);
    EXPECT_EQ(c.batch_ends, (Ends{n}));
    EXPECT_DOUBLE_EQ(c.makespan, 0.05 * n + 1e6 + 0.001 * n);
    std::mt19937 rng(n);
    const BatchPlan m = SolveBatchSchedule(1e6, 0.5, RandomReady(rng, n));
    EXPECT_EQ(m.batch_ends, (Ends{n}));
  }
}

TEST(BatchSchedule, LargeWindowsAreNoWorseThanTheSimplePlans) {
  std::mt19937 rng(9);
  for (int trial = 0; trial < 20; ++trial) {
    const int32_t n = 256;
    const double alpha = RandomCost(rng, 1e-4, 1.0, 0.0);
    const double beta = RandomCost(rng, 1e-4, 1.0, 0.0);
    const Times ready = RandomReady(rng, n);
    const BatchPlan plan = SolveBatchSchedule(alpha, beta, ready);
    ExpectValidPlan(plan, n);
    EXPECT_EQ(PlanMakespan(alpha, beta, ready, plan.batch_ends), plan.makespan);
    Ends singles(n);
    for (int32_t j = 0; j < n; ++j) singles[j] = j + 1;
    EXPECT_LE(plan.makespan, PlanMakespan(alpha, beta, ready, singles));
    EXPECT_LE(plan.makespan, PlanMakespan(alpha, beta, ready, Ends{n}));
    // Nothing beats sending the last token alone the moment it is drafted, nor a busy link.
    EXPECT_GE(plan.makespan, ready.back() + alpha + beta);
    EXPECT_GE(plan.makespan, alpha + beta * n);
  }
  const BatchPlan big = SolveBatchScheduleConstant(0.01, 0.001, 0.05, kMaxScheduleTokens);
  EXPECT_EQ(big.num_batches(), kMaxScheduleTokens);
}

TEST(BatchSchedule, BatchSizes) {
  BatchPlan plan;
  plan.batch_ends = {3, 4, 9};
  EXPECT_EQ(BatchSizes(plan), (std::vector<int32_t>{3, 1, 5}));
  EXPECT_EQ(plan.num_batches(), 3);
  EXPECT_EQ(plan.num_tokens(), 9);
  EXPECT_TRUE(BatchSizes(BatchPlan{}).empty());
}

void ExpectScheduleError(const std::function<void()>& fn, const std::string& needle) {
  try {
    fn();
    ADD_FAILURE() << "expected ScheduleError mentioning '" << needle << "'";
  } catch (const ScheduleError& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

TEST(BatchSchedule, RejectsBadCosts) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  ExpectScheduleError([] { SolveBatchScheduleConstant(-0.1, 0.1, 0.1, 4); },
                      "alpha (per-batch send cost) must be finite and >= 0, got -0.1");
  ExpectScheduleError([&] { SolveBatchScheduleConstant(0.1, nan, 0.1, 4); }, "beta");
  ExpectScheduleError([&] { SolveBatchScheduleConstant(0.1, 0.1, inf, 4); }, "gamma");
  ExpectScheduleError([&] { SolveBatchSchedule(inf, 0.1, {1.0}); }, "alpha");
  ExpectScheduleError([&] { PlanMakespan(0.1, -1e-9, {1.0}, {1}); }, "beta");
  // Finite inputs whose times would overflow.
  ExpectScheduleError([] { SolveBatchScheduleConstant(0.0, 0.0, 1e308, 4); }, "overflow");
  ExpectScheduleError([] { SolveBatchSchedule(1e308, 1e308, {1.0, 2.0}); }, "overflow");
}

TEST(BatchSchedule, RejectsBadWindows) {
  ExpectScheduleError([] { SolveBatchScheduleConstant(0.1, 0.1, 0.1, 0); },
                      "a window needs 1 to 65536 draft tokens, got 0");
  ExpectScheduleError([] { SolveBatchScheduleConstant(0.1, 0.1, 0.1, -3); }, "got -3");
  ExpectScheduleError([] { SolveBatchScheduleConstant(0.1, 0.1, 0.1, kMaxScheduleTokens + 1); },
                      "got 65537");
  ExpectScheduleError([] { SolveBatchSchedule(0.1, 0.1, {}); }, "got 0");
  ExpectScheduleError([] { SolveBatchSchedule(0.1, 0.1, Times(kMaxScheduleTokens + 1, 1.0)); },
                      "got 65537");
  ExpectScheduleError(
      [] {
        SolveBatchSchedule(0.1, 0.1, {0.1, 0.3, 0.2});
      },
      "ready times must be non-decreasing, got ready[2] = 0.2 after ready[1] = 0.3");
  ExpectScheduleError([] { SolveBatchSchedule(0.1, 0.1, {-0.5, 1.0}); }, "ready[0] = -0.5");
  ExpectScheduleError(
      [] {
        SolveBatchSchedule(0.1, 0.1, {0.1, std::numeric_limits<double>::quiet_NaN()});
      },
      "ready[1] = nan");
  // A difference in the last digit is still named precisely.
  ExpectScheduleError(
      [] {
        SolveBatchSchedule(0.1, 0.1, {0.30000000000000004, 0.3});
      },
      "ready[1] = 0.3 after ready[0] = 0.30000000000000004");
  // Equal ready times are fine: tokens drafted together.
  EXPECT_EQ(SolveBatchSchedule(0.1, 0.1, {0.5, 0.5, 0.5}).num_tokens(), 3);
}

TEST(BatchSchedule, PlanMakespanRejectsBadPlans) {
  const Times ready = {0.1, 0.2, 0.3};
  ExpectScheduleError([&] { PlanMakespan(0.1, 0.1, ready, {}); }, "at least one batch");
  ExpectScheduleError(
      [&] {
        PlanMakespan(0.1, 0.1, ready, {1, 2});
      },
      "the last batch must end at token 3 (the window size), got 2");
  ExpectScheduleError(
      [&] {
        PlanMakespan(0.1, 0.1, ready, {2, 2, 3});
      },
      "got batch_ends[1] = 2 after 2");
  ExpectScheduleError([&] { PlanMakespan(0.1, 0.1, ready, {0, 3}); }, "batch_ends[0] = 0");
  ExpectScheduleError([&] { PlanMakespan(0.1, 0.1, ready, {5, 3}); }, "batch_ends[0] = 5");
  ExpectScheduleError([&] { PlanMakespan(0.1, 0.1, ready, {-1, 3}); }, "batch_ends[0] = -1");
  EXPECT_DOUBLE_EQ(PlanMakespan(0.1, 0.1, ready, {1, 3}), 0.6);
}

}  // namespace
}  // namespace pipesd
