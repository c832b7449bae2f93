// The `sim` backend (sim_runtime.h). One scheduler serves every simulated device: each stream is a
// FIFO of ops, nothing runs at issue time, and every choice among ready ops goes through one
// strategy and is recorded, so a run is a pure function of the program and the Schedule.
#include "engine/runtime/sim_runtime.h"

#include <algorithm>
#include <cstring>
#include <deque>
#include <functional>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "engine/core/error.h"

namespace dsv4::rt {

namespace {

// splitmix64: tiny, fast, and its whole state is the seed, which is all a case file needs to keep.
class SplitMix64 {
 public:
  explicit SplitMix64(uint64_t seed) : state_(seed) {}
  uint64_t next() {
    uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  // Uniform in [0, n): the multiply-shift mapping keeps it one draw per call (bias < n / 2^64).
  uint64_t below(uint64_t n) {
    DSV4_ASSERT(n > 0, "below(0)");
    return static_cast<uint64_t>((static_cast<unsigned __int128>(next()) * n) >> 64);
  }

 private:
  uint64_t state_;
};

// Decimal digits only: a schedule string is a user's flag, so "+3", " 3" or "0x3" are refused.
bool parse_u64(const std::string& text, uint64_t& out) {
  if (text.empty() || text.size() > 20) return false;
  uint64_t value = 0;
  for (char ch : text) {
    if (ch < '0' || ch > '9') return false;
    const uint64_t digit = static_cast<uint64_t>(ch - '0');
    if (value > (std::numeric_limits<uint64_t>::max() - digit) / 10) return false;
    value = value * 10 + digit;
  }
  out = value;
  return true;
}

bool parse_bounded(const std::string& text, uint64_t lo, uint64_t hi, uint64_t& out) {
  return parse_u64(text, out) && out >= lo && out <= hi;
}

std::vector<std::string> split_fields(const std::string& text) {
  std::vector<std::string> fields(1);
  for (char ch : text) {
    if (ch == ':') {
      fields.emplace_back();
    } else {
      fields.back().push_back(ch);
    }
  }
  return fields;
}

std::string join_ints(const std::vector<int>& values) {
  std::string out;
  for (size_t i = 0; i < values.size(); ++i) out += (i ? ", " : "") + std::to_string(values[i]);
  return out;
}

enum class OpKind : uint8_t { launch, record, wait, replay, collective };

constexpr uint64_t kPriorityBase = uint64_t{1} << 62;   // initial pct priorities lie above this
constexpr uint64_t kMaxResumesPerKernel = uint64_t{1} << 24;  // a livelock bound, far above real kernels
constexpr int kMaxPctDepth = 64;

}  // namespace

// ---- Schedule ----------------------------------------------------------------------------------

Schedule Schedule::parse(const std::string& text, const std::string& flag) {
  auto bad = [&](const std::string& why) {
    return InputError(flag, "schedule",
                      "'" + text + "': " + why +
                          " (expected in-order, random:SEED, pct:SEED:DEPTH or delay:STREAM:OPS)");
  };
  const std::vector<std::string> f = split_fields(text);
  Schedule s;
  uint64_t a = 0;
  uint64_t b = 0;
  if (f[0] == "in-order") {
    if (f.size() != 1) throw bad("in-order takes no arguments");
    s.kind = Kind::in_order;
  } else if (f[0] == "random") {
    if (f.size() != 2) throw bad("random takes exactly one argument, the seed");
    if (!parse_u64(f[1], a)) throw bad("the seed must be a decimal unsigned 64-bit integer");
    s.kind = Kind::random;
    s.seed = a;
  } else if (f[0] == "pct") {
    if (f.size() != 3) throw bad("pct takes a seed and a depth");
    if (!parse_u64(f[1], a)) throw bad("the seed must be a decimal unsigned 64-bit integer");
    if (!parse_bounded(f[2], 1, kMaxPctDepth, b)) throw bad("the depth must be an integer in [1, 64]");
    s.kind = Kind::pct;
    s.seed = a;
    s.pct_depth = static_cast<int>(b);
  } else if (f[0] == "delay") {
    if (f.size() != 3) throw bad("delay takes a stream id and a number of ops");
    if (!parse_bounded(f[1], 0, std::numeric_limits<int32_t>::max(), a)) {
      throw bad("the stream must be a non-negative integer stream id");
    }
    if (!parse_bounded(f[2], 0, std::numeric_limits<int>::max(), b)) {
      throw bad("the number of ops must be a non-negative integer");
    }
    s.kind = Kind::delay;
    s.delay_stream = static_cast<int32_t>(a);
    s.delay_ops = static_cast<int>(b);
  } else {
    throw bad("unknown strategy '" + f[0] + "'");
  }
  return s;
}

std::string Schedule::str() const {
  switch (kind) {
    case Kind::in_order: return "in-order";
    case Kind::random: return "random:" + std::to_string(seed);
    case Kind::pct: return "pct:" + std::to_string(seed) + ":" + std::to_string(pct_depth);
    case Kind::delay: return "delay:" + std::to_string(delay_stream) + ":" + std::to_string(delay_ops);
    case Kind::replay: return "replay(" + std::to_string(choices.size()) + " choices)";
  }
  return "?";
}

// ---- the scheduler -----------------------------------------------------------------------------

struct SimRuntime::Impl {
  // A matched collective: one object shared by the queue entries of all its participants.
  struct CollShared {
    int comm = -1;
    std::string op;
    std::vector<CollectivePart> parts;
    std::vector<int32_t> streams;  // the participants' streams, in parts order
    std::vector<uint8_t*> send;    // resolved at match time; `keep` holds the memory until it ran
    std::vector<uint8_t*> recv;
    std::vector<std::shared_ptr<Storage>> keep;
    bool refused = false;          // failed validation: each slot is a no-op, so the queues stay aligned
  };
  // One rank's queue entry for a collective. The base tells the backend nothing about a part until
  // every rank issued theirs, so an issued-but-unmatched part is queued as a slot without `shared`:
  // it blocks its stream in the right place, and a rank that never joins shows up as a hang.
  struct CollSlot {
    int comm = -1;
    int rank = -1;
    std::string op;
    int peer = -1;
    std::shared_ptr<CollShared> shared;
  };
  struct Op {
    OpKind kind = OpKind::launch;
    uint64_t issue = 0;    // global issue order: the in-order key
    uint64_t seq = 0;      // the base's launch sequence number, for reports
    Launch launch;
    int32_t id = -1;       // the event (record, wait) or graph (replay)
    uint64_t version = 0;  // record: the version it completes; wait: the version it awaits
    std::shared_ptr<CollSlot> slot;
  };
  struct StreamState {
    std::deque<Op> queue;
    std::vector<std::pair<int, int>> memberships;  // (communicator, rank) served by this stream
  };
  struct EventState {
    uint64_t issued_version = 0;                         // records issued outside captures
    std::vector<std::pair<uint64_t, int32_t>> pending;   // (version, stream) of records not yet run
  };
  struct CommState {
    std::vector<std::deque<std::shared_ptr<CollSlot>>> placeholders;  // per rank, oldest first
  };
  // One choice offered to the strategy: `id` is what decisions() records, `lane` the stream (or
  // block) whose priority or delay applies, `order` the in-order key.
  struct Candidate {
    int32_t id = -1;
    int32_t lane = -1;
    uint64_t order = 0;
  };
  // Strategy state of one scheduling context: the streams, one graph replay, or one kernel.
  struct Chooser {
    std::vector<uint64_t> priority;      // pct, by lane
    std::vector<uint64_t> change_steps;  // pct, descending: the next change point is at the back
    uint64_t steps = 0;
    uint64_t epoch_end = 0;              // pct: change points are planned again after this step
    uint64_t next_low = kPriorityBase - 1;
    int32_t delay_lane = -1;
    bool delay_tracking = false;
    uint64_t delay_order = 0;
    int64_t delay_run = 0;               // other ops run since the tracked head became ready
  };

