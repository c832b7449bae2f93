// Crash isolation for property cases: run_isolated runs one case in a forked child, so a case that
// kills its process (SIGSEGV, SIGFPE, abort, a sanitizer abort, a sticky CUDA error, an endless
// loop) becomes a crashed or timed_out result here instead of taking the harness down with it.
//
// Rules for the caller:
//  * Call it only from a single-threaded process. fork copies only the calling thread; a lock that
//    another thread held at that moment (malloc, stdio, a thread pool, the CUDA driver) stays held
//    forever in the child, which then deadlocks and comes back as a false timed_out.
//  * Do not initialise CUDA in the parent. The CUDA runtime does not survive fork; each child must
//    create its own context, which also keeps a sticky error inside the child that caused it.
//  * Do not set SIGCHLD to SIG_IGN: the kernel then reaps the child itself and its status is lost
//    (waitpid fails and run_isolated throws).
#pragma once

#include <cstddef>
#include <functional>
#include <string>

namespace dsv4::props {

// The child's exit code when an exception escapes fn; its what() goes to stderr_tail.
inline constexpr int kExitUncaughtException = 3;
// The child's exit code when fn returned but its result could not be written to the parent.
inline constexpr int kExitDeliveryFailed = 4;
// How much of the child's stderr IsolatedRun keeps (the end of it, where crash reports finish).
inline constexpr std::size_t kStderrTailBytes = 4096;

struct IsolatedRun {
  enum class Status { completed, crashed, timed_out };
  Status status = Status::completed;
  std::string payload;      // what fn returned (completed only)
  int signal = 0;           // crashed by a signal: its number
  int exit_code = 0;        // crashed by exiting (signal == 0) without delivering a payload
  std::string stderr_tail;  // the last kStderrTailBytes the child wrote to stderr
  double seconds = 0;       // wall time from fork to reaping the child

  bool completed() const { return status == Status::completed; }
  // One line for a report: "completed in 0.01 s", "killed by SIGSEGV (signal 11)",
  // "exited with code 1 without a result", "no result after 5.0 s (killed)".
  std::string describe() const;
};

// Runs fn in a forked child and returns what it returned. The child's stdin and stdout are
// /dev/null, its stderr goes to a pipe whose tail is kept, it writes no core file (soft
// RLIMIT_CORE 0), and it leaves with _exit (no atexit handlers, no static destructors, no leak
// check of the copied parent state). The parent reads while it waits, so payloads of any size
// are fine; past timeout_s (> 0, may be infinity) it SIGKILLs the child. The child is always
// reaped and every descriptor opened here is closed, also on a throw. Throws std::system_error
// when pipe/fork/poll/waitpid fail, std::invalid_argument for a bad timeout.
IsolatedRun run_isolated(const std::function<std::string()>& fn, double timeout_s);

// "SIGSEGV", "SIGFPE", "SIGABRT", "SIGKILL", ...; "signal N" for one without a name here.
std::string signal_name(int signal);

}  // namespace dsv4::props
