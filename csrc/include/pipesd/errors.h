// One error hierarchy for the whole core; bindings/ maps each class to a Python exception.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace pipesd {

class PipesdError : public std::runtime_error {
 public:
  explicit PipesdError(const std::string& what) : std::runtime_error(what) {}
};

// Misuse of the speculation ledger: a verdict that cannot belong to the window in flight,
// a rollback past the committed prefix, and so on. These are bugs in the caller.
class LedgerError : public PipesdError {
 public:
  using PipesdError::PipesdError;
};

class ProtocolError : public PipesdError {
 public:
  using PipesdError::PipesdError;
};

class TransportError : public PipesdError {
 public:
  using PipesdError::PipesdError;
};

class ScheduleError : public PipesdError {
 public:
  using PipesdError::PipesdError;
};

}  // namespace pipesd

// Throws Error with a message built by streaming `msg` when `cond` is false.
#define PIPESD_CHECK(cond, Error, msg)               \
  do {                                               \
    if (!(cond)) {                                   \
      std::ostringstream pipesd_check_os_;           \
      pipesd_check_os_ << msg;                       \
      throw ::pipesd::Error(pipesd_check_os_.str()); \
    }                                                \
  } while (0)