  // A scope that marks "user code may be running": the runtime must not be re-entered from it.
  struct Executing {
    explicit Executing(bool& flag) : flag_(flag) { flag_ = true; }
    ~Executing() { flag_ = false; }
    Executing(const Executing&) = delete;
    Executing& operator=(const Executing&) = delete;
    bool& flag_;
  };

  Impl(SimRuntime& runtime, SimOptions options)
      : rt(runtime), opt(std::move(options)), rng(opt.schedule.seed) {
    top.delay_lane = opt.schedule.kind == Schedule::Kind::delay ? opt.schedule.delay_stream : -1;
  }

  SimRuntime& rt;
  SimOptions opt;
  SplitMix64 rng;
  std::vector<StreamState> streams;
  std::vector<EventState> events;
  std::vector<CommState> comms;
  Chooser top;
  std::vector<int32_t> decisions;
  size_t replay_pos = 0;
  uint64_t issue = 0;
  uint64_t queued = 0;  // queue entries over all streams
  uint64_t executed = 0;
  bool executing = false;
  std::vector<Candidate> scratch;  // reused by every step: no allocation per op

  // ---- small helpers ----

  void check_not_executing(const char* call) const {
    if (executing) {
      throw ContractError(call, "runtime", "called from inside an op that the sim scheduler is running");
    }
  }
  const std::string& stream_name(int32_t s) const { return rt.streams_[static_cast<size_t>(s)].name; }
  const std::string& event_name(int32_t e) const { return rt.events_[static_cast<size_t>(e)].name; }
  const std::string& comm_name(int c) const { return rt.communicators_[static_cast<size_t>(c)].name; }

  bool version_pending(int32_t e, uint64_t version) const {
    for (const auto& p : events[static_cast<size_t>(e)].pending) {
      if (p.first == version) return true;
    }
    return false;
  }
  // CUDA semantics: the state of the last record issued (never recorded counts as complete).
  bool event_done(int32_t e) const {
    const uint64_t v = events[static_cast<size_t>(e)].issued_version;
    return v == 0 || !version_pending(e, v);
  }

  // ---- queues and collective slots ----

  // The base creates communicators without a hook; pick new ones up lazily.
  void sync_comms() {
    const size_t have = comms.size();
    const size_t want = rt.communicators_.size();
    for (size_t c = have; c < want; ++c) {
      const auto& rec = rt.communicators_[c];
      comms.emplace_back();
      comms.back().placeholders.resize(rec.streams.size());
      for (size_t r = 0; r < rec.streams.size(); ++r) {
        streams[static_cast<size_t>(rec.streams[r].value)].memberships.emplace_back(static_cast<int>(c),
                                                                                    static_cast<int>(r));
      }
    }
  }

