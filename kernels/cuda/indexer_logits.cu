// CUDA (and, through port.h, HIP) implementations of kernels/indexer_logits.h: the persistent logits
// kernel and the block-per-row top-k. The entry points in kernels/host/indexer_logits.cpp have
// checked the contracts; these size the launches and enqueue them.
//
// Logits. The host cooperative launch's blocks, one CUDA block each (kernels/host/indexer_logits.cpp
// describes the four steps), with the host's counters in global memory (gpu::Scratch, zeroed by a
// memset on the stream before the kernel): per token row the key blocks done and a finished flag;
// for the grid the done blocks, the finished rows, the arrived blocks and the total work (each block
// adds its share of the total, from the rows of its prologue, before it arrives). Every value a block
// computes from the walk (row, offset, token, lengths) is block-uniform: all threads read the same
// words. Waits are spun by thread 0 and bounded: when no block has made progress (done blocks,
// finished rows, arrived blocks) for kHangCycles, the block prints which row or barrier it waited on
// and traps. Unlike the host walk, a block waits for the row its range starts inside only after
// walking the rest of its range (see the hand-over below), so the blocks run side by side. A key's
// score follows the host's order exactly: per head the f32 products summed in f64 over d in order,
// rounded to f32; the ReLU'd logit times w in f32; the head sum in f64 over h in order, rounded once. Phase A of a key tile computes the (key, head) logits in parallel into shared
// memory, phase B sums them per key: the same operations as the host, so the logits are bitwise equal.
//
// Top-k. One block per row: the k-th largest score is found by a 4-pass 8-bit radix select on an
// order-preserving 32-bit key (integer histograms: deterministic), then one pass in index order
// (chunks of blockDim, a shared-memory scan) writes every entry with a larger key and the lowest-index
// ones of the keys equal to it, in ascending index order: the host's selection, ties to the lower index.
#include "kernels/indexer_logits.h"
#include "kernels/cuda/port.h"

#include <cstdint>
#include <cstdio>
#include <map>
#include <mutex>
#include <string>
#include <utility>

#include "engine/core/error.h"

