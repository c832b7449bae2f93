#include "properties/isolation.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <stdexcept>
#include <system_error>

namespace dsv4::props {

namespace {

using Clock = std::chrono::steady_clock;

[[noreturn]] void throw_os_error(const char* what) {
  throw std::system_error(errno, std::generic_category(), std::string("run_isolated: ") + what);
}

// Owns one descriptor so that every early return and throw closes it.
class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) : fd_(fd) {}
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd() { reset(); }
  int get() const { return fd_; }
  bool open() const { return fd_ >= 0; }
  void reset(int fd = -1) {
    // Not retried on EINTR: on Linux the descriptor is released even when close reports it.
    if (fd_ >= 0) ::close(fd_);
    fd_ = fd;
  }

 private:
  int fd_ = -1;
};

struct Pipe {
  Fd read;
  Fd write;
};

void make_pipe(Pipe& p, const char* what) {
  int fds[2];
  // CLOEXEC so that neither end leaks into a program that a case (or the parent) might exec.
  if (::pipe2(fds, O_CLOEXEC) != 0) throw_os_error(what);
  p.read.reset(fds[0]);
  p.write.reset(fds[1]);
}

bool write_all(int fd, const void* data, std::size_t size) {
  const char* p = static_cast<const char*>(data);
  while (size > 0) {
    const ssize_t n = ::write(fd, p, size);
    if (n < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    p += n;
    size -= static_cast<std::size_t>(n);
  }
  return true;
}

// fds 0-2 are about to be replaced in the child; a pipe end that landed there (the parent had
// closed its stdio) is moved out of the way first.
int above_stdio(int fd) {
  if (fd > 2) return fd;
  const int moved = ::fcntl(fd, F_DUPFD_CLOEXEC, 3);
  return moved >= 0 ? moved : fd;
}

void child_run(const std::function<std::string()>& fn, int payload_fd, int err_fd) {
  payload_fd = above_stdio(payload_fd);
  err_fd = above_stdio(err_fd);
  const int null_fd = ::open("/dev/null", O_RDWR | O_CLOEXEC);
  if (null_fd >= 0) {
    ::dup2(null_fd, STDIN_FILENO);
    ::dup2(null_fd, STDOUT_FILENO);
  }
  if (::dup2(err_fd, STDERR_FILENO) < 0) ::_exit(kExitDeliveryFailed);
  // No core files: a search or shrink can crash thousands of cases, and a core of a process with
  // a GPU context is huge. Reproduce a case directly to get one.
  rlimit core{};
  if (::getrlimit(RLIMIT_CORE, &core) == 0) {
    core.rlim_cur = 0;
    ::setrlimit(RLIMIT_CORE, &core);
  }

  std::string out;
  try {
    out = fn();
  } catch (const std::exception& e) {
    const std::string msg = std::string("run_isolated: uncaught exception: ") + e.what() + "\n";
    write_all(STDERR_FILENO, msg.data(), msg.size());
    ::_exit(kExitUncaughtException);
  } catch (...) {
    const std::string msg = "run_isolated: uncaught exception of a non-std type\n";
    write_all(STDERR_FILENO, msg.data(), msg.size());
    ::_exit(kExitUncaughtException);
  }
  // Length first, so that the parent can tell a whole payload from one cut short by a crash.
  const uint64_t size = out.size();
  if (!write_all(payload_fd, &size, sizeof size) || !write_all(payload_fd, out.data(), out.size())) {
    ::_exit(kExitDeliveryFailed);
  }
  // _exit: the child must not run the parent's atexit handlers, static destructors or leak check.
  ::_exit(0);
}

[[noreturn]] void child_main(const std::function<std::string()>& fn, int payload_fd, int err_fd) {
  // Nothing may unwind out of here: the child would go on to run the parent's code (its caller).
  try {
    child_run(fn, payload_fd, err_fd);
  } catch (...) {
  }
  ::_exit(kExitUncaughtException);
}

// The forked child until it is reaped; the destructor kills and reaps it on the parent's error
// paths so that a throw leaves no running child and no zombie behind.
class Child {
 public:
  explicit Child(pid_t pid) : pid_(pid) {}
  Child(const Child&) = delete;
  Child& operator=(const Child&) = delete;
  ~Child() {
    if (pid_ <= 0) return;
    ::kill(pid_, SIGKILL);
    int status = 0;
    while (::waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
    }
  }
  pid_t pid() const { return pid_; }
  // True once the child has ended; its wait status is in `status`.
  bool try_reap(int& status) { return wait(status, WNOHANG); }
  void reap(int& status) { wait(status, 0); }

 private:
  bool wait(int& status, int flags) {
    for (;;) {
      const pid_t r = ::waitpid(pid_, &status, flags);
      if (r == pid_) {
        pid_ = -1;
        return true;
      }
      if (r == 0) return false;
      if (errno == EINTR) continue;
      pid_ = -1;  // ECHILD: nothing left to kill or reap in the destructor
      throw_os_error("waitpid");
    }
  }
  pid_t pid_;
};

enum class ReadResult { data, again, eof };

// One read of whatever is ready; appends to `sink`.
ReadResult read_some(int fd, std::string& sink) {
  std::array<char, 1 << 16> buf;
  for (;;) {
    const ssize_t n = ::read(fd, buf.data(), buf.size());
    if (n > 0) {
      sink.append(buf.data(), static_cast<std::size_t>(n));
      return ReadResult::data;
    }
    if (n == 0) return ReadResult::eof;
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return ReadResult::again;
    throw_os_error("read");
  }
}

// Keeps only the end of a stream; trims in batches so that a chatty child costs O(bytes).
void keep_tail(std::string& s) {
  if (s.size() > 2 * kStderrTailBytes) s.erase(0, s.size() - kStderrTailBytes);
}

// Reads one pipe end; closes it at EOF.
void pump(Fd& fd, std::string& sink, bool is_stderr) {
  if (read_some(fd.get(), sink) == ReadResult::eof) fd.reset();
  if (is_stderr) keep_tail(sink);
}

// After the child is reaped: takes what is left in the pipe without blocking (a grandchild may
// still hold the write end).
void drain(Fd& fd, std::string& sink, bool is_stderr) {
  while (fd.open()) {
    const ReadResult r = read_some(fd.get(), sink);
    if (is_stderr) keep_tail(sink);
    if (r == ReadResult::again) break;
    if (r == ReadResult::eof) fd.reset();
  }
  fd.reset();
}

void set_nonblocking(const Fd& fd) {
  const int flags = ::fcntl(fd.get(), F_GETFL);
  if (flags < 0 || ::fcntl(fd.get(), F_SETFL, flags | O_NONBLOCK) < 0) throw_os_error("fcntl");
}

// Wakes up at least this often while the pipes are idle, to notice a child that died while a
// grandchild keeps its pipes open.
constexpr int kMaxPollMs = 50;

}  // namespace