  void push_raw(int32_t s, Op op) {
    op.issue = ++issue;
    streams[static_cast<size_t>(s)].queue.push_back(std::move(op));
    ++queued;
  }

  // Queue a slot for every part this stream's ranks issued that has none yet (oldest first), so
  // that work issued after a part waits behind it.
  void flush(int32_t s) {
    const size_t members = streams[static_cast<size_t>(s)].memberships.size();
    for (size_t m = 0; m < members; ++m) {
      const auto [c, r] = streams[static_cast<size_t>(s)].memberships[m];
      const auto& pending = rt.communicators_[static_cast<size_t>(c)].pending[static_cast<size_t>(r)];
      auto& slots = comms[static_cast<size_t>(c)].placeholders[static_cast<size_t>(r)];
      for (size_t k = slots.size(); k < pending.size(); ++k) {
        auto slot = std::make_shared<CollSlot>();
        slot->comm = c;
        slot->rank = r;
        slot->op = pending[k].op;
        slot->peer = pending[k].peer;
        slots.push_back(slot);
        Op op;
        op.kind = OpKind::collective;
        op.slot = std::move(slot);
        push_raw(s, std::move(op));
      }
    }
  }

  void prepare() {
    sync_comms();
    for (size_t s = 0; s < streams.size(); ++s) flush(static_cast<int32_t>(s));
  }

  void enqueue(int32_t s, Op op) {
    if (comms.size() != rt.communicators_.size()) sync_comms();
    if (!streams[static_cast<size_t>(s)].memberships.empty()) flush(s);
    push_raw(s, std::move(op));
    // A full queue makes the host wait for the device, as a GPU's would: run one op.
    if (queued > opt.max_queued_ops) {
      prepare();
      if (!step()) {
        throw hang("issuing to stream '" + stream_name(s) + "' with " + std::to_string(queued) + " ops queued");
      }
    }
  }

  // ---- the strategy ----

  void plan_change_points(Chooser& ch, uint64_t estimate) {
    const uint64_t length = std::max<uint64_t>(estimate, 1);
    for (int i = 1; i < opt.schedule.pct_depth; ++i) ch.change_steps.push_back(ch.steps + rng.below(length));
    std::sort(ch.change_steps.begin(), ch.change_steps.end(), std::greater<>());
    ch.epoch_end = ch.steps + length;
  }

  Chooser make_chooser(size_t lanes, uint64_t estimate, int32_t delay_lane) {
    Chooser ch;
    ch.delay_lane = delay_lane;
    if (opt.schedule.kind == Schedule::Kind::pct) {
      ch.priority.reserve(lanes);
      for (size_t i = 0; i < lanes; ++i) ch.priority.push_back(kPriorityBase + (rng.next() >> 2));
      plan_change_points(ch, estimate);
    }
    return ch;
  }

  static size_t first_in_order(const std::vector<Candidate>& c, int32_t skip_lane) {
    size_t best = c.size();
    for (size_t i = 0; i < c.size(); ++i) {
      if (skip_lane >= 0 && c[i].lane == skip_lane) continue;
      if (best == c.size() || c[i].order < c[best].order) best = i;
    }
    return best;
  }

  static size_t highest_priority(const std::vector<Candidate>& c, const Chooser& ch) {
    size_t best = 0;
    for (size_t i = 1; i < c.size(); ++i) {
      const uint64_t pi = ch.priority[static_cast<size_t>(c[i].lane)];
      const uint64_t pb = ch.priority[static_cast<size_t>(c[best].lane)];
      if (pi > pb || (pi == pb && c[i].order < c[best].order)) best = i;
    }
    return best;
  }

  size_t choose_delay(const std::vector<Candidate>& c, Chooser& ch) {
    // The delayed lane's earliest ready candidate is "its head".
    size_t head = c.size();
    size_t delayed = 0;
    for (size_t i = 0; i < c.size(); ++i) {
      if (ch.delay_lane < 0 || c[i].lane != ch.delay_lane) continue;
      ++delayed;
      if (head == c.size() || c[i].order < c[head].order) head = i;
    }
    if (head == c.size()) return first_in_order(c, -1);
    if (!ch.delay_tracking || ch.delay_order != c[head].order) {
      ch.delay_tracking = true;
      ch.delay_order = c[head].order;
      ch.delay_run = 0;
    }
    if (ch.delay_run < opt.schedule.delay_ops && delayed < c.size()) return first_in_order(c, ch.delay_lane);
    return first_in_order(c, -1);
  }

  size_t choose_replay(const std::vector<Candidate>& c, const char* context) {
    const auto& choices = opt.schedule.choices;
    if (replay_pos >= choices.size()) {
      throw std::logic_error("sim replay diverged: decision #" + std::to_string(replay_pos) + " (" + context +
                             ") has " + std::to_string(c.size()) + " candidates but the recording holds only " +
                             std::to_string(choices.size()) + " choices");
    }
    const int32_t want = choices[replay_pos];
    for (size_t i = 0; i < c.size(); ++i) {
      if (c[i].id == want) {
        ++replay_pos;
        return i;
      }
    }
    std::vector<int> ready;
    for (const auto& x : c) ready.push_back(x.id);
    throw std::logic_error("sim replay diverged: decision #" + std::to_string(replay_pos) + " (" + context +
                           ") recorded " + std::to_string(want) + ", which is not ready now; ready: [" +
                           join_ints(ready) + "]");
  }