namespace dsv4::kernels::cuda {

namespace {

constexpr int kThreads = 256;  // a multiple of 64: whole warps (wavefronts) on NVIDIA and CDNA
constexpr long long kPageKeys = kIndexerPageKeys;
constexpr long long kMaxKeyTile = 64;                // keys of one shared-memory tile
// Every launch's dynamic shared memory: the default 48 KiB limit less room for the static part.
constexpr long long kSmemBytes = 47 * 1024;
// A wait gives up after this many clock64() cycles without progress anywhere in the grid: about 2 s
// at H100 clocks (1.6-2.0 GHz: 2.0-2.5 s). A correct schedule never waits that long (the other
// blocks make progress with every key block), a non-partitioning one stalls for good.
constexpr long long kHangCycles = 4'000'000'000LL;

gpu::Stream as_stream(void* s) { return static_cast<gpu::Stream>(s); }

// Grid counters (unsigned long long each), then two unsigned ints per token row.
enum GridCounter { kDone = 0, kFinished = 1, kArrived = 2, kTotal = 3, kGridCounters = 4 };

struct LogitsParams {
  const float* q;           // [rows, next_n, heads, head_dim]
  const float* pages;       // [num_pages, 64, head_dim]
  const int32_t* table;     // [rows, max_pages]
  const float* weights;     // [tokens, heads]
  const int32_t* lens;      // [rows, next_n]
  const int32_t* schedule;  // [num_sms + 1, 2]
  float* logits;            // [tokens, max_context]
  long long rows, next_n, heads, head_dim, max_pages, max_context, num_pages, block_kv, num_sms;
  long long max_len;   // min(max_context, 64 * max_pages): a length is clamped to [0, max_len]
  long long key_tile;   // keys per shared-memory tile: key_tile * (heads + key_pitch) floats
  long long key_pitch;  // floats per staged key row: head_dim rounded up to an odd number
  unsigned long long* grid;       // [kGridCounters]
  unsigned int* token_done;       // [tokens] key blocks of the row done so far
  unsigned int* token_finished;   // [tokens] 1 once the row's tail is written and the row counted
};

__device__ inline float neg_inf() { return __int_as_float(static_cast<int>(0xff800000u)); }
__device__ inline float quiet_nan() { return __int_as_float(0x7fc00000); }

// Coherent (L2) reads of counters other blocks update.
__device__ inline unsigned long long load_counter(unsigned long long* p) { return atomicAdd(p, 0ull); }
__device__ inline unsigned int load_counter(unsigned int* p) { return atomicAdd(p, 0u); }

__device__ inline void backoff() {
#if defined(__HIP_DEVICE_COMPILE__)
  __builtin_amdgcn_s_sleep(2);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
  __nanosleep(200);
#endif
}

[[noreturn]] __device__ inline void trap() {
#if defined(__HIPCC__)
  __builtin_trap();
#else
  __trap();
#endif
#if !defined(__HIPCC__)
  __builtin_unreachable();
#endif
}

// A token's length as the kernel uses it: clamped so no bad value reads or writes out of bounds.
__device__ inline long long token_len(const LogitsParams& p, long long token) {
  const long long len = p.lens[token];
  return len < 0 ? 0 : (len > p.max_len ? p.max_len : len);
}
__device__ inline long long token_blocks(const LogitsParams& p, long long token) {
  return (token_len(p, token) + p.block_kv - 1) / p.block_kv;
}

// Every block's progress so far; a wait that sees it unchanged for kHangCycles is a hang.
__device__ inline unsigned long long grid_progress(const LogitsParams& p) {
  return load_counter(&p.grid[kDone]) + load_counter(&p.grid[kFinished]) + load_counter(&p.grid[kArrived]);
}

// Thread 0: until every key block of `token` is in (the earlier blocks' parts).
__device__ void wait_row(const LogitsParams& p, long long token, unsigned int need) {
  unsigned long long seen = grid_progress(p);
  long long since = clock64();
  while (load_counter(&p.token_done[token]) < need) {
    const unsigned long long now = grid_progress(p);
    if (now != seen) {
      seen = now;
      since = clock64();
    } else if (clock64() - since > kHangCycles) {
      printf("hang in indexer_logits: block %d waited on row %lld (%u of %u key blocks done)\n",
             static_cast<int>(blockIdx.x), token, load_counter(&p.token_done[token]), need);
      trap();
    }
    backoff();
  }
  __threadfence();
}

// Thread 0: the exit barrier, all blocks arrived, the launched work done exactly once, every row
// finished. A key block done twice leaves the done-block count past the total for good: a hang.
__device__ void wait_exit(const LogitsParams& p, unsigned long long tokens) {
  unsigned long long seen = grid_progress(p);
  long long since = clock64();
  for (;;) {
    const unsigned long long arrived = load_counter(&p.grid[kArrived]);
    if (arrived == static_cast<unsigned long long>(p.num_sms)) {
      __threadfence();  // every block's share of the total was added before it arrived
      const unsigned long long total = load_counter(&p.grid[kTotal]);
      if (load_counter(&p.grid[kDone]) == total && load_counter(&p.grid[kFinished]) == tokens) return;
    }
    const unsigned long long now = grid_progress(p);
    if (now != seen) {
      seen = now;
      since = clock64();
    } else if (clock64() - since > kHangCycles) {
      printf("hang in indexer_logits: block %d waited on the exit barrier (%llu of %lld blocks arrived, %llu key "
             "blocks done of %llu, %llu of %llu rows finished)\n",
             static_cast<int>(blockIdx.x), load_counter(&p.grid[kArrived]), p.num_sms, load_counter(&p.grid[kDone]),
             load_counter(&p.grid[kTotal]), load_counter(&p.grid[kFinished]), tokens);
      trap();
    }
    backoff();
  }
}

// All threads: the -inf tail [len, max_context), then the row counted once (a second finish, a key
// block done twice, counts nothing).
__device__ void finish_row(const LogitsParams& p, long long token, long long len) {
  float* out = p.logits + token * p.max_context;
  for (long long i = len + threadIdx.x; i < p.max_context; i += blockDim.x) out[i] = neg_inf();
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    if (atomicCAS(&p.token_finished[token], 0u, 1u) == 0u) atomicAdd(&p.grid[kFinished], 1ull);
  }
}

// All threads: keys [first, end) of `token` (schedule row b) into its logits row; ends synchronized.
// Per tile of key_tile keys: the keys are staged in shared memory (rows of key_pitch floats, an odd
// pitch, so the lanes of a warp, one key each, read distinct banks); phase A gives each thread
// (key, head) pairs of one key, kPairs at a time (independent f64 chains), the q values coming
// through L1 as one broadcast per warp; phase B sums a key's heads.
__device__ void score_keys(const LogitsParams& p, long long b, long long token, long long first, long long end,
                           float* smem) {
  const int H = static_cast<int>(p.heads), D = static_cast<int>(p.head_dim);
  const int tile_keys = static_cast<int>(p.key_tile), pitch = static_cast<int>(p.key_pitch);
  float* logit_tile = smem;                    // [H][tile_keys]
  float* key_tile = smem + H * tile_keys;      // [tile_keys][pitch]
  const float* q = p.q + token * H * D;
  const float* w = p.weights + token * H;
  const int32_t* table = p.table + b * p.max_pages;
  float* out = p.logits + token * p.max_context;
  const int tid = static_cast<int>(threadIdx.x), threads = static_cast<int>(blockDim.x);
  for (long long t0 = first; t0 < end; t0 += tile_keys) {
    const int nk = static_cast<int>(end - t0 < tile_keys ? end - t0 : tile_keys);
    // The keys of the tile (a page outside the cache: zeros, never read out of bounds).
    constexpr int kLoads = 8;  // loads in flight per thread
    for (int base = tid; base < nk * D; base += kLoads * threads) {
      float v[kLoads];
#pragma unroll
      for (int j = 0; j < kLoads; ++j) {
        const int i = base + j * threads;
        v[j] = 0.0f;
        if (i < nk * D) {
          const int kk = i / D, d = i - kk * D;
          const long long key = t0 + kk;
          const long long page = table[key / kPageKeys];
          if (page >= 0 && page < p.num_pages) v[j] = p.pages[(page * kPageKeys + key % kPageKeys) * D + d];
        }
      }
#pragma unroll
      for (int j = 0; j < kLoads; ++j) {
        const int i = base + j * threads;
        if (i < nk * D) key_tile[(i / D) * pitch + i % D] = v[j];
      }
    }
    __syncthreads();
    // Phase A: the (key, head) logits, each a sequential f64 sum over d as the host's dot_f32. Pair
    // i is (head i / nk, key i % nk); a thread's pairs i, i + threads, ... are its chains.
    constexpr int kPairs = 4;
    const int pairs = nk * H;
    for (int base = tid; base < pairs; base += kPairs * threads) {
      int kk[kPairs];
      const float* qh[kPairs];
      double acc[kPairs];
#pragma unroll
      for (int j = 0; j < kPairs; ++j) {
        const int i = base + j * threads < pairs ? base + j * threads : base;  // a spare chain redoes `base`
        const int h = i / nk;
        kk[j] = i - h * nk;
        qh[j] = q + h * D;
        acc[j] = 0.0;
      }
#pragma unroll 4
      for (int d = 0; d < D; ++d) {
#pragma unroll
        for (int j = 0; j < kPairs; ++j) {
          acc[j] = __dadd_rn(acc[j], static_cast<double>(__fmul_rn(__ldg(qh[j] + d), key_tile[kk[j] * pitch + d])));
        }
      }
#pragma unroll
      for (int j = 0; j < kPairs; ++j) {
        const int i = base + j * threads;
        if (i < pairs) logit_tile[i] = __double2float_rn(acc[j]);  // [h][kk]
      }
    }
    __syncthreads();
    // Phase B: per key, the head sum in f64 over h in order (std::max(logit, 0.0f) as the ReLU).
    for (int kk = tid; kk < nk; kk += threads) {
      const long long key = t0 + kk;
      const long long page = table[key / kPageKeys];
      float value = quiet_nan();  // a page outside the cache: poison
      if (page >= 0 && page < p.num_pages) {
        double sum = 0.0;
        for (int h = 0; h < H; ++h) {
          const float logit = logit_tile[h * nk + kk];
          const float relu = logit < 0.0f ? 0.0f : logit;
          sum = __dadd_rn(sum, static_cast<double>(__fmul_rn(w[h], relu)));
        }
        value = __double2float_rn(sum);
      }
      out[key] = value;
    }
    __syncthreads();  // the tiles are reused, and the caller publishes the block after this
  }
}

__global__ void __launch_bounds__(kThreads) logits_kernel(LogitsParams p) {
  extern __shared__ float tile[];
  __shared__ bool s_ready;
  const long long sm = blockIdx.x;
  long long deferred = -1, deferred_len = 0, deferred_need = 0;  // the row finished after the walk
  const long long tokens = p.rows * p.next_n;

  // 1. Rows without work: all -inf, no hand-over. Thread 0 also tallies this block's share of the
  //    total work (every token belongs to exactly one block's prologue).
  unsigned long long my_total = 0;
  for (long long t = sm; t < tokens; t += p.num_sms) {
    const long long blocks = token_blocks(p, t);
    my_total += static_cast<unsigned long long>(blocks);
    if (blocks == 0) finish_row(p, t, 0);
  }

  // 2./3. The scheduled range, in the launched layout's coordinates. A negative entry gives this
  //       block no work (its rows are then never finished: the exit barrier reports a hang).
  const int32_t* s = p.schedule + 2 * sm;
  long long b = s[0];
  long long offset_blocks = s[1];
  const long long end_b = s[2];
  const long long end_offset_blocks = s[3];
  if (b >= 0 && offset_blocks >= 0) {
    // Each step does one key block or moves to the next row: it ends at its end or past the rows.
    for (;;) {
      if (b == end_b && offset_blocks == end_offset_blocks) break;
      if (b >= p.rows) break;
      long long j = 0;
      long long o = offset_blocks;
      for (; j < p.next_n; ++j) {
        const long long blocks = token_blocks(p, b * p.next_n + j);
        if (o < blocks) break;
        o -= blocks;
      }
      if (j == p.next_n) {  // past row b's work
        ++b;
        offset_blocks = 0;
        continue;
      }
      const long long token = b * p.next_n + j;
      const long long len = token_len(p, token);
      const long long need_blocks = token_blocks(p, token);
      const long long first = o * p.block_kv;  // < len
      const long long end = first + (len - first < p.block_kv ? len - first : p.block_kv);
      score_keys(p, b, token, first, end, tile);
      if (threadIdx.x == 0) {
        __threadfence();  // the block's logits before its count
        atomicAdd(&p.token_done[token], 1u);
        atomicAdd(&p.grid[kDone], 1ull);
      }
      if (o == need_blocks - 1) {
        // This block owns the row's last key block: the row is published once every part is in. A
        // row whose earlier parts are not all in yet (the row this block's range starts inside) is
        // waited for after the walk: waiting here would make each block wait for the whole range of
        // the block before it, one block after another. A second such row (only a schedule that
        // does not partition the work has one) is waited for at once.
        if (threadIdx.x == 0) s_ready = load_counter(&p.token_done[token]) >= static_cast<unsigned int>(need_blocks);
        __syncthreads();
        const bool ready = s_ready;
        __syncthreads();  // s_ready is rewritten by the next check
        if (ready || deferred >= 0) {
          if (threadIdx.x == 0) wait_row(p, token, static_cast<unsigned int>(need_blocks));
          __syncthreads();
          finish_row(p, token, len);
        } else {
          deferred = token;
          deferred_len = len;
          deferred_need = need_blocks;
        }
      }
      ++offset_blocks;
    }
  }
  if (deferred >= 0) {
    if (threadIdx.x == 0) wait_row(p, deferred, static_cast<unsigned int>(deferred_need));
    __syncthreads();
    finish_row(p, deferred, deferred_len);
  }

  // 4. Exit barrier.
  if (threadIdx.x == 0) {
    atomicAdd(&p.grid[kTotal], my_total);
    __threadfence();
    atomicAdd(&p.grid[kArrived], 1ull);
    wait_exit(p, static_cast<unsigned long long>(tokens));
  }
}

long long key_pitch_for(long long head_dim) { return head_dim % 2 == 0 ? head_dim + 1 : head_dim; }

// Keys per tile for `heads` and `head_dim`; 0 when one key does not fit.
long long key_tile_for(long long heads, long long head_dim) {
  const long long per_key = (heads + key_pitch_for(head_dim)) * static_cast<long long>(sizeof(float));
  const long long fit = kSmemBytes / per_key;
  return fit > kMaxKeyTile ? kMaxKeyTile : fit;
}

// Co-resident blocks of logits_kernel on the current device with `smem` dynamic shared bytes.
long long resident_blocks(size_t smem) {
  static std::mutex mutex;
  static std::map<std::pair<int, size_t>, long long> cache;
  int device = 0;
#if defined(__HIPCC__)
  gpu::check(hipGetDevice(&device), "hipGetDevice (indexer_logits)");
#else
  gpu::check(cudaGetDevice(&device), "cudaGetDevice (indexer_logits)");
#endif
  const std::lock_guard<std::mutex> lock(mutex);
  const auto found = cache.find({device, smem});
  if (found != cache.end()) return found->second;
  int per_sm = 0;
#if defined(__HIPCC__)
  gpu::check(hipOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, logits_kernel, kThreads, smem),
             "hipOccupancyMaxActiveBlocksPerMultiprocessor (indexer_logits)");
#else
  gpu::check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, logits_kernel, kThreads, smem),
             "cudaOccupancyMaxActiveBlocksPerMultiprocessor (indexer_logits)");
