// Cooperative kernels: a persistent kernel's blocks written as C++20 coroutines, so that host
// implementations (kernels/host) can wait on each other the way CUDA blocks spin on counters, and the
// sim backend (engine/runtime) can run them block by block and detect a wait that never ends. Lives in
// engine/core because kernels, which sit below the runtime, are written against it.
#pragma once

#include <coroutine>
#include <exception>
#include <functional>
#include <string>
#include <utility>

namespace dsv4::rt {

// A persistent kernel's blocks may wait on each other (counters, barriers). On `sim` each block is a
// coroutine; the runtime resumes blocks in turn, and when every unfinished block waits on a
// condition that is false, the launch ends with a HangError naming the kernel and the blocks.

class BlockTask {
 public:
  struct promise_type {
    BlockTask get_return_object() { return BlockTask(std::coroutine_handle<promise_type>::from_promise(*this)); }
    std::suspend_always initial_suspend() noexcept { return {}; }
    std::suspend_always final_suspend() noexcept { return {}; }
    void return_void() {}
    void unhandled_exception() { error = std::current_exception(); }
    std::exception_ptr error;
  };
  explicit BlockTask(std::coroutine_handle<promise_type> h) : handle_(h) {}
  BlockTask(BlockTask&& other) noexcept : handle_(std::exchange(other.handle_, {})) {}
  BlockTask& operator=(BlockTask&& other) noexcept {
    if (this != &other) {
      if (handle_) handle_.destroy();
      handle_ = std::exchange(other.handle_, {});
    }
    return *this;
  }
  BlockTask(const BlockTask&) = delete;
  BlockTask& operator=(const BlockTask&) = delete;
  ~BlockTask() {
    if (handle_) handle_.destroy();
  }
  std::coroutine_handle<promise_type> handle() const { return handle_; }

 private:
  std::coroutine_handle<promise_type> handle_;
};

class BlockContext {
 public:
  BlockContext(int block, int blocks) : block_(block), blocks_(blocks) {}
  int block() const { return block_; }
  int blocks() const { return blocks_; }

  // `co_await ctx.wait_until(ready, "counter[3] >= 4")` suspends the block until ready() is true.
  // GCC 12 destroys temporaries of a co_await expression twice: with a lambda that captures
  // anything non-trivially destructible (a shared_ptr, a std::string), build the Wait as a named
  // local first (`auto wait = ctx.wait_until(...); co_await wait;`).
  struct Wait {
    BlockContext* ctx;
    std::function<bool()> ready;
    std::string what;
    bool await_ready() const { return ready(); }
    void await_suspend(std::coroutine_handle<>) {
      ctx->waiting_on_ = ready;
      ctx->waiting_what_ = what;
    }
    void await_resume() {
      ctx->waiting_on_ = nullptr;
      ctx->waiting_what_.clear();
    }
  };
  Wait wait_until(std::function<bool()> ready, std::string what) { return Wait{this, std::move(ready), std::move(what)}; }

  // For the scheduler: is the block suspended on a condition, and is that condition now true?
  bool waiting() const { return static_cast<bool>(waiting_on_); }
  bool can_resume() const { return !waiting_on_ || waiting_on_(); }
  const std::string& waiting_what() const { return waiting_what_; }

 private:
  int block_;
  int blocks_;
  std::function<bool()> waiting_on_;
  std::string waiting_what_;
};

}  // namespace dsv4::rt