  // Picks one candidate, records the decision when there was a choice, updates the strategy state.
  size_t choose(const std::vector<Candidate>& c, Chooser& ch, const char* context) {
    DSV4_ASSERT(!c.empty(), "choose among no candidates");
    size_t pick = 0;
    switch (opt.schedule.kind) {
      case Schedule::Kind::in_order:
        pick = first_in_order(c, -1);
        break;
      case Schedule::Kind::random:
        pick = c.size() == 1 ? 0 : static_cast<size_t>(rng.below(c.size()));
        break;
      case Schedule::Kind::pct: {
        bool change = false;
        while (!ch.change_steps.empty() && ch.change_steps.back() <= ch.steps) {
          ch.change_steps.pop_back();
          change = true;
        }
        pick = highest_priority(c, ch);
        if (change) {
          // The change point hits the lane that would run now: it drops below every other lane.
          ch.priority[static_cast<size_t>(c[pick].lane)] = ch.next_low--;
          pick = highest_priority(c, ch);
        }
        break;
      }
      case Schedule::Kind::delay:
        pick = choose_delay(c, ch);
        break;
      case Schedule::Kind::replay:
        pick = c.size() == 1 ? 0 : choose_replay(c, context);
        break;
    }
    DSV4_ASSERT(pick < c.size(), "strategy picked no candidate");
    ++ch.steps;
    if (c.size() > 1) decisions.push_back(c[pick].id);
    if (ch.delay_tracking) {
      if (c[pick].lane == ch.delay_lane) {
        ch.delay_tracking = false;  // the held-back head ran; its successor is held back afresh
      } else {
        ++ch.delay_run;
      }
    }
    return pick;
  }

  // ---- readiness and the top-level step ----

  // A collective's lane: under pct the priority that matters is its best participant's; under
  // delay it is held back when the delayed stream takes part.
  int32_t collective_lane(const CollShared& sh) const {
    int32_t lane = sh.streams[0];
    for (int32_t s : sh.streams) {
      if (opt.schedule.kind == Schedule::Kind::pct) {
        if (top.priority[static_cast<size_t>(s)] > top.priority[static_cast<size_t>(lane)]) lane = s;
      } else if (s == top.delay_lane) {
        return s;
      }
    }
    return lane;
  }

  // The candidate for stream s's head, if that head is ready (a collective is offered once, by its
  // lowest participating stream).
  bool head_candidate(int32_t s, Candidate& out) const {
    const auto& q = streams[static_cast<size_t>(s)].queue;
    if (q.empty()) return false;
    const Op& h = q.front();
    switch (h.kind) {
      case OpKind::launch:
      case OpKind::record:
      case OpKind::replay:
        out = Candidate{s, s, h.issue};
        return true;
      case OpKind::wait:
        if (version_pending(h.id, h.version)) return false;
        out = Candidate{s, s, h.issue};
        return true;
      case OpKind::collective: {
        const CollShared* sh = h.slot->shared.get();
        if (sh == nullptr) return false;
        if (sh->refused) {
          out = Candidate{s, s, h.issue};  // a no-op of its own stream: it waits for no one
          return true;
        }
        if (s != *std::min_element(sh->streams.begin(), sh->streams.end())) return false;
        uint64_t order = h.issue;
        for (int32_t p : sh->streams) {
          const auto& pq = streams[static_cast<size_t>(p)].queue;
          if (pq.empty() || pq.front().kind != OpKind::collective || pq.front().slot->shared.get() != sh) return false;
          order = std::min(order, pq.front().issue);
        }
        out = Candidate{s, collective_lane(*sh), order};
        return true;
      }
    }
    return false;
  }

  // Runs one ready op; false when none is ready.
  bool step() {
    scratch.clear();
    for (size_t s = 0; s < streams.size(); ++s) {
      Candidate c;
      if (head_candidate(static_cast<int32_t>(s), c)) scratch.push_back(c);
    }
    if (scratch.empty()) return false;
    if (opt.schedule.kind == Schedule::Kind::pct && top.change_steps.empty() && top.steps >= top.epoch_end) {
      plan_change_points(top, queued);  // the queued ops are this stretch's estimated run length
    }
    const int32_t s = scratch[choose(scratch, top, "stream")].id;
    execute_head(s);
    return true;
  }