#endif
  const long long blocks = static_cast<long long>(per_sm) * gpu::sm_count();
  cache.emplace(std::make_pair(device, smem), blocks);
  return blocks;
}

// ---- top-k --------------------------------------------------------------------------------------

// An order-preserving key: a larger score has a larger key, equal scores (+0 and -0 alike) equal
// keys. -inf and NaN are invalid. Bit operations only (no float compare, no flush of subnormals).
__device__ inline unsigned int order_key(float x, bool& valid) {
  unsigned int u = __float_as_uint(x);
  const unsigned int magnitude = u & 0x7fffffffu;
  valid = magnitude <= 0x7f800000u && u != 0xff800000u;
  if (magnitude == 0) u = 0;  // -0 == +0
  return (u & 0x80000000u) != 0 ? ~u : (u | 0x80000000u);
}

__global__ void __launch_bounds__(kThreads) topk_kernel(const float* logits, long long cols, const int32_t* table,
                                                        long long pages, long long k, int32_t* topk,
                                                        int32_t* kv_index, int32_t* lengths) {
  __shared__ unsigned int hist[256];
  __shared__ unsigned int scan[kThreads];
  __shared__ unsigned int s_prefix;
  __shared__ unsigned long long s_remaining;
  __shared__ unsigned long long s_valid;
  const long long row = blockIdx.x;
  const int tid = static_cast<int>(threadIdx.x);
  const float* x = logits + row * cols;
  int32_t* out_topk = topk + row * k;
  int32_t* out_index = kv_index + row * k;
  if (k == 0) {
    if (tid == 0) lengths[row] = 1;
    return;
  }

  // The k-th largest key among the valid entries, a byte at a time from the top.
  unsigned int prefix = 0;
  unsigned int mask = 0;
  unsigned long long remaining = static_cast<unsigned long long>(k);  // its rank among the candidates
  unsigned long long valid_count = 0;
  bool take_all = false;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = tid; i < 256; i += kThreads) hist[i] = 0;
    __syncthreads();
    for (long long i = tid; i < cols; i += kThreads) {
      bool valid = false;
      const unsigned int key = order_key(x[i], valid);
      if (valid && (key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 0xffu], 1u);
    }
    __syncthreads();
    if (tid == 0) {
      if (shift == 24) {
        unsigned long long n = 0;
        for (int bin = 0; bin < 256; ++bin) n += hist[bin];
        s_valid = n;
      }
      unsigned long long above = 0;  // candidates in higher bins
      int bin = 255;
      for (; bin > 0; --bin) {
        if (above + hist[bin] >= remaining) break;
        above += hist[bin];
      }
      s_prefix = prefix | (static_cast<unsigned int>(bin) << shift);
      s_remaining = remaining - above;
    }
    __syncthreads();
    if (shift == 24) {
      valid_count = s_valid;
      if (valid_count <= static_cast<unsigned long long>(k)) {
        take_all = true;  // every valid entry is selected
        break;
      }
    }
    prefix = s_prefix;
    remaining = s_remaining;
    mask |= 0xffu << shift;
    __syncthreads();  // hist and the broadcasts are rewritten by the next pass
  }
  // Selected: every valid key (take_all), else every key > prefix and the first `remaining` (in
  // index order) of the keys == prefix.
  const unsigned long long take_equal = take_all ? 0 : remaining;

  // One pass in index order: each thread's position among the selected entries from a block scan of
  // (equal-key count << 16 | larger-key count) over the chunk (each count <= kThreads < 2^16).
  unsigned long long run_greater = 0;
  unsigned long long run_equal = 0;
  for (long long base = 0; base < cols; base += kThreads) {
    const long long i = base + tid;
    bool greater = false;
    bool equal = false;
    if (i < cols) {
      bool valid = false;
      const unsigned int key = order_key(x[i], valid);
      greater = valid && (take_all || key > prefix);
      equal = valid && !take_all && key == prefix;
    }
    const unsigned int mine = (equal ? (1u << 16) : 0u) | (greater ? 1u : 0u);
    scan[tid] = mine;
    __syncthreads();
    for (int offset = 1; offset < kThreads; offset <<= 1) {
      const unsigned int add = tid >= offset ? scan[tid - offset] : 0u;
      __syncthreads();
      scan[tid] += add;
      __syncthreads();
    }
    const unsigned int before = scan[tid] - mine;
    const unsigned long long equal_before = run_equal + (before >> 16);
    const unsigned long long greater_before = run_greater + (before & 0xffffu);
    if (greater || (equal && equal_before < take_equal)) {
      const unsigned long long pos = greater_before + (equal_before < take_equal ? equal_before : take_equal);
      if (pos < static_cast<unsigned long long>(k)) {
        const auto e = static_cast<int32_t>(i);
        const auto page = static_cast<uint32_t>(table[row * pages + i / kPageKeys]);
        out_topk[pos] = e;
        out_index[pos] = static_cast<int32_t>(page * static_cast<uint32_t>(kPageKeys) +
                                              static_cast<uint32_t>(i % kPageKeys));
      }
    }
    const unsigned int chunk = scan[kThreads - 1];
    run_equal += chunk >> 16;
    run_greater += chunk & 0xffffu;
    __syncthreads();  // scan is rewritten by the next chunk
  }
  const long long selected = take_all ? static_cast<long long>(valid_count) : k;
  for (long long j = selected + tid; j < k; j += kThreads) {
    out_topk[j] = -1;
    out_index[j] = -1;
  }
  if (tid == 0) lengths[row] = static_cast<int32_t>(selected > 1 ? selected : 1);
}

}  // namespace

