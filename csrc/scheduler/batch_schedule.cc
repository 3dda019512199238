#include <algorithm>
#include <charconv>
#include <cmath>
#include <limits>
#include <string>

#include "pipesd/errors.h"
#include "pipesd/scheduler.h"

namespace pipesd {
namespace {

// Shortest text that reads back as the same double, so that a message tells apart two times
// that differ in the last digit.
std::string Num(double x) {
  char buf[32];
  auto res = std::to_chars(buf, buf + sizeof(buf), x);
  return std::string(buf, res.ptr);
}

void CheckCost(double value, const char* name, const char* meaning) {
  PIPESD_CHECK(std::isfinite(value) && value >= 0.0, ScheduleError,
               name << " (" << meaning << ") must be finite and >= 0, got " << Num(value));
}

void CheckTokenCount(int64_t n) {
  PIPESD_CHECK(n >= 1 && n <= kMaxScheduleTokens, ScheduleError,
               "a window needs 1 to " << kMaxScheduleTokens << " draft tokens, got " << n);
}

void CheckReady(const std::vector<double>& ready) {
  CheckTokenCount(static_cast<int64_t>(ready.size()));
  double prev = 0.0;
  for (size_t k = 0; k < ready.size(); ++k) {
    const double r = ready[k];
    PIPESD_CHECK(std::isfinite(r) && r >= 0.0, ScheduleError,
                 "ready times must be finite and >= 0, got ready[" << k << "] = " << Num(r));
    PIPESD_CHECK(r >= prev, ScheduleError,
                 "ready times must be non-decreasing, got ready["
                     << k << "] = " << Num(r) << " after ready[" << k - 1 << "] = " << Num(prev));
    prev = r;
  }
}

// Every candidate finish time is at most ready(n) + n * (alpha + beta): the link never idles
// after the last token is drafted and carries at most n batches. Checking that this bound is
// finite keeps infinities out of the comparisons.
void CheckBound(double alpha, double beta, double last_ready, int32_t n) {
  const double bound = last_ready + static_cast<double>(n) * (alpha + beta);
  PIPESD_CHECK(std::isfinite(bound), ScheduleError,
               "schedule times overflow: ready(n) = " << Num(last_ready)
                                                      << ", alpha = " << Num(alpha)
                                                      << ", beta = " << Num(beta) << ", n = " << n);
}

// The DP of scheduler.h. ReadyFn maps j (1-based) to ready(j). Both the solver and PlanMakespan
// compute a batch's finish as (max(link_free, ready) + alpha) + beta * size, so a returned
// plan's simulated makespan equals the reported one bit for bit.
template <typename ReadyFn>
BatchPlan Solve(double alpha, double beta, int32_t n, ReadyFn ready) {
  // dp[j]: the chosen finish time for the first j tokens; back[j]: where its last batch starts;
  // batches[j]: how many batches its plan has. One allocation each, sized once.
  std::vector<double> dp(static_cast<size_t>(n) + 1);
  std::vector<int32_t> back(static_cast<size_t>(n) + 1);
  std::vector<int32_t> batches(static_cast<size_t>(n) + 1);
  dp[0] = 0.0;
  back[0] = 0;
  batches[0] = 0;
  for (int32_t j = 1; j <= n; ++j) {
    const double r = ready(j);
    const double r_alpha = r + alpha;
    // Scanning i downwards, (r + alpha) + beta * (j - i) is a lower bound on candidate i that
    // only grows, so the scan stops once the bound passes the best value: no later i can win.
    double best = std::numeric_limits<double>::infinity();
    for (int32_t i = j - 1; i >= 0; --i) {
      const double send = beta * static_cast<double>(j - i);
      if (r_alpha + send > best) break;
      const double cand = (std::max(dp[i], r) + alpha) + send;
      if (cand < best) best = cand;
    }
    // Second pass over the near-ties of the exact minimum (not of a running one, so that the
    // tolerance never accumulates within one j): fewest batches, then the smallest i.
    const double limit = best + kScheduleTieTolerance * best;
    int32_t pick = -1;
    double pick_value = best;
    for (int32_t i = j - 1; i >= 0; --i) {
      const double send = beta * static_cast<double>(j - i);
      if (r_alpha + send > limit) break;
      const double cand = (std::max(dp[i], r) + alpha) + send;
      if (cand <= limit && (pick < 0 || batches[i] <= batches[pick])) {
        pick = i;
        pick_value = cand;
      }
    }
    dp[j] = pick_value;
    back[j] = pick;
    batches[j] = batches[pick] + 1;
  }

  BatchPlan plan;
  plan.makespan = dp[n];
  plan.batch_ends.resize(static_cast<size_t>(batches[n]));
  int32_t j = n;
  for (int32_t k = batches[n] - 1; k >= 0; --k) {
    plan.batch_ends[k] = j;
    j = back[j];
  }
  return plan;
}

}  // namespace

BatchPlan SolveBatchSchedule(double alpha, double beta, const std::vector<double>& ready) {
  CheckCost(alpha, "alpha", "per-batch send cost");
  CheckCost(beta, "beta", "per-token send cost");
  CheckReady(ready);
  const int32_t n = static_cast<int32_t>(ready.size());
  CheckBound(alpha, beta, ready.back(), n);
  const double* r = ready.data();
  return Solve(alpha, beta, n, [r](int32_t j) { return r[j - 1]; });
}

BatchPlan SolveBatchScheduleConstant(double alpha, double beta, double gamma, int32_t n) {
  CheckCost(alpha, "alpha", "per-batch send cost");
  CheckCost(beta, "beta", "per-token send cost");
  CheckCost(gamma, "gamma", "per-token draft time");
  CheckTokenCount(n);
  CheckBound(alpha, beta, gamma * static_cast<double>(n), n);
  return Solve(alpha, beta, n, [gamma](int32_t j) { return gamma * static_cast<double>(j); });
}

double PlanMakespan(double alpha, double beta, const std::vector<double>& ready,
                    const std::vector<int32_t>& batch_ends) {
  CheckCost(alpha, "alpha", "per-batch send cost");
  CheckCost(beta, "beta", "per-token send cost");
  CheckReady(ready);
  const int32_t n = static_cast<int32_t>(ready.size());
  CheckBound(alpha, beta, ready.back(), n);
  PIPESD_CHECK(!batch_ends.empty(), ScheduleError, "a plan needs at least one batch");
  PIPESD_CHECK(
      batch_ends.back() == n, ScheduleError,
      "the last batch must end at token " << n << " (the window size), got " << batch_ends.back());
  double link_free = 0.0;
  int32_t start = 0;
  for (size_t k = 0; k < batch_ends.size(); ++k) {
    const int32_t end = batch_ends[k];
    PIPESD_CHECK(end > start && end <= n, ScheduleError,
                 "batch ends must be strictly increasing within 1.."
                     << n << ", got batch_ends[" << k << "] = " << end << " after " << start);
    link_free =
        (std::max(link_free, ready[end - 1]) + alpha) + beta * static_cast<double>(end - start);
    start = end;
  }
  return link_free;
}

std::vector<int32_t> BatchSizes(const BatchPlan& plan) {
  std::vector<int32_t> sizes;
  sizes.reserve(plan.batch_ends.size());
  int32_t start = 0;
  for (int32_t end : plan.batch_ends) {
    sizes.push_back(end - start);
    start = end;
  }
  return sizes;
}

}  // namespace pipesd
