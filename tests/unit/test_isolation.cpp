// properties/isolation by example: payloads of every size come back whole; a child that dies by a
// signal, exits on its own, throws, or never finishes becomes crashed / timed_out with the right
// detail; and a long series of runs leaves no descriptor open and no zombie behind.
#include <gtest/gtest.h>

#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "properties/isolation.h"

#if defined(__SANITIZE_ADDRESS__)
#define DSV4_TEST_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define DSV4_TEST_SANITIZED 1
#endif
#endif
#ifndef DSV4_TEST_SANITIZED
#define DSV4_TEST_SANITIZED 0
#endif

namespace dsv4::props {
namespace {

using Status = IsolatedRun::Status;

bool contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

int open_fd_count() {
  int n = 0;
  for (const auto& entry : std::filesystem::directory_iterator("/proc/self/fd")) {
    (void)entry;
    ++n;
  }
  return n;
}

// A case that dies of `signal`. Under ASan/UBSan the sanitizer catches SIGSEGV and SIGFPE first,
// prints its report (naming `report_word`) and aborts or exits 1; the report must then be captured.
void expect_killed_by(const IsolatedRun& run, int signal, const std::string& report_word) {
  ASSERT_EQ(run.status, Status::crashed) << run.describe();
  EXPECT_TRUE(run.payload.empty());
  if (DSV4_TEST_SANITIZED && run.signal != signal) {
    EXPECT_TRUE(run.signal != 0 || run.exit_code != 0) << run.describe();
    EXPECT_TRUE(contains(run.stderr_tail, report_word)) << run.stderr_tail;
    return;
  }
  EXPECT_EQ(run.signal, signal) << run.describe();
  EXPECT_EQ(signal_name(run.signal), signal_name(signal));
  EXPECT_EQ(run.describe(),
            "killed by " + signal_name(signal) + " (signal " + std::to_string(signal) + ")");
}

TEST(Isolation, PayloadsComeBackWhole) {
  const IsolatedRun empty = run_isolated([] { return std::string(); }, 10);
  ASSERT_EQ(empty.status, Status::completed) << empty.describe() << empty.stderr_tail;
  EXPECT_EQ(empty.payload, "");

  const IsolatedRun small = run_isolated([] { return std::string("pass\0mid", 8); }, 10);
  ASSERT_EQ(small.status, Status::completed) << small.describe() << small.stderr_tail;
  EXPECT_EQ(small.payload, std::string("pass\0mid", 8));
  EXPECT_EQ(small.signal, 0);
  EXPECT_EQ(small.exit_code, 0);
  EXPECT_TRUE(contains(small.describe(), "completed")) << small.describe();

  // Far beyond a pipe's 64 KiB: the parent must read while it waits, or both sides block.
  std::string big(8u << 20, '\0');
  for (size_t i = 0; i < big.size(); ++i) big[i] = static_cast<char>((i * 131 + i / 4099) & 0xff);
  const IsolatedRun large = run_isolated([&big] { return big; }, 60);
  ASSERT_EQ(large.status, Status::completed) << large.describe() << large.stderr_tail;
  ASSERT_EQ(large.payload.size(), big.size());
  EXPECT_TRUE(large.payload == big);
}

TEST(Isolation, SegfaultIsACrashWithItsSignal) {
  const IsolatedRun run = run_isolated([]() -> std::string {
    std::raise(SIGSEGV);
    return "survived";
  }, 10);
  expect_killed_by(run, SIGSEGV, "SEGV");
}

TEST(Isolation, FloatingPointExceptionIsACrashWithItsSignal) {
  const IsolatedRun run = run_isolated([]() -> std::string {
    std::raise(SIGFPE);
    return "survived";
  }, 10);
  expect_killed_by(run, SIGFPE, "FPE");
}

TEST(Isolation, AbortIsACrashWithItsSignal) {
  const IsolatedRun run = run_isolated([]() -> std::string {
    std::fprintf(stderr, "dsv4: internal invariant violated: about to abort\n");
    std::abort();
  }, 10);
  ASSERT_EQ(run.status, Status::crashed) << run.describe();
  EXPECT_EQ(run.signal, SIGABRT);
  EXPECT_EQ(run.describe(), "killed by SIGABRT (signal 6)");
  EXPECT_TRUE(contains(run.stderr_tail, "about to abort")) << run.stderr_tail;
}

TEST(Isolation, IntegerDivisionByZeroIsACrash) {
  const IsolatedRun run = run_isolated([] {
    // Both volatile: GCC turns 1 / x into a compare that never traps, and folds a known divisor.
    volatile int dividend = 1000;
    volatile int divisor = 0;
    const int quotient = dividend / divisor;
    return std::to_string(quotient);
  }, 10);
  ASSERT_EQ(run.status, Status::crashed) << run.describe() << " payload " << run.payload;
  if (DSV4_TEST_SANITIZED) {
    // UBSan reports the division and aborts (or exits) before the CPU can raise SIGFPE.
    EXPECT_TRUE(run.signal != 0 || run.exit_code != 0) << run.describe();
    EXPECT_TRUE(contains(run.stderr_tail, "division by zero")) << run.stderr_tail;
  } else {
    EXPECT_EQ(run.signal, SIGFPE) << run.describe();
    EXPECT_EQ(signal_name(run.signal), "SIGFPE");
  }
}

TEST(Isolation, EndlessLoopTimesOut) {
  const auto start = std::chrono::steady_clock::now();
  const IsolatedRun run = run_isolated([] {
    volatile bool forever = true;
    while (forever) {
    }
    return std::string("unreachable");
  }, 0.5);
  const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  ASSERT_EQ(run.status, Status::timed_out) << run.describe();
  EXPECT_GE(run.seconds, 0.5);
  EXPECT_LT(elapsed, 2.0);
  EXPECT_TRUE(run.payload.empty());
  EXPECT_TRUE(contains(run.describe(), "no result after 0.5 s (killed)")) << run.describe();
}

TEST(Isolation, ExitWithoutAResultIsACrashWithItsCode) {
  const IsolatedRun seven = run_isolated([]() -> std::string { ::_exit(7); }, 10);
  ASSERT_EQ(seven.status, Status::crashed) << seven.describe();
  EXPECT_EQ(seven.signal, 0);
  EXPECT_EQ(seven.exit_code, 7);
  EXPECT_EQ(seven.describe(), "exited with code 7 without a result");

  // A clean exit 0 that delivered nothing is still no result.
  const IsolatedRun zero = run_isolated([]() -> std::string { ::_exit(0); }, 10);
  ASSERT_EQ(zero.status, Status::crashed) << zero.describe();
  EXPECT_EQ(zero.signal, 0);
  EXPECT_EQ(zero.exit_code, 0);
  EXPECT_TRUE(contains(zero.describe(), "code 0 without delivering a result")) << zero.describe();
}

TEST(Isolation, EscapingExceptionIsACrashWithItsMessage) {
  const IsolatedRun run = run_isolated([]() -> std::string {
    throw std::runtime_error("indexer_logits: case 42 went wrong");
  }, 10);
  ASSERT_EQ(run.status, Status::crashed) << run.describe();
  EXPECT_EQ(run.signal, 0);
  EXPECT_EQ(run.exit_code, kExitUncaughtException);
  EXPECT_TRUE(contains(run.stderr_tail, "indexer_logits: case 42 went wrong")) << run.stderr_tail;
  EXPECT_TRUE(contains(run.describe(), "uncaught exception")) << run.describe();

  const IsolatedRun odd = run_isolated([]() -> std::string { throw 17; }, 10);
  ASSERT_EQ(odd.status, Status::crashed) << odd.describe();
  EXPECT_EQ(odd.exit_code, kExitUncaughtException);
  EXPECT_TRUE(contains(odd.stderr_tail, "non-std type")) << odd.stderr_tail;
}

TEST(Isolation, StderrKeepsOnlyTheTail) {
  // 1 MiB of chatter on stderr (and more on stdout, which goes to /dev/null) must neither block the
  // child nor be kept whole.
  const IsolatedRun run = run_isolated([] {
    const std::string line(1023, 'x');
    for (int i = 0; i < 1024; ++i) {
      std::fprintf(stderr, "%s\n", line.c_str());
      std::fprintf(stdout, "%s\n", line.c_str());
    }
    std::fprintf(stderr, "last words\n");
    return std::string("done");
  }, 30);
  ASSERT_EQ(run.status, Status::completed) << run.describe();
  EXPECT_EQ(run.payload, "done");
  EXPECT_EQ(run.stderr_tail.size(), kStderrTailBytes);
  EXPECT_TRUE(run.stderr_tail.ends_with("xxx\nlast words\n")) << run.stderr_tail.substr(4000);

  // Between one and two tails' worth arrives in one piece: still cut to the tail.
  const IsolatedRun some = run_isolated([] {
    const std::string text = std::string(6000, 'y') + "the end\n";
    std::fputs(text.c_str(), stderr);
    return std::string();
  }, 30);
  ASSERT_EQ(some.status, Status::completed) << some.describe();
  EXPECT_EQ(some.stderr_tail, std::string(kStderrTailBytes - 8, 'y') + "the end\n");
}

TEST(Isolation, ManyRunsLeakNoDescriptorAndNoZombie) {
  const int before = open_fd_count();
  // Every way out: a result, a signal, an exit, an exception, and now and then a kill at the deadline.
  for (int i = 0; i < 200; ++i) {
    const bool hang = i % 50 == 49;
    const IsolatedRun run = run_isolated([i, hang]() -> std::string {
      volatile bool forever = hang;
      while (forever) {
      }
      switch (i % 4) {
        case 0: return std::to_string(i);
        case 1: std::abort();
        case 2: ::_exit(5);
        default: throw std::runtime_error("thrown");
      }
    }, hang ? 0.05 : 10);
    const Status expected = hang ? Status::timed_out : i % 4 == 0 ? Status::completed : Status::crashed;
    ASSERT_EQ(run.status, expected) << "run " << i << ": " << run.describe();
  }
  EXPECT_EQ(open_fd_count(), before);
  // Every child was reaped: none is left, dead or alive.
  int status = 0;
  errno = 0;
  EXPECT_EQ(::waitpid(-1, &status, WNOHANG), -1);
  EXPECT_EQ(errno, ECHILD);
}

TEST(Isolation, TheChildWritesOnlyItsOwnCopy) {
  std::vector<int> data(4096, 1);
  int counter = 5;
  const IsolatedRun run = run_isolated([&] {
    data.assign(data.size(), 2);
    counter = 99;
    return std::to_string(counter + data.front() + data.back());
  }, 10);
  ASSERT_EQ(run.status, Status::completed) << run.describe();
  EXPECT_EQ(run.payload, "103");  // the child did write
  EXPECT_EQ(counter, 5);          // ... but not here
  EXPECT_EQ(data, std::vector<int>(4096, 1));
}

pid_t g_parent_pid = 0;
void report_exit_handler_in_child() {
  if (::getpid() != g_parent_pid) std::fputs("the parent's exit handler ran in the child\n", stderr);
}

TEST(Isolation, TheChildSkipsTheParentsExitHandlers) {
  // An exit handler (or static destructor) of the parent, e.g. a report writer, must not run twice.
  g_parent_pid = ::getpid();
  std::atexit(report_exit_handler_in_child);
  const IsolatedRun run = run_isolated([] { return std::string("ok"); }, 10);
  ASSERT_EQ(run.status, Status::completed) << run.describe();
  EXPECT_FALSE(contains(run.stderr_tail, "exit handler ran")) << run.stderr_tail;
}

TEST(Isolation, SignalNames) {
  EXPECT_EQ(signal_name(SIGSEGV), "SIGSEGV");
  EXPECT_EQ(signal_name(SIGFPE), "SIGFPE");
  EXPECT_EQ(signal_name(SIGABRT), "SIGABRT");
  EXPECT_EQ(signal_name(SIGKILL), "SIGKILL");
  EXPECT_EQ(signal_name(SIGBUS), "SIGBUS");
  EXPECT_EQ(signal_name(SIGILL), "SIGILL");
  EXPECT_EQ(signal_name(64), "signal 64");
}

TEST(Isolation, RefusesATimeoutThatIsNotPositive) {
  const auto fn = [] { return std::string(); };
  EXPECT_THROW(run_isolated(fn, 0), std::invalid_argument);
  EXPECT_THROW(run_isolated(fn, -1), std::invalid_argument);
  EXPECT_THROW(run_isolated(fn, std::nan("")), std::invalid_argument);
  // No deadline at all is allowed.
  const IsolatedRun run = run_isolated(
      [] { return std::string("ok"); }, std::numeric_limits<double>::infinity());
  EXPECT_EQ(run.payload, "ok");
}

}  // namespace
}  // namespace dsv4::props