IsolatedRun run_isolated(const std::function<std::string()>& fn, double timeout_s) {
  if (!(timeout_s > 0)) {
    throw std::invalid_argument("run_isolated: timeout_s must be > 0, got " + std::to_string(timeout_s));
  }
  Pipe payload_pipe;
  Pipe err_pipe;
  make_pipe(payload_pipe, "pipe (payload)");
  make_pipe(err_pipe, "pipe (stderr)");
  // Flush now, or text buffered in the parent would be written a second time if the child flushes.
  std::fflush(nullptr);

  const Clock::time_point start = Clock::now();
  // Beyond ~30 years the deadline would overflow the clock; treat it as none.
  const bool has_deadline = timeout_s < 1e9;
  const Clock::time_point deadline =
      has_deadline
          ? start + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(timeout_s))
          : Clock::time_point::max();

  const pid_t pid = ::fork();
  if (pid < 0) throw_os_error("fork");
  if (pid == 0) {
    payload_pipe.read.reset();
    err_pipe.read.reset();
    child_main(fn, payload_pipe.write.get(), err_pipe.write.get());
  }
  Child child(pid);
  // The parent's write ends must go, or the pipes never reach EOF.
  payload_pipe.write.reset();
  err_pipe.write.reset();
  set_nonblocking(payload_pipe.read);
  set_nonblocking(err_pipe.read);

  IsolatedRun run;
  std::string received;  // 8-byte length, then the payload
  int status = 0;
  bool timed_out = false;
  for (;;) {
    int wait_ms = kMaxPollMs;
    if (has_deadline) {
      const auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - Clock::now()).count();
      wait_ms = static_cast<int>(std::clamp<long long>(left, 0, kMaxPollMs));
    }
    std::array<pollfd, 2> fds{};
    nfds_t nfds = 0;
    if (payload_pipe.read.open()) fds[nfds++] = {payload_pipe.read.get(), POLLIN, 0};
    if (err_pipe.read.open()) fds[nfds++] = {err_pipe.read.get(), POLLIN, 0};
    // Both pipes closed but the child not yet reaped: it is exiting, or it closed them itself.
    const int r = ::poll(nfds ? fds.data() : nullptr, nfds, nfds ? wait_ms : std::min(wait_ms, 1));
    if (r < 0 && errno != EINTR) throw_os_error("poll");
    for (nfds_t i = 0; r > 0 && i < nfds; ++i) {
      if (fds[i].revents == 0) continue;
      if (fds[i].fd == payload_pipe.read.get()) {
        pump(payload_pipe.read, received, false);
      } else {
        pump(err_pipe.read, run.stderr_tail, true);
      }
    }
    if (child.try_reap(status)) break;
    if (Clock::now() >= deadline) {
      ::kill(child.pid(), SIGKILL);
      child.reap(status);
      timed_out = true;
      break;
    }
  }
  drain(payload_pipe.read, received, false);
  drain(err_pipe.read, run.stderr_tail, true);
  if (run.stderr_tail.size() > kStderrTailBytes) {
    run.stderr_tail.erase(0, run.stderr_tail.size() - kStderrTailBytes);
  }
  run.seconds = std::chrono::duration<double>(Clock::now() - start).count();

  if (timed_out) {
    run.status = IsolatedRun::Status::timed_out;
    return run;
  }
  run.status = IsolatedRun::Status::crashed;
  if (WIFSIGNALED(status)) {
    run.signal = WTERMSIG(status);
    return run;
  }
  run.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 0;
  uint64_t size = 0;
  if (received.size() >= sizeof size) std::memcpy(&size, received.data(), sizeof size);
  const bool whole = received.size() >= sizeof size && received.size() - sizeof size == size;
  if (run.exit_code == 0 && whole) {
    run.status = IsolatedRun::Status::completed;
    received.erase(0, sizeof size);
    run.payload = std::move(received);
  }
  return run;
}