  void execute_head(int32_t s) {
    Op op = std::move(streams[static_cast<size_t>(s)].queue.front());
    streams[static_cast<size_t>(s)].queue.pop_front();
    --queued;
    ++executed;
    switch (op.kind) {
      case OpKind::launch:
        run_launch(op.launch);
        break;
      case OpKind::record: {
        auto& pending = events[static_cast<size_t>(op.id)].pending;
        const auto it = std::find_if(pending.begin(), pending.end(),
                                     [&](const auto& p) { return p.first == op.version; });
        DSV4_ASSERT(it != pending.end(), "a record ran twice");
        pending.erase(it);
        break;
      }
      case OpKind::wait:
        break;  // it was ready: the awaited record has run
      case OpKind::replay:
        run_graph(op.id);
        break;
      case OpKind::collective: {
        const std::shared_ptr<CollShared> sh = op.slot->shared;
        if (sh->refused) break;
        for (int32_t p : sh->streams) {
          if (p == s) continue;
          auto& pq = streams[static_cast<size_t>(p)].queue;
          DSV4_ASSERT(!pq.empty() && pq.front().slot && pq.front().slot->shared == sh, "collective not at every head");
          pq.pop_front();
          --queued;
        }
        run_collective(*sh);
        break;
      }
    }
  }

  // Runs ops until `done` holds; a HangError names what blocks when no op is ready.
  void run_until(const std::function<bool()>& done, const std::string& target) {
    prepare();
    const uint64_t limit = queued + 1;  // every step removes at least one entry and nothing is added
    for (uint64_t i = 0; !done(); ++i) {
      DSV4_ASSERT(i < limit, "the scheduler ran more steps than ops were queued");
      if (!step()) throw hang(target);
    }
  }

  // ---- running ops ----

  void run_launch(const Launch& l) {
    Executing guard(executing);
    if (l.cooperative) {
      run_cooperative(l);
    } else {
      l.host();
    }
  }

  void run_cooperative(const Launch& l) {
    const size_t n = static_cast<size_t>(l.blocks);
    std::vector<BlockContext> ctx;
    ctx.reserve(n);  // the coroutines hold references: no reallocation after this
    for (size_t b = 0; b < n; ++b) ctx.emplace_back(static_cast<int>(b), static_cast<int>(n));
    std::vector<BlockTask> tasks;
    tasks.reserve(n);
    for (size_t b = 0; b < n; ++b) {
      tasks.push_back(l.cooperative(ctx[b]));
      if (!tasks.back().handle()) throw ContractError(l.op, "cooperative", "returned an empty BlockTask");
    }
    Chooser ch = make_chooser(n, 2 * n, -1);
    std::vector<Candidate> c;
    c.reserve(n);
    std::vector<bool> finished(n, false);
    size_t left = n;
    for (uint64_t resumes = 0; left > 0; ++resumes) {
      c.clear();
      for (size_t b = 0; b < n; ++b) {
        const auto block = static_cast<int32_t>(b);
        if (!finished[b] && ctx[b].can_resume()) c.push_back(Candidate{block, block, b});
      }
      if (c.empty() || resumes >= kMaxResumesPerKernel) {
        std::vector<int> waiting;
        std::string detail = c.empty() ? "every unfinished block waits on a condition that is false:"
                                       : "no block finished within " + std::to_string(kMaxResumesPerKernel) +
                                             " resumes (livelock?):";
        for (size_t b = 0; b < n; ++b) {
          if (finished[b]) continue;
          waiting.push_back(static_cast<int>(b));
          detail += " block " + std::to_string(b) + " waits for '" + ctx[b].waiting_what() + "';";
        }
        detail += " " + std::to_string(n - left) + " of " + std::to_string(n) + " blocks finished";
        throw HangError(l.op, std::move(waiting), detail);
      }
      const size_t b = static_cast<size_t>(c[choose(c, ch, "block")].id);
      const auto h = tasks[b].handle();
      h.resume();
      if (h.done()) {
        finished[b] = true;
        --left;
        if (h.promise().error) std::rethrow_exception(h.promise().error);
      }
    }
  }

  void run_graph(int32_t g) {
    // No runtime call can run while an op runs, so the topology stays where it is.
    const GraphTopology& topo = rt.topology(GraphId{g});
    const size_t n = topo.nodes.size();
    std::vector<size_t> missing(n, 0);
    std::vector<std::vector<size_t>> successors(n);
    for (size_t i = 0; i < n; ++i) {
      for (int p : topo.nodes[i].predecessors) {
        DSV4_ASSERT(p >= 0 && static_cast<size_t>(p) < i, "a graph node depends on a later node");
        ++missing[i];
        successors[static_cast<size_t>(p)].push_back(i);
      }
    }
    std::vector<Candidate> ready;
    for (size_t i = 0; i < n; ++i) {
      if (missing[i] == 0) ready.push_back(Candidate{static_cast<int32_t>(i), topo.nodes[i].captured_on.value, i});
    }
    Chooser ch = make_chooser(streams.size(), n, top.delay_lane);
    for (size_t done = 0; done < n; ++done) {
      DSV4_ASSERT(!ready.empty(), "graph replay found no ready node");
      const size_t pick = choose(ready, ch, "graph node");
      const size_t node = static_cast<size_t>(ready[pick].id);
      ready.erase(ready.begin() + static_cast<std::ptrdiff_t>(pick));
      run_launch(topo.nodes[node].launch);
      for (size_t next : successors[node]) {
        if (--missing[next] == 0) {
          ready.push_back(Candidate{static_cast<int32_t>(next), topo.nodes[next].captured_on.value, next});
        }
      }
    }
  }

