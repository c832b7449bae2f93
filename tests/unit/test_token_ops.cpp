// kernels/token_ops.h's speculative-scrub copies on the host: EntrySpans against the MODEL1 packer,
// the contracts (ContractError naming the argument), and a round trip backup -> overwrite -> scrub that
// restores exactly the named items and nothing else. Prefill CP's row copies (copy_rows of a strided
// slice, unshard_rows for 1..4 ranks and token counts that are not multiples) and their contracts.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "engine/core/error.h"
#include "kernels/norm_rope.h"
#include "kernels/token_ops.h"

namespace dsv4::kernels {
namespace {

Tensor random_u8(const Shape& shape, std::mt19937& rng, const std::string& name) {
  Tensor t = Tensor::empty(shape, DType::u8, name);
  for (int64_t i = 0; i < t.numel(); ++i) t.data<uint8_t>()[i] = static_cast<uint8_t>(rng());
  return t;
}

Tensor random_f32(const Shape& shape, std::mt19937& rng, const std::string& name) {
  Tensor t = Tensor::empty(shape, DType::f32, name);
  std::normal_distribution<float> n(0.0f, 1.0f);
  for (int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] = n(rng);
  return t;
}

Tensor words(const std::vector<int64_t>& w, int64_t capacity = 0) {
  const int64_t n = std::max<int64_t>(static_cast<int64_t>(w.size()), capacity);
  Tensor t = Tensor::empty({n}, DType::i64, "words");
  for (int64_t i = 0; i < n; ++i) t.data<int64_t>()[i] = i < static_cast<int64_t>(w.size()) ? w[static_cast<size_t>(i)] : -7;
  return t;
}

std::vector<uint8_t> bytes(const Tensor& t) {
  const auto* p = static_cast<const uint8_t*>(t.data_ptr());
  return std::vector<uint8_t>(p, p + dtype_storage_bytes(t.dtype(), t.numel()));
}

void expect_contract(const std::function<void()>& f, const std::string& argument) {
  try {
    f();
    ADD_FAILURE() << "no ContractError (expected one naming '" << argument << "')";
  } catch (const ContractError& e) {
    EXPECT_EQ(e.argument(), argument) << e.what();
  }
}

const Model1Layout kLayout = model1_layout("test", 64, 16, 16);
constexpr int64_t kPageEntries = 4;

TEST(TokenOpsScrub, Model1SpansAreWhereThePackerWrites) {
  const EntrySpans s = entry_spans(false, 64, kLayout, kPageEntries);
  EXPECT_EQ(s.entry_bytes(), kLayout.value_bytes() + kLayout.scale_bytes());
  EXPECT_EQ(s.capacity(3 * kLayout.page_bytes(kPageEntries) + 5), 3 * kPageEntries);
  std::mt19937 rng(1);
  std::vector<float> kv(64);
  std::normal_distribution<float> n(0.0f, 1.0f);
  for (float& x : kv) x = n(rng);
  const int64_t page_bytes = kLayout.page_bytes(kPageEntries);
  for (int64_t loc : {0, 1, 3, 4, 6, 11}) {
    // Bytes 0xAB everywhere but the entry's spans: packing writes exactly the spans.
    std::vector<uint8_t> cache(static_cast<size_t>(3 * page_bytes), 0xAB), marked = cache;
    model1_pack(kLayout, kPageEntries, kv.data(), cache.data(), loc);
    for (int part = 0; part < 2; ++part) {
      const ByteSpan b = s.span(loc, part);
      for (int64_t i = 0; i < b.bytes; ++i) marked[static_cast<size_t>(b.offset + i)] = cache[static_cast<size_t>(b.offset + i)];
    }
    EXPECT_EQ(cache, marked) << "loc " << loc;
    std::vector<uint8_t> values(static_cast<size_t>(kLayout.value_bytes())), scales(static_cast<size_t>(kLayout.scale_bytes()));
    model1_pack_entry(kLayout, kv.data(), values.data(), scales.data());
    EXPECT_EQ(0, std::memcmp(cache.data() + s.span(loc, 0).offset, values.data(), values.size()));
    EXPECT_EQ(0, std::memcmp(cache.data() + s.span(loc, 1).offset, scales.data(), scales.size()));
  }
  const EntrySpans f = entry_spans(true, 8, kLayout, kPageEntries);
  EXPECT_EQ(f.entry_bytes(), 32);
  EXPECT_EQ(f.span(5, 0).offset, 160);
  EXPECT_EQ(f.span(5, 1).bytes, 0);
}

TEST(TokenOpsScrub, ContractsNameTheArgument) {
  std::mt19937 rng(2);
  const EntrySpans spans = entry_spans(false, 64, kLayout, kPageEntries);
  const int64_t W = 24, N = 10, C = 4, pages = 3;
  Tensor state = random_u8({N, W}, rng, "state"), saved = random_u8({C, W}, rng, "saved");
  Tensor cache = random_u8({pages, kLayout.page_bytes(kPageEntries)}, rng, "cache");
  Tensor saved_e = random_u8({C, spans.entry_bytes()}, rng, "saved_entries");
  const Tensor ok = words({1, 5, 2, 3, 9});

  // backup_state_rows
  backup_state_rows(state, ok, saved);
  expect_contract([&] { backup_state_rows(random_f32({N, W / 4}, rng, "s"), ok, saved); }, "state");
  expect_contract([&] { Tensor bad = random_u8({C, W + 1}, rng, "s"); backup_state_rows(state, ok, bad); }, "saved");
  expect_contract([&] { backup_state_rows(state, Tensor::empty({5}, DType::i32, "w"), saved); }, "words");
  expect_contract([&] { backup_state_rows(state, words({0}), saved); }, "words");
  expect_contract([&] { backup_state_rows(state, words({-1, 0}), saved); }, "words");          // E < 0
  expect_contract([&] { backup_state_rows(state, words({3, 0, 0}), saved); }, "words");        // E past the words
  expect_contract([&] { backup_state_rows(state, words({0, 5, 1, 1, 1, 1, 1}), saved); }, "words");  // S > C
  expect_contract([&] { backup_state_rows(state, words({0, 2, 1}), saved); }, "words");        // S past the words
  expect_contract([&] { backup_state_rows(state, words({0, 1, N}), saved); }, "words");        // row >= N
  expect_contract([&] { backup_state_rows(state, words({0, 1, -1}), saved); }, "words");       // row < 0

  // backup_entries
  backup_entries(cache, ok, spans, saved_e);
  expect_contract([&] { Tensor bad = random_u8({C, spans.entry_bytes() - 1}, rng, "e"); backup_entries(cache, ok, spans, bad); },
                  "saved");
  expect_contract([&] { backup_entries(cache.narrow(1, 0, 8), ok, spans, saved_e); }, "cache");
  expect_contract([&] { backup_entries(Tensor::empty({64}, DType::f4_e2m1, "c"), ok, spans, saved_e); }, "cache");
  expect_contract([&] { backup_entries(cache, words({C + 1, 0, 0, 0, 0, 0, 0}), spans, saved_e); }, "words");  // E > C
  expect_contract([&] { backup_entries(cache, words({2, 0}), spans, saved_e); }, "words");  // E past the words
  expect_contract([&] { backup_entries(cache, words({1, pages * kPageEntries, 0}), spans, saved_e); }, "words");
  EntrySpans bad_spans = spans;
  bad_spans.page_bytes = kPageEntries * spans.entry_bytes() - 1;
  expect_contract([&] { backup_entries(cache, ok, bad_spans, saved_e); }, "spans");
  bad_spans = entry_spans(true, 0, kLayout, kPageEntries);
  expect_contract([&] { backup_entries(cache, ok, bad_spans, saved_e); }, "spans");

  // scrub_restore
  const Tensor sw = words({1, 0, 5, 1, 3, 9});
  scrub_restore(saved_e, saved, sw, spans, cache, state);
  expect_contract([&] { Tensor bad = random_u8({C, 3}, rng, "e"); scrub_restore(bad, saved, sw, spans, cache, state); },
                  "saved_entries");
  expect_contract([&] { Tensor bad = random_u8({C, W - 1}, rng, "r"); scrub_restore(saved_e, bad, sw, spans, cache, state); },
                  "saved_rows");
  expect_contract([&] { Tensor st = random_f32({N, W}, rng, "st"); scrub_restore(saved_e, saved, sw, spans, cache, st); },
                  "state");
  expect_contract([&] { scrub_restore(saved_e, saved, words({0}), spans, cache, state); }, "words");
  expect_contract([&] { scrub_restore(saved_e, saved, words({1, C, 5, 0}), spans, cache, state); }, "words");  // entry slot
  expect_contract([&] { scrub_restore(saved_e, saved, words({1, 0, -1, 0}), spans, cache, state); }, "words");  // entry
  expect_contract([&] { scrub_restore(saved_e, saved, words({0, 1, C, 0}), spans, cache, state); }, "words");  // row slot
  expect_contract([&] { scrub_restore(saved_e, saved, words({0, 1, 0, N}), spans, cache, state); }, "words");  // row
  expect_contract([&] { scrub_restore(saved_e, saved, words({0, 1, 0}), spans, cache, state); }, "words");  // S past the words
  expect_contract([&] { scrub_restore(saved_e, saved, words({C + 1, 0, 0}, 40), spans, cache, state); }, "words");  // E > Ce
}

// The engine's sequence: back up the items a verify batch's drafts will overwrite, overwrite them,
// then restore the rejected ones: those get their old bytes back, the accepted keep the new ones, and
// nothing else changes.
void round_trip(bool indexer) {
  std::mt19937 rng(indexer ? 4 : 3);
  const int64_t dims = 16, W = 40, N = 12, C = 6, pages = 3;
  const EntrySpans spans = entry_spans(indexer, dims, kLayout, kPageEntries);
  Tensor cache = indexer ? random_f32({pages, kPageEntries, dims}, rng, "cache")
                         : random_u8({pages, kLayout.page_bytes(kPageEntries)}, rng, "cache");
  Tensor state = random_u8({N, W}, rng, "state");
  const int64_t entries = spans.capacity(dtype_storage_bytes(cache.dtype(), cache.numel()));
  ASSERT_EQ(entries, pages * kPageEntries);
  const std::vector<int64_t> dest = {0, 5, 11, 6, 3}, rows = {2, 11, 7, 0};
  std::vector<int64_t> w = {static_cast<int64_t>(dest.size())};
  w.insert(w.end(), dest.begin(), dest.end());
  w.push_back(static_cast<int64_t>(rows.size()));
  w.insert(w.end(), rows.begin(), rows.end());
  const Tensor backup_words = words(w, 2 + 4 * C);
  Tensor saved_e = random_u8({C, spans.entry_bytes()}, rng, "saved_entries"), saved_r = random_u8({C, W}, rng, "saved_rows");
  const std::vector<uint8_t> unused_e = bytes(saved_e), unused_r = bytes(saved_r);
  backup_state_rows(state, backup_words, saved_r);
  backup_entries(cache, backup_words, spans, saved_e);

  const std::vector<uint8_t> cache0 = bytes(cache), state0 = bytes(state);
  auto entry_bytes = [&](const std::vector<uint8_t>& c, int64_t loc) {
    std::vector<uint8_t> out;
    for (int part = 0; part < 2; ++part) {
      const ByteSpan b = spans.span(loc, part);
      out.insert(out.end(), c.begin() + b.offset, c.begin() + b.offset + b.bytes);
    }
    return out;
  };
  // The saved rows are the named items' bytes; the slots past the counts are untouched.
  const int64_t eb = spans.entry_bytes();
  for (size_t j = 0; j < dest.size(); ++j) {
    const std::vector<uint8_t> got(saved_e.data<uint8_t>() + j * eb, saved_e.data<uint8_t>() + (j + 1) * eb);
    EXPECT_EQ(got, entry_bytes(cache0, dest[j])) << "entry " << j;
  }
  for (size_t j = 0; j < rows.size(); ++j) {
    EXPECT_EQ(0, std::memcmp(saved_r.data<uint8_t>() + j * W, state0.data() + rows[j] * W, static_cast<size_t>(W)));
  }
  EXPECT_EQ(0, std::memcmp(saved_e.data<uint8_t>() + dest.size() * eb, unused_e.data() + dest.size() * eb,
                           static_cast<size_t>((C - static_cast<int64_t>(dest.size())) * eb)));
  EXPECT_EQ(0, std::memcmp(saved_r.data<uint8_t>() + rows.size() * W, unused_r.data() + rows.size() * W,
                           static_cast<size_t>((C - static_cast<int64_t>(rows.size())) * W)));

  // The drafts write every named item.
  auto* c = static_cast<uint8_t*>(cache.data_ptr());
  for (int64_t loc : dest) {
    for (int part = 0; part < 2; ++part) {
      const ByteSpan b = spans.span(loc, part);
      for (int64_t i = 0; i < b.bytes; ++i) c[b.offset + i] = static_cast<uint8_t>(rng());
    }
  }
  for (int64_t r : rows) {
    for (int64_t i = 0; i < W; ++i) state.data<uint8_t>()[r * W + i] = static_cast<uint8_t>(rng());
  }
  const std::vector<uint8_t> cache1 = bytes(cache), state1 = bytes(state);

  // Rejected: entries 1 and 3 (dest 5 and 6), rows 0 and 2 (rows 2 and 7), as (slot, dest) pairs.
  const Tensor scrub_words = words({2, 1, 5, 3, 6, 2, 0, 2, 2, 7}, 2 + 4 * C);
  scrub_restore(saved_e, saved_r, scrub_words, spans, cache, state);
  std::vector<uint8_t> want_cache = cache1, want_state = state1;
  for (int64_t loc : {5, 6}) {
    for (int part = 0; part < 2; ++part) {
      const ByteSpan b = spans.span(loc, part);
      std::memcpy(want_cache.data() + b.offset, cache0.data() + b.offset, static_cast<size_t>(b.bytes));
    }
  }
  for (int64_t r : {2, 7}) std::memcpy(want_state.data() + r * W, state0.data() + r * W, static_cast<size_t>(W));
  EXPECT_EQ(bytes(cache), want_cache);
  EXPECT_EQ(bytes(state), want_state);
  // Every item rejected: the caches are what they were before the drafts.
  scrub_restore(saved_e, saved_r, words({5, 0, 0, 1, 5, 2, 11, 3, 6, 4, 3, 4, 0, 2, 1, 11, 2, 7, 3, 0}), spans, cache,
                state);
  EXPECT_EQ(bytes(cache), cache0);
  EXPECT_EQ(bytes(state), state0);
  // Nothing rejected: nothing changes.
  scrub_restore(saved_e, saved_r, words({0, 0}, 2 + 4 * C), spans, cache, state);
  EXPECT_EQ(bytes(cache), cache0);
  EXPECT_EQ(bytes(state), state0);
}

TEST(TokenOpsScrub, RoundTripModel1Entries) { round_trip(false); }
TEST(TokenOpsScrub, RoundTripIndexerKeys) { round_trip(true); }

// ---- prefill CP's row copies ----------------------------------------------------------------------

TEST(TokenOpsCp, CopyRowsReadsAStridedSlice) {
  std::mt19937 rng(5);
  for (int64_t T : {0, 1, 2, 7}) {
    // A column slice [T, 6] of a bf16 [T, 16] buffer, and of u8 / f32 buffers: any whole-byte dtype.
    for (DType dtype : {DType::bf16, DType::u8, DType::f32}) {
      const int64_t es = dtype_storage_bytes(dtype, 1);
      Tensor wide = Tensor::empty({T, 16}, dtype, "wide");
      for (int64_t i = 0; i < T * 16 * es; ++i) static_cast<uint8_t*>(wide.data_ptr())[i] = static_cast<uint8_t>(rng());
      const Tensor src = wide.narrow(1, 5, 6);
      ASSERT_EQ(src.stride(0), 16);
      Tensor dst = Tensor::empty({T, 6}, dtype, "dst");
      copy_rows(src, dst);
      EXPECT_EQ(bytes(dst), bytes(src.contiguous())) << "T " << T << " " << dtype_name(dtype);
    }
  }
  // A dense source too.
  Tensor a = random_u8({3, 5}, rng, "a"), b = random_u8({3, 5}, rng, "b");
  copy_rows(a, b);
  EXPECT_EQ(bytes(b), bytes(a));
}

TEST(TokenOpsCp, CopyRowsContracts) {
  std::mt19937 rng(6);
  Tensor wide = random_u8({4, 10}, rng, "wide");
  const Tensor src = wide.narrow(1, 2, 4);
  Tensor dst = random_u8({4, 4}, rng, "dst");
  const std::vector<uint8_t> before = bytes(dst);
  expect_contract([&] { Tensor d = random_u8({4, 5}, rng, "d"); copy_rows(src, d); }, "dst");    // width
  expect_contract([&] { Tensor d = random_u8({3, 4}, rng, "d"); copy_rows(src, d); }, "dst");    // rows
  expect_contract([&] { Tensor d = random_f32({4, 1}, rng, "d"); copy_rows(src, d); }, "dst");   // dtype
  expect_contract([&] { Tensor d = random_u8({4, 8}, rng, "d").narrow(1, 0, 4); copy_rows(src, d); }, "dst");
  expect_contract([&] { copy_rows(wide.transpose(0, 1), dst); }, "src");                          // last-dim stride
  expect_contract([&] { copy_rows(random_u8({4}, rng, "s"), dst); }, "src");                      // rank
  expect_contract([&] { Tensor d = Tensor::empty({4, 4}, DType::f4_e2m1, "d");
                        copy_rows(Tensor::empty({4, 4}, DType::f4_e2m1, "s"), d); }, "src");      // sub-byte
  EXPECT_EQ(bytes(dst), before) << "refused before writing";
}

// global[t] = gathered[(t % ranks) * L + t / ranks], written out by hand.
std::vector<uint8_t> unsharded(const Tensor& gathered, int64_t ranks, int64_t T) {
  const int64_t L = gathered.size(0) / ranks, row = gathered.size(1) * dtype_storage_bytes(gathered.dtype(), 1);
  const std::vector<uint8_t> g = bytes(gathered);
  std::vector<uint8_t> out;
  for (int64_t t = 0; t < T; ++t) {
    const int64_t rank = t % ranks, i = t / ranks;  // token t is row i of rank `rank`'s share
    out.insert(out.end(), g.begin() + (rank * L + i) * row, g.begin() + (rank * L + i + 1) * row);
  }
  return out;
}

TEST(TokenOpsCp, UnshardRowsPutsTheSharesBackInTokenOrder) {
  std::mt19937 rng(7);
  for (int64_t ranks = 1; ranks <= 4; ++ranks) {
    for (int64_t T : {0, 1, 2, 5, 7, 8, 13}) {
      const int64_t L = (T + ranks - 1) / ranks;  // the padded share
      for (DType dtype : {DType::bf16, DType::f32}) {
        Tensor gathered = Tensor::empty({ranks * L, 3}, dtype, "gathered");
        for (int64_t i = 0; i < dtype_storage_bytes(dtype, gathered.numel()); ++i) {
          static_cast<uint8_t*>(gathered.data_ptr())[i] = static_cast<uint8_t>(rng());
        }
        Tensor global = Tensor::empty({T, 3}, dtype, "global");
        unshard_rows(gathered, ranks, global);
        EXPECT_EQ(bytes(global), unsharded(gathered, ranks, T)) << "ranks " << ranks << " T " << T;
      }
    }
  }
  // A concrete case: 2 ranks, T = 5 (shares of 3, the last row of rank 1 padding).
  Tensor g = Tensor::empty({6, 1}, DType::i32, "gathered");
  for (int32_t i = 0; i < 6; ++i) g.data<int32_t>()[i] = 10 * i;  // rank 0: t 0, 2, 4; rank 1: t 1, 3, pad
  Tensor out = Tensor::empty({5, 1}, DType::i32, "global");
  unshard_rows(g, 2, out);
  EXPECT_EQ(out.values(), (std::vector<double>{0, 30, 10, 40, 20}));
  // A global shorter than the shares' rows is fine too (the rule is T <= ranks * L).
  Tensor two = Tensor::empty({2, 1}, DType::i32, "global");
  unshard_rows(g, 2, two);
  EXPECT_EQ(two.values(), (std::vector<double>{0, 30}));
}

TEST(TokenOpsCp, UnshardRowsContracts) {
  std::mt19937 rng(8);
  Tensor g = random_u8({8, 4}, rng, "gathered");
  Tensor out = random_u8({7, 4}, rng, "global");
  const std::vector<uint8_t> before = bytes(out);
  expect_contract([&] { unshard_rows(g, 0, out); }, "ranks");
  expect_contract([&] { unshard_rows(g, -2, out); }, "ranks");
  expect_contract([&] { unshard_rows(g, 3, out); }, "gathered");                                   // 8 % 3
  expect_contract([&] { Tensor o = random_u8({9, 4}, rng, "o"); unshard_rows(g, 2, o); }, "global");  // T > n * L
  expect_contract([&] { Tensor o = random_u8({7, 3}, rng, "o"); unshard_rows(g, 2, o); }, "global");  // width
  expect_contract([&] { Tensor o = random_f32({7, 1}, rng, "o"); unshard_rows(g, 2, o); }, "global"); // dtype
  expect_contract([&] { Tensor o = random_u8({7, 8}, rng, "o").narrow(1, 0, 4); unshard_rows(g, 2, o); }, "global");
  expect_contract([&] { unshard_rows(random_u8({8, 8}, rng, "w").narrow(1, 0, 4), 2, out); }, "gathered");
  expect_contract([&] { Tensor o = Tensor::empty({2, 4}, DType::f4_e2m1, "o");
                        unshard_rows(Tensor::empty({2, 4}, DType::f4_e2m1, "g"), 2, o); }, "gathered");
  EXPECT_EQ(bytes(out), before) << "refused before writing";
}

}  // namespace
}  // namespace dsv4::kernels