std::string IsolatedRun::describe() const {
  char buf[96];
  switch (status) {
    case Status::completed:
      std::snprintf(buf, sizeof buf, "completed in %.2f s", seconds);
      return buf;
    case Status::timed_out:
      std::snprintf(buf, sizeof buf, "no result after %.1f s (killed)", seconds);
      return buf;
    case Status::crashed:
      break;
  }
  if (signal != 0) return "killed by " + signal_name(signal) + " (signal " + std::to_string(signal) + ")";
  if (exit_code == 0) return "exited with code 0 without delivering a result (did the case call exit?)";
  std::string out = "exited with code " + std::to_string(exit_code) + " without a result";
  if (exit_code == kExitUncaughtException) out += " (uncaught exception)";
  if (exit_code == kExitDeliveryFailed) out += " (could not deliver its result)";
  return out;
}

std::string signal_name(int signal) {
  switch (signal) {
    case SIGHUP: return "SIGHUP";
    case SIGINT: return "SIGINT";
    case SIGQUIT: return "SIGQUIT";
    case SIGILL: return "SIGILL";
    case SIGTRAP: return "SIGTRAP";
    case SIGABRT: return "SIGABRT";
    case SIGBUS: return "SIGBUS";
    case SIGFPE: return "SIGFPE";
    case SIGKILL: return "SIGKILL";
    case SIGUSR1: return "SIGUSR1";
    case SIGSEGV: return "SIGSEGV";
    case SIGUSR2: return "SIGUSR2";
    case SIGPIPE: return "SIGPIPE";
    case SIGALRM: return "SIGALRM";
    case SIGTERM: return "SIGTERM";
    case SIGXCPU: return "SIGXCPU";
    case SIGXFSZ: return "SIGXFSZ";
    case SIGSYS: return "SIGSYS";
    default: return "signal " + std::to_string(signal);
  }
}

}  // namespace dsv4::props