int64_t indexer_logits_max_blocks() { return resident_blocks(kSmemBytes); }

void indexer_logits(const IndexerLogitsArgs& a, void* stream_ptr) {
  const char* op = kIndexerLogitsOp;
  const long long heads = a.q.size(2);
  const long long head_dim = a.q.size(3);
  const long long key_tile = key_tile_for(heads, head_dim);
  if (key_tile < 1) {
    throw ContractError(op, "q", std::to_string(heads) + " heads of " + std::to_string(head_dim) +
                                     " dims do not fit the GPU kernel's " + std::to_string(kSmemBytes) +
                                     "-byte tile (heads plus head_dim rounded up to odd must stay below " +
                                     std::to_string(kSmemBytes / 4) + ")");
  }
  const size_t smem = kSmemBytes;
  const long long capacity = resident_blocks(smem);
  if (a.num_sms > capacity) {
    throw ContractError(op, "num_sms",
                        "the persistent kernel's " + std::to_string(a.num_sms) +
                            " blocks must all be resident, this device holds at most " + std::to_string(capacity));
  }
  const long long tokens = a.q.size(0) * a.q.size(1);
  if (tokens == 0) return;  // no row to write (the host walk does nothing either)
  const auto stream = as_stream(stream_ptr);
  const size_t counter_bytes = kGridCounters * sizeof(unsigned long long) + 2 * static_cast<size_t>(tokens) * sizeof(unsigned int);
  gpu::Scratch scratch(counter_bytes, stream);
#if defined(__HIPCC__)
  gpu::check(hipMemsetAsync(scratch.as<void>(), 0, counter_bytes, stream), "hipMemsetAsync (indexer_logits counters)");
#else
  gpu::check(cudaMemsetAsync(scratch.as<void>(), 0, counter_bytes, stream), "cudaMemsetAsync (indexer_logits counters)");
#endif
  LogitsParams p{};
  p.q = a.q.data<float>();
  p.pages = a.kv_pages.data<float>();
  p.table = a.block_table.data<int32_t>();
  p.weights = a.weights.data<float>();
  p.lens = a.context_lens.data<int32_t>();
  p.schedule = a.schedule.data<int32_t>();
  p.logits = a.logits.data<float>();
  p.rows = a.q.size(0);
  p.next_n = a.q.size(1);
  p.heads = heads;
  p.head_dim = head_dim;
  p.max_pages = a.block_table.size(1);
  p.max_context = a.logits.size(1);
  p.num_pages = a.kv_pages.size(0);
  p.block_kv = a.block_kv;
  p.num_sms = a.num_sms;
  p.max_len = p.max_context < kPageKeys * p.max_pages ? p.max_context : kPageKeys * p.max_pages;
  p.key_tile = key_tile;
  p.key_pitch = key_pitch_for(head_dim);
  p.grid = scratch.as<unsigned long long>();
  p.token_done = reinterpret_cast<unsigned int*>(p.grid + kGridCounters);
  p.token_finished = p.token_done + tokens;
  logits_kernel<<<static_cast<unsigned int>(a.num_sms), kThreads, smem, stream>>>(p);
  gpu::check_launch(op);
}

void indexer_topk(const Tensor& logits, const Tensor& block_table, int64_t k, Tensor& topk, Tensor& kv_index,
                  Tensor& lengths, void* stream_ptr) {
  const long long rows = logits.size(0);
  if (rows == 0) return;
  topk_kernel<<<static_cast<unsigned int>(rows), kThreads, 0, as_stream(stream_ptr)>>>(
      logits.data<float>(), logits.size(1), block_table.data<int32_t>(), block_table.size(1), k, topk.data<int32_t>(),
      kv_index.data<int32_t>(), lengths.data<int32_t>());
  gpu::check_launch(kIndexerTopkOp);
}

}  // namespace dsv4::kernels::cuda