  void run_collective(const CollShared& sh) {
    const size_t n = sh.parts.size();
    if (sh.op == "all_gather") {
      // Gather into a staging copy first: in-place all_gather has each send inside a recv.
      const uint64_t chunk = sh.parts[0].send.end - sh.parts[0].send.begin;
      std::vector<uint8_t> staged(n * chunk);
      for (size_t r = 0; r < n; ++r) {
        if (chunk) std::memcpy(staged.data() + r * chunk, sh.send[r], chunk);
      }
      for (size_t r = 0; r < n; ++r) {
        if (!staged.empty()) std::memcpy(sh.recv[r], staged.data(), staged.size());
      }
    } else if (sh.op == "all_reduce") {
      // Summed in rank order, so the result is bitwise the same under every schedule.
      const uint64_t count = (sh.parts[0].send.end - sh.parts[0].send.begin) / 4;
      std::vector<float> sum(count, 0.0f);
      for (size_t r = 0; r < n; ++r) {
        for (uint64_t i = 0; i < count; ++i) {
          float v = 0.0f;
          std::memcpy(&v, sh.send[r] + 4 * i, 4);
          sum[i] = r == 0 ? v : sum[i] + v;
        }
      }
      for (size_t r = 0; r < n; ++r) {
        if (count) std::memcpy(sh.recv[r], sum.data(), 4 * count);
      }
    } else if (sh.op == "send/recv") {
      const uint64_t size = sh.parts[0].send.end - sh.parts[0].send.begin;
      if (size) std::memmove(sh.recv[1], sh.send[0], size);
    } else {
      DSV4_ASSERT(sh.op == "barrier", "unknown collective " + sh.op);
    }
  }

  // ---- collectives ----

  uint8_t* resolve(const ByteRange& r, CollShared& sh) {
    if (r.buffer.value < 0) return nullptr;
    const auto& storage = rt.buffers_[static_cast<size_t>(r.buffer.value)].storage;
    sh.keep.push_back(storage);
    return static_cast<uint8_t*>(storage->data()) + r.begin;
  }

  void add_collective(int comm, const std::vector<CollectivePart>& parts) {
    sync_comms();
    DSV4_ASSERT(!parts.empty(), "a collective without parts");
    const auto& rec = rt.communicators_[static_cast<size_t>(comm)];
    auto sh = std::make_shared<CollShared>();
    sh->comm = comm;
    sh->op = parts[0].op == "send" || parts[0].op == "recv" ? "send/recv" : parts[0].op;
    sh->parts = parts;
    for (const auto& p : parts) sh->streams.push_back(rec.streams[static_cast<size_t>(p.rank)].value);
    // The base has already taken these parts off its pending lists, so a refused collective must
    // still consume its slots (as a no-op) before the error goes out, or later parts would match the
    // wrong slots.
    const std::string refusal = refusal_of(*sh);
    sh->refused = !refusal.empty();
    for (const auto& p : parts) {
      sh->send.push_back(resolve(p.send, *sh));
      sh->recv.push_back(resolve(p.recv, *sh));
    }
    for (size_t i = 0; i < parts.size(); ++i) {
      auto& slots = comms[static_cast<size_t>(comm)].placeholders[static_cast<size_t>(parts[i].rank)];
      if (!slots.empty()) {
        // The part was queued as a slot when later work arrived: the oldest slot is this part.
        slots.front()->shared = sh;
        slots.pop_front();
        continue;
      }
      // Issued last with nothing after it: append directly, without flushing the rank's later parts
      // ahead of it.
      auto slot = std::make_shared<CollSlot>();
      slot->comm = comm;
      slot->rank = parts[i].rank;
      slot->op = parts[i].op;
      slot->peer = parts[i].peer;
      slot->shared = sh;
      Op op;
      op.kind = OpKind::collective;
      op.slot = std::move(slot);
      push_raw(rec.streams[static_cast<size_t>(parts[i].rank)].value, std::move(op));
    }
    if (sh->refused) throw ContractError(sh->op, comm_name(comm), refusal);
    if (queued > opt.max_queued_ops) {
      prepare();
      if (!step()) throw hang("issuing " + sh->op + " with " + std::to_string(queued) + " ops queued");
    }
  }

  // Why the matched collective cannot run as issued ("" when it can). The base checks the sizes
  // too; checking again here keeps the memcpy in bounds whatever the base lets through.
  std::string refusal_of(const CollShared& sh) const {
    for (size_t i = 0; i < sh.streams.size(); ++i) {
      for (size_t j = i + 1; j < sh.streams.size(); ++j) {
        if (sh.streams[i] == sh.streams[j]) {
          return "ranks " + std::to_string(sh.parts[i].rank) + " and " + std::to_string(sh.parts[j].rank) +
                 " share stream '" + stream_name(sh.streams[i]) + "': a stream serves one rank";
        }
      }
    }
    const uint64_t n = sh.parts.size();
    const uint64_t send0 = sh.parts[0].send.end - sh.parts[0].send.begin;
    for (const auto& p : sh.parts) {
      const uint64_t send = p.send.end - p.send.begin;
      const uint64_t recv = p.recv.end - p.recv.begin;
      const std::string who = "rank " + std::to_string(p.rank);
      if (sh.op == "all_gather") {
        if (send != send0) {
          return who + " sends " + std::to_string(send) + " bytes, rank 0 sends " + std::to_string(send0);
        }
        if (recv != n * send0) {
          return who + " receives into " + std::to_string(recv) + " bytes, needs ranks x send = " +
                 std::to_string(n * send0);
        }
      } else if (sh.op == "all_reduce" && send != send0) {
        return who + " reduces " + std::to_string(send) + " bytes, rank 0 reduces " + std::to_string(send0);
      }
    }
    return "";
  }

  // ---- hang reports ----

  std::string describe_op(const Op& op) const {
    switch (op.kind) {
      case OpKind::launch: return "launch '" + op.launch.op + "' (#" + std::to_string(op.seq) + ")";
      case OpKind::record: return "record of event '" + event_name(op.id) + "'";
      case OpKind::wait: return "wait on event '" + event_name(op.id) + "'";
      case OpKind::replay: return "replay of graph " + std::to_string(op.id);
      case OpKind::collective: return "collective '" + op.slot->op + "'";
    }
    return "?";
  }

  // Why stream s's head cannot run (only called for a head that is not ready).
  std::string why_blocked(int32_t s) const {
    const Op& h = streams[static_cast<size_t>(s)].queue.front();
    if (h.kind == OpKind::wait) {
      std::string on = "?";
      for (const auto& p : events[static_cast<size_t>(h.id)].pending) {
        if (p.first == h.version) on = stream_name(p.second);
      }
      return "waits for record #" + std::to_string(h.version) + " of event '" + event_name(h.id) + "' on stream '" +
             on + "', which has not run";
    }
    if (h.kind != OpKind::collective) return "is ready";
    const CollSlot& slot = *h.slot;
    const auto& rec = rt.communicators_[static_cast<size_t>(slot.comm)];
    if (slot.shared) {
      std::string out = "waits until every participant reaches it:";
      for (const int32_t p : slot.shared->streams) {
        const auto& pq = streams[static_cast<size_t>(p)].queue;
        if (!pq.empty() && pq.front().slot && pq.front().slot->shared == slot.shared) continue;
        out += " stream '" + stream_name(p) + "' is behind " +
               (pq.empty() ? std::string("nothing?") : describe_op(pq.front()));
        out += ";";
      }
      return out;
    }
    return "on communicator '" + rec.name + "' (rank " + std::to_string(slot.rank) + "): " + missing_text(slot);
  }

  std::vector<int> missing_ranks(const CollSlot& slot) const {
    const auto& rec = rt.communicators_[static_cast<size_t>(slot.comm)];
    const auto& slots = comms[static_cast<size_t>(slot.comm)].placeholders[static_cast<size_t>(slot.rank)];
    size_t k = 0;
    while (k < slots.size() && slots[k].get() != &slot) ++k;
    std::vector<int> missing;
    if (slot.op == "send" || slot.op == "recv") {
      if (slot.peer >= 0 && static_cast<size_t>(slot.peer) < rec.pending.size()) missing.push_back(slot.peer);
      return missing;
    }
    for (size_t r = 0; r < rec.pending.size(); ++r) {
      if (rec.pending[r].size() <= k) missing.push_back(static_cast<int>(r));
    }
    return missing;
  }

  std::string missing_text(const CollSlot& slot) const {
    const std::vector<int> missing = missing_ranks(slot);
    if (slot.op == "send" || slot.op == "recv") {
      const char* other = slot.op == "send" ? "recv" : "send";
      return "peer rank " + join_ints(missing) + " never issued the matching " + other;
    }
    if (missing.empty()) return "every rank issued its part, but the collective was refused at issue and never matched";
    return "rank(s) " + join_ints(missing) + " never issued their part";
  }

  HangError hang(const std::string& target) const {
    // Only collectives can block the streams for good (a wait's record is always queued), so the
    // report is named after one, preferring a collective some rank never joined: the root cause.
    std::string kernel;
    bool root_cause = false;
    std::string detail = target + " cannot complete: no queued op is ready.";
    for (size_t s = 0; s < streams.size(); ++s) {
      const auto& q = streams[s].queue;
      if (q.empty()) continue;
      const Op& h = q.front();
      detail += " Stream '" + stream_name(static_cast<int32_t>(s)) + "' (" + std::to_string(q.size()) + " ops): " +
                describe_op(h) + " " + why_blocked(static_cast<int32_t>(s)) + ".";
      const bool unmatched = h.kind == OpKind::collective && !h.slot->shared;
      if (!root_cause && (kernel.empty() || unmatched)) {
        kernel = h.kind == OpKind::collective ? h.slot->op : describe_op(h);
        root_cause = unmatched;
      }
    }
    return HangError(kernel, {}, detail);
  }
};

// ---- SimRuntime --------------------------------------------------------------------------------

SimRuntime::SimRuntime(RuntimeOptions options, SimOptions sim)
    : Runtime(options), impl_(std::make_unique<Impl>(*this, std::move(sim))) {
  DSV4_ASSERT(impl_->opt.max_queued_ops >= 1, "max_queued_ops must be at least 1");
  if (impl_->opt.schedule.kind == Schedule::Kind::pct &&
      (impl_->opt.schedule.pct_depth < 1 || impl_->opt.schedule.pct_depth > kMaxPctDepth)) {
    throw ContractError("SimRuntime", "pct_depth", "must be in [1, 64]");
  }
  if (impl_->opt.schedule.kind == Schedule::Kind::delay && impl_->opt.schedule.delay_ops < 0) {
    throw ContractError("SimRuntime", "delay_ops", "must not be negative");
  }
}

SimRuntime::~SimRuntime() = default;

const std::vector<int32_t>& SimRuntime::decisions() const { return impl_->decisions; }
uint64_t SimRuntime::ops_executed() const { return impl_->executed; }

uint64_t SimRuntime::discard_queued_work() {
  DSV4_ASSERT(!impl_->executing, "discard_queued_work from inside a running op");
  const uint64_t dropped = impl_->queued;
  for (auto& s : impl_->streams) s.queue.clear();
  for (auto& e : impl_->events) e.pending.clear();
  for (auto& c : impl_->comms) {
    for (auto& rank : c.placeholders) rank.clear();
  }
  impl_->queued = 0;
  return dropped;
}

MemorySpace& SimRuntime::memory(int device) {
  (void)device;  // every simulated device lives in host memory
  return host_memory();
}

void SimRuntime::do_create_stream(StreamId stream) {
  DSV4_ASSERT(static_cast<size_t>(stream.value) == impl_->streams.size(), "streams are created in id order");
  impl_->streams.emplace_back();
  if (impl_->opt.schedule.kind == Schedule::Kind::pct) {
    impl_->top.priority.push_back(kPriorityBase + (impl_->rng.next() >> 2));
  } else {
    impl_->top.priority.push_back(0);
  }
}

void SimRuntime::do_create_event(EventId event) {
  DSV4_ASSERT(static_cast<size_t>(event.value) == impl_->events.size(), "events are created in id order");
  impl_->events.emplace_back();
}

void SimRuntime::do_launch(StreamId stream, uint64_t seq, const Launch& launch, bool capturing) {
  impl_->check_not_executing("launch");
  if (!launch.host && !launch.cooperative) {
    throw ContractError(launch.op, "launch", "has no sim implementation (neither host nor cooperative)");
  }
  if (launch.cooperative && launch.blocks < 1) {
    throw ContractError(launch.op, "blocks", "a cooperative launch needs at least one block");
  }
  if (capturing) return;  // the base added it to the graph; replays run it
  Impl::Op op;
  op.kind = OpKind::launch;
  op.seq = seq;
  op.launch = launch;
  impl_->enqueue(stream.value, std::move(op));
}

void SimRuntime::do_record(EventId event, StreamId stream, bool capturing) {
  impl_->check_not_executing("record");
  if (capturing) return;
  auto& ev = impl_->events[static_cast<size_t>(event.value)];
  Impl::Op op;
  op.kind = OpKind::record;
  op.id = event.value;
  op.version = ++ev.issued_version;
  ev.pending.emplace_back(op.version, stream.value);
  impl_->enqueue(stream.value, std::move(op));
}

void SimRuntime::do_wait(StreamId stream, EventId event, bool capturing) {
  impl_->check_not_executing("wait");
  if (capturing) return;
  const uint64_t version = impl_->events[static_cast<size_t>(event.value)].issued_version;
  if (version == 0) return;  // CUDA: waiting on a never-recorded event does nothing
  Impl::Op op;
  op.kind = OpKind::wait;
  op.id = event.value;
  op.version = version;
  impl_->enqueue(stream.value, std::move(op));
}

void SimRuntime::do_begin_capture(StreamId stream) {
  (void)stream;
  impl_->check_not_executing("begin_capture");
}

bool SimRuntime::do_query(EventId event) {
  impl_->check_not_executing("query");
  impl_->prepare();
  if (impl_->event_done(event.value)) return true;
  impl_->step();  // at most one op: a polling host sees the device make progress
  return impl_->event_done(event.value);
}

void SimRuntime::do_synchronize_event(EventId event) {
  impl_->check_not_executing("synchronize");
  const int32_t e = event.value;
  impl_->run_until([this, e] { return impl_->event_done(e); }, "synchronize(event '" + impl_->event_name(e) + "')");
}

void SimRuntime::do_synchronize_stream(StreamId stream) {
  impl_->check_not_executing("synchronize");
  const size_t s = static_cast<size_t>(stream.value);
  impl_->run_until([this, s] { return impl_->streams[s].queue.empty(); },
                   "synchronize(stream '" + impl_->stream_name(stream.value) + "')");
}

void SimRuntime::do_synchronize_device(int device) {
  impl_->check_not_executing("synchronize_device");
  impl_->run_until(
      [this, device] {
        for (size_t s = 0; s < impl_->streams.size(); ++s) {
          if (streams_[s].device == device && !impl_->streams[s].queue.empty()) return false;
        }
        return true;
      },
      "synchronize_device(" + std::to_string(device) + ")");
}

void SimRuntime::do_replay(GraphId graph, StreamId stream) {
  impl_->check_not_executing("replay");
  Impl::Op op;
  op.kind = OpKind::replay;
  op.id = graph.value;
  impl_->enqueue(stream.value, std::move(op));
}

void SimRuntime::do_collective(int comm, const std::vector<CollectivePart>& parts) {
  impl_->check_not_executing("collective");
  impl_->add_collective(comm, parts);
}

}  // namespace dsv4::rt
